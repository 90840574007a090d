"""The nightly history page: real nights on synthetic rounds, the page opened in headless Chromium.

Four nights of a synthetic setup (no model): two of one series, a night that fails (its prompts file is
missing), then a new series whose responses run to 12 words instead of 8 (a frontier higher by a known
amount: tests/test_run_diff.py). The page must say what changed, flag the new series' night as higher
than the night before, list every night of the ledger with its status, and load in a browser with
every figure. Chromium comes from the distribution's packages (Debian: ``apt-get install chromium``),
installed here when missing; the browser tests are skipped, saying why, only where that cannot be done.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from limits_ray.cli import main
from limits_ray.config import JobConfig, from_mapping
from limits_ray.core.errors import ConfigError
from limits_ray.runs.history import gather_nights, write_history
from limits_ray.runs.nightly import run_night

NIGHTS = (("2026-01-01", 8, False), ("2026-01-02", 8, False), ("2026-01-03", 8, True), ("2026-01-04", 12, False))


def nightly_config(root: Path, max_tokens: int, broken: bool = False) -> JobConfig:
    prompts = ({"path": str(root / "missing-prompts.jsonl")} if broken
               else {"inline": [f"prompt number {index}" for index in range(12)]})
    return from_mapping(JobConfig, {
        "name": "synthetic-nightly", "output_dir": str(root / "out"), "ray_address": "local",
        "prompts": {**prompts, "template": "Q: {prompt}\nA:"},
        "generation": {"kind": "synthetic", "samples_per_prompt": 256, "n": 128, "seed": 0, "max_tokens": max_tokens,
                       "batch_size": 4, "num_cpus": 0.5},
        "rewards": [{"name": "length", "kind": "function", "function": "limits_ray.reward_functions:response_length",
                     "num_cpus": 0.5, "batch_size": 4096}],
        "analysis": {"betas": "0.2:20:13"},
        "nightly": {"rounds_per_night": 2, "root": str(root / "nightly")},
    })


class _Page(HTMLParser):
    """The rows of the nights table and every image and link of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[dict[str, str]] = []
        self.images: list[str] = []
        self.links: list[str] = []
        self.ids: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        if "id" in attributes:
            self.ids.add(str(attributes["id"]))
        if tag == "tr" and "data-date" in attributes:
            self.rows.append({key: str(value) for key, value in attributes.items()})
        elif tag == "img":
            self.images.append(str(attributes["src"]))
        elif tag == "a":
            self.links.append(str(attributes["href"]))


def parse(text: str) -> _Page:
    page = _Page()
    page.feed(text)
    return page


@pytest.fixture(scope="module")
def nightly(tmp_path_factory, ray_local):
    """The nightly root after the four nights, and its page's text after the first night."""
    base = tmp_path_factory.mktemp("history")
    root, first_page = base / "nightly", None
    for date, max_tokens, broken in NIGHTS:
        config = nightly_config(base, max_tokens, broken)
        if broken:
            with pytest.raises(ConfigError, match="prompts.path"):
                run_night(config, date)
        else:
            run_night(config, date)
        if first_page is None:
            first_page = (root / "index.html").read_text()
    return root, first_page


@pytest.mark.slow
def test_a_root_with_one_night_renders(nightly):
    root, first_page = nightly
    page = parse(first_page)
    assert [row["data-date"] for row in page.rows] == ["2026-01-01"]
    assert page.images == ["2026-01-01/frontier.png", "history/gain.png", "history/health.png"]
    assert "first complete night" in first_page and "new: first night" in first_page


@pytest.mark.slow
def test_the_ledger_records_identity_failures_and_the_change(nightly):
    root, _ = nightly
    ledger = json.loads((root / "ledger.json").read_text())
    assert [ledger[date]["completed"] for date, _, _ in NIGHTS] == [True, True, False, True]
    assert ledger["2026-01-03"]["error"].startswith("ConfigError: prompts.path")
    assert ledger["2026-01-04"]["identity"]["sampling"]["max_tokens"] == 12 and ledger["2026-01-04"]["quarantined_rounds"] == 0
    night = json.loads((root / "2026-01-04" / "nightly.json").read_text())
    assert night["previous"] == "2026-01-02" and night["quarantined_rounds"] == 0
    change = pq.read_table(root / "2026-01-04" / "change" / "frontier_diff.parquet").to_pylist()
    at_01 = [row for row in change if row["at"] == "kl" and row["kl_a"] == 0.1]
    assert len(at_01) == 1 and at_01[0]["verdict"] == "higher" and at_01[0]["prompts_common"] == 12
    assert not (root / "2026-01-01" / "change").exists()  # nothing before the first night


@pytest.mark.slow
def test_the_page_says_what_changed_and_flags_the_new_series(nightly):
    root, _ = nightly
    text = (root / "index.html").read_text()
    page = parse(text)
    ledger = json.loads((root / "ledger.json").read_text())
    assert [(row["data-date"], row["data-status"], row["data-series"]) for row in page.rows] == [
        (date, "complete" if ledger[date]["completed"] else "incomplete", ledger[date]["series"]) for date in sorted(ledger, reverse=True)]
    assert "new: sampling max_tokens: 8 → 12" in text
    assert "failed: ConfigError: prompts.path" in text
    assert re.search(r'id="flags">Nights that differ from the night before: 2026-01-04 \(higher at KL 0\.1', text)
    assert "not distinguishable from 2026-01-01" in text  # the second night of the first series
    assert page.images == ["2026-01-04/frontier.png", "history/gain.png", "history/health.png"]
    for target in page.images + page.links:  # relative paths only: the page works from file:// and from a bucket
        assert not re.match(r"^(/|[a-z]+:)", target), target
        assert (root / target).is_file(), target
    assert {"2026-01-04/report.md", "2026-01-02/report.md", "2026-01-01/report.md",
            "2026-01-04/change/frontier_diff.md"} <= set(page.links)


@pytest.mark.slow
def test_old_nights_without_recorded_identity_or_change_render_the_same(nightly, tmp_path):
    """Nights written before the ledger recorded identities, quarantined rounds and the change: the identity
    comes from the series' store, the change is computed from the two nights' tables."""
    root, _ = nightly
    old = tmp_path / "old"
    shutil.copytree(root, old, ignore=shutil.ignore_patterns("store", "index.html", "history", "change"))
    for series in root.glob("series-*"):
        (old / series.name / "store").mkdir(parents=True)
        shutil.copy(series / "store" / "manifest.json", old / series.name / "store" / "manifest.json")
    ledger = json.loads((old / "ledger.json").read_text())
    for entry in ledger.values():
        for key in ("identity", "quarantined_rounds", "error"):
            entry.pop(key, None)
    (old / "ledger.json").write_text(json.dumps(ledger))
    for path in old.glob("20*/nightly.json"):
        night = json.loads(path.read_text())
        path.write_text(json.dumps({key: value for key, value in night.items()
                                    if key not in ("identity", "previous", "change_budgets", "quarantined_rounds")}))
    now, before = gather_nights(root)[0], gather_nights(old)[0]
    assert [night.series_change for night in before] == [night.series_change for night in now]
    assert [night.quarantined_rounds for night in before] == [night.quarantined_rounds for night in now]  # report.json
    for fresh, stored in zip(before, now):
        assert (fresh.change is None) == (stored.change is None)
        if fresh.change is not None:
            assert fresh.change["verdict"].to_pylist() == stored.change["verdict"].to_pylist()
            np.testing.assert_allclose(fresh.change["diff_paired"].to_numpy(), stored.change["diff_paired"].to_numpy(), rtol=1e-12)
    assert main(["report", str(old)]) == 0
    assert "new: sampling max_tokens: 8 → 12" in (old / "index.html").read_text()


def test_a_root_without_a_readable_night_renders(tmp_path):
    """A failed night, a complete one whose tables are damaged and one whose folder is gone: rows, no figures."""
    (tmp_path / "2026-02-02").mkdir()
    (tmp_path / "ledger.json").write_text(json.dumps({
        "2026-02-01": {"series": "abc", "completed": False, "error": "RuntimeError: boom"},
        "2026-02-02": {"series": "abc", "completed": True}, "2026-02-03": {"series": "abc", "completed": True}}))
    paths = write_history(tmp_path)
    text = (tmp_path / "index.html").read_text()
    assert paths == [tmp_path / "index.html"] and 'id="no-complete-night"' in text and "failed: RuntimeError: boom" in text
    assert [row["data-status"] for row in parse(text).rows] == ["missing", "missing", "incomplete"]
    assert "frontier_mean cannot be read" in text and "the ledger says complete, but" in text


@pytest.mark.slow
def test_report_keeps_writing_report_md_for_a_results_directory(nightly, tmp_path, capsys):
    root, _ = nightly
    assert main(["report", str(root / "latest"), "--out", str(tmp_path)]) == 0
    assert (tmp_path / "report.md").is_file() and not (tmp_path / "index.html").exists()
    assert main(["report", str(root), "--out", str(tmp_path / "page"), "--kl", "0.1,0.5"]) == 0
    text = (tmp_path / "page" / "index.html").read_text()
    assert "gain at KL 0.5</th>" in text and "gain at KL 1</th>" not in text
    assert all((tmp_path / "page" / target).is_file() for target in parse(text).images)  # links relative to --out
    assert "wrote" in capsys.readouterr().out


# The page in a real browser.

BROWSER_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--hide-scrollbars")


def _install_chromium() -> str:
    """Debian's chromium package, installed with apt-get when missing; the reason it cannot be, else ''."""
    if shutil.which("chromium"):
        return ""
    if not shutil.which("apt-get"):
        return "chromium is not installed and there is no apt-get to install it with"
    if os.geteuid() != 0:
        return "chromium is not installed and the tests do not run as root (apt-get install chromium needs root)"
    command = ["apt-get", "-o", "DPkg::Lock::Timeout=300", "install", "-y", "--no-install-recommends", "chromium",
               "fonts-liberation"]
    environment = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    result = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=900)
    if result.returncode != 0:  # a fresh machine has no package lists yet
        subprocess.run(["apt-get", "-o", "DPkg::Lock::Timeout=300", "update"], capture_output=True, env=environment,
                       timeout=600)
        result = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=900)
    if result.returncode != 0 or not shutil.which("chromium"):
        return f"apt-get could not install chromium: {result.stderr.strip()[-400:]}"
    return ""


@pytest.fixture(scope="module")
def chromium(tmp_path_factory):
    """A function running headless Chromium with the given arguments; skips the test when it cannot be installed."""
    reason = _install_chromium()
    if reason:
        pytest.skip(f"no browser for the page test: {reason}")
    profile = tmp_path_factory.mktemp("chromium-profile")

    def run(*arguments: str) -> str:
        result = subprocess.run(["chromium", *BROWSER_FLAGS, f"--user-data-dir={profile}", *arguments],
                                capture_output=True, text=True, timeout=180)
        assert result.returncode == 0, result.stderr[-2000:]
        return result.stdout

    return run


IMAGE_CHECK = """<script>
window.addEventListener("load", () => {
  const images = [...document.images].map(image => [image.getAttribute("src"), image.complete, image.naturalWidth]);
  const report = document.createElement("pre");
  report.id = "image-check";
  report.textContent = JSON.stringify(images);
  document.body.appendChild(report);
});
</script>"""


@pytest.mark.slow
def test_the_page_in_a_browser_loads_every_figure_and_lists_the_ledger(nightly, chromium, tmp_path):
    root, _ = nightly
    # every image of the page, as the browser loaded it: a copy of the page beside it, with a script that
    # reports each image's load state into the DOM (the page itself has no script)
    check = root / ".image-check.html"
    check.write_text((root / "index.html").read_text().replace("</body>", IMAGE_CHECK + "</body>"))
    try:
        dom = chromium("--dump-dom", check.as_uri())
    finally:
        check.unlink()
    images = json.loads(re.search(r'<pre id="image-check">(.*?)</pre>', dom).group(1))
    assert [src for src, _, _ in images] == ["2026-01-04/frontier.png", "history/gain.png", "history/health.png"]
    assert all(complete and width > 500 for _, complete, width in images), images  # none broken

    page = parse(chromium("--dump-dom", (root / "index.html").as_uri()))
    ledger = json.loads((root / "ledger.json").read_text())
    assert [(row["data-date"], row["data-status"]) for row in page.rows] == [
        (date, "complete" if ledger[date]["completed"] else "incomplete") for date in sorted(ledger, reverse=True)]
    assert {"latest-frontier", "gain-history", "health-history", "nights", "flags"} <= page.ids

    screenshot = tmp_path / "index.png"
    chromium("--window-size=1300,4200", f"--screenshot={screenshot}", (root / "index.html").as_uri())
    shutil.copy(screenshot, root.parent / "index-screenshot.png")  # kept beside the root for a person to look at
    import matplotlib.image

    pixels = (matplotlib.image.imread(screenshot)[..., :3] * 255).round().astype(int)
    assert pixels.shape[:2] == (4200, 1300)
    blue = np.all(pixels == (31, 119, 180), axis=-1)  # matplotlib's C0: the frontier and the bars
    red = np.all(np.abs(pixels - (214, 39, 40)) <= 2, axis=-1)  # C3: series change lines, flags
    assert blue.sum() > 5000 and red.sum() > 300, (blue.sum(), red.sum())
    rows_with_blue = np.flatnonzero(blue.any(axis=1))
    assert rows_with_blue.max() - rows_with_blue.min() > 1500  # figures down the page, not one stray spot
