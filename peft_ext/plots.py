"""Pictures of the reports, as PNG files: the calibration spectra of a `NullSpaceReport` and the per-layer φ/energy of
a LoRA-X `TransferReport`.

Each picture is two steps: a pure function that returns the series it draws (`nullspace_series`,
`transfer_series`: tested against the report, no pixels involved) and a writer that draws exactly those series with
matplotlib (`plot_nullspace_report`, `plot_transfer_report`). matplotlib comes with the `demo` extra and is imported
only here, inside the writers, through `matplotlib.figure.Figure` and the Agg canvas: no pyplot, so neither the
user's backend nor pyplot's figure list is touched. Files are written complete or not at all.
"""

from __future__ import annotations

import math
import os
import textwrap
from typing import TYPE_CHECKING, Any, Union

if TYPE_CHECKING:
    from .lorax import TransferReport
    from .nullspace.initialize import NullSpaceReport

MAX_PANELS = 16  # spectra drawn per NullSpaceReport picture (a 4x4 grid); the JSON has every layer
SPECTRUM_POINTS = 256  # eigenvalues a LayerReport keeps: every one of the r-tail, the rest evenly spaced
INSTALL = "pip install 'peft-ext[demo]'"


# ------------------------------------------------------------------------------------------------ report data
def spectrum_sample(values: list[float], r: int, points: int = SPECTRUM_POINTS) -> tuple[list[int], list[float]]:
    """(indices, values) of an ascending spectrum kept for the picture: all of it when it has at most `points`
    values, else the first min(r, points // 2) (the r-tail the adapter uses, so it is drawn exactly) and evenly
    spaced indices over the whole range, the first (λmin) and the last (λmax) included. Values rounded to 4
    significant digits: the picture needs no more, and the report JSON stays small (~4 kB per layer)."""
    d = len(values)
    if points < 2:
        raise ValueError(f"points={points} must be >= 2 (λmin and λmax at least)")
    if d <= points:
        index = list(range(d))
    else:
        tail = min(max(r, 0), points // 2)
        rest = points - tail
        spread = {round(i * (d - 1) / (rest - 1)) for i in range(rest)}
        index = sorted(set(range(tail)) | spread)
    return index, [float(f"{float(values[i]):.4g}") for i in index]


def _as_dict(report: Any, kind: str) -> dict[str, Any]:
    """`report.to_dict()` for a report object, the dict itself for a loaded JSON (read as written by to_json)."""
    if kind == "NullSpaceReport":
        from .nullspace.initialize import NullSpaceReport as cls
    else:
        from .lorax import TransferReport as cls
    if isinstance(report, dict):
        data = report
    elif isinstance(report, cls):
        data = report.to_dict()
    else:
        raise TypeError(f"report must be a {kind} or its to_dict()/JSON dict, got {type(report).__name__}")
    layers = data.get("layers")
    if not isinstance(layers, list):
        raise ValueError(f"report has no 'layers' list, so it is not a {kind}; pass the report or its JSON as written")
    if not layers:
        raise ValueError(f"report has no layers: nothing to plot (a {kind} lists one row per adapted layer)")
    return data


def nullspace_series(report: Union[NullSpaceReport, dict[str, Any]]) -> list[dict[str, Any]]:
    """What `plot_nullspace_report` draws, one dict per layer in report order: `layer`, `index`/`eigenvalue` (the
    stored spectrum of the calibration covariance, ascending), `r`, `tail_index`/`tail_eigenvalue` (the points of the
    r-tail: the null-space directions the adapter uses), `lambda_min`, `lambda_max`, `floor` (where eigenvalues <= 0
    are drawn on the log axis: a tenth of the smallest positive one; None when all are positive), `flags`."""
    data = _as_dict(report, "NullSpaceReport")
    out = []
    for i, lr in enumerate(data["layers"]):
        name = lr.get("layer", f"layers[{i}]")
        index, values = lr.get("spectrum_index"), lr.get("spectrum")
        if not index or not values:
            raise ValueError(f"report layer {name!r} has no stored spectrum (a report written before spectra were "
                             "recorded); run initialize_nullspace_lora again to get one")
        if len(index) != len(values):
            raise ValueError(f"report layer {name!r}: spectrum_index has {len(index)} entries, spectrum {len(values)}; "
                             "write the report with NullSpaceReport.save_json")
        r = int(lr["r"])
        positive = [v for v in values if v > 0]
        floor = None if len(positive) == len(values) else (min(positive) / 10 if positive else 1e-30)
        tail = [(j, v) for j, v in zip(index, values) if j < r]
        out.append({
            "layer": name, "index": list(index), "eigenvalue": list(values), "r": r,
            "tail_index": [j for j, _ in tail], "tail_eigenvalue": [v for _, v in tail],
            "lambda_min": float(lr["lambda_min"]), "lambda_max": float(lr["lambda_max"]), "floor": floor,
            "flags": [f.split(":")[0] for f in lr.get("flags", [])],
        })
    return out


def transfer_series(report: Union[TransferReport, dict[str, Any]]) -> dict[str, Any]:
    """What `plot_transfer_report` draws: per layer in report order `layer`, `phi_u`, `phi_v`, `energy_kept`,
    `action`, and `threshold` (the conversion's min_similarity, None when it was 0: no layer filter) with `low`
    (whether min(φ_U, φ_V) fell below it)."""
    data = _as_dict(report, "TransferReport")
    rows = data["layers"]
    threshold = (data.get("settings") or {}).get("min_similarity") or None
    phi_u = [float(lt["phi_u"]) for lt in rows]
    phi_v = [float(lt["phi_v"]) for lt in rows]
    return {
        "layer": [lt["name"] for lt in rows], "phi_u": phi_u, "phi_v": phi_v,
        "energy_kept": [float(lt["energy_kept"]) for lt in rows], "action": [lt["action"] for lt in rows],
        "threshold": float(threshold) if threshold is not None else None,
        "low": [threshold is not None and min(u, v) < threshold for u, v in zip(phi_u, phi_v)],
    }


# ------------------------------------------------------------------------------------------------ drawing
def _check_path(path: Any) -> str:
    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
        raise TypeError(f"path must be a file path ending in .png, got {path!r}")
    path = os.fspath(path)
    if not path.lower().endswith(".png"):
        raise ValueError(f"path={path!r} must end in .png (the picture is written as PNG); e.g. report.png")
    if os.path.isdir(path):
        raise ValueError(f"path={path!r} is a folder; pass a file path such as {os.path.join(path, 'report.png')}")
    return path


def _figure(width: float, height: float):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError(f"drawing a report needs matplotlib, which is not installed: {INSTALL}") from e
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)  # the figure draws through Agg whatever backend pyplot uses
    return fig


def save_png(fig: Any, path: str | os.PathLike, dpi: float | None = None) -> str:
    """Write a matplotlib figure as PNG complete or not at all (`files.atomic_file`: a kill mid-write leaves the old
    picture or none, never a truncated one); the temporary has no extension, so the format is given. Returns path."""
    from .files import atomic_file

    path = os.fspath(path)
    with atomic_file(path, field="path") as tmp:
        fig.savefig(tmp, format="png", **({} if dpi is None else {"dpi": dpi}))
    return path


def short_names(names: list[str], width: int = 32) -> list[str]:
    """Labels for layer names: from the block number on (`model.layers.3.self_attn.q_proj` -> `3.self_attn.q_proj`,
    the first all-digit component), a name without one as it is; a label still longer than `width` keeps its last
    components."""
    out = []
    for name in names:
        parts = name.split(".")
        digits = [i for i, p in enumerate(parts) if p.isdigit()]
        parts = parts[digits[0]:] if digits else parts
        while len(parts) > 1 and len(".".join(parts)) > width:
            parts = parts[1:]
        out.append(".".join(parts))
    return out


def plot_nullspace_report(report: Union[NullSpaceReport, dict[str, Any]], path: str | os.PathLike, *,
                          max_layers: int = MAX_PANELS) -> str:
    """Draw the eigen-spectrum of each layer's calibration covariance (log scale, eigenvalue index ascending), the
    r-tail the adapter uses marked, λmin/λmax and λmin/λmax ratio annotated; one small panel per layer, the first
    `max_layers` of them (the title says when more exist). Writes a PNG to `path` and returns it."""
    path = _check_path(path)
    if isinstance(max_layers, bool) or not isinstance(max_layers, int) or max_layers < 1:
        raise ValueError(f"max_layers={max_layers!r} must be an integer >= 1")
    series = nullspace_series(report)
    data = _as_dict(report, "NullSpaceReport")
    shown = series[:max_layers]
    cols = min(4, len(shown))
    rows = math.ceil(len(shown) / cols)
    fig = _figure(3.2 * cols, 2.5 * rows + 0.5)
    title = f"NullSpaceLoRA adapter {data.get('adapter_name', '?')!r} (mode {data.get('mode', '?')}): input covariance spectra"
    if len(series) > len(shown):
        title += f"\nfirst {len(shown)} of {len(series)} layers shown (every layer is in the report JSON)"
    fig.suptitle(title, fontsize=10)
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat[len(shown):]:
        ax.set_visible(False)
    for ax, s, label in zip(axes.flat, shown, short_names([s["layer"] for s in series])):
        clip = (lambda v, f=s["floor"]: max(v, f)) if s["floor"] is not None else (lambda v: v)
        ax.plot(s["index"], [clip(v) for v in s["eigenvalue"]], color="0.45", lw=1.2, label="spectrum")
        ax.plot(s["tail_index"], [clip(v) for v in s["tail_eigenvalue"]], color="tab:red", lw=2.2,
                marker="." if len(s["tail_index"]) <= 32 else None, ms=4, label=f"r-tail (r={s['r']})")
        ax.axvspan(-0.5, s["r"] - 0.5, color="tab:red", alpha=0.08)
        ax.set_yscale("log")
        ax.set_xlabel("eigenvalue index (ascending)", fontsize=7)
        ax.tick_params(labelsize=7)
        ratio = s["lambda_min"] / s["lambda_max"] if s["lambda_max"] > 0 else 0.0
        note = f"λmin {s['lambda_min']:.2e}\nλmax {s['lambda_max']:.2e}\nλmin/λmax {ratio:.1e}"
        if s["floor"] is not None:
            note += f"\n(≤0 drawn at {s['floor']:.1e})"
        ax.text(0.97, 0.05, note, transform=ax.transAxes, ha="right", va="bottom", fontsize=6.5,
                bbox={"boxstyle": "round", "fc": "white", "ec": "0.8", "alpha": 0.85})
        flagged = f"  [{','.join(s['flags'])}]" if s["flags"] else ""
        ax.set_title(label + flagged, fontsize=8, color="tab:red" if s["flags"] else "black")
    axes.flat[0].legend(fontsize=6.5, loc="upper left")
    save_png(fig, path)
    return path


def plot_transfer_report(report: Union[TransferReport, dict[str, Any]], path: str | os.PathLike) -> str:
    """Draw, per layer, φ_U and φ_V (subspace similarity between source and target, bars) with the low-similarity
    threshold (min_similarity) as a line, and the energy kept (‖ΔW_t‖/‖ΔW_s‖) below; dropped and copied layers are
    marked. Writes a PNG to `path` and returns it."""
    path = _check_path(path)
    s = transfer_series(report)
    data = _as_dict(report, "TransferReport")
    n = len(s["layer"])
    x = list(range(n))
    width = min(max(6.0, 0.28 * n + 2.5), 30.0)
    fig = _figure(width, 6.0)
    title = (f"LoRA-X transfer ({data.get('method', '?')}): {data.get('source_base', '?')} -> "
             f"{data.get('target_base', '?')}")
    fig.suptitle(textwrap.fill(title, width=int(width * 14)), fontsize=10)  # base paths can be long
    top, bottom = fig.subplots(2, 1, sharex=True)
    w = 0.4
    top.bar([i - w / 2 for i in x], s["phi_u"], width=w, color="tab:blue", label="φ_U")
    top.bar([i + w / 2 for i in x], s["phi_v"], width=w, color="tab:orange", label="φ_V")
    if s["threshold"] is not None:
        top.axhline(s["threshold"], color="tab:red", ls="--", lw=1.2, label=f"min_similarity {s['threshold']:g}")
        for i, low in zip(x, s["low"]):
            if low:
                top.annotate("low", (i, 1.01), ha="center", fontsize=6, color="tab:red")
    top.set_ylim(0, 1.3)
    top.set_yticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    top.set_ylabel("subspace similarity φ")
    top.legend(fontsize=7, loc="upper right", ncol=3)
    colors = {"transferred": "tab:green", "kept": "tab:olive", "dropped": "tab:red", "copied": "tab:purple"}
    bottom.bar(x, s["energy_kept"], color=[colors.get(a, "0.5") for a in s["action"]])
    dropped = [i for i, a in zip(x, s["action"]) if a == "dropped"]  # a bar of height 0: mark where it would be
    bottom.plot(dropped, [0.03] * len(dropped), ls="none", marker="x", color=colors["dropped"])
    bottom.axhline(1.0, color="0.5", ls=":", lw=1)
    bottom.set_ylabel("energy kept ‖ΔW_t‖/‖ΔW_s‖")
    present = [a for a in colors if a in s["action"]]
    from matplotlib.patches import Patch

    bottom.set_ylim(0, max(1.3, 1.2 * max(s["energy_kept"])))  # above 1 only if a method grew the update
    bottom.legend(handles=[Patch(color=colors[a], label=a) for a in present], fontsize=7, loc="upper right",
                  ncol=len(present))
    bottom.set_xticks(x)
    if n <= 48:
        labels = bottom.set_xticklabels(short_names(s["layer"]), rotation=75, ha="right", fontsize=6)
        for label, low in zip(labels, s["low"]):
            label.set_color("tab:red" if low else "black")
    else:
        bottom.set_xlabel("layer (report order)")
        bottom.set_xticks(x[:: max(1, n // 24)])
    save_png(fig, path)
    return path


__all__ = [
    "nullspace_series",
    "plot_nullspace_report",
    "plot_transfer_report",
    "short_names",
    "spectrum_sample",
    "transfer_series",
]
