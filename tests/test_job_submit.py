"""`ray job submit` of the tiny job to a local Ray head started by the test (and stopped by it)."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from limits_ray.core.schemas import SCHEMAS

from _cluster import start_head, submit
from _tiny import tiny_job_mapping

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def ray_head(tmp_path):
    """A Ray head of our own (token auth disabled, as the CLI must match), stopped with its process group."""
    head, url, _ = start_head(tmp_path, num_cpus=4)
    try:
        yield url
    finally:
        head.stop()


def test_ray_job_submit_runs_the_tiny_job_with_outputs_below_limits_ray_root(ray_head, tiny_models, tmp_path):
    """The README's rule: under ``ray job submit --working-dir``, a relative output_dir resolves below
    ``$LIMITS_RAY_ROOT`` (a path or bucket URI every node reaches), not in the job's working-dir copy."""
    root = tmp_path / "root"
    out_dir = root / "runs" / "submitted"
    mapping = tiny_job_mapping(tiny_models, Path("runs/submitted"), ray_address="",
                               prompts={"inline": ["The cat sat on the", "Once upon a time"]})
    mapping["generation"]["samples_per_prompt"] = 32
    config_path = tmp_path / "tiny.yaml"
    config_path.write_text(yaml.safe_dump(mapping))
    result = submit(ray_head, REPO, {"env_vars": {"LIMITS_RAY_ROOT": str(root)}},
                    ["python", "jobs/frontier.py", "--config", str(config_path)], timeout=900)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert "succeeded" in result.stdout.lower()
    for name, schema in SCHEMAS.items():
        table = pq.read_table(out_dir / f"{name}.parquet")
        assert table.schema.equals(schema) and table.num_rows > 0
    assert set(pq.read_table(out_dir / "frontier.parquet")["n"].to_pylist()) == {32}
    assert (out_dir / "frontier.png").stat().st_size > 10_000
    assert (root / "runs" / "submitted" / "store" / "manifest.json").is_file()
