"""Silence what compiled libraries print straight to the process's standard output.

HiGHS (scipy's MIP solver) prints a debug line from C++ (``HighsMipSolverData::
transformNewIntegerFeasibleSolution tmpSolver.run();``) with ``printf``, past every logging option
(``disp``, ``output_flag``, ``log_to_console`` leave it on). :func:`quiet_stdout` points file
descriptor 1 at ``/dev/null`` for the duration of a block:

- Python's ``sys.stdout`` is flushed before, so nothing the program printed earlier is lost;
- the C library's buffers (``fflush(NULL)``) are flushed before the descriptor is put back, so
  nothing printed inside the block reaches the real stdout later;
- descriptor 1 is restored on every exit of the block, exceptions included.

Where the C library cannot be reached or descriptor 1 cannot be duplicated (no real stdout, e.g. under
a test runner that replaced ``sys.stdout``), the block runs unchanged.
"""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager


def _fflush_all() -> None:
    try:
        ctypes.CDLL(None).fflush(None)
    except (OSError, AttributeError, TypeError):  # no C library to reach (some platforms)
        pass


@contextmanager
def quiet_stdout() -> Iterator[None]:
    """Descriptor 1 goes to /dev/null inside the block (module docstring)."""
    try:
        sys.stdout.flush()
    except (AttributeError, ValueError, OSError):
        pass
    try:
        saved = os.dup(1)
    except OSError:
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        _fflush_all()
        os.dup2(devnull, 1)
        yield
    finally:
        _fflush_all()
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)
