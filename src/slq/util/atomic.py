"""Atomic directory writes: build in a hidden temporary sibling, rename into place at the end.

A crash or an error leaves no half-written directory behind; a replaced directory is swapped
out only once its successor is complete.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_directory(dest: Path, *, replace: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that becomes ``dest`` when the block succeeds.

    With ``replace`` an existing ``dest`` is swapped out; without it, a ``dest`` that appeared
    meanwhile (another process finished first) wins and this result is dropped.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        yield tmp
        _publishable(tmp)
        if dest.exists() and replace:
            trash = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
            os.replace(dest, trash / "old")
            os.replace(tmp, dest)
            shutil.rmtree(trash, ignore_errors=True)
        elif dest.exists():
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _publishable(d: Path) -> None:
    """mkdtemp makes 0700 directories; give the result the usual umask-based modes."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(d, 0o777 & ~umask)
    for f in d.iterdir():
        os.chmod(f, 0o666 & ~umask)
