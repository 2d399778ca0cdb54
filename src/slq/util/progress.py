"""Progress for long loops: a rich bar on a terminal, plain log lines everywhere else.

``progress_bar(enabled)`` yields an object with rich's task interface (``add_task(description,
total=)``, ``advance(task, n)``, ``update(task, completed=, total=, description=)``), so callers
never ask where their output goes. The choice is made once, from the stream (stderr by default):

- ``enabled=False``: nothing is shown.
- the stream is a terminal: rich's live bar (description, bar, done/total, elapsed, remaining).
- otherwise (nohup, CI, ``make demo > log``): one plain line when a task starts, one when it
  finishes, and one in between each time the count crosses another ``step`` of the total (10% by
  default) or ``interval_s`` seconds (30 by default) have passed since the last line, whichever
  comes first. Each line carries the count, the percentage, the elapsed time and the ETA::

      [slq] GPTQ layers: 12/30 (40%) elapsed 1m05s, ETA 1m38s

  The ETA assumes the remaining items take the mean time of the finished ones:
  ``eta = elapsed * (total - done) / done``; it is absent before the first item and for tasks
  without a total. A task still open when the block ends gets a closing line ("stopped at").
  The first item's completion always gets a line: its ETA (the first item's time times the items
  left) is the time estimate of the stage, printed before the long part of it.

Lines go to the ``logging`` logger ``"slq"`` (INFO) when that logger is listening (enabled for INFO
and some handler is attached to it or an ancestor), and straight to the stream otherwise, so that a
program that configured logging gets each line once, through its own handlers.
"""

from __future__ import annotations

import logging
import sys
import time
from contextlib import contextmanager
from typing import TextIO

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

LOGGER = logging.getLogger("slq")


class _Silent:
    def add_task(self, *a, **k):
        return 0

    def advance(self, *a, **k):
        pass

    def update(self, *a, **k):
        pass


def format_seconds(s: float) -> str:
    """``12.3s``, ``4m05s`` or ``2h03m``."""
    if s < 60:
        return f"{s:.1f}s"
    if s < 3600:
        m, sec = divmod(int(round(s)), 60)
        return f"{m}m{sec:02d}s"
    h, rest = divmod(int(round(s)), 3600)
    return f"{h}h{rest // 60:02d}m"


class _Task:
    __slots__ = ("description", "total", "done", "t0", "last_t", "last_step", "finished")

    def __init__(self, description: str, total: float | None, now: float):
        self.description, self.total, self.done = description, total, 0.0
        self.t0 = self.last_t = now
        self.last_step, self.finished = 0, False


class LogProgress:
    """The off-terminal reporter: rich's task interface, plain lines out (see the module docstring)."""

    def __init__(self, stream: TextIO | None = None, *, interval_s: float = 30.0, step: float = 0.1,
                 clock=time.monotonic, logger: logging.Logger = LOGGER):
        if not 0 < step <= 1:
            raise ValueError(f"step must be in (0, 1], got {step}")
        self.stream, self.interval_s, self.step = stream, interval_s, step
        self.clock, self.logger = clock, logger
        self.tasks: list[_Task] = []

    # -- rich's interface
    def add_task(self, description: str, total: float | None = None, **_) -> int:
        t = _Task(description, total, self.clock())
        self.tasks.append(t)
        self._emit(t, f"started ({self._count(t)})")
        return len(self.tasks) - 1

    def advance(self, task: int, advance: float = 1) -> None:
        t = self.tasks[task]
        self._moved(t, t.done + advance)

    def update(self, task: int, *, completed: float | None = None, total: float | None = None,
               advance: float | None = None, description: str | None = None, **_) -> None:
        t = self.tasks[task]
        if description is not None:
            t.description = description
        if total is not None:
            t.total = total
        done = t.done if completed is None else completed
        if advance is not None:
            done += advance
        self._moved(t, done)

    # -- lines
    def close(self) -> None:
        for t in self.tasks:
            if not t.finished:
                t.finished = True
                self._emit(t, f"stopped at {self._count(t)} after {format_seconds(self.clock() - t.t0)}")

    def _moved(self, t: _Task, done: float) -> None:
        if t.finished:
            return
        first = t.done == 0 and done > 0  # the first item: the earliest ETA, the stage's time estimate
        t.done = done
        now = self.clock()
        if t.total is not None and done >= t.total:
            t.finished = True
            self._emit(t, f"done {self._count(t)} in {format_seconds(now - t.t0)}")
            return
        step_now = int(done / t.total / self.step + 1e-9) if t.total else 0  # 6/20/0.1 is 2.999...
        if step_now > t.last_step or now - t.last_t >= self.interval_s:
            t.last_step, t.last_t = max(t.last_step, step_now), now
            self._emit(t, self._status(t, now))
        elif first:  # does not move the step and interval clocks
            self._emit(t, self._status(t, now))

    def _status(self, t: _Task, now: float) -> str:
        elapsed = now - t.t0
        s = f"{self._count(t)} elapsed {format_seconds(elapsed)}"
        if t.total and t.done > 0:
            s += f", ETA {format_seconds(elapsed * (t.total - t.done) / t.done)}"
        return s

    @staticmethod
    def _count(t: _Task) -> str:
        done = f"{t.done:g}"
        if not t.total:
            return done
        return f"{done}/{t.total:g} ({100 * t.done / t.total:.0f}%)"

    def _emit(self, t: _Task, text: str) -> None:
        line = f"[slq] {t.description}: {text}"
        if self.logger.isEnabledFor(logging.INFO) and self.logger.hasHandlers():
            self.logger.info(line)
            return
        stream = self.stream if self.stream is not None else sys.stderr
        stream.write(line + "\n")
        stream.flush()


def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # closed or not a file
        return False


@contextmanager
def progress_bar(enabled: bool = True, *, stream: TextIO | None = None, interval_s: float = 30.0, step: float = 0.1):
    """Progress for the block: silent, a rich bar on a terminal, or log lines (module docstring)."""
    if not enabled:
        yield _Silent()
        return
    target = stream if stream is not None else sys.stderr
    if not _is_terminal(target):
        rep = LogProgress(stream, interval_s=interval_s, step=step)
        try:
            yield rep
        finally:
            rep.close()
        return
    kwargs = {}
    if stream is not None:
        from rich.console import Console

        kwargs["console"] = Console(file=stream)
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        transient=False,
        **kwargs,
    ) as bar:
        yield bar
