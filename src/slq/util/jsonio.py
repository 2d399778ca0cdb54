"""Report files: JSON written atomically (temporary file, then rename), and read with one clear error."""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path


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
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(_clean(data), f, indent=2, default=str)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path


def read_json(path: str | os.PathLike, what: str, missing: str | None = None):
    """The parsed JSON of ``path``; a missing file or bad JSON raises :class:`SlqError` naming ``what``.

    ``missing`` replaces the message for a missing file."""
    from .errors import SlqError

    p = Path(path)
    if not p.is_file():
        raise SlqError(missing or f"{what} {p} does not exist")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise SlqError(f"{what} {p} is not JSON ({e})") from e
