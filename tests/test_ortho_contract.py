"""OrthoSplit's side of PEFT's tuner contract, where it differs from the other tuners: which layer merges which of
several adapters (one per layer), which values train after add_adapter / from_pretrained / load_adapter (also in
bfloat16), save/load at values_dtype, half-precision forwards on CPU, FSDP1/FSDP2 wrapping. What every tuner shares
(save/load, merge/unmerge/safe_merge, unload, delete_adapter, disable_adapter, deepcopy, ...) is checked for OrthoSplit
too in tests/test_tuner_contract.py."""

from __future__ import annotations

import copy
import socket

import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from torch import nn

from peft_ext import OrthoSplitConfig, OrthoSplitLayer, ortho_alpha

from .conftest import Toy, same_state


def _cfg(targets, **kw) -> OrthoSplitConfig:
    """A data-free split (quantisation residual, magnitude selector) dense enough for Toy's small layers."""
    return OrthoSplitConfig(target_modules=targets, **{"base_kind": "int4", "density": 0.2, **kw})


def _x(n: int = 6, d: int = 8, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _layer(model, name: str) -> OrthoSplitLayer:
    return getattr(model.base_model.model, name)


def _trainable(model) -> list[str]:
    return sorted(n for n, p in model.named_parameters() if p.requires_grad)


def _base_weights(model) -> dict[str, torch.Tensor]:
    return {n: m.get_base_layer().weight.detach().clone() for n, m in model.named_modules()
            if isinstance(m, OrthoSplitLayer)}


def _two_adapters(shared: bool):
    """Toy with adapter 'a' on q and k and adapter 'b' on out (disjoint) or on q and out (sharing q)."""
    model = get_peft_model(Toy(), _cfg(["q", "k"]), adapter_name="a")
    model.add_adapter("b", _cfg(["q", "out"] if shared else ["out"], base_kind="int8", density=0.3))
    return model


# ------------------------------------------------------------------ merging
def test_adapters_on_disjoint_layers_merge_together_and_each_layer_merges_only_what_it_holds():
    model = _two_adapters(shared=False)
    x = _x()
    original = _base_weights(model)
    with torch.no_grad():
        y_a = model(x)  # 'a' active: q and k split, out original
        model.base_model.set_adapter(["a", "b"])
        y_ab = model(x)
        model.base_model.set_adapter("a")
        assert (y_ab - y_a).abs().max() > 1e-3  # b's layer changes the output: the checks below can tell

        model.merge_adapter(["a"])  # 'out' holds only 'b': it must skip 'a' (was KeyError: 'a')
        assert [_layer(model, n).merged_adapters for n in ("q", "k", "out")] == [["a"], ["a"], []]
        assert torch.allclose(model(x), y_a, atol=1e-5)
        model.unmerge_adapter()
        assert same_state(_base_weights(model), original)  # unmerge restores every weight to the bit

        model.base_model.set_adapter(["a", "b"])  # before merging: set_adapter unmerges a merged model
        model.merge_adapter(["a", "b"])
        assert [_layer(model, n).merged_adapters for n in ("q", "k", "out")] == [["a"], ["a"], ["b"]]
        assert torch.allclose(model(x), y_ab, atol=1e-5)
        model.unmerge_adapter()
        assert same_state(_base_weights(model), original)

        plain = model.merge_and_unload(adapter_names=["a", "b"])  # was refused as "only one at a time"
    assert all(type(getattr(plain, n)) is nn.Linear for n in ("q", "k", "out"))
    with torch.no_grad():
        assert torch.allclose(plain(x), y_ab, atol=1e-5)


def test_two_adapters_on_one_layer_refuse_to_merge_together_naming_the_layer_and_change_nothing():
    model = _two_adapters(shared=True)
    x = _x()
    original = _base_weights(model)
    both = r"layer 'q' would take \['a', 'b'\].*only one can be merged into a layer"
    with pytest.raises(ValueError, match=both):
        model.merge_adapter(["a", "b"])
    assert same_state(_base_weights(model), original) and not any(_layer(model, n).merged for n in ("q", "k", "out"))
    with pytest.raises(ValueError, match=both):
        model.merge_and_unload(adapter_names=["a", "b"])
    assert all(isinstance(_layer(model, n), OrthoSplitLayer) for n in ("q", "k", "out"))  # nothing unloaded
    with pytest.raises(ValueError, match=r"would take adapters \['a', 'b'\]"):  # the layer's own check
        _layer(model, "q").merge(adapter_names=["a", "b"])
    with pytest.raises(TypeError, match=r"pass adapter_names=\['a'\]"):
        model.merge_adapter("a")

    model.merge_adapter(["a"])
    with pytest.raises(ValueError, match=r"layer 'q' would take \['a', 'b'\]"):  # one merged already
        model.merge_adapter(["b"])
    assert _layer(model, "out").merged_adapters == []  # the refusal came before 'out' merged 'b'
    model.unmerge_adapter()
    assert same_state(_base_weights(model), original)

    with torch.no_grad():
        model.set_adapter("b")
        y_b = model(x)
        expected_q = _layer(model, "q").effective_weight("b")
        plain = model.merge_and_unload(adapter_names=["b"])  # k holds only 'a': it gets its original weight back
        assert torch.equal(plain.q.weight, expected_q)
        assert torch.equal(plain.k.weight, original["base_model.model.k"])
        assert torch.allclose(plain(x), y_b, atol=1e-5)


# ------------------------------------------------------------------ which values train
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_add_adapter_leaves_the_inactive_adapter_frozen_and_set_adapter_moves_training(dtype):
    # bfloat16: PEFT upcasts the values to float32 and re-wraps them as new Parameters (which used to make them
    # trainable); float32: nothing is cast
    model = get_peft_model(Toy().to(dtype), _cfg(["q"], train_ortho=True), adapter_name="a")
    model.add_adapter("b", _cfg(["q", "out"], train_ortho=True))
    model.add_adapter("frozen", _cfg(["k"]))
    assert _trainable(model) == ["base_model.model.q.ortho_values.a"]
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if "ortho_values" in n)
    model.set_adapter("b")
    assert _trainable(model) == ["base_model.model.out.ortho_values.b", "base_model.model.q.ortho_values.b"]
    model.set_adapter("frozen")  # train_ortho=False: active, but its values stay frozen
    assert _trainable(model) == []


@pytest.mark.parametrize("low_cpu_mem_usage", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_is_trainable_on_load_decides_both_ways(tmp_path, dtype, low_cpu_mem_usage):
    model = get_peft_model(Toy().to(dtype), _cfg(["q", "out"], train_ortho=True))
    model.add_adapter("other", _cfg(["k"], train_ortho=True))
    model.save_pretrained(tmp_path)  # 'default' in tmp_path, 'other' in tmp_path/other
    x = _x(dtype=dtype)
    with torch.no_grad():
        y = model(x)
    kw = dict(low_cpu_mem_usage=low_cpu_mem_usage)
    loaded = PeftModel.from_pretrained(Toy().to(dtype), tmp_path, **kw)  # is_trainable=False by default
    assert _trainable(loaded) == []
    loaded.load_adapter(tmp_path / "other", adapter_name="other", **kw)
    assert _trainable(loaded) == []
    with torch.no_grad():
        assert torch.equal(loaded(x), y)

    trainable = PeftModel.from_pretrained(Toy().to(dtype), tmp_path, is_trainable=True, **kw)
    default = ["base_model.model.out.ortho_values.default", "base_model.model.q.ortho_values.default"]
    assert _trainable(trainable) == default
    trainable.load_adapter(tmp_path / "other", adapter_name="other", is_trainable=True, **kw)
    assert _trainable(trainable) == ["base_model.model.k.ortho_values.other", *default]
    assert all(p.dtype == torch.float32 for n, p in trainable.named_parameters() if p.requires_grad)  # PEFT's upcast


# ------------------------------------------------------------------ save / load
@pytest.mark.parametrize("values_dtype", ["float16", "bfloat16", "float32"])
def test_saved_values_are_values_dtype_and_load_back_to_the_bit(tmp_path, values_dtype):
    saved_dtype = getattr(torch, values_dtype)
    model = get_peft_model(Toy(), _cfg(["q", "k", "out"], values_dtype=values_dtype))
    x = _x()
    held = {n: _layer(model, n).ortho_values["default"].detach().clone() for n in ("q", "k", "out")}
    for v in held.values():  # held in the model's dtype (what FSDP needs), rounded to values_dtype when split
        assert v.dtype == torch.float32 and torch.equal(v.to(saved_dtype).float(), v)
    live = model.state_dict()["base_model.model.q.ortho_values.default"]
    assert live.dtype == torch.float32  # the model's own state dict stays live (checkpointing loads into it)
    with torch.no_grad():
        y = model(x)
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    for n in ("q", "k", "out"):
        saved = tensors[f"base_model.model.{n}.ortho_values"]
        assert saved.dtype == saved_dtype and torch.equal(saved.float(), held[n])
    for low_cpu_mem_usage in (False, True):
        loaded = PeftModel.from_pretrained(Toy(), tmp_path, low_cpu_mem_usage=low_cpu_mem_usage)
        for n in ("q", "k", "out"):
            v = _layer(loaded, n).ortho_values["default"]
            assert v.dtype == torch.float32 and torch.equal(v, held[n])
        with torch.no_grad():
            assert torch.equal(loaded(x), y)


def test_values_follow_peft_autocast_when_loaded_into_a_bfloat16_model(tmp_path):
    # An adapter split on a float32 model, loaded into the same model in bfloat16: with PEFT's autocast (its default)
    # the values are float32 and exactly the saved ones; without it they are in the model's dtype, as LoRA's weights
    # are (what FSDP1 needs on a bfloat16 model).
    get_peft_model(Toy(), _cfg(["q", "k", "out"])).save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")["base_model.model.q.ortho_values"]
    assert saved.dtype == torch.float16 and not torch.equal(saved.bfloat16().half(), saved)  # bfloat16 would lose bits
    for low_cpu_mem_usage in (False, True):
        for autocast, expected in ((True, saved.float()), (False, saved.bfloat16())):
            loaded = PeftModel.from_pretrained(Toy().to(torch.bfloat16), tmp_path, autocast_adapter_dtype=autocast,
                                               low_cpu_mem_usage=low_cpu_mem_usage)
            v = _layer(loaded, "q").ortho_values["default"]
            assert v.dtype == expected.dtype and torch.equal(v, expected) and not v.requires_grad


def test_trained_values_are_saved_as_they_trained(tmp_path):
    model = get_peft_model(Toy(), _cfg(["q", "out"], train_ortho=True))  # values_dtype='float16', the default
    x = _x()
    model(x).pow(2).sum().backward()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3).step()
    v = _layer(model, "q").ortho_values["default"].detach().clone()
    assert not torch.equal(v.half().float(), v)  # the step left float16's grid: a float16 file would round it
    with torch.no_grad():
        y = model(x)
    model.save_pretrained(tmp_path)
    assert load_file(tmp_path / "adapter_model.safetensors")["base_model.model.q.ortho_values"].dtype == torch.float32
    loaded = PeftModel.from_pretrained(Toy(), tmp_path, is_trainable=True)
    assert torch.equal(_layer(loaded, "q").ortho_values["default"], v)
    with torch.no_grad():
        assert torch.equal(loaded(x), y)


# ------------------------------------------------------------------ half precision on CPU
@pytest.mark.parametrize("layout", ["csr", "fused"])
@pytest.mark.parametrize("autocast", [True, False])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_forward_on_cpu_matches_the_dense_effective_weight(dtype, autocast, layout):
    # the csr layout on CPU used to crash: "addmm_out_sparse_csr_impl_mkl" not implemented for 'BFloat16'
    model = get_peft_model(Toy().to(dtype), _cfg(["q", "k", "out"], layout=layout), autocast_adapter_dtype=autocast)
    model.eval()
    eps = torch.finfo(dtype).eps
    inputs = {"q": _x(64, 8, dtype), "k": _x(64, 8, dtype, seed=1), "out": _x(64, 12, dtype, seed=2)}
    with torch.no_grad():
        for alpha in (1.0, 0.5):
            with ortho_alpha(model, alpha):
                for name, x in inputs.items():
                    layer = _layer(model, name)
                    w = layer.effective_weight("default")  # B + alpha * O, dense
                    bias = layer.get_base_layer().bias
                    ref = F.linear(x.float(), w.float(), bias.float())
                    y = layer(x)
                    assert y.dtype == dtype
                    tol = eps * float(ref.abs().max())  # one rounding of the largest output
                    assert float((y.float() - ref).abs().max()) <= tol, (name, alpha)
                    if alpha == 1.0:
                        with ortho_alpha(model, 0.0):  # the ortho stream's share is well above the tolerance
                            assert float((layer(x).float() - ref).abs().max()) > 3 * tol
        # PEFT's test_forward_float16 sequence: merge, unmerge, safe merge, merge_and_unload all run in half precision
        y = model(inputs["q"])
        model.merge_adapter()
        y_merged = model(inputs["q"])
        model.unmerge_adapter()
        model.merge_adapter(safe_merge=True)
        assert torch.equal(model(inputs["q"]), y_merged)
        model.unmerge_adapter()
        assert torch.equal(model(inputs["q"]), y)
        plain = model.merge_and_unload()
        assert torch.equal(plain(inputs["q"]), y_merged)
        tol = 4 * eps * float(y.abs().max())  # three layers, rounded in another order than the dense merged weights
        assert float((y_merged.float() - y.float()).abs().max()) <= tol


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_training_gives_the_closed_form_gradient_on_cpu(dtype):
    # d(sum y)/d(value at (r, c)) = alpha * sum over the batch of x[:, c]
    model = get_peft_model(Toy().to(dtype), _cfg(["q"], train_ortho=True), autocast_adapter_dtype=False)
    layer = _layer(model, "q")
    values = layer.ortho_values["default"]
    assert values.dtype == dtype and values.requires_grad
    x = _x(32, 8, dtype)
    with ortho_alpha(model, 0.5):
        y = layer(x)
    assert y.dtype == dtype
    y.float().sum().backward()
    cols = layer.ortho_index["default"].long() % layer.in_features
    expected = 0.5 * x.float().sum(0)[cols]
    assert torch.allclose(values.grad.float(), expected, rtol=4 * torch.finfo(dtype).eps, atol=1e-6)


# ------------------------------------------------------------------ FSDP
@pytest.fixture(scope="module")
def gloo_group():
    """A one-process gloo group for FSDP on CPU, torn down after this module (or someone else's, left alone)."""
    import torch.distributed as dist

    if dist.is_initialized():
        yield
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("wrap", ["fsdp1", "fsdp2"])
@pytest.mark.parametrize("train_ortho", [False, True])
@pytest.mark.parametrize("dtype, autocast", [(torch.float32, True), (torch.bfloat16, False)])
def test_fsdp_wraps_an_orthosplit_model_and_matches_it(gloo_group, wrap, train_ortho, dtype, autocast):
    # the default config on a float32 model, and on a bfloat16 model with PEFT's autocast off (as LoRA needs for FSDP1)
    from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard

    model = get_peft_model(Toy().to(dtype), _cfg(["q", "k", "out"], train_ortho=train_ortho),
                           autocast_adapter_dtype=autocast)
    dtypes = {p.dtype for p in model.parameters()}
    assert dtypes == {dtype}  # one dtype: what FSDP1's flat parameter needs (was float32 weights + float16 values)
    twin = copy.deepcopy(model)
    x = _x(dtype=dtype)
    x_ref = x.clone().requires_grad_(True)
    y_ref = model(x_ref)
    y_ref.float().pow(2).sum().backward()
    if wrap == "fsdp1":
        # one process: FSDP1 falls back to NO_SHARD, which still flattens every parameter into one FlatParameter
        wrapped = FullyShardedDataParallel(twin, use_orig_params=True, device_id=torch.device("cpu"))
    else:
        wrapped = fully_shard(twin)
    x_fsdp = x.clone().requires_grad_(True)
    y = wrapped(x_fsdp)
    y.float().pow(2).sum().backward()
    assert torch.equal(y, y_ref) and torch.equal(x_fsdp.grad, x_ref.grad)
    if train_ortho:
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        got = {n.replace("_fsdp_wrapped_module.", ""): p.grad for n, p in wrapped.named_parameters() if p.requires_grad}
        assert sorted(got) == sorted(grads) and len(grads) == 3
        for n, g in grads.items():
            g_fsdp = got[n].full_tensor() if hasattr(got[n], "full_tensor") else got[n]
            assert torch.allclose(g_fsdp, g, rtol=1e-6, atol=1e-6), n
