"""Tests of limits_ray.core.reward_spec: ``NAME`` and ``mean(a,b,...)``."""

from __future__ import annotations

import numpy as np
import pytest

from limits_ray.core.reward_spec import RewardSpec


@pytest.mark.parametrize("text", ["a", "gold", "proxy_0", "_rm", "rm.v1-large", "  gold  ", "mean"])
def test_plain_column(text):
    spec = RewardSpec.parse(text)
    assert spec.name == text.strip()
    assert spec.columns == (text.strip(),)


@pytest.mark.parametrize("text, name, columns", [
    ("mean(a, b)", "mean(a,b)", ("a", "b")),
    ("mean(a,b)", "mean(a,b)", ("a", "b")),
    ("  mean( proxy_0 ,proxy_1,  proxy_2 )  ", "mean(proxy_0,proxy_1,proxy_2)", ("proxy_0", "proxy_1", "proxy_2")),
    ("mean(a)", "mean(a)", ("a",)),
    ("mean(rm.v1,rm-2)", "mean(rm.v1,rm-2)", ("rm.v1", "rm-2")),
])
def test_ensemble(text, name, columns):
    spec = RewardSpec.parse(text)
    assert spec.name == name
    assert spec.columns == columns
    assert RewardSpec.parse(spec.name) == spec  # the canonical name parses back to the same spec


@pytest.mark.parametrize("text", [
    "", "   ", "1abc", "a b", "a,b", "mean()", "mean(a,)", "mean(,a)", "mean(a b)", "mean(a,b", "mean a,b)",
    "max(a,b)", "mean((a,b))", "mean(1x)", "a+b", "mean(a;b)",
])
def test_bad_specs_raise(text):
    with pytest.raises(ValueError, match="mean\\(") as error:
        RewardSpec.parse(text)
    assert repr(text.strip()) in str(error.value)


def test_values_plain_and_mean():
    columns = {"a": np.array([1.0, 2.0, 3.0]), "b": np.array([3.0, 0.0, -3.0]), "c": np.array([2, 4, 6])}
    np.testing.assert_array_equal(RewardSpec.parse("a").values(columns), [1.0, 2.0, 3.0])
    np.testing.assert_allclose(RewardSpec.parse("mean(a,b)").values(columns), [2.0, 1.0, 0.0], rtol=1e-15)
    np.testing.assert_allclose(RewardSpec.parse("mean(a,b,c)").values(columns), [2.0, 2.0, 2.0], rtol=1e-15)
    assert RewardSpec.parse("c").values(columns).dtype == np.float64


def test_values_missing_column_names_it():
    with pytest.raises(KeyError) as error:
        RewardSpec.parse("mean(a,zz)").values({"a": np.zeros(2), "b": np.zeros(2)})
    assert "zz" in str(error.value) and "'a'" in str(error.value)


def test_specs_are_hashable_values():
    assert RewardSpec.parse("mean(a, b)") == RewardSpec.parse("mean(a,b)")
    assert len({RewardSpec.parse("a"), RewardSpec.parse(" a "), RewardSpec.parse("mean(a)")}) == 2
