"""GPTQ with and without act-order on SmolLM2-135M-Instruct (CPU): uniform g64 asym, side by side.

Act-order quantizes each linear's columns by decreasing Hessian diagonal, with static groups (the group
parameters come from the original weights; see ``slq.gptq``). Both arms use the same calibration
windows (the first ``--calib`` x 512 tokens of C4), the bank's setting (non-sequential GPTQ,
attention-aware key/value Hessians), and are measured against the fp32 reference on the first
``--windows`` x 512 tokens of WikiText-2 test (full-vocabulary EAR and KL).

    python bench/experiments/act_order.py                   # bits 4, 7, 8 (about 13 minutes on 2 cores)
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("SLQ_SHARED", REPO.parent / "shared"))
sys.path.insert(0, str(REPO / "src"))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bits", default="4,7,8")
    ap.add_argument("--calib", type=int, default=16)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--out", default=str(REPO / "bench/results/act_order.json"))
    args = ap.parse_args()

    from slq.util.provenance import git_commit, versions
    from slq.measure.data import windows_from_source
    from slq.measure.fidelity import CachedLogits, compare_windows
    from slq.models.sources import embedded_default_dir, load_model
    from slq.quant.pipeline import quantize_model
    from slq.util.jsonio import write_json
    from slq.quant.spec import QuantSpec

    ref, tok = load_model(embedded_default_dir())
    calib = windows_from_source(str(SHARED / "data/calib/c4.utf8"), ref, tok, n=args.calib, seq_len=512)
    wiki = windows_from_source(str(SHARED / "data/wikitext2/wiki.test.raw"), ref, tok, n=args.windows, seq_len=512)
    cache = CachedLogits().record(ref, wiki)
    rows = []
    for bits in (int(b) for b in args.bits.split(",")):
        for act in (False, True):
            cand = copy.deepcopy(ref)
            t = time.perf_counter()
            res = quantize_model(cand, QuantSpec(bits, 64, False), method="gptq", windows=calib, sequential=False,
                                 act_order=act, progress=False)
            quant_s = time.perf_counter() - t
            d = compare_windows(cache, cand, wiki, progress=False).to_dict()
            rows.append({"bits": bits, "act_order": act, "bits_per_param": res.plan.bits_per_param(),
                         "quantize_s": quant_s, "ear": d["ear"], "kl": d["kl"], "top1": d["top1"],
                         "ppl_ratio": d["ppl"]["ratio"]})
            print(f"{bits}-bit act_order={act}: KL {d['kl']['mean']:.4e} EAR {d['ear']['mean']:.5f} "
                  f"({quant_s:.0f} s)", flush=True)
            del cand
    ratios = {str(b): next(r["kl"]["mean"] for r in rows if r["bits"] == b and r["act_order"])
              / next(r["kl"]["mean"] for r in rows if r["bits"] == b and not r["act_order"])
              for b in sorted({r["bits"] for r in rows})}
    write_json(args.out, {
        "benchmark": "act_order", "model": "SmolLM2-135M-Instruct (embedded, fp32)",
        "device": f"cpu: {platform.machine()}, {torch.get_num_threads()} threads",
        "versions": versions(), "git_commit": git_commit(REPO),
        "settings": {**vars(args), "group_size": 64, "symmetric": False, "sequential": False,
                     "attention_hessians": True, "calib_source": "c4.utf8", "data": "wiki.test.raw first windows x 512"},
        "kl_ratio_act_order_over_plain": ratios, "rows": rows})
    print("KL(act-order) / KL(plain):", {b: round(r, 3) for b, r in ratios.items()})


if __name__ == "__main__":
    main()
