"""GPTQ on one GPU: the Triton sub-block kernel against the torch column loop, on Llama-3-8B layer shapes.

The bank quantizes each Hessian group (q/k/v stacked, o, gate/up stacked, down) at every candidate
bitwidth in one pass (the copies stacked along the rows), so the shapes timed here are those of one
8B decoder layer at 7 bitwidths (2..8), asymmetric g128 with the clip search. Both paths compute the
same codes (checked here too); the torch loop is timed on the o projection only (it takes seconds),
and the ratio is taken on that same shape.

    python bench/experiments/gptq_gpu.py                  # through the device tool
    python bench/experiments/gptq_gpu.py --small          # a quick check of the script on any CUDA GPU
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "src"))

SHAPES_8B = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bits", default="2,3,4,5,6,7,8")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--small", action="store_true", help="shapes / 8 (a smoke run)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("error: CUDA is not available (this benchmark times the GPU paths)")
    from slq.util.provenance import git_commit, versions
    from slq.quant.gptq import factor, gptq_quantize_many
    from slq.util.jsonio import write_json
    from slq.quant.spec import QuantSpec

    specs = [QuantSpec(int(b), args.group_size) for b in args.bits.split(",")]
    shapes = {k: (n // 8, k_ // 8) if args.small else (n, k_) for k, (n, k_) in SHAPES_8B.items()}
    gen = torch.Generator(device="cuda").manual_seed(0)

    def timed(fn):
        torch.cuda.synchronize()
        t = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        return out, time.perf_counter() - t

    rows = {}
    for name, (N, K) in shapes.items():
        X = torch.randn(4096, K, device="cuda", generator=gen)
        fac = factor(X.double().T @ X.double() / X.shape[0])
        W = torch.randn(N, K, device="cuda", generator=gen) * 0.02
        gptq_quantize_many(W[:256], fac, specs)  # compile / warm up
        a, t_kernel = timed(lambda: gptq_quantize_many(W, fac, specs))
        row = {"rows": N, "inputs": K, "stacked_rows": N * len(specs), "kernel_s": t_kernel}
        if name == "o":
            b, t_loop = timed(lambda: gptq_quantize_many(W, fac, specs, kernel=False))
            row.update(torch_loop_s=t_loop, speedup=t_loop / t_kernel,
                       codes_identical=all(torch.equal(x.codes, y.codes) for x, y in zip(a, b)))
        rows[name] = row
        print(name, row, flush=True)
        del X, W, fac, a
        torch.cuda.empty_cache()
    layer_s = sum(r["kernel_s"] for r in rows.values())
    result = {
        "benchmark": "gptq_gpu", "device": torch.cuda.get_device_name(), "versions": versions(),
        "git_commit": git_commit(REPO), "settings": {**vars(args), "calib_rows": 4096, "clip": True},
        "shapes": rows, "layer_kernel_s": layer_s,
        "note": "one 8B decoder layer's four Hessian groups at every listed bitwidth (stacked), GPTQ only "
                "(no Hessian accumulation, no factorization)",
    }
    out = args.out or str(REPO / "bench/results/gptq_gpu.json")  # the device is inside
    write_json(out, result)
    print(f"one layer (kernel path): {layer_s:.2f} s -> {out}")


if __name__ == "__main__":
    main()
