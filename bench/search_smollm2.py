"""The SLQ frontier on SmolLM2-135M-Instruct (CPU, or ``--device cuda``): budgets 3..8 vs uniform, DL and
TL targets, estimators.

One SearchSession (GPTQ asym g64 bank, calibration on C4) serves every stage; every measurement is
on held-out WikiText-2 test windows (a different source from the calibration text), through one
cached reference pass. Stages:

- ``frontier``: SLQ at budgets 3.0, 3.5, ..., 8.0 bits/param (default estimator), measured EAR/KL.
- ``uniform``: uniform GPTQ asym 3..8 assembled from the same bank, same windows (side by side).
  Uniform RTN/GPTQ x asym/sym with sequential GPTQ are in fidelity_uniform.json (first 32 x 512 wiki
  tokens, the same text) and are shown beside these in the README.
- ``dl``: the DL target (EAR lower bound >= 0.99), per estimator: bits, measured EAR interval, rounds.
- ``tl``: the TL target (recovery >= 0.99 on PIQA/ARC-E/HellaSwag/WinoGrande, ``--task-limit`` items each).
- ``estimators``: linear vs Fisher vs Shapley: wall time, forward/backward passes, prediction error of
  the additive KL prediction against measured uniform assemblies (sensitivity windows) and against the
  measured DL result (held-out windows), and the DL bits each leads to.

- ``frontier_one_group``: with ``--groups``, the frontier again with only the ``--group-size`` choices (the
  one-group search), measured on the same windows, beside the new choice set.

Options of Search II: ``--groups 128,64,32`` (choices (bits, group size) per unit; ``ch`` = per-channel),
``--verify-data`` (real text the DL stage verifies on besides the calibration source's own held-out windows;
``none``: verify on the calibration source only, with ``--real-text-margin``), ``--calib generated`` (the CLI's
default calibration), ``--head`` (the lm_head as an allocation unit; refused until the writer stores it).

Resumable: each finished stage is appended to ``<out>.partial.jsonl`` and skipped on a rerun; the bank
and sensitivities are cached in ``--workdir``.

    python bench/search_smollm2.py                    # everything (about an hour on 2 CPU cores)
    python bench/search_smollm2.py --stages frontier,uniform
"""

from __future__ import annotations

import argparse
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

STAGES = ("frontier", "frontier_one_group", "uniform", "dl", "estimators", "tl")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stages", default=",".join(STAGES))
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--groups", default=None, help="candidate group sizes per unit, e.g. 128,64,32 (ch: per-channel); "
                                                  "default: --group-size only")
    ap.add_argument("--head", action="store_true", help="the lm_head (and a tied embedding) as an allocation unit")
    ap.add_argument("--calib", default=str(SHARED / "data/calib/c4.utf8"), help="calibration source (or generated)")
    ap.add_argument("--verify-data", default=str(SHARED / "data/wikitext2/wiki.test.raw"),
                    help="real text to verify on (none: the calibration source's held-out windows only)")
    ap.add_argument("--real-text-margin", type=float, default=0.0,
                    help="DL without real text: the lower bound must clear the target by this margin")
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--sens-windows", type=int, default=8)
    ap.add_argument("--sens-seq-len", type=int, default=128)
    ap.add_argument("--verify-windows", type=int, default=16)
    ap.add_argument("--budgets", default="3,3.5,4,4.5,5,5.5,6,6.5,7,7.5,8")
    ap.add_argument("--estimator", default="linear", help="estimator of the frontier / TL stages")
    ap.add_argument("--estimators", default="linear,fisher,shapley")
    ap.add_argument("--shapley-windows", type=int, default=4)
    ap.add_argument("--shapley-bits", default="4,6,8")
    ap.add_argument("--fisher-windows", type=int, default=16)
    ap.add_argument("--task-limit", type=int, default=100)
    ap.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=True,
                    help="GPTQ bank with act-order (static groups; on by default, as in the library)")
    ap.add_argument("--probe-bits", default=None, help="linear estimator: probe bitwidth(s), e.g. 7,8 (default 4)")
    ap.add_argument("--damp", type=float, default=0.01, help="GPTQ damping (fraction of the Hessian's mean diagonal)")
    ap.add_argument("--units", default="fused", help="fused (q/k/v and gate/up share bits) or linear")
    ap.add_argument("--max-rounds", type=int, default=5, help="verification rounds of the DL stage")
    ap.add_argument("--workdir", default=str(Path.home() / ".cache/slq/bench-search-smollm2"))
    ap.add_argument("--out", default=str(REPO / "bench/results/search_smollm2.json"))
    ap.add_argument("--device", default="cpu", help="cpu or cuda (fp32 everywhere; TF32 off)")
    ap.add_argument("--report-only", action="store_true", help="write the JSON/table/plot from the partial file")
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False

    from slq.util.provenance import git_commit, versions
    from slq.models.sources import embedded_default_dir
    from slq.search.config import SearchConfig
    from slq.search.estimators import fisher_estimator, shapley_estimator
    from slq.search.prober import EarMap, Prober
    from slq.search.session import SearchSession

    partial = Path(args.out).with_suffix(".partial.jsonl")
    done = {}
    if partial.exists():
        for line in partial.read_text().splitlines():
            r = json.loads(line)
            done[r["stage"]] = r

    def record(stage: str, data: dict) -> None:
        row = {"stage": stage, **data}
        with partial.open("a") as f:
            f.write(json.dumps(row) + "\n")
        done[stage] = row
        print(f"[{stage}] done in {data.get('wall_s', 0):.0f} s", flush=True)

    if args.report_only:
        from slq.models.sources import load_model
        from slq.quant.units import build_units

        m, _ = load_model(embedded_default_dir())
        result = {
            "benchmark": "search_smollm2", "model": "SmolLM2-135M-Instruct (embedded, fp32)",
            "device": f"cpu: {platform.machine()}, 1 thread per process (OMP_NUM_THREADS=1)",
            "versions": versions(), "git_commit": git_commit(REPO),
            "settings": {**vars(args), "calib": "c4.utf8 (first windows x 512)",
                         "verify": f"wiki.test.raw first {args.verify_windows} x 512 tokens (held out: another source)",
                         "bank": "GPTQ asym, non-sequential Hessians (attention-aware for keys/values), clipping on"},
            "assembled": "from the partial file of runs with these settings (stages recorded as they finished)",
            "n_params_allocated": sum(u.n_params for u in build_units(m)),
            "stages": done,
        }
        from slq.util.jsonio import write_json

        write_json(args.out, result)
        print(markdown(result))
        plot(result, Path(args.out).with_suffix(".png"))
        return

    t0 = time.perf_counter()
    groups = None if not args.groups else tuple(None if g.strip() == "ch" else int(g) for g in args.groups.split(","))
    config = SearchConfig.from_settings(
        group_size=args.group_size, calib=None if args.calib == "generated" else args.calib,
        calib_samples=args.calib_samples, groups=groups, head=args.head, real_text_margin=args.real_text_margin,
        seq_len=512, sens_windows=args.sens_windows, sens_seq_len=args.sens_seq_len, verify_windows=args.verify_windows,
        verify_data=None if args.verify_data == "none" else args.verify_data, estimator=args.estimator, units=args.units,
        act_order=args.act_order, damp=args.damp,
        probe_bits=tuple(int(b) for b in args.probe_bits.split(",")) if args.probe_bits else None,
        workdir=args.workdir, device=args.device)
    s = SearchSession(str(embedded_default_dir()), config, progress=sys.stderr.isatty())
    setup = {"wall_s": time.perf_counter() - t0, "timings": dict(s.timings)}
    print(f"session ready in {setup['wall_s']:.0f} s: {s.timings}", flush=True)
    stages = args.stages.split(",")
    sens_default, emap_default = s.sens, s.emap

    def measured_row(alloc, **extra):
        fid = s.measure(alloc)
        d = fid.to_dict()
        ch = {u.name: s.bank.choice(u, alloc[u.name]) for u in s.units}
        share: dict[str, float] = {}
        for u in s.units:
            share[str(ch[u.name])] = share.get(str(ch[u.name]), 0.0) + u.n_params / s.n_params
        return {**extra, "bits_per_param": s.bits_per_param(alloc), "predicted": s.predicted(alloc),
                "ear": d["ear"], "ear_top10": d["ear_top10"]["mean"], "kl": d["kl"]["mean"], "kl_p99": d["kl"]["p99"],
                "top1": d["top1"], "ppl_ratio": d["ppl"]["ratio"],
                "kept_16bit_share": sum(u.n_params for u in s.units if ch[u.name].keep) / s.n_params,
                "bits_histogram": {str(b): sum(u.n_params for u in s.units if ch[u.name].bits == b) / s.n_params
                                   for b in s.choices},
                "choice_histogram": share}

    if "frontier" in stages and "frontier" not in done:
        t = time.perf_counter()
        rows = []
        for b in (float(x) for x in args.budgets.split(",")):
            alloc, _ = s.solve(budget_bpp=b)
            rows.append(measured_row(alloc, budget=b, allocation={k: str(c) for k, c in alloc.items()}))
            print(f"  budget {b}: {rows[-1]['bits_per_param']:.3f} b/p EAR {rows[-1]['ear']['mean']:.4f} "
                  f"KL {rows[-1]['kl']:.2e}", flush=True)
        record("frontier", {"wall_s": time.perf_counter() - t, "estimator": s.sens.estimator, "rows": rows,
                            "groups": [str(g) for g in s.config.groups],
                            "choices": {"n_choices": sum(len(s.unit_choices(u)) for u in s.units),
                                        "pruned": s.bank.pruned}})

    if "frontier_one_group" in stages and "frontier_one_group" not in done and len(s.config.groups) > 1:
        t = time.perf_counter()
        rows = []
        for b in (float(x) for x in args.budgets.split(",")):
            alloc, _ = s.solve(budget_bpp=b, one_group=True)
            rows.append(measured_row(alloc, budget=b, allocation={k: str(c) for k, c in alloc.items()}))
        record("frontier_one_group", {"wall_s": time.perf_counter() - t, "group_size": args.group_size,
                                      "rows": rows})

    if "uniform" in stages and "uniform" not in done:
        t = time.perf_counter()
        rows = [measured_row(s.uniform(b), bits=b) for b in s.quant_bits if b >= 3]
        record("uniform", {"wall_s": time.perf_counter() - t, "method": "gptq (bank, non-sequential)",
                           "symmetric": False, "rows": rows})

    if "dl" in stages and "dl" not in done:
        t = time.perf_counter()
        res = s.run("dl", ear=0.99, max_rounds=args.max_rounds)
        rows = [{k: v for k, v in r.items()} for r in res["rounds"]]
        record("dl", {"wall_s": time.perf_counter() - t, "estimator": s.sens.estimator, "rounds": rows,
                      "verified": res["accepted"] is not None, "ear_map": s.emap.to_dict(),
                      "verification": res.get("verification")})

    if "estimators" in stages and "estimators" not in done:
        t = time.perf_counter()
        out = {}
        for name in args.estimators.split(","):
            te = time.perf_counter()
            if name == "shapley":  # reduced: fewer windows and bitwidths (cost: bits x units passes)
                pr = Prober(s.model, s.bank, s.sens_w[: args.shapley_windows])
                sens = shapley_estimator(pr, orderings=1, bitwidths=tuple(int(b) for b in args.shapley_bits.split(",")),
                                         progress=sys.stderr.isatty())
                s.bank.restore(s.model)
                s.sens = sens
                s.emap = EarMap().fit([(p["kl"], p["tv"]) for p in s.uniform_sens])
            elif name == "fisher":
                fw = s.calib_w[: args.fisher_windows, : args.sens_seq_len * 2]
                sens = fisher_estimator(s.model, s.bank, fw, draws=1, progress=sys.stderr.isatty())
                s.bank.restore(s.model)
                s.sens = sens
                s.emap = EarMap().fit([(p["kl"], p["tv"]) for p in s.uniform_sens])
            else:
                s.estimate(name)
            sens = s.sens
            check = [{"bits": p["bits"], "measured_kl": p["kl"],
                      "predicted_kl": sum(sens.kl[u.name][s.bank.choice(u, p["bits"])] for u in s.units)}
                     for p in s.uniform_sens]
            res = s.run("dl", ear=0.99, max_rounds=5)
            fin = res["final"]
            out[name] = {
                "seconds": time.perf_counter() - te, "estimator_seconds": sens.seconds, "passes": sens.forward_calls,
                "details": sens.details, "uniform_check": check,
                "uniform_log_ratio_rms": float(torch.tensor([__import__("math").log(c["predicted_kl"] / c["measured_kl"])
                                                             for c in check]).pow(2).mean().sqrt()),
                "dl": {"verified": res["accepted"] is not None, "rounds": len(res["rounds"]),
                       "bits_per_param": fin["bits_per_param"], "measured_ear": fin["measured"]["ear"],
                       "measured_kl": fin["measured"]["kl"]["mean"], "predicted_kl": fin["predicted"]["kl"],
                       "round1_predicted_kl": res["rounds"][0]["predicted"]["kl"],
                       "round1_measured_kl": res["rounds"][0]["measured"]["kl"]["mean"]},
            }
            print(f"  {name}: {out[name]['seconds']:.0f} s, DL {fin['bits_per_param']:.3f} b/p, "
                  f"uniform log-ratio rms {out[name]['uniform_log_ratio_rms']:.3f}", flush=True)
        s.sens, s.emap = sens_default, emap_default
        record("estimators", {"wall_s": time.perf_counter() - t, "estimators": out})

    if "tl" in stages and "tl" not in done:
        t = time.perf_counter()
        s.sens, s.emap = sens_default, emap_default
        res = s.run("tl", recovery=0.99, task_limit=args.task_limit, max_rounds=4)
        rows = [{k: v for k, v in r.items()} for r in res["rounds"]]
        record("tl", {"wall_s": time.perf_counter() - t, "rounds": rows, "anchor": res["anchor"],
                      "verified": res["accepted"] is not None, "task_limit": args.task_limit})

    result = {
        "benchmark": "search_smollm2",
        "model": "SmolLM2-135M-Instruct (embedded, fp32)",
        "device": (f"cuda: {torch.cuda.get_device_name()}" if args.device.startswith("cuda") else
                   f"cpu: {platform.machine()}, {torch.get_num_threads()} threads"),
        "versions": versions(),
        "git_commit": git_commit(REPO),
        "settings": {**vars(args), "act_order": s.config.quant.act_order, "calib": args.calib,
                     "verify": f"{args.verify_data}: first {args.verify_windows} x 512 tokens",
                     "bank": "GPTQ asym, non-sequential Hessians (attention-aware for keys/values), clipping on",
                     "bitwidths": list(s.config.bitwidths), "groups": [str(g) for g in s.config.groups]},
        "setup": setup,
        "n_params_allocated": s.n_params,
        "stages": {k: v for k, v in done.items()},
    }
    from slq.util.jsonio import write_json

    write_json(args.out, result)
    print(markdown(result))
    try:
        plot(result, Path(args.out).with_suffix(".png"))
    except ImportError as e:  # the GPU image has no matplotlib; the JSON is the result
        print(f"no plot: {e}")


def markdown(result: dict) -> str:
    st = result["stages"]
    out = []
    if "frontier" in st:
        out += ["| budget | bits/param | EAR [95% CI] | EAR top-10 | KL | top-1 | PPL ratio | kept 16-bit |",
                "|---:|---:|---|---:|---:|---:|---:|---:|"]
        for r in st["frontier"]["rows"]:
            e = r["ear"]
            out.append(f"| {r['budget']} | {r['bits_per_param']:.3f} | {e['mean']:.4f} [{e['ci95'][0]:.4f}, "
                       f"{e['ci95'][1]:.4f}] | {r['ear_top10']:.4f} | {r['kl']:.2e} | {r['top1']:.4f} | "
                       f"{r['ppl_ratio']:.4f} | {r['kept_16bit_share']:.1%} |")
    if "frontier_one_group" in st:
        out += ["", f"One group size (g{st['frontier_one_group']['group_size']}) only:", "",
                "| budget | bits/param | EAR [95% CI] | KL |", "|---:|---:|---|---:|"]
        for r in st["frontier_one_group"]["rows"]:
            e = r["ear"]
            out.append(f"| {r['budget']} | {r['bits_per_param']:.3f} | {e['mean']:.4f} [{e['ci95'][0]:.4f}, "
                       f"{e['ci95'][1]:.4f}] | {r['kl']:.2e} |")
    if "uniform" in st:
        out += ["", "| uniform GPTQ asym (bank) | bits/param | EAR [95% CI] | EAR top-10 | KL | top-1 | PPL ratio |",
                "|---:|---:|---|---:|---:|---:|---:|"]
        for r in st["uniform"]["rows"]:
            e = r["ear"]
            out.append(f"| {r['bits']} | {r['bits_per_param']:.3f} | {e['mean']:.4f} [{e['ci95'][0]:.4f}, "
                       f"{e['ci95'][1]:.4f}] | {r['ear_top10']:.4f} | {r['kl']:.2e} | {r['top1']:.4f} | {r['ppl_ratio']:.4f} |")
    if "dl" in st:
        out += ["", "DL rounds:"]
        for r in st["dl"]["rounds"]:
            m = r["measured"]
            out.append(f"- round {r['round']}: {r['bits_per_param']:.3f} b/p, EAR {m['ear']['mean']:.4f} "
                       f"[{m['ear']['ci95'][0]:.4f}, {m['ear']['ci95'][1]:.4f}], accepted {r['accepted']}")
    if "estimators" in st:
        out += ["", "| estimator | wall s | passes | uniform KL log-ratio RMS | DL bits/param | DL EAR lower bound | rounds |",
                "|---|---:|---:|---:|---:|---:|---:|"]
        for n, e in st["estimators"]["estimators"].items():
            out.append(f"| {n} | {e['estimator_seconds']:.0f} | {e['passes']} | {e['uniform_log_ratio_rms']:.3f} | "
                       f"{e['dl']['bits_per_param']:.3f} | {e['dl']['measured_ear']['ci95'][0]:.4f} | {e['dl']['rounds']} |")
    if "tl" in st:
        out += ["", "TL rounds:"]
        a = st["tl"]["anchor"]
        out.append(f"- anchor 4-bit: recovery {a['recovery']:.4f}, KL {a['kl']:.3e}, KL budget {a['kl_budget']:.3e}")
        for r in st["tl"]["rounds"]:
            av = r["tasks"]["average"]
            out.append(f"- round {r['round']}: {r['bits_per_param']:.3f} b/p, avg delta {av['delta']:+.4f} "
                       f"[{av['ci95'][0]:+.4f}, {av['ci95'][1]:+.4f}], lossless {r['accepted']}")
    return "\n".join(out)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    st = result["stages"]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for key, label, mk in (("frontier", "SLQ (per-unit choices)", "o"),
                           ("frontier_one_group", "SLQ, one group size", "^"), ("uniform", "uniform GPTQ asym", "s")):
        if key not in st:
            continue
        rows = sorted(st[key]["rows"], key=lambda r: r["bits_per_param"])
        x = [r["bits_per_param"] for r in rows]
        y = [r["ear"]["mean"] for r in rows]
        lo = [r["ear"]["mean"] - r["ear"]["ci95"][0] for r in rows]
        hi = [r["ear"]["ci95"][1] - r["ear"]["mean"] for r in rows]
        a1.errorbar(x, y, yerr=[lo, hi], marker=mk, capsize=3, label=label)
        a2.plot(x, [r["kl"] for r in rows], marker=mk, label=label)
    if "dl" in st:
        for r in st["dl"]["rounds"]:
            a1.plot([r["bits_per_param"]], [r["measured"]["ear"]["mean"]], "*", ms=13,
                    color="C3" if r["accepted"] else "C1", label=f"DL round {r['round']}")
    a1.axhline(0.99, color="gray", ls="--", lw=1, label="DL threshold 0.99")
    a1.set_xlabel("bits per parameter (scales, zeros included)")
    a1.set_ylabel("EAR on held-out WikiText-2 (95% CI)")
    a2.set_xlabel("bits per parameter")
    a2.set_ylabel("KL(ref || cand) per token")
    a2.set_yscale("log")
    for a in (a1, a2):
        a.grid(alpha=0.3)
        a.legend(fontsize=7)
    fig.suptitle("SmolLM2-135M, g64, SLQ search vs uniform (CPU)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
