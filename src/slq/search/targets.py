"""What a search aims at: one function per target, registered in :data:`TARGETS`, sharing one round loop.

Each target turns its goal into a KL budget (or a bits budget), then runs rounds of
allocate -> assemble -> measure (:func:`_rounds`) that differ only in how a round is judged and how the
budget moves after it:

- ``dl`` (distribution-lossless, :func:`run_dl`): the fewest bits whose predicted EAR is >= ``ear``. The
  session's :class:`~slq.search.prober.EarMap` turns the EAR target into a KL budget. A round is accepted only
  when the 95% bootstrap lower bound of its measured EAR is >= ``ear`` on the verification windows and, when
  the session has them, on the confirmation windows (a second held-out sample: the rounds choose by the
  verification windows, so the best accepted one's bound there is optimistic). The verdict must hold off the
  calibration distribution: with real text (``verify_data``) the verification and confirmation windows are
  real text *and* the calibration source's held-out windows (on-policy, e.g. generated) must pass too; without
  it, the verification windows are on-policy and the bound must reach ``ear + real_text_margin`` (the measured
  gap between on-policy and real-text EAR). Before any acceptance the budget
  is tightened by the measured shortfall (the lower of the two bounds, through the map's exponent, with a 10%
  margin). An accepted round with slack loosens it the same way, to look for fewer bits; after a loosened round
  fails, the budget is bisected (geometrically) between the accepted and the failed one. A round whose
  allocation would not need fewer bits than the best accepted one is not measured, and ends the search.
- ``tl`` (task-lossless, :func:`run_tl`): a uniform 4-bit anchor from the bank is scored on the zero-shot
  tasks and its KL measured; ``recovery ~ 1 - alpha * KL`` gives ``alpha`` and the recovery target a KL budget.
  A round passes the paired zero-shot test (the 95% interval of the average accuracy change contains 0 and
  ``|delta| <= tolerance``); a failure halves the budget.
- ``bits`` (:func:`run_bits`): the least predicted KL at <= ``bits`` bits per parameter; one measured round.

Every round is recorded. A target function has one signature, ``fn(session, config) -> result``, where the
result is ``{target, rounds, accepted, final, anchor, confirmation, timings}``.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Callable

from .report import fid_summary
from ..measure.tasks import compare_tasks, load_task, score_task
from ..quant.units import HEAD_KIND, choice_storage_bits, unit_choices
from ..util.errors import ConfigError, SlqError

if TYPE_CHECKING:  # annotations only: the session and the config import this module
    from .config import SearchConfig
    from .session import SearchSession

DEFAULT_TASKS = ("piqa", "arc_easy", "hellaswag", "winogrande")
ANCHOR_BITS = 4  # the task-lossless target's uniform anchor


def check_target(config: "SearchConfig", units) -> None:
    """Reject a bits budget below what the units can reach (all at the smallest bitwidth); needs only the units,
    so the session runs it before the (long) bank is built. Everything else is checked by the config itself."""
    if config.target != "bits":
        return
    q = config.quant
    lo_bits = min(config.quant_bits)
    head = any(u.kind == HEAD_KIND for u in units)
    lo = sum(min(choice_storage_bits(u, c, q.symmetric)  # the head unit at its smallest choice (8 bits)
                 for c in unit_choices(u, config.quant_bits if u.kind == HEAD_KIND else (lo_bits,), config.groups))
             for u in units) / sum(u.n_params for u in units)
    if config.bits < lo:
        raise ConfigError("bits", f"{{field}} {config.bits} is below the smallest reachable {lo:.4f} bits/param "
                                  f"(all units at {lo_bits} bits{', the head at 8' if head else ''})")


# ----------------------------------------------------------------------------------------- the shared loop


def _solve_kl(session: "SearchSession", kl_budget: float):
    """Fewest bits with predicted KL <= the budget; below what the top bitwidth reaches (16 not allowed): the top."""
    try:
        alloc, sol = session.solve(max_kl=kl_budget)
        return alloc, sol.solver, sol.status
    except SlqError:
        return session.uniform(max(session.choices)), "none", "budget below the top bitwidth"


def _rounds(session: "SearchSession", config: "SearchConfig", kl_budget, timings: dict, *,
            solve: Callable, judge: Callable, step: Callable) -> tuple[list[dict], dict | None]:
    """Rounds of allocate -> assemble -> measure. ``solve(kl_budget) -> (alloc, solver, status)``;
    ``judge(alloc, fid, rec) -> accepted`` (may add its evidence to ``rec``); ``step(kl_budget, rec, accepted)
    -> next budget``, or None to stop (``accepted``: the best accepted round so far, or None)."""
    rounds, accepted = [], None
    for r in range(config.max_rounds):
        t = time.perf_counter()
        alloc, solver, status = solve(kl_budget)
        timings["solve_s"] += time.perf_counter() - t
        bpp = session.bits_per_param(alloc)
        if accepted is not None and bpp >= accepted["bits_per_param"] - 1e-9:
            break  # no fewer bits to gain
        t = time.perf_counter()
        fid = session.measure(alloc)
        rec = {"round": r + 1, "kl_budget": kl_budget, "predicted": session.predicted(alloc), "bits_per_param": bpp,
               "solver": solver, "solver_status": status, "measured": fid_summary(fid)}
        rec["accepted"] = bool(judge(alloc, fid, rec))
        timings["verify_s"] += time.perf_counter() - t
        rec["allocation"] = {u: str(c) for u, c in alloc.items()}  # labels, e.g. "8g64" (JSON-ready)
        rounds.append(rec)
        if rec["accepted"] and (accepted is None or bpp < accepted["bits_per_param"]):
            accepted = rec
        kl_budget = step(kl_budget, rec, accepted)
        if kl_budget is None:
            break
    return rounds, accepted


def _result(config: "SearchConfig", rounds, accepted, timings, t_run, *, shown: dict, anchor=None,
            confirmation=None) -> dict:
    timings["run_s"] = time.perf_counter() - t_run
    target = {"kind": config.target, "ear": None, "recovery": None, "bits": None, "tolerance": None, **shown}
    return {"target": target, "rounds": rounds, "accepted": accepted, "final": accepted or rounds[-1],
            "anchor": anchor, "confirmation": confirmation, "timings": timings}


def _halve_until_accepted(kl_budget, rec, accepted):
    return None if rec["accepted"] else kl_budget * 0.5


# ----------------------------------------------------------------------------------------- the targets


def _dl_threshold(session: "SearchSession", config: "SearchConfig") -> float:
    """The lower bound a round's verification windows must reach: ``ear``, plus ``real_text_margin`` when no real
    text verifies (the measured gap between on-policy and real-text EAR), capped below 1."""
    if config.verify_data is not None:
        return config.ear
    return min(config.ear + config.real_text_margin, 1.0 - 1e-6)


def run_dl(session: "SearchSession", config: "SearchConfig") -> dict:
    t_run, timings = time.perf_counter(), {"solve_s": 0.0, "verify_s": 0.0}
    ear, lows, failed = config.ear, [], []  # lows[-1]: the last round's lower bound; failed: budgets that failed
    need = _dl_threshold(session, config)
    policy = getattr(session, "policy_w", None) is not None

    def judge(alloc, fid, rec):
        lb = fid.ear_ci95[0]
        if lb >= need and session.confirm_w is not None:  # and on the second held-out sample
            t = time.perf_counter()
            (cf,) = session.confirm([alloc])
            rec["confirmation"] = {"measured": fid_summary(cf), "passed": bool(cf.ear_ci95[0] >= need)}
            lb = min(lb, cf.ear_ci95[0])
            timings["confirm_s"] = timings.get("confirm_s", 0.0) + time.perf_counter() - t
        if lb >= need and policy:  # real text verified it: and the calibration source's held-out windows
            t = time.perf_counter()
            pf = session.on_policy(alloc)
            rec["on_policy"] = {"measured": fid_summary(pf), "passed": bool(pf.ear_ci95[0] >= ear)}
            lb = min(lb, pf.ear_ci95[0] + (need - ear))
            timings["on_policy_s"] = timings.get("on_policy_s", 0.0) + time.perf_counter() - t
        lows.append(lb)
        return lb >= need

    def step(kl_budget, rec, accepted):
        ratio = ((1.0 - need) / max(1.0 - lows[-1], 1e-12)) ** (1.0 / session.emap.beta)
        if accepted is None:  # tighten by the measured shortfall, with a 10% margin
            return min(kl_budget * 0.9, kl_budget * 0.9 * ratio)
        if not rec["accepted"]:
            failed.append(kl_budget)
        if not failed:  # loosen by the measured slack, with the same 10% margin
            return kl_budget * max(1.05, 0.9 * ratio)
        return math.sqrt(accepted["kl_budget"] * min(failed))  # bisect between the accepted and the failed

    rounds, accepted = _rounds(session, config, session.emap.kl_for(need), timings,
                               solve=lambda b: _solve_kl(session, b), judge=judge, step=step)
    tries = [{"round": r["round"], "bits_per_param": r["bits_per_param"], **r["confirmation"]}
             for r in rounds if "confirmation" in r]
    confirmation = {"windows": 0 if session.confirm_w is None else int(session.confirm_w.shape[0]), "tries": tries}
    if session.confirm_w is None:
        confirmation["note"] = session.confirm_note or "no confirmation windows asked for"
    verification = {"real_text": config.verify_data, "threshold": need,
                    "margin": 0.0 if config.verify_data is not None else config.real_text_margin,
                    "on_policy_windows": int(session.policy_w.shape[0]) if policy else 0,
                    "on_policy_tries": [{"round": r["round"], "bits_per_param": r["bits_per_param"], **r["on_policy"]}
                                        for r in rounds if "on_policy" in r]}
    if config.verify_data is not None and not policy:
        verification["note"] = getattr(session, "policy_note", None) or "no on-policy windows"
    result = _result(config, rounds, accepted, timings, t_run, shown={"ear": ear}, confirmation=confirmation)
    result["verification"] = verification
    return result


def _task_scorer(session: "SearchSession", config: "SearchConfig") -> Callable[[], dict]:
    """A function scoring the model's current weights on the config's zero-shot tasks (items loaded once)."""
    items = {n: load_task(n, config.task_dir, config.task_limit) for n in (config.tasks or DEFAULT_TASKS)}
    return lambda: {n: score_task(session.model, session.tok, n, its, device=session.device,
                                  progress=session.progress) for n, its in items.items()}


def _anchor(session: "SearchSession", config: "SearchConfig", score) -> dict:
    """The uniform 4-bit anchor: its KL (sensitivity windows) and task recovery give ``alpha`` and the KL budget."""
    if session.ref_tasks is None:
        session.bank.restore(session.model)
        session.ref_tasks = score()
    four = session.uniform(ANCHOR_BITS)
    session.prober.set(four)
    kl4, _ = session.prober.measure()
    session.prober.reset()
    session.bank.apply(session.model, four)
    tasks = compare_tasks(session.ref_tasks, score(), tolerance=config.tolerance, seed=session.seed)
    avg = tasks["average"]
    rec4 = avg["acc_candidate"] / max(avg["acc_reference"], 1e-12)
    loss4 = max(1.0 - rec4, 1e-3 * (1.0 - config.recovery))
    alpha = loss4 / max(kl4, 1e-30)
    return {"bits": ANCHOR_BITS, "bits_per_param": session.bits_per_param(four), "kl": kl4, "recovery": rec4,
            "alpha": alpha, "tasks": tasks, "loss_used": loss4, "kl_budget": (1.0 - config.recovery) / alpha}


def run_tl(session: "SearchSession", config: "SearchConfig") -> dict:
    t_run, timings = time.perf_counter(), {"solve_s": 0.0, "verify_s": 0.0}
    t = time.perf_counter()
    score = _task_scorer(session, config)
    anchor = _anchor(session, config, score)
    timings["anchor_s"] = time.perf_counter() - t

    def judge(alloc, fid, rec):
        rec["tasks"] = compare_tasks(session.ref_tasks, score(), tolerance=config.tolerance, seed=session.seed)
        return rec["tasks"]["average"]["lossless"]

    rounds, accepted = _rounds(session, config, anchor["kl_budget"], timings, solve=lambda b: _solve_kl(session, b),
                               judge=judge, step=_halve_until_accepted)
    return _result(config, rounds, accepted, timings, t_run,
                   shown={"recovery": config.recovery, "tolerance": config.tolerance}, anchor=anchor)


def run_bits(session: "SearchSession", config: "SearchConfig") -> dict:
    t_run, timings = time.perf_counter(), {"solve_s": 0.0, "verify_s": 0.0}

    def solve(_):
        alloc, sol = session.solve(budget_bpp=config.bits)
        return alloc, sol.solver, sol.status

    rounds, accepted = _rounds(session, config, None, timings, solve=solve, judge=lambda *_: True,
                               step=_halve_until_accepted)
    return _result(config, rounds, accepted, timings, t_run, shown={"bits": config.bits})


TARGETS: dict[str, Callable[["SearchSession", "SearchConfig"], dict]] = {"dl": run_dl, "tl": run_tl,
                                                                          "bits": run_bits}
