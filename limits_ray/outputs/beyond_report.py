"""The frontier's extensions in ``report.md``: the certified bracket past the trusted range and the win rates.

Markdown tables for :func:`limits_ray.outputs.report.write_report`, from the ``bracket`` and
``winrate_mean`` tables of a result (README, "Output"; :mod:`limits_ray.core.bracket`,
:mod:`limits_ray.core.winrate`).
"""

from __future__ import annotations

import numpy as np

from limits_ray.core.bracket import bracket_at
from limits_ray.core.headline import Z95
from limits_ray.core.tables import ReduceResult
from limits_ray.core.winrate import rank_tilt_at_kl, winrate_at_kl
from limits_ray.outputs.numbers import format_number

__all__ = ["bracket_lines", "winrate_lines"]


def bracket_lines(result: ReduceResult, budgets: tuple[float, ...]) -> list[str]:
    """A section: per self-evaluated frontier, the certified bracket at each budget past its trusted range."""
    bracket = result.bracket
    if bracket.num_rows == 0:
        return []
    lines = ["## Past the trusted range: certified bracket", "",
             "The frontier is concave, so past the last trusted point it lies under the tangent there (upper end of its "
             "95% interval), and above every achievable point the data certify (best-of-n, trusted tilted points, "
             "measured policies, and their mixtures, each at the far end of its interval). Each side holds with "
             "97.5% confidence.", "",
             "| align | KL budget [nats] | gain at least | gain at most | lower bound from |", "|---|---:|---:|---:|---|"]
    for align in sorted(set(bracket["align"].to_pylist())):
        kl_max = max(bracket["kl"].to_pylist())
        for budget in budgets:
            found = bracket_at(bracket, budget, align, align)
            if found is None or budget > kl_max:
                continue
            lines.append(f"| {align} | {budget:g} | {format_number(found.lower)} | {format_number(found.upper)} "
                         f"| {found.lower_source} |")
    return lines + [""]


def winrate_lines(result: ReduceResult, budgets: tuple[float, ...]) -> list[str]:
    """A section: the prompt-mean win rate over pi0 at each budget, with the win-rate-optimal value."""
    mean = result.winrate_mean
    if mean.num_rows == 0:
        return []
    lines = ["## Win rate over the base model", "",
             "P(a response of the policy beats one of π₀ in eval), ties half, prompt mean ± 95%. Align `rank(e)`: the "
             "win-rate-optimal policies (tilts of e's calibrated reward) from the samples; the last column their closed "
             "form for a reward without ties.", "",
             "| align | eval | KL budget [nats] | win rate | trusted | optimum (continuous) |", "|---|---|---:|---:|---|---:|"]
    for align, evaluation in sorted(set(zip(mean["align"].to_pylist(), mean["eval"].to_pylist()))):
        for budget in budgets:
            point = winrate_at_kl(mean, budget, align, evaluation)
            if point is None:
                continue
            interval = "" if not np.isfinite(point.winrate_se) else f" ± {format_number(Z95 * point.winrate_se, 2)}"
            lines.append(f"| {align} | {evaluation} | {budget:g} | {format_number(point.winrate_bc, 4)}{interval} "
                         f"| {'yes' if point.trusted else 'no'} | {format_number(rank_tilt_at_kl(budget)[1], 4)} |")
    return lines + [""]
