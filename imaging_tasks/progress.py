"""Progress lines for long steps: a person watching a task log sees it move, every N items or S seconds.

The facts go into the message text (Airflow's task log shows the message, not ``extra=`` fields).
"""
from __future__ import annotations

import logging
import time


class Progress:
    """``with Progress(log, "de-identify S1234", total=n, unit="file") as p: ... p.advance()``.

    Logs ``<what>: i/total <unit>s (x%), r/s, eta`` at most every ``every_s`` seconds or every ``every_n``
    items (whichever comes first), and a closing line with the count and the time taken.
    """

    def __init__(self, log: logging.Logger, what: str, *, total: int | None = None, unit: str = "item",
                 every_n: int = 100, every_s: float = 30.0, clock=time.monotonic):
        self.log, self.what, self.total, self.unit = log, what, total, unit
        self.every_n, self.every_s, self.clock = max(1, int(every_n)), float(every_s), clock
        self.done = 0
        self._started = self._last_t = clock()
        self._last_n = 0

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            self.close()

    def advance(self, n: int = 1) -> None:
        self.done += n
        now = self.clock()
        if self.done - self._last_n >= self.every_n or now - self._last_t >= self.every_s:
            self.log.info("%s", self.line(now))
            self._last_n, self._last_t = self.done, now

    def line(self, now: float | None = None) -> str:
        now = self.clock() if now is None else now
        elapsed = max(now - self._started, 1e-9)
        rate = self.done / elapsed
        text = f"{self.what}: {self.done}"
        if self.total:
            text += f"/{self.total} {self.unit}s ({100.0 * self.done / self.total:.0f}%)"
            if rate > 0 and self.done < self.total:
                text += f", {rate:.1f} {self.unit}s/s, about {(self.total - self.done) / rate:.0f} s to go"
        else:
            text += f" {self.unit}s, {rate:.1f}/s"
        return text

    def close(self) -> None:
        elapsed = self.clock() - self._started
        if self.done:
            self.log.info("%s: %d %s(s) done in %.1f s", self.what, self.done, self.unit, elapsed)
