"""The training workers' console lines (progress, restarts, skips), printed by the driver, and the driver's stop
signal: the two small actors between the driver and its workers (this module imports no framework, so their
processes start at once).

A worker's stdout reaches the driver only through Ray's log forwarding, which also carries every framework's
chatter (Ray Train's report dumps, DeepSpeed's warnings, loading bars); the driver leaves it off unless asked
(``--verbose``). mlot's own lines take another way: workers hand them to the driver's :class:`Console` actor,
which the driver drains and prints, so each line appears once, whatever is forwarded.
"""

from __future__ import annotations

import sys
from typing import Any

_console: Any = None  # this worker process's Console actor handle (None: print to stdout)


class StopSignal:
    """Set by the driver on Ctrl-C (a Ray actor): the workers checkpoint at the next step and stop."""

    def __init__(self) -> None:
        self.stop = False

    def set(self) -> None:
        self.stop = True

    def is_set(self) -> bool:
        return self.stop


class Console:
    """Lines from the workers, waiting for the driver (a Ray actor the driver creates and drains)."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def say(self, line: str) -> None:
        self.lines.append(line)

    def drain(self) -> list[str]:
        lines, self.lines = self.lines, []
        return lines


def use(console: Any) -> None:
    """Send this process's lines to ``console`` (a Console actor handle; None: stdout)."""
    global _console
    _console = console


def say(message: str) -> None:
    line = f"[mlot] {message}"
    if _console is not None:
        _console.say.remote(line)  # calls from one process run in order: lines stay in order
        return
    # Not print(): inside a Ray Train worker print is patched to log *and* echo to a wrapped stdout, so every
    # line would reach the console twice.
    sys.stdout.write(line + "\n")
    sys.stdout.flush()
