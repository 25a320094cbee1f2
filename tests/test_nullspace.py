import copy
import math
import os

import pytest
import torch
from peft import PeftModel, get_peft_model
from torch import nn

from peft_ext import ActivationStats, NullSpaceLoraConfig, export_to_lora, initialize_nullspace_lora, save_adapter_atomic

from .conftest import (
    Toy,
    outputs_under_vanilla_peft,
    perturb_trainables,
    planted_inputs,
    same_state,
    save_tiny_bert_classifier,
    state_of,
    tiny_bert,
    token_batches,
)


def _planted_toy(seed=0):
    """Toy whose q/k input has an exact 3-dim null space and a known spectrum."""
    eig = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.5, 1e-3, 1e-4, 1e-5], dtype=torch.float64)
    x, q = planted_inputs(400, eig, seed=seed)
    batches = [x[i : i + 50].float() for i in range(0, 400, 50)]
    return Toy(seed=seed), batches, eig, q


@pytest.mark.parametrize("mode", ["v2", "v1", "split"])
def test_closed_form_null_space_and_report(mode):
    toy, batches, eig, q = _planted_toy()
    model = get_peft_model(toy, NullSpaceLoraConfig(r=3, target_modules=["q", "k"], mode=mode))
    stats = ActivationStats.collect(model, batches, progress=False)
    report = initialize_nullspace_lora(model, stats=stats, progress=False)
    layer = model.base_model.model.q
    a = layer.nullspace_A["default"].weight.double()
    # A spans exactly the 3 smallest-eigenvalue directions of the planted covariance
    tail = q[:, 5:]
    assert torch.allclose(a.T @ a, tail @ tail.T, atol=1e-6)
    assert torch.allclose(a @ a.T, torch.eye(3, dtype=torch.float64), atol=1e-6)
    rep = {lr.layer: lr for lr in report.layers}["q"]
    # in-sample, ||A x|| / ||x|| = sqrt(sum of tail eigenvalues / sum of all), the seed note's closed form
    expected = math.sqrt(float(eig[5:].sum() / eig.sum()))
    assert rep.heldout_ratio == pytest.approx(expected, rel=1e-4)
    assert rep.tail_energy == pytest.approx(expected**2, rel=1e-4)
    assert rep.eig_ratio == pytest.approx(1e-5 / 4.0, rel=1e-3)
    assert rep.init_output_ratio < 1e-6
    assert rep.tokens == 400 and rep.flags == []
    assert "in-sample" in report.heldout
    assert "q" in str(report) and '"heldout_ratio"' in report.to_json()
    # the function is unchanged at init, in every mode
    x = batches[0]
    with torch.no_grad():
        y = model(x)
        with model.disable_adapter():
            y0 = model(x)
    assert torch.allclose(y, y0, atol=1e-6)


def test_heldout_batches_are_kept_out_of_the_statistics():
    toy, batches, _, _ = _planted_toy()
    model = get_peft_model(toy, NullSpaceLoraConfig(r=3, target_modules=["q"]))
    report = initialize_nullspace_lora(model, batches, heldout_every=4, progress=False)
    assert report.layers[0].tokens == 300  # 2 of the 8 batches of 50 held out
    assert report.heldout == "every 4th calibration batch"
    assert report.model_check == "collected on this model by this call"


def test_training_an_uninitialised_adapter_is_refused():
    model = get_peft_model(Toy(), NullSpaceLoraConfig(r=2, target_modules=["q"]))
    model.train()
    with pytest.raises(RuntimeError, match="initialize_nullspace_lora"):
        model(torch.randn(2, 8))


def test_two_adapters_and_set_adapter():
    toy, batches, _, _ = _planted_toy()
    model = get_peft_model(toy, NullSpaceLoraConfig(r=3, target_modules=["q"]), adapter_name="first")
    model.add_adapter("second", NullSpaceLoraConfig(r=2, target_modules=["q"], mode="v1"))
    initialize_nullspace_lora(model, batches, adapter_name="first", progress=False)
    model.set_adapter("second")
    initialize_nullspace_lora(model, batches, progress=False)  # the active adapter: second
    layer = model.base_model.model.q
    assert layer.nullspace_A["first"].weight.shape == (3, 8) and layer.nullspace_A["second"].weight.shape == (2, 8)
    # second is active and trainable (v1: both factors); first is frozen
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"base_model.model.q.nullspace_A.second.weight", "base_model.model.q.nullspace_B.second.weight"}
    perturb_trainables(model, seed=1)
    model.set_adapter("first")
    perturb_trainables(model, seed=2)
    model.eval()
    x = torch.randn(3, 8)
    with torch.no_grad():
        ya = model(x)
        model.set_adapter("second")
        yb = model(x)
    assert not torch.allclose(ya, yb)


@pytest.mark.parametrize("mode", ["v2", "split"])
def test_export_to_lora_loads_in_vanilla_peft_with_identical_outputs(tmp_path, mode):
    from transformers import BertForSequenceClassification

    save_tiny_bert_classifier(tmp_path / "base")
    model = get_peft_model(
        BertForSequenceClassification.from_pretrained(tmp_path / "base"),
        NullSpaceLoraConfig(r=4, target_modules=["query", "value", "dense"], mode=mode, nullspace_alpha=8,
                            modules_to_save=["classifier"], task_type="SEQ_CLS"),
    )
    initialize_nullspace_lora(model, token_batches(), progress=False, warn=False)  # the 2-D pooler sees 12 rows < 32
    perturb_trainables(model)
    model.eval()
    batch = token_batches(n_batches=1, seed=5)[0]
    with torch.no_grad():
        expected = model(**batch).logits
    out = export_to_lora(model, tmp_path / "lora")
    assert sorted(os.listdir(out)) == ["adapter_config.json", "adapter_model.safetensors", "peft_ext_export.json"]
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]
    with pytest.raises(FileExistsError):
        export_to_lora(model, tmp_path / "lora")
    maxdiff, cfg = outputs_under_vanilla_peft(tmp_path, tmp_path / "base", tmp_path / "lora", batch, expected)
    assert cfg["peft_type"] == "LORA"
    assert maxdiff < 1e-5
    assert cfg["r"] == (8 if mode == "split" else 4)


# ------------------------------------------------------------------ bad inputs: clear error, model unchanged
def test_r_larger_than_input_dim_is_refused_before_any_change():
    toy = Toy()
    before = state_of(toy)
    with pytest.raises(ValueError, match=r"r=9 is larger than the input dimension.*q \(in_features=8\)"):
        get_peft_model(toy, NullSpaceLoraConfig(r=9, target_modules=["q", "k"]))
    assert isinstance(toy.q, nn.Linear) and same_state(state_of(toy), before)


def test_config_errors_name_field_and_value():
    with pytest.raises(ValueError, match="mode must be one of"):
        NullSpaceLoraConfig(r=2, target_modules=["q"], mode="v3")
    with pytest.raises(ValueError, match=r"r must be a positive integer, got r=0"):
        NullSpaceLoraConfig(r=0, target_modules=["q"])
    with pytest.raises(ValueError, match="target_modules is required"):
        NullSpaceLoraConfig(r=2)
    with pytest.raises(ValueError, match=r"nullspace_dropout must be a number in \[0, 1\), got nullspace_dropout=1.0"):
        NullSpaceLoraConfig(r=2, target_modules=["q"], nullspace_dropout=1.0)


def test_target_modules_matching_nothing():
    toy = Toy()
    with pytest.raises(ValueError, match="nope"):
        get_peft_model(toy, NullSpaceLoraConfig(r=2, target_modules=["nope"]))
    assert isinstance(toy.q, nn.Linear)


def test_layer_reached_by_no_token_is_an_error_and_nothing_is_written():
    model = get_peft_model(Toy(), NullSpaceLoraConfig(r=2, target_modules=["q", "unused"]))
    before = state_of(model)
    with pytest.raises(ValueError, match=r"reached layer 'unused' with zero tokens"):
        initialize_nullspace_lora(model, [torch.randn(4, 8)], progress=False)
    assert same_state(state_of(model), before)


def test_stats_from_another_model_is_an_error_and_nothing_is_written():
    other = tiny_bert(hidden_size=16, intermediate_size=24)
    stats = ActivationStats.collect(other, token_batches(), ["query", "key", "value"], progress=False)
    model = get_peft_model(tiny_bert(), NullSpaceLoraConfig(r=2, target_modules=["query"]))
    before = state_of(model)
    with pytest.raises(ValueError, match=r"collected on another model .*config differs in 2 key\(s\), e\.g\. hidden_size=16"):
        initialize_nullspace_lora(model, stats=stats, progress=False)
    # the override lets another model's statistics through, not statistics that cannot fit the layer
    with pytest.raises(ValueError, match=r"input dimension 16, but the layer takes 32: they come from"):
        initialize_nullspace_lora(model, stats=stats, progress=False, allow_other_model=True)
    assert same_state(state_of(model), before)
    with pytest.raises(ValueError, match="either dataloader or stats"):
        initialize_nullspace_lora(model, token_batches(), stats=stats, progress=False)


def test_nan_calibration_is_an_error_and_nothing_is_written():
    model = get_peft_model(Toy(), NullSpaceLoraConfig(r=2, target_modules=["q"]))
    before = state_of(model)
    bad = torch.full((3, 8), float("inf"))
    with pytest.raises(ValueError, match="non-finite"):
        initialize_nullspace_lora(model, [torch.randn(3, 8), bad], progress=False)
    assert same_state(state_of(model), before)


def test_verification_flags_a_layer_without_null_space():
    # isotropic inputs: no direction is quieter than another, so the eigenvalue ratio is ~1
    model = get_peft_model(Toy(), NullSpaceLoraConfig(r=4, target_modules=["q"]))
    g = torch.Generator().manual_seed(0)
    data = [torch.randn(400, 8, generator=g) for _ in range(4)]
    with pytest.warns(UserWarning, match="flagged layers"):
        report = initialize_nullspace_lora(model, data, progress=False)
    flags = report.layers[0].flags
    assert any(f.startswith("ratio") for f in flags) and any(f.startswith("eig") for f in flags)


@pytest.mark.parametrize("mode", ["v2", "split"])
def test_gpt2_conv1d_layers(tmp_path, mode):
    """GPT-2 stores weights as (in, out) in Conv1D: split mode and the export must transpose correctly."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2)).eval()
    base.save_pretrained(tmp_path / "base")
    model = get_peft_model(GPT2LMHeadModel.from_pretrained(tmp_path / "base").eval(),
                           NullSpaceLoraConfig(r=4, target_modules=["c_attn", "c_proj"], mode=mode))
    layer = model.base_model.model.transformer.h[0].attn.c_attn
    assert layer.fan_in_fan_out and layer.in_features == 32 and layer.out_features == 96
    batches = [{"input_ids": torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(i))} for i in range(4)]
    report = initialize_nullspace_lora(model, batches, progress=False, warn=False)
    assert max(lr.init_output_ratio for lr in report.layers) < 1e-5
    x = batches[0]
    with torch.no_grad():
        with model.disable_adapter():
            y0 = model(**x).logits
        assert torch.allclose(model(**x).logits, y0, atol=1e-5)
    perturb_trainables(model)
    with torch.no_grad():
        y = model(**x).logits
    assert not torch.allclose(y, y0, atol=1e-3)
    export_to_lora(model, tmp_path / "lora")
    as_lora = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(tmp_path / "base").eval(), tmp_path / "lora")
    with torch.no_grad():
        assert torch.allclose(as_lora(**x).logits, y, atol=1e-5)


def test_bad_targets_are_refused_before_any_change_also_for_add_adapter_and_all_linear():
    class WithEmbedding(Toy):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(5, 8)

    toy = WithEmbedding()
    before = state_of(toy)
    with pytest.raises(TypeError, match=r"cannot adapt emb \(Embedding\)"):
        get_peft_model(toy, NullSpaceLoraConfig(r=2, target_modules=["q", "emb"]))
    assert isinstance(toy.q, nn.Linear) and same_state(state_of(toy), before)
    with pytest.raises(ValueError, match=r"r=9 is larger"):
        get_peft_model(Toy(), NullSpaceLoraConfig(r=9, target_modules="all-linear"))
    model = get_peft_model(Toy(), NullSpaceLoraConfig(r=2, target_modules=["q"]))
    with pytest.raises(ValueError, match=r"r=9 is larger.*k \(in_features=8\)"):
        model.add_adapter("second", NullSpaceLoraConfig(r=9, target_modules=["k"]))
    assert isinstance(model.base_model.model.k, nn.Linear)  # nothing injected


# ------------------------------------------------------------------ the "initialised" flag (no sync in the forward)
def _layers(model):
    from peft_ext.nullspace.layer import NullSpaceLoraLayer

    return {n: m for n, m in model.named_modules() if isinstance(m, NullSpaceLoraLayer)}


def _flags(model, adapter="default"):
    return {n: m.is_initialized(adapter) for n, m in _layers(model).items() if adapter in m.nullspace_A}


def _train_step(model, x):
    """A training-mode forward (where the refusal lives), and a backward when anything is trainable."""
    model.train()
    loss = model(x).pow(2).mean()
    if loss.requires_grad:
        loss.backward()


def test_initialised_flag_set_by_init_per_adapter_and_dropped_by_delete():
    toy, batches, _, _ = _planted_toy()
    model = get_peft_model(toy, NullSpaceLoraConfig(r=3, target_modules=["q", "k"]))
    assert set(_flags(model).values()) == {False}
    initialize_nullspace_lora(model, batches, progress=False)
    assert set(_flags(model).values()) == {True}
    model.add_adapter("second", NullSpaceLoraConfig(r=2, target_modules=["q", "k"], mode="v1"))
    assert set(_flags(model, "second").values()) == {False} and set(_flags(model).values()) == {True}
    model.set_adapter("second")
    with pytest.raises(RuntimeError, match=r"'second' is not initialised: call peft_ext.initialize_nullspace_lora"):
        _train_step(model, batches[0])
    model.set_adapter("default")
    _train_step(model, batches[0])  # the first adapter still trains
    model.delete_adapter("second")
    assert all("second" not in m.nullspace_initialized for m in _layers(model).values())
    # a name created again starts from zero factors, so it is not initialised either
    model.add_adapter("second", NullSpaceLoraConfig(r=2, target_modules=["q"]))
    assert _flags(model, "second") == {"base_model.model.q": False}


@pytest.mark.parametrize("mode", ["v2", "split"])
@pytest.mark.parametrize("how", ["from_pretrained", "trainable", "low_cpu_mem_usage", "load_adapter"])
def test_initialised_flag_restored_on_load(tmp_path, mode, how):
    toy, batches, _, _ = _planted_toy()
    model = get_peft_model(copy.deepcopy(toy), NullSpaceLoraConfig(r=3, target_modules=["q", "k"], mode=mode))
    initialize_nullspace_lora(model, batches, progress=False)
    model.save_pretrained(tmp_path / "ad")
    if how == "load_adapter":  # next to a fresh, never-initialised adapter of the same shape
        loaded = get_peft_model(copy.deepcopy(toy), NullSpaceLoraConfig(r=3, target_modules=["q", "k"], mode=mode))
        loaded.load_adapter(tmp_path / "ad", adapter_name="loaded", is_trainable=True)
        assert set(_flags(loaded, "loaded").values()) == {True} and set(_flags(loaded).values()) == {False}
        loaded.set_adapter("loaded")
    else:
        kwargs = {"trainable": {"is_trainable": True}, "low_cpu_mem_usage": {"low_cpu_mem_usage": True}}.get(how, {})
        loaded = PeftModel.from_pretrained(copy.deepcopy(toy), tmp_path / "ad", **kwargs)
        assert set(_flags(loaded).values()) == {True}
    _train_step(loaded, batches[0])  # trains (or at least runs a training forward) without the refusal


def test_adapter_saved_before_the_flag_existed_loads_as_initialised(tmp_path):
    """The flag adds nothing to the saved file: an adapter saved by the previous version has exactly these keys (a
    new key would break loading them), and loading one restores the flag from its A."""
    from safetensors.torch import load_file

    toy, batches, _, _ = _planted_toy()
    model = get_peft_model(copy.deepcopy(toy), NullSpaceLoraConfig(r=3, target_modules=["q", "k"]))
    initialize_nullspace_lora(model, batches, progress=False)
    model.save_pretrained(tmp_path / "ad")
    saved = load_file(tmp_path / "ad" / "adapter_model.safetensors")
    assert set(saved) == {f"base_model.model.{m}.nullspace_{f}.weight" for m in ("q", "k") for f in ("A", "B")}
    loaded = PeftModel.from_pretrained(copy.deepcopy(toy), tmp_path / "ad", is_trainable=True)
    assert set(_flags(loaded).values()) == {True}


def test_saved_uninitialised_adapter_still_refuses_to_train(tmp_path):
    """save_pretrained now refuses a never-initialised adapter, but files with a zero A exist (saved by earlier
    versions): one loads as uninitialised and still refuses to train."""
    from safetensors.torch import load_file, save_file

    toy, batches, _, _ = _planted_toy()
    model = get_peft_model(copy.deepcopy(toy), NullSpaceLoraConfig(r=2, target_modules=["q"]))
    initialize_nullspace_lora(model, batches, progress=False)
    model.save_pretrained(tmp_path / "ad")
    weights = tmp_path / "ad" / "adapter_model.safetensors"
    save_file({k: torch.zeros_like(v) for k, v in load_file(weights).items()}, weights)
    loaded = PeftModel.from_pretrained(copy.deepcopy(toy), tmp_path / "ad", is_trainable=True)
    assert _flags(loaded) == {"base_model.model.q": False}
    with pytest.raises(RuntimeError, match="is not initialised"):
        _train_step(loaded, torch.randn(2, 8))
    loaded.eval()
    with torch.no_grad():
        loaded(torch.randn(2, 8))  # inference of a zero adapter stays allowed, as before


def test_initialised_flag_follows_a_state_dict_loaded_by_hand():
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    toy, batches, _, _ = _planted_toy()
    cfg = NullSpaceLoraConfig(r=3, target_modules=["q", "k"])
    model = get_peft_model(copy.deepcopy(toy), cfg)
    initialize_nullspace_lora(model, batches, progress=False)
    by_peft = get_peft_model(copy.deepcopy(toy), cfg)
    set_peft_model_state_dict(by_peft, get_peft_model_state_dict(model))
    assert set(_flags(by_peft).values()) == {True}
    by_torch = get_peft_model(copy.deepcopy(toy), cfg)
    by_torch.load_state_dict(model.state_dict())
    assert set(_flags(by_torch).values()) == {True}
    # a state dict with A for one layer only touches that layer; a zero A makes it uninitialised again
    zero_q = {"base_model.model.q.nullspace_A.default.weight": torch.zeros(3, 8)}
    model.load_state_dict(zero_q, strict=False)
    assert _flags(model) == {"base_model.model.q": False, "base_model.model.k": True}


def test_training_forward_reads_no_tensor_value_back_to_python():
    """The check runs in every training forward of every layer: it must not look at the weights (on CUDA each
    bool(tensor) / .item() is a device sync, under torch.compile a graph break)."""
    from torch.overrides import TorchFunctionMode

    class Calls(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            self.names.append(getattr(func, "__name__", str(func)))
            return func(*args, **(kwargs or {}))

    toy, batches, _, _ = _planted_toy()
    for mode in ("v2", "split"):
        model = get_peft_model(copy.deepcopy(toy), NullSpaceLoraConfig(r=3, target_modules=["q", "k"], mode=mode))
        initialize_nullspace_lora(model, batches, progress=False)
        model.train()
        with Calls() as calls:
            model(batches[0]).pow(2).mean().backward()
            assert bool(torch.ones(1) > 0)  # the probe does see a value read
        host_reads = [n for n in calls.names if n in ("__bool__", "item", "tolist", "__float__", "__int__")]
        assert host_reads == ["__bool__"], (mode, host_reads)
        assert "amax" not in calls.names and "abs" not in calls.names


def test_compiled_training_forward_has_no_graph_break():
    toy, batches, _, _ = _planted_toy()
    model = get_peft_model(toy, NullSpaceLoraConfig(r=3, target_modules=["q", "k"]))
    initialize_nullspace_lora(model, batches, progress=False)
    model.train()
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(batches[0])
    assert explained.graph_break_count == 0, [str(b.reason)[:300] for b in explained.break_reasons]
    assert explained.graph_count == 1


# ------------------------------------------------------------------ data safety and bad input (issue 13)
def _trained(mode="v2"):
    """An initialised NullSpaceLoRA model on the planted toy whose B has moved (one SGD step), and its batches."""
    toy, batches, _, _ = _planted_toy()
    model = get_peft_model(toy, NullSpaceLoraConfig(r=3, target_modules=["q", "k"], mode=mode))
    initialize_nullspace_lora(model, batches, progress=False)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    _train_step(model, batches[0])
    opt.step()
    model.eval()
    return model, batches


@pytest.mark.parametrize("mode", ["v2", "split"])
def test_initialising_a_trained_adapter_again_is_refused_unless_reinitialize(mode):
    model, batches = _trained(mode)
    layer = model.base_model.model.q
    moved = layer.nullspace_B["default"].weight - (layer.nullspace_B0["default"] if mode == "split" else 0)
    assert float(moved.detach().norm()) > 0
    before = state_of(model)
    update = r"\|\|B - B0\|\|" if mode == "split" else r"\|\|B\|\|"
    with pytest.raises(ValueError, match=rf"adapter 'default' is already initialised \(2 of 2 layers.*resets B, so its "
                                         rf"trained update \({update} = [0-9.e-]+ over 2 layer\(s\)\) would be lost\. "
                                         r"Pass reinitialize=True"):
        initialize_nullspace_lora(model, batches, progress=False)
    assert same_state(state_of(model), before)
    initialize_nullspace_lora(model, batches, progress=False, reinitialize=True)
    moved = layer.nullspace_B["default"].weight - (layer.nullspace_B0["default"] if mode == "split" else 0)
    assert float(moved.detach().norm()) == 0


def test_initialising_an_untrained_initialised_adapter_names_what_is_replaced():
    toy, batches, _, _ = _planted_toy()
    model = get_peft_model(toy, NullSpaceLoraConfig(r=3, target_modules=["q"]))
    initialize_nullspace_lora(model, batches, progress=False)
    with pytest.raises(ValueError, match=r"its current basis in A would be replaced \(B is still at its initial value\)"):
        initialize_nullspace_lora(model, batches, progress=False)


def test_negative_token_count_is_refused_before_anything_is_written(tmp_path):
    toy, batches, _, _ = _planted_toy()
    model = get_peft_model(toy, NullSpaceLoraConfig(r=3, target_modules=["q", "k"]))
    stats = ActivationStats.collect(model, batches, progress=False)
    before = state_of(model)
    stats.tokens["q"] = -400  # edited after collection: init re-validates
    with pytest.raises(ValueError, match=r"the token count of layer 'q' is -400; a count is an integer >= 0"):
        initialize_nullspace_lora(model, stats=stats, progress=False)
    assert same_state(state_of(model), before) and set(_flags(model).values()) == {False}
    with pytest.raises(ValueError, match=r"token count of layer 'q' is -400"):
        ActivationStats(stats.sums, stats.tokens, stats.aliases)


def test_all_zero_inputs_are_refused_before_anything_is_written():
    model = get_peft_model(Toy(), NullSpaceLoraConfig(r=2, target_modules=["q"]))
    before = state_of(model)
    with pytest.raises(ValueError, match=r"inputs of layer 'q' are all zero over 8 tokens.*exclude the layer"):
        initialize_nullspace_lora(model, [torch.zeros(4, 8), torch.zeros(4, 8)], progress=False)
    assert same_state(state_of(model), before)


@pytest.mark.parametrize("mode", ["v2", "split"])
def test_a_failure_after_writing_puts_every_layer_back(monkeypatch, mode):
    """The safety net behind validate-then-write: whatever fails after the first layer is written (a bug, Ctrl-C)
    restores what the layers held, weights, split buffers and flags."""
    from peft_ext.nullspace import initialize as init_module

    model, batches = _trained(mode)
    before, flags = state_of(model), _flags(model)

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(init_module, "_verify", boom)
    with pytest.raises(KeyboardInterrupt):
        initialize_nullspace_lora(model, batches, progress=False, reinitialize=True)
    assert same_state(state_of(model), before) and _flags(model) == flags


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), 0, -1.0, True, "8"])
def test_nullspace_alpha_must_be_a_finite_positive_number(value):
    with pytest.raises(ValueError, match=r"nullspace_alpha must be a finite number > 0 .*got nullspace_alpha="):
        NullSpaceLoraConfig(r=2, target_modules=["q"], nullspace_alpha=value)


@pytest.mark.parametrize("value", ["NaN", "Infinity"])
def test_non_finite_alpha_in_adapter_config_json_is_refused_on_load(tmp_path, value):
    toy, batches, _, _ = _planted_toy()
    model = get_peft_model(copy.deepcopy(toy), NullSpaceLoraConfig(r=3, target_modules=["q"]))
    initialize_nullspace_lora(model, batches, progress=False)
    model.save_pretrained(tmp_path / "ad")
    path = tmp_path / "ad" / "adapter_config.json"
    text = path.read_text()
    assert '"nullspace_alpha": 3.0' in text
    path.write_text(text.replace('"nullspace_alpha": 3.0', f'"nullspace_alpha": {value}'))
    with pytest.raises(ValueError, match=r"nullspace_alpha must be a finite number > 0 .*got nullspace_alpha=(nan|inf)"):
        PeftModel.from_pretrained(copy.deepcopy(toy), tmp_path / "ad")


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("nullspace_dropout", "0.1", r"nullspace_dropout must be a number in \[0, 1\), got nullspace_dropout='0.1' \(str\); e\.g\. 0\.1"),
        ("nullspace_dropout", None, r"nullspace_dropout must be a number in \[0, 1\), got nullspace_dropout=None"),
        ("nullspace_dropout", float("nan"), r"nullspace_dropout must be a number in \[0, 1\), got nullspace_dropout=nan"),
        ("r", "4", r"r must be a positive integer, got r='4' \(str\)"),
        ("r", 4.0, r"r must be a positive integer, got r=4\.0"),
        ("mode", None, r"mode must be one of .*got mode=None"),
        ("fan_in_fan_out", "false", r"fan_in_fan_out must be True or False, got fan_in_fan_out='false' \(str\)"),
        ("bias", None, r"bias must be 'none', 'all' or 'nullspace_only', got bias=None"),
        ("target_modules", 5, r"target_modules must be a list of module names or one regex string, got target_modules=5"),
        ("target_modules", ["q", 1], r"target_modules must be a list .*got target_modules=\['q', 1\] \(list\)"),
        ("exclude_modules", {"q": 1}, r"exclude_modules must be a list .*got exclude_modules=\{'q': 1\} \(dict\)"),
        ("modules_to_save", "classifier", r"modules_to_save must be a list of module names, got "
                                          r"modules_to_save='classifier' \(str\); e\.g\. \['classifier'\] \(a string"),
        ("layers_to_transform", "0", r"layers_to_transform must be a layer index >= 0 or a list of them, got "
                                     r"layers_to_transform='0' \(str\)"),
        ("layers_to_transform", [0, -1], r"layers_to_transform must be .*got layers_to_transform=\[0, -1\]"),
        ("layers_pattern", 3, r"layers_pattern must be the name of the layer list .*got layers_pattern=3"),
        ("inference_mode", "yes", r"inference_mode must be True or False, got inference_mode='yes' \(str\)"),
        ("base_model_name_or_path", 7, r"base_model_name_or_path must be a string or None, got base_model_name_or_path=7"),
        ("revision", ["main"], r"revision must be a string or None, got revision=\['main'\] \(list\)"),
    ],
)
def test_every_config_field_is_type_checked_by_name(field, value, message):
    kwargs = dict(r=2, target_modules=["q"], layers_to_transform=[0], layers_pattern="layers")
    kwargs[field] = value
    with pytest.raises(ValueError, match=r"NullSpaceLoraConfig\." + message):
        NullSpaceLoraConfig(**kwargs)


def test_report_flags_non_finite_numbers():
    from peft_ext.nullspace.initialize import LayerReport

    nan = float("nan")
    rep = LayerReport(layer="q", in_features=8, r=2, tokens=400, lambda_min=nan, lambda_max=nan, eig_ratio=nan,
                      tail_energy=nan, heldout_ratio=nan, init_output_ratio=nan)
    rep.check()
    kinds = [f.split(":")[0] for f in rep.flags]
    assert kinds == ["nonfinite", "ratio", "init", "eig"], rep.flags
    assert "heldout_ratio=nan" in rep.flags[0]
    ok = LayerReport(layer="q", in_features=8, r=2, tokens=400, lambda_min=0.0, lambda_max=1.0, eig_ratio=0.0,
                     tail_energy=0.0, heldout_ratio=0.01, init_output_ratio=0.0)
    ok.check()
    assert ok.flags == []


def test_nan_statistics_are_refused_before_decomposing():
    toy, batches, _, _ = _planted_toy()
    model = get_peft_model(toy, NullSpaceLoraConfig(r=3, target_modules=["q"]))
    stats = ActivationStats.collect(model, batches, progress=False)
    before = state_of(model)
    stats.sums["q"][2, 5] = float("nan")  # edited after collection
    with pytest.raises(ValueError, match=r"the sum for layer 'q' holds 1 non-finite \(NaN/Inf\) value\(s\) of 64"):
        initialize_nullspace_lora(model, stats=stats, progress=False)
    assert same_state(state_of(model), before)


def test_fewer_tokens_than_input_dimensions_is_flagged_per_layer():
    model = get_peft_model(Toy(), NullSpaceLoraConfig(r=2, target_modules=["q", "out"]))
    g = torch.Generator().manual_seed(0)
    with pytest.warns(UserWarning, match=r"q: tokens: 1 calibration tokens < 8 input dimensions") as caught:
        report = initialize_nullspace_lora(model, [torch.randn(1, 8, generator=g)], progress=False)
    assert caught[0].filename == __file__  # the warning points at the caller, not at torch.no_grad's wrapper
    by_layer = {lr.layer: lr for lr in report.layers}
    assert any(f.startswith("tokens: 1 calibration tokens < 8") for f in by_layer["q"].flags)
    assert any(f.startswith("tokens: 1 calibration tokens < 12") for f in by_layer["out"].flags)
    assert '"tokens: 1 calibration tokens' in report.to_json() and "2 flagged" in str(report)
    enough = get_peft_model(Toy(), NullSpaceLoraConfig(r=2, target_modules=["q"]))
    report = initialize_nullspace_lora(enough, [torch.randn(8, 8, generator=g)], progress=False, warn=False)
    assert not any(f.startswith("tokens") for f in report.layers[0].flags)


def test_saving_or_exporting_a_never_initialised_adapter_is_refused(tmp_path):
    toy, batches, _, _ = _planted_toy()
    model = get_peft_model(toy, NullSpaceLoraConfig(r=3, target_modules=["q"]))
    call = r"Call peft_ext\.initialize_nullspace_lora\(model, calib_dataloader, adapter_name='default'\)"
    with pytest.raises(ValueError, match=r"adapter 'default' was never initialised \(1 layer\(s\), e\.g\. 'q'\).*" + call):
        export_to_lora(model, tmp_path / "lora")
    assert not (tmp_path / "lora").exists()
    with pytest.raises(ValueError, match=r"NullSpaceLoRA adapter 'default' was never initialised .*would change "
                                         r"nothing\. " + call):
        model.save_pretrained(tmp_path / "ad")
    assert not (tmp_path / "ad" / "adapter_model.safetensors").exists()  # (PEFT writes its README.md before)
    with pytest.raises(ValueError, match=r"adapter 'default' was never initialised"):
        save_adapter_atomic(model, tmp_path / "atomic")
    assert not [p for p in os.listdir(tmp_path) if "atomic" in p]  # the complete-or-absent save leaves nothing
    # an initialised adapter saves, and an uninitialised one beside it can be left out by name
    initialize_nullspace_lora(model, batches, progress=False)
    model.add_adapter("second", NullSpaceLoraConfig(r=2, target_modules=["q"]))
    with pytest.raises(ValueError, match=r"adapter 'second' was never initialised.*selected_adapters"):
        model.save_pretrained(tmp_path / "both")
    model.save_pretrained(tmp_path / "first", selected_adapters=["default"])
    assert (tmp_path / "first" / "adapter_model.safetensors").exists()


def _seeded_head_classifier(seed):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1,
                                                     num_attention_heads=2, intermediate_size=48,
                                                     max_position_embeddings=64, num_labels=2))
    torch.manual_seed(seed)
    model.classifier.reset_parameters()  # the head differs by seed, the encoder does not
    return model.eval()


def test_statistics_of_another_model_with_the_same_shapes_are_refused_unless_allowed():
    stats = ActivationStats.collect(tiny_bert(seed=1), token_batches(), ["query"], progress=False)
    model = get_peft_model(tiny_bert(seed=0), NullSpaceLoraConfig(r=2, target_modules=["query"]))
    before = state_of(model)
    with pytest.raises(ValueError, match=r"collected on another model .*: \d+ of \d+ weight tensors differ, e\.g\. "
                                         r"\['embeddings\..*pass allow_other_model=True"):
        initialize_nullspace_lora(model, stats=stats, progress=False, warn=False)
    assert same_state(state_of(model), before)
    report = initialize_nullspace_lora(model, stats=stats, progress=False, warn=False, allow_other_model=True)
    assert report.model_check.startswith("other model, allowed by allow_other_model=True")
    assert "allow_other_model" in str(report)


def test_statistics_of_this_model_pass_the_check_also_through_a_file_and_a_seeded_head(tmp_path):
    base = _seeded_head_classifier(seed=0)
    path = tmp_path / "stats.safetensors"
    ActivationStats.collect(base, token_batches(), ["query", "key"], progress=False).save(path)
    stats = ActivationStats.load(path)
    cfg = dict(r=2, target_modules=["query", "key"], task_type="SEQ_CLS")
    same = get_peft_model(copy.deepcopy(base), NullSpaceLoraConfig(**cfg, modules_to_save=["classifier"]))
    assert initialize_nullspace_lora(same, stats=stats, progress=False, warn=False).model_check == "same config and weights"
    # another seed's head is the adapter's own (modules_to_save), and no adapted layer reads it
    other_head = get_peft_model(_seeded_head_classifier(seed=1), NullSpaceLoraConfig(**cfg, modules_to_save=["classifier"]))
    report = initialize_nullspace_lora(other_head, stats=stats, progress=False, warn=False)
    assert report.model_check == ("same config and weights except ['classifier.bias', 'classifier.weight'] in "
                                  "modules_to_save (the adapter's own)")
    # ...but not when the head is part of the base model (no task_type: PEFT adds the head for SEQ_CLS)
    frozen_head = get_peft_model(_seeded_head_classifier(seed=1), NullSpaceLoraConfig(r=2, target_modules=["query"]))
    with pytest.raises(ValueError, match=r"2 of 27 weight tensors differ, e\.g\. \['classifier\.bias', 'classifier\.weight'\]"):
        initialize_nullspace_lora(frozen_head, stats=stats, progress=False, warn=False)


def test_hand_made_statistics_say_they_were_not_checked():
    from peft_ext import StatsRecorder

    toy, batches, _, _ = _planted_toy()
    model = get_peft_model(toy, NullSpaceLoraConfig(r=3, target_modules=["q"]))
    model.eval()  # a training forward of an uninitialised adapter is refused
    with StatsRecorder(model, ["q"]) as rec:
        for b in batches:
            with rec.batch():
                model(b)
    report = initialize_nullspace_lora(model, stats=rec.result(), progress=False)
    assert "record no model fingerprint" in report.model_check and "not checked" in report.model_check


# ------------------------------------------------------------------ a saved adapter that does not fit: one line, nothing loaded
def _saved(tmp_path, mode="v2"):
    toy, batches, _, _ = _planted_toy()
    model = get_peft_model(copy.deepcopy(toy), NullSpaceLoraConfig(r=3, target_modules=["q", "k"], mode=mode))
    initialize_nullspace_lora(model, batches, progress=False)
    model.save_pretrained(tmp_path / "ad")
    return toy, tmp_path / "ad"


def _edit_weights(folder, edit):
    from safetensors.torch import load_file, save_file

    path = folder / "adapter_model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda t: t.pop("base_model.model.k.nullspace_B.weight"),
         r"has no tensor 'base_model\.model\.k\.nullspace_B\.weight', which adapter_config\.json's target_modules/r/mode "
         r"call for"),
        (lambda t: t.update({"base_model.model.q.nullspace_A.weight": torch.ones(3, 8, dtype=torch.int64)}),
         r"'base_model\.model\.q\.nullspace_A\.weight' has dtype torch\.int64, but NullSpaceLoRA factors are floating point"),
        (lambda t: t.update({"base_model.model.q.nullspace_A.weight": torch.ones(4, 8)}),
         r"'base_model\.model\.q\.nullspace_A\.weight' has shape \(4, 8\), but adapter_config\.json on this base model "
         r"makes it \(3, 8\)"),
        (lambda t: t["base_model.model.k.nullspace_B.weight"].__setitem__((0, 0), float("nan")),
         r"'base_model\.model\.k\.nullspace_B\.weight' holds 1 NaN/Inf value\(s\)"),
        (lambda t: t.update({"base_model.model.out.nullspace_A.weight": torch.ones(3, 12)}),
         r"holds 'base_model\.model\.out\.nullspace_A\.weight', which no NullSpaceLoRA layer of this model takes"),
    ],
    ids=["missing", "dtype", "shape", "nan", "unexpected"],
)
def test_a_saved_adapter_that_does_not_fit_is_refused_by_name_before_loading(tmp_path, edit, message):
    toy, folder = _saved(tmp_path)
    _edit_weights(folder, edit)
    with pytest.raises(ValueError, match=r"the saved NullSpaceLoRA adapter 'default' \(adapter_model\.safetensors\).*"
                                         + message):
        PeftModel.from_pretrained(copy.deepcopy(toy), folder)
    # load_adapter next to a trained adapter: that one keeps its weights
    model, _ = _trained()
    before = {k: v for k, v in state_of(model).items() if ".default." in k}
    with pytest.raises(ValueError, match=message):
        model.load_adapter(folder, adapter_name="other")
    assert same_state({k: v for k, v in state_of(model).items() if ".default." in k}, before)
    assert all(not m.is_initialized("other") for m in _layers(model).values() if "other" in m.nullspace_A)


def test_split_adapter_buffers_are_checked_too(tmp_path):
    toy, folder = _saved(tmp_path, mode="split")
    _edit_weights(folder, lambda t: t.pop("base_model.model.q.nullspace_B0"))
    with pytest.raises(ValueError, match=r"has no tensor 'base_model\.model\.q\.nullspace_B0'"):
        PeftModel.from_pretrained(copy.deepcopy(toy), folder)
