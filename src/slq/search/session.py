"""The SLQ bit search: per-unit bitwidths chosen by an exact knapsack from measured sensitivities,
then assembled from the bank and *measured* on held-out windows.

Targets:

- ``dl`` (distribution-lossless): the fewest bits whose predicted EAR is >= ``ear``. Predicted KL is
  the sum of the units' costs; :class:`slq.sensitivity.EarMap` (fitted on measured points of the
  sensitivity windows) turns the EAR target into a KL budget. The allocation is assembled and its EAR
  measured on the verification windows; it is accepted only when the 95% bootstrap lower bound is
  >= ``ear`` there and, when ``confirm_windows`` > 0 (default: as many as the verification windows), on a
  second held-out sample too (the windows after the verification ones, or later generated draws). The
  rounds choose among allocations by the verification windows, so the best accepted one's bound there is
  optimistic, and a few windows of text can be easier than the next few; the second sample guards both.
  Otherwise the KL budget is tightened by the measured shortfall (the lower of the two bounds, through
  the map's exponent, with a 10% margin) and the search repeats, for at most ``max_rounds`` rounds. An accepted
  round with slack (lower bound above ``ear``) loosens the budget the same way to look for fewer bits;
  after a loosened round fails, the budget is bisected (geometrically) between the accepted and the
  failed one. The result is the accepted round with the fewest bits; a round whose allocation would not
  need fewer bits than it is not measured.
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
from .bank import BANK_VERSION, Bank, build_bank
from ..measure.data import GENERATED, generated_windows, windows_from_source
from ..util.errors import SlqError
from ..measure.fidelity import CachedLogits, compare_windows
from ..util.progress import progress_bar  # noqa: F401  (re-exported for callers that show their own bars)
from .sensitivity import (ESTIMATORS, EarMap, Prober, Sensitivity, fisher_estimator, linear_estimator,
                          shapley_estimator)
from ..quant.spec import LayerPlan, Plan, QuantSpec, model_bits_per_param, resolve_group_size
from ..quant.units import KEEP_BITS, build_units, storage_bits

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


class SearchSession:
    """Everything the search needs, prepared once: reference, bank, prober, sensitivities, EAR map,
    and the reference's logits on the verification windows. Targets, baselines and frontiers then
    cost one candidate pass per measurement (benchmarks run many targets on one session)."""

    def __init__(self, model=None, *, bitwidths=DEFAULT_BITWIDTHS, units="fused", estimator="linear",
                 group_size=128, symmetric=False, method="gptq", calib=None, calib_samples=32, seq_len=512,
                 sens_windows=8, sens_seq_len=None, verify_windows=16, verify_data=None, confirm_windows=None,
                 probe_bits=None, orderings=2, fisher_draws=1, map_bits=(4, 5, 6, 7, 8), clip=True, attention=True,
                 act_order=None, damp=0.01, device="cpu",
                 seed=0, workdir=None, progress=True, trust_remote_code=False, target_check=None):
        from ..runtime.checkpoint import open_model
        from ..models.sources import check_finite, is_slq_checkpoint

        self.t_start = time.perf_counter()
        if estimator not in ESTIMATORS:
            raise SlqError(f"unknown estimator {estimator!r}; choose one of {', '.join(ESTIMATORS)}")
        bitwidths = tuple(sorted(set(int(b) for b in bitwidths)))
        self.allow16 = KEEP_BITS in bitwidths
        self.quant_bits = tuple(b for b in bitwidths if b != KEEP_BITS)
        bad = [b for b in self.quant_bits if not 2 <= b <= 8]
        if bad or not self.quant_bits:
            raise SlqError(f"--bitwidths must be values in 2..8 (and 16 for 'keep'), got {list(bitwidths)}")
        if device == "cuda" and not torch.cuda.is_available():
            raise SlqError("--device cuda was asked for but CUDA is not available")
        if sens_windows < 1 or verify_windows < 1 or calib_samples < sens_windows:
            raise SlqError("need --verify-windows >= 1 and 1 <= --sens-windows <= --calib-samples")
        if act_order and method != "gptq":
            raise SlqError("--act-order orders GPTQ's columns: it needs --method gptq")
        act_order = method == "gptq" if act_order is None else bool(act_order)  # default: on for GPTQ
        if not 0 < damp < 1:
            raise SlqError(f"--damp must be in (0, 1) (a fraction of the Hessian's mean diagonal), got {damp}")
        confirm_windows = verify_windows if confirm_windows is None else int(confirm_windows)
        if confirm_windows < 0:
            raise SlqError(f"--confirm-windows must be >= 0 (0: no confirmation), got {confirm_windows}")
        if probe_bits is None:  # 4 bits, or the candidate nearest to it
            probe_bits = (min(self.quant_bits, key=lambda b: (abs(b - 4), b)),)
        for b in probe_bits:
            if b not in self.quant_bits:
                raise SlqError(f"probe bitwidth {b} is not among --bitwidths")
        self.bitwidths, self.units_mode, self.group_size, self.symmetric = bitwidths, units, group_size, symmetric
        self.method, self.calib, self.calib_samples, self.seq_len = method, calib, calib_samples, seq_len
        self.verify_windows_n, self.verify_data, self.probe_bits = verify_windows, verify_data, tuple(probe_bits)
        self.confirm_windows_n, self.confirm_note, self.ref_confirm = confirm_windows, None, None
        self.orderings, self.fisher_draws, self.clip, self.device, self.seed = orderings, fisher_draws, clip, device, seed
        self.attention, self.act_order, self.damp = attention, act_order, float(damp)
        self.progress = progress
        torch.manual_seed(seed)

        self.model, self.tok, self.path = open_model(model, device=device, trust_remote_code=trust_remote_code)
        if is_slq_checkpoint(self.path):
            raise SlqError(f"{self.path} is already a quantized checkpoint; search from the reference model instead")
        check_finite(self.model)
        self.units = build_units(self.model, units)
        self.n_params = sum(u.n_params for u in self.units)
        self.timings: dict[str, float] = {}
        if target_check is not None:  # fail before the (long) bank is built
            self.check_target(**target_check)

        t = time.perf_counter()
        m, tok = self.model, self.tok
        if verify_data is None and (calib is None or calib == GENERATED):
            # One sampling pass for both: sequence i depends only on (seed, i), so the first calib_samples are the
            # calibration and the next verify_windows, independent draws, are held out (half the decode steps).
            both = generated_windows(m, tok, calib_samples + verify_windows + confirm_windows, seq_len, seed=seed,
                                     device=device, progress=progress)
            self.calib_w = both[:calib_samples]
            self.verify_w = both[calib_samples : calib_samples + verify_windows]
            self.confirm_w = both[calib_samples + verify_windows :] if confirm_windows else None
        elif verify_data is None:
            self.calib_w = windows_from_source(calib, m, tok, n=calib_samples, seq_len=seq_len, seed=seed,
                                               device=device, progress=progress)
            self.verify_w = windows_from_source(calib, m, tok, n=verify_windows, seq_len=seq_len, skip=calib_samples,
                                                seed=seed, device=device, progress=progress)
            self.confirm_w = self._confirm_windows(calib, calib_samples + verify_windows, seed)
        else:  # another source: held out by construction (e.g. WikiText-2 test against C4 calibration)
            self.calib_w = windows_from_source(calib, m, tok, n=calib_samples, seq_len=seq_len, seed=seed,
                                               device=device, progress=progress)
            self.verify_w = windows_from_source(verify_data, m, tok, n=verify_windows, seq_len=seq_len,
                                                seed=seed + 1, device=device, progress=progress)
            self.confirm_w = self._confirm_windows(verify_data, verify_windows, seed + 1)
        self.sens_w = self.calib_w[:sens_windows, : (sens_seq_len or seq_len)]
        self.timings["data_s"] = time.perf_counter() - t

        if workdir is None:
            from ..models.sources import cache_dir

            workdir = cache_dir() / "work" / _cache_key(str(self.path), method, group_size, symmetric, self.quant_bits,
                                                        units, calib, calib_samples, seq_len, seed, clip,
                                                        attention, BANK_VERSION, *(("act_order",) if act_order else ()),
                                                        *((f"damp{damp:g}",) if damp != 0.01 else ()))
        self.workdir = Path(workdir)
        self.bank = build_bank(m, self.units, self.calib_w, self.workdir / "bank", bitwidths=self.quant_bits,
                               group_size=group_size, symmetric=symmetric, method=method, clip=clip, attention=attention,
                               act_order=act_order, damp=self.damp, device=device, progress=progress)
        self.timings["bank_s"] = self.bank.timings["bank_s"]
        for k in ("hessian_gptq_s", "stats_pack_s", "save_s"):  # where the bank's time went (layers built now)
            if k in self.bank.timings:
                self.timings[f"bank_{k}"] = self.bank.timings[k]

        t = time.perf_counter()
        self.ref_verify = CachedLogits().record(m, self.verify_w, device=device)
        self.timings["reference_s"] = time.perf_counter() - t

        t = time.perf_counter()
        self.prober = Prober(m, self.bank, self.sens_w, device=device)
        self.uniform_sens = []
        for b in (x for x in map_bits if x in self.quant_bits):
            self.prober.set({u.name: b for u in self.units})
            kl_m, tv_m = self.prober.measure()
            self.uniform_sens.append({"bits": b, "kl": kl_m, "tv": tv_m})
        self.prober.reset()
        self.timings["prober_s"] = time.perf_counter() - t
        self.sens = self.estimate(estimator)
        self.choices = list(self.quant_bits) + ([KEEP_BITS] if self.allow16 else [])
        self.ref_tasks = None

    def _confirm_windows(self, source, skip: int, seed: int):
        """The confirmation windows: the ``confirm_windows`` after the verification ones, or None (with a note)
        when none are asked for or the source has too few."""
        if not self.confirm_windows_n:
            return None
        try:
            return windows_from_source(source, self.model, self.tok, n=self.confirm_windows_n, seq_len=self.seq_len,
                                       skip=skip, seed=seed, device=self.device, progress=self.progress)
        except SlqError as e:
            self.confirm_note = f"no confirmation: {e}"
            return None

    # ---------------------------------------------------------------- sensitivities

    def estimate(self, estimator: str) -> Sensitivity:
        """Run (or read back from the work directory) an estimator; it becomes the active one."""
        t = time.perf_counter()
        fp = json.loads((self.bank.workdir / "bank.json").read_text())["fingerprint"]
        key = _cache_key(tuple(self.sens_w.shape), self.sens_w.sum().item(), self.probe_bits, self.orderings,
                         self.fisher_draws, self.seed, fp)
        path = self.workdir / f"sensitivity-{estimator}-{key}.json"
        if path.exists():
            sens = Sensitivity.from_dict(json.loads(path.read_text()))
        else:
            sens = run_estimator(estimator, self.model, self.bank, self.prober, self.sens_w, probe_bits=self.probe_bits,
                                 orderings=self.orderings, fisher_draws=self.fisher_draws, seed=self.seed,
                                 device=self.device, progress=self.progress)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(sens.to_dict()))
            tmp.replace(path)
        self.bank.restore(self.model)
        self.prober.reset()
        self.sens = sens
        for p in self.uniform_sens:
            p["predicted_kl"] = math.fsum(sens.kl[u.name][p["bits"]] for u in self.units)
        points = [(p["kl"], p["tv"]) for p in self.uniform_sens] + [(p["kl"], p["tv"]) for p in sens.probes]
        self.emap = EarMap().fit(points)
        self.timings["sensitivity_s"] = time.perf_counter() - t + self.timings.get("prober_s", 0.0)
        return sens

    # ---------------------------------------------------------------- allocations

    def solve(self, *, budget_bpp=None, max_kl=None):
        return _solve(self.bank, self.sens, self.choices, budget_bpp=budget_bpp, max_kl=max_kl, n_params=self.n_params)

    def uniform(self, bits: int) -> dict[str, int]:
        return {u.name: bits for u in self.units}

    def bits_per_param(self, alloc) -> float:
        return allocation_bits(self.bank, alloc)[0] / self.n_params

    def predicted(self, alloc) -> dict:
        return _predicted(self.bank, self.sens, self.emap, alloc)

    def measure(self, alloc):
        """The allocation assembled from the bank, compared with the reference on the verification windows."""
        self.bank.apply(self.model, alloc)
        return compare_windows(self.ref_verify, self.model, self.verify_w, device=self.device, progress=False,
                               seed=self.seed)

    def confirm(self, allocs: list[dict]) -> list:
        """Each allocation compared with the reference on the confirmation windows (the reference's logits on
        them are computed at the first call and kept, like the verification windows')."""
        if self.ref_confirm is None:
            self.bank.restore(self.model)
            self.ref_confirm = CachedLogits().record(self.model, self.confirm_w, device=self.device)
        out = []
        for alloc in allocs:
            self.bank.apply(self.model, alloc)
            out.append(compare_windows(self.ref_confirm, self.model, self.confirm_w, device=self.device,
                                       progress=False, seed=self.seed))
        return out

    def _tasks(self, names, task_limit, task_dir):
        from ..measure.tasks import load_task, score_task

        items = {n: load_task(n, task_dir, task_limit) for n in names}
        score = lambda: {n: score_task(self.model, self.tok, n, its, device=self.device, progress=self.progress)  # noqa: E731
                         for n, its in items.items()}
        return score

    # ---------------------------------------------------------------- targets

    def check_target(self, target="dl", *, ear=0.99, recovery=0.99, bits=None) -> None:
        """Reject a target that cannot be met; needs only the units (so it runs before the bank is built)."""
        if target not in TARGETS:
            raise SlqError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")
        if target == "bits" and bits is None:
            raise SlqError("target 'bits' needs a bits-per-parameter budget")
        if not 0 < ear < 1 or not 0 < recovery <= 1:
            raise SlqError(f"--ear must be in (0, 1) and --recovery in (0, 1], got {ear}, {recovery}")
        if target == "tl" and 4 not in self.quant_bits:
            raise SlqError("the task-lossless target calibrates at a uniform 4-bit anchor: include 4 in --bitwidths")
        if target == "bits":
            lo = sum(storage_bits(u, min(self.quant_bits), self.group_size, self.symmetric)
                     for u in self.units) / self.n_params
            if bits < lo:
                raise SlqError(f"--bits {bits} is below the smallest reachable {lo:.4f} bits/param "
                               f"(all units at {min(self.quant_bits)} bits)")

    def run(self, target="dl", *, ear=0.99, recovery=0.99, bits=None, tasks=None, task_limit=200, task_dir=None,
            tolerance=0.01, max_rounds=4) -> dict:
        """Rounds of allocate -> assemble -> measure for one target; returns {rounds, accepted, anchor}."""
        from ..measure.tasks import compare_tasks

        self.check_target(target, ear=ear, recovery=recovery, bits=bits)
        t_run = time.perf_counter()
        timings = {"solve_s": 0.0, "verify_s": 0.0}
        anchor = None
        if target == "tl":
            t = time.perf_counter()
            score = self._tasks(list(tasks or DEFAULT_TASKS), task_limit, task_dir)
            if self.ref_tasks is None:
                self.bank.restore(self.model)
                self.ref_tasks = score()
            self.prober.set(self.uniform(4))
            kl4, _ = self.prober.measure()
            self.prober.reset()
            self.bank.apply(self.model, self.uniform(4))
            a_tasks = compare_tasks(self.ref_tasks, score(), tolerance=tolerance, seed=self.seed)
            avg = a_tasks["average"]
            rec4 = avg["acc_candidate"] / max(avg["acc_reference"], 1e-12)
            loss4 = max(1.0 - rec4, 1e-3 * (1.0 - recovery))
            alpha = loss4 / max(kl4, 1e-30)
            kl_budget = (1.0 - recovery) / alpha
            anchor = {"bits": 4, "bits_per_param": self.bits_per_param(self.uniform(4)), "kl": kl4,
                      "recovery": rec4, "alpha": alpha, "tasks": a_tasks, "loss_used": loss4, "kl_budget": kl_budget}
            timings["anchor_s"] = time.perf_counter() - t
        elif target == "dl":
            kl_budget = self.emap.kl_for(ear)
        else:
            kl_budget = None

        rounds, accepted = [], None
        failed_budget = None  # DL: the smallest KL budget whose allocation failed after one was accepted
        for r in range(1 if target == "bits" else max_rounds):
            t = time.perf_counter()
            if target == "bits":
                alloc, sol = self.solve(budget_bpp=bits)
                solver, status = sol.solver, sol.status
            else:
                try:
                    alloc, sol = self.solve(max_kl=kl_budget)
                    solver, status = sol.solver, sol.status
                except SlqError:  # below what the top bitwidth reaches (16 not allowed): take the top
                    alloc, solver, status = self.uniform(max(self.choices)), "none", "budget below the top bitwidth"
            timings["solve_s"] += time.perf_counter() - t
            if accepted is not None and self.bits_per_param(alloc) >= accepted["bits_per_param"] - 1e-9:
                break  # DL refinement: no fewer bits to gain
            t = time.perf_counter()
            fid = self.measure(alloc)
            rec = {"round": r + 1, "kl_budget": kl_budget, "predicted": self.predicted(alloc),
                   "bits_per_param": self.bits_per_param(alloc), "solver": solver, "solver_status": status,
                   "measured": _fid_summary(fid)}
            lb = fid.ear_ci95[0]
            if target == "dl":
                if lb >= ear and self.confirm_w is not None:  # and on the second held-out sample
                    t_c = time.perf_counter()
                    (cf,) = self.confirm([alloc])
                    rec["confirmation"] = {"measured": _fid_summary(cf), "passed": bool(cf.ear_ci95[0] >= ear)}
                    lb = min(lb, cf.ear_ci95[0])
                    timings["confirm_s"] = timings.get("confirm_s", 0.0) + time.perf_counter() - t_c
                rec["accepted"] = bool(lb >= ear)
            elif target == "tl":
                rec["tasks"] = compare_tasks(self.ref_tasks, score(), tolerance=tolerance, seed=self.seed)
                rec["accepted"] = bool(rec["tasks"]["average"]["lossless"])
            else:
                rec["accepted"] = True
            timings["verify_s"] += time.perf_counter() - t
            rec["allocation"] = alloc
            rounds.append(rec)
            if rec["accepted"] and (accepted is None or rec["bits_per_param"] < accepted["bits_per_param"]):
                accepted = rec
            if target != "dl":
                if rec["accepted"]:
                    break
                kl_budget *= 0.5
                continue
            ratio = ((1.0 - ear) / max(1.0 - lb, 1e-12)) ** (1.0 / self.emap.beta)
            if accepted is None:  # tighten by the measured shortfall, with a 10% margin
                kl_budget = min(kl_budget * 0.9, kl_budget * 0.9 * ratio)
                continue
            if not rec["accepted"]:
                failed_budget = kl_budget if failed_budget is None else min(failed_budget, kl_budget)
            if failed_budget is None:  # loosen by the measured slack, with the same 10% margin
                kl_budget = kl_budget * max(1.05, 0.9 * ratio)
            else:  # bisect between the accepted budget and the failed one
                kl_budget = math.sqrt(accepted["kl_budget"] * failed_budget)
        confirmation = None
        if target == "dl":
            tries = [{"round": r["round"], "bits_per_param": r["bits_per_param"], **r["confirmation"]}
                     for r in rounds if "confirmation" in r]
            confirmation = {"windows": 0 if self.confirm_w is None else int(self.confirm_w.shape[0]), "tries": tries}
            if self.confirm_w is None:
                confirmation["note"] = self.confirm_note or "no confirmation windows asked for"
        timings["run_s"] = time.perf_counter() - t_run
        return {"target": {"kind": target, "ear": ear if target == "dl" else None,
                           "recovery": recovery if target == "tl" else None, "bits": bits if target == "bits" else None,
                           "tolerance": tolerance if target == "tl" else None},
                "rounds": rounds, "accepted": accepted, "final": accepted or rounds[-1], "anchor": anchor,
                "confirmation": confirmation, "timings": timings}

    def baselines(self, bits_list) -> list[dict]:
        rows = []
        for b in bits_list:
            if b not in self.quant_bits:
                continue
            a = self.uniform(b)
            fid = self.measure(a)
            rows.append({"bits": b, "bits_per_param": self.bits_per_param(a), "measured": _fid_summary(fid),
                         "predicted": self.predicted(a)})
        return rows

    def frontier(self, step: float = 0.25, upto: float = 10.0) -> list[dict]:
        """Predicted KL / EAR of the least-loss allocation at budgets ``step`` apart, up to ``upto`` b/p."""
        rows = []
        lo = self.bits_per_param(self.uniform(min(self.quant_bits)))
        hi = min(self.bits_per_param(self.uniform(max(self.choices))), upto)
        b = math.ceil(lo / step) * step
        while b <= hi + 1e-9:
            a, _ = self.solve(budget_bpp=b)
            rows.append({"budget": b, "bits_per_param": self.bits_per_param(a), **self.predicted(a)})
            b += step
        return rows

    # ---------------------------------------------------------------- output

    def report(self, result: dict, baselines: list[dict], frontier: list[dict]) -> dict:
        from ..quant.pipeline import build_report, other_params as _other_params
        from ..quant.grid import gamma_stats

        final = result["final"]
        alloc = final["allocation"]
        plan = Plan()
        mods = dict(self.model.named_modules())
        for u in self.units:
            bu = alloc[u.name]
            if bu == KEEP_BITS:
                continue
            for m in u.members:
                N, K = mods[m].weight.shape
                g, note = resolve_group_size(K, self.group_size)
                lp = LayerPlan(m, N, K, QuantSpec(bu, g, self.symmetric), self.group_size, note, self.method)
                lp.gamma_mean, lp.gamma2_mean = gamma_stats(self.bank.original[m], lp.spec.effective_group(K))
                lp.metrics["unit"] = u.name
                lp.metrics["rel_output_error_unit"] = self.bank.t[u.name][bu]
                plan.add(lp)
        report = build_report(self.model, self.path, plan, QuantSpec(max(self.quant_bits), self.group_size,
                                                                     self.symmetric),
                              method=self.method, calib=self.calib or GENERATED, calib_samples=self.calib_samples,
                              seq_len=self.seq_len, clip=self.clip, seed=self.seed, device=self.device)
        report["settings"].update({
            "search": True, "bits": None, "target": result["target"]["kind"], "estimator": self.sens.estimator,
            "units": self.units_mode, "bitwidths": list(self.bitwidths), "sens_windows": int(self.sens_w.shape[0]),
            "sens_seq_len": int(self.sens_w.shape[1]), "verify_windows": self.verify_windows_n,
            "confirm_windows": self.confirm_windows_n,
            "verify_data": self.verify_data or "calibration source, windows after the calibration ones",
            "probe_bits": list(self.probe_bits), "orderings": self.orderings, "fisher_draws": self.fisher_draws,
            "attention_hessians": self.attention, "act_order": self.act_order, "damp": self.damp, "workdir": str(self.workdir)})
        total, _ = allocation_bits(self.bank, alloc)
        other = _other_params(self.model, {m for u in self.units for m in u.members})
        n_other = sum(n for n, _ in other.values())
        report.update({
            "target": result["target"],
            "verified": result["accepted"] is not None,
            "bits_per_param": total / self.n_params,
            "bits_per_param_model": (total + sum(n * bb for n, bb in other.values())) / (self.n_params + n_other),
            "bits_per_param_quantized_only": plan.bits_per_param() if len(plan) else None,
            "n_params_allocated": self.n_params,
            "n_params_kept_16bit": sum(u.n_params for u in self.units if alloc[u.name] == KEEP_BITS),
            "predicted": final["predicted"],
            "measured": final["measured"],
            "confirmed": final.get("confirmation"),
            "confirmation": result.get("confirmation"),
            "allocation": alloc,
            "bits_histogram": {str(b): sum(u.n_params for u in self.units if alloc[u.name] == b) / self.n_params
                               for b in self.choices},
            "rounds": result["rounds"],
            "anchor": result["anchor"],
            "ear_map": self.emap.to_dict(),
            "sensitivity": {"estimator": self.sens.estimator, "seconds": self.sens.seconds,
                            "forward_calls": self.sens.forward_calls, "details": self.sens.details,
                            "uniform_check": self.uniform_sens,
                            "kl": {u: {str(b): v for b, v in d.items()} for u, d in self.sens.kl.items()}},
            "baselines": baselines,
            "frontier": frontier,
            "units": [{"name": u.name, "layer": u.layer, "kind": u.kind, "members": list(u.members),
                       "n_params": u.n_params, "K": u.K} for u in self.units],
        })
        timings = dict(self.timings)
        timings["solve_s"] = result["timings"]["solve_s"]
        timings["verify_s"] = result["timings"]["verify_s"]
        for k in ("anchor_s", "confirm_s"):
            if k in result["timings"]:
                timings[k] = result["timings"][k]
        timings["total_s"] = time.perf_counter() - self.t_start
        report["timings"] = timings
        return report

    def save(self, report: dict, out, *, force=False, plots=True) -> None:
        from ..runtime.checkpoint import save_checkpoint
        from .report import write_reports

        t = time.perf_counter()
        alloc = report["allocation"]
        self.bank.apply(self.model, alloc)
        kept = {m for u in self.units if alloc[u.name] == KEEP_BITS for m in u.members}
        self.model.cpu()
        extra = write_reports(report, plots=plots)
        save_checkpoint(out, self.model, self.tok, self.bank.qweights(alloc), report, force=force, half_modules=kept,
                        extra_files=extra)
        self.model.to(self.device)
        report["timings"]["save_s"] = time.perf_counter() - t


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
    max_rounds: int = 4,
    baselines: tuple[int, ...] | None = None,
    out: str | Path | None = None,
    force: bool = False,
    plots: bool = True,
    frontier: bool = True,
    **session,
) -> dict:
    """Run the search and (with ``out``) write the mixed-bitwidth checkpoint and its reports.

    ``session`` holds the :class:`SearchSession` settings (bitwidths, units, estimator, group_size,
    symmetric, method, calib, calib_samples, seq_len, sens_windows, sens_seq_len, verify_windows,
    verify_data, confirm_windows, probe_bits, orderings, fisher_draws, clip, attention, act_order, damp, device, seed,
    workdir, progress, trust_remote_code). Returns the report (also ``slq_report.json`` in ``out``).
    """
    if target not in TARGETS:
        raise SlqError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")
    if target == "bits" and bits is None:
        raise SlqError("target 'bits' needs a bits-per-parameter budget")
    if out is not None and Path(out).exists() and not force:
        raise SlqError(f"output directory {out} exists; pass --force to replace it")
    s = SearchSession(model, target_check=dict(target=target, ear=ear, recovery=recovery, bits=bits), **session)
    result = s.run(target, ear=ear, recovery=recovery, bits=bits, tasks=tasks, task_limit=task_limit,
                   task_dir=task_dir, tolerance=tolerance, max_rounds=max_rounds)
    t = time.perf_counter()
    base = s.baselines(baselines if baselines is not None else tuple(x for x in s.quant_bits if x >= 3))
    result["timings"]["verify_s"] += time.perf_counter() - t
    report = s.report(result, base, s.frontier() if frontier else [])
    if out is not None:
        s.save(report, out, force=force, plots=plots)
    return report
