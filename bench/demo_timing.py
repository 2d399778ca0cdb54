"""Wall time of `make demo` (the DL search on the embedded SmolLM2) on this machine.

Runs `make demo` as a user would on a fresh machine: the virtual environment already installed (so
`make install` is a no-op), and an empty slq cache (``SLQ_CACHE`` points at a new temporary directory),
so the one-time conversion of the embedded model to fp32 and the whole bank are counted. Writes
the next bench/results/demo_timing/run-NN.json with the wall time and the report's own stage timings.

    python bench/demo_timing.py
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))


def main():
    from slq.util.provenance import git_commit, versions
    from slq.util.jsonio import write_json

    sys.path.insert(0, str(REPO / "bench"))
    from _results import next_run

    import tempfile

    with tempfile.TemporaryDirectory(prefix="slq-demo-cache-") as cache:
        t = time.perf_counter()
        proc = subprocess.run(["make", "demo"], cwd=REPO, capture_output=True, text=True,
                              env={**os.environ, "SLQ_CACHE": cache})
        wall = time.perf_counter() - t
    if proc.returncode:
        sys.stderr.write(proc.stderr[-2000:])
        sys.exit(f"error: make demo failed with exit status {proc.returncode} (its output is above)")
    report = json.loads((REPO / "out" / "demo" / "slq_report.json").read_text())
    lines = (REPO / "Makefile").read_text().splitlines()
    i = next(k for k, line in enumerate(lines) if "--target dl" in line)
    parts = [lines[i].strip()]
    while parts[-1].endswith("\\"):
        i += 1
        parts[-1] = parts[-1][:-1].strip()
        parts.append(lines[i].strip())
    demo_cmd = " ".join(parts).replace("$(BIN)/", "")
    result = {
        "benchmark": "demo_timing",
        "device": f"cpu: {platform.machine()}, {os.cpu_count()} cores",
        "versions": versions(), "git_commit": git_commit(REPO),
        "command": demo_cmd,
        "cache": "empty (a fresh SLQ_CACHE): model conversion and bank included; pip install not included",
        "wall_s": wall, "goal_s": 600, "goal_met": wall < 600,
        "report_timings": report["timings"],
        "bits_per_param": report["bits_per_param"],
        "measured_ear": report["measured"]["ear"],
        "rounds": len(report["rounds"]),
        "stdout_tail": proc.stdout[-3000:],
    }
    out = next_run("demo_timing")
    write_json(out, result)
    print(f"wrote {out.relative_to(REPO)}")
    print(json.dumps({k: result[k] for k in ("wall_s", "goal_met", "bits_per_param", "measured_ear", "report_timings")},
                     indent=1))


if __name__ == "__main__":
    main()
