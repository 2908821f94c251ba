"""Progress lines with a bar and an ETA, one line per report.

The training workers print through Ray's log forwarding, which ships whole lines (a carriage-return bar that
redraws itself would arrive as a stream of fragments), so progress is a line per report: what is done, a bar,
the rate and the time left. The driver's own phases (teaching, scoring) use the same lines.
"""

from __future__ import annotations

import time

BAR_WIDTH = 20


def duration(seconds: float) -> str:
    """``75`` -> ``1m15s``; ``3725`` -> ``1h02m``; under a minute ``42s``."""
    s = int(round(max(seconds, 0.0)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class Progress:
    """``label 30/100 [######--------------] 30%  eta 1m10s``: the ETA extrapolates the mean rate since the
    first report (the first unit often pays for start-up, so the estimate only gets better).

    Args:
        label: what is counted (``step``, ``scored``); total: the number of units.
        first: units already done before counting began (a resumed run's step): the rate counts only this
            attempt's.
        start: when counting began (``time.monotonic()`` by default: now).
    """

    def __init__(self, label: str, total: int, first: int = 0, start: float | None = None) -> None:
        self.label, self.total, self.first = label, max(int(total), 1), first
        self.start = time.monotonic() if start is None else start

    def line(self, done: int, extra: str = "", now: float | None = None) -> str:
        """The progress line after ``done`` units, with ``extra`` (e.g. the loss) after the bar."""
        elapsed = (time.monotonic() if now is None else now) - self.start
        frac = min(max(done, 0) / self.total, 1.0)
        filled = int(round(frac * BAR_WIDTH))
        bar = "#" * filled + "-" * (BAR_WIDTH - filled)
        if done >= self.total:
            tail = f"done in {duration(elapsed)}"
        elif done > self.first:
            tail = f"eta {duration(elapsed / (done - self.first) * (self.total - done))}"
        else:
            tail = "eta ?"
        width = len(str(self.total))
        head = f"{self.label} {done:>{width}}/{self.total} [{bar}] {100 * frac:3.0f}%"
        return "  ".join(filter(None, [head, extra, tail]))
