"""Plain vs attention-aware key/value Hessians for GPTQ, SmolLM2-135M-Instruct g64 (CPU).

One projection type at a time is quantized (the rest of the model stays fp32), then every linear: RTN,
GPTQ with ``X^T X`` for every linear (``attention=False``) and GPTQ with the per key/value head Hessians
of :mod:`slq.calib` (the default). GPTQ is sequential (``slq quantize``'s pipeline), calibrated on the
first ``--calib`` x 512 tokens of C4; KL and full-vocabulary EAR on the first ``--windows`` x 512 tokens of
WikiText-2 test (another source), through one cached reference pass.

    python bench/experiments/attention_hessians.py                   # bits 8 and 4, about 25 minutes on 2 CPU threads
    python bench/experiments/attention_hessians.py --bits 8 --parts v_proj
"""

from __future__ import annotations

import argparse
import copy
import platform
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared"
sys.path.insert(0, str(REPO / "src"))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bits", default="8,4")
    ap.add_argument("--parts", default="k_proj,v_proj,all", help="projection suffixes quantized alone, or 'all'")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--calib", type=int, default=16)
    ap.add_argument("--out", default=str(REPO / "bench/results/attention_hessians.json"))
    args = ap.parse_args()

    from slq.util.provenance import git_commit, versions
    from slq.measure.data import load_text, token_windows
    from slq.measure.fidelity import CachedLogits, compare_windows
    from slq.models.sources import embedded_default_dir, load_model
    from slq.quant.pipeline import quantizable_linears, quantize_model
    from slq.util.jsonio import write_json
    from slq.quant.spec import QuantSpec

    ref, tok = load_model(embedded_default_dir())
    test = token_windows(tok, load_text(str(SHARED / "data/wikitext2/wiki.test.raw")), 512, args.windows)
    calib = token_windows(tok, load_text(str(SHARED / "data/calib/c4.utf8")), 512, args.calib)
    cache = CachedLogits().record(ref, test)
    names = list(quantizable_linears(ref))
    rows = []
    for bits in (int(b) for b in args.bits.split(",")):
        for part in args.parts.split(","):
            specs = {n: QuantSpec(bits, 64, False) if part == "all" or n.endswith(part) else None for n in names}
            for mode in ("rtn", "gptq_plain", "gptq_attention"):
                cand = copy.deepcopy(ref)
                t = time.perf_counter()
                quantize_model(cand, specs=specs, method="rtn" if mode == "rtn" else "gptq",
                               windows=None if mode == "rtn" else calib, attention=mode == "gptq_attention",
                               progress=False)
                quant_s = time.perf_counter() - t
                d = compare_windows(cache, cand, test, progress=False).to_dict()
                rows.append({"bits": bits, "part": part, "mode": mode, "quantize_s": quant_s, "kl": d["kl"]["mean"],
                             "ear": d["ear"], "top1": d["top1"], "ppl_ratio": d["ppl"]["ratio"]})
                print(f"b={bits} {part:7s} {mode:15s} KL {d['kl']['mean']:.3e} EAR {d['ear']['mean']:.4f} "
                      f"({quant_s:.0f} s)", flush=True)
                del cand
    result = {"benchmark": "attention_hessians", "model": "SmolLM2-135M-Instruct (embedded, fp32)",
              "device": f"cpu: {platform.machine()}, {torch.get_num_threads()} threads", "versions": versions(),
              "git_commit": git_commit(REPO),
              "settings": {**vars(args), "group_size": 64, "symmetric": False, "gptq": "sequential, damp 0.01, clip on",
                           "calib_source": "c4.utf8 first windows x 512", "eval": "wiki.test.raw first windows x 512"},
              "rows": rows}
    write_json(args.out, result)
    print(markdown(result))


def markdown(result: dict) -> str:
    by = {(r["bits"], r["part"], r["mode"]): r for r in result["rows"]}
    out = ["| bits | quantized | RTN KL | GPTQ plain KL | GPTQ attention-aware KL | attention-aware / plain | "
           "EAR (RTN / plain / attention-aware) |", "|---:|---|---:|---:|---:|---:|---|"]
    for (bits, part, mode), r in by.items():
        if mode != "rtn":
            continue
        p, a = by[(bits, part, "gptq_plain")], by[(bits, part, "gptq_attention")]
        out.append(f"| {bits} | {part} | {r['kl']:.2e} | {p['kl']:.2e} | {a['kl']:.2e} | {a['kl'] / p['kl']:.2f} | "
                   f"{r['ear']['mean']:.4f} / {p['ear']['mean']:.4f} / {a['ear']['mean']:.4f} |")
    return "\n".join(out)


if __name__ == "__main__":
    main()
