"""OrthoSplit: quantisers and selectors against closed forms, the split's exactness, the PEFT contract, bad inputs."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from peft import PeftModel, get_peft_model
from torch import nn

import peft_ext
from peft_ext import EntrySaliency, OrthoSplitConfig, OrthoSplitLayer, entry_saliency, ortho_alpha, orthosplit, set_ortho_alpha
from peft_ext.ortho.quant import quantize, rtn_per_row, stored_bytes
from peft_ext.ortho.select import entry_count, entry_scores, hessian_inverse_diagonal, top_k_indices

from .conftest import Toy, same_state, state_of, tiny_bert


def _finetuned(seed: int = 1, scale: float = 0.2) -> tuple[Toy, Toy]:
    """(reference, fine-tuned copy with every weight moved)."""
    ref = Toy()
    ft = copy.deepcopy(ref)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in ft.named_parameters():
            if name.endswith("weight"):
                p.add_(scale * torch.randn(p.shape, generator=g))
    return ref, ft


def _x(n: int = 6, d: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def _dense(index: torch.Tensor, values: torch.Tensor, shape) -> torch.Tensor:
    out = torch.zeros(shape[0] * shape[1], dtype=torch.float32)
    out[index.long()] = values.float()
    return out.view(shape)


# ------------------------------------------------------------------ quantisers
def test_rtn_per_row_closed_form():
    w = torch.tensor([[0.5, -1.0, 0.26, 0.0], [0.0, 0.0, 0.0, 0.0], [3.0, 1.0, -2.0, 0.4]])
    q8 = rtn_per_row(w, 8)
    s0 = 1.0 / 127
    assert torch.allclose(q8[0], torch.round(w[0] / s0) * s0)
    assert torch.equal(q8[1], w[1])  # a zero row stays zero (scale 1)
    q4 = rtn_per_row(w, 4)
    s2 = 3.0 / 7  # one uniform rule: max|row| / qmax
    assert torch.allclose(q4[2], torch.tensor([7.0, 2.0, -5.0, 1.0]) * s2)
    assert q4[0, 1] == -1.0 and q4.abs().amax(1).tolist() == pytest.approx([1.0, 0.0, 3.0])  # the row max is exact
    assert torch.equal(rtn_per_row(q4, 4), q4)  # idempotent: a quantised weight is its own base


def test_casts_and_stored_bytes():
    w = torch.randn(4, 6, dtype=torch.float32)
    assert torch.equal(quantize(w, "none"), w)
    assert torch.equal(quantize(w, "fp16"), w.half().float())
    assert torch.equal(quantize(w, "bf16"), w.bfloat16().float())
    assert stored_bytes("int8", 4, 6) == 24 + 16 and stored_bytes("int4", 4, 6) == 12 + 16
    assert stored_bytes("nf4", 4, 64) == 128 + 16 and stored_bytes("none", 4, 6) == 96


# ------------------------------------------------------------------ selectors
def test_hessian_inverse_diagonal_closed_forms():
    c = torch.diag(torch.tensor([1.0, 2.0, 3.0, 0.0]))
    lam = 0.01 * 1.5  # damp * mean(diag)
    assert torch.allclose(hessian_inverse_diagonal(c), 1 / (torch.tensor([1.0, 2.0, 3.0, 0.0], dtype=torch.float64) + lam))
    a = torch.randn(5, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    spd = a @ a.T
    expected = torch.linalg.inv(spd + 0.05 * spd.diagonal().mean() * torch.eye(5, dtype=torch.float64)).diagonal()
    assert torch.allclose(hessian_inverse_diagonal(spd, damp=0.05), expected)


def test_entry_scores_closed_forms():
    d = torch.tensor([[1.0, -2.0], [0.5, 0.0]])
    w = torch.tensor([[4.0, -2.0], [0.5, 1.0]])
    assert torch.equal(entry_scores("magnitude", d, w), d.abs())
    assert torch.allclose(entry_scores("relative", d, w), torch.tensor([[0.25, 1.0], [1.0, 0.0]]), atol=1e-6)
    hinv = torch.tensor([2.0, 0.5], dtype=torch.float64)
    assert torch.allclose(entry_scores("obs", d, w, hinv_diag=hinv), torch.tensor([[0.5, 8.0], [0.125, 0.0]]))
    f = torch.tensor([[2.0, 1.0], [4.0, 9.0]])
    assert torch.allclose(entry_scores("fisher", d, w, fisher=f), 0.5 * f * d**2)
    att_f = torch.tensor([[1.0, 0.2], [0.0, 0.3]])
    att_r = torch.tensor([[0.5, 0.5], [0.1, 0.0]])
    got = entry_scores("contrastive", d, w, forget=("attribution", att_f), retain=("attribution", att_r),
                       contrastive_lambda=2.0)
    assert torch.allclose(got, att_f - 2.0 * att_r)
    got = entry_scores("contrastive", d, w, forget=("fisher", f), retain=("attribution", att_r))
    assert torch.allclose(got, 0.5 * f * d**2 - att_r)
    r1 = entry_scores("random", d, w, generator=torch.Generator().manual_seed(3))
    r2 = entry_scores("random", d, w, generator=torch.Generator().manual_seed(3))
    assert torch.equal(r1, r2) and r1.shape == d.shape


def test_top_k_and_entry_count():
    s = torch.tensor([[0.1, 5.0, float("nan")], [3.0, -1.0, 4.0]])
    assert top_k_indices(s, 3).tolist() == [1, 3, 5]  # sorted row-major (CSR order), NaN ranks lowest
    assert entry_count(0.01, 1000) == 10 and entry_count(1e-9, 1000) == 1 and entry_count(0.9999, 100) == 100


# ------------------------------------------------------------------ the split
def test_full_precision_base_with_reference_is_exact_at_alpha_1_and_reverts_the_mask_at_alpha_0():
    ref, ft = _finetuned()
    x = _x()
    cfg = OrthoSplitConfig(target_modules=["q", "k", "out"], base_kind="none", density=0.25, values_dtype="float32")
    model = orthosplit(copy.deepcopy(ft), cfg, reference=ref)
    with torch.no_grad():
        y_ft = ft(x)
        assert torch.allclose(model(x), y_ft, atol=1e-6)
        # alpha=0: exactly the fine-tuned model with the masked entries put back to the reference values
        expected = copy.deepcopy(ft)
        for name in ("q", "k", "out"):
            layer = getattr(model.base_model.model, name)
            idx = layer.ortho_index["default"].long()
            # magnitude selector: the mask is the top 25% of |W - W_ref|
            d = (getattr(ft, name).weight - getattr(ref, name).weight).reshape(-1)
            assert set(idx.tolist()) == set(torch.topk(d.abs(), entry_count(0.25, d.numel())).indices.tolist())
            getattr(expected, name).weight.view(-1)[idx] = getattr(ref, name).weight.reshape(-1)[idx]
            assert torch.allclose(layer.ortho_anchor["default"], getattr(ref, name).weight.reshape(-1)[idx])
        with ortho_alpha(model, 0.0):
            assert torch.allclose(model(x), expected(x), atol=1e-6)
        q = model.base_model.model.q  # each layer is linear in alpha
        with ortho_alpha(model, 0.5):
            mid = q(x)
        with ortho_alpha(model, 0.0):
            y0 = q(x)
        assert torch.allclose(mid, (q(x) + y0) / 2, atol=1e-5)
    assert model.base_model.model.q.ortho_alpha["default"] == 1.0  # the context manager restored alpha


def test_quantised_base_without_reference_is_q_of_w_plus_the_largest_residuals():
    _, ft = _finetuned()
    x = _x()
    for kind in ("int8", "int4", "nf4", "fp16"):
        cfg = OrthoSplitConfig(target_modules=["q"], base_kind=kind, density=0.1, values_dtype="float32")
        model = get_peft_model(copy.deepcopy(ft), cfg)
        layer = model.base_model.model.q
        w = ft.q.weight.detach()
        base = quantize(w, kind)
        r = w - base
        idx = layer.ortho_index["default"].long()
        assert set(idx.tolist()) == set(torch.topk(r.abs().reshape(-1), entry_count(0.1, w.numel())).indices.tolist())
        assert torch.allclose(layer.ortho_values["default"], r.reshape(-1)[idx])
        o = _dense(idx, layer.ortho_values["default"], w.shape)
        with torch.no_grad():
            assert torch.allclose(layer(x), x @ (base + o).T + ft.q.bias, atol=1e-5)
            with ortho_alpha(model, 0):
                assert torch.allclose(layer(x), x @ base.T + ft.q.bias, atol=1e-5)
            with ortho_alpha(model, 0.3):
                assert torch.allclose(layer(x), x @ (base + 0.3 * o).T + ft.q.bias, atol=1e-5)


def test_obs_selector_uses_the_damped_inverse_hessian_of_the_layer_inputs():
    ref, ft = _finetuned()
    batches = [{"x": _x(32, seed=s)} for s in range(3)]
    stats, _ = peft_ext.collect_stats(ft, [b["x"] for b in batches], target_modules=["q"], progress=False)
    cfg = OrthoSplitConfig(target_modules=["q"], base_kind="none", density=0.2, selector="obs")
    model = orthosplit(copy.deepcopy(ft), cfg, reference=ref, stats=stats)
    cov = torch.cat([b["x"] for b in batches]).double()
    cov = cov.T @ cov / cov.shape[0]
    hinv = torch.linalg.inv(cov + 0.01 * cov.diagonal().mean() * torch.eye(8, dtype=torch.float64)).diagonal()
    d = (ft.q.weight - ref.q.weight).detach()
    scores = d**2 / hinv.float()[None, :]
    idx = model.base_model.model.q.ortho_index["default"].long()
    assert set(idx.tolist()) == set(torch.topk(scores.reshape(-1), entry_count(0.2, 96)).indices.tolist())
    # and it differs from plain magnitude on these inputs (otherwise the test would prove nothing)
    assert set(idx.tolist()) != set(torch.topk(d.abs().reshape(-1), entry_count(0.2, 96)).indices.tolist())


def _tiny_lm(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=48, hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, max_position_embeddings=32)
    return LlamaForCausalLM(cfg).eval()


def _lm_batches(n, seed):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 48, (2, 7), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
    return out


def test_entry_saliency_fisher_and_attribution_match_hand_computed_gradients_and_leave_the_model_alone():
    ref = _tiny_lm(0)
    ft = _tiny_lm(0)
    with torch.no_grad():
        for p in ft.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ft.train()
    flags = {n: p.requires_grad for n, p in ft.named_parameters()}
    ft.lm_head.weight.requires_grad_(False)
    flags["lm_head.weight"] = False
    before = state_of(ft)
    cfg = OrthoSplitConfig(target_modules=["down_proj", "q_proj"], base_kind="none")
    batches = _lm_batches(3, 0)
    fisher = entry_saliency(ft, batches, cfg, kind="fisher")
    att = entry_saliency(ft, batches, cfg, kind="attribution", reference=ref, at=0.5)
    assert same_state(state_of(ft), before) and ft.training
    assert {n: p.requires_grad for n, p in ft.named_parameters()} == flags
    assert set(fisher.maps) == {"model.layers.0.mlp.down_proj", "model.layers.0.self_attn.q_proj"}
    key = "model.layers.0.mlp.down_proj"
    w = ft.get_submodule(key).weight
    grads, grads_mid = [], []
    mid = copy.deepcopy(ft).eval()
    with torch.no_grad():
        wm = mid.get_submodule(key).weight
        wm.copy_(ref.get_submodule(key).weight + 0.5 * (w - ref.get_submodule(key).weight))
        # attribution moves every target layer to the midpoint
        wq = mid.get_submodule("model.layers.0.self_attn.q_proj").weight
        rq = ref.get_submodule("model.layers.0.self_attn.q_proj").weight
        wq.copy_(rq + 0.5 * (wq - rq))
    eval_ft = copy.deepcopy(ft).eval()
    for b in batches:
        for model, store in ((eval_ft, grads), (mid, grads_mid)):
            p = model.get_submodule(key).weight
            p.grad = None
            model(**b).loss.backward()
            store.append(p.grad.clone())
    assert torch.allclose(fisher.maps[key], torch.stack([g**2 for g in grads]).mean(0), rtol=1e-4, atol=1e-10)
    d = (w - ref.get_submodule(key).weight).detach()
    assert torch.allclose(att.maps[key], -torch.stack(grads_mid).mean(0) * d, rtol=1e-4, atol=1e-10)
    assert fisher.batches == 3 and att.kind == "attribution"


def test_contrastive_split_on_a_tiny_lm_prefers_forget_salient_entries():
    ref = _tiny_lm(0)
    ft = _tiny_lm(0)
    with torch.no_grad():
        for p in ft.parameters():
            p.add_(0.05 * torch.randn_like(p))
    cfg = OrthoSplitConfig(target_modules=["down_proj"], base_kind="none", density=0.05, selector="contrastive")
    forget = entry_saliency(ft, _lm_batches(2, 1), cfg, kind="attribution", reference=ref)
    retain = entry_saliency(ft, _lm_batches(2, 2), cfg, kind="attribution", reference=ref)
    model = orthosplit(copy.deepcopy(ft), cfg, reference=ref, forget=forget, retain=retain)
    key = "model.layers.0.mlp.down_proj"
    score = forget.maps[key] - retain.maps[key]
    idx = model.base_model.model.get_submodule(key).ortho_index["default"].long()
    assert set(idx.tolist()) == set(torch.topk(score.reshape(-1), idx.numel()).indices.tolist())


# ------------------------------------------------------------------ PEFT contract
def test_save_load_rebuilds_the_base_stream_and_files_are_small(tmp_path):
    ref, ft = _finetuned()
    x = _x()
    cfg = OrthoSplitConfig(target_modules=["q", "k", "out"], base_kind="int4", density=0.1)
    model = orthosplit(copy.deepcopy(ft), cfg, reference=ref)
    set_ortho_alpha(model, {"out": 0.0})
    with torch.no_grad():
        y1 = model(x)
        with ortho_alpha(model, 0.0):
            y0 = model(x)
    model.save_pretrained(tmp_path / "ad")
    files = sorted(os.listdir(tmp_path / "ad"))
    assert "adapter_model.safetensors" in files and not any(f.endswith((".bin", ".pt")) for f in files)
    saved = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "ORTHO_SPLIT" and saved["uses_reference"] is True and saved["base_kind"] == "int4"
    from safetensors.torch import load_file

    tensors = load_file(tmp_path / "ad" / "adapter_model.safetensors")
    assert sum(t.numel() for t in tensors.values()) == 3 * sum(entry_count(0.1, n) for n in (96, 96, 48))
    assert all(t.dtype in (torch.int32, torch.float16, torch.float32) for t in tensors.values())
    for low_cpu in (False, True):
        loaded = PeftModel.from_pretrained(copy.deepcopy(ft), tmp_path / "ad", low_cpu_mem_usage=low_cpu)
        set_ortho_alpha(loaded, {"out": 0.0})
        with torch.no_grad():
            assert torch.allclose(loaded(x), y1, atol=1e-6)
            with ortho_alpha(loaded, 0.0):
                assert torch.allclose(loaded(x), y0, atol=1e-6)


def test_merge_unmerge_disable_and_merge_and_unload_at_alpha_0():
    _, ft = _finetuned()
    x = _x()
    model = get_peft_model(copy.deepcopy(ft), OrthoSplitConfig(target_modules=["q", "k", "out"], base_kind="int4"))
    with torch.no_grad():
        y1 = model(x)
        with model.disable_adapter():
            assert torch.allclose(model(x), ft(x), atol=1e-6)  # disabled: the original weights
        set_ortho_alpha(model, 0.0)
        y0 = model(x)
        assert not torch.allclose(y0, y1, atol=1e-4)
        model.merge_adapter()
        assert torch.allclose(model(x), y0, atol=1e-5)
        with pytest.raises(ValueError, match=r"merged into the weights at alpha=0.0; call model.unmerge_adapter\(\)"):
            set_ortho_alpha(model, 1.0)
        model.unmerge_adapter()
        assert torch.allclose(model.base_model.model.q.get_base_layer().weight, ft.q.weight, atol=1e-6)
        scrubbed = model.merge_and_unload()
        assert type(scrubbed.q) is nn.Linear
        assert torch.allclose(scrubbed(x), y0, atol=1e-5)


def test_two_adapters_one_active_at_a_time():
    _, ft = _finetuned()
    x = _x()
    model = get_peft_model(copy.deepcopy(ft), OrthoSplitConfig(target_modules=["q"], base_kind="int8"))
    model.add_adapter("coarse", OrthoSplitConfig(target_modules=["q"], base_kind="int4"))
    with torch.no_grad():
        y_a = model(x)
        model.set_adapter("coarse")
        y_b = model(x)
        assert not torch.allclose(y_a, y_b, atol=1e-5)
        model.base_model.set_adapter(["default", "coarse"])
        with pytest.raises(ValueError, match="each one replaces the whole weight"):
            model(x)


def test_gpt2_conv1d_layers_are_split_in_out_in_layout(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    ref = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=1, n_head=2)).eval()
    ft = copy.deepcopy(ref)
    with torch.no_grad():
        ft.transformer.h[0].attn.c_attn.weight.add_(0.1 * torch.randn(32, 96))
    ids = {"input_ids": torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))}
    cfg = OrthoSplitConfig(target_modules=["c_attn"], base_kind="none", density=0.9995, values_dtype="float32")
    model = orthosplit(copy.deepcopy(ft), cfg, reference=ref)
    layer = model.base_model.model.transformer.h[0].attn.c_attn
    assert layer.fan_in_fan_out and (layer.out_features, layer.in_features) == (96, 32)
    with torch.no_grad():
        assert torch.allclose(model(**ids).logits, ft(**ids).logits, atol=1e-5)
        with ortho_alpha(model, 0.0):
            assert torch.allclose(model(**ids).logits, ref(**ids).logits, atol=1e-5)
        model.save_pretrained(tmp_path / "ad")
        loaded = PeftModel.from_pretrained(copy.deepcopy(ft), tmp_path / "ad")
        with ortho_alpha(loaded, 0.0):
            assert torch.allclose(loaded(**ids).logits, ref(**ids).logits, atol=1e-5)


def test_train_ortho_trains_only_the_values_and_alpha_0_is_untouched():
    _, ft = _finetuned()
    x = _x()
    model = get_peft_model(copy.deepcopy(ft), OrthoSplitConfig(target_modules=["q", "out"], base_kind="int8",
                                                             density=0.2, train_ortho=True, values_dtype="float32"))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("ortho_values" in n for n in trainable)
    layer = model.base_model.model.q
    with torch.no_grad(), ortho_alpha(model, 0.0):
        y0 = model(x)
    model(x).pow(2).sum().backward()
    # the values' gradient is the dense weight gradient on the mask
    w_eff = layer.effective_weight("default").detach().requires_grad_(True)
    h = nn.functional.linear(x, w_eff, ft.q.bias)
    out = model.base_model.model.out(torch.tanh(h) * model.base_model.model.k(x))
    out.pow(2).sum().backward()
    idx = layer.ortho_index["default"].long()
    assert torch.allclose(layer.ortho_values["default"].grad, w_eff.grad.reshape(-1)[idx], rtol=1e-4, atol=1e-6)
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).step()
    with torch.no_grad(), ortho_alpha(model, 0.0):
        assert torch.allclose(model(x), y0, atol=1e-6)
    frozen = get_peft_model(copy.deepcopy(ft), OrthoSplitConfig(target_modules=["q"], base_kind="int8"))
    frozen.base_model.set_adapter("default")
    assert not any(p.requires_grad for p in frozen.parameters())


def test_alpha_0_skips_the_sparse_stream(monkeypatch):
    _, ft = _finetuned()
    model = get_peft_model(copy.deepcopy(ft), OrthoSplitConfig(target_modules=["q", "k", "out"], base_kind="int8"))
    set_ortho_alpha(model, 0.0)

    def boom(*a, **k):
        raise AssertionError("sparse work at alpha=0")

    monkeypatch.setattr(torch.sparse, "mm", boom)
    monkeypatch.setattr(torch.sparse, "addmm", boom)
    with torch.no_grad():
        model(_x())
    set_ortho_alpha(model, 1.0)
    with pytest.raises(AssertionError, match="sparse work"):
        model(_x())


def test_deepcopy_inference_mode_and_the_split_leaves_the_weights_alone():
    ref, ft = _finetuned()
    before = state_of(ft)
    model = orthosplit(copy.deepcopy(ft), OrthoSplitConfig(target_modules=["q", "k", "out"], base_kind="none", density=0.3),
                       reference=ref)
    for name in ("q", "k", "out"):  # the split works on copies (a regression: it once wrote anchors into W)
        assert torch.equal(getattr(model.base_model.model, name).get_base_layer().weight, before[f"{name}.weight"])
    with torch.no_grad():
        y = model(_x())  # builds the CSR cache
    twin = copy.deepcopy(model)  # torch cannot deep-copy CSR tensors: the caches start empty in the copy
    with torch.no_grad():
        assert torch.allclose(twin(_x()), y)
    with torch.inference_mode():
        fresh = get_peft_model(copy.deepcopy(ft), OrthoSplitConfig(target_modules=["q"], base_kind="int4"))
        fresh(_x())
    fresh(_x())


def test_fused_layout_matches_csr_and_follows_alpha():
    _, ft = _finetuned()
    x = _x()
    outs = {}
    for layout in ("csr", "fused"):
        model = get_peft_model(copy.deepcopy(ft), OrthoSplitConfig(target_modules=["q", "k", "out"], base_kind="int4",
                                                                 density=0.1, layout=layout))
        with torch.no_grad():
            outs[layout] = [model(x)]
            for a in (0.0, 0.5):
                with ortho_alpha(model, a):
                    outs[layout].append(model(x))
    for a, b in zip(outs["csr"], outs["fused"]):
        assert torch.allclose(a, b, atol=1e-5)
    # the fused layout keeps W and the fused weight only: its copy of B goes once the fused weight exists
    cache = model.base_model.model.q._ortho_cache["default"]
    assert "fused" in cache and "base" not in cache


def test_bitsandbytes_nf4_base_stream_on_cpu():
    bnb = pytest.importorskip("bitsandbytes")
    _, ft = _finetuned()
    x = _x()
    model = get_peft_model(copy.deepcopy(ft), OrthoSplitConfig(target_modules=["q"], base_kind="bnb_nf4", density=0.1))
    layer = model.base_model.model.q
    streams = layer._streams("default")
    assert isinstance(streams["module"], bnb.nn.Linear4bit)
    o = _dense(layer.ortho_index["default"], layer.ortho_values["default"], (12, 8))
    with torch.no_grad():
        assert torch.allclose(layer(x), x @ (streams["base"] + o).T + ft.q.bias, atol=1e-3)
        with ortho_alpha(model, 0):
            assert torch.allclose(layer(x), x @ streams["base"].T + ft.q.bias, atol=1e-3)
    # the residual the selector saw is W minus bitsandbytes' own rounding
    r = (ft.q.weight - streams["base"]).detach().reshape(-1)
    idx = layer.ortho_index["default"].long()
    assert torch.allclose(layer.ortho_values["default"].float(), r[idx], atol=1e-3)


# ------------------------------------------------------------------ bad input
def test_config_errors_name_field_value_and_fix():
    for bad in (0, 1, 1.5, -0.1, float("nan"), "0.1", True):
        with pytest.raises(ValueError, match=r"density must be a number strictly between 0 and 1.*got density="):
            OrthoSplitConfig(target_modules=["q"], density=bad)
    with pytest.raises(ValueError, match=r"base_kind must be one of .*got base_kind='int3'"):
        OrthoSplitConfig(target_modules=["q"], base_kind="int3")
    with pytest.raises(ValueError, match=r"selector must be one of .*got selector='hessian'"):
        OrthoSplitConfig(target_modules=["q"], selector="hessian")
    with pytest.raises(ValueError, match=r"layout='fused' needs a dense base stream.*use layout='csr'"):
        OrthoSplitConfig(target_modules=["q"], base_kind="bnb_nf4", layout="fused")
    with pytest.raises(ValueError, match="target_modules is required"):
        OrthoSplitConfig()


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("contrastive_lambda", float("inf"), r"contrastive_lambda must be a number >= 0, got contrastive_lambda=inf"),
        ("contrastive_lambda", "1", r"contrastive_lambda must be a number >= 0, got contrastive_lambda='1' \(str\)"),
        ("obs_damp", float("nan"), r"obs_damp must be a number > 0, got obs_damp=nan"),
        ("obs_damp", None, r"obs_damp must be a number > 0, got obs_damp=None"),
        ("density", float("inf"), r"density must be a number strictly between 0 and 1 .*got density=inf"),
        ("values_dtype", ["float16"], r"values_dtype must be one of .*got values_dtype=\['float16'\] \(list\)"),
        ("train_ortho", 1, r"train_ortho must be True or False, got train_ortho=1"),
        ("seed", "0", r"seed must be an integer, got seed='0' \(str\)"),
        ("target_modules", 5, r"target_modules must be a list of module names or one regex string, got target_modules=5"),
        ("modules_to_save", "lm_head", r"modules_to_save must be a list of module names, got "
                                       r"modules_to_save='lm_head' \(str\); e\.g\. \['lm_head'\]"),
        ("layers_to_transform", "1", r"layers_to_transform must be a layer index >= 0 or a list of them"),
        ("inference_mode", "true", r"inference_mode must be True or False, got inference_mode='true' \(str\)"),
        ("base_model_name_or_path", 1.5, r"base_model_name_or_path must be a string or None"),
    ],
)
def test_every_config_field_is_type_checked_by_name(field, value, message):
    kwargs = dict(target_modules=["q"])
    kwargs[field] = value
    with pytest.raises(ValueError, match=r"OrthoSplitConfig\." + message):
        OrthoSplitConfig(**kwargs)


def test_alpha_must_be_a_real_number():
    model = get_peft_model(Toy(), OrthoSplitConfig(target_modules=["q"]))
    for bad in ("0", None, float("nan"), float("inf"), True, [0.0]):
        with pytest.raises(ValueError, match=r"alpha must be a finite real number .* got"):
            set_ortho_alpha(model, bad)
    with pytest.raises(ValueError, match=r"alpha\['q'\] must be a finite real number"):
        set_ortho_alpha(model, {"q": "x"})
    with pytest.raises(ValueError, match=r"alpha names \['nope'\] match no OrthoSplit layer"):
        set_ortho_alpha(model, {"nope": 0.0})
    assert model.base_model.model.q.ortho_alpha["default"] == 1.0
    with pytest.raises(ValueError, match="has no OrthoSplit layers"):
        set_ortho_alpha(Toy(), 0.0)


def test_bad_inputs_to_orthosplit_leave_the_model_unchanged():
    ref, ft = _finetuned()
    before = state_of(ft)
    base_cfg = dict(target_modules=["q", "k"], base_kind="int8")
    other = Toy(d_in=6)
    with pytest.raises(ValueError, match=r"reference weight for layer 'q' has shape \(out, in\) = \(12, 6\), but the model's weight is \(12, 8\)"):
        orthosplit(ft, OrthoSplitConfig(**base_cfg), reference=other)
    with pytest.raises(ValueError, match=r"selector='obs' needs stats"):
        orthosplit(ft, OrthoSplitConfig(**base_cfg, selector="obs"))
    with pytest.raises(ValueError, match=r"selector='contrastive' needs forget and retain"):
        orthosplit(ft, OrthoSplitConfig(**base_cfg, selector="contrastive"), forget=None)
    with pytest.raises(ValueError, match=r"stats given but OrthoSplitConfig.selector='magnitude' does not use it"):
        orthosplit(ft, OrthoSplitConfig(**base_cfg), stats=object())
    with pytest.raises(ValueError, match=r"base_kind='none' .*residual is zero.*pass reference="):
        orthosplit(ft, OrthoSplitConfig(target_modules=["q"], base_kind="none"))
    with pytest.raises(ValueError, match="matches no module"):
        orthosplit(ft, OrthoSplitConfig(target_modules=["nope"]))
    with pytest.raises(ValueError, match=r"reference has no weight for 1 target layer\(s\): \['k'\]"):
        orthosplit(ft, OrthoSplitConfig(**base_cfg), reference={"q.weight": ref.q.weight})
    assert type(ft.q) is nn.Linear and same_state(state_of(ft), before)
    bert = tiny_bert()
    with pytest.raises(TypeError, match=r"cannot split .*word_embeddings.*not Embedding"):
        get_peft_model(bert, OrthoSplitConfig(target_modules=["query", "word_embeddings"]))
    assert not any(isinstance(m, OrthoSplitLayer) for m in bert.modules())


def test_empty_forget_set_is_refused():
    ft = _tiny_lm(0)
    cfg = OrthoSplitConfig(target_modules=["down_proj"], selector="contrastive")
    with pytest.raises(ValueError, match="the data set is empty"):
        entry_saliency(ft, [], cfg, kind="fisher")
    with pytest.raises(ValueError, match="empty data set"):
        EntrySaliency(kind="fisher", maps={}, batches=0)
    with pytest.raises(ValueError, match="kind='attribution' needs reference"):
        entry_saliency(ft, _lm_batches(1, 0), cfg, kind="attribution")


def test_export_to_lora_is_refused_with_advice(tmp_path):
    model = get_peft_model(Toy(), OrthoSplitConfig(target_modules=["q"]))
    with pytest.raises(ValueError, match=r"not a low-rank update.*merge_and_unload"):
        peft_ext.export_to_lora(model, tmp_path / "lora")
    assert not (tmp_path / "lora").exists()


def test_data_hungry_selector_without_data_refuses_to_run_until_loaded(tmp_path):
    _, ft = _finetuned()
    model = get_peft_model(copy.deepcopy(ft), OrthoSplitConfig(target_modules=["q"], selector="obs"))
    with pytest.raises(RuntimeError, match=r"has no split yet.*peft_ext.orthosplit"):
        model(_x())


def test_reference_split_of_a_bitsandbytes_4bit_model(tmp_path):
    """The reference shape check reads (out, in) from the layer, not from its packed 4-bit weight."""
    pytest.importorskip("bitsandbytes")
    from transformers import BertModel, BitsAndBytesConfig

    shapes = dict(hidden_size=64, intermediate_size=128)  # shapes bitsandbytes handles on every CPU (bnb_cpu.py)
    tiny_bert(**shapes).save_pretrained(tmp_path / "base")
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    model = BertModel.from_pretrained(tmp_path / "base", quantization_config=q, device_map="cpu").eval()
    peft_ext.disable_bnb_cpu_repack(model)  # compute in float32 on every CPU, so the two forwards compare tightly
    batch = {"input_ids": torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))}
    with torch.no_grad():
        y_q = model(**batch).last_hidden_state
    split = orthosplit(model, OrthoSplitConfig(target_modules=["query"], base_kind="none", density=0.1),
                       reference=tiny_bert(**shapes))
    layer = split.base_model.model.encoder.layer[0].attention.self.query
    assert type(layer.get_base_layer()).__name__ == "Linear4bit" and layer.ortho_anchor["default"].numel() > 0
    with torch.no_grad():  # full-precision base: alpha=1 is the 4-bit model's (dequantised) weight on and off the mask
        assert torch.allclose(split(**batch).last_hidden_state, y_q, atol=1e-3)


# ------------------------------------------------------------------ one initialisation protocol
def _layer_tensors(model, adapter="default"):
    return {n: (m.ortho_index[adapter].clone(), m.ortho_anchor[adapter].clone(), m.ortho_values[adapter].detach().clone())
            for n, m in peft_ext.ortho.ortho_layers(model)}


def _same_tensors(a, b):
    return a.keys() == b.keys() and all(torch.equal(x, y) for k in a for x, y in zip(a[k], b[k]))


def test_initialize_orthosplit_fills_the_placeholders_of_get_peft_model_as_the_one_call_does(tmp_path):
    ref, ft = _finetuned()
    cfg = OrthoSplitConfig(target_modules=["q", "k", "out"], base_kind="none", density=0.25, values_dtype="float32",
                           uses_reference=True)
    model = get_peft_model(copy.deepcopy(ft), cfg)
    assert not any(m.is_initialized("default") for _, m in peft_ext.ortho.ortho_layers(model))
    with pytest.raises(RuntimeError, match=r"^OrthoSplit adapter 'default' has no split yet.*: call "
                                           r"peft_ext\.initialize_orthosplit\(model, adapter_name='default', \.\.\.\)"):
        model(_x())
    with pytest.raises(ValueError, match=r"OrthoSplit adapter 'default' was never initialised \(3 layer\(s\).*"
                                         r"would hold no split\. Call peft_ext\.initialize_orthosplit"):
        model.save_pretrained(tmp_path / "placeholders")
    report = peft_ext.initialize_orthosplit(model, reference=ref, progress=False)
    one_call = orthosplit(copy.deepcopy(ft), cfg, reference=ref)
    assert _same_tensors(_layer_tensors(model), _layer_tensors(one_call))
    with torch.no_grad():
        assert torch.allclose(model(_x()), ft(_x()), atol=1e-6)  # full-precision base, reference: exact at alpha=1
    # the report, against closed forms: magnitude keeps the top-k |D|, so it holds their share of ||D||^2
    assert [lr.layer for lr in report.layers] == ["q", "k", "out"] and report.residual == "fine-tuning delta W - W_ref"
    d = (ft.q.weight - ref.q.weight).detach().reshape(-1).double()
    k = entry_count(0.25, 96)
    q = report.layers[0]
    assert (q.shape, q.entries, q.flags) == ([12, 8], k, [])
    assert q.residual_share == pytest.approx(float(d.abs().topk(k).values.pow(2).sum() / d.pow(2).sum()), rel=1e-6)
    assert q.max_value == pytest.approx(float(d.abs().max()), rel=1e-6)
    assert report.inputs == ["reference: a model"] and report.warnings == []
    text = str(report)
    assert "OrthoSplit adapter 'default' (selector magnitude, base none, density 0.25)" in text
    assert "3 layers, 0 flagged" in text and f"{q.residual_share:.1%}" in text
    report.save_json(tmp_path / "report.json")
    assert json.loads((tmp_path / "report.json").read_text()) == json.loads(report.to_json()) == report.to_dict()
    # a split adapter refuses a second split unless asked, and is unchanged by the refusal
    before = _layer_tensors(model)
    with pytest.raises(ValueError, match=r"'default' is already split \(3 of 3 layers.*reinitialize=True"):
        peft_ext.initialize_orthosplit(model, reference=ref, progress=False)
    assert _same_tensors(_layer_tensors(model), before)
    peft_ext.initialize_orthosplit(model, reference=ref, reinitialize=True, progress=False)
    assert _same_tensors(_layer_tensors(model), before)  # the same data gives the same split
    # saved and loaded, the flag comes back from the loaded mask
    model.save_pretrained(tmp_path / "ad")
    loaded = PeftModel.from_pretrained(copy.deepcopy(ft), tmp_path / "ad")
    assert all(m.is_initialized("default") for _, m in peft_ext.ortho.ortho_layers(loaded))
    assert _same_tensors(_layer_tensors(loaded), before)


def test_initialize_orthosplit_validates_everything_before_writing():
    ref, ft = _finetuned()
    batches = [_x(32, seed=s) for s in range(3)]
    stats, _ = peft_ext.collect_stats(ft, batches, target_modules=["q"], progress=False)
    cfg = OrthoSplitConfig(target_modules=["q", "k"], base_kind="int8", density=0.2, selector="obs")
    model = get_peft_model(copy.deepcopy(ft), cfg)
    placeholders = _layer_tensors(model)
    with pytest.raises(ValueError, match=r"selector='obs' needs stats: pass stats="):
        peft_ext.initialize_orthosplit(model, progress=False)
    with pytest.raises(ValueError, match=r"fisher given but OrthoSplitConfig.selector='obs' does not use it"):
        peft_ext.initialize_orthosplit(model, stats=stats, fisher=object(), progress=False)
    with pytest.raises(ValueError, match=r"stats has no statistics for target layer 'k'"):  # q is fine, k comes second
        peft_ext.initialize_orthosplit(model, stats=stats, progress=False)
    with pytest.raises(ValueError, match=r"reference has no weight for 1 target layer\(s\): \['k'\]"):
        peft_ext.initialize_orthosplit(model, stats=stats, reference={"q.weight": ref.q.weight}, progress=False)
    with pytest.raises(ValueError, match=r"model has no PEFT adapter named 'nope'"):
        peft_ext.initialize_orthosplit(model, stats=stats, adapter_name="nope")
    assert _same_tensors(_layer_tensors(model), placeholders)
    assert not any(m.is_initialized("default") for _, m in peft_ext.ortho.ortho_layers(model))
    # reference weights given to placeholders made without them: the split and the saved config take them
    stats, _ = peft_ext.collect_stats(ft, batches, target_modules=["q", "k"], progress=False)
    report = peft_ext.initialize_orthosplit(model, stats=stats, reference=ref, progress=False)
    assert model.peft_config["default"].uses_reference and cfg.uses_reference is False  # the user's config untouched
    assert report.inputs == ["reference: a model", "stats: input statistics of 2 layer(s)"]
    assert _same_tensors(_layer_tensors(model), _layer_tensors(orthosplit(copy.deepcopy(ft), cfg, reference=ref,
                                                                          stats=stats)))
    # a data-free adapter is split by get_peft_model from W alone: splitting it against a reference says how to
    data_free = get_peft_model(copy.deepcopy(ft), OrthoSplitConfig(target_modules=["q"], density=0.2))
    assert all(m.is_initialized("default") for _, m in peft_ext.ortho.ortho_layers(data_free))
    with pytest.raises(ValueError, match=r"already split .*by get_peft_model, as selector 'magnitude' needs no data"
                                         r".*create the adapter with OrthoSplitConfig\(uses_reference=True\)"):
        peft_ext.initialize_orthosplit(data_free, reference=ref, progress=False)
    uses_ref = get_peft_model(copy.deepcopy(ft), OrthoSplitConfig(target_modules=["q"], uses_reference=True))
    with pytest.raises(ValueError, match=r"created with OrthoSplitConfig.uses_reference=True: pass reference="):
        peft_ext.initialize_orthosplit(uses_ref, progress=False)


def test_empty_layers_are_flagged_in_the_report_and_warned_about():
    ref, ft = _finetuned()
    with torch.no_grad():
        ft.k.weight.copy_(ref.k.weight)  # k was not changed by the fine-tune: no delta to hold
    model = get_peft_model(copy.deepcopy(ft), OrthoSplitConfig(target_modules=["q", "k"], base_kind="none",
                                                               uses_reference=True))
    with pytest.warns(UserWarning, match=r"the ortho stream of 1 layer\(s\) holds only zeros .*\['k'\]") as caught:
        report = peft_ext.initialize_orthosplit(model, reference=ref, progress=False)
    assert caught[0].filename == __file__
    assert report.warnings == ["k: " + peft_ext.ortho.initialize.EMPTY] and "2 layers, 1 flagged" in str(report)
    assert report.layers[1].residual_share == 0.0 and report.layers[1].max_value == 0.0


def test_the_initialised_flag_follows_the_loaded_mask():
    """A state dict whose mask is a placeholder (all-zero indices) loads as not initialised, a real one as split."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    ref, ft = _finetuned()
    model = orthosplit(copy.deepcopy(ft), OrthoSplitConfig(target_modules=["q"], density=0.2), reference=ref)
    good = {k: v.clone() for k, v in get_peft_model_state_dict(model).items()}
    set_peft_model_state_dict(model, {k: torch.zeros_like(v) if "ortho_index" in k else v for k, v in good.items()})
    assert not model.base_model.model.q.is_initialized("default")
    with pytest.raises(RuntimeError, match="has no split yet"):
        model(_x())
    set_peft_model_state_dict(model, good)
    assert model.base_model.model.q.is_initialized("default")
    model(_x())


def test_a_failure_while_writing_the_splits_puts_every_layer_back(monkeypatch):
    ref, ft = _finetuned()
    model = get_peft_model(copy.deepcopy(ft), OrthoSplitConfig(target_modules=["q", "k"], base_kind="none",
                                                               uses_reference=True))
    before = _layer_tensors(model)
    write, calls = OrthoSplitLayer.write_split, []

    def fails_on_the_second_layer(self, name, split):
        calls.append(name)
        if len(calls) == 2:
            raise RuntimeError("out of memory")
        return write(self, name, split)

    monkeypatch.setattr(OrthoSplitLayer, "write_split", fails_on_the_second_layer)
    with pytest.raises(RuntimeError, match="out of memory"):
        peft_ext.initialize_orthosplit(model, reference=ref, progress=False)
    assert len(calls) == 4  # q written, k failed, then both put back
    assert _same_tensors(_layer_tensors(model), before)
    assert not any(m.is_initialized("default") for _, m in peft_ext.ortho.ortho_layers(model))


def test_delta_survival_closed_forms():
    from peft_ext.ortho.quant import delta_survival, summarise_survival

    # int4 per row, max|row| = 7: scale 1, codes are the integers
    before = torch.tensor([[7.0, 1.0, 2.0, -3.0]])
    tiny = before + torch.tensor([[0.0, 0.2, -0.1, 0.3]])  # below half a step, no boundary crossed
    s = delta_survival(before, tiny, "int4")
    assert s["changed"] == 0 and s["kept_sq"] == 0 and s["cross"] == 0
    assert s["delta_sq"] == pytest.approx(0.04 + 0.01 + 0.09)
    summ = summarise_survival([s])
    assert summ["kept_norm"] == 0 and summ["aligned"] == 0 and summ["changed_share"] == 0
    # one entry crosses a boundary (1.0 -> 1.6 rounds to 2): dQ = [0, 1, 0, 0], d = [0, 0.6, 0, 0]
    cross = before + torch.tensor([[0.0, 0.6, 0.0, 0.0]])
    s = delta_survival(before, cross, "int4")
    assert s["changed"] == 1 and s["kept_sq"] == pytest.approx(1.0) and s["cross"] == pytest.approx(0.6)
    assert s["error_sq"] == pytest.approx(0.16)
    summ = summarise_survival([s, delta_survival(before, tiny, "int4")])  # sums over weights, then shares
    assert summ["changed_share"] == pytest.approx(1 / 8)
    assert summ["kept_norm"] == pytest.approx((1.0 / (0.36 + 0.14)) ** 0.5)
    assert summ["aligned"] == pytest.approx(0.6 / 0.5)
    # "none" keeps every delta exactly
    w0, w1 = torch.randn(5, 6), torch.randn(5, 6)
    summ = summarise_survival([delta_survival(w0, w1, "none")])
    assert summ["kept_norm"] == pytest.approx(1) and summ["aligned"] == pytest.approx(1)
    assert summ["error_over_delta"] == 0 and summ["changed_share"] == 1
    with pytest.raises(ValueError, match="differ in shape"):
        delta_survival(w0, w1.T, "int4")
    with pytest.raises(ValueError, match="did not change"):
        summarise_survival([delta_survival(w0, w0, "int4")])
