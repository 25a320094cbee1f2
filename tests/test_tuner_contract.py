"""PEFT's tuner contract, one matrix for every peft-ext tuner: each tuner x {MLP, GPT-2 (Conv1D), Llama} x each check.

Written in the spirit of PEFT's tests/test_custom_models.py + tests/testing_common.py (one list of cases, one function
per check), not copied from it. The tuners differ only in what their `Tuner` entry says: how a config is made, how
an adapter is initialised once `get_peft_model` has made it, which tensors train, and what the adapter promises at
init. What a tuner legitimately does not support is listed in `NOT_SUPPORTED` with the reason and runs as a strict
xfail that expects the tuner's refusal, so a silent pass cannot hide there either. Method-specific behaviour (null
spaces, singular subspaces, sparse streams, error messages) stays in tests/test_nullspace.py, test_subspace.py and
test_ortho*.py.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import pytest
import torch
from peft import PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from peft_ext import NullSpaceLoraConfig, OrthoSplitConfig, SubspaceLoraConfig, initialize_nullspace_lora
from peft_ext.ortho.quant import quantize

from ._tiny_models import TINY_MODELS, TinyModel, output
from .conftest import perturb_trainables, same_state, state_of


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny matmuls on one thread: with two, each op waits for a second thread (measured ~20 ms per nn.Linear call on
    a loaded 2-core machine, 10 us on one thread), which made this matrix 5x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------ the tuners
def _no_init(model: PeftModel, tiny: TinyModel, adapter_name: str) -> None:
    """SubspaceLoRA's SVDs and OrthoSplit's data-free splits run inside get_peft_model / add_adapter."""


def _init_nullspace(model: PeftModel, tiny: TinyModel, adapter_name: str) -> None:
    dtype = next(model.get_base_model().parameters()).dtype
    batches = [_cast(tiny.batch(100 + i), dtype) for i in range(4)]
    initialize_nullspace_lora(model, batches, adapter_name=adapter_name, progress=False, warn=False)


def _ortho_mask_gives_w_back(layer, name: str) -> None:
    """OrthoSplit's promise at init with a quantised base stream: B + O equals W on the mask (up to the float16
    rounding of the saved values), B = Q(W) off it."""
    index = layer.ortho_index[name].long()
    w = layer.original_weight().reshape(-1)
    eff = layer.effective_weight(name).reshape(-1)
    residual = (w - layer._streams(name)["base"].reshape(-1))[index]
    assert float(residual.abs().max()) > 0  # the quantisation residual the ortho stream holds is real
    assert torch.allclose(eff[index], w[index], rtol=0, atol=float(residual.abs().max()) * 2**-10)
    off = torch.ones_like(w, dtype=torch.bool).index_fill(0, index, False)
    q = quantize(layer.original_weight().float(), layer.base_kind[name]).reshape(-1).to(eff.dtype)
    assert torch.equal(eff[off], q[off])


@dataclass(frozen=True)
class Tuner:
    id: str
    config: Callable[..., object]  # config(target_modules, **overrides) -> PeftConfig
    initialize: Callable[[PeftModel, TinyModel, str], None]
    trainable: tuple[str, ...]  # the adapter containers whose tensors train when the adapter is active
    identity_at_init: bool  # the adapted model computes the base model's function right after initialisation
    init_atol: float = 0.0  # how exactly (0: bit for bit)
    init_promise: Callable[[object, str], None] | None = None  # per layer, where identity is not promised
    other: tuple[tuple[str, object], ...] = ()  # config overrides that make a second adapter differ from the first

    def __repr__(self) -> str:
        return self.id


def _config(cls, **defaults) -> Callable[..., object]:
    return lambda targets, **kw: cls(target_modules=list(targets), **{**defaults, **kw})


TUNERS = (
    Tuner("nullspace-v2", _config(NullSpaceLoraConfig, r=2, mode="v2"), _init_nullspace, ("nullspace_B",), True),
    Tuner("nullspace-v1", _config(NullSpaceLoraConfig, r=2, mode="v1"), _init_nullspace,
          ("nullspace_A", "nullspace_B"), True),
    # split: B A - B0 A0 with B = B0, A = A0 is zero up to the rounding of two matmuls
    Tuner("nullspace-split", _config(NullSpaceLoraConfig, r=2, mode="split"), _init_nullspace,
          ("nullspace_A", "nullspace_B"), True, init_atol=1e-5),
    Tuner("subspace-full", _config(SubspaceLoraConfig, k=2), _no_init, ("subspace_C",), True),
    Tuner("subspace-diag-residual", _config(SubspaceLoraConfig, k=2, core="diag", train_residual=True), _no_init,
          ("subspace_C", "subspace_R_delta"), True),
    # a quantised base stream: the model is not the base model at init (that is the point), see _ortho_mask_gives_w_back
    Tuner("ortho-int4", _config(OrthoSplitConfig, base_kind="int4", density=0.2), _no_init, (), False,
          init_promise=_ortho_mask_gives_w_back, other=(("density", 0.35),)),
    # full-precision base stream: B = W off the mask and B + O = W on it, so the function is W's (up to summation order)
    Tuner("ortho-train", _config(OrthoSplitConfig, base_kind="none", density=0.2, train_ortho=True), _no_init,
          ("ortho_values",), True, init_atol=1e-6),
)

OVERLAP_REASON = ("each OrthoSplit adapter replaces its layers' whole weight (B + alpha O), so two adapters on one "
                  "layer cannot be active or merged together; the tuner refuses with a ValueError naming them")
# (tuner id prefix, check) -> (exception the tuner raises instead, why the check does not apply)
NOT_SUPPORTED: dict[tuple[str, str], tuple[type[Exception], str]] = {
    ("ortho-", "two_adapters-overlapping"): (ValueError, OVERLAP_REASON),
}


def cases(check: str, variants: tuple[str, ...] = ("",)) -> list:
    """pytest params (tuner, tiny model[, variant]) for one check, NOT_SUPPORTED pairs as strict xfails."""
    out = []
    for tuner in TUNERS:
        for tiny in TINY_MODELS:
            for variant in variants:
                key = f"{check}-{variant}" if variant else check
                marks = [pytest.mark.xfail(strict=True, raises=exc, reason=why)
                         for (prefix, c), (exc, why) in NOT_SUPPORTED.items()
                         if tuner.id.startswith(prefix) and c == key]
                values = (tuner, tiny, variant) if variant else (tuner, tiny)
                out.append(pytest.param(*values, marks=marks, id="-".join(map(str, values))))
    return out


# ------------------------------------------------------------------ helpers
def _make(tuner: Tuner, tiny: TinyModel, targets=None, adapter_name: str = "default", dtype=torch.float32) -> PeftModel:
    """get_peft_model on a fresh base, then the tuner's initialisation: an adapter as a user starts training it."""
    model = get_peft_model(tiny.build().to(dtype), tuner.config(targets or tiny.targets), adapter_name=adapter_name)
    tuner.initialize(model, tiny, adapter_name)
    return model


def _add(model: PeftModel, tuner: Tuner, tiny: TinyModel, name: str, targets=None) -> None:
    """A second adapter, initialised; nothing trains in ortho-int4, so its config differs (`Tuner.other`)."""
    model.add_adapter(name, tuner.config(targets or tiny.targets, **dict(tuner.other)))
    tuner.initialize(model, tiny, name)


def _nontrivial(model: PeftModel, name: str = "default", seed: int = 0) -> None:
    """Move the adapter `name` away from its initial value (seeded), so round trips compare adapters that act."""
    model.base_model.set_adapter(name)
    perturb_trainables(model, seed=seed)


def _cast(batch: dict, dtype: torch.dtype) -> dict:
    """The batch with its floating-point inputs in `dtype` (token ids stay integers)."""
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in batch.items()}


def _layers(model: nn.Module) -> dict[str, BaseTunerLayer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)}


def _base_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: m.get_base_layer().weight.detach().clone() for n, m in _layers(model).items()}


def _trainable(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def _expected_trainable(model: nn.Module, tuner: Tuner, adapters: tuple[str, ...] = ("default",)) -> set[str]:
    """Parameter names of the adapters' tensors the tuner trains (nothing of the base model)."""
    wanted = {f".{attr}.{a}" for attr in tuner.trainable for a in adapters}
    return {n for n, _ in model.named_parameters() if any(w + "." in n + "." for w in wanted)}


def _first_adapter_tensor(layer: BaseTunerLayer, name: str) -> torch.Tensor:
    """The first tensor of the layer's first adapter container for `name` (a weight, a core or the sparse values)."""
    item = getattr(layer, layer.adapter_layer_names[0])[name]
    return item.weight if isinstance(item, nn.Module) else item


def _holders_of(model: nn.Module, name: str) -> list[str]:
    """Every per-adapter mapping on a tuner layer (module dicts, buffer dicts, plain dicts) still keyed by `name`."""
    found = []
    for key, layer in _layers(model).items():
        for attr, value in vars(layer).items():
            if isinstance(value, Mapping) and name in value:
                found.append(f"{key}.{attr}")
        for attr, value in layer._modules.items():  # ModuleDict, ParameterDict, PEFT's BufferDict
            if hasattr(value, "keys") and name in value.keys():
                found.append(f"{key}.{attr}")
    return found


def _close(a: torch.Tensor, b: torch.Tensor, atol: float) -> bool:
    return torch.equal(a, b) if atol == 0 else torch.allclose(a, b, rtol=0, atol=atol)


def _differ(a: torch.Tensor, b: torch.Tensor) -> bool:
    return float((a.detach().float() - b.detach().float()).abs().max()) > 1e-4


# ------------------------------------------------------------------ forward at init
@pytest.mark.parametrize("tuner, tiny", cases("forward_at_init"))
def test_forward_at_init(tuner, tiny):
    model = _make(tuner, tiny).eval()
    batch = tiny.batch(0)
    with torch.no_grad():
        y, y_base = output(model, batch), output(tiny.build(), batch)
        with model.disable_adapter():
            assert torch.equal(output(model, batch), y_base)
    if tuner.identity_at_init:
        assert _close(y, y_base, tuner.init_atol), float((y - y_base).abs().max())
    else:
        assert _differ(y, y_base)  # the promise below is not identity: make sure the check can tell
        for layer in _layers(model).values():
            tuner.init_promise(layer, "default")


# ------------------------------------------------------------------ save / load
@pytest.mark.parametrize("tuner, tiny", cases("save_load"))
def test_save_and_load_four_ways(tmp_path, tuner, tiny):
    """One save, loaded by PeftModel.from_pretrained with is_trainable False/True x low_cpu_mem_usage False/True."""
    model = _make(tuner, tiny)
    _nontrivial(model)
    expected = _expected_trainable(model, tuner)
    assert _trainable(model) == expected and bool(expected) == bool(tuner.trainable)
    model.eval()
    batch = tiny.batch(1)
    with torch.no_grad():
        y = output(model, batch)
    assert _differ(y, output(tiny.build(), batch))
    model.save_pretrained(tmp_path)
    saved = get_peft_model_state_dict(model)
    for is_trainable in (False, True):
        for low_cpu_mem_usage in (False, True):
            how = f"is_trainable={is_trainable}, low_cpu_mem_usage={low_cpu_mem_usage}"
            loaded = PeftModel.from_pretrained(tiny.build(), tmp_path, is_trainable=is_trainable,
                                               low_cpu_mem_usage=low_cpu_mem_usage)
            assert same_state(get_peft_model_state_dict(loaded), saved), how  # every saved tensor back to the bit
            assert not any(p.device.type == "meta" for p in loaded.parameters()), how
            assert set(_layers(loaded)) == set(_layers(model)), how
            assert _trainable(loaded) == (expected if is_trainable else set()), how
            loaded.train()  # (NullSpaceLoRA refuses a training forward of an adapter it does not know initialised)
            # (to rounding: OrthoSplit computes trainable values by gather/index_add, frozen ones by a CSR matmul)
            assert torch.allclose(output(loaded, batch), y, rtol=0, atol=1e-6), how
            if expected and is_trainable:  # the trainable tensors are the ones that get gradients
                output(loaded, batch).float().pow(2).mean().backward()
                got = {n for n, p in loaded.named_parameters() if p.grad is not None and bool(p.grad.abs().sum() > 0)}
                assert got == expected, how


# ------------------------------------------------------------------ merge / unmerge / safe_merge / unload
@pytest.mark.parametrize("tuner, tiny, how", cases("merge", ("merge", "safe_merge")))
def test_merge_unmerge(tuner, tiny, how):
    model = _make(tuner, tiny)
    _nontrivial(model)
    model.eval()
    batch = tiny.batch(3)
    original = _base_weights(model)
    with torch.no_grad():
        y = output(model, batch)
        model.merge_adapter(safe_merge=how == "safe_merge")
        assert all(m.merged for m in _layers(model).values())
        merged = _base_weights(model)
        assert all(not torch.equal(merged[k], original[k]) for k in original)  # every layer's weight took its update
        assert torch.allclose(output(model, batch), y, rtol=0, atol=1e-5)
        with pytest.warns(UserWarning, match="already merged"):
            model.merge_adapter()  # merging again is a no-op
        assert same_state(_base_weights(model), merged)
        model.unmerge_adapter()
        assert not any(m.merged for m in _layers(model).values())
        for k, w in _base_weights(model).items():
            assert torch.allclose(w, original[k], rtol=0, atol=1e-6), k
        assert torch.allclose(output(model, batch), y, rtol=0, atol=1e-6)
        model.merge_adapter(safe_merge=how != "safe_merge")  # the other way merges the same weights
        assert same_state(_base_weights(model), merged)


@pytest.mark.parametrize("tuner, tiny", cases("safe_merge_refusal"))
def test_safe_merge_refuses_a_non_finite_adapter_before_merging_anything(tuner, tiny):
    model = _make(tuner, tiny)
    _nontrivial(model)
    original = _base_weights(model)
    key, last = list(_layers(model).items())[-1]  # the last layer PEFT merges: every other one would merge first
    with torch.no_grad():
        _first_adapter_tensor(last, "default").view(-1)[0] = float("nan")
    refusal = (rf"safe_merge: NaNs/Infs in the merged weight of .*'{key.removeprefix('base_model.model.')}' "
               r"\(adapter.*[Nn]othing was merged")
    with pytest.raises(ValueError, match=refusal):
        model.merge_adapter(safe_merge=True)
    assert same_state(_base_weights(model), original)
    assert not any(m.merged for m in _layers(model).values())
    with pytest.raises(ValueError, match=refusal):
        model.merge_and_unload(safe_merge=True)
    assert set(_layers(model)) == set(original)  # nothing unloaded
    assert same_state(_base_weights(model), original)


@pytest.mark.parametrize("tuner, tiny", cases("unload"))
def test_unload_gives_the_base_model_back(tuner, tiny):
    model = _make(tuner, tiny)
    _nontrivial(model)
    base = tiny.build()
    batch = tiny.batch(4)
    plain = model.unload()
    assert not _layers(plain)
    assert {n: type(m) for n, m in plain.named_modules()} == {n: type(m) for n, m in base.named_modules()}
    assert same_state(state_of(plain), state_of(base))
    assert not hasattr(plain, "peft_config")
    with torch.no_grad():
        assert torch.equal(output(plain, batch), output(base, batch))


@pytest.mark.parametrize("tuner, tiny", cases("merge_and_unload"))
def test_merge_and_unload_equals_the_merged_adapter_model(tuner, tiny):
    model = _make(tuner, tiny)
    _nontrivial(model)
    model.eval()
    base = tiny.build()
    batch = tiny.batch(5)
    with torch.no_grad():
        y = output(model, batch)
        model.merge_adapter()
        y_merged, merged = output(model, batch), _base_weights(model)
        model.unmerge_adapter()
        plain = model.merge_and_unload()
        assert not _layers(plain)
        assert {n: type(m) for n, m in plain.named_modules()} == {n: type(m) for n, m in base.named_modules()}
        weights = {n: m.weight for n, m in plain.named_modules() if f"base_model.model.{n}" in merged}
        assert len(weights) == len(merged)
        assert all(torch.equal(w, merged[f"base_model.model.{n}"]) for n, w in weights.items())
        assert torch.equal(output(plain, batch), y_merged)
        assert torch.allclose(output(plain, batch), y, rtol=0, atol=1e-5)
        assert _differ(y, output(base, batch))


# ------------------------------------------------------------------ disable_adapter
@pytest.mark.parametrize("tuner, tiny", cases("disable_adapter"))
def test_disable_adapter_gives_base_outputs(tuner, tiny):
    model = _make(tuner, tiny)
    _nontrivial(model)
    model.eval()
    batch = tiny.batch(6)
    with torch.no_grad():
        y, y_base = output(model, batch), output(tiny.build(), batch)
        assert _differ(y, y_base)
        with model.disable_adapter():
            assert torch.equal(output(model, batch), y_base)
        assert torch.equal(output(model, batch), y)
        model.merge_adapter()
        with model.disable_adapter():  # a merged adapter is unmerged first
            assert torch.allclose(output(model, batch), y_base, rtol=0, atol=1e-6)
        assert torch.allclose(output(model, batch), y, rtol=0, atol=1e-6)


# ------------------------------------------------------------------ add / set / delete adapter
@pytest.mark.parametrize("tuner, tiny", cases("add_set_delete"))
def test_add_set_delete_adapter(tuner, tiny):
    model = _make(tuner, tiny)
    _nontrivial(model, "default", seed=1)
    model.eval()
    batch = tiny.batch(7)
    with torch.no_grad():
        y_default, y_base = output(model, batch), output(tiny.build(), batch)
    keys_before = set(model.state_dict())
    _add(model, tuner, tiny, "other")
    assert model.active_adapters == ["default"]
    assert _trainable(model) == _expected_trainable(model, tuner, ("default",))
    _nontrivial(model, "other", seed=2)
    holders = set(_holders_of(model, "other"))  # the check below can see what delete_adapter has to drop
    assert {f"{k}.{attr}" for k, m in _layers(model).items() for attr in m.adapter_layer_names + m.other_param_names
            if "other" in getattr(m, attr).keys()} <= holders
    assert _trainable(model) == _expected_trainable(model, tuner, ("other",))
    with torch.no_grad():
        y_other = output(model, batch)
        assert _differ(y_other, y_default)
        model.set_adapter("default")
        assert torch.equal(output(model, batch), y_default)

        model.set_adapter("other")
        model.merge_adapter()
        with pytest.raises(ValueError, match="while they are merged"):
            model.delete_adapter("other")
        model.unmerge_adapter()
        with pytest.raises(ValueError, match="nope"):
            model.delete_adapter("nope")
        with pytest.warns(UserWarning, match="Setting active adapter to default"):
            model.delete_adapter("other")  # the active one: 'default' becomes active
        assert model.active_adapters == ["default"] and list(model.peft_config) == ["default"]
        assert not _holders_of(model, "other")
        assert set(model.state_dict()) == keys_before
        assert _trainable(model) == _expected_trainable(model, tuner, ("default",))
        assert torch.allclose(output(model, batch), y_default, rtol=0, atol=1e-6)  # (merge + unmerge rounded W)

        _add(model, tuner, tiny, "other")  # the name can be used again, from a fresh adapter
        model.set_adapter("other")
        y_fresh = output(model, batch)
        if tuner.identity_at_init:
            assert _close(y_fresh, y_base, max(tuner.init_atol, 1e-6))  # (W rounded by the merge + unmerge above)
        model.delete_adapter("default")
        assert not _holders_of(model, "default") and list(model.peft_config) == ["other"]
        assert torch.equal(output(model, batch), y_fresh)


# ------------------------------------------------------------------ two adapters
@pytest.mark.parametrize("tuner, tiny, layout", cases("two_adapters", ("disjoint", "overlapping")))
def test_two_adapters_active_and_merged_together(tuner, tiny, layout):
    targets_a, targets_b = getattr(tiny, layout)
    model = _make(tuner, tiny, targets_a, adapter_name="first")
    _add(model, tuner, tiny, "second", targets_b)
    _nontrivial(model, "first", seed=1)
    _nontrivial(model, "second", seed=2)
    model.eval()
    batch = tiny.batch(8)
    original = _base_weights(model)
    held = {k: set(getattr(m, m.adapter_layer_names[0]).keys()) for k, m in _layers(model).items()}
    assert any(names == {"first", "second"} for names in held.values()) == (layout == "overlapping")
    with torch.no_grad():
        model.set_adapter("first")
        y_first = output(model, batch)
        model.set_adapter("second")
        y_second = output(model, batch)
        model.base_model.set_adapter(["first", "second"])
        assert _trainable(model) == _expected_trainable(model, tuner, ("first", "second"))
        y_both = output(model, batch)
        assert _differ(y_both, y_first) and _differ(y_both, y_second)  # both adapters act
        model.merge_adapter(["first", "second"])
        assert torch.allclose(output(model, batch), y_both, rtol=0, atol=1e-5)
        model.unmerge_adapter()
        for k, w in _base_weights(model).items():
            assert torch.allclose(w, original[k], rtol=0, atol=1e-6), k
        plain = model.merge_and_unload(adapter_names=["first", "second"])
        assert not _layers(plain)
        assert torch.allclose(output(plain, batch), y_both, rtol=0, atol=1e-5)


# ------------------------------------------------------------------ training
def _sgd_step(model: nn.Module, batch: dict) -> torch.Tensor:
    params = [p for p in model.parameters() if p.requires_grad]
    loss = output(model, batch).float().pow(2).mean()
    loss.backward()
    torch.optim.SGD(params, lr=0.5).step()
    return loss.detach()


@pytest.mark.parametrize("tuner, tiny", cases("training_step"))
def test_training_steps_change_only_the_adapter(tuner, tiny):
    model = _make(tuner, tiny)
    expected = _expected_trainable(model, tuner)
    assert _trainable(model) == expected
    model.train()
    before = state_of(model)
    if not expected:  # a frozen split (train_ortho=False): nothing trains, a training forward still runs
        loss = output(model, tiny.batch(10)).float().pow(2).mean()
        assert torch.isfinite(loss) and not loss.requires_grad
        return
    # from initialisation, as a user starts: a finite loss, and only adapter tensors move (in LoRA-like factorisations
    # from B = 0 the other factor gets its first gradient only later, so this step may move a subset)
    assert torch.isfinite(_sgd_step(model, tiny.batch(10)))
    after = state_of(model)
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and moved <= expected
    # away from initialisation every trainable tensor gets a gradient: one step moves exactly them
    perturb_trainables(model)
    before = state_of(model)
    assert torch.isfinite(_sgd_step(model, tiny.batch(11)))
    after = state_of(model)
    assert {k for k in before if not torch.equal(before[k], after[k])} == expected


# ------------------------------------------------------------------ half precision
@pytest.mark.parametrize("tuner, tiny", cases("bfloat16"))
def test_bfloat16_forward(tuner, tiny):
    batch = tiny.batch(12)
    # created and initialised on a bfloat16 model: runs, answers in bfloat16, keeps the promise at init
    model = _make(tuner, tiny, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        y = output(model, _cast(batch, torch.bfloat16))
        y_base = output(tiny.build().to(torch.bfloat16), _cast(batch, torch.bfloat16))
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
    if tuner.identity_at_init:
        assert torch.allclose(y.float(), y_base.float(), rtol=0, atol=2e-2 * float(y_base.abs().max()))
    # one adapter in float32 and in bfloat16 (PEFT's autocast keeps it float32 there), on the same base weights (the
    # bfloat16-representable ones, so that OrthoSplit's rebuilt base stream is the same): bfloat16's rounding only
    def base32():
        return tiny.build().to(torch.bfloat16).float()

    model32 = get_peft_model(base32(), tuner.config(tiny.targets))
    tuner.initialize(model32, tiny, "default")
    _nontrivial(model32)
    model16 = get_peft_model(base32().to(torch.bfloat16), tuner.config(tiny.targets))
    set_peft_model_state_dict(model16, get_peft_model_state_dict(model32))  # what from_pretrained loads
    model32.eval(), model16.eval()
    with torch.no_grad():
        y32, y32_base = output(model32, batch), output(base32(), batch)
        y16 = output(model16, _cast(batch, torch.bfloat16))
        assert y16.dtype == torch.bfloat16
        err, effect = float((y16.float() - y32).abs().max()), float((y32 - y32_base).abs().max())
        assert err < 0.25 * effect and err < 2e-2 * float(y32.abs().max()), (err, effect)
        y16_merged = output(model16.merge_and_unload(), _cast(batch, torch.bfloat16))
        assert float((y16_merged.float() - y32).abs().max()) < 0.25 * effect


# ------------------------------------------------------------------ deepcopy
@pytest.mark.parametrize("tuner, tiny", cases("deepcopy"))
def test_deepcopy_is_an_independent_equal_model(tuner, tiny):
    model = _make(tuner, tiny)
    _nontrivial(model)
    model.eval()
    batch = tiny.batch(13)
    with torch.no_grad():
        y = output(model, batch)
    clone = copy.deepcopy(model)
    assert same_state(state_of(clone), state_of(model))
    assert _trainable(clone) == _trainable(model)
    with torch.no_grad():
        assert torch.equal(output(clone, batch), y)
        _first_adapter_tensor(next(iter(_layers(clone).values())), "default").add_(0.5)
        assert _differ(output(clone, batch), y)
        assert torch.equal(output(model, batch), y)  # the original shares nothing with the copy
    clone.train()
    loss = output(clone, batch).float().pow(2).mean()  # NullSpaceLoRA: the copy knows it is initialised
    assert torch.isfinite(loss)


# ------------------------------------------------------------------ refusals
@pytest.mark.parametrize("tuner, tiny", cases("unsupported_target"))
def test_unsupported_target_is_refused_with_the_model_unchanged(tuner, tiny):
    base = tiny.build()
    before, types = state_of(base), {n: type(m) for n, m in base.named_modules()}
    with pytest.raises(TypeError, match=tiny.unsupported):
        get_peft_model(base, tuner.config(tiny.targets + (tiny.unsupported,)))
    assert same_state(state_of(base), before)
    assert {n: type(m) for n, m in base.named_modules()} == types

    model = _make(tuner, tiny, tiny.targets[:1])
    before = state_of(model)
    with pytest.raises(TypeError, match=tiny.unsupported):
        model.add_adapter("bad", tuner.config(tiny.targets + (tiny.unsupported,)))
    assert same_state(state_of(model), before)
    assert "bad" not in model.peft_config and not _holders_of(model, "bad")
    assert set(_layers(model)) == {n for n in _layers(model) if n.endswith(tiny.targets[0])}
