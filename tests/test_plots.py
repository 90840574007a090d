"""The figures: every plot writes a legible PNG from small tables, with counts in its title."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from limits_ray.core.analysis import AnalysisConfig
from limits_ray.core.convergence import settle_table, summarize
from limits_ray.core.tables import reduce_table
from limits_ray.outputs.figures import ess_source, plot_convergence_bands, plot_ess_prompts, plot_frontier_by_n, write_plots


def _result():
    rng = np.random.default_rng(0)
    n = 128
    table = pa.table({"prompt_id": np.repeat(["a", "b", "c"], n), "sample_idx": np.tile(np.arange(n), 3),
                      "r": rng.normal(0, 1, 3 * n)})
    return reduce_table(table, ["r"], AnalysisConfig(betas="0.3:10:6"))


def test_write_plots_keeps_its_signature_and_writes_five_figures(tmp_path):
    paths = write_plots(_result(), tmp_path, title="plots")
    assert sorted(p.name for p in paths) == ["convergence.png", "ess.png", "frontier.png", "frontier_by_n.png", "winrate.png"]
    assert all(p.stat().st_size > 20_000 for p in paths)
    without_bon = reduce_table(pa.table({"prompt_id": ["a"] * 64, "sample_idx": np.arange(64), "r": np.linspace(0, 1, 64)}),
                               ["r"], AnalysisConfig(betas="0.3:10:6", best_of_n=False))
    assert "winrate.png" not in [p.name for p in write_plots(without_bon, tmp_path / "no_bon", title="plots")]


def test_the_frontier_figure_shades_the_bracket(tmp_path):
    """The bracket's area and the hatched unachievable region are drawn on the align = eval panel."""
    import matplotlib.pyplot as plt

    from limits_ray.outputs.beyond_plots import draw_bracket

    result = _result()
    figure, axis = plt.subplots()
    assert draw_bracket(axis, result.bracket, "r", "r", result.frontier_mean["gain"].to_numpy())
    labels = [collection.get_label() for collection in axis.collections]
    assert "certified bracket past the trusted range (95%)" in labels
    assert "unachievable: above the tangent at the last trusted point" in labels
    assert not draw_bracket(axis, result.bracket, "other", "other", np.zeros(1))
    plt.close(figure)


def test_each_plot_reports_whether_it_drew(tmp_path):
    result = _result()
    summary = summarize(result.convergence)
    assert plot_convergence_bands(summary, tmp_path / "c.png", "t", settle=settle_table(summary))
    assert plot_frontier_by_n(summary, tmp_path / "f.png", "t")
    ess = ess_source(result.frontier)
    assert ess.num_rows == 3 * 6 and plot_ess_prompts(ess, tmp_path / "e.png", "t")
    assert not plot_convergence_bands(summary.slice(0, 0), tmp_path / "none.png", "t")
    assert not (tmp_path / "none.png").exists()


def test_figures_mark_the_unreliable_betas(tmp_path):
    """beta = 0.3 sigma at N = 128 is unreliable for every prompt: the summary says so and the figures draw."""
    result = _result()
    mean = result.frontier_mean.to_pylist()
    assert mean[0]["beta"] == 0.3 and mean[0]["reliable"] == 0.0 and mean[-1]["reliable"] == 1.0
    summary = summarize(result.convergence)
    assert "reliable" in summary.column_names
    assert set(summary["reliable"].to_pylist()) >= {0.0, 1.0}
    paths = write_plots(result, tmp_path, title="marks")
    assert {p.name for p in paths} >= {"frontier.png", "convergence.png"}
