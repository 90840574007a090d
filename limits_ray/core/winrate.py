"""Win rate against the base model: of the tilted policies, of best-of-n, and the win-rate-optimal curve.

The win rate of a policy ``pi`` over ``pi0`` in a reward ``e`` (MATH.md, "Win rate") is the probability
that a response of ``pi`` beats one of ``pi0`` in ``e``, ties counting half:
``W = P(e(y) > e(y')) + P(e(y) = e(y'))/2 = E_pi[F0(e)]``, ``y ~ pi``, ``y' ~ pi0``, with
``F0(t) = P0(e < t) + P0(e = t)/2`` the mid-CDF of ``e`` under ``pi0``. ``pi0`` against itself has
``W = 1/2``. Per prompt, from its N base samples:

* the tilt ``pi_beta ∝ pi0 exp(r/beta)`` of the alignment reward (:func:`tilted_winrate`):
  ``W_hat = sum_i w_i F_(-i)(e_i) / sum_i w_i``, ``w_i = exp(r_i/beta)``, with the leave-one-out
  mid-ranks ``F_(-i)(e_i) = (#{j != i: e_j < e_i} + #{j != i: e_j = e_i}/2) / (N - 1)``
  (:func:`loo_midranks`; ``W_hat = 1/2`` exactly as beta -> infinity). Its KL is the tilt's,
  ``KL(pi_beta || pi0)`` (:class:`limits_ray.core.tilt.TiltStats`). Delta method: ``W = A/B`` with
  ``A = E0[w F0(e)]`` a V-statistic of the kernel ``w(y) h(e(y), e(y'))``, ``h(a, b) = 1[b < a] + 1[b = a]/2``,
  and ``B = E0[w]``, so the influence function is
  ``IF_i = w_i (F_(-i)(e_i) - W) / mean(w) + G_i - W`` with ``G_i = sum_j w_j h(e_j, e_i) / sum_j w_j``
  (the tilted probability of beating ``e_i``), ``se^2 = sum IF_i^2 / (N (N - 1))``; the interval SE
  scales it by ``t_df(0.975)/1.96``, ``df = nu/3`` as the gain's
  (:func:`limits_ray.core.tilt.interval_ratio`), and is NaN where the weights are not reliable (the
  gain's rule on the same weights: :mod:`limits_ray.core.reliability`). The first-order ratio bias
  correction is ``W_bc = W + sum w^2 (F - W) / (sum w)^2`` (as ``gain_bc``).
* the win-rate-optimal policies (:func:`rank_tilt_curve`): maximising ``E_pi[F0(e)] - beta KL`` gives
  the tilt of the calibrated reward ``u = F0(e)`` (the *rank tilt*); for a continuous ``e``, ``u`` is
  uniform on [0, 1] under ``pi0`` and, with ``t = 1/beta``, ``E[e^(t u)] = (e^t - 1)/t``,
  ``W(beta) = e^t/(e^t - 1) - 1/t`` and ``KL(beta) = t W - log((e^t - 1)/t)``: one curve for every
  model and reward (``W -> 1 - 1/t``, ``KL -> log t - 1`` at small beta). With ties in ``e`` the curve
  is the tilt of the empirical mid-CDF ``u_i = (#{e_j < e_i} + #{e_j = e_i}/2)/N`` (:func:`midcdf`);
  its rows carry the alignment label ``rank(<eval>)`` (:func:`rank_label`) and their own beta grid
  (:data:`RANK_BETAS`: ``u`` has no reward units).
* best-of-n (:func:`bon_winrate` for continuous rewards: ``W = n/(n+1)``, ``KL = log n - (n-1)/n``;
  from samples, the best-of-n estimate of :func:`limits_ray.core.bon.best_of_n` with ``F_(-i)(e_i)`` as
  the evaluated value: ``limits_ray.core.tables.bon_rows``' ``winrate`` column).

The prompt means (``winrate_mean``) are :mod:`limits_ray.core.headline`'s, with the same two SEs as the
frontier's. Pure numpy/pyarrow.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from limits_ray.core.analysis import Plan
from limits_ray.core.frontier import trusted_kl_range
from limits_ray.core.headline import mean_sums, mean_table
from limits_ray.core.samples import PromptSamples
from limits_ray.core.schemas import SCHEMAS
from limits_ray.core.tilt import TiltEstimate, TiltStats, finalize_many, interval_ratio

__all__ = [
    "MEAN_COLUMNS", "RANK_BETAS", "WinRate", "WinRatePoint", "WinRateRows", "bon_winrate", "loo_midranks", "midcdf", "rank_label",
    "rank_tilt_at_kl", "rank_tilt_curve", "tilted_winrate", "winrate_at_kl", "winrate_mean", "winrate_sums",
]

_WORK_ELEMENTS = 1 << 20  # float64 elements of one [betas, N] work array (8 MiB)

RANK_BETAS = np.geomspace(1e-3, 10.0, 41)
"""The beta grid of the rank tilts: ``u = F0(e)`` lies in [0, 1] whatever the reward's scale, so one grid
serves every reward: KL from about 5.9 nats (``beta = 1e-3``) down to 4e-4 (``beta = 10``)."""

MEAN_COLUMNS = {"gain": "winrate", "gain_se": "winrate_se", "gain_bc": "winrate_bc", "kl": "kl", "kl_se": "kl_se",
                "kl_bc": "kl_bc", "reliable": "reliable", "gain_se_delta": "winrate_se_delta",
                "kl_se_delta": "kl_se_delta", "bias_allowance": "bias_allowance", "khat_pooled": "khat_pooled",
                "khat": "khat"}
"""The ``winrate`` columns that play the frontier's parts in the prompt mean (:mod:`limits_ray.core.headline`)."""


def rank_label(evaluation: str) -> str:
    """The alignment label of the rank tilt of ``evaluation`` (the win-rate-optimal policies in it)."""
    return f"rank({evaluation})"


def loo_midranks(values: np.ndarray) -> np.ndarray:
    """``[N, C]`` (or ``[N]``): ``F_(-i)(v_i) = (#{j != i: v_j < v_i} + #{j != i: v_j = v_i}/2) / (N - 1)`` per column;
    NaN for N = 1."""
    values = np.asarray(values, dtype=np.float64)
    flat = values.reshape(values.shape[0], -1)
    count = flat.shape[0]
    out = np.full(flat.shape, np.nan)
    if count > 1:
        for column in range(flat.shape[1]):
            ordered = np.sort(flat[:, column])
            below = np.searchsorted(ordered, flat[:, column], side="left")
            equal = np.searchsorted(ordered, flat[:, column], side="right") - below
            out[:, column] = (below + 0.5 * (equal - 1)) / (count - 1)
    return out.reshape(values.shape)


def midcdf(values: np.ndarray) -> np.ndarray:
    """``[N]``: the empirical mid-CDF ``(#{v_j < v_i} + #{v_j = v_i}/2) / N`` (the calibrated reward of the rank tilt)."""
    values = np.asarray(values, dtype=np.float64)
    ordered = np.sort(values)
    below = np.searchsorted(ordered, values, side="left")
    equal = np.searchsorted(ordered, values, side="right") - below
    return (below + 0.5 * equal) / values.size


@dataclass
class WinRate:
    """Win rates of the tilts of one prompt: ``[B, C]`` per beta and evaluation column.

    ``winrate`` the plug-in estimate, ``winrate_bc`` bias-corrected, ``se_delta`` the delta-method SE,
    ``if2``/``if4`` the sums of ``IF^2`` and ``IF^4`` (for the interval SE, :func:`tilted_winrate`).
    """

    winrate: np.ndarray
    winrate_bc: np.ndarray
    se_delta: np.ndarray
    if2: np.ndarray
    if4: np.ndarray


def tilted_winrate(align: np.ndarray, evals: np.ndarray, betas: np.ndarray) -> WinRate:
    """Win rate of each tilt ``pi_beta ∝ pi0 exp(r/beta)`` over ``pi0`` in each evaluation column (module doc).

    Args:
        align: ``[N]`` the alignment reward ``r``.
        evals: ``[N, C]`` the evaluation rewards ``e``.
        betas: ``[B]`` positive.
    """
    r = np.asarray(align, dtype=np.float64)
    e = np.asarray(evals, dtype=np.float64).reshape(r.size, -1)
    betas = np.asarray(betas, dtype=np.float64)
    count, columns = e.shape
    ranks = loo_midranks(e)
    shape = (betas.size, columns)
    winrate, corrected, se, if2, if4 = (np.full(shape, np.nan) for _ in range(5))
    if count < 2:
        return WinRate(winrate, corrected, se, if2, if4)
    sorted_by = [np.argsort(e[:, column], kind="stable") for column in range(columns)]
    groups = []
    for column, order in enumerate(sorted_by):
        _, start, size = np.unique(e[order, column], return_index=True, return_counts=True)
        groups.append((np.repeat(start, size), np.repeat(start + size, size)))  # each sorted sample's tie group
    step = max(1, _WORK_ELEMENTS // count)
    for first in range(0, betas.size, step):
        chunk = slice(first, first + step)
        weights = np.exp((r[None, :] - r.max()) / betas[chunk, None])  # [b, N], at most 1
        total = weights.sum(axis=1)
        scaled = weights * (count / total)[:, None]  # w / mean(w)
        for column, order in enumerate(sorted_by):
            f = ranks[:, column]
            w_hat = weights @ f / total
            cumulative = np.concatenate([np.zeros((weights.shape[0], 1)), np.cumsum(weights[:, order], axis=1)], axis=1)
            start, stop = groups[column]
            tied = cumulative[:, stop] - cumulative[:, start]
            beaten = np.empty_like(weights)
            beaten[:, order] = (total[:, None] - cumulative[:, stop] + 0.5 * tied) / total[:, None]  # G_i
            influence = scaled * (f[None, :] - w_hat[:, None]) + beaten - w_hat[:, None]
            squared = influence * influence
            if2[chunk, column] = squared.sum(axis=1)
            if4[chunk, column] = (squared * squared).sum(axis=1)
            winrate[chunk, column] = w_hat
            corrected[chunk, column] = w_hat + (weights * weights) @ f / total**2 - w_hat * (weights * weights).sum(axis=1) / total**2
    se = np.sqrt(if2 / (count * (count - 1.0)))
    return WinRate(winrate, corrected, se, if2, if4)


def rank_tilt_curve(betas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(W, KL)`` of the win-rate-optimal tilts of a continuous reward (module doc), ``t = 1/beta``."""
    t = 1.0 / np.asarray(betas, dtype=np.float64)
    with np.errstate(over="ignore"):
        # e^t/(e^t - 1) = 1/(1 - e^-t); log((e^t - 1)/t) = t + log(1 - e^-t) - log t (no overflow at large t)
        winrate = 1.0 / -np.expm1(-t) - 1.0 / t
        kl = t * winrate - (t + np.log(-np.expm1(-t)) - np.log(t))
    return winrate, kl


def bon_winrate(n: np.ndarray) -> np.ndarray:
    """``n / (n + 1)``: best-of-n's win rate over ``pi0`` for a continuous reward (select and evaluate alike)."""
    n = np.asarray(n, dtype=np.float64)
    return n / (n + 1.0)


@dataclass
class _Pending:
    """One prompt's win rates, waiting for the batch's weight diagnostics."""

    prompt_id: str
    tilts: list[WinRate]  # per (align, evals) of the plan
    ranks: list[tuple[str, TiltStats, WinRate]]  # per distinct eval: its name, the rank tilt's statistics, its win rates


class WinRateRows:
    """The ``winrate`` rows of a batch of prompts (used by :class:`limits_ray.core.tables.PromptRows`).

    :meth:`add` computes a prompt's win rates from its rewards (:func:`tilted_winrate`); :meth:`flush`
    writes them with the KL and the weight diagnostics of the same tilts: for the plan's alignment rewards
    those of the frontier's estimate (so a win-rate row is reliable exactly where its frontier row is,
    up to the cross-prompt gate's rounding), for the rank tilts their own, finalized for the batch at once.
    Rows come prompt by prompt: each (align, eval) of the plan, then each rank tilt, betas ascending.
    """

    def __init__(self, plan: Plan, betas: np.ndarray) -> None:
        self.plan, self.betas = plan, np.asarray(betas, dtype=np.float64)
        self.evals = list(dict.fromkeys(spec for _, evals in plan for spec in evals))
        self.pending: list[_Pending] = []

    def add(self, samples: PromptSamples) -> None:
        """One prompt's win rates (its rewards are not kept)."""
        tilts = [tilted_winrate(align.values(samples.rewards),
                                np.stack([spec.values(samples.rewards) for spec in evals], axis=1), self.betas)
                 for align, evals in self.plan]
        ranks = []
        for spec in self.evals:
            values = spec.values(samples.rewards)
            calibrated = midcdf(values)
            ranks.append((spec.name, TiltStats.from_samples(RANK_BETAS, calibrated[:, None]),
                          tilted_winrate(calibrated, values[:, None], RANK_BETAS)))
        self.pending.append(_Pending(samples.prompt_id, tilts, ranks))

    def flush(self, builder, estimates: list[tuple[TiltEstimate, np.ndarray]]) -> None:
        """Add the pending prompts' rows; ``estimates[k]`` is the frontier's estimate of the plan's k-th align
        reward and the index of each pending prompt's state in it."""
        if not self.pending:
            return
        ranked = finalize_many([state for item in self.pending for _, state, _ in item.ranks]) if self.evals else None
        for number, item in enumerate(self.pending):
            for (align, evals), rates, (estimate, index) in zip(self.plan, item.tilts, estimates):
                self._rows(builder, item.prompt_id, align.name, [spec.name for spec in evals], rates, estimate,
                           int(index[number]), self.betas)
            for position, (name, _, rates) in enumerate(item.ranks):
                self._rows(builder, item.prompt_id, rank_label(name), [name], rates, ranked,
                           number * len(self.evals) + position, RANK_BETAS)
        self.pending = []

    @staticmethod
    def _rows(builder, prompt_id: str, label: str, names: list[str], rates: WinRate, estimate: TiltEstimate,
              state: int, betas: np.ndarray) -> None:
        reliable = estimate.reliable[state]
        interval = rates.se_delta * interval_ratio(rates.if2, rates.if4, reliable[:, None])
        size = betas.size
        for column, name in enumerate(names):
            builder.add(
                size, prompt_id=prompt_id, align=label, eval=name, beta=betas, n=int(estimate.n[state]),
                winrate=rates.winrate[:, column], winrate_se=interval[:, column], winrate_bc=rates.winrate_bc[:, column],
                winrate_se_delta=rates.se_delta[:, column], kl=estimate.kl[state], kl_se=estimate.kl_se[state],
                kl_bc=estimate.kl_bc[state], kl_se_delta=estimate.kl_se_delta[state], ess=estimate.ess[state],
                khat=estimate.khat[state], body_sd=np.full(size, estimate.body_sd[state]),
                reward_max=np.broadcast_to(np.asarray(estimate.reward_max[state], np.float64), (size,)),
                top_tied=np.broadcast_to(np.asarray(estimate.top_tied[state], bool), (size,)), log_z=estimate.log_z[state],
                khat_pooled=estimate.khat[state],
                reliable=reliable, bias_allowance=np.where(reliable, 0.0, np.inf),
            )


def winrate_sums(table: pa.Table) -> pa.Table:
    """Mergeable per-(align, eval, beta) sums of a (gated) ``winrate`` table's prompts (:func:`limits_ray.core.headline.mean_sums`)."""
    return mean_sums(table, MEAN_COLUMNS)


def winrate_mean(sums: pa.Table | list[pa.Table]) -> pa.Table:
    """The ``winrate_mean`` table from :func:`winrate_sums` of one or several disjoint prompt sets."""
    schema = SCHEMAS["winrate_mean"]
    return mean_table(sums, MEAN_COLUMNS).select(schema.names).cast(schema)


def rank_tilt_at_kl(kl_budget: float) -> tuple[float, float]:
    """``(beta, W)`` of the win-rate-optimal tilt of a continuous reward whose KL is ``kl_budget`` (by bisection
    in ``log beta``: the KL falls as beta grows); ``(inf, 0.5)`` at ``kl_budget <= 0``."""
    if not kl_budget > 0:
        return float("inf"), 0.5
    low, high = -12.0, 12.0  # log10 beta: KL from about 27 nats down to 1e-26
    for _ in range(200):
        middle = (low + high) / 2
        if rank_tilt_curve(np.array([10.0**middle]))[1][0] > kl_budget:
            low = middle
        else:
            high = middle
    beta = 10.0 ** ((low + high) / 2)
    return beta, float(rank_tilt_curve(np.array([beta]))[0][0])


@dataclass
class WinRatePoint:
    """The prompt-mean win rate of one (align, eval) at a KL budget: the beta there, ``winrate`` (plug-in),
    the interval ``winrate_bc +- 1.96 winrate_se`` (NaN SE: some prompt's weights unreliable), and whether
    the budget lies in the trusted KL range (:func:`limits_ray.core.frontier.trusted_kl_range`)."""

    align: str
    eval: str
    kl: float
    beta: float
    winrate: float
    winrate_bc: float
    winrate_se: float
    trusted: bool


def winrate_at_kl(winrate_mean_table: pa.Table, kl_budget: float, align: str, evaluation: str) -> WinRatePoint | None:
    """One (align, eval) win-rate curve of a ``winrate_mean`` table at ``KL = kl_budget``, interpolated linearly
    in KL (``log beta`` likewise); None outside the grid's KL range or for a pair the table lacks."""
    rows = winrate_mean_table.filter(pc.and_(pc.equal(winrate_mean_table["align"], align),
                                             pc.equal(winrate_mean_table["eval"], evaluation)))
    if rows.num_rows == 0:
        return None
    order = np.argsort(rows["kl"].to_numpy())
    kl = rows["kl"].to_numpy()[order]
    if not kl[0] <= kl_budget <= kl[-1]:
        return None
    value = {name: float(np.interp(kl_budget, kl, rows[name].to_numpy()[order]))
             for name in ("winrate", "winrate_bc", "winrate_se")}
    trusted = trusted_kl_range(rows, align, evaluation)
    return WinRatePoint(align, evaluation, float(kl_budget),
                        float(np.exp(np.interp(kl_budget, kl, np.log(rows["beta"].to_numpy()[order])))),
                        value["winrate"], value["winrate_bc"], value["winrate_se"],
                        trusted is not None and trusted[0] <= kl_budget <= trusted[1])

