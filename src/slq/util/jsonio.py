"""Report files: JSON written atomically and durably, and read with one clear error.

A write goes to a temporary sibling, is fsync'ed, given the umask's mode (0644 usually, not
mkstemp's 0600) and renamed over the target (:func:`slq.util.atomic.atomic_file`), so a reader
sees the old file or the new one, never half of one. Non-finite floats are written as ``null``
(strict JSON). A read that fails (missing, unreadable, not JSON) raises one :class:`SlqError`
that names the file.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from .atomic import atomic_file
from .errors import SlqError


def _clean(o):
    """Strict JSON: non-finite floats become null (json would write NaN/Infinity)."""
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, dict):
        return {k: _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    return o


def write_json(path: str | os.PathLike, data: dict) -> Path:
    path = Path(path)
    with atomic_file(path) as f:
        json.dump(_clean(data), f, indent=2, default=str)
    return path


def read_json(path: str | os.PathLike, what: str, missing: str | None = None):
    """The parsed JSON of ``path``; a missing file or bad JSON raises :class:`SlqError` naming ``what``.

    ``missing`` replaces the message for a missing file."""
    p = Path(path)
    if not p.is_file():
        raise SlqError(missing or f"{what} {p} does not exist")
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SlqError(f"{what} {p} is not JSON ({e})") from e
    except OSError as e:
        raise SlqError(f"cannot read {what} {p}: {e.strerror or e}") from e
