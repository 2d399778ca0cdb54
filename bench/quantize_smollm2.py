"""RTN vs GPTQ, asymmetric vs symmetric, bits 2..8 at one group size on SmolLM2-135M-Instruct.

For each configuration (run in its own process, so peak memory is its own): wall time of
quantization, peak resident memory, bits per parameter, and perplexity on the first
``--ppl-windows`` x 512 tokens of WikiText-2 test (the reference model's too).

    python bench/quantize_smollm2.py                       # full grid, writes bench/results/quantize_smollm2.json
    python bench/quantize_smollm2.py --bits 3,4 --methods gptq

Calibration: ``--calib-samples`` windows of ``--seq-len`` tokens of ../shared/data/calib/c4.utf8
(disjoint from the WikiText-2 test text). The embedded model's weights already lie on a
4-bit asymmetric group-32 grid (GGUF Q4_1), so 4-bit asym g32 RTN would be exactly lossless:
the default group size here is 64, where that coincidence does not hold.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
sys.path.insert(0, str(REPO / "src"))


@torch.inference_mode()
def perplexity(model, windows: torch.Tensor, batch_size: int = 4) -> float:
    nll, n = 0.0, 0
    for b in windows.split(batch_size):
        logits = model(input_ids=b).logits[:, :-1].float()
        nll += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), b[:, 1:].reshape(-1),
                                                 reduction="sum").item()
        n += b[:, 1:].numel()
    return float(torch.exp(torch.tensor(nll / n)))


def _setup(args):
    from slq.measure.data import load_text, token_windows
    from slq.models.sources import embedded_default_dir, load_model

    path = embedded_default_dir()
    model, tok = load_model(path)
    ppl_windows = token_windows(tok, load_text(str(SHARED / "data/wikitext2/wiki.test.raw")), 512, args.ppl_windows)
    return path, model, tok, ppl_windows


def run_one(args) -> dict:
    """One configuration, in this process."""
    from slq.measure.data import load_text, token_windows
    from slq.quant.pipeline import quantize_model
    from slq.quant.spec import QuantSpec

    torch.manual_seed(0)
    path, model, tok, ppl_windows = _setup(args)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if args.method == "reference":
        return {"method": "reference", "ppl": perplexity(model, ppl_windows), "peak_rss_mb": rss0 / 1024}
    windows = None
    if args.method == "gptq":
        windows = token_windows(tok, load_text(str(SHARED / "data/calib/c4.utf8")), args.seq_len, args.calib_samples)
    spec = QuantSpec(args.one_bits, args.group_size, args.one_sym)
    t, c = time.perf_counter(), time.process_time()
    res = quantize_model(model, spec, method=args.method, windows=windows, progress=False)
    wall, cpu = time.perf_counter() - t, time.process_time() - c
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "method": args.method,
        "bits": args.one_bits,
        "symmetric": args.one_sym,
        "group_size": args.group_size,
        "bits_per_param": res.plan.bits_per_param(),
        "quantize_wall_s": wall,
        "quantize_cpu_s": cpu,
        "timings": res.timings,
        "peak_rss_mb": peak / 1024,
        "ppl": perplexity(model, ppl_windows),
        "gamma2_mean": sum(lp.gamma2_mean for lp in res.plan) / len(res.plan),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default="rtn,gptq")
    ap.add_argument("--grids", default="asym,sym")
    ap.add_argument("--bits", default="2,3,4,5,6,7,8")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--ppl-windows", type=int, default=8)
    ap.add_argument("--out", default=str(REPO / "bench/results/quantize_smollm2.json"))
    ap.add_argument("--method", help=argparse.SUPPRESS)
    ap.add_argument("--one-bits", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--one-sym", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.method:  # child process: one configuration, JSON on the last stdout line
        print(json.dumps(run_one(args)))
        return

    from slq.util.provenance import git_commit, versions

    configs = [("reference", 0, False)]
    for method in args.methods.split(","):
        for grid in args.grids.split(","):
            for b in (int(x) for x in args.bits.split(",")):
                configs.append((method, b, grid == "sym"))
    # the claims that matter first (GPTQ vs RTN at 3 and 4 bits), so a cut-short run still answers them
    configs.sort(key=lambda c: (c[0] != "reference", c[1] not in (3, 4), c[2], c[1], c[0]))
    partial = Path(args.out).with_suffix(".partial.jsonl")
    done = {}
    if partial.exists():
        for line in partial.read_text().splitlines():
            r = json.loads(line)
            done[(r["method"], r.get("bits", 0), r.get("symmetric", False))] = r
    rows = []
    for i, (method, b, sym) in enumerate(configs):
        if (method, b, sym) in done:
            rows.append(done[(method, b, sym)])
            continue
        cmd = [sys.executable, __file__, "--method", method, "--one-bits", str(b), "--group-size", str(args.group_size),
               "--calib-samples", str(args.calib_samples), "--seq-len", str(args.seq_len),
               "--ppl-windows", str(args.ppl_windows)] + (["--one-sym"] if sym else [])
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode != 0:
            raise SystemExit(f"{method} {b} sym={sym} failed:\n{p.stderr[-3000:]}")
        row = json.loads(p.stdout.strip().splitlines()[-1])
        rows.append(row)
        with partial.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"[{i + 1}/{len(configs)}] {method:9s} b={b} sym={sym!s:5s} ppl={row['ppl']:.3f} "
              f"t={row.get('quantize_wall_s', 0):.1f}s rss={row['peak_rss_mb']:.0f}MB", flush=True)
    result = {
        "benchmark": "quantize_smollm2",
        "model": "SmolLM2-135M-Instruct (embedded, fp32)",
        "device": f"cpu: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "versions": versions(),
        "git_commit": git_commit(REPO),
        "settings": {"group_size": args.group_size, "calib": "c4.utf8", "calib_samples": args.calib_samples,
                     "seq_len": args.seq_len, "ppl_data": "wiki.test.raw", "ppl_tokens": args.ppl_windows * 512},
        "note": "2-core machine shared with other jobs while this ran: wall times are noisy; cpu_s is steadier",
        "rows": rows,
    }
    from slq.util.jsonio import write_json

    write_json(args.out, result)
    print(markdown_table(result))


def markdown_table(result: dict) -> str:
    ref = next(r for r in result["rows"] if r["method"] == "reference")
    by = {(r["method"], r["bits"], r["symmetric"]): r for r in result["rows"] if r["method"] != "reference"}
    bits = sorted({k[1] for k in by})
    lines = [f"reference fp32 perplexity: {ref['ppl']:.3f}", "",
             "| bits | bits/param | RTN asym | RTN sym | GPTQ asym | GPTQ sym | GPTQ asym CPU s (wall s) | peak RSS (MB) |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for b in bits:
        cells = [by.get((m, b, s)) for m, s in (("rtn", False), ("rtn", True), ("gptq", False), ("gptq", True))]
        ppl = [f"{c['ppl']:.3f}" if c else "-" for c in cells]
        g = cells[2] or cells[3]
        bpp = next((c["bits_per_param"] for c in cells if c and not c["symmetric"]), float("nan"))
        tail = (f" | {g.get('quantize_cpu_s', float('nan')):.0f} ({g['quantize_wall_s']:.0f}) | {g['peak_rss_mb']:.0f} |"
                if g else " | - | - |")
        lines.append(f"| {b} | {bpp:.3f} | " + " | ".join(ppl) + tail)
    return "\n".join(lines)


if __name__ == "__main__":
    main()
