"""Pictures of the reports (peft_ext.plots): the series drawn checked against the report, the PNG checked as a file."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
import sys

import pytest
import torch
from peft import get_peft_model

from peft_ext import ActivationStats, NullSpaceLoraConfig, initialize_nullspace_lora
from peft_ext.cli import main
from peft_ext.lorax import LayerTransfer, TransferReport
from peft_ext.nullspace.initialize import LayerReport, NullSpaceReport
from peft_ext.plots import (
    SPECTRUM_POINTS,
    nullspace_series,
    plot_nullspace_report,
    plot_transfer_report,
    short_names,
    spectrum_sample,
    transfer_series,
)

from .conftest import Toy, planted_inputs
from .test_lorax import K, berts  # noqa: F401 (fixture)

EIG = [4.0, 3.0, 2.0, 1.0, 0.5, 1e-3, 1e-4, 1e-5]  # planted spectrum of the toy's q/k input


def png_size(path) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk; fails unless the file is a PNG."""
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert data[12:16] == b"IHDR" and data[-8:-4] == b"IEND"
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def planted_report() -> NullSpaceReport:
    x, _ = planted_inputs(400, torch.tensor(EIG, dtype=torch.float64))
    batches = [x[i : i + 50].float() for i in range(0, 400, 50)]
    model = get_peft_model(Toy(), NullSpaceLoraConfig(r=3, target_modules=["q", "k"]))
    stats = ActivationStats.collect(model, batches, progress=False)
    return initialize_nullspace_lora(model, stats=stats, progress=False, warn=False)


def _transfer_report(n: int = 6, threshold: float = 0.5) -> TransferReport:
    rows = [LayerTransfer(f"model.layers.{i}.self_attn.q_proj", [16, 16], phi_u=1 - 0.15 * i, phi_v=0.95 - 0.1 * i,
                          energy_kept=0.0 if 1 - 0.15 * i < threshold else 1 - 0.05 * i, rank=4,
                          action="dropped" if 1 - 0.15 * i < threshold else "transferred") for i in range(n)]
    return TransferReport("lorax", "src", "tgt", "ad", {"min_similarity": threshold}, rows)


# ------------------------------------------------------------------------------------------------ the data
def test_spectrum_sample_keeps_the_whole_tail_and_both_ends():
    values = [float(i + 1) for i in range(8)]
    assert spectrum_sample(values, r=3) == (list(range(8)), values)  # short: all of it
    d, r = 2000, 40
    values = [1e-6 * 1.01**i for i in range(d)]
    index, kept = spectrum_sample(values, r=r)
    assert len(index) <= SPECTRUM_POINTS and index == sorted(set(index))
    assert index[:r] == list(range(r)) and index[-1] == d - 1  # every tail direction, λmin and λmax
    assert all(k == pytest.approx(values[i], rel=5.01e-4) for i, k in zip(index, kept))  # 4 significant digits
    assert max(b - a for a, b in zip(index, index[1:])) <= math.ceil((d - 1) / (SPECTRUM_POINTS - r - 1))
    with pytest.raises(ValueError, match="points=1 must be >= 2"):
        spectrum_sample(values, r=r, points=1)


def test_nullspace_series_are_the_planted_spectrum_and_its_r_tail(planted_report):
    series = nullspace_series(planted_report)
    assert [s["layer"] for s in series] == ["q", "k"]
    for s in series:
        assert s["index"] == list(range(8)) and s["r"] == 3
        assert s["eigenvalue"] == pytest.approx(EIG[::-1], rel=1e-3)  # ascending: λmin first
        assert s["tail_index"] == [0, 1, 2]
        assert s["tail_eigenvalue"] == pytest.approx([1e-5, 1e-4, 1e-3], rel=1e-3)  # the null-space directions used
        assert s["lambda_min"] == pytest.approx(1e-5, rel=1e-3) and s["lambda_max"] == pytest.approx(4.0, rel=1e-6)
        assert s["floor"] is None and s["flags"] == []
    # the report JSON carries the spectrum: the same series from the file as from the object
    assert nullspace_series(json.loads(planted_report.to_json())) == series


def test_nonpositive_eigenvalues_get_a_floor_on_the_log_axis(planted_report):
    data = planted_report.to_dict()
    data["layers"][0]["spectrum"][:2] = [0.0, 0.0]
    s = nullspace_series(data)[0]
    assert s["floor"] == pytest.approx(1e-3 / 10, rel=1e-3)  # a tenth of the smallest positive value


def test_report_without_spectrum_still_loads_and_plot_says_why_it_cannot(planted_report, tmp_path):
    old = {k: v for k, v in dataclasses.asdict(planted_report.layers[0]).items() if not k.startswith("spectrum")}
    layer = LayerReport(**old)  # a row of a report JSON written before spectra were kept
    report = NullSpaceReport("default", "v2", "held-out", [layer])
    assert json.loads(report.to_json())["layers"][0]["spectrum"] == []
    with pytest.raises(ValueError, match="layer 'q' has no stored spectrum .* run initialize_nullspace_lora again"):
        report.plot(str(tmp_path / "r.png"))
    assert not os.listdir(tmp_path)


def test_transfer_series_are_the_report_rows_and_the_threshold():
    report = _transfer_report()
    s = transfer_series(report)
    assert s["layer"] == [lt.name for lt in report.layers]
    assert s["phi_u"] == [lt.phi_u for lt in report.layers] and s["phi_v"] == [lt.phi_v for lt in report.layers]
    assert s["energy_kept"] == [lt.energy_kept for lt in report.layers]
    assert s["threshold"] == 0.5 and s["low"] == [False, False, False, False, True, True]  # min(φ) 1-0.15i < 0.5
    assert s["action"][-2:] == ["dropped", "dropped"]
    assert transfer_series(json.loads(report.to_json())) == s  # lorax_report.json draws the same
    report.settings["min_similarity"] = 0.0  # no filter: no threshold line, nothing low
    s = transfer_series(report)
    assert s["threshold"] is None and not any(s["low"])


def test_short_names_keep_the_block_number():
    assert short_names(["model.layers.3.self_attn.q_proj", "bert.encoder.layer.11.attention.self.query",
                        "pooler.dense"]) == ["3.self_attn.q_proj", "11.attention.self.query", "pooler.dense"]


# ------------------------------------------------------------------------------------------------ the files
def test_nullspace_plot_writes_a_png_one_panel_per_layer(planted_report, tmp_path):
    pyplot_before = "matplotlib.pyplot" in sys.modules
    path = tmp_path / "sub" / "nullspace.png"
    assert planted_report.plot(str(path)) == str(path)
    w2, h2 = png_size(path)
    assert path.stat().st_size > 1000 and sorted(os.listdir(path.parent)) == ["nullspace.png"]  # no temporary left
    plot_nullspace_report(planted_report, tmp_path / "one.png", max_layers=1)
    w1, h1 = png_size(tmp_path / "one.png")
    assert (w2, w1) == (640, 320)  # 3.2 in per panel column at 100 dpi: 2 panels, then the first 1 only
    assert h1 == h2
    assert ("matplotlib.pyplot" in sys.modules) == pyplot_before  # drawn without pyplot's global state


def test_transfer_plot_writes_a_png(tmp_path):
    path = tmp_path / "lorax.png"
    assert _transfer_report().plot(path) == str(path)
    w, h = png_size(path)
    assert w > 0 and h == 600 and path.stat().st_size > 1000


@pytest.mark.parametrize("path, error, message", [
    ("report.jpg", ValueError, r"path='.*report.jpg' must end in \.png"),
    ("", TypeError, "path must be a file path ending in .png"),
    (None, TypeError, "path must be a file path ending in .png"),
    ("DIR", ValueError, "is a folder; pass a file path"),
])
def test_bad_paths_are_refused_before_drawing(planted_report, tmp_path, path, error, message):
    if path == "DIR":
        path = str(tmp_path / "d.png")
        os.mkdir(path)
    elif path:
        path = str(tmp_path / path)
    with pytest.raises(error, match=message):
        planted_report.plot(path)
    with pytest.raises(error, match=message):
        _transfer_report().plot(path)


def test_empty_or_wrong_reports_are_refused(tmp_path, planted_report):
    with pytest.raises(ValueError, match="report has no layers: nothing to plot"):
        NullSpaceReport("default", "v2", "held-out", []).plot(str(tmp_path / "a.png"))
    with pytest.raises(ValueError, match="report has no layers: nothing to plot"):
        TransferReport("lorax", "s", "t", "a", {}, []).plot(str(tmp_path / "b.png"))
    with pytest.raises(TypeError, match="report must be a NullSpaceReport or its to_dict"):
        plot_nullspace_report(_transfer_report(), tmp_path / "c.png")
    with pytest.raises(ValueError, match="no 'layers' list, so it is not a TransferReport"):
        plot_transfer_report({"method": "lorax"}, tmp_path / "d.png")
    assert not os.listdir(tmp_path)


def test_without_matplotlib_one_line_names_the_extra(planted_report, tmp_path, monkeypatch):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    with pytest.raises(ImportError, match=r"needs matplotlib, which is not installed: pip install 'peft-ext\[demo\]'"):
        planted_report.plot(str(tmp_path / "r.png"))
    assert not os.listdir(tmp_path)


# ------------------------------------------------------------------------------------------------ the CLI
def test_lorax_convert_writes_the_plot_next_to_the_json(berts, tmp_path, capsys, monkeypatch):  # noqa: F811
    src, tgt, ad = berts
    out = tmp_path / "out"
    argv = ["lorax", "convert", "--adapter", str(ad), "--source-base", str(src), "--target-base", str(tgt),
            "--out", str(out), "--subspace-rank", str(K), "--min-similarity", "0.9", "--cache-dir",
            str(tmp_path / "cache")]
    assert main(argv) == 0
    assert "(report: lorax_report.json, lorax_report.png)" in capsys.readouterr().out
    png_size(out / "lorax_report.png")
    data = json.loads((out / "lorax_report.json").read_text())
    assert transfer_series(data)["threshold"] == 0.9 and any(transfer_series(data)["low"])
    # without matplotlib the conversion still succeeds, and says in one line why there is no picture
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert main(argv + ["--overwrite"]) == 0
    captured = capsys.readouterr()
    assert "(report: lorax_report.json)" in captured.out
    said = [line for line in captured.err.splitlines() if "matplotlib" in line]  # the progress bar also writes there
    assert said == ["peft-ext: no lorax_report.png: drawing a report needs matplotlib, which is not installed: "
                    "pip install 'peft-ext[demo]'"]
    assert "lorax_report.json" in os.listdir(out) and "lorax_report.png" not in os.listdir(out)


def test_save_png_is_complete_or_absent(tmp_path):
    """Every plot a recipe or the monitor callback writes goes through save_png: a figure that fails while drawing
    leaves the previous picture as it was and no temporary beside it."""
    from matplotlib.figure import Figure

    from peft_ext.plots import save_png

    path = tmp_path / "plot.png"
    fig = Figure()
    fig.add_subplot().plot([0, 1], [1, 0])
    assert save_png(fig, path, dpi=50) == str(path)
    good = path.read_bytes()
    assert good.startswith(b"\x89PNG")

    class Broken(Exception):
        pass

    def explode(*a, **k):
        raise Broken

    fig.add_subplot().plot([0, 1], [0, 1])
    fig.canvas.print_png = explode  # dies mid-write
    with pytest.raises(Broken):
        save_png(fig, path)
    assert path.read_bytes() == good and sorted(p.name for p in tmp_path.iterdir()) == ["plot.png"]
