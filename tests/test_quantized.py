"""NullSpaceLoRA on bitsandbytes-quantised bases (NF4 4-bit and LLM.int8), which run on CPU."""

import pytest
import torch
from peft import PeftModel, get_peft_model

from peft_ext import NullSpaceLoraConfig, disable_bnb_cpu_repack, export_to_lora, initialize_nullspace_lora

from .conftest import tiny_bert, token_batches

bnb = pytest.importorskip("bitsandbytes")

QUANT = {
    "nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32),
    "int8": dict(load_in_8bit=True),
}


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-bert")
    tiny_bert(hidden_size=64, intermediate_size=128).save_pretrained(path)  # shapes real models have: in % 64 == 0
    return path


def _load(base_dir, kind):
    from transformers import BertModel, BitsAndBytesConfig

    return BertModel.from_pretrained(base_dir, quantization_config=BitsAndBytesConfig(**QUANT[kind]), device_map="cpu").eval()


def _plain_lora(base_dir, kind, path):
    """The exported LoRA in vanilla PEFT. peft-ext's layers keep bitsandbytes' 4-bit layers in float32 on every CPU;
    a plain PEFT model needs the same switch to compute the same numbers (peft_ext/bnb_cpu.py)."""
    model = PeftModel.from_pretrained(_load(base_dir, kind), path).eval()
    disable_bnb_cpu_repack(model)
    return model


@pytest.mark.filterwarnings("ignore:MatMul8bitLt")
@pytest.mark.parametrize("kind", ["nf4", "int8"])
@pytest.mark.parametrize("mode", ["v2", "split"])
def test_quantised_base_is_never_touched_and_round_trips(base_dir, tmp_path, kind, mode):
    model = get_peft_model(_load(base_dir, kind), NullSpaceLoraConfig(r=4, target_modules=["query", "value"], mode=mode))
    layer = model.base_model.model.encoder.layer[0].attention.self.query
    assert type(layer.get_base_layer()).__name__ == ("Linear4bit" if kind == "nf4" else "Linear8bitLt")
    packed = layer.get_base_layer().weight.data.clone()
    batch = token_batches(n_batches=1, seed=3)[0]
    with torch.no_grad():
        with model.disable_adapter():
            y_base = model(**batch).last_hidden_state
    report = initialize_nullspace_lora(model, token_batches(n_batches=6), progress=False, warn=False)
    assert max(lr.init_output_ratio for lr in report.layers) < 1e-3
    assert torch.equal(layer.get_base_layer().weight.data, packed)  # W untouched, also in split mode
    with torch.no_grad():
        assert torch.allclose(model(**batch).last_hidden_state, y_base, atol=1e-5)

    # one training step moves B only
    model.train()
    a0 = layer.nullspace_A["default"].weight.clone()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    model(**batch).last_hidden_state.pow(2).mean().backward()
    opt.step()
    model.eval()
    if mode == "v2":
        assert torch.equal(layer.nullspace_A["default"].weight, a0)
    assert layer.nullspace_B["default"].weight.abs().sum() > 0
    assert torch.equal(layer.get_base_layer().weight.data, packed)
    # In-distribution inputs barely reach the null space, so one step hardly moves the output (that is the point
    # of the method); make B large so the round trips below compare clearly different outputs.
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    with torch.no_grad():
        y = model(**batch).last_hidden_state
    assert not torch.allclose(y, y_base, atol=1e-4)

    model.save_pretrained(tmp_path / "ad")
    reloaded = PeftModel.from_pretrained(_load(base_dir, kind), tmp_path / "ad").eval()
    export_to_lora(model, tmp_path / "lora")
    as_lora = _plain_lora(base_dir, kind, tmp_path / "lora")
    with torch.no_grad():
        assert torch.allclose(reloaded(**batch).last_hidden_state, y, atol=1e-5)
        assert torch.allclose(as_lora(**batch).last_hidden_state, y, atol=1e-4)
