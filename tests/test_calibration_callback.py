"""NullSpaceCalibrationCallback: calibration at on_train_begin with Trainer, SpectralTrainer and TRL's SFTTrainer."""

from __future__ import annotations

import copy
import os
import warnings
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from peft_ext import NullSpaceLoraConfig, NullSpaceReport, initialize_nullspace_lora
from peft_ext.nullspace.initialize import nullspace_layers
from trainer_ext import NullSpaceCalibrationCallback, SpectralTrainer, SpectralTrainingArguments
from trainer_ext.calibration import shard_batches

TARGETS = ["q_proj", "v_proj", "up_proj"]
VOCAB = 40  # more token ids than the hidden size (16): no exactly-null input directions, whose basis is arbitrary


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32, pad_token_id=0,
                      bos_token_id=2, eos_token_id=3)
    return LlamaForCausalLM(cfg)


def token_rows(n: int = 48, length: int = 10, seed: int = 0, labels: bool = True):
    from datasets import Dataset

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, VOCAB, (n, length), generator=g).tolist()
    return Dataset.from_dict({"input_ids": ids, "labels": ids} if labels else {"input_ids": ids})


def batches_of(rows, size: int = 8) -> list[dict[str, torch.Tensor]]:
    """What a collator makes of equal-length token rows."""
    ids = torch.tensor(rows["input_ids"])
    return [{"input_ids": ids[i : i + size], "attention_mask": torch.ones_like(ids[i : i + size])}
            for i in range(0, len(ids), size)]


def config(mode: str = "v2") -> NullSpaceLoraConfig:
    return NullSpaceLoraConfig(r=2, target_modules=list(TARGETS), mode=mode)


def common_args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=3, learning_rate=1e-2,
                report_to="none", use_cpu=True, save_strategy="no", logging_steps=100, seed=0,
                remove_unused_columns=False, disable_tqdm=True)
    return {**base, **kw}


def factors(model, adapter: str = "default") -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {n: (layer.nullspace_A[adapter].weight.detach().clone(), layer.nullspace_B[adapter].weight.detach().clone())
            for n, layer in nullspace_layers(model, adapter).items()}


def base_weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "nullspace_" not in n}


class AfterCalibration(TrainerCallback):
    """Runs after the calibration callback's on_train_begin: what the optimizer and the adapter hold then."""

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kw):
        self.factors = factors(model)
        self.optimizer_ids = {id(p) for g in optimizer.param_groups for p in g["params"]}
        self.parameters = {n: p for n, p in model.named_parameters()}


def projector(a: torch.Tensor) -> torch.Tensor:
    a = a.double()
    return a.T @ a


# ---------------------------------------------------------------------------------------- the three trainers
@pytest.mark.filterwarnings("ignore:NullSpaceLoRA verification flagged layers")  # tiny random model: eig flags
@pytest.mark.filterwarnings("ignore:`gradient_checkpointing` is deprecated:FutureWarning")  # TRL 1.16's SFTConfig
@pytest.mark.parametrize("kind, mode, data_form", [
    ("Trainer", "v1", "list of batches"),
    ("SpectralTrainer", "v2", "DataLoader"),
    ("SFTTrainer", "v2", "dataset rows"),
    ("SpectralSFTTrainer", "v2", "dataset rows"),
])
def test_calibrates_like_by_hand_then_trains_the_same_parameters(tmp_path, kind, mode, data_form):
    base = tiny_llama()
    calib_rows = token_rows(n=32, seed=1, labels=False)
    hand_batches = batches_of(calib_rows)
    hand = get_peft_model(copy.deepcopy(base), config(mode))
    # SFTConfig trains in bf16 by default, so the Trainer's forward (accelerate's autocast around the model's forward)
    # and with it the calibration see bf16-rounded activations, as training does; the reference must too
    mixed = kind == "SFTTrainer"
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mixed):
        initialize_nullspace_lora(hand, hand_batches, heldout_every=3, progress=False, warn=False)

    def collate(rows):
        ids = torch.stack([r["input_ids"] for r in rows])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    data = {"list of batches": hand_batches,
            "DataLoader": torch.utils.data.DataLoader(calib_rows.with_format("torch"), batch_size=8,
                                                      collate_fn=collate),
            "dataset rows": calib_rows}[data_form]
    calibrate = NullSpaceCalibrationCallback(data, heldout_every=3, progress=False)
    after = AfterCalibration()
    before_base = base_weights(base)
    common = common_args(tmp_path)
    if kind == "Trainer":
        trainer = Trainer(model=get_peft_model(base, config(mode)), args=TrainingArguments(**common),
                          train_dataset=token_rows(), callbacks=[calibrate, after])
    elif kind == "SpectralTrainer":
        args = SpectralTrainingArguments(**common, spec_monitor=True, spec_every=1, spec_topk=2, spec_targets="mlp.fc1")
        trainer = SpectralTrainer(model=get_peft_model(base, config(mode)), args=args, train_dataset=token_rows(),
                                  callbacks=[calibrate, after])
    else:
        from trl import SFTConfig, SFTTrainer

        tok = _tokenizer()
        if kind == "SFTTrainer":
            assert SFTConfig(**common).bf16 is True
            trainer = SFTTrainer(model=base, args=SFTConfig(**common, max_length=16), processing_class=tok,
                                 train_dataset=token_rows(labels=False), peft_config=config(mode),
                                 callbacks=[calibrate, after])
        else:  # the SFTConfig + SpectralTrainingArguments combination the module docstring documents
            @dataclass
            class SpectralSFTConfig(SFTConfig, SpectralTrainingArguments):
                pass

            class SpectralSFTTrainer(SpectralTrainer, SFTTrainer):
                pass

            args = SpectralSFTConfig(**common, max_length=16, bf16=False, spec_monitor=True, spec_every=1, spec_topk=2,
                                     spec_targets="mlp.fc1")
            assert args.gradient_checkpointing is True  # SFTConfig's own default kept (SFTConfig first in the bases)
            trainer = SpectralSFTTrainer(model=base, args=args, train_dataset=token_rows(labels=False),
                                         processing_class=tok, peft_config=config(mode), callbacks=[calibrate, after])
    trainer.train()
    model = trainer.model

    # 1) the same bases as initialize_nullspace_lora by hand on the same batches
    expected = factors(hand)
    assert set(after.factors) == set(expected) == {f"model.layers.0.{m}" for m in
                                                   ("self_attn.q_proj", "self_attn.v_proj", "mlp.up_proj")}
    for name, (a, b) in after.factors.items():
        assert torch.allclose(projector(a), projector(expected[name][0]), atol=1e-6), name
        assert torch.allclose(a.double() @ a.double().T, torch.eye(2, dtype=torch.float64), atol=1e-6), name
        assert float(b.abs().max()) == 0.0
    assert isinstance(calibrate.report, NullSpaceReport) and calibrate.skipped is None
    assert [lr.layer for lr in calibrate.report.layers] == list(expected)
    assert calibrate.report.heldout == "every 3th calibration batch"
    summary = next(e for e in trainer.state.log_history if "nullspace/layers" in e)
    assert summary["nullspace/layers"] == 3.0 and summary["step"] == 0

    # 2) the optimizer holds the calibrated tensors (written in place), and training moved them from there
    trainable = {n: p for n, p in after.parameters.items() if p.requires_grad}
    assert trainable and all(id(p) in after.optimizer_ids for p in trainable.values())
    assert all(("nullspace_B" in n) or (mode == "v1" and "nullspace_A" in n) for n in trainable)
    trained = factors(model)
    for name, (a, b) in trained.items():
        assert float(b.abs().max()) > 0, name  # B left zero
        if mode == "v1":
            assert not torch.equal(a, after.factors[name][0]), name  # A trains from its calibrated value
        else:
            assert torch.equal(a, after.factors[name][0]), name  # v2: A frozen at the calibrated basis
    # 3) the frozen base stayed frozen
    now = base_weights(model.get_base_model() if hasattr(model, "get_base_model") else model)
    for n, w in before_base.items():
        key = next(k for k in now if k.replace(".base_layer", "") == n)
        assert torch.equal(now[key], w), n
    if kind.startswith("Spectral"):
        assert any(k.startswith("spec/") for e in trainer.state.log_history for k in e)


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(VOCAB - 4)]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>")


# ---------------------------------------------------------------------------------------- resume, warnings, errors
@pytest.mark.filterwarnings("ignore:NullSpaceLoRA verification flagged layers")
def test_resume_from_checkpoint_skips_calibration_and_keeps_the_trained_adapter(tmp_path):
    first = NullSpaceCalibrationCallback(batches_of(token_rows(n=32, seed=1)), progress=False)
    trainer = Trainer(model=get_peft_model(tiny_llama(), config()), train_dataset=token_rows(), callbacks=[first],
                      args=TrainingArguments(**common_args(tmp_path, max_steps=2, save_strategy="steps", save_steps=2)))
    trainer.train()
    saved = factors(trainer.model)
    assert first.report is not None and os.path.isdir(tmp_path / "checkpoint-2")

    # a fresh process: new, uninitialised adapter, other calibration data (which would give another basis)
    second = NullSpaceCalibrationCallback(batches_of(token_rows(n=32, seed=7)), progress=False)
    resumed = Trainer(model=get_peft_model(tiny_llama(), config()), train_dataset=token_rows(), callbacks=[second],
                      args=TrainingArguments(**common_args(tmp_path, max_steps=3, save_strategy="no")))
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert second.report is None and "already initialised" in second.skipped and "step 2" in second.skipped
    for name, (a, _) in factors(resumed.model).items():
        assert torch.equal(a, saved[name][0]), name  # the checkpoint's basis, not a new calibration
    # the first run's calibration summary comes back with the checkpoint's log history, and no second one is added
    assert [e["step"] for e in resumed.state.log_history if "nullspace/layers" in e] == [0]

    # a second train() on a calibrated model skips as well
    resumed.train()
    assert second.report is None and second.skipped is not None


def test_flagged_layer_warning_points_at_the_train_call(tmp_path):
    few = [{"input_ids": torch.tensor([[5, 6, 7]]), "attention_mask": torch.ones(1, 3, dtype=torch.long)}]
    calibrate = NullSpaceCalibrationCallback(few, progress=False)  # 3 tokens < 16 input dimensions: flagged
    trainer = Trainer(model=get_peft_model(tiny_llama(), config()), train_dataset=token_rows(), callbacks=[calibrate],
                      args=TrainingArguments(**common_args(tmp_path, max_steps=1)))
    with pytest.warns(UserWarning, match="NullSpaceLoRA verification flagged layers") as caught:
        trainer.train()
    flagged = [w for w in caught if "flagged layers" in str(w.message)]
    assert len(flagged) == 1 and flagged[0].filename == __file__  # not trainer.py, not calibration.py
    assert "tokens: 3 calibration tokens < 16 input dimensions" in str(flagged[0].message)
    # and called by hand (through torch.no_grad's wrapper) it points here too
    with pytest.warns(UserWarning, match="flagged layers") as caught:
        initialize_nullspace_lora(get_peft_model(tiny_llama(), config()), few, progress=False)
    assert [w.filename for w in caught if "flagged layers" in str(w.message)] == [__file__]


@pytest.mark.parametrize("bad, error, match", [
    ("some text", TypeError, "calibration_data must be a DataLoader, a dataset of tokenized rows, or an iterable"),
    (None, TypeError, "got NoneType"),
    (torch.ones(2, 3, dtype=torch.long), TypeError, r"wrap a single batch in a list: \[batch\]"),
    ({"input_ids": torch.ones(2, 3)}, TypeError, "is a dict, not data: pass one split"),
    ([], ValueError, "calibration_data is empty"),
])
def test_bad_calibration_data_is_refused_when_built(bad, error, match):
    with pytest.raises(error, match=match):
        NullSpaceCalibrationCallback(bad)


@pytest.mark.parametrize("kw, match", [
    ({"max_batches": 0}, "max_batches must be a positive integer or None, got 0"),
    ({"heldout_every": 1}, "heldout_every must be an integer >= 2"),
    ({"heldout": "text"}, "heldout must be a DataLoader"),
    ({"dtype": torch.float16}, "dtype must be torch.float64 or torch.float32"),
])
def test_bad_options_are_refused(kw, match):
    with pytest.raises((ValueError, TypeError), match=match):
        NullSpaceCalibrationCallback([torch.ones(1, 3, dtype=torch.long)], **kw)


def test_untokenized_rows_and_models_without_the_adapter_get_a_clear_error(tmp_path):
    from datasets import Dataset

    raw = Dataset.from_dict({"text": ["the cat sat"] * 8})
    trainer = Trainer(model=get_peft_model(tiny_llama(), config()), train_dataset=token_rows(),
                      callbacks=[NullSpaceCalibrationCallback(raw, progress=False)],
                      args=TrainingArguments(**common_args(tmp_path, max_steps=1)))
    with pytest.raises(ValueError, match=r"has columns \['text'\], but the training batches are built from tokenized "
                                         r"rows .*tokenize the calibration data"):
        trainer.train()
    lora = Trainer(model=get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"])),
                   train_dataset=token_rows(), callbacks=[NullSpaceCalibrationCallback(batches_of(token_rows()))],
                   args=TrainingArguments(**common_args(tmp_path, max_steps=1)))
    with pytest.raises(ValueError, match="has no NullSpaceLoRA layers for adapter 'default'; build the model with "
                                         r"get_peft_model\(base, NullSpaceLoraConfig"):
        lora.train()


# ---------------------------------------------------------------------------------------- several processes
def test_shards_partition_the_data():
    rows = token_rows(n=21, labels=False)
    collate = lambda rs: {"input_ids": torch.tensor([r["input_ids"] for r in rs])}  # noqa: E731
    got = [[b["input_ids"] for b in shard_batches(rows, r, 2, batch_size=4, collator=collate)] for r in (0, 1)]
    assert [len(g) for g in got] == [3, 3]  # 11 and 10 rows, 4 a batch
    seen = torch.cat([torch.cat(g) for g in got])
    assert sorted(map(tuple, seen.tolist())) == sorted(map(tuple, rows["input_ids"]))
    batches = [torch.full((1, 2), i) for i in range(5)]
    assert [int(b[0, 0]) for b in shard_batches(batches, 1, 2, batch_size=1, collator=None)] == [1, 3]
    # a shuffling DataLoader: every rank draws the same order, so the shards are disjoint and cover it
    loader = torch.utils.data.DataLoader(torch.arange(20), batch_size=3, shuffle=True)
    parts = [torch.cat(list(shard_batches(loader, r, 2, batch_size=3, collator=None, seed=5))) for r in (0, 1)]
    assert sorted(torch.cat(parts).tolist()) == list(range(20))


def _rank_worker(rank: int, world: int, store: str, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        _calibrate_once(rank == 0, out + f".rank{rank}")
    finally:
        dist.destroy_process_group()


def _calibrate_once(main: bool, out: str) -> None:
    model = get_peft_model(tiny_llama(), config())
    cb = NullSpaceCalibrationCallback(batches_of(token_rows(n=64, seed=3), size=4), progress=main,
                                      heldout=batches_of(token_rows(n=16, seed=4), size=4))
    args = SimpleNamespace(seed=0, data_seed=None, per_device_train_batch_size=4, disable_tqdm=False)
    state = TrainerState(is_world_process_zero=main, is_local_process_zero=main)
    cb.on_train_begin(args, state, TrainerControl(), model=model)
    torch.save({n: a for n, (a, _) in factors(model).items()} | {"tokens": cb.report.layers[0].tokens}, out)


@pytest.mark.multiprocess
@pytest.mark.filterwarnings("ignore:NullSpaceLoRA verification flagged layers")
def test_two_processes_calibrate_like_one(tmp_path):
    """Two gloo processes (forked, so nothing is imported again: ~3 s), each with half of the batches (round-robin):
    the same token counts and bases as one process with all of them (statistics all-reduced), and identical A on
    both ranks (rank 0's broadcast)."""
    import torch.multiprocessing as mp

    _calibrate_once(True, str(tmp_path / "one"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mp.start_processes(_rank_worker, args=(2, str(tmp_path / "store"), str(tmp_path / "two")), nprocs=2,
                           start_method="fork")
    one = torch.load(tmp_path / "one", weights_only=True)
    r0, r1 = (torch.load(tmp_path / f"two.rank{r}", weights_only=True) for r in (0, 1))
    assert one["tokens"] == r0["tokens"] == r1["tokens"] == 16 * 4 * 10  # all 16 batches of 4 rows, on 1 or 2 ranks
    for name in one:
        if name != "tokens":
            assert torch.equal(r0[name], r1[name]), name  # rank 0's basis broadcast
            assert torch.allclose(projector(r0[name]), projector(one[name]), atol=1e-6), name
