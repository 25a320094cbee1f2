"""peft_ext._checks: the one wording of number checks (scalar fields and tensors)."""

import math

import pytest
import torch

from peft_ext._checks import all_finite, check_finite, check_int, check_number, describe_bounds, nonfinite_count


@pytest.mark.parametrize("bounds, words", [
    ({}, "a finite real number"),
    ({"gt": 0}, "a number > 0"),
    ({"ge": 1}, "a number >= 1"),
    ({"lt": 0.5}, "a number < 0.5"),
    ({"ge": 0, "lt": 1}, "a number in [0, 1)"),
    ({"gt": 0, "le": 1}, "a number in (0, 1]"),
    ({"gt": 0, "lt": 1}, "a number strictly between 0 and 1"),
])
def test_bounds_in_words(bounds, words):
    assert describe_bounds(**bounds) == words


def test_check_number_accepts_and_refuses_with_field_value_and_fix():
    assert check_number(3, "lr", gt=0) == 3.0 and isinstance(check_number(3, "lr", gt=0), float)
    assert check_number(0.0, "p", ge=0, lt=1) == 0.0
    for bad in (0, -1.0, math.nan, math.inf, True, "1", None):
        with pytest.raises(ValueError) as e:
            check_number(bad, "rate", gt=0, where="Cfg.", why="scales the output", fix="e.g. rate=1")
        msg = str(e.value)
        assert "\n" not in msg
        assert msg.startswith("Cfg.rate must be a number > 0 (scales the output), got rate=")
        assert msg.endswith("; e.g. rate=1")
    with pytest.raises(ValueError, match=r"^x must be a number in \[0, 1\), got x='0.1' \(str\)$"):
        check_number("0.1", "x", ge=0, lt=1)
    with pytest.raises(ValueError, match=r"x must be a finite number > 0, got x=inf"):
        check_number(math.inf, "x", gt=0, noun="a finite number")
    with pytest.raises(TypeError, match=r"t must be a number > 0, got t=None"):
        check_number(None, "t", gt=0, type_error=True)
    with pytest.raises(ValueError, match=r"t must be a number > 0, got t=0"):
        check_number(0, "t", gt=0, type_error=True)  # a number out of bounds stays a ValueError


def test_check_int():
    assert check_int(3, "k", ge=1) == 3
    for bad in (0, 2.0, True, "3"):
        with pytest.raises(ValueError, match=r"^f: k must be an integer >= 1, got k=.*; e\.g\. k=8$"):
            check_int(bad, "k", ge=1, where="f: ", fix="e.g. k=8")
    with pytest.raises(ValueError, match=r"n must be an integer in \[1, 9\], got n=10"):
        check_int(10, "n", ge=1, le=9)


def test_tensor_checks():
    t = torch.tensor([[1.0, math.nan], [math.inf, -math.inf]])
    assert nonfinite_count(t) == 3 and nonfinite_count(torch.ones(3)) == 0
    assert nonfinite_count(torch.empty(4, device="meta")) == 0  # holds no values
    assert all_finite(torch.ones(2), (torch.ones(1), torch.zeros(2)), torch.empty(2, device="meta"))
    assert not all_finite(torch.ones(2), (torch.ones(1), t))
    check_finite(torch.ones(2, 2), "m")
    with pytest.raises(ValueError, match=r"^m contains NaN or Inf \(3 of 4 values, shape \(2, 2\)\): why; fix$"):
        check_finite(t, "m", why="why", fix="fix")
