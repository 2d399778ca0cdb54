"""`slq quantize --fast` against the default: quantization time and the EAR it costs.

Each variant runs the way the CLI runs it (``slq quantize MODEL --bits B [--fast] --eval --out DIR``, in its
own process, so that its wall time includes loading the model and writing the checkpoint and the card),
with ``--eval``: EAR / KL / PPL ratio against the unquantized reference on held-out generated tokens (the
same tokens for every variant: the same seed). The quantization time is the report's ``total_s`` (load,
calibration data, quantization and save) and the process wall time is recorded beside it. Torch gets
``--threads`` threads (2: the machine the issue's "<= 2 minutes" is stated for).

    python bench/fast_preset.py                                  # SmolLM2, 4 bits: fast and default
    python bench/fast_preset.py --model ../shared/models/stories260K --eval-tokens 2048 --seq-len 128

Writes ``bench/results/fast_preset/run-NN.json`` (see ``bench/_results.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import next_run  # noqa: E402

from slq.cli import FAST  # noqa: E402
from slq.util.jsonio import write_json  # noqa: E402
from slq.util.provenance import git_commit, versions  # noqa: E402


def run_variant(model: str, bits: int, fast: bool, eval_tokens: int, seq_len: int, threads: int,
                extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "ckpt"
        cmd = [sys.executable, "-m", "slq", "quantize", model, "--bits", str(bits), "--eval", "--eval-tokens",
               str(eval_tokens), "--seq-len", str(seq_len), "--device", "cpu", "--no-progress", "--out", str(out),
               *(["--fast"] if fast else []), *extra]
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        t0 = time.perf_counter()
        p = subprocess.run(cmd, capture_output=True, text=True, env=env)
        wall = time.perf_counter() - t0
        if p.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{p.stderr[-2000:]}")
        report = json.loads((out / "slq_report.json").read_text())
    fid, tm = report["fidelity"], report["timings"]
    return {
        "variant": "fast" if fast else "default", "command": " ".join(cmd[1:]), "settings": report["settings"],
        "bits_per_param": report["bits_per_param"],
        "quantize_s": tm["total_s"] - tm.get("eval_s", 0.0), "eval_s": tm.get("eval_s"), "process_wall_s": wall,
        "timings": tm, "ear": fid["ear"], "kl": fid["kl"]["mean"], "top1": fid["top1"],
        "ppl_ratio": fid["ppl"]["ratio"], "n_sequences": fid["n_sequences"], "n_tokens": fid["n_tokens"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default", help="model source (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--variants", default="fast,default", help="comma list of fast, default")
    ap.add_argument("--eval-tokens", type=int, default=16 * 512)
    ap.add_argument("--seq-len", type=int, default=512, help="calibration and evaluation window length")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None, help="default: bench/results/fast_preset/run-NN.json")
    args, extra = ap.parse_known_args()
    rows = []
    for v in [v.strip() for v in args.variants.split(",") if v.strip()]:
        if v not in ("fast", "default"):
            raise SystemExit(f"unknown variant {v!r}")
        rows.append(run_variant(args.model, args.bits, v == "fast", args.eval_tokens, args.seq_len, args.threads,
                                extra))
        r = rows[-1]
        print(f"{v}: quantize {r['quantize_s']:.1f} s (process {r['process_wall_s']:.1f} s), EAR {r['ear']['mean']:.5f} "
              f"[{r['ear']['ci95'][0]:.5f}, {r['ear']['ci95'][1]:.5f}], KL {r['kl']:.4g}", flush=True)
    by = {r["variant"]: r for r in rows}
    cost = None
    if {"fast", "default"} <= set(by):
        cost = {"ear_delta": by["fast"]["ear"]["mean"] - by["default"]["ear"]["mean"],
                "speedup": by["default"]["quantize_s"] / by["fast"]["quantize_s"]}
    out = args.out or next_run("fast_preset")
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, {"benchmark": "fast_preset", "model": args.model, "fast_preset": FAST,
                     "settings": {"bits": args.bits, "eval_tokens": args.eval_tokens, "seq_len": args.seq_len,
                                  "threads": args.threads, "extra_flags": extra},
                     "versions": versions(), "git_commit": git_commit(), "rows": rows, "fast_vs_default": cost})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
