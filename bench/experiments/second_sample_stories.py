"""The DL search on stories260K with and without the second held-out sample, side by side.

The test suite's setting (tests/test_search.py): calibration on the first 12 x 128 tokens of the tiny
text, verification on the next 12, the second sample on the 12 after those; g32, bitwidths 2..8 and 16,
EAR target 0.99, 4 rounds. Records every round of both runs.

    python bench/experiments/second_sample_stories.py          # about a minute on 2 cores
"""

from __future__ import annotations

import os
import platform
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("SLQ_SHARED", REPO.parent / "shared"))
sys.path.insert(0, str(REPO / "src"))


def main():
    from slq.util.provenance import git_commit, versions
    from slq.util.jsonio import write_json
    from slq.search.session import search

    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, confirm in (("verification windows only", 0), ("with the second sample", 12)):
            rep = search(str(SHARED / "models/stories260K"), target="dl", ear=0.99, calib=str(SHARED / "data/calib/tiny.utf8"),
                         calib_samples=12, seq_len=128, sens_windows=6, verify_windows=12, confirm_windows=confirm,
                         group_size=32, bitwidths=(2, 3, 4, 5, 6, 7, 8, 16), baselines=(), frontier=False,
                         workdir=Path(tmp) / "work", progress=False)
            rounds = [{"round": r["round"], "bits_per_param": r["bits_per_param"], "accepted": r["accepted"],
                       "ear": r["measured"]["ear"], "second_sample": r.get("confirmation")} for r in rep["rounds"]]
            runs[name] = {"verified": rep["verified"], "bits_per_param": rep["bits_per_param"], "rounds": rounds}
            print(f"{name}: {rep['bits_per_param']:.3f} b/p, verified {rep['verified']}")
            for r in rounds:
                s = r["second_sample"]
                print(f"  round {r['round']}: {r['bits_per_param']:.3f} b/p, EAR lower bound {r['ear']['ci95'][0]:.4f}"
                      + (f", second sample {s['measured']['ear']['ci95'][0]:.4f}" if s else "")
                      + f", accepted {r['accepted']}")
    write_json(REPO / "bench/results/second_sample_stories.json", {
        "benchmark": "second_sample_stories260k", "model": "stories260K",
        "device": f"cpu: {platform.machine()}, {torch.get_num_threads()} threads", "versions": versions(),
        "git_commit": git_commit(REPO), "runs": runs})


if __name__ == "__main__":
    main()
