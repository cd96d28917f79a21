"""A tiny progress display: done/total, percent, samples/s and time left, on one stderr line.

Dependency-free on purpose (the package's runtime deps are torch + numpy only). Quiet when the
stream is not a terminal unless ``enabled=True`` is asked for; then it prints whole lines at most
every ``interval`` seconds, which is what log files want.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    """Count samples done out of ``total`` and show the rate.

    Args:
        total: the number of samples the job will process (in this process).
        desc: a short label shown first (e.g. ``"estimate ce"``).
        enabled: ``None`` shows progress only when ``stream`` is a TTY; ``True``/``False`` force it.
        stream: where to write (default ``sys.stderr``).
        interval: minimum seconds between two refreshes.
        initial: samples already done before this run started (a resumed job): counted in the
            percentage but not in the rate.
    """

    def __init__(
        self,
        total: int,
        desc: str = "",
        *,
        enabled: bool | None = None,
        stream: TextIO | None = None,
        interval: float = 0.2,
        initial: int = 0,
    ) -> None:
        self.total = int(total)
        self.desc = desc
        self.stream = sys.stderr if stream is None else stream
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.enabled = self.tty if enabled is None else bool(enabled)
        # Lines to a log file are expensive to read: refresh them far less often than a terminal.
        self.interval = interval if self.tty else max(interval, 5.0)
        self.done = int(initial)
        self._initial = int(initial)
        self._start = time.perf_counter()
        self._last = float("-inf")
        self._width = 0
        self._drawn = -1

    def update(self, n: int) -> None:
        """Record ``n`` more samples done; redraw if the refresh interval has passed."""
        self.done += int(n)
        now = time.perf_counter()
        if self.enabled and (now - self._last >= self.interval or self.done >= self.total):
            self._draw(now)

    @property
    def rate(self) -> float:
        """Samples per second processed by this run (resumed samples excluded)."""
        elapsed = time.perf_counter() - self._start
        return (self.done - self._initial) / elapsed if elapsed > 0 else 0.0

    def line(self, now: float | None = None) -> str:
        """The current status line (without terminal control characters)."""
        elapsed = (time.perf_counter() if now is None else now) - self._start
        rate = (self.done - self._initial) / elapsed if elapsed > 0 else 0.0
        pct = 100.0 * self.done / self.total if self.total else 100.0
        left = (self.total - self.done) / rate if rate > 0 else float("inf")
        head = f"{self.desc}: " if self.desc else ""
        return (
            f"{head}{self.done}/{self.total} samples ({pct:5.1f}%) {_si(rate)} samples/s "
            f"elapsed {_clock(elapsed)} left {_clock(left)}"
        )

    def _draw(self, now: float) -> None:
        self._last = now
        self._drawn = self.done
        text = self.line(now)
        if self.tty:
            pad = " " * max(0, self._width - len(text))
            self.stream.write("\r" + text + pad)
            self._width = len(text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        """Draw the final state and end the line."""
        if not self.enabled:
            return
        if self._drawn != self.done:
            self._draw(time.perf_counter())
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _si(x: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if x >= scale:
            return f"{x / scale:.2f}{unit}"
    return f"{x:.1f}"


def _clock(seconds: float) -> str:
    if seconds != seconds or seconds == float("inf"):
        return "--:--"
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"
