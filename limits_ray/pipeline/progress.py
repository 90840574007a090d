"""The job's own progress line: rounds merged, samples/s, ETA, quarantined rounds, stage utilisation.

The driver updates a :class:`Progress` once per merged batch (:meth:`Progress.update`); a
background thread prints a line every ``interval`` seconds (also while no batch arrives, e.g. while
the engines load), and :meth:`Progress.close` prints the last one. On a terminal the line is a
tqdm-style bar redrawn in place; otherwise (a log file, ``ray job logs``) it is a plain line::

    progress: rounds 24/48 (50%) | 61.2 samples/s (last 60 s) | elapsed 13 s, ETA 12 s | quarantined 0 | busy: generate 81%, score_rm 12%

Utilisation of a stage is its busy seconds (summed over its actors, as the ``seconds_*`` columns of
merged rounds report them) divided by elapsed seconds times its actors: near 100% marks the
bottleneck. Rates and utilisation count only rounds merged from the stream, not those from the store.
"""

from __future__ import annotations

import shutil
import sys
import threading
import time
from collections import deque
from typing import Callable, Mapping, TextIO

__all__ = ["Progress", "format_duration"]

RATE_WINDOW_S = 60.0


def format_duration(seconds: float) -> str:
    """``"45 s"``, ``"12 min 05 s"``, ``"3 h 07 min"``; ``"?"`` when not finite or negative."""
    if not seconds >= 0 or seconds == float("inf"):
        return "?"
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


class Progress:
    """Progress of one stream of rounds, printed as one line every ``interval`` seconds and at the end.

    Args:
        total: rounds to merge in this run (not counting those taken from the store).
        samples_per_round: samples in a round (``generation.n``).
        actors: actors per stage name (``generate``, ``score_<reward>``); a stage not named counts one.
        from_store: rounds merged from the sample store before the stream started (shown, not timed).
        stream: where lines go (default ``sys.stdout``).
        tty: draw a bar in place (default: whether ``stream`` is a terminal).
        interval: seconds between lines (a bar is redrawn every half second at most).
        clock: the time source (``time.monotonic``); tests pass a fake.
        label: what is progressing, after ``progress`` (e.g. a policy's name); empty for the base run.
    """

    def __init__(
        self, total: int, samples_per_round: int, actors: Mapping[str, int] | None = None, from_store: int = 0,
        stream: TextIO | None = None, tty: bool | None = None, interval: float = 10.0,
        clock: Callable[[], float] = time.monotonic, label: str = "",
    ) -> None:
        self.label = label
        self.total = total
        self.samples_per_round = samples_per_round
        self.actors = dict(actors or {})
        self.from_store = from_store
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty() if tty is None else tty
        self.interval = min(interval, 0.5) if self.tty else interval
        self.clock = clock
        self.rounds = 0
        self.samples = 0
        self.quarantined = 0
        self.busy: dict[str, float] = {}
        self.started = clock()
        self._history: deque[tuple[float, int]] = deque([(self.started, 0)])
        self._last_print = self.started
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False

    # -- updates (driver loop) --------------------------------------------------------------------

    def update(self, rounds: int, samples: int, busy: Mapping[str, float] | None = None, quarantined: int | None = None) -> None:
        """Count ``rounds`` more merged rounds holding ``samples`` samples and the stages' extra busy seconds;
        ``quarantined`` is the run's total of quarantined rounds so far (when known)."""
        now = self.clock()
        with self._lock:
            self.rounds += rounds
            self.samples += samples
            for stage, seconds in (busy or {}).items():
                self.busy[stage] = self.busy.get(stage, 0.0) + seconds
            if quarantined is not None:
                self.quarantined = quarantined
            self._history.append((now, self.samples))
            while len(self._history) > 1 and self._history[1][0] <= now - RATE_WINDOW_S:
                self._history.popleft()

    # -- derived numbers ----------------------------------------------------------------------------

    def rate(self, now: float) -> float:
        """Samples per second over the last minute (since the start, if shorter)."""
        window_start = max(self.started, now - RATE_WINDOW_S)
        with self._lock:
            base = self._history[0][1]
            for moment, samples in self._history:
                if moment > window_start:
                    break
                base = samples
            span = now - window_start
            return (self.samples - base) / span if span > 0 else 0.0

    def eta(self, now: float) -> float:
        """Seconds left at the current rate (0 when done, inf when nothing has finished yet)."""
        left = max(self.total - self.rounds - self.quarantined, 0) * self.samples_per_round
        if left == 0:
            return 0.0
        rate = self.rate(now)
        return left / rate if rate > 0 else float("inf")

    def utilisation(self, now: float) -> dict[str, float]:
        """Busy seconds per stage over elapsed seconds times the stage's actors (a fraction)."""
        elapsed = now - self.started
        if elapsed <= 0:
            return {}
        with self._lock:
            return {stage: seconds / (elapsed * self.actors.get(stage, 1)) for stage, seconds in self.busy.items()}

    def line(self, now: float, final: bool = False) -> str:
        """The progress text at ``now`` (without bar or prefix)."""
        done = self.rounds + self.quarantined
        percent = 100.0 * done / self.total if self.total else 100.0
        parts = [f"rounds {self.rounds}/{self.total} ({percent:.0f}%)"]
        if self.from_store:
            parts[0] += f" + {self.from_store} from the store"
        if final:
            elapsed = now - self.started
            rate = self.samples / elapsed if elapsed > 0 else 0.0
            parts.append(f"{rate:.1f} samples/s (whole run)")
            parts.append(f"took {format_duration(elapsed)}")
        else:
            parts.append(f"{self.rate(now):.1f} samples/s (last {RATE_WINDOW_S:.0f} s)")
            parts.append(f"elapsed {format_duration(now - self.started)}, ETA {format_duration(self.eta(now))}")
        parts.append(f"quarantined {self.quarantined}")
        usage = self.utilisation(now)
        if usage:
            parts.append("busy: " + ", ".join(f"{stage} {100 * value:.0f}%" for stage, value in usage.items()))
        return " | ".join(parts)

    # -- printing -------------------------------------------------------------------------------

    def render(self, now: float, final: bool = False) -> str:
        """What one print writes: a bar redrawn in place on a terminal, else a plain ``progress:`` line."""
        text = self.line(now, final)
        if not self.tty:
            return f"progress{' ' + self.label if self.label else ''}: {text}\n"
        width = 24
        filled = round(width * min(self.rounds + self.quarantined, self.total) / self.total) if self.total else width
        columns = shutil.get_terminal_size((120, 24)).columns
        bar = f"{self.label + ' ' if self.label else ''}|{'█' * filled}{' ' * (width - filled)}| {text}"
        return "\r" + bar[: columns - 1].ljust(columns - 1) + ("\n" if final else "")

    def tick(self, now: float | None = None) -> bool:
        """Print a line if ``interval`` seconds have passed since the last; returns whether it printed."""
        now = self.clock() if now is None else now
        if self._closed or now - self._last_print < self.interval:
            return False
        self._last_print = now
        self._write(self.render(now))
        return True

    def _write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()

    def start(self) -> Progress:
        """Print from a daemon thread every ``interval`` seconds until :meth:`close`; returns self."""
        def loop() -> None:
            while not self._stop.wait(min(self.interval, 1.0)):
                self.tick()

        self._thread = threading.Thread(target=loop, name="limits-ray-progress", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop the thread and print the final line (once)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if not self._closed:
            self._closed = True
            self._write(self.render(self.clock(), final=True))
