"""Where a benchmark script writes its result: one folder per script, one neutral file per run.

``bench/results/<script>/run-NN.json`` holds one run, with every setting that distinguishes it inside its
``settings`` (never in the file name), and ``bench/results/<script>/index.json`` lists the runs with a
one-line label. :func:`next_run` gives the first free ``run-NN.json``; add the run to the index by hand
when it lands (a label, and what it changed). Scripts with a single result (``quantize_smollm2.json``)
keep one file instead.
"""

from __future__ import annotations

from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def next_run(script: str) -> Path:
    """The first ``run-NN.json`` (NN from 01) not yet present in ``bench/results/<script>/``."""
    folder = RESULTS / script
    n = 1
    while (folder / f"run-{n:02d}.json").exists():
        n += 1
    return folder / f"run-{n:02d}.json"
