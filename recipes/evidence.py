"""The statistics the recipes' verdicts are computed from: bootstrap CIs over seeds (and items), paired differences,
and time-to-accuracy with censoring. Pure functions over plain lists, tested against closed forms.
"""

from __future__ import annotations

import math
import random
import statistics
from typing import Optional


def bootstrap_mean(runs: list[dict], key: str, n: int, seed: int = 0) -> tuple[float, float, float]:
    """Mean of the per-item scores `key` over runs (seeds) and items, with a 95% CI resampling seeds and items."""
    rng = random.Random(seed)
    mats = [r[key] for r in runs]
    point = statistics.mean(statistics.mean(m) for m in mats)
    draws = []
    n_items = len(mats[0])
    for _ in range(n):
        seeds = [rng.randrange(len(mats)) for _ in mats]
        items = [rng.randrange(n_items) for _ in range(n_items)]
        draws.append(statistics.mean(statistics.mean(mats[s][i] for i in items) for s in seeds))
    draws.sort()
    return point, draws[int(0.025 * n)], draws[int(0.975 * n) - 1]


def paired_difference(a: list[dict], b: list[dict], key: str, n: int, seed: int = 0) -> tuple[float, float, float]:
    """Mean of A - B on the same seeds and the same items (paired), with a 95% bootstrap CI over seeds and items."""
    by_seed_b = {r["seed"]: r for r in b}
    pairs = [(r[key], by_seed_b[r["seed"]][key]) for r in a if r["seed"] in by_seed_b]
    if not pairs:
        return float("nan"), float("nan"), float("nan")
    diffs = [[x - y for x, y in zip(ra, rb)] for ra, rb in pairs]
    fake = [{key: d} for d in diffs]
    return bootstrap_mean(fake, key, n, seed)


def bootstrap_ci(values: list[float], n: int, seed: int = 0) -> tuple[float, float, float]:
    """(mean, 2.5%, 97.5%) of `values` (one per seed), the CI by resampling the values with replacement.

    With 5 seeds this percentile interval is narrow-ish (it cannot reflect more spread than the sample shows); the
    recipes say so next to every table that uses it."""
    if not values:
        return math.nan, math.nan, math.nan
    rng = random.Random(seed)
    draws = sorted(statistics.mean(rng.choice(values) for _ in values) for _ in range(n))
    return statistics.mean(values), draws[int(0.025 * n)], draws[int(0.975 * n) - 1]


def time_to_level(curve: list[dict], level: float, key: str = "acc") -> tuple[float | None, float | None]:
    """(step, seconds) of the first point of `curve` with `key` >= `level`; (None, None) when no point did (censored)."""
    hit = next((c for c in curve if c[key] >= level), None)
    return (hit["step"], hit["time"]) if hit else (None, None)


def censored(value: float | None, budget: float) -> tuple[float, bool]:
    """A time that was never reached counts as the budget (a lower bound on the true time) and is flagged."""
    return (float(budget), True) if value is None else (float(value), False)


def paired_time_difference(a: dict[int, float | None], b: dict[int, float | None], budget: float, n: int,
                           seed: int = 0) -> dict:
    """Arm A's time-to-X minus arm B's on the seeds both ran, censored times counted as `budget`.

    Returns the mean difference with its 95% bootstrap CI over seeds, the difference relative to B's mean time
    (negative = A faster), the number of seeds and how many were censored in A and in B. Counting a censored run at
    the budget biases the difference towards 0 when A is censored (A's true time is longer) and away from 0 when B
    is: the flags say which applies."""
    common = sorted(set(a) & set(b))
    ta = [censored(a[s], budget) for s in common]
    tb = [censored(b[s], budget) for s in common]
    diffs = [x[0] - y[0] for x, y in zip(ta, tb)]
    mean, lo, hi = bootstrap_ci(diffs, n, seed)
    base = statistics.mean(y[0] for y in tb) if tb else math.nan
    return {"mean": mean, "lo": lo, "hi": hi, "relative": mean / base if base else math.nan,
            "relative_lo": lo / base if base else math.nan, "relative_hi": hi / base if base else math.nan,
            "seeds": len(common), "censored_a": sum(x[1] for x in ta), "censored_b": sum(y[1] for y in tb)}


def fmt_ci(ci: tuple[float, float, float] | dict, scale: float = 1.0, digits: int = 1, signed: bool = False) -> str:
    """'mean [lo, hi]' of a (mean, lo, hi) triple or a dict with those keys, scaled."""
    m, lo, hi = (ci["mean"], ci["lo"], ci["hi"]) if isinstance(ci, dict) else ci
    if not math.isfinite(m):
        return "—"
    sign = "+" if signed else ""
    return f"{m * scale:{sign}.{digits}f} [{lo * scale:{sign}.{digits}f}, {hi * scale:{sign}.{digits}f}]"


def ladder_step(lr: float, up: bool) -> float:
    """The next LR on the 1-3-10 ladder the grids use: 3e-3 -> 1e-2 -> 3e-2 up, 3e-5 -> 1e-5 -> 3e-6 down."""
    mantissa = lr / 10 ** math.floor(math.log10(lr))
    factor = (3.0 if mantissa < 2 else 10 / 3) if up else (0.3 if mantissa < 2 else 1 / 3)
    return float(f"{lr * factor:.2g}")


def front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Upper-right Pareto front of (task, knowledge) points, sorted by task."""
    pts = sorted(points, key=lambda p: (-p[0], -p[1]))
    out, best_k = [], -math.inf
    for t, k in pts:
        if k > best_k:
            out.append((t, k))
            best_k = k
    return sorted(out)


def knowledge_at(fr: list[tuple[float, float]], task: float) -> Optional[float]:
    """Knowledge kept at `task`, linearly interpolated between the two front points around it; None outside the
    front's task range (no extrapolation: a method is compared only at task levels it actually reached)."""
    if not fr or not fr[0][0] <= task <= fr[-1][0]:
        return None
    for (t0, k0), (t1, k1) in zip(fr, fr[1:]):
        if t0 <= task <= t1:
            return k0 if t1 == t0 else k0 + (k1 - k0) * (task - t0) / (t1 - t0)
    return fr[-1][1]  # a one-point front at exactly `task`


def matched_task_levels(fronts: dict[str, list[tuple[float, float]]]) -> list[float]:
    """Three task levels every front spans (the quartiles of the common range), or [] when the ranges do not meet."""
    lo = max(fr[0][0] for fr in fronts.values())
    hi = min(fr[-1][0] for fr in fronts.values())
    if hi < lo:
        return []
    return [lo + q * (hi - lo) for q in (0.25, 0.5, 0.75)] if hi > lo else [lo]


def front_comparison(fr: list[tuple[float, float]], ref: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """(task level, knowledge of `fr` minus knowledge of `ref`) at the quartiles of the task range both lr fronts
    span; [] when they share none."""
    if not fr or not ref:
        return []
    return [(t, knowledge_at(fr, t) - knowledge_at(ref, t)) for t in matched_task_levels({"a": fr, "b": ref})]
