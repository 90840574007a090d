"""The job's progress line: counts, rate over the last minute, ETA, utilisation; bar vs plain lines."""

from __future__ import annotations

import io
import threading

import pytest

from limits_ray.pipeline.progress import Progress, format_duration


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Stream(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


def _progress(tty: bool = False, interval: float = 10.0, **kwargs) -> tuple[Progress, Clock, Stream]:
    clock, stream = Clock(), Stream(tty)
    progress = Progress(total=48, samples_per_round=32, actors={"generate": 2}, stream=stream, interval=interval,
                        clock=clock, **kwargs)
    return progress, clock, stream


@pytest.mark.parametrize("seconds, text", [
    (0.4, "0 s"), (45, "45 s"), (725, "12 min 05 s"), (3 * 3600 + 7 * 60 + 2, "3 h 07 min"),
    (float("inf"), "?"), (float("nan"), "?"), (-1, "?"),
])
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


def test_rate_counts_only_the_last_minute():
    progress, clock, _ = _progress()
    clock.now += 30
    progress.update(10, 320)  # 320 samples in the first 30 s
    assert progress.rate(clock.now + 10) == pytest.approx(320 / 40)  # within the first minute: since the start
    clock.now += 60
    progress.update(10, 640)  # 640 in the next 60 s
    assert progress.rate(clock.now) == pytest.approx(640 / 60)
    assert progress.rate(clock.now + 30) == pytest.approx(640 / 60)  # 30 s of the window with 640, 30 s idle


def test_eta_is_the_samples_left_at_the_current_rate():
    progress, clock, _ = _progress()
    clock.now += 20
    progress.update(8, 8 * 32)  # 256 samples in 20 s: 12.8 samples/s
    left = (48 - 8) * 32
    assert progress.eta(clock.now) == pytest.approx(left / 12.8)
    assert _progress()[0].eta(100.0) == float("inf")  # nothing finished yet


def test_quarantined_rounds_count_as_done_for_eta_and_percent():
    progress, clock, _ = _progress()
    clock.now += 10
    progress.update(46, 46 * 32, quarantined=2)
    assert progress.eta(clock.now) == 0.0
    assert "rounds 46/48 (100%)" in progress.line(clock.now)
    assert "quarantined 2" in progress.line(clock.now)


def test_utilisation_divides_busy_seconds_by_elapsed_times_actors():
    progress, clock, _ = _progress()
    clock.now += 50
    progress.update(4, 128, busy={"generate": 60.0, "score_rm": 10.0})
    assert progress.utilisation(clock.now) == pytest.approx({"generate": 60 / (50 * 2), "score_rm": 10 / 50})
    assert "busy: generate 60%, score_rm 20%" in progress.line(clock.now)


def test_plain_lines_every_interval_and_a_final_line():
    progress, clock, stream = _progress(interval=10.0, from_store=16)
    clock.now += 5
    assert not progress.tick()
    progress.update(12, 384)
    clock.now += 5
    assert progress.tick()
    clock.now += 3
    assert not progress.tick()
    progress.close()
    progress.close()  # once only
    lines = stream.getvalue().splitlines()
    assert lines == [
        "progress: rounds 12/48 (25%) + 16 from the store | 38.4 samples/s (last 60 s) | elapsed 10 s, ETA 30 s | quarantined 0",
        "progress: rounds 12/48 (25%) + 16 from the store | 29.5 samples/s (whole run) | took 13 s | quarantined 0",
    ]
    assert "\r" not in stream.getvalue()


def test_a_terminal_gets_a_bar_redrawn_in_place():
    progress, clock, stream = _progress(tty=True, interval=10.0)
    assert progress.interval == 0.5
    clock.now += 1
    progress.update(24, 768)
    assert progress.tick()
    progress.close()
    text = stream.getvalue()
    assert text.startswith("\r|" + "█" * 12 + " " * 12 + "| rounds 24/48 (50%)")
    assert text.count("\r") == 2 and text.endswith("\n") and text.count("\n") == 1


def test_the_thread_prints_while_no_batch_arrives():
    stream = Stream(False)
    progress = Progress(total=4, samples_per_round=2, stream=stream, interval=0.05).start()
    for _ in range(1000):  # wait (up to 10 s on a loaded machine) for two lines from the thread
        if stream.getvalue().count("\n") >= 2:
            break
        threading.Event().wait(0.01)
    progress.close()
    lines = stream.getvalue().splitlines()
    assert len(lines) >= 3 and lines[0].startswith("progress: rounds 0/4 (0%)") and ", ETA ?" in lines[0]
    assert "(whole run)" in lines[-1]


def test_a_label_names_what_progresses():
    progress, clock, stream = _progress(label="policy blend")
    clock.now += 10
    progress.tick()
    assert stream.getvalue().startswith("progress policy blend: rounds 0/48 (0%)")
