"""bitsandbytes 4-bit layers on CPU: what must hold on every x86 CPU, whichever path bitsandbytes takes there.

bitsandbytes branches on the CPU (peft_ext/bnb_cpu.py): with AVX-512-BF16 a Linear4bit repacks itself on its first
eval forward without gradients, and its native dequantisation is wrong for some shapes whose in_features is not a
multiple of the block size. The repack branch is a module attribute (`support_avx512bf16_for_cpu`), so the tests set
it both ways; the native kernel's branch is decided inside its C library and cannot be forced, so the tests assert
only what holds on both: real shapes dequantise exactly, odd shapes either dequantise exactly or are refused.
"""

import warnings

import pytest
import torch
from peft import get_peft_model
from torch import nn

from peft_ext import ActivationStats, SubspaceLoraConfig, disable_bnb_cpu_repack
from peft_ext.bnb_cpu import check_4bit_dequantize, reference_dequantize_4bit
from peft_ext.ortho.quant import NF4_CODE, nf4_blockwise

bnb = pytest.importorskip("bitsandbytes")
F = bnb.functional


def _linear4bit(in_f: int, out_f: int, seed: int = 0, compress_statistics: bool = False) -> nn.Module:
    w = torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(seed)) / in_f**0.5
    m = bnb.nn.Linear4bit(in_f, out_f, bias=False, compute_dtype=torch.float32, quant_type="nf4",
                          compress_statistics=compress_statistics)
    m.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4", compress_statistics=compress_statistics)
    return m.to("cpu")


class Net(nn.Module):
    def __init__(self, in_f: int = 128, hidden: int = 64, seed: int = 0, compress_statistics: bool = False) -> None:
        super().__init__()
        self.q = _linear4bit(in_f, hidden, seed, compress_statistics)
        self.out = _linear4bit(hidden, 64, seed + 1, compress_statistics)

    def forward(self, x):
        return self.out(torch.relu(self.q(x)))


@pytest.mark.parametrize("compress_statistics", [False, True])
@pytest.mark.parametrize("shape", [(48, 80), (64, 576), (3, 64), (5, 7)])
def test_reference_decoding_is_bitsandbytes_quantize_4bit(shape, compress_statistics):
    """quantize_4bit is bitsandbytes' pure-torch path on every CPU: our decoding of its codes is its own torch
    reference (backends/default), and for plain absmax it is exactly our pure-torch NF4."""
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    from bitsandbytes.backends.utils import _get_4bit_code

    w = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    q, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=compress_statistics)
    ours = reference_dequantize_4bit(q, state)
    absmax = state.absmax if not state.nested else F.dequantize_blockwise(state.absmax, state.state2) + state.offset
    theirs = _dequantize_4bit_compute(q.reshape(-1), absmax.float(), _get_4bit_code("nf4", q.device), 64, shape,
                                      torch.float32)
    assert torch.equal(ours, theirs)
    if not compress_statistics:
        assert torch.allclose(nf4_blockwise(w), ours, atol=1e-6)
    assert torch.allclose(torch.tensor(NF4_CODE), F.get_4bit_type("nf4", device="cpu"))


@pytest.mark.parametrize("shape", [(64, 576), (1536, 576), (48, 64), (7, 128)])
def test_native_dequantize_is_exact_for_real_model_shapes(shape):
    """in_features a multiple of the block size (every real model: 576, 1536, 384, 4096, ...): bitsandbytes' own
    CPU dequantisation equals our pure-torch NF4 on every CPU path."""
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(2))
    q, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)
    assert torch.allclose(F.dequantize_4bit(q, state), nf4_blockwise(w), atol=1e-6)


@pytest.mark.parametrize("repack_flag", [False, True])
def test_wrapped_4bit_layer_keeps_its_layout_precision_and_gradients(repack_flag):
    """Whatever bitsandbytes would do on this CPU, a layer peft-ext wraps is never repacked: an eval forward leaves
    the packed weight bit-identical, computes with the dequantised weight in float32, and a later training
    forward gives the input its gradient (bitsandbytes' repacked path has no autograd kernel)."""
    net = Net()
    for m in net.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = repack_flag  # what has_avx512bf16() says on each kind of CPU
    packed = {n: m.weight.data.clone() for n, m in net.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    model = get_peft_model(net, SubspaceLoraConfig(k=4, target_modules=["q", "out"])).eval()
    x = torch.randn(5, 128, generator=torch.Generator().manual_seed(3))
    q_layer = model.base_model.model.q
    with torch.no_grad():
        h = q_layer.get_base_layer()(x)
        model(x)
    for n, m in model.base_model.model.named_modules():
        if isinstance(m, bnb.nn.Linear4bit):
            assert not getattr(m.weight.quant_state, "packing_format_for_cpu", False)
            assert torch.equal(m.weight.data, packed[n.replace(".base_layer", "")])
    deq = F.dequantize_4bit(q_layer.get_base_layer().weight.data, q_layer.get_base_layer().weight.quant_state)
    assert torch.allclose(h, x @ deq.T, atol=1e-6)  # float32, not bfloat16 (|err| ~ 6e-3 when repacked)
    model.train()
    xg = x.clone().requires_grad_(True)
    q_layer.get_base_layer()(xg).sum().backward()
    assert xg.grad is not None and torch.allclose(xg.grad, deq.sum(0).expand_as(xg), atol=1e-5)


def test_activation_statistics_leave_a_users_4bit_model_as_it_was():
    net = Net()
    for m in net.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = True
    packed = net.q.weight.data.clone()
    data = [torch.randn(4, 128, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    stats = ActivationStats.collect(net, data, ["q", "out"], progress=False)
    assert stats.token_count("q") == 12
    assert torch.equal(net.q.weight.data, packed) and not getattr(net.q.weight.quant_state, "packing_format_for_cpu", False)
    assert net.q.support_avx512bf16_for_cpu is True  # the user's own setting is restored afterwards


@pytest.mark.parametrize("compress_statistics", [False, True])
def test_a_layer_repacked_before_wrapping_is_restored_with_a_warning(compress_statistics):
    """Simulated with bitsandbytes' own (pure torch) repack, so it runs on every CPU. Without double quantisation
    (transformers' default) bitsandbytes' own inverse leaves the scales transposed; ours puts them back in order."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu

    net = Net(compress_statistics=compress_statistics)
    before = F.dequantize_4bit(net.q.weight.data, net.q.weight.quant_state)
    net.q.weight.data, net.q.weight.quant_state = _convert_weight_packed_for_cpu(net.q.weight.data, net.q.weight.quant_state)
    with pytest.warns(UserWarning, match=r"already repacked the 4-bit weight of q .*rounds the block scales to bfloat16"):
        assert disable_bnb_cpu_repack(net) == 2
    after = F.dequantize_4bit(net.q.weight.data, net.q.weight.quant_state)
    assert torch.allclose(after, before, rtol=1e-2, atol=0)  # standard layout again, scales rounded to bfloat16
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert disable_bnb_cpu_repack(net) == 2  # idempotent, silent the second time


def test_a_wrong_native_dequantisation_is_refused_before_anything_changes(monkeypatch):
    net = Net(in_f=80)  # in_features 80: not a multiple of the block size 64
    real = F.dequantize_4bit
    monkeypatch.setattr(F, "dequantize_4bit", lambda *a, **k: real(*a, **k) + 1.0)
    with pytest.raises(ValueError, match=r"layer 'q': bitsandbytes' CPU dequantisation of this 4-bit weight is wrong "
                                         r"on this machine \(shape \(64, 80\).*blocksize that divides in_features"):
        get_peft_model(net, SubspaceLoraConfig(k=4, target_modules=["q"]))
    assert isinstance(net.q, bnb.nn.Linear4bit)


@pytest.mark.parametrize("shape", [(48, 80), (48, 96), (12, 8)])
def test_odd_shapes_are_exact_or_refused_on_this_cpu(shape):
    """On this machine, the outcome follows what bitsandbytes really computes: exact, or a clear refusal."""
    out_f, in_f = shape
    layer = _linear4bit(in_f, out_f)
    native = F.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    exact = torch.allclose(native, reference_dequantize_4bit(layer.weight.data, layer.weight.quant_state), atol=1e-6)
    if exact:
        check_4bit_dequantize(layer, "x")
    else:
        with pytest.raises(ValueError, match="bitsandbytes' CPU dequantisation of this 4-bit weight is wrong"):
            check_4bit_dequantize(layer, "x")


def test_evidence_script_runs_and_the_guard_rows_hold_on_every_cpu(tmp_path):
    """benchmarks/bnb_cpu_paths.py (the README's evidence): the 'bitsandbytes as is' rows depend on the CPU; the
    guarded rows must be exact here whatever the CPU."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, str(root / "benchmarks" / "bnb_cpu_paths.py"), "--json", str(tmp_path / "b.json")],
                         capture_output=True, text=True, timeout=300, cwd=root)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads((tmp_path / "b.json").read_text())
    assert res["printed"].startswith("machine:") and "peft-ext guard" in out.stdout
    for row in res["layers"]:
        if row["guard"]:
            assert not row["repacked"] and row["input_gets_gradient"]
            assert row["eval_forward_err"] < 1e-5 and row["dequantize_after_err"] == 0 and row["state_dict_weight_err"] == 0
    assert all(r["runs"] for r in res["small_shapes"] if r["guard"])
    real = [r for r in res["dequantize"] if r["shape"][1] % 64 == 0]
    assert real and all(r["max_err"] < 1e-6 for r in real)
