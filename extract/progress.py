"""Extraction progress for logs: periodic lines with images done, rate and ETA.

On a terminal ``ltr extract`` draws click's progress bar; when stderr is not a terminal (a
cluster job's log file, a pipe) a bar prints nothing useful, so :class:`LogProgress` writes one
line every ``interval`` seconds and a last one when the work ends.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Optional


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


class LogProgress:
    """``update(n)`` adds n images; a line at most every ``interval`` s, and one at the end.

    The rate counts the images done since the first update, so the rows already on disk when an
    extraction resumes (reported by the first update) do not inflate it.
    """

    def __init__(self, total: int, echo: Callable[[str], None], *, label: str = "extracting",
                 interval: float = 30.0, clock: Callable[[], float] = time.monotonic):
        self.total, self.echo, self.label, self.interval, self.clock = total, echo, label, interval, clock
        self.done = 0
        self._start: Optional[float] = None
        self._base = 0
        self._last = 0.0

    def __enter__(self) -> LogProgress:
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        if exc_type is None and self._start is not None:
            elapsed = self.clock() - self._start
            rate = (self.done - self._base) / elapsed if elapsed > 0 else 0.0
            self.echo(f"{self.label}: {self.done:,}/{self.total:,} images done in {_duration(elapsed)} "
                      f"({rate:,.1f} images/s)")

    def update(self, n: int) -> None:
        now = self.clock()
        self.done += n
        if self._start is None:
            self._start, self._base, self._last = now, self.done, now
            return
        if now - self._last >= self.interval:
            self._last = now
            self.echo(self.line(now))

    def line(self, now: float) -> str:
        elapsed = now - (self._start if self._start is not None else now)
        rate = (self.done - self._base) / elapsed if elapsed > 0 else 0.0
        eta = _duration((self.total - self.done) / rate) if rate > 0 else "unknown"
        pct = 100 * self.done / self.total if self.total else 100.0
        return (f"{self.label}: {self.done:,}/{self.total:,} images ({pct:.1f}%), {rate:,.1f} images/s, "
                f"ETA {eta}")
