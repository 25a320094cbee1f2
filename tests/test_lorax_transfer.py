"""recipes/lorax_transfer.py: the statistics against closed forms (recovery, its bootstrap, the phi filter, the
'recovers down to phi' rule), flags refused with one-line errors, and one --quick end-to-end run on the real MiniLM
with an identical target (noise 0) beside real ones, resumed after a unit is lost. On the identical target the
transfers must give back the source adapter exactly, so the same test predictions as training on that target."""

import json
import math
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "recipes"))

import lorax_transfer as lt  # noqa: E402

# ------------------------------------------------------------------------------------------------ closed forms


def test_recovery_closed_form():
    assert lt.recovery(0.8, 0.6, 0.7) == pytest.approx(2.0)
    assert lt.recovery(0.65, 0.6, 0.7) == pytest.approx(0.5)
    assert lt.recovery(0.6, 0.6, 0.7) == 0.0
    assert math.isnan(lt.recovery(0.9, 0.6, 0.6))  # no gain from training on the target: nothing to recover
    assert math.isnan(lt.recovery(0.9, 0.6, 0.5))


def test_recovery_ci_ratio_of_means_and_its_extremes():
    none = [0, 0, 0, 0, 1, 1, 1, 1]
    trained = [[1, 1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 1, 1, 1, 1]]  # gains 4/8 and 3/8
    same = lt.recovery_ci(trained, trained, none, 200)
    assert same["mean"] == 1.0 and same["lo"] == 1.0 and same["hi"] == 1.0 and same["resolved"]
    zero = lt.recovery_ci([none, none], trained, none, 200)
    assert zero["mean"] == 0.0 and zero["lo"] == 0.0 and zero["hi"] == 0.0
    half = [[1, 1, 0, 0, 1, 1, 1, 1], [1, 0, 0, 0, 1, 1, 1, 1]]  # gains 2/8 and 1/8: (2 + 1) / (4 + 3)
    r = lt.recovery_ci(half, trained, none, 500)
    assert r["mean"] == pytest.approx(3 / 7)
    assert r["per_seed"] == pytest.approx([0.5, 1 / 3])
    assert r["lo"] <= 3 / 7 <= r["hi"] and r["gain"]["mean"] == pytest.approx(7 / 16)
    # a ceiling that does not beat no adapter: unresolved, never a number
    flat = lt.recovery_ci([none, none], [none, none], none, 100)
    assert not flat["resolved"] and math.isnan(flat["lo"]) and math.isnan(flat["mean"])


def test_recovery_difference_is_paired_and_zero_for_identical_arms():
    none = [0, 0, 0, 0, 1, 1, 1, 1]
    trained = [[1, 1, 1, 1, 1, 1, 1, 1]]
    half = [[1, 1, 0, 0, 1, 1, 1, 1]]
    d = lt.recovery_difference_ci(trained, trained, half, trained, none, 300)
    assert d["mean"] == pytest.approx(0.5) and d["lo"] <= 0.5 <= d["hi"]
    z = lt.recovery_difference_ci(half, trained, half, trained, none, 300)
    assert (z["mean"], z["lo"], z["hi"]) == (0.0, 0.0, 0.0)


def test_phi_filter_keeps_layers_at_or_above_the_threshold_on_both_sides():
    assert lt.phi_filter_keeps([0.95, 0.95, 0.85, 0.9], [0.95, 0.8, 0.95, 0.9], 0.9) == [True, False, False, True]
    assert lt.phi_filter_keeps([0.1], [0.1], 0.0) == [True]


def test_recovers_down_to_walks_from_the_closest_target():
    r = lambda m, lo: {"mean": m, "lo": lo}  # noqa: E731
    pts = [(0.99, r(1.0, 0.95)), (0.90, r(0.95, 0.80)), (0.97, r(0.97, 0.92)), (0.8, r(0.5, 0.3))]
    d = lt.recovers_down_to(pts, 0.9)
    assert d["ci"] == 0.97 and d["first_fail_ci"] == 0.90
    assert d["point"] == 0.90 and d["first_fail_point"] == 0.8
    none = lt.recovers_down_to([(0.99, r(0.5, math.nan))], 0.9)
    assert none["ci"] is None and none["first_fail_ci"] == 0.99


# ------------------------------------------------------------------------------------------------ flags


@pytest.mark.parametrize("peak, grid, tried, chosen, interior", [
    (3e-3, [1e-3, 3e-3, 1e-2], [1e-3, 3e-3, 1e-2], 3e-3, True),  # interior at once: no extension
    (1e-1, [1e-3, 3e-3, 1e-2], [1e-3, 3e-3, 1e-2, 3e-2, 1e-1], 1e-1, False),  # two steps up, still at the edge
    (3e-4, [1e-3, 3e-3, 1e-2], [1e-4, 3e-4, 1e-3, 3e-3, 1e-2], 3e-4, True),  # two steps down: 3e-4 is interior
])
def test_pick_lr_extends_a_grid_whose_best_is_an_edge(monkeypatch, peak, grid, tried, chosen, interior):
    import math as m

    calls = []

    def fake_unit(run, kind, seed, lr):
        calls.append(lr)
        return {"val": {"accuracy": -abs(m.log10(lr) - m.log10(peak))}}  # a single peak at `peak` in log-LR

    monkeypatch.setattr(lt, "source_unit", fake_unit)
    run = type("R", (), {"args": lt.Args(lorax_lr_grid=grid, lr_extensions=2)})()
    got = lt.pick_lr(run, "lorax")
    assert sorted(calls) == sorted(tried) and got["lr"] == chosen
    assert sorted(got["extended"]) == [x for x in tried if x not in grid] and got["interior"] is interior


@pytest.mark.parametrize("argv, message", [
    (["--kinds", "dora"], "--kinds got ['dora']"),
    (["--seeds", "0", "0"], "--seeds got [0, 0]"),
    (["--r", "0"], "--r must be an integer >= 1, got 0"),
    (["--noise_levels", "-0.1"], "--noise_levels got [-0.1]"),
    (["--simcse_steps", "0"], "--simcse_steps got [0]"),
    (["--lr_grid", "0"], "--lr_grid got [0.0]"),
    (["--phi_threshold", "1.5"], "--phi_threshold must be in [0, 1], got 1.5"),
    (["--simcse_batch_size", "1"], "--simcse_batch_size must be >= 2"),
    (["--k", "500"], "--k 500 exceeds"),
    (["--task", "mnist"], "invalid choice: 'mnist'"),
    (["--config", "/nonexistent.yaml"], "--config '/nonexistent.yaml' cannot be read"),
])
def test_bad_flags_are_refused_with_one_line_naming_the_flag(argv, message, capsys):
    with pytest.raises(SystemExit):
        lt.parse_args(argv)
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert message in err, err


def test_a_preset_without_targets_is_refused(tmp_path, capsys):
    preset = tmp_path / "none.yaml"
    preset.write_text("simcse_steps: []\nnoise_levels: []\n")
    with pytest.raises(SystemExit):
        lt.parse_args(["--config", str(preset)])
    assert "no targets: give --simcse_steps" in capsys.readouterr().err
    preset.write_text("lr: 0.1\n")
    with pytest.raises(SystemExit):
        lt.parse_args(["--config", str(preset)])
    assert "unknown keys ['lr']" in capsys.readouterr().err


def test_quick_preset_and_explicit_flags_win():
    a = lt.parse_args(["--quick", "--seeds", "3", "--output_dir", "x"])
    assert a.task == "stdlib" and a.k == 16 and a.seeds == [3] and a.output_dir == "x"
    d = lt.parse_args([])
    assert d.seeds == [0, 1, 2, 3, 4] and d.simcse_steps == [100, 1000, 3000] and d.task == "library"


# ------------------------------------------------------------------------------------------------ end to end


@pytest.mark.slow
def test_quick_run_identical_target_closed_form_resume_and_files(tmp_path, minilm_path):
    out = tmp_path / "out"
    argv = ["--quick", "--noise_levels", "0", "0.2", "--simcse_steps", "2", "--seeds", "0",
            "--phi_threshold", "0.97", "--output_dir", str(out), "--results_copy", str(tmp_path / "copy.json")]
    res = lt.main(argv)
    assert sorted(os.listdir(out)) == ["recovery_vs_phi.png", "results.json", "results.md",
                                       [d for d in os.listdir(out) if d.startswith("runs-")][0], "targets"]
    def key(rs):
        return [(r["target"], r["kind"], r["transfer"], r["seed"], r["accuracy"], r["recovery"]) for r in rs]
    assert key(json.loads((tmp_path / "copy.json").read_text())["records"]) == key(res["records"])
    assert sorted(os.listdir(out / "targets")) == ["noise-0", "noise-0.2", "simcse-2"]

    run_dir = out / [d for d in os.listdir(out) if d.startswith("runs-")][0]
    unit = lambda name, s: json.loads((run_dir / f"unit__{name}__s{s}.json").read_text())  # noqa: E731
    # identical target: every exact transfer reproduces the source adapter, whose predictions equal training on
    # that target with the same seed (same base, same data order, same initialisation)
    for s in (0,):
        u = unit("noise-0", s)["kinds"]
        src = {k: json.loads((run_dir / f"source__{k}__lr{res['lr'][k]['lr']:g}__s{s}.json").read_text())
               for k in lt.KINDS}
        for kind, transfers in (("lorax", ("paper", "copy", "phi-filter")), ("lora", ("carry", "copy"))):
            assert u[kind]["trained"]["correct"] == src[kind]["test"]["correct"], kind
            for tr in transfers:
                assert u[kind][tr]["correct"] == u[kind]["trained"]["correct"], (kind, tr)
                assert u[kind][tr]["energy_kept"] == pytest.approx(1.0, abs=1e-5), (kind, tr)
        assert u["lorax"]["phi-filter"]["same_as"] == "paper"  # phi = 1 everywhere: nothing dropped
        assert u["lora"]["eq3"]["energy_kept"] < 0.99  # Eq. 3 alone drops what lies outside the subspace
    geo = res["targets"]["noise-0"]["geometry"]
    assert geo["phi"] == pytest.approx(1.0, abs=1e-6) and geo["change_max"] == 0.0
    # the phi filter drops exactly the layers whose min(phi_U, phi_V) is below the threshold (closed form)
    far = res["targets"]["noise-0.2"]["geometry"]["layers"]
    keep = lt.phi_filter_keeps([r["phi_u"] for r in far.values()], [r["phi_v"] for r in far.values()], 0.97)
    assert 0 < keep.count(False) < len(keep), "the threshold must drop some layers and keep some for this check"
    for s in (0,):
        assert unit("noise-0.2", s)["kinds"]["lorax"]["phi-filter"]["dropped"] == keep.count(False)
    # records: one per target, kind, transfer (and the ceiling) and seed, with phi and recovery
    n_rows = 3 * 1 * (len(lt.TRANSFERS["lorax"]) + len(lt.TRANSFERS["lora"]) + 2)
    assert len(res["records"]) == n_rows
    rec = res["records"][0]
    assert set(rec) >= {"target", "phi", "kind", "transfer", "seed", "accuracy", "recovery"}
    md = (out / "results.md").read_text()
    assert "### Recovery of the trained-on-target gain" in md and "### Verdicts (computed)" in md
    assert "φ_U / φ_V per layer" in md

    # resume: a lost unit is recomputed, the finished ones are read back untouched
    lost = run_dir / "unit__noise-0.2__s0.json"
    kept = run_dir / "unit__simcse-2__s0.json"
    before = kept.stat().st_mtime_ns
    lost_text = lost.read_text()
    lost.unlink()
    again = lt.main(argv + ["--no_plots"])
    assert kept.stat().st_mtime_ns == before and lost.exists()
    assert json.loads(lost.read_text())["kinds"]["lora"]["copy"]["correct"] == \
        json.loads(lost_text)["kinds"]["lora"]["copy"]["correct"]
    assert len(again["records"]) == n_rows


@pytest.mark.slow
def test_lorax_adapter_has_no_complement_so_carry_equals_eq3(tmp_path, minilm_path):
    """An update inside the source's top-k subspaces: M_U = P_t P_s + Q_t Q_s acts on it as P_t, so the complement
    carry changes nothing (why the recipe does not evaluate it for the LoRA-X adapter)."""
    import torch
    from transformers import AutoModel

    from peft_ext.lorax import transfer

    a = lt.parse_args(["--quick", "--output_dir", str(tmp_path)])
    source = AutoModel.from_pretrained(minilm_path)
    lt.set_name(source, minilm_path)
    model = lt.classifier("lorax", source, a, 0, torch.randn(6, 384))
    with torch.no_grad():  # a LoRA-X update: shift the trained singular values
        for name, p in model.encoder.named_parameters():
            if "subspace_C" in name:
                p.add_(torch.randn_like(p))
    lt.save_adapter("lorax", model, str(tmp_path / "ad"))
    target = lt.build_noise(source, 0.3, 0)
    got = {}
    for carry in (True, False):
        tensors, _, report = transfer(str(tmp_path / "ad"), minilm_path, target, subspace_rank=a.k, cache=False,
                                      progress=False, method="lorax", carry_complement=carry, target_name="t")
        got[carry] = tensors
        assert report.summary["energy_kept"] < 0.999  # the target moved: Eq. 3 really projects
    for key in got[True]:
        if key.endswith("lora_B.weight"):
            a_key = key.replace("lora_B", "lora_A")
            dw = {c: got[c][key].double() @ got[c][a_key].double() for c in got}
            assert torch.allclose(dw[True], dw[False], atol=1e-5 * dw[False].abs().max().item()), key


# ------------------------------------------------------------------------------------------------ causal-LM source


def test_pack_blocks_closed_form():
    # stream 1 2 EOS 3 EOS 4 5 6 EOS: full blocks of 2, the last partial block dropped
    assert lt.pack_blocks([[1, 2], [3], [4, 5, 6]], 9, 2) == [[1, 2], [9, 3], [9, 4], [5, 6]]
    assert lt.pack_blocks([[1]], 9, 3) == []


def test_settings_key_and_targets_of_the_default_run_are_unchanged():
    """The running default (MiniLM) run keys its units by this hash: the causal-LM fields must not enter it."""
    d = lt.Args()
    assert lt.settings_key(d, "/nonexistent/pkg/model") == "1a9a8598af3b"  # computed with the code before them
    assert [t.name for t in lt.target_specs(d, "m")] == ["simcse-100", "simcse-1000", "simcse-3000", "noise-0.1",
                                                         "noise-0.2", "noise-0.4"]
    c = lt.Args(model="smollm2", simcse_steps=[], continued_steps=[100])
    assert lt.settings_key(c, "m") != lt.settings_key(lt.Args(model="smollm2", simcse_steps=[], continued_steps=[100],
                                                               continued_lr=3e-5), "m")


@pytest.mark.parametrize("argv, message", [
    (["--continued_steps", "5"], "--continued_steps [5] continues a causal LM, but the default source (MiniLM)"),
    (["--continued_steps", "0"], "--continued_steps got [0]"),
    (["--continued_lr", "0"], "--continued_lr must be > 0, got 0.0"),
    (["--model", "smollm2"], "--simcse_steps [100, 1000, 3000] on SmolLM2: it has no dropout"),
    (["--device", "tpu"], "invalid choice: 'tpu'"),
])
def test_causal_lm_flags_are_refused_with_one_line(argv, message, capsys):
    with pytest.raises(SystemExit):
        lt.parse_args(argv)
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert message in err, err


def test_smollm2_presets_parse():
    presets = os.path.join(os.path.dirname(lt.__file__), "presets")
    cpu = lt.parse_args(["--config", os.path.join(presets, "lorax_transfer_smollm2_cpu.yaml")])
    assert cpu.model == "smollm2" and cpu.simcse_steps == [] and len(cpu.continued_steps) == 1
    assert len(cpu.seeds) == 3 and cpu.noise_levels and cpu.device == "cpu" and cpu.task == "library"
    gpu = lt.parse_args(["--config", os.path.join(presets, "lorax_transfer_smollm2_gpu.yaml")])
    assert gpu.model == "smollm2" and gpu.device == "cuda" and len(gpu.seeds) == 5 and len(gpu.continued_steps) >= 3
    assert lt.layer_names("llama")[0] == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def tiny_causal(tmp_path_factory):
    """A 2-layer Llama (grouped-query attention and tied embeddings, as SmolLM2) with a byte-level BPE, saved as a
    causal-LM folder: what --model takes."""
    import tinyllama
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import data

    tok = tinyllama.train_tokenizer(data.general_text("calibration")[:40], vocab_size=320)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    path = tmp_path_factory.mktemp("tiny_causal") / "model"
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def test_continued_targets_are_checkpoints_of_one_trajectory_with_per_layer_phi(tmp_path, tiny_causal):
    import torch
    from safetensors.torch import load_file

    args = lt.Args(model=tiny_causal, simcse_steps=[], noise_levels=[], continued_steps=[3, 6], continued_lr=3e-3,
                   continued_batch_size=4, continued_max_length=16, k=8, output_dir=str(tmp_path / "a"))
    tok = lt.load_tokenizer(tiny_causal)
    source = lt.load_encoder(tiny_causal)
    specs = lt.target_specs(args, tiny_causal)
    assert [t.name for t in specs] == ["continued-3", "continued-6"]
    lt.build_targets(specs, source, tok, args, str(tmp_path / "work"), lambda *a: None, tiny_causal)
    layers = lt.adapted_layers(source)
    assert len(layers) == 2 * 7  # every block linear of both layers
    geo = {}
    for t in specs:
        target = lt.load_encoder(t.path)
        assert type(target).__name__ == "LlamaModel" and lt._built(t)
        geo[t.name] = g = lt.geometry(source, target, args.k)
        assert sorted(g["layers"]) == layers
        for name, row in g["layers"].items():
            assert 0.0 <= row["phi_u"] <= 1.0 + 1e-9 and 0.0 <= row["phi_v"] <= 1.0 + 1e-9
            assert row["change"] > 1e-4, (t.name, name)  # every block linear was trained
            ws, wt = source.state_dict()[name + ".weight"], target.state_dict()[name + ".weight"]
            assert row["change"] == pytest.approx(float((wt - ws).norm() / ws.norm()), rel=1e-5)
        assert 0.0 < g["phi"] < 1.0 and g["phi_min"] < 1.0 - 1e-6  # the subspaces really moved somewhere
        trained = {n + ".weight" for n in layers}
        for key, value in target.state_dict().items():  # embeddings and norms are the source's, bit for bit
            if key not in trained:
                assert torch.equal(value, source.state_dict()[key]), key
    assert geo["continued-6"]["change"] > geo["continued-3"]["change"] > 0
    # a constant LR makes the step-3 checkpoint the same model as a trajectory stopped at step 3
    alone = lt.Args(**{**vars(args), "continued_steps": [3], "output_dir": str(tmp_path / "b")})
    [t3] = lt.target_specs(alone, tiny_causal)
    lt.build_targets([t3], source, tok, alone, str(tmp_path / "work2"), lambda *a: None, tiny_causal)
    first = load_file(os.path.join(specs[0].path, "model.safetensors"))
    again = load_file(os.path.join(t3.path, "model.safetensors"))
    assert first.keys() == again.keys() and all(torch.allclose(first[k], again[k], atol=1e-6) for k in first)
    build = json.loads(open(os.path.join(specs[1].path, "build.json")).read())
    assert build["settings"]["steps"] == 6 and build["settings"]["text"] == lt.CONTINUED_TEXT
    assert build["blocks"] == len(lt.continued_text_blocks(tok, args)) > 0


@pytest.mark.slow
def test_quick_run_on_a_tiny_causal_lm(tmp_path, tiny_causal):
    """The whole protocol with a decoder source: a continued target and noise 0 (identical to the source). On the
    identical target every exact transfer equals training on it (the decoder's adapters, key names and
    conversions between a causal-LM source folder and decoder-only target folders all line up)."""
    preset = tmp_path / "tiny.yaml"
    preset.write_text(
        "task: stdlib\nper_class: 8\ncentroid_per_class: 3\nsimcse_steps: []\ncontinued_steps: [3]\n"
        "continued_batch_size: 4\ncontinued_max_length: 16\ncontinued_lr: 0.003\nnoise_levels: [0]\nk: 8\nr: 4\n"
        "steps: 4\nbatch_size: 4\nlr_grid: [0.02]\nlorax_lr_grid: [0.05]\nmax_length: 24\nseeds: [0]\nbootstrap: 50\n"
        "no_plots: true\nthreads: 1\n")
    out = tmp_path / "out"
    res = lt.main(["--config", str(preset), "--model", tiny_causal, "--output_dir", str(out)])
    assert sorted(os.listdir(out / "targets")) == ["continued-3", "noise-0"]
    run_dir = out / [d for d in os.listdir(out) if d.startswith("runs-")][0]
    u = json.loads((run_dir / "unit__noise-0__s0.json").read_text())["kinds"]
    for kind, transfers in (("lorax", ("paper", "copy", "phi-filter")), ("lora", ("carry", "copy"))):
        for tr in transfers:
            assert u[kind][tr]["correct"] == u[kind]["trained"]["correct"], (kind, tr)
            assert u[kind][tr]["energy_kept"] == pytest.approx(1.0, abs=1e-5), (kind, tr)
    geo = res["targets"]["continued-3"]["geometry"]
    assert len(geo["layers"]) == 14 and geo["change"] > 0 and geo["phi"] < 1.0
    assert res["targets"]["noise-0"]["geometry"]["phi"] == pytest.approx(1.0, abs=1e-6)
    assert len(res["records"]) == 2 * (len(lt.TRANSFERS["lorax"]) + len(lt.TRANSFERS["lora"]) + 2)
    assert res["model"] == "tiny_causal0" and res["markdown"].startswith("Source tiny_causal0;")
