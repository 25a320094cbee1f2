"""LoRA-X transfer: closed forms of the math, end to end on tiny BERTs (loaded back with vanilla PEFT), CLI, bad
input."""

from __future__ import annotations

import fnmatch
import json
import os
import shutil

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from torch import nn

from peft_ext import lorax
from peft_ext.cli import main
from peft_ext.linalg import top_k_svd
from peft_ext.lorax import (
    convert,
    delta_sigma_factors,
    energy_rank,
    index_aligned_factors,
    lora_norm2,
    project_factors,
    refactor,
    subspace_similarity,
    transfer,
)

from .conftest import tiny_bert, token_batches

K = 8  # subspace rank used on the tiny BERTs (hidden 32, intermediate 48): a real projection, not the identity
TARGETS = ["query", "value", "dense"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny matrices: on a shared 2-core machine, OpenMP spin-waiting makes each 32x32 op ~50x slower with 2 threads."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ------------------------------------------------------------------------------------------------ helpers
def orth(d: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(d, k, generator=g, dtype=torch.float64))[0]


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def top(w: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    u, _, vh = torch.linalg.svd(w.to(torch.float64), full_matrices=False)
    return u[:, :k], vh[:k].T


def dense_map(s: torch.Tensor, t: torch.Tensor, carry: bool) -> torch.Tensor:
    """M = P_t P_s + Q_t Q_s (or P_t), formed densely: the reference the low-rank code must equal."""
    eye = torch.eye(s.shape[0], dtype=torch.float64)
    pt, ps = t @ t.T, s @ s.T
    return pt @ ps + (eye - pt) @ (eye - ps) if carry else pt


def dense_transfer(dw, ws, wt, k, carry=True):
    us, vs = top(ws, k)
    ut, vt = top(wt, k)
    return dense_map(us, ut, carry) @ dw @ dense_map(vs, vt, carry).T


def lin_delta(tensors: dict) -> torch.Tensor:
    """B A of the converted `lin` layer (scale folded into the factors)."""
    key = "base_model.model.lin.lora_"
    return tensors[key + "B.weight"].double() @ tensors[key + "A.weight"].double()


def rel(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.detach().double(), y.detach().double()
    return float((x - y).norm() / y.norm())


# ------------------------------------------------------------------------------------------------ closed forms
@pytest.mark.parametrize("carry", [True, False])
def test_shared_subspace_receives_in_subspace_adapter_exactly(carry):
    out, inn, k, r = 20, 16, 5, 3
    u, v = orth(out, inn, 0), orth(inn, inn, 1)
    sig_s = torch.tensor([10.0, 9, 8, 7, 6] + [1.0 - 0.08 * i for i in range(inn - 5)], dtype=torch.float64)
    sig_t = torch.tensor([20.0, 6.5, 12, 7.5, 9] + [0.5 + 0.03 * i for i in range(inn - 5)], dtype=torch.float64)
    ws, wt = (u * sig_s) @ v.T, (u * sig_t) @ v.T  # W_t = U_s diag(sigma') V_s^T, same top-5 subspaces
    b, a = u[:, :k] @ randn(k, r, seed=2), randn(r, k, seed=3) @ v[:, :k].T  # delta W = U_s X V_s^T
    us, _, vs = top_k_svd(ws.float(), k)  # float32, as from base weights
    ut, _, vt = top_k_svd(wt.float(), k)
    bt, at = project_factors(b, a, *(x.double() for x in (us, vs, ut, vt)), carry_complement=carry)
    assert rel(bt @ at, b @ a) <= 1e-5


def test_carry_with_target_equal_to_source_is_the_identity():
    b, a = randn(24, 4, seed=0), randn(4, 18, seed=1)  # arbitrary: not inside any subspace
    us, vs = top(randn(24, 18, seed=2), 6)
    bt, at = project_factors(b, a, us, vs, us, vs, carry_complement=True)
    assert rel(bt @ at, b @ a) <= 1e-10
    bt, at = project_factors(b, a, us, vs, us, vs, carry_complement=False)
    assert rel(bt @ at, b @ a) > 0.1  # without the carry, the part outside the top subspace is lost


@pytest.mark.parametrize("carry", [True, False])
def test_low_rank_equals_dense_formula(carry):
    out, inn, k, r = 24, 18, 5, 3
    b, a = randn(out, r, seed=0), randn(r, inn, seed=1)
    us, vs = top(randn(out, inn, seed=2), k)
    ut, vt = top(randn(out, inn, seed=3), k)
    bt, at = project_factors(b, a, us, vs, ut, vt, carry_complement=carry)
    expected = dense_map(us, ut, carry) @ (b @ a) @ dense_map(vs, vt, carry).T
    assert rel(bt @ at, expected) <= 1e-10


def test_subspace_similarity_bounds_and_closed_forms():
    x = orth(50, 6, 0)
    assert subspace_similarity(x, x) == pytest.approx(1.0, abs=1e-12)
    assert subspace_similarity(x, x @ orth(6, 6, 1)) == pytest.approx(1.0, abs=1e-12)  # same span, rotated
    assert subspace_similarity(x[:, :3], x) == pytest.approx(1.0, abs=1e-12)  # divided by k = min(k_x, k_y)
    d, k = 400, 8
    phis = [subspace_similarity(orth(d, k, 10 + i), orth(d, k, 100 + i)) for i in range(20)]
    assert all(0.0 <= p <= 1.0 for p in phis)
    assert sum(phis) / len(phis) == pytest.approx(k / d, rel=0.25)  # E||X^T Y||_F^2 = k^2 / d for random spans


def test_energy_refactorisation_picks_the_planted_rank():
    sig = torch.tensor([10.0, 5.0, 2.0, 0.5, 0.1], dtype=torch.float64)
    qb, qa = orth(30, 5, 0), orth(20, 5, 1)
    b, a = qb * sig, qa.T  # s B A has singular values exactly sig
    e = sig**2
    for energy in (0.5, 0.9, 0.95, 0.99, 0.999, 1.0):
        expected = int((torch.cumsum(e, 0) / e.sum() < energy - 1e-12).sum()) + 1
        bn, an, s = refactor(b, a, 1.0, energy=energy)
        assert an.shape[0] == bn.shape[1] == expected == energy_rank(sig, energy)
        assert torch.allclose(s, sig, atol=1e-10)
        truncated = (qb[:, :expected] * sig[:expected]) @ qa[:, :expected].T
        assert rel(bn @ an, truncated) <= 1e-10
    assert [energy_rank(sig, x) for x in (0.95, 0.99)] == [2, 3]
    bn, an, _ = refactor(b, a, 2.0)  # default rank r: exact, scale folded into the factors
    assert an.shape[0] == 5 and rel(bn @ an, 2.0 * b @ a) <= 1e-10
    bn, an, _ = refactor(b, a, 1.0, rank=7)  # more than available: zero padding, still exact
    assert an.shape[0] == 7 and rel(bn @ an, b @ a) <= 1e-10
    assert lora_norm2(b, a) == pytest.approx(float((b @ a).norm() ** 2), rel=1e-10)


def test_delta_sigma_and_index_alignment_match_their_formulas():
    out, inn, k, r = 24, 18, 6, 3
    b, a = randn(out, r, seed=0), randn(r, inn, seed=1)
    dw = b @ a
    us, vs = top(randn(out, inn, seed=2), k)
    ut, vt = top(randn(out, inn, seed=3), k)
    bt, at = delta_sigma_factors(b, a, us, vs, ut, vt)
    expected = ut @ torch.diag(torch.diag(us.T @ dw @ vs)) @ vt.T
    assert rel(bt @ at, expected) <= 1e-10
    # different shapes: singular vectors matched by index on k <= every dimension
    ut2, vt2 = top(randn(30, 20, seed=4), 4)
    bt, at = index_aligned_factors(b, a, us, vs, ut2, vt2)
    assert rel(bt @ at, ut2 @ (us.T @ dw @ vs)[:4, :4] @ vt2.T) <= 1e-10


def test_pipeline_on_state_dicts_matches_formulas_and_baselines():
    """transfer() on in-memory bases: carry with target == source is exact; copy and delta-sigma as the formulas."""
    g = torch.Generator().manual_seed(0)
    ws = {"lin.weight": torch.randn(24, 18, generator=g)}
    model = get_peft_model(_Lin(), LoraConfig(r=3, lora_alpha=6, target_modules=["lin"]))
    with torch.no_grad():
        model.base_model.model.lin.weight.copy_(ws["lin.weight"])
        model.base_model.model.lin.lora_B["default"].weight.normal_(generator=g)
    b = model.base_model.model.lin.lora_B["default"].weight.detach().double()
    a = model.base_model.model.lin.lora_A["default"].weight.detach().double()
    dw = 2.0 * b @ a
    tensors, _, rep = transfer(model, ws, ws, subspace_rank=5, cache=False, progress=False)
    got = lin_delta(tensors)
    assert rel(got, dw) <= 1e-5 and rep.layers[0].phi_u == pytest.approx(1.0, abs=1e-6)
    assert rep.baselines["copy"]["energy_kept"] == pytest.approx(1.0, abs=1e-6)
    us, vs = top(ws["lin.weight"], 5)
    ds = torch.diag(us.T @ dw @ vs)
    top3 = ds.abs().sort(descending=True).values[:3]  # written at the source rank r = 3
    assert rep.baselines["delta-sigma"]["energy_kept"] == pytest.approx(float(top3.norm() / dw.norm()), rel=1e-4)
    wt = {"lin.weight": torch.randn(24, 18, generator=g)}
    tensors, _, rep = transfer(model, ws, wt, subspace_rank=5, rank=5, method="delta-sigma", cache=False, progress=False)
    ut, vt = top(wt["lin.weight"], 5)
    got = lin_delta(tensors)
    assert rel(got, ut @ torch.diag(ds) @ vt.T) <= 1e-4 and rep.layers[0].rank == 5
    tensors, _, rep = transfer(model, ws, wt, method="copy", cache=False, progress=False)
    got = lin_delta(tensors)
    assert rel(got, dw) <= 1e-5 and rep.layers[0].action == "copied"
    # low similarity (random target: phi ~ k/d): the user's choice decides
    tensors, _, rep = transfer(model, ws, wt, subspace_rank=5, min_similarity=0.99, on_low_similarity="copy",
                               cache=False, progress=False)
    got = lin_delta(tensors)
    assert rel(got, dw) <= 1e-5 and rep.layers[0].action == "copied" and rep.summary["copied"] == 1
    _, _, rep = transfer(model, ws, wt, subspace_rank=5, min_similarity=0.99, cache=False, progress=False)
    assert rep.layers[0].action == "kept" and rep.summary["transferred"] == 1
    with pytest.raises(ValueError, match=r"every layer fell below min_similarity=0\.99.*on_low_similarity='keep'"):
        transfer(model, ws, wt, subspace_rank=5, min_similarity=0.99, on_low_similarity="drop", cache=False,
                 progress=False)


class _Lin(nn.Module):
    def __init__(self, out: int = 24, inn: int = 18) -> None:
        super().__init__()
        self.lin = nn.Linear(inn, out, bias=False)

    def forward(self, x):
        return self.lin(x)


def test_shape_mismatch_refused_by_default_and_experimental_when_allowed():
    model = get_peft_model(_Lin(), LoraConfig(r=3, target_modules=["lin"]))
    with torch.no_grad():
        model.base_model.model.lin.lora_B["default"].weight.normal_()
    ws = {"lin.weight": randn(24, 18, seed=0).float()}
    wt = {"lin.weight": randn(30, 20, seed=1).float()}
    with pytest.raises(ValueError, match=r"'lin'.*\(24, 18\).*\(30, 20\).*allow_shape_mismatch"):
        transfer(model, ws, wt, cache=False, progress=False)
    with pytest.warns(UserWarning, match="EXPERIMENTAL"):
        tensors, _, rep = transfer(model, ws, wt, subspace_rank=4, allow_shape_mismatch=True, cache=False, progress=False)
    assert rep.settings["experimental"] and rep.settings["shape_mismatch_layers"] == ["lin"]
    assert rep.layers[0].shape == [30, 20] and "EXPERIMENTAL" in str(rep)
    b = model.base_model.model.lin.lora_B["default"].weight.double()
    a = model.base_model.model.lin.lora_A["default"].weight.double()
    us, vs = top(ws["lin.weight"], 4)
    ut, vt = top(wt["lin.weight"], 4)
    got = lin_delta(tensors)
    assert rel(got, ut @ (us.T @ (b @ a * 8 / 3) @ vs) @ vt.T) <= 1e-4


# ------------------------------------------------------------------------------------------------ tiny BERTs
def _scale(name: str) -> float:
    """lora_alpha=8, r=4, alpha_pattern {query: 16}, rank_pattern {value: 2} (written out, not taken from the code)."""
    if name.endswith("query"):
        return 16 / 4
    if name.endswith("value"):
        return 8 / 2
    return 8 / 4


@pytest.fixture
def berts(tmp_path):
    """src (saved), tgt (layer 0 identical, layer 1 and pooler perturbed; saved sharded) and a random-B adapter."""
    from transformers import BertModel

    src, tgt, ad = tmp_path / "src", tmp_path / "tgt", tmp_path / "adapter"
    tiny_bert().save_pretrained(src)
    target = BertModel.from_pretrained(src)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in target.named_parameters():
            if n.startswith(("encoder.layer.1.", "pooler.")) and n.endswith("weight") and p.dim() == 2:
                p.add_(torch.randn(p.shape, generator=g) * 0.02)
    target.save_pretrained(tgt, max_shard_size="20KB")
    model = get_peft_model(BertModel.from_pretrained(src), LoraConfig(
        r=4, lora_alpha=8, target_modules=TARGETS, alpha_pattern={"query": 16}, rank_pattern={"value": 2}))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1, generator=g)
    model.save_pretrained(ad)
    return src, tgt, ad


def _state(path) -> dict:
    from transformers import BertModel

    return {k: v.detach().clone() for k, v in BertModel.from_pretrained(path).state_dict().items()}


def _expected_model(src, tgt, ad, k=K, carry=True, skip=()):
    """The target BertModel with every layer's dense-formula delta W_t merged in."""
    from transformers import BertModel

    ws, wt = _state(src), _state(tgt)
    tensors = load_file(os.path.join(ad, "adapter_model.safetensors"))
    model = BertModel.from_pretrained(tgt).eval()
    params = dict(model.named_parameters())
    for key in tensors:
        if ".lora_A." not in key:
            continue
        name = key[len("base_model.model."):].split(".lora_A")[0]
        if name in skip:
            continue
        dw = _scale(name) * tensors[key.replace("lora_A", "lora_B")].double() @ tensors[key].double()
        w = name + ".weight"
        with torch.no_grad():
            params[w].add_(dense_transfer(dw, ws[w], wt[w], k, carry).float())
    return model


def _outputs(model) -> torch.Tensor:
    batch = token_batches(n_batches=1, seed=3)[0]
    with torch.no_grad():
        return model(**batch).last_hidden_state


def _load(tgt, out):
    from transformers import BertModel

    return PeftModel.from_pretrained(BertModel.from_pretrained(tgt), out).eval()


def _no_temp_dirs(parent) -> bool:
    return not [p for p in os.listdir(parent) if ".tmp-" in p]


@pytest.mark.parametrize("carry", [True, False])
def test_end_to_end_vanilla_peft_matches_dense_prediction(berts, tmp_path, carry):
    src, tgt, ad = berts
    out = tmp_path / "out"
    report = convert(ad, src, tgt, out, subspace_rank=K, carry_complement=carry, cache_dir=str(tmp_path / "c"),
                     progress=False)
    got, expected = _outputs(_load(tgt, out)), _outputs(_expected_model(src, tgt, ad, carry=carry))
    assert (got - expected).abs().max() < 1e-4
    assert (got - _outputs(_load(tgt, ad))).abs().max() > 1e-3  # the transfer is not a no-op copy
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["base_model_name_or_path"] == os.path.abspath(tgt)
    assert set(cfg["target_modules"]) == set(TARGETS) and not cfg["use_rslora"]
    src_keys = set(load_file(ad / "adapter_model.safetensors"))
    assert set(load_file(out / "adapter_model.safetensors")) == src_keys
    data = json.loads((out / "lorax_report.json").read_text())
    assert set(data) == {"method", "source_base", "target_base", "adapter", "settings", "layers", "summary",
                         "baselines"}
    assert set(data["layers"][0]) == {"name", "shape", "phi_u", "phi_v", "energy_kept", "rank", "action"}
    assert set(data["summary"]) == {"layers", "transferred", "dropped", "copied", "mean_phi_u", "mean_phi_v",
                                    "energy_kept"}
    assert set(data["baselines"]) == {"copy", "delta-sigma"} and data["summary"]["layers"] == len(src_keys) // 2
    by_name = {lt["name"]: lt for lt in data["layers"]}
    same = by_name["encoder.layer.0.attention.self.query"]
    assert same["phi_u"] == pytest.approx(1.0, abs=1e-5) and same["shape"] == [32, 32]
    assert same["rank"] == 4 and by_name["encoder.layer.0.attention.self.value"]["rank"] == 2
    if carry:
        assert same["energy_kept"] == pytest.approx(1.0, abs=1e-5)
    assert 0 < by_name["encoder.layer.1.attention.self.query"]["phi_u"] < 0.95
    assert (out / "lorax_report.md").read_text().startswith("# LoRA-X transfer report")
    assert "energy kept" in str(report) and _no_temp_dirs(tmp_path)


def test_energy_option_writes_per_layer_ranks_that_peft_loads(berts, tmp_path):
    src, tgt, ad = berts
    out = tmp_path / "out"
    report = convert(ad, src, tgt, out, subspace_rank=K, energy=0.7, cache=False, progress=False)
    ranks = {lt.name: lt.rank for lt in report.layers}
    assert len(set(ranks.values())) > 1
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == max(ranks.values()) and cfg["rank_pattern"]
    plain = _load(tgt, out)
    for name, rank in ranks.items():
        layer = plain.base_model.model.get_submodule(name)
        assert layer.r["default"] == rank and layer.scaling["default"] == 1.0
    # what vanilla PEFT computes equals the written factors merged into the target
    from transformers import BertModel

    merged = BertModel.from_pretrained(tgt).eval()
    tensors = load_file(out / "adapter_model.safetensors")
    params = dict(merged.named_parameters())
    with torch.no_grad():
        for name in ranks:
            key = f"base_model.model.{name}.lora_"
            params[name + ".weight"].add_(tensors[key + "B.weight"] @ tensors[key + "A.weight"])
    assert (_outputs(plain) - _outputs(merged)).abs().max() < 1e-5
    assert 0.7 <= report.summary["energy_kept"] <= 1.0


def test_cli_convert_with_low_similarity_drop(berts, tmp_path, capsys):
    src, tgt, ad = berts
    out = tmp_path / "out"
    argv = ["lorax", "convert", "--adapter", str(ad), "--source-base", str(src), "--target-base", str(tgt),
            "--out", str(out), "--subspace-rank", str(K), "--min-similarity", "0.9", "--on-low-similarity", "drop",
            "--cache-dir", str(tmp_path / "cache")]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "dropped" in printed and "wrote a LoRA adapter" in printed and "φ_U" in printed
    data = json.loads((out / "lorax_report.json").read_text())
    actions = {lt["name"]: lt["action"] for lt in data["layers"]}
    dropped = sorted(n for n, a in actions.items() if a == "dropped")
    assert dropped and all(n.startswith(("encoder.layer.1.", "pooler.")) for n in dropped)
    assert all(a == "transferred" for n, a in actions.items() if n.startswith("encoder.layer.0."))
    assert data["summary"]["dropped"] == len(dropped) and data["settings"]["min_similarity"] == 0.9
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert set(cfg["exclude_modules"]) == set(dropped)
    plain = _load(tgt, out)
    assert not hasattr(plain.base_model.model.get_submodule(dropped[0]), "lora_A")
    expected = _expected_model(src, tgt, ad, skip=set(dropped))
    assert (_outputs(plain) - _outputs(expected)).abs().max() < 1e-4
    assert main(argv) == 1
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert main(argv + ["--overwrite", "--quiet", "--method", "copy"]) == 0
    assert "φ_U" not in capsys.readouterr().out
    assert json.loads((out / "lorax_report.json").read_text())["method"] == "copy"


def test_peft_model_module_and_state_dict_inputs(berts, tmp_path):
    from transformers import BertModel

    src, tgt, ad = berts
    peft_model = PeftModel.from_pretrained(BertModel.from_pretrained(src), ad)
    from_paths, _, _ = transfer(ad, src, tgt, subspace_rank=K, cache=False, progress=False)
    from_objects, config, report = transfer(peft_model, BertModel.from_pretrained(src), _state(tgt), subspace_rank=K,
                                            cache=False, progress=False)
    assert from_paths.keys() == from_objects.keys()
    assert all(torch.allclose(from_paths[k], from_objects[k], atol=1e-6) for k in from_paths)
    assert report.adapter == "<PeftModel adapter 'default'>" and report.target_base == "<state dict>"
    assert config.base_model_name_or_path is None


def test_target_name_names_a_module_target_and_a_nameless_one_warns(berts):
    src, tgt, ad = berts
    with pytest.warns(UserWarning, match=r"names no base model .* pass target_name= \(--target-name\)"):
        transfer(ad, src, _state(tgt), subspace_rank=K, cache=False, progress=False)
    _, config, report = transfer(ad, src, _state(tgt), subspace_rank=K, cache=False, progress=False,
                                 target_name="org/model-v2")
    assert config.base_model_name_or_path == "org/model-v2" and report.settings["target_name"] == "org/model-v2"
    _, config, _ = transfer(ad, src, tgt, subspace_rank=K, cache=False, progress=False, target_name="org/other")
    assert config.base_model_name_or_path == "org/other"  # an explicit name wins over the target's folder
    with pytest.raises(ValueError, match=r"target_name='  ' must be a non-empty string"):
        transfer(ad, src, tgt, target_name="  ")


def test_svd_cache_keeps_within_its_size_limit_least_recently_used_first(berts, tmp_path):
    src, tgt, ad = berts
    cache = tmp_path / "cache"
    first = convert(ad, src, tgt, tmp_path / "o1", subspace_rank=K, cache_dir=str(cache), progress=False)
    entries = sorted(cache.iterdir())
    sizes = {p.name: p.stat().st_size for p in entries}
    (cache / "notes.txt").write_text("not ours")  # a file the cache did not write is never counted or removed
    # make the entries' ages distinct and known: the first listed is the oldest
    for i, p in enumerate(entries):
        os.utime(p, (1_000_000 + i, 1_000_000 + i))
    svd = lorax.SvdCache(str(cache), lorax.TransferOptions(cache_max_gb=(sum(sizes.values()) - 1) / 1e9))
    svd.prune()
    left = sorted(p.name for p in cache.iterdir())
    assert svd.evicted == 1 and entries[0].name not in left and "notes.txt" in left
    assert first.settings["cache_max_gb"] == 10.0
    with pytest.raises(ValueError, match=r"cache_max_gb=0 must be a finite number of GB > 0"):
        lorax.TransferOptions(cache_max_gb=0)


def test_fan_in_fan_out_conv1d_layers():
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=1, n_head=2)
    src = GPT2Model(cfg).eval()
    model = get_peft_model(GPT2Model(cfg), LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True))
    with torch.no_grad():
        model.base_model.model.load_state_dict(src.state_dict(), strict=False)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_()
    tgt = {k: v + 0.02 * torch.randn_like(v) if v.dim() == 2 else v for k, v in src.state_dict().items()}
    tensors, _, rep = transfer(model, src, tgt, subspace_rank=K, cache=False, progress=False)
    key = "base_model.model.h.0.attn.c_attn.lora_"
    layer = model.base_model.model.h[0].attn.c_attn
    dw = layer.scaling["default"] * layer.lora_B["default"].weight.double() @ layer.lora_A["default"].weight.double()
    ws, wt = src.state_dict()["h.0.attn.c_attn.weight"].T, tgt["h.0.attn.c_attn.weight"].T  # Conv1D: (in, out)
    got = tensors[key + "B.weight"].double() @ tensors[key + "A.weight"].double()
    assert rep.layers[0].shape == [96, 32] and rel(got, dense_transfer(dw, ws, wt, K)) <= 1e-4


def test_hub_ids_download_only_what_is_needed(berts, tmp_path, monkeypatch):
    """Repo ids go through huggingface_hub.snapshot_download (so HF_ENDPOINT/offline apply) with allow_patterns."""
    import huggingface_hub

    src, tgt, ad = berts
    cfg_path = ad / "adapter_config.json"
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "base_model_name_or_path": "org/src"}))
    repos = {"org/src": src, "org/tgt": tgt, "me/adapter": ad}
    calls = []

    def fake_snapshot_download(repo_id, allow_patterns=None, **kw):
        calls.append((repo_id, list(allow_patterns)))
        if repo_id not in repos:
            raise huggingface_hub.errors.RepositoryNotFoundError(f"{repo_id} not found")
        local = tmp_path / "hub" / repo_id.replace("/", "--")
        local.mkdir(parents=True, exist_ok=True)
        for f in os.listdir(repos[repo_id]):
            if any(fnmatch.fnmatch(f, p) for p in allow_patterns):
                shutil.copy(repos[repo_id] / f, local / f)
        return str(local)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    report = convert("me/adapter", "org/src", "org/tgt", tmp_path / "out", subspace_rank=K, cache=False, progress=False)
    assert report.target_base == "org/tgt" and report.adapter == "me/adapter"
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["base_model_name_or_path"] == "org/tgt"
    tgt_calls = [p for r, p in calls if r == "org/tgt"]
    assert tgt_calls[0] == ["model.safetensors.index.json", "model.safetensors", "config.json"]
    needed = {json.loads((tgt / "model.safetensors.index.json").read_text())["weight_map"][f"{n}.weight"]
              for n in (lt.name for lt in report.layers)}
    assert set(tgt_calls[1]) == needed  # only the shards holding adapter layers
    assert all("safetensors" not in p or p == "adapter_model.safetensors" for r, p in calls if r == "me/adapter")
    with pytest.raises(ValueError, match=r"target_base='org/missing'.*not a local directory.*HF_ENDPOINT"):
        convert("me/adapter", "org/src", "org/missing", tmp_path / "out2", cache=False, progress=False)


# ------------------------------------------------------------------------------------------------ cache
def test_svd_cache_hits_on_second_run_and_misses_when_weights_change(berts, tmp_path, monkeypatch):
    src, tgt, ad = berts
    calls = []
    real = lorax.top_k_svd
    monkeypatch.setattr(lorax, "top_k_svd", lambda w, k, **kw: calls.append(tuple(w.shape)) or real(w, k, **kw))
    cache = str(tmp_path / "cache")
    first = convert(ad, src, tgt, tmp_path / "o1", subspace_rank=K, cache_dir=cache, progress=False)
    n_layers = len(first.layers)
    # 11 layers; layer 0 (5 layers) is identical in both bases, so in-run memoisation needs one SVD for those
    assert len(calls) == 2 * n_layers - 5 and first.settings["svd_computed"] == len(calls)
    files = os.listdir(cache)
    assert len(files) == len(calls) and all(f.endswith(".safetensors") and not f.startswith(".") for f in files)
    calls.clear()
    second = convert(ad, src, tgt, tmp_path / "o2", subspace_rank=K, cache_dir=cache, progress=False)
    assert calls == [] and second.settings["svd_cache_hits"] == 2 * n_layers
    for a, b in zip(second.layers, first.layers):  # same SVDs: the same report (up to BLAS round-off)
        assert (a.name, a.rank, a.action) == (b.name, b.rank, b.action)
        assert (a.phi_u, a.phi_v, a.energy_kept) == pytest.approx((b.phi_u, b.phi_v, b.energy_kept), abs=1e-12)
    # change one target weight in place (same file name and size): only that SVD is recomputed
    from transformers import BertModel

    model = BertModel.from_pretrained(tgt)
    with torch.no_grad():
        model.encoder.layer[1].attention.self.query.weight.mul_(1.5)
    model.save_pretrained(tgt, max_shard_size="20KB")
    convert(ad, src, tgt, tmp_path / "o3", subspace_rank=K, cache_dir=cache, progress=False)
    assert calls == [(32, 32)]
    calls.clear()
    convert(ad, src, tgt, tmp_path / "o4", subspace_rank=K + 1, cache_dir=cache, progress=False)  # k is in the key
    assert len(calls) == 2 * n_layers - 5


# ------------------------------------------------------------------------------------------------ atomic output
def test_failure_midway_leaves_no_output(berts, tmp_path, monkeypatch):
    src, tgt, ad = berts
    out = tmp_path / "out"
    real_get, seen = lorax.BaseWeights.get, []

    def late_failure(self, key):
        seen.append(key)
        if len(seen) == 9:  # a layer that turns out to be unreadable late in the run
            raise KeyError(f"{key} vanished from {self.role}")
        return real_get(self, key)

    monkeypatch.setattr(lorax.BaseWeights, "get", late_failure)
    with pytest.raises(KeyError, match="vanished"):
        convert(ad, src, tgt, out, subspace_rank=K, cache=False, progress=False)
    assert not out.exists() and _no_temp_dirs(tmp_path)
    monkeypatch.setattr(lorax.BaseWeights, "get", real_get)

    def broken_writer(path, report):
        raise OSError("disk full")

    monkeypatch.setattr(lorax, "_write_markdown", broken_writer)
    with pytest.raises(OSError, match="disk full"):
        convert(ad, src, tgt, out, subspace_rank=K, cache=False, progress=False)
    assert not out.exists() and _no_temp_dirs(tmp_path)
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(OSError, match="disk full"):  # overwrite: the old directory survives a failed write
        convert(ad, src, tgt, out, subspace_rank=K, cache=False, progress=False, overwrite=True)
    assert (out / "keep.txt").read_text() == "old" and _no_temp_dirs(tmp_path)
    monkeypatch.undo()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        convert(ad, src, tgt, out, cache=False, progress=False)
    convert(ad, src, tgt, out, subspace_rank=K, cache=False, progress=False, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "adapter_model.safetensors").exists()


# ------------------------------------------------------------------------------------------------ bad input
def test_base_mismatch_refused_unless_forced(berts, tmp_path, capsys):
    src, tgt, ad = berts
    with pytest.raises(ValueError, match=r"base_model_name_or_path=.*src.*differs from source_base=.*tgt.*force"):
        transfer(ad, tgt, tgt, cache=False, progress=False)
    transfer(ad, tgt, tgt, subspace_rank=K, force=True, cache=False, progress=False)
    transfer(ad, _state(tgt), tgt, subspace_rank=K, cache=False, progress=False)  # a state dict skips the check
    capsys.readouterr()  # the loading bars above
    assert main(["lorax", "convert", "--adapter", str(ad), "--source-base", str(tgt), "--target-base", str(tgt),
                 "--out", str(tmp_path / "o"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("peft-ext: error: ") and err.count("\n") == 1 and "differs from source_base" in err, err
    assert not (tmp_path / "o").exists()


def test_missing_layers_named_with_the_base(berts):
    src, tgt, ad = berts
    target = _state(tgt)
    del target["encoder.layer.1.attention.self.query.weight"]
    with pytest.raises(ValueError, match=r"1 adapter layers have no weight in target_base='<state dict>': "
                                         r"encoder\.layer\.1\.attention\.self\.query;"):
        transfer(ad, src, target, cache=False, progress=False)


@pytest.mark.parametrize("peft_type", ["NULLSPACE_LORA", "SUBSPACE_LORA", "IA3"])
def test_non_lora_adapters_refused(tmp_path, peft_type):
    import re

    ad, src = str(tmp_path / "ad"), str(tmp_path / "src")
    os.mkdir(ad)
    with open(os.path.join(ad, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": peft_type}, f)
    message = (f"no conversion path from {peft_type}" if peft_type == "IA3"
               else re.escape(f"`peft-ext export-lora {ad} {ad}-lora --base {src}`"))
    with pytest.raises(ValueError, match=message):
        transfer(ad, src, {}, progress=False)
    if peft_type == "NULLSPACE_LORA":  # the same adapter type as an in-memory PeftModel
        from peft_ext import NullSpaceLoraConfig

        model = get_peft_model(tiny_bert(), NullSpaceLoraConfig(r=2, target_modules=["query"]))
        with pytest.raises(ValueError, match=r"NULLSPACE_LORA.*peft_ext\.export_to_lora\(model, LORA_DIR"):
            transfer(model, {}, {}, progress=False)


@pytest.mark.parametrize("kwargs,message", [
    (dict(use_dora=True), r"DoRA \(use_dora=True\)"),
    (dict(target_modules=["word_embeddings"]), r"'embeddings\.word_embeddings' is a LoRA on an embedding"),
    (dict(modules_to_save=["pooler"]), r"not LoRA factors.*modules_to_save=\['pooler'\].*drop_modules_to_save"),
    (dict(lora_bias=True), r"lora_bias=True"),
])
@pytest.mark.filterwarnings("ignore:Adapter 'default'.*invalid shape")  # PEFT's own note on lora_bias tensors
def test_untransferable_adapters_refused(kwargs, message):
    base = tiny_bert()
    model = get_peft_model(tiny_bert(), LoraConfig(**{"r": 2, "target_modules": ["query"], **kwargs}))
    with pytest.raises(ValueError, match=message):
        transfer(model, base, base, cache=False, progress=False)
    if "modules_to_save" in kwargs:
        _, config, _ = transfer(model, base, base, subspace_rank=4, drop_modules_to_save=True, cache=False, progress=False)
        assert config.modules_to_save is None


def test_conv_lora_refused():
    class Conv(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

    base = Conv()
    model = get_peft_model(Conv(), LoraConfig(r=2, target_modules=["conv"]))
    with pytest.raises(ValueError, match=r"'conv' has a 4-D lora_A.*convolution"):
        transfer(model, base, base, cache=False, progress=False)


@pytest.mark.parametrize("options,message", [
    (dict(rank=33), r"rank=33 exceeds layer 'encoder\.layer\.0\.attention\.output\.dense'.*min\(out, in\) = 32"),
    (dict(min_similarity=1.5), r"min_similarity=1\.5 must be in \[0, 1\]"),
    (dict(method="svd"), r"method='svd' is unknown; choose one of lorax, copy, delta-sigma"),
    (dict(on_low_similarity="skip"), r"on_low_similarity='skip' is unknown; choose one of keep, drop, copy"),
    (dict(rank=2, energy=0.9), r"rank=2 and energy=0\.9 both given"),
    (dict(energy=0.0), r"energy=0\.0 must be .* in \(0, 1\]"),
    (dict(subspace_rank=0), r"subspace_rank=0 must be an integer >= 1"),
])
def test_bad_options_refused_before_any_work(berts, tmp_path, options, message):
    src, tgt, ad = berts
    with pytest.raises(ValueError, match=message):
        convert(ad, src, tgt, tmp_path / "out", cache=False, progress=False, **options)
    assert not (tmp_path / "out").exists()


def test_cli_convert_and_push_to_a_hub_then_load_by_repo_id(berts, tmp_path, hub_server, capsys):
    src, tgt, ad = berts
    out = tmp_path / "o"
    assert main(["lorax", "convert", "--adapter", str(ad), "--source-base", str(src), "--target-base", str(tgt),
                 "--out", str(out), "--push-to-hub", "not a repo"]) == 2
    assert "peft-ext: error: --push-to-hub='not a repo' is not a Hub repo id" in capsys.readouterr().err
    assert not out.exists() and hub_server.repo_ids() == []
    # the target base is a local folder: the converted adapter is written, the push refused (it would record a path)
    assert main(["lorax", "convert", "--adapter", str(ad), "--source-base", str(src), "--target-base", str(tgt),
                 "--out", str(out), "--subspace-rank", str(K), "--quiet", "--push-to-hub", "tester/style-v2"]) == 1
    assert "(--base-model)" in capsys.readouterr().err and (out / "adapter_model.safetensors").is_file()
    hub_server.add_repo("tester/tgt", {"README.md": b"---\nlicense: mit\n---\n"})  # the target base, on the Hub
    assert main(["push", str(out), "tester/style-v2", "--base-model", "tester/tgt"]) == 0
    assert "pushed" in capsys.readouterr().out
    pulled = _load(tgt, "tester/style-v2")  # PeftModel.from_pretrained by repo id, through the local Hub
    assert (_outputs(pulled) - _outputs(_load(tgt, out))).abs().max() == 0
    from huggingface_hub import hf_hub_download

    card = open(hf_hub_download("tester/style-v2", "README.md")).read()
    assert "lora-x" in card and "φ" in card and "encoder.layer.0.attention.self.query" in card
