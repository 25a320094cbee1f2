"""The checks every peft-ext module makes of numbers it is given: one wording, one place.

- `check_number(value, field, gt=/ge=/lt=/le=, why=, fix=, where=)`: a scalar argument or config field is a finite
  real number (not a bool) within its bounds, else one line naming the field, the value and the fix:
  ``NullSpaceLoraConfig.nullspace_alpha must be a finite number > 0 (why), got nullspace_alpha=nan; fix``;
  `check_int` the same for integer counts.
- `nonfinite_count(t)` / `all_finite(*tensors)`: whether tensors hold NaN/Inf (meta tensors hold no values and pass);
  `check_finite(t, name, why=, fix=)` raises the one-line error for a tensor argument that does.

Stdlib only at import (torch is imported inside the tensor checks): the CLI's option classes use `check_number`
without importing torch.
"""

from __future__ import annotations

import math
from typing import Any


def is_real(value: object) -> bool:
    """A finite int or float (not a bool: True is an int to Python but never a meant number)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def shown(value: object) -> str:
    """`value!r`, with its type when the repr alone hides it (a "0.1" string looks like a number in a message)."""
    return repr(value) if value is None or isinstance(value, (bool, int, float)) else f"{value!r} ({type(value).__name__})"


def _num(x: float) -> str:
    return f"{x:g}"


def describe_bounds(gt: float | None = None, ge: float | None = None, lt: float | None = None,
                    le: float | None = None, noun: str = "a number") -> str:
    """The constraint in words: 'a finite real number', 'a number > 0', 'a number in [0, 1)', 'a number strictly
    between 0 and 1'."""
    if gt is not None and ge is not None or lt is not None and le is not None:
        raise TypeError("describe_bounds: give at most one lower (gt or ge) and one upper (lt or le) bound")
    lo, hi = (gt if gt is not None else ge), (lt if lt is not None else le)
    if lo is None and hi is None:
        return "a finite real number"
    if lo is not None and hi is not None:
        if gt is not None and lt is not None:
            return f"{noun} strictly between {_num(lo)} and {_num(hi)}"
        return f"{noun} in {'(' if gt is not None else '['}{_num(lo)}, {_num(hi)}{')' if lt is not None else ']'}"
    if lo is not None:
        return f"{noun} {'>' if gt is not None else '>='} {_num(lo)}"
    return f"{noun} {'<' if lt is not None else '<='} {_num(hi)}"


def check_number(value: Any, field: str, *, gt: float | None = None, ge: float | None = None,
                 lt: float | None = None, le: float | None = None, why: str | None = None, fix: str | None = None,
                 where: str = "", noun: str = "a number", type_error: bool = False) -> float:
    """`value` as a float when it is a finite real number (not a bool, not a string) within the bounds; otherwise a
    ValueError of one line: ``{where}{field} must be {constraint} ({why}), got {field}={value}; {fix}``.

    `where` prefixes the owner ("NullSpaceLoraConfig." or "create_directional_optimizer: "); `noun` words the
    constraint ("a number", "a finite number"); `type_error=True` raises TypeError for a value that is no number at
    all (None, a string), ValueError for a number out of bounds or not finite.
    """
    ok = is_real(value) and (gt is None or value > gt) and (ge is None or value >= ge) and \
        (lt is None or value < lt) and (le is None or value <= le)
    if ok:
        return float(value)
    constraint = describe_bounds(gt, ge, lt, le, noun)
    msg = f"{where}{field} must be {constraint}{f' ({why})' if why else ''}, got {field}={shown(value)}"
    if fix:
        msg += f"; {fix}"
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    raise (TypeError if type_error and not number else ValueError)(msg)


def check_int(value: Any, field: str, *, ge: int | None = None, le: int | None = None, fix: str | None = None,
              where: str = "") -> int:
    """`value` when it is an int (not a bool) in [ge, le]; otherwise a ValueError of one line:
    ``{where}{field} must be an integer >= {ge}, got {field}={value}; {fix}``."""
    if isinstance(value, int) and not isinstance(value, bool) and (ge is None or value >= ge) and \
            (le is None or value <= le):
        return value
    if ge is not None and le is not None:
        constraint = f"an integer in [{ge}, {le}]"
    elif ge is not None or le is not None:
        constraint = f"an integer {'>=' if ge is not None else '<='} {ge if ge is not None else le}"
    else:
        constraint = "an integer"
    raise ValueError(f"{where}{field} must be {constraint}, got {field}={shown(value)}" + (f"; {fix}" if fix else ""))


def nonfinite_count(t: Any) -> int:
    """How many entries of tensor `t` are NaN or Inf (0 for a meta tensor, which holds no values). One fused
    `isfinite().all()` in the common finite case; the count is taken only when something is off."""
    import torch

    if t.device.type == "meta" or bool(torch.isfinite(t).all()):
        return 0
    return int((~torch.isfinite(t)).sum())


def all_finite(*tensors: Any) -> bool:
    """True when no tensor (tuples of tensors are walked, e.g. a LoRA pair) holds a NaN or Inf."""
    import torch

    for t in tensors:
        if isinstance(t, (tuple, list)):
            if not all_finite(*t):
                return False
        elif t.device.type != "meta" and not bool(torch.isfinite(t).all()):
            return False
    return True


def check_finite(t: Any, name: str, *, why: str | None = None, fix: str | None = None) -> None:
    """A ValueError of one line when tensor `t` holds NaN/Inf: ``{name} contains NaN or Inf ({n} of {numel} values,
    shape (...)): {why}; {fix}``. `name` says which tensor (an argument, a layer's weight)."""
    bad = nonfinite_count(t)
    if bad:
        msg = f"{name} contains NaN or Inf ({bad} of {t.numel()} values, shape {tuple(t.shape)})"
        msg += f": {why}" if why else ""
        msg += f"; {fix}" if fix else ""
        raise ValueError(msg)


__all__ = ["all_finite", "check_finite", "check_int", "check_number", "describe_bounds", "is_real", "nonfinite_count",
           "shown"]
