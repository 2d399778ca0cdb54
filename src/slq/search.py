"""The SLQ bit search: per-unit bitwidths chosen by an exact knapsack from measured sensitivities,
then assembled from the bank and *measured* on held-out windows.

Targets:

- ``dl`` (distribution-lossless): the fewest bits whose predicted EAR is >= ``ear``. Predicted KL is
  the sum of the units' costs; :class:`slq.sensitivity.EarMap` (fitted on measured points of the
  sensitivity windows) turns the EAR target into a KL budget. The allocation is assembled and its EAR
  measured on the verification windows; it is accepted only when the 95% bootstrap lower bound is
  >= ``ear``. Otherwise the KL budget is tightened by the measured shortfall (through the map's
  exponent, with a 10% margin) and the search repeats, for at most ``max_rounds`` rounds.
- ``tl`` (task-lossless): a uniform 4-bit anchor from the bank is scored on the zero-shot tasks and
  its KL measured; ``recovery ~ 1 - alpha * KL`` gives ``alpha`` and the recovery target a KL budget.
  The allocation is verified with the paired zero-shot test (average over the tasks: the 95% interval
  of the accuracy change contains 0 and |delta| <= ``tolerance``); a failure halves the budget.
- ``bits``: least predicted KL with average bits per parameter <= the budget (one round, measured).

Every round is recorded. The calibration windows (bank, sensitivities) and the verification windows
never overlap: text sources use the windows after the calibration ones, ``generated`` data another seed.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path

import torch

from .allocate import allocate
from .bank import Bank, build_bank
from .data import GENERATED, windows_from_source
from .errors import SlqError
from .fidelity import CachedLogits, compare_windows
from .progress import progress_bar  # noqa: F401  (re-exported for callers that show their own bars)
from .sensitivity import (ESTIMATORS, EarMap, Prober, Sensitivity, fisher_estimator, linear_estimator,
                          shapley_estimator)
from .spec import LayerPlan, Plan, QuantSpec, model_bits_per_param, resolve_group_size
from .units import KEEP_BITS, build_units, storage_bits

TARGETS = ("dl", "tl", "bits")
DEFAULT_BITWIDTHS = (2, 3, 4, 5, 6, 7, 8, 16)
DEFAULT_TASKS = ("piqa", "arc_easy", "hellaswag", "winogrande")


def _choices(bank: Bank, allow16: bool) -> list[int]:
    return list(bank.bitwidths) + ([KEEP_BITS] if allow16 else [])


def _problem(bank: Bank, sens: Sensitivity, choices: list[int]):
    costs = [[sens.kl[u.name][b] for b in choices] for u in bank.units]
    sizes = [[storage_bits(u, b, bank.group_size, bank.symmetric) for b in choices] for u in bank.units]
    return costs, sizes


def _solve(bank, sens, choices, *, budget_bpp=None, max_kl=None, n_params=None):
    costs, sizes = _problem(bank, sens, choices)
    if budget_bpp is not None:
        sol = allocate(costs, sizes, budget=int(math.floor(budget_bpp * n_params)), n_params=n_params)
    else:
        sol = allocate(costs, sizes, max_loss=max_kl)
    alloc = {u.name: choices[j] for u, j in zip(bank.units, sol.choice)}
    return alloc, sol


def allocation_bits(bank: Bank, alloc: dict[str, int]) -> tuple[int, int]:
    """(total storage bits, parameters) over the allocatable linears (16-bit units at 16)."""
    bits = sum(storage_bits(u, alloc[u.name], bank.group_size, bank.symmetric) for u in bank.units)
    return bits, sum(u.n_params for u in bank.units)


def _fid_summary(fid) -> dict:
    d = fid.to_dict()
    return {"ear": {"mean": d["ear"]["mean"], "ci95": d["ear"]["ci95"]},
            "ear_top10": {"mean": d["ear_top10"]["mean"], "ci95": d["ear_top10"]["ci95"]},
            "kl": {"mean": d["kl"]["mean"], "p99": d["kl"]["p99"]}, "top1": d["top1"],
            "ppl_ratio": d["ppl"]["ratio"], "ppl": d["ppl"], "n_tokens": d["n_tokens"]}


def _predicted(bank, sens, emap, alloc) -> dict:
    kl = math.fsum(sens.kl[u.name][alloc[u.name]] for u in bank.units)
    return {"kl": kl, "ear": emap.ear(kl)}


def _cache_key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_estimator(name, model, bank, prober, sens_windows, *, probe_bits, orderings, fisher_draws, seed,
                  device, progress) -> Sensitivity:
    if name == "linear":
        return linear_estimator(prober, probe_bits=probe_bits, progress=progress)
    if name == "shapley":
        return shapley_estimator(prober, orderings=orderings, seed=seed, progress=progress)
    if name == "fisher":
        return fisher_estimator(model, bank, sens_windows, draws=fisher_draws, seed=seed, device=device,
                                progress=progress)
    raise SlqError(f"unknown estimator {name!r}; choose one of {', '.join(ESTIMATORS)}")


def search(
    model: str | None = None,
    *,
    target: str = "dl",
    ear: float = 0.99,
    recovery: float = 0.99,
    bits: float | None = None,
    tasks: list[str] | None = None,
    task_limit: int | None = 200,
    task_dir: str | None = None,
    tolerance: float = 0.01,
    bitwidths: tuple[int, ...] = DEFAULT_BITWIDTHS,
    units: str = "fused",
    estimator: str = "linear",
    group_size: int | None = 128,
    symmetric: bool = False,
    method: str = "gptq",
    calib: str | None = None,
    calib_samples: int = 32,
    seq_len: int = 512,
    sens_windows: int = 8,
    sens_seq_len: int | None = None,
    verify_windows: int = 16,
    probe_bits: tuple[int, ...] = (4,),
    orderings: int = 2,
    fisher_draws: int = 1,
    max_rounds: int = 4,
    baselines: tuple[int, ...] | None = None,
    map_bits: tuple[int, ...] = (4, 5, 6, 7, 8),
    clip: bool = True,
    device: str = "cpu",
    seed: int = 0,
    workdir: str | Path | None = None,
    out: str | Path | None = None,
    force: bool = False,
    progress: bool = True,
    trust_remote_code: bool = False,
    plots: bool = True,
) -> dict:
    """Run the search and (with ``out``) write the mixed-bitwidth checkpoint and its reports.

    Returns the report (also ``slq_report.json`` in ``out``). See the module docstring.
    """
    from .api import _other_params, build_report, open_model
    from .models import check_finite, is_slq_checkpoint

    t_start = time.perf_counter()
    if target not in TARGETS:
        raise SlqError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")
    if estimator not in ESTIMATORS:
        raise SlqError(f"unknown estimator {estimator!r}; choose one of {', '.join(ESTIMATORS)}")
    if target == "bits" and bits is None:
        raise SlqError("target 'bits' needs a bits-per-parameter budget")
    if not 0 < ear < 1 or not 0 < recovery <= 1:
        raise SlqError(f"--ear must be in (0, 1) and --recovery in (0, 1], got {ear}, {recovery}")
    bitwidths = tuple(sorted(set(int(b) for b in bitwidths)))
    allow16 = KEEP_BITS in bitwidths
    quant_bits = tuple(b for b in bitwidths if b != KEEP_BITS)
    bad = [b for b in quant_bits if not 2 <= b <= 8]
    if bad or not quant_bits:
        raise SlqError(f"--bitwidths must be values in 2..8 (and 16 for 'keep'), got {list(bitwidths)}")
    if target == "tl" and 4 not in quant_bits:
        raise SlqError("the task-lossless target calibrates at a uniform 4-bit anchor: include 4 in --bitwidths")
    if out is not None and Path(out).exists() and not force:
        raise SlqError(f"output directory {out} exists; pass --force to replace it")
    if device == "cuda" and not torch.cuda.is_available():
        raise SlqError("--device cuda was asked for but CUDA is not available")
    if sens_windows < 1 or verify_windows < 1 or calib_samples < sens_windows:
        raise SlqError("need --verify-windows >= 1 and 1 <= --sens-windows <= --calib-samples")
    for b in probe_bits:
        if b not in quant_bits:
            raise SlqError(f"probe bitwidth {b} is not among --bitwidths")
    torch.manual_seed(seed)

    ref_model, tok, path = open_model(model, device=device, trust_remote_code=trust_remote_code)
    if is_slq_checkpoint(path):
        raise SlqError(f"{path} is already a quantized checkpoint; search from the reference model instead")
    check_finite(ref_model)
    unit_list = build_units(ref_model, units)
    n_params = sum(u.n_params for u in unit_list)
    if target == "bits":
        lo = sum(storage_bits(u, min(quant_bits), group_size, symmetric) for u in unit_list) / n_params
        if bits < lo:
            raise SlqError(f"--bits {bits} is below the smallest reachable {lo:.4f} bits/param "
                           f"(all units at {min(quant_bits)} bits)")

    timings: dict[str, float] = {}
    t = time.perf_counter()
    calib_w = windows_from_source(calib, ref_model, tok, n=calib_samples, seq_len=seq_len, seed=seed, device=device,
                                  progress=progress)
    verify_w = windows_from_source(calib, ref_model, tok, n=verify_windows, seq_len=seq_len, skip=calib_samples,
                                   seed=seed, device=device, progress=progress)
    sens_w = calib_w[:sens_windows, : (sens_seq_len or seq_len)]
    timings["data_s"] = time.perf_counter() - t

    if workdir is None:
        from .models import cache_dir

        workdir = cache_dir() / "work" / _cache_key(str(path), method, group_size, symmetric, quant_bits, units,
                                                    calib, calib_samples, seq_len, seed, clip)
    workdir = Path(workdir)
    bank = build_bank(ref_model, unit_list, calib_w, workdir / "bank", bitwidths=quant_bits, group_size=group_size,
                      symmetric=symmetric, method=method, clip=clip, device=device, progress=progress)
    timings["bank_s"] = bank.timings["bank_s"]

    # the reference on the verification windows, once (every round and baseline replays it)
    t = time.perf_counter()
    ref_verify = CachedLogits().record(ref_model, verify_w, device=device)
    timings["reference_s"] = time.perf_counter() - t

    t = time.perf_counter()
    prober = Prober(ref_model, bank, sens_w, device=device)
    sens_path = workdir / f"sensitivity-{estimator}-{_cache_key(sens_w.shape, probe_bits, orderings, fisher_draws, seed, bank.workdir.name, json.loads((bank.workdir / 'bank.json').read_text())['fingerprint'])}.json"
    if sens_path.exists():
        sens = Sensitivity.from_dict(json.loads(sens_path.read_text()))
    else:
        sens = run_estimator(estimator, ref_model, bank, prober, sens_w, probe_bits=probe_bits, orderings=orderings,
                             fisher_draws=fisher_draws, seed=seed, device=device, progress=progress)
        tmp = sens_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(sens.to_dict()))
        tmp.replace(sens_path)
    # whole-model points for the KL -> EAR map, and a check of the additive prediction: uniform assemblies
    uniform_sens = []
    for b in (x for x in map_bits if x in quant_bits):
        prober.set({u.name: b for u in unit_list})
        kl_m, tv_m = prober.measure()
        uniform_sens.append({"bits": b, "kl": kl_m, "tv": tv_m,
                             "predicted_kl": math.fsum(sens.kl[u.name][b] for u in unit_list)})
    prober.reset()
    points = [(p["kl"], p["tv"]) for p in uniform_sens] + [(p["kl"], p["tv"]) for p in sens.probes]
    emap = EarMap().fit(points)
    timings["sensitivity_s"] = time.perf_counter() - t

    choices = _choices(bank, allow16)
    rounds: list[dict] = []
    timings["solve_s"] = timings["verify_s"] = 0.0
    accepted = None
    anchor = None
    ref_tasks = None

    def measure(alloc):
        bank.apply(ref_model, alloc)
        fid = compare_windows(ref_verify, ref_model, verify_w, device=device, progress=False, seed=seed)
        return fid

    if target == "tl":
        from .tasks import compare_tasks, load_task, score_task

        t = time.perf_counter()
        bank.restore(ref_model)
        names = list(tasks or DEFAULT_TASKS)
        items = {n: load_task(n, task_dir, task_limit) for n in names}
        ref_tasks = {n: score_task(ref_model, tok, n, its, device=device, progress=progress) for n, its in items.items()}
        prober.set({u.name: 4 for u in unit_list})
        kl4, _ = prober.measure()
        prober.reset()
        bank.apply(ref_model, {u.name: 4 for u in unit_list})
        a_tasks = compare_tasks(ref_tasks, {n: score_task(ref_model, tok, n, its, device=device, progress=progress)
                                            for n, its in items.items()}, tolerance=tolerance, seed=seed)
        avg = a_tasks["average"]
        rec4 = avg["acc_candidate"] / max(avg["acc_reference"], 1e-12)
        loss4 = max(1.0 - rec4, 1e-3 * (1.0 - recovery))
        alpha = loss4 / max(kl4, 1e-30)
        kl_budget = (1.0 - recovery) / alpha
        anchor = {"bits": 4, "kl": kl4, "recovery": rec4, "alpha": alpha, "tasks": a_tasks,
                  "loss_used": loss4, "kl_budget": kl_budget}
        timings["anchor_s"] = time.perf_counter() - t
    elif target == "dl":
        kl_budget = emap.kl_for(ear)
    else:
        kl_budget = None

    for r in range(1 if target == "bits" else max_rounds):
        t = time.perf_counter()
        if target == "bits":
            alloc, sol = _solve(bank, sens, choices, budget_bpp=bits, n_params=n_params)
        else:
            try:
                alloc, sol = _solve(bank, sens, choices, max_kl=kl_budget)
            except SlqError:  # budget below what the top bitwidth reaches (no 16 allowed): take the top
                alloc = {u.name: max(choices) for u in unit_list}
                sol = type("S", (), {"solver": "none (budget below the top bitwidth)", "status": "infeasible"})()
        timings["solve_s"] += time.perf_counter() - t
        t = time.perf_counter()
        fid = measure(alloc)
        total, _ = allocation_bits(bank, alloc)
        rec = {"round": r + 1, "kl_budget": kl_budget, "predicted": _predicted(bank, sens, emap, alloc),
               "bits_per_param": total / n_params, "solver": sol.solver, "solver_status": sol.status,
               "measured": _fid_summary(fid)}
        lb = fid.ear_ci95[0]
        if target == "dl":
            rec["accepted"] = lb >= ear
        elif target == "tl":
            rec["tasks"] = compare_tasks(ref_tasks, {n: score_task(ref_model, tok, n, its, device=device,
                                                                   progress=progress) for n, its in items.items()},
                                         tolerance=tolerance, seed=seed)
            rec["accepted"] = bool(rec["tasks"]["average"]["lossless"])
        else:
            rec["accepted"] = True
        timings["verify_s"] += time.perf_counter() - t
        rec["allocation"] = alloc
        rounds.append(rec)
        if rec["accepted"]:
            accepted = rec
            break
        if target == "dl":
            shortfall = (1.0 - ear) / max(1.0 - lb, 1e-12)
            kl_budget = min(kl_budget * 0.9, kl_budget * 0.9 * shortfall ** (1.0 / emap.beta))
        else:
            kl_budget *= 0.5
    final = accepted or rounds[-1]
    alloc = final["allocation"]

    # uniform baselines on the same verification windows (for the report's plot and table)
    base_rows = []
    for b in (baselines if baselines is not None else tuple(x for x in quant_bits if x >= 3)):
        if b not in quant_bits:
            continue
        t = time.perf_counter()
        fid = measure({u.name: b for u in unit_list})
        total, _ = allocation_bits(bank, {u.name: b for u in unit_list})
        base_rows.append({"bits": b, "bits_per_param": total / n_params, "measured": _fid_summary(fid),
                          "predicted": _predicted(bank, sens, emap, {u.name: b for u in unit_list})})
        timings["verify_s"] += time.perf_counter() - t

    # frontier of the predictions (budget -> predicted KL / EAR), for the plot
    frontier = []
    lo = allocation_bits(bank, {u.name: min(quant_bits) for u in unit_list})[0] / n_params
    hi = allocation_bits(bank, {u.name: max(choices) for u in unit_list})[0] / n_params
    b = math.ceil(lo * 4) / 4
    while b <= hi + 1e-9:
        a, _ = _solve(bank, sens, choices, budget_bpp=b, n_params=n_params)
        frontier.append({"budget": b, "bits_per_param": allocation_bits(bank, a)[0] / n_params,
                         **_predicted(bank, sens, emap, a)})
        b += 0.25

    # assemble the final model and write the checkpoint
    bank.apply(ref_model, alloc)
    qweights = bank.qweights(alloc)
    kept = [m for u in unit_list if alloc[u.name] == KEEP_BITS for m in u.members]
    plan = Plan()
    mods = dict(ref_model.named_modules())
    from .grid import gamma_stats

    for u in unit_list:
        bu = alloc[u.name]
        if bu == KEEP_BITS:
            continue
        for m in u.members:
            lin = mods[m]
            N, K = lin.weight.shape
            g, note = resolve_group_size(K, group_size)
            lp = LayerPlan(m, N, K, QuantSpec(bu, g, symmetric), group_size, note, method)
            lp.gamma_mean, lp.gamma2_mean = gamma_stats(bank.original[m], lp.spec.effective_group(K))
            lp.metrics["unit"] = u.name
            lp.metrics["rel_output_error_unit"] = bank.t[u.name][bu]
            plan.add(lp)
    report = build_report(ref_model, path, plan, QuantSpec(max(quant_bits), group_size, symmetric), method=method,
                          calib=calib or GENERATED, calib_samples=calib_samples, seq_len=seq_len, clip=clip,
                          seed=seed, device=device)
    report["settings"].update({"search": True, "bits": None, "target": target, "estimator": estimator,
                               "units": units, "bitwidths": list(bitwidths), "sens_windows": int(sens_w.shape[0]),
                               "sens_seq_len": int(sens_w.shape[1]), "verify_windows": verify_windows,
                               "probe_bits": list(probe_bits), "orderings": orderings, "fisher_draws": fisher_draws,
                               "max_rounds": max_rounds, "workdir": str(workdir)})
    total, _ = allocation_bits(bank, alloc)
    other = _other_params(ref_model, {m for u in unit_list for m in u.members})
    n_other = sum(n for n, _ in other.values())
    report.update({
        "target": {"kind": target, "ear": ear if target == "dl" else None,
                   "recovery": recovery if target == "tl" else None, "bits": bits if target == "bits" else None,
                   "tolerance": tolerance if target == "tl" else None},
        "verified": bool(accepted is not None),
        "bits_per_param": total / n_params,
        "bits_per_param_model": (total + sum(n * bb for n, bb in other.values())) / (n_params + n_other),
        "bits_per_param_quantized_only": plan.bits_per_param() if len(plan) else None,
        "n_params_allocated": n_params,
        "n_params_kept_16bit": sum(u.n_params for u in unit_list if alloc[u.name] == KEEP_BITS),
        "predicted": final["predicted"],
        "measured": final["measured"],
        "allocation": alloc,
        "bits_histogram": {str(b): sum(u.n_params for u in unit_list if alloc[u.name] == b) / n_params
                           for b in choices},
        "rounds": [{k: v for k, v in r.items() if k != "allocation"} | {"allocation": r["allocation"]} for r in rounds],
        "anchor": anchor,
        "ear_map": emap.to_dict(),
        "sensitivity": {"estimator": estimator, "seconds": sens.seconds, "forward_calls": sens.forward_calls,
                        "details": sens.details, "uniform_check": uniform_sens,
                        "kl": {u: {str(b): v for b, v in d.items()} for u, d in sens.kl.items()}},
        "baselines": base_rows,
        "frontier": frontier,
        "units": [{"name": u.name, "layer": u.layer, "kind": u.kind, "members": list(u.members),
                   "n_params": u.n_params, "K": u.K} for u in unit_list],
    })
    timings["total_s"] = time.perf_counter() - t_start
    report["timings"] = timings
    if out is not None:
        from .checkpoint import save_checkpoint
        from .search_report import write_reports

        t = time.perf_counter()
        ref_model.cpu()
        extra = write_reports(report, plots=plots)
        save_checkpoint(out, ref_model, tok, qweights, report, force=force, half_modules=set(kept), extra_files=extra)
        report["timings"]["save_s"] = time.perf_counter() - t
    return report
