"""ForgettingCallback: closed-form values on a no-op adapter, real forgetting on a trained one, next to the loss log."""

import math

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import Trainer, TrainingArguments

from trainer_ext import ForgettingCallback, SpectralMonitorCallback

from .test_callbacks import LogRecorder, _tiny_llama, _token_rows

TEXTS = ["the cat sat on a mat", "a big red dog ran to the house", "the dog and the cat sat", "red house on a mat"]


def _manual(model, tok, texts, base=None):
    """NLL and KL(base||model) per token, computed directly (the closed form the callback must match)."""
    enc = tok(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        logp = torch.log_softmax(model(**enc).logits[:, :-1].float(), -1)
        basep = logp if base is None else torch.log_softmax(base(**enc).logits[:, :-1].float(), -1)
    mask = enc["attention_mask"][:, 1:].bool()
    tgt = enc["input_ids"][:, 1:]
    nll = -logp.gather(-1, tgt[..., None]).squeeze(-1)[mask].sum() / mask.sum()
    kl = (basep.exp() * (basep - logp)).sum(-1)[mask].sum() / mask.sum()
    return float(nll), float(kl)


def _trainer(tmp_path, model, cbs, steps=4, lr=5e-2, logging_steps=2):
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=steps, per_device_train_batch_size=4,
                             learning_rate=lr, logging_steps=logging_steps, report_to="none", save_strategy="no",
                             use_cpu=True, disable_tqdm=True)
    return Trainer(model=model, args=args, train_dataset=_token_rows(True), callbacks=cbs)


@pytest.mark.parametrize("base", ["cache", "disable_adapter"])
def test_values_match_the_closed_form_and_rise_with_training(tmp_path, base):
    model, tok = _tiny_llama()
    import copy

    frozen = copy.deepcopy(model).eval()
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "gate_proj"]))
    rec = LogRecorder()
    cb = ForgettingCallback(TEXTS, tok, every=2, batch_size=3, base=base)
    trainer = _trainer(tmp_path, peft_model, [rec])
    cb.attach(trainer)
    trainer.train()
    logs = [e for e in trainer.state.log_history if "forget/ref_nll" in e]
    assert [e["step"] for e in logs] == [0, 2, 4]
    nll0, _ = _manual(frozen, tok, TEXTS)
    assert logs[0]["forget/ref_nll"] == pytest.approx(nll0, rel=1e-5) and logs[0]["forget/kl_base"] == pytest.approx(0, abs=1e-6)
    peft_model.eval()
    nll, kl = _manual(peft_model, tok, TEXTS, base=frozen)
    assert logs[-1]["forget/ref_nll"] == pytest.approx(nll, rel=1e-4)
    assert logs[-1]["forget/kl_base"] == pytest.approx(kl, rel=1e-3) and kl > 1e-4  # lr 5e-2: it moved
    assert logs[-1]["forget/nll_increase"] == pytest.approx(nll - nll0, rel=1e-3, abs=1e-6)
    assert logs[-1]["forget/ref_ppl"] == pytest.approx(math.exp(nll), rel=1e-4)
    # the Trainer's own loss log is still there, at its steps, and report_to callbacks got our values
    assert [e["step"] for e in trainer.state.log_history if "loss" in e] == [2, 4]
    assert [e["step"] for e in rec.seen if "forget/kl_base" in e] == [0, 2, 4]


def test_bad_arguments_are_refused_by_name():
    _, tok = _tiny_llama()
    with pytest.raises(ValueError, match="reference_texts must be a non-empty list"):
        ForgettingCallback("the cat", tok)
    with pytest.raises(ValueError, match=r"every must be an integer >= 1, got 0"):
        ForgettingCallback(TEXTS, tok, every=0)
    with pytest.raises(ValueError, match="base must be 'cache' or 'disable_adapter'"):
        ForgettingCallback(TEXTS, tok, base="copy")


def test_disable_adapter_needs_a_peft_model(tmp_path):
    model, tok = _tiny_llama()
    trainer = _trainer(tmp_path, model, [], steps=1)
    ForgettingCallback(TEXTS, tok, base="disable_adapter").attach(trainer)
    with pytest.raises(ValueError, match="needs a PeftModel"):
        trainer.train()


def test_works_beside_the_spectral_monitor(tmp_path):
    model, tok = _tiny_llama()
    trainer = _trainer(tmp_path, model, [], steps=4, lr=5e-3)
    SpectralMonitorCallback(targets=["mlp.fc1"], every=2, topk=2, plots=False).attach(trainer)
    ForgettingCallback(TEXTS, tok, every=2).attach(trainer)
    trainer.train()
    h = trainer.state.log_history
    assert [e["step"] for e in h if "loss" in e] == [2, 4]
    assert [e["step"] for e in h if "forget/kl_base" in e] == [0, 2, 4]
    assert [e["step"] for e in h if any(k.startswith("spec/") for k in e)] == [2, 4]
