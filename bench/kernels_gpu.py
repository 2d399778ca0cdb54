"""Decode-time linear layers on the GPU: FP16 (cuBLAS) vs slq's Triton kernels vs Humming.

Writes bench/results/kernels_<device>.json (or $OUT/... when --out is given) and prints a table.

* ceilings: a device-to-device copy (bytes read + written per second);
* per layer (Llama-3-8B shapes; M = 1 and 16; asymmetric g128; bits 2..8): one CUDA graph calls the
  layer on R distinct copies of its weight (R*bytes > 2 x L2), time / R;
* the 32-layer linear stack (q/k/v fused, o, gate/up fused, down): all 128 calls in ONE CUDA graph;
* roofline speedup over FP16 = 16 / (b + (16 + b)/128): the bytes of the weights, a fp16 scale and a
  b-bit zero per group of 128, against 16 bits; "% roofline" = measured speedup / that;
  effective TB/s = those bytes / time.

Usage: python bench/kernels_gpu.py [--bits 2,3,4,5,6,7,8] [--out DIR] [--deadline SECONDS] [--sweep]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from slq.runtime import bench as benchmark  # noqa: E402  (time_graph)
from slq.runtime.backends import triton_gemv as tg  # noqa: E402

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
LAYERS = 32
G = 128
SWEEP_BITS = (2, 4, 8)
GEMV_SWEEP = [dict(num_warps=nw, bn=bn, waves=wv, prefetch=pf)
              for nw, bn, pf in ((1, 256, True), (2, 512, True), (4, 512, True), (2, 512, False)) for wv in (2.0, 4.0, 8.0)]
TILED_SWEEP = [dict(num_warps=4, bn=bn, waves=wv) for bn in (64, 128) for wv in (1.0, 2.0, 4.0)]


def best_configs(sweep: list, m: int) -> dict:
    """Per layer, the config with the lowest mean time over the swept bitwidths."""
    out = {}
    for name in SHAPES:
        rows = [s for s in sweep if s["layer"] == name and s["M"] == m]
        keys = {}
        for s in rows:
            key = tuple((k, s[k]) for k in ("num_warps", "bn", "waves", "prefetch") if k in s)
            keys.setdefault(key, []).append(s["us"])
        if keys:
            best = min(keys, key=lambda kk: sum(keys[kk]) / len(keys[kk]))
            out[name] = dict(best)
    return out


def roofline(b: int) -> float:
    return 16 / (b + (16 + b) / 128)


def qbytes(n: int, k: int, b: int) -> float:
    return n * k * (b + (16 + b) / G) / 8


def time_graph(fn, iters: int = 30, warm: int = 3) -> float:
    """Median ms of one replay of a CUDA graph that captured fn() (the library's timer, 30 replays)."""
    return benchmark.time_graph(fn, iters=iters, warm=warm)


def copy_bandwidth() -> float:
    a = torch.empty(2 * 1024**3 // 2, dtype=torch.float16, device="cuda").normal_()
    b = torch.empty_like(a)
    ms = time_graph(lambda: b.copy_(a), iters=10)
    return 2 * a.numel() * 2 / ms / 1e9  # TB/s


def random_codes(n, k, bits, gen):
    codes = torch.randint(0, 2**bits, (n, k), dtype=torch.uint8, device="cuda", generator=gen)
    scale = (torch.rand(n, k // G, device="cuda", generator=gen) * 0.02 + 1e-3).half()
    zero = torch.randint(0, 2**bits, (n, k // G), dtype=torch.uint8, device="cuda", generator=gen)
    return codes, scale, zero


def clone_triton(w: tg.TritonWeight) -> tg.TritonWeight:
    return dataclasses.replace(
        w, qweight=w.qweight.clone(), scale=w.scale.clone(), zero=w.zero.clone(), counters=torch.zeros_like(w.counters)
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bits", default="2,3,4,5,6,7,8")
    ap.add_argument("--out", default=None)
    ap.add_argument("--deadline", type=float, default=1e9, help="stop starting new work after this many seconds")
    ap.add_argument("--sweep", action="store_true", help="also sweep GEMV/tiled configs per layer")
    ap.add_argument("--no-humming", action="store_true")
    args = ap.parse_args()
    t0 = time.time()
    bits_list = [int(b) for b in args.bits.split(",")]
    torch.backends.cuda.matmul.allow_tf32 = False
    dev = torch.cuda.get_device_name()
    hm = None
    if not args.no_humming:
        try:
            from slq.runtime.backends import humming as hm  # noqa: F811

            import humming

            hm_version = humming.__version__
        except Exception as exc:  # recorded, not fatal: the rest still runs
            hm, hm_version = None, f"unavailable: {exc!r}"
    else:
        hm_version = "skipped"
    try:
        commit = os.environ.get("SLQ_GIT_COMMIT") or subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except Exception:
        commit = "unknown"
    import triton

    res: dict = {
        "device": dev,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "humming": hm_version,
        "git_commit": commit,
        "timestamp": dt.datetime.now(dt.timezone.utc).isoformat(),
        "group_size": G,
        "layers": LAYERS,
        "shapes": SHAPES,
        "l2_bytes": torch.cuda.get_device_properties(0).L2_cache_size,
        "sms": torch.cuda.get_device_properties(0).multi_processor_count,
    }
    out_dir = Path(args.out) if args.out else Path(__file__).resolve().parent / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    safe = dev.replace(" ", "_").replace("/", "_")
    out_path = out_dir / f"kernels_{safe}.json"

    def save():
        out_path.write_text(json.dumps(res, indent=1))

    res["copy_TBps"] = copy_bandwidth()
    print(f"device {dev}: copy {res['copy_TBps']:.2f} TB/s", flush=True)
    gen = torch.Generator(device="cuda").manual_seed(0)
    xs = {m: {k: torch.randn(m, k, device="cuda", generator=gen).half() for k in (4096, 14336)} for m in (1, 16)}

    # FP16 stack: 32 distinct copies of each weight
    fp16 = {name: [torch.randn(n, k, device="cuda", generator=gen).half().mul_(0.02) for _ in range(LAYERS)]
            for name, (n, k) in SHAPES.items()}

    def reps(n, k, b):  # distinct copies so R * bytes > 2 x L2
        return min(LAYERS, max(2, -(-2 * res["l2_bytes"] * 2 // int(qbytes(n, k, b)))))

    res["per_layer"], res["stack"], res["sweep"] = [], [], []
    # FP16 per layer and stack
    for m in (1, 16):
        for name, (n, k) in SHAPES.items():
            r = reps(n, k, 16)
            ws = fp16[name][:r]
            ms = time_graph(lambda: [torch.nn.functional.linear(xs[m][k], w) for w in ws]) / r
            res["per_layer"].append(dict(backend="fp16", bits=16, layer=name, M=m, us=ms * 1e3,
                                         TBps=n * k * 2 / ms / 1e9))
        order = [(name, i) for i in range(LAYERS) for name in SHAPES]
        ms = time_graph(lambda: [torch.nn.functional.linear(xs[m][SHAPES[nm][1]], fp16[nm][i]) for nm, i in order], iters=20)
        tot = sum(n * k * 2 for n, k in SHAPES.values()) * LAYERS
        res["stack"].append(dict(backend="fp16", bits=16, M=m, ms=ms, TBps=tot / ms / 1e9))
        print(f"fp16 stack M={m}: {ms:.3f} ms ({tot / ms / 1e9:.2f} TB/s)", flush=True)
    save()

    for b in bits_list:
        if time.time() - t0 > args.deadline:
            res.setdefault("skipped_bits", []).append(b)
            continue
        ours, hums = {}, {}
        for name, (n, k) in SHAPES.items():
            codes, scale, zero = random_codes(n, k, b, gen)
            w = tg.repack(codes, scale, zero, b, G)
            ours[name] = [w] + [clone_triton(w) for _ in range(LAYERS - 1)]
            h = None
            if hm is not None:
                try:
                    import copy

                    h = hm.repack(codes, scale, zero, b, G, dtype=torch.float16)
                    hums[name] = [h] + [dataclasses.replace(h, layer=copy.deepcopy(h.layer)) for _ in range(LAYERS - 1)]
                except Exception as exc:
                    res.setdefault("humming_errors", []).append(f"b{b} {name}: {exc!r}")
                    h = None
            # correctness on the timed shapes: relative error vs the fp32 dequantized oracle
            gi = torch.arange(k, device="cuda") // G
            wd = ((codes.float() - zero.float()[:, gi]) * scale.float()[:, gi]).half().float()
            for m in (1, 4, 16, 64):
                xc = torch.randn(m, k, device="cuda", generator=gen).half()
                ref = xc.float() @ wd.T
                for be, fn in (("ours", lambda a: tg.quant_matmul(a, w)), ("humming", h)):
                    if fn is None:
                        continue
                    try:
                        y = fn(xc)
                        e = ((y.float() - ref).norm() / ref.norm()).item()
                    except Exception as exc:
                        e = f"{exc!r}"[:200]
                    res.setdefault("check", []).append(dict(backend=be, bits=b, layer=name, M=m, rel_err=e))
                    if not isinstance(e, float) or not e < 2e-3:
                        print(f"CHECK FAILED {be} b={b} {name} M={m}: {e}", flush=True)
            del codes, scale, zero, wd
        backends = {"ours": lambda x, w: tg.quant_matmul(x, w)}
        if hums:
            backends["humming"] = lambda x, w: w(x)
        for m in (1, 16):
            for name, (n, k) in SHAPES.items():
                r = reps(n, k, b)
                for be, op in backends.items():
                    pool = (ours if be == "ours" else hums).get(name)
                    if pool is None:
                        continue
                    ws = pool[:r]
                    try:
                        ms = time_graph(lambda: [op(xs[m][k], w) for w in ws]) / r
                    except Exception as exc:
                        res.setdefault("errors", []).append(f"{be} b{b} {name} M{m}: {exc!r}")
                        continue
                    res["per_layer"].append(dict(backend=be, bits=b, layer=name, M=m, us=ms * 1e3,
                                                 TBps=qbytes(n, k, b) / ms / 1e9))
                if args.sweep and b in SWEEP_BITS and time.time() - t0 < args.deadline:
                    ws = ours[name][:r]
                    path = 1 if m <= tg.GEMV_MAX_M else 2
                    for cfg in (GEMV_SWEEP if path == 1 else TILED_SWEEP):
                        try:
                            ms = time_graph(lambda: [tg._launch(xs[m][k], w, path, **cfg) for w in ws], iters=10) / r
                        except Exception as exc:
                            res.setdefault("errors", []).append(f"sweep b{b} {name} M{m} {cfg}: {exc!r}"[:300])
                            continue
                        res["sweep"].append(dict(bits=b, layer=name, M=m, path=path, **cfg, us=ms * 1e3))
            order = [(name, i) for i in range(LAYERS) for name in SHAPES]
            tot = sum(qbytes(n, k, b) for n, k in SHAPES.values()) * LAYERS
            fp = next(s["ms"] for s in res["stack"] if s["backend"] == "fp16" and s["M"] == m)
            for be, op in backends.items():
                pool = ours if be == "ours" else hums
                if len(pool) < len(SHAPES):
                    continue
                try:
                    ms = time_graph(lambda: [op(xs[m][SHAPES[nm][1]], pool[nm][i]) for nm, i in order], iters=20)
                except Exception as exc:
                    res.setdefault("errors", []).append(f"{be} stack b{b} M{m}: {exc!r}")
                    continue
                sp = fp / ms
                res["stack"].append(dict(backend=be, bits=b, M=m, ms=ms, speedup=sp, roofline_speedup=roofline(b),
                                         pct_roofline=100 * sp / roofline(b), TBps=tot / ms / 1e9))
                print(f"{be:8s} b={b} M={m:2d}: {ms:.3f} ms  x{sp:.2f} ({100 * sp / roofline(b):.0f}% of roofline "
                      f"x{roofline(b):.2f}), {tot / ms / 1e9:.2f} TB/s", flush=True)
            if args.sweep and res["sweep"]:
                best = best_configs(res["sweep"], m)
                if best:
                    try:
                        ms = time_graph(lambda: [tg._launch(xs[m][SHAPES[nm][1]], ours[nm][i], 0, **best[nm]) for nm, i in order], iters=20)
                        sp = fp / ms
                        res["stack"].append(dict(backend="ours_tuned", bits=b, M=m, ms=ms, speedup=sp, roofline_speedup=roofline(b),
                                                 pct_roofline=100 * sp / roofline(b), TBps=tot / ms / 1e9, configs=best))
                        print(f"ours_tuned b={b} M={m:2d}: {ms:.3f} ms  x{sp:.2f} ({100 * sp / roofline(b):.0f}% of roofline)", flush=True)
                    except Exception as exc:
                        res.setdefault("errors", []).append(f"tuned stack b{b} M{m}: {exc!r}"[:300])
        del ours, hums
        torch.cuda.empty_cache()
        save()

    res["elapsed_s"] = time.time() - t0
    save()
    print(f"\nwrote {out_path}")
    print("\n32-layer linear stack, one CUDA graph, asym g128 (speedup over FP16 of this run; % of roofline)")
    for m in (1, 16):
        fp = next(s for s in res["stack"] if s["backend"] == "fp16" and s["M"] == m)
        print(f"M={m}: fp16 {fp['ms']:.3f} ms ({fp['TBps']:.2f} TB/s)")
        print("  bits  roofline   ours: ms  x  %roof  TB/s   humming: ms  x  %roof")
        for b in bits_list:
            o = next((s for s in res["stack"] if s["backend"] == "ours" and s["bits"] == b and s["M"] == m), None)
            h = next((s for s in res["stack"] if s["backend"] == "humming" and s["bits"] == b and s["M"] == m), None)
            row = f"  {b:4d}  x{roofline(b):5.2f}  "
            row += f"{o['ms']:7.3f} {o['speedup']:5.2f} {o['pct_roofline']:4.0f}% {o['TBps']:5.2f}" if o else " " * 30
            row += f"   {h['ms']:7.3f} {h['speedup']:5.2f} {h['pct_roofline']:4.0f}%" if h else "   -"
            t = next((s for s in res["stack"] if s["backend"] == "ours_tuned" and s["bits"] == b and s["M"] == m), None)
            row += f"   tuned: {t['ms']:7.3f} {t['speedup']:5.2f} {t['pct_roofline']:4.0f}%" if t else ""
            print(row)
    for e in res.get("errors", []) + res.get("humming_errors", []):
        print("error:", e[:300])


if __name__ == "__main__":
    main()
