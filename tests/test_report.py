"""`limits-ray report` on a reduced result: the figures and the one-page summary."""

from __future__ import annotations

import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from limits_ray.cli import main
from limits_ray.config import AnalysisConfig
from limits_ray.reduce import reduce_samples


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
    result.write(root / "results")
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
    from limits_ray.offline import reduce_dataset
    from limits_ray.report import load_result

    config = AnalysisConfig(betas="0.1:10:9", align=("gold", "proxy"), evals=("gold",))
    reduce_dataset(results.parent / "samples.parquet", tmp_path / "sharded", config, bucket_rows=300)
    assert (tmp_path / "sharded" / "frontier.parquet").is_dir()
    sharded, single = load_result(tmp_path / "sharded"), load_result(results)
    for name in ("frontier", "bon", "convergence"):
        keys = [(column, "ascending") for column in getattr(single, name).column_names[:5]]
        assert getattr(sharded, name).sort_by(keys).select([0, 1, 2, 3]).equals(getattr(single, name).sort_by(keys).select([0, 1, 2, 3]))
    assert sharded.frontier_mean.num_rows == single.frontier_mean.num_rows == 2 * 9
