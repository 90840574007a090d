"""The console table and compare.md of `limits-ray compare`: units, footnotes, no '± nan' or '-0'."""

from __future__ import annotations

import math

import pyarrow as pa

from limits_ray.core.compare_tables import POLICY_SCHEMA
from limits_ray.outputs.compare_report import BON_FOOTNOTE, compare_lines

NAN = math.nan


def _row(policy, kind, bon_n, kl, kl_se, gain, gain_se, frontier_gain, frontier_gain_se, beyond=False):
    gap = frontier_gain - gain
    return {
        "policy": policy, "kind": kind, "bon_n": bon_n, "align": "rm_b", "eval": "rm_b", "prompts": 3, "samples": 192,
        "kl": kl, "kl_se": kl_se, "gain": gain, "gain_se": gain_se, "frontier_beta": 1.0, "frontier_gain": frontier_gain,
        "frontier_gain_se": frontier_gain_se, "beyond_grid": beyond, "gap": gap, "gap_se": math.hypot(gain_se, frontier_gain_se),
    }


def _table():
    rows = [
        _row("policy_b", "checkpoint", 0, 9.8123, 0.41234, 0.30456, 0.0512, 0.91234, 0.0423, beyond=True),
        _row("base", "checkpoint", 0, 0.0012345, 0.0021, -0.0101, 0.0302, 0.000412, 0.0011),
        _row("best-of-1", "best_of_n", 1, -1.665e-16, NAN, 1.1e-17, NAN, 0.0, 0.0),
        _row("best-of-4", "best_of_n", 4, 0.6362944, NAN, 0.5123456, NAN, 0.498765, 0.0212),
    ]
    return pa.Table.from_pylist(rows, schema=POLICY_SCHEMA)


def test_compare_lines():
    lines = compare_lines(_table())
    assert lines[0].split() == ["policy", "eval", "KL", "[nats]", "gain", "[reward]", "frontier", "gain", "[reward]",
                                "gap", "[reward]"]
    body = "\n".join(lines)
    assert "nan" not in body and "-0 " not in body and "e-16" not in body and "e-17" not in body
    cells = {line.split()[0]: line for line in lines[1:5]}
    assert cells["policy_b"].split()[2:] == ["9.81", "±", "0.41", "0.305", "±", "0.051", "0.912", "±", "0.042",
                                             "≥", "0.608", "±", "0.066"]
    assert cells["best-of-1"].split()[2:] == ["0¹", "0¹", "0", "±", "0", "0¹"]
    assert cells["best-of-4"].split()[2:] == ["0.636¹", "0.512¹", "0.499", "±", "0.021", "-0.0136¹"]
    assert lines[5] == f"¹ {BON_FOOTNOTE}"
    assert lines[6].startswith("² the policy's KL lies beyond the frontier's largest KL")
    assert len(lines) == 7


def test_compare_lines_without_best_of_n_has_no_footnote():
    table = _table().slice(1, 1)
    assert len(compare_lines(table)) == 2


def test_markdown_table_has_units_and_no_nan():
    from limits_ray.outputs.compare_report import markdown_table

    lines = markdown_table(_table(), ["policy", "kl", "kl_se", "gain"])
    assert lines[0] == "| policy | KL [nats] | KL SE [nats] | gain [reward] |"
    assert lines[4] == "| best-of-1 | 0 | — | 0 |"
    assert "nan" not in "\n".join(lines)
