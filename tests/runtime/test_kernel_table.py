"""The kernel table backend="auto" reads ships inside the package, so a wheel chooses as the checkout does."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from slq.runtime.backends import tables
from slq.runtime.backends.choose import choose, default_table, read_table

REPO = Path(__file__).resolve().parents[2]
GPU = "NVIDIA H100 80GB HBM3"
ALL = ["reference", "triton", "humming"]
# Llama-3-8B's linears (q, k, o, gate, down) and a shape no row has, at every bitwidth and decode batch
CASES = [(n, k, bits, 128, m, role) for (n, k, role) in [(4096, 4096, "qkv"), (1024, 4096, "qkv"), (4096, 4096, "o"),
                                                          (14336, 4096, "gate_up"), (4096, 14336, "down"),
                                                          (2048, 2048, None)]
         for bits in range(2, 9) for m in (1, 2, 4, 8, 16, 64)]

CHOICES = """
import json, sys
import slq
from slq.runtime.backends.choose import choose, default_table, read_table
cases, avail = json.loads(sys.argv[1]), sys.argv[2].split(",")
src = default_table(sys.argv[3])
rows = read_table(src) if src is not None else []
print(json.dumps({"slq": slq.__file__, "n_rows": len(rows),
                  "choices": [choose(*c[:5], rows, set(avail), c[5]) for c in cases]}))
"""


def test_compact_table_keeps_exactly_what_the_chooser_reads():
    measured = {"device": {"name": "Some GPU"}, "shapes": {"qkv": [6144, 4096]}, "git_commit": "abc",
                "per_layer": [{"backend": "ours", "bits": 4, "layer": "qkv", "M": 1, "us": 10.0, "TBps": 2.0},
                              {"backend": "fp16", "bits": 16, "layer": "qkv", "M": 1, "us": 5.0},
                              {"backend": "humming", "bits": 4, "layer": "qkv", "M": 1, "us": float("nan")}],
                "runs": [{"rows": [{"kind": "layer", "backend": "humming", "bits": 3, "M": 16, "N": 8, "K": 32,
                                    "us": 2.5}, {"kind": "stack", "backend": "humming", "bits": 3, "M": 16, "us": 9}]}]}
    small = tables.compact(measured, "x.json")
    assert read_table(small) == read_table(measured) and len(small["rows"]) == 2
    assert small["device"] == "Some GPU" and small["kind"] == tables.KIND


def test_the_packaged_table_is_its_bench_source_compacted():
    shipped = tables.packaged(GPU)
    assert shipped is not None, "the H100 kernel table must ship with slq"
    meta = tables.read(shipped)
    assert meta["device"] == GPU
    src = REPO / meta["source"]
    if not src.is_file():
        pytest.skip(f"{src} not present (bench/results was reorganized)")
    assert read_table(shipped) == read_table(src)
    assert default_table(GPU) is not None and default_table("No Such GPU") is None


def test_a_wheel_chooses_as_the_checkout(tmp_path):
    """Build and install the wheel in a fresh folder; a subprocess importing slq from there (nothing from
    src/) must make the same choice with the same reason for every case, from the same measured rows."""
    py = sys.executable
    wheels, site = tmp_path / "wheels", tmp_path / "site"
    r = subprocess.run([py, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", wheels, REPO],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    (whl,) = wheels.glob("slq-*.whl")
    r = subprocess.run([py, "-m", "pip", "install", "--no-deps", "-q", "--target", site, whl],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    env = {k: v for k, v in os.environ.items() if k != "SLQ_KERNEL_TABLE"}
    env["PYTHONPATH"] = str(site)
    r = subprocess.run([py, "-c", CHOICES, json.dumps(CASES), ",".join(ALL), GPU], capture_output=True, text=True,
                       env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(r.stdout)
    assert Path(got["slq"]).resolve().is_relative_to(site.resolve())  # the installed copy, not src/

    rows = read_table(tables.packaged(GPU))
    want = [list(choose(*c[:5], rows, set(ALL), c[5])) for c in CASES]
    assert got["n_rows"] == len(rows) > 0
    assert got["choices"] == want
    assert {c[0] for c in want} == {"triton", "humming"}  # the table decides, both ways
    assert all(why.startswith("measured") for _, why in want)
