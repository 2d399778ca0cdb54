"""How lossless is uniform quantization? SmolLM2-135M-Instruct, g64, RTN/GPTQ x asym/sym x bits 3..8.

Per configuration: full-vocabulary EAR (95% bootstrap interval over sequences), KL, top-1 and the
perplexity ratio on the first ``--windows`` x 512 tokens of WikiText-2 test; on-policy EAR on
``--on-policy`` continuations of 128 tokens sampled from the reference (prompts: the first 32 tokens of
those windows); zero-shot PIQA / ARC-Easy / HellaSwag / WinoGrande on the first ``--task-limit`` items
each, with paired tests. Also the gamma^2 law: KL(sym)/KL(asym) per bitwidth next to mean gamma^2, and
the throughput of the streaming comparison against one reference forward over the same tokens.

Resumable: each finished configuration is appended to ``<out>.partial.jsonl``; rerunning skips them.

    python bench/fidelity_uniform.py                       # full grid (hours on 2 CPU cores)
    python bench/fidelity_uniform.py --bits 8 --methods rtn --windows 2 --on-policy 2 --task-limit 5   # smoke
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
sys.path.insert(0, str(REPO / "src"))

TASKS = ("piqa", "arc_easy", "hellaswag", "winogrande")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default="rtn,gptq")
    ap.add_argument("--grids", default="asym,sym")
    ap.add_argument("--bits", default="3,4,5,6,7,8")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--on-policy", type=int, default=16)
    ap.add_argument("--task-limit", type=int, default=200)
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--out", default=str(REPO / "bench/results/fidelity_uniform.json"))
    args = ap.parse_args()

    from slq.api import git_commit, versions
    from slq.data import load_text, token_windows
    from slq.fidelity import compare_windows, on_policy_ear
    from slq.models import embedded_default_dir, load_model
    from slq.quantize import quantize_model
    from slq.report import write_json
    from slq.spec import QuantSpec
    from slq.tasks import compare_tasks, load_task, score_task

    torch.manual_seed(0)
    ref, tok = load_model(embedded_default_dir())
    wiki = token_windows(tok, load_text(str(SHARED / "data/wikitext2/wiki.test.raw")), 512, args.windows)
    calib = token_windows(tok, load_text(str(SHARED / "data/calib/c4.utf8")), 512, args.calib_samples)
    prompts = wiki[: args.on_policy, :32]
    items = {t: load_task(t, SHARED / "data/tasks", args.task_limit) for t in TASKS}

    t = time.perf_counter()
    with torch.inference_mode():
        for b in wiki.split(8):
            ref(input_ids=b)
    forward_tps = wiki.numel() / (time.perf_counter() - t)
    ref_tasks = {t: score_task(ref, tok, t, its, progress=False) for t, its in items.items()}

    partial = Path(args.out).with_suffix(".partial.jsonl")
    done = {}
    if partial.exists():
        for line in partial.read_text().splitlines():
            r = json.loads(line)
            done[(r["method"], r["bits"], r["symmetric"])] = r
    rows = []
    for method in args.methods.split(","):
        for grid in args.grids.split(","):
            for bits in (int(b) for b in args.bits.split(",")):
                key = (method, bits, grid == "sym")
                if key in done:
                    rows.append(done[key])
                    continue
                cand = copy.deepcopy(ref)
                t = time.perf_counter()
                res = quantize_model(cand, QuantSpec(bits, args.group_size, grid == "sym"), method=method,
                                     windows=calib if method == "gptq" else None, progress=False)
                quant_s = time.perf_counter() - t
                fid = compare_windows(ref, cand, wiki, progress=False)
                if args.on_policy:
                    fid.on_policy = on_policy_ear(ref, cand, prompts, 128, progress=False)
                cand_tasks = {t: score_task(cand, tok, t, its, progress=False) for t, its in items.items()}
                fid.tasks = compare_tasks(ref_tasks, cand_tasks)
                row = {"method": method, "bits": bits, "symmetric": grid == "sym", "group_size": args.group_size,
                       "bits_per_param": res.plan.bits_per_param(),
                       "gamma2_mean": sum(lp.gamma2_mean for lp in res.plan) / len(res.plan),
                       "quantize_s": quant_s, "fidelity": fid.to_dict()}
                with partial.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                rows.append(row)
                d = row["fidelity"]
                print(f"{method} b={bits} {grid}: EAR {d['ear']['mean']:.4f} {d['ear']['ci95']} KL {d['kl']['mean']:.4f} "
                      f"ppl x{d['ppl']['ratio']:.3f}", flush=True)
                del cand
    result = {
        "benchmark": "fidelity_uniform",
        "model": "SmolLM2-135M-Instruct (embedded, fp32)",
        "device": f"cpu: {platform.machine()}, {torch.get_num_threads()} threads",
        "versions": versions(),
        "git_commit": git_commit(REPO),
        "settings": {**vars(args), "data": "wiki.test.raw first windows x 512", "calib": "c4.utf8",
                     "tasks": list(TASKS), "on_policy_new_tokens": 128, "on_policy_prompt_tokens": 32},
        "reference_forward_tokens_per_s": forward_tps,
        "rows": rows,
    }
    write_json(args.out, result)
    print(markdown(result))
    plot(result, Path(args.out).with_suffix(".png"))


def markdown(result: dict) -> str:
    rows = result["rows"]
    out = ["| method | grid | bits | bits/param | EAR [95% CI] | EAR top-10 | KL | top-1 | PPL ratio | on-policy EAR | "
           + " | ".join(f"{t} delta" for t in TASKS) + " |", "|" + "---|" * (10 + len(TASKS))]
    for r in rows:
        d = r["fidelity"]
        lo, hi = d["ear"]["ci95"]
        op = d.get("on_policy", {}).get("ear", {}).get("mean")
        tasks = [f"{d['tasks'][t]['delta'] * 100:+.1f}" for t in TASKS]
        out.append(f"| {r['method']} | {'sym' if r['symmetric'] else 'asym'} | {r['bits']} | {r['bits_per_param']:.3f} "
                   f"| {d['ear']['mean']:.4f} [{lo:.4f}, {hi:.4f}] | {d['ear_top10']['mean']:.4f} | {d['kl']['mean']:.4f} "
                   f"| {d['top1']:.4f} | {d['ppl']['ratio']:.4f} | {'-' if op is None else f'{op:.4f}'} | "
                   + " | ".join(tasks) + " |")
    out += ["", "gamma^2 law: KL(sym) / KL(asym) at each bitwidth vs measured mean gamma^2", "",
            "| method | bits | KL sym / KL asym | mean gamma^2 |", "|---|---|---|---|"]
    by = {(r["method"], r["bits"], r["symmetric"]): r for r in rows}
    for (m, b, s), r in sorted(by.items()):
        if s or (m, b, True) not in by:
            continue
        ratio = by[(m, b, True)]["fidelity"]["kl"]["mean"] / max(r["fidelity"]["kl"]["mean"], 1e-12)
        out.append(f"| {m} | {b} | {ratio:.3f} | {r['gamma2_mean']:.3f} |")
    tps = [r["fidelity"]["timing"]["tokens_per_s"] for r in rows]
    if tps:
        out.append(f"\nthroughput: slq eval {sum(tps) / len(tps):.0f} tokens/s (both models + metrics) vs one reference "
                   f"forward {result['reference_forward_tokens_per_s']:.0f} tokens/s")
    return "\n".join(out)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for method in ("rtn", "gptq"):
        for sym in (False, True):
            pts = sorted((r["bits_per_param"], r["fidelity"]["ear"]["mean"], *r["fidelity"]["ear"]["ci95"])
                         for r in result["rows"] if r["method"] == method and r["symmetric"] == sym)
            if not pts:
                continue
            x, y, lo, hi = zip(*pts)
            ax.errorbar(x, y, yerr=[[a - b for a, b in zip(y, lo)], [b - a for a, b in zip(y, hi)]], marker="o",
                        capsize=3, label=f"{method.upper()} {'sym' if sym else 'asym'}")
    ax.axhline(0.99, color="gray", ls="--", lw=1, label="DL threshold 0.99")
    ax.set_xlabel("bits per parameter (scales and zeros included)")
    ax.set_ylabel("EAR (full vocabulary), 95% CI")
    ax.set_title("SmolLM2-135M, g64, WikiText-2")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
