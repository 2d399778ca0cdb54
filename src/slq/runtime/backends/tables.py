"""Kernel tables shipped with slq: the measured rows :func:`~slq.runtime.backends.choose.choose` reads.

A measured table (``bench/kernels_gpu.py`` or ``slq bench --shape ...`` output) carries far more
than the chooser needs: bandwidth, sweeps, checks. :func:`compact` keeps exactly what
:func:`~slq.runtime.backends.choose.read_table` extracts, one row per timed (backend, bits, M,
layer kind, N, K) in the source's order, so for every table ``t``::

    read_table(compact(t)) == read_table(t)

and a packaged table chooses exactly as its source. The compact tables live in this package's
``data/`` folder as ``kernels_<GPU name, spaces as _>.json`` (package data, read with
:mod:`importlib.resources`, so an installed wheel and a source checkout read the same bytes).
Regenerate one after a new measurement with::

    python -m slq.runtime.backends.tables bench/results/kernels_<GPU>.json
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from ...util.errors import SlqError
from ...util.jsonio import read_json, write_json

NAMES = {"ours": "triton", "triton": "triton", "humming": "humming", "reference": "reference"}


@dataclass(frozen=True)
class Row:
    backend: str
    bits: int
    M: int
    us: float
    role: str | None = None
    N: int | None = None
    K: int | None = None


def read_table(table) -> list[Row]:
    """Rows of a measured table (a path or an already-parsed dict)."""
    if isinstance(table, (str, os.PathLike)):
        table = read_json(table, "kernel table")
    elif hasattr(table, "read_text"):  # a packaged table (importlib.resources)
        table = read(table)
    if not isinstance(table, dict):
        raise SlqError("a kernel table must be a JSON object")
    out: list[Row] = []
    for part in [table] + list(table.get("runs") or []):
        shapes = part.get("shapes") or table.get("shapes") or {}
        rows = list(part.get("per_layer") or []) + [r for r in part.get("rows") or [] if r.get("kind") == "layer"]
        for r in rows:
            be = NAMES.get(str(r.get("backend")))
            us = r.get("us")
            if be is None or us is None or not isinstance(r.get("bits"), int) or not (us == us):
                continue
            role = r.get("layer")
            n, k = r.get("N"), r.get("K")
            if (n is None or k is None) and role in shapes:
                n, k = shapes[role]
            out.append(Row(be, int(r["bits"]), int(r["M"]), float(us), role, n, k))
    return out


KIND = "slq-kernel-table"
DATA = "data"


def file_name(device_name: str) -> str:
    return "kernels_" + device_name.replace(" ", "_").replace("/", "_") + ".json"


def compact(table: dict, source: str | None = None) -> dict:
    """The rows the chooser reads from ``table`` (a measured table, as a dict), with its device and commit."""
    rows = []
    for r in read_table(table):
        row = {"kind": "layer", "backend": r.backend, "bits": r.bits, "M": r.M, "layer": r.role, "N": r.N, "K": r.K,
               "us": r.us}
        rows.append({k: v for k, v in row.items() if v is not None})
    if not rows:
        raise SlqError(f"kernel table {source or ''} has no timed layer rows of triton/humming/reference".replace("  ", " "))
    dev = table.get("device")
    dev = dev.get("name") if isinstance(dev, dict) else dev
    return {"kind": KIND, "device": dev, "source": source, "git_commit": table.get("git_commit"), "rows": rows}


def packaged(device_name: str):
    """The shipped table for ``device_name`` (an importlib.resources Traversable), or None."""
    p = resources.files(__package__).joinpath(DATA, file_name(device_name))
    return p if p.is_file() else None


def read(resource) -> dict:
    """Parse a packaged table."""
    try:
        return json.loads(resource.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise SlqError(f"corrupt packaged kernel table {label(resource)}: {e}") from e


def label(table) -> str:
    """How a choice record names its table: a path, or ``slq:<file>`` for a packaged one."""
    if isinstance(table, (str, Path)):
        return str(table)
    return f"slq:{DATA}/{getattr(table, 'name', table)}"


def build(source: str | Path, out_dir: str | Path | None = None) -> Path:
    """Write the compact table of the measured table ``source`` into ``out_dir`` (default: the package data)."""
    source = Path(source)
    table = read_json(source, "kernel table")
    dev = table.get("device")
    dev = dev.get("name") if isinstance(dev, dict) else dev
    if not isinstance(dev, str) or not dev:
        raise SlqError(f"kernel table {source} names no device")
    out = Path(out_dir) if out_dir is not None else Path(__file__).resolve().parent / DATA
    out.mkdir(parents=True, exist_ok=True)
    src = f"bench/results/{source.name}" if source.parent.name == "results" else source.name
    path = out / file_name(dev)
    write_json(path, compact(table, src))
    return path


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: python -m slq.runtime.backends.tables KERNEL_TABLE.json [...]", file=sys.stderr)
        return 2
    for a in argv:
        try:
            print(build(a))
        except SlqError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
