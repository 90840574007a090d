"""Numbers printed for people: significant digits, no negative zeros, no '± nan'."""

from __future__ import annotations

import pytest

from limits_ray.outputs.numbers import MISSING, format_estimate, format_number


@pytest.mark.parametrize("value, text", [
    (-1.665e-16, "0"), (0.0, "0"), (-0.0, "0"), (-4e-13, "0"), (2e-12, "2e-12"),
    (0.123456, "0.123"), (-2.71828, "-2.72"), (12345.6, "1.23e+04"), (1.0, "1"),
    (float("nan"), MISSING), (None, MISSING), (float("inf"), "inf"), (float("-inf"), "-inf"),
])
def test_format_number(value, text):
    assert format_number(value) == text


def test_format_number_never_prints_a_negative_zero():
    for value in (-1e-13, -1.665e-16, -0.0):
        assert not format_number(value).startswith("-")


@pytest.mark.parametrize("value, se, text", [
    (0.51234, 0.031234, "0.512 ± 0.031"),
    (0.51234, -0.031234, "0.512 ± 0.031"),
    (-1.665e-16, float("nan"), "0¹"),
    (0.6137, None, "0.614¹"),
    (1.5, 0.0, "1.5 ± 0"),
])
def test_format_estimate_leaves_a_missing_se_out(value, se, text):
    assert format_estimate(value, se, mark="¹") == text
    assert "nan" not in format_estimate(value, se)
