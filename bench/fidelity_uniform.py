"""How lossless is uniform quantization? SmolLM2-135M-Instruct, g64, RTN/GPTQ x asym/sym x bits 3..8.

Per configuration: full-vocabulary EAR (95% bootstrap interval over sequences), KL, top-1 and the
perplexity ratio on the first ``--windows`` x 512 tokens of WikiText-2 test; on-policy EAR on
``--on-policy`` continuations of 128 tokens sampled from the reference (prompts: the first 32 tokens of
those windows); zero-shot PIQA / ARC-Easy / HellaSwag / WinoGrande on the first ``--task-limit`` items
each, with paired tests. Also the gamma^2 law: KL(sym)/KL(asym) per bitwidth next to mean gamma^2, and
the throughput of the streaming comparison against one reference forward over the same tokens.

Resumable: each finished configuration is appended to ``<out>.partial.jsonl``; rerunning with the same ``--out``
skips them. A row measured without the tasks that a rerun asks for (``--task-configs``/``--task-bits``) is
re-quantized (the quantization is deterministic) and gets them. Without ``--out`` a new run is written to the
next ``bench/results/fidelity_uniform/run-NN.json``.

    python bench/fidelity_uniform.py                       # full grid (hours on 2 CPU cores)
    python bench/fidelity_uniform.py --bits 8 --methods rtn --windows 2 --on-policy 2 --task-limit 5   # smoke
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SLQ_SHARED", REPO.parent / "shared"))
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "bench"))
from _results import next_run  # noqa: E402

TASKS = ("piqa", "arc_easy", "hellaswag", "winogrande")


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default="rtn,gptq")
    ap.add_argument("--grids", default="asym,sym")
    ap.add_argument("--bits", default="3,4,5,6,7,8")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--on-policy", type=int, default=16)
    ap.add_argument("--task-limit", type=int, default=100)
    ap.add_argument("--task-configs", default="gptq-asym",
                    help="method-grid pairs that also get the zero-shot tasks (CPU time): e.g. gptq-asym,rtn-asym; 'all'")
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--out", default=None, help="result JSON (default: the next bench/results/fidelity_uniform/"
                                                "run-NN.json); pass an earlier run's file to resume it")
    ap.add_argument("--task-bits", default="", help="only these bitwidths get the tasks (default: all)")
    ap.add_argument("--merge", default="", help="comma list of other runs' .partial.jsonl files whose rows join this "
                                                "result (a grid split over processes; same settings)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (fp32 everywhere; TF32 off)")
    ap.add_argument("--report-only", action="store_true", help="write the JSON/table/plot from the partial files")
    args = ap.parse_args()
    args.out = args.out or str(next_run("fidelity_uniform"))
    run_args = dict(vars(args))

    from slq.util.provenance import git_commit, versions
    from slq.measure.data import load_text, token_windows
    from slq.measure.fidelity import CachedLogits, compare_windows, sample_continuations
    from slq.models.sources import embedded_default_dir, load_model
    from slq.quant.pipeline import quantize_model
    from slq.util.jsonio import write_json
    from slq.quant.spec import QuantSpec
    from slq.measure.tasks import compare_tasks, load_task, score_task

    torch.manual_seed(0)
    dev = args.device
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    ref, tok = load_model(embedded_default_dir())
    ref.to(dev)
    tbs = 64 if dev.startswith("cuda") else 16  # zero-shot batch (scores do not depend on it)
    wiki = token_windows(tok, load_text(str(SHARED / "data/wikitext2/wiki.test.raw")), 512, args.windows)
    calib = token_windows(tok, load_text(str(SHARED / "data/calib/c4.utf8")), 512, args.calib_samples)
    prompts = wiki[: args.on_policy, :32]
    items = {t: load_task(t, SHARED / "data/tasks", args.task_limit) for t in TASKS}

    # Throughput: the streaming comparison of two real models (what `slq eval` runs) against one plain
    # forward of the reference over the same tokens (8 windows). The candidate is a copy of the
    # reference, which also checks EAR(p, p) = 1 on a real model.
    tp_windows = wiki[:8]
    with torch.inference_mode():
        ref(input_ids=tp_windows[:1, :-1].to(dev))  # warm-up
        sync()
        t = time.perf_counter()
        for b in tp_windows.split(8):
            ref(input_ids=b[:, :-1].to(dev))
        sync()
        forward_s = time.perf_counter() - t
    twin = copy.deepcopy(ref)
    self_fid = compare_windows(ref, twin, tp_windows, progress=False, device=dev)
    del twin
    throughput = {"windows": int(tp_windows.shape[0]), "tokens": int(tp_windows.shape[0] * 511),
                  "reference_forward_tokens_per_s": tp_windows.shape[0] * 511 / forward_s,
                  "eval_tokens_per_s": self_fid.tokens_per_s,
                  "eval_over_forward": self_fid.tokens_per_s / (tp_windows.shape[0] * 511 / forward_s),
                  "self_ear": self_fid.ear, "self_kl": self_fid.kl_pq_mean}
    forward_tps = throughput["reference_forward_tokens_per_s"]
    print(f"throughput: {throughput}", flush=True)

    # The reference is the same for every configuration: its logits on the wiki windows and on the
    # on-policy continuations (sampled once, seed 0) are computed once and replayed.
    t = time.perf_counter()
    if args.report_only:
        args.on_policy, items = 0, {}
    ref_wiki = CachedLogits().record(ref, wiki, device=dev) if not args.report_only else None
    op_windows, op_mask = (sample_continuations(ref, prompts, 128, seed=0, device=dev) if args.on_policy
                           else (None, None))
    ref_op = CachedLogits().record(ref, op_windows, device=dev) if args.on_policy else None
    task_configs = None if args.task_configs == "all" else set(args.task_configs.split(","))
    wants_tasks = task_configs is None or any(f"{m}-{g}" in task_configs for m in args.methods.split(",")
                                              for g in args.grids.split(","))
    ref_tasks = {t: score_task(ref, tok, t, its, progress=False, device=dev, batch_size=tbs) for t, its in items.items()} if wants_tasks else {}
    reference_s = time.perf_counter() - t

    partial = Path(args.out).with_suffix(".partial.jsonl")
    done = {}
    if Path(args.out).exists():  # rows of an earlier (possibly partial) result count as done too
        for r in json.loads(Path(args.out).read_text()).get("rows", []):
            done[(r["method"], r["bits"], r["symmetric"])] = r
    if partial.exists():
        for line in partial.read_text().splitlines():
            r = json.loads(line)
            done[(r["method"], r["bits"], r["symmetric"])] = r
    def tasks_of(cand) -> dict:
        """Paired zero-shot comparison of a candidate with the reference, timed."""
        t = time.perf_counter()
        out = compare_tasks(ref_tasks, {n: score_task(cand, tok, n, its, progress=False, device=dev, batch_size=tbs)
                                              for n, its in items.items()})
        out["wall_s"] = time.perf_counter() - t
        return out

    rows = []
    reused = added = 0
    if args.report_only:  # the rows of interrupted / split runs, from their partial files (no quantizing)
        rows = list(done.values())
        args.methods = ""
    for method in (m for m in args.methods.split(",") if m):
        for grid in args.grids.split(","):
            for bits in (int(b) for b in args.bits.split(",")):
                key = (method, bits, grid == "sym")
                task_bits = {int(x) for x in args.task_bits.split(",") if x}
                wants = (task_configs is None or f"{method}-{grid}" in task_configs) and (not task_bits or bits in task_bits)
                if key in done and (not wants or done[key]["fidelity"].get("tasks")):
                    rows.append(done[key])
                    reused += 1
                    continue
                cand = copy.deepcopy(ref)
                t = time.perf_counter()
                res = quantize_model(cand, QuantSpec(bits, args.group_size, grid == "sym"), method=method,
                                     windows=calib if method == "gptq" else None, progress=False, device=dev)
                sync()
                quant_s = time.perf_counter() - t
                if key in done:  # measured before without tasks: the same (deterministic) quantization gets them now
                    row = done[key]
                    row["fidelity"]["tasks"] = tasks_of(cand)
                    row["fidelity"]["tasks"]["added_later"] = (
                        f"task_limit {args.task_limit}; re-quantized by commit {git_commit(REPO)}, whose codes can "
                        "differ from the measured row's at rounding ties if the quantizer changed in between")
                    with partial.open("a") as f:
                        f.write(json.dumps(row) + "\n")
                    rows.append(row)
                    print(f"{method} b={bits} {grid}: tasks added", flush=True)
                    added += 1
                    del cand
                    continue
                fid = compare_windows(ref_wiki, cand, wiki, progress=False, device=dev)
                if args.on_policy:
                    fid.on_policy = compare_windows(ref_op, cand, op_windows, mask=op_mask, progress=False,
                                                    device=dev)
                if wants:
                    fid.tasks = tasks_of(cand)
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
    for other in (x for x in args.merge.split(",") if x):
        for line in Path(other).read_text().splitlines():
            r = json.loads(line)
            if (r["method"], r["bits"], r["symmetric"]) not in {(x["method"], x["bits"], x["symmetric"]) for x in rows}:
                rows.append(r)
    order = {"rtn": 0, "gptq": 1}
    rows.sort(key=lambda r: (order.get(r["method"], 9), r["symmetric"], r["bits"]))
    result = {
        "benchmark": "fidelity_uniform",
        "model": "SmolLM2-135M-Instruct (embedded, fp32)",
        "device": (f"cuda: {torch.cuda.get_device_name()}" if dev.startswith("cuda") else
                   f"cpu: {platform.machine()}, {torch.get_num_threads()} threads"),
        "versions": versions(),
        "git_commit": git_commit(REPO),
        "settings": {**run_args, "data": "wiki.test.raw first windows x 512", "calib": "c4.utf8",
                     "tasks": list(TASKS), "on_policy_new_tokens": 128, "on_policy_prompt_tokens": 32},
        "reference_forward_tokens_per_s": forward_tps,
        "throughput": throughput,
        "assembled": ("rows from partial files of split/interrupted runs (same settings); throughput measured "
                      "in the assembling run") if args.report_only else
                     (f"{len(rows) - reused - added} configurations run in this process; {reused} rows reused from "
                      f"earlier runs with the same settings (result file / partial files); {added} earlier rows got "
                      "their zero-shot tasks in this process (re-quantized); throughput measured in this run"
                      if reused or added else "one run"),
        "reference_cached_s": reference_s,
        "timing_note": ("fidelity tokens/s count both models; the reference side replays logits cached once "
                        "(CachedLogits), so per configuration only the candidate runs"),
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
        tasks = [f"{d['tasks'][t]['delta'] * 100:+.1f}" if d.get("tasks") else "-" for t in TASKS]
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
    tp = result.get("throughput")
    if tp:
        out.append(f"\nthroughput ({tp['tokens']} tokens): slq eval streaming two models {tp['eval_tokens_per_s']:.0f} "
                   f"tokens/s vs one reference forward {tp['reference_forward_tokens_per_s']:.0f} tokens/s "
                   f"(ratio {tp['eval_over_forward']:.3f}; 0.5 would be the cost of two forwards); "
                   f"EAR(p, p) = {tp['self_ear']:.6f}, KL(p, p) = {tp['self_kl']:.2e}")
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
