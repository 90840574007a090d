"""`limits-ray report` on a reduced result: the figures and the one-page summary."""

from __future__ import annotations

import re

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from limits_ray.cli import main
from limits_ray.core.analysis import AnalysisConfig
from limits_ray.runs.reduce import reduce_samples
from limits_ray.storage.results import write_result


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    rng = np.random.default_rng(0)
    prompts, n = 4, 256
    table = pa.table({
        "prompt_id": np.repeat([f"p{i}" for i in range(prompts)], n), "sample_idx": np.tile(np.arange(n), prompts),
        "gold": rng.normal(0, 1, prompts * n), "proxy": rng.normal(0, 1, prompts * n),
    })
    root = tmp_path_factory.mktemp("report")
    pq.write_table(table, root / "samples.parquet")
    result = reduce_samples(root / "samples.parquet", AnalysisConfig(betas="0.1:10:9", align=("gold", "proxy"), evals=("gold",)))
    write_result(result, root / "results")
    return root / "results"


def test_report_writes_figures_and_summary(results, tmp_path, capsys):
    assert main(["report", str(results), "--out", str(tmp_path), "--title", "synthetic"]) == 0
    for name in ("frontier.png", "convergence.png", "frontier_by_n.png", "ess.png"):
        assert (tmp_path / name).stat().st_size > 20_000, name
    text = (tmp_path / "report.md").read_text()
    assert text.startswith("# synthetic") and "4 prompts, N = 256 samples per prompt, 9 betas" in text
    assert "![" in text and "(frontier.png)" in text and "## Convergence" in text
    assert "| gold | gold | 0.5 |" in text  # the frontier at a KL budget
    assert "## Where the estimates can be trusted" in text
    ranges = [line for line in text.splitlines() if re.fullmatch(r"\| gold \| gold \| [0-9.e+-]+ to [0-9.e+-]+ \|", line)]
    assert len(ranges) == 1  # N = 256: beta = 0.1 is unreliable, beta = 10 is not, so a proper range
    low, high = (float(v) for v in ranges[0].split("|")[3].split(" to "))
    assert 0 < low < high
    assert "wrote" in capsys.readouterr().out


def test_report_of_a_directory_without_results_fails_cleanly(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "frontier.parquet does not exist" in capsys.readouterr().err


def test_load_result_reads_the_sharded_tables_of_reduce(results, tmp_path):
    from limits_ray.runs.reduce import reduce_dataset
    from limits_ray.storage.results import load_result

    config = AnalysisConfig(betas="0.1:10:9", align=("gold", "proxy"), evals=("gold",))
    reduce_dataset(results.parent / "samples.parquet", tmp_path / "sharded", config, bucket_rows=300)
    assert (tmp_path / "sharded" / "frontier.parquet").is_dir()
    sharded, single = load_result(tmp_path / "sharded"), load_result(results)
    for name in ("frontier", "bon", "convergence"):
        keys = [(column, "ascending") for column in getattr(single, name).column_names[:5]]
        assert getattr(sharded, name).sort_by(keys).select([0, 1, 2, 3]).equals(getattr(single, name).sort_by(keys).select([0, 1, 2, 3]))
    assert sharded.frontier_mean.num_rows == single.frontier_mean.num_rows == 2 * 9


def _copy_with_reliable(results, out, reliable):
    """The results directory with a ``reliable`` column (a function of the frontier table) in frontier.parquet."""
    import shutil

    shutil.copytree(results, out)
    frontier = pq.read_table(out / "frontier.parquet")
    column = frontier.schema.get_field_index("reliable")
    pq.write_table(frontier.set_column(column, "reliable", pa.array(reliable(frontier), pa.bool_())), out / "frontier.parquet")
    return out


def test_report_opens_with_a_summary(results):
    from limits_ray.core.frontier import point_at_kl
    from limits_ray.core.reliability import FALLBACK_ESS_FLOOR
    from limits_ray.outputs.report import summary_lines
    from limits_ray.storage.results import load_result

    result = load_result(results)
    result.frontier = result.frontier.drop_columns(["reliable"])  # results written before the column: the ESS floor
    lines = summary_lines(result)
    assert lines[0] == "## Summary" and "at least 90% of the prompts' estimates reliable (Kish ESS ≥ 10)" in lines[2]
    frontier = result.frontier.filter(pc.equal(result.frontier["align"], "gold")).to_pandas()
    ok = (frontier["ess"] >= FALLBACK_ESS_FLOOR).groupby(frontier["beta"]).mean() >= 0.9
    trusted = [beta for beta in sorted(ok.index, reverse=True)]
    trusted = trusted[: next((i for i, beta in enumerate(trusted) if not ok[beta]), len(trusted))]
    assert 0 < len(trusted) < len(ok)  # the synthetic case has both
    mean = result.frontier_mean.to_pandas()
    gold = mean[(mean["align"] == "gold") & (mean["eval"] == "gold")].sort_values("kl")
    kl_max = float(gold[gold["beta"] == trusted[-1]]["kl"].iloc[0])
    line = next(line for line in lines if line.startswith("- **gold**"))
    assert line.startswith(f"- **gold**: trusted up to KL {kl_max:.3g} (β ≥ {trusted[-1]:.3g}). Gain ")
    point = point_at_kl(result.frontier_mean, 0.1, "gold", "gold")  # the gain and its error bar at the fixed KL
    assert f"{point.gain:.3g} ± {1.96 * point.gain_se:.2g} at KL 0.1" in line and np.isfinite(point.gain_se)
    assert all(f"at KL {budget:g}" not in line for budget in (0.1, 0.5, 1, 2, 4) if budget > kl_max)
    index = lines.index(line)
    assert lines[index + 1].startswith("  Best-of-n: n = 2: KL 0.193")  # log 2 - 1/2 without ties
    assert lines[index + 2].startswith(f"  Where more samples matter most: at β = {sorted(ok.index, reverse=True)[len(trusted)]:.3g}")
    assert all("nan" not in line for line in lines)


def test_the_summary_uses_the_reliable_column_when_there_is_one(results, tmp_path):
    from limits_ray.outputs.report import summary_lines
    from limits_ray.storage.results import load_result

    everywhere = _copy_with_reliable(results, tmp_path / "all", lambda table: [True] * table.num_rows)
    lines = summary_lines(load_result(everywhere))
    assert "the `reliable` column of frontier.parquet" in lines[2]
    assert "(β ≥ 0.1)" in next(line for line in lines if line.startswith("- **gold**"))
    assert "every beta of the grid is trusted" in next(line for line in lines if "Where more samples" in line)

    nowhere = _copy_with_reliable(results, tmp_path / "none", lambda table: [False] * table.num_rows)
    lines = summary_lines(load_result(nowhere))
    assert next(line for line in lines if line.startswith("- **gold**")).startswith("- **gold**: no β of the grid is trusted")


def test_report_md_opens_with_the_summary(results, tmp_path):
    assert main(["report", str(results), "--out", str(tmp_path)]) == 0
    text = (tmp_path / "report.md").read_text()
    assert text.index("## Summary") < text.index("![")
