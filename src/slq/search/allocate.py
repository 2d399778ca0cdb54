"""Exact bit allocation: a multiple-choice knapsack over allocation units.

Unit ``i`` (``i = 0..n-1``) takes exactly one of its choices ``j`` (a candidate bitwidth,
16 meaning "left unquantized"). Choice ``j`` of unit ``i`` adds ``c[i][j]`` to the
predicted loss (KL, 1 - EAR, ...; additive across units by the linearity assumption)
and occupies ``s[i][j]`` bits of storage, an integer (weights, scales and zero points;
see :func:`slq.units.storage_bits`). With binary ``x_ij`` and ``sum_j x_ij = 1`` per unit:

    minimize_loss:  min sum_ij c_ij x_ij   s.t.  sum_ij s_ij x_ij <= B    (``--bits b``: B = b * params)
    minimize_bits:  min sum_ij s_ij x_ij   s.t.  sum_ij c_ij x_ij <= L    (DL/TL: L = 1 - target, ...)

Two exact solvers share one reduced problem: a 0/1 ILP solved by HiGHS
(:func:`scipy.optimize.milp`) and a dynamic program over the integer size axis (the
fallback and the cross-check). The reduction, exact for both problems:

* Per unit only the Pareto frontier is kept: ``j`` goes when some ``k`` has
  ``c_k <= c_j`` and ``s_k <= s_j``. Costs need not fall with bits; a choice that
  costs more than a smaller one is simply dominated. ``c = +inf`` marks a forbidden
  choice; NaN and ``-inf`` are rejected.
* Sizes become ``d_ij = (s_ij - m_i) / g`` with ``m_i = min_j s_ij`` and ``g`` the gcd of
  all ``s_ij - m_i``, so the budget becomes ``W = floor((B - sum_i m_i) / g)`` and the DP
  table has ``W + 1`` columns. Costs become ``c_ij - min_j c_ij`` (a constant per unit).
* Choices that cannot appear in any feasible solution are dropped: ``d_ij > W`` for
  ``minimize_loss``, ``c_ij - min_j c_ij > L - sum_i min_j c_ij`` for ``minimize_bits``.

Tie-breaking is deterministic. Per unit, the frontier keeps the smaller size among equal
costs, the lower cost among equal sizes, and the lower index among exact duplicates
("fewer bits at equal cost"). Across units both problems are lexicographic:
``minimize_loss`` returns the least cost and, among allocations within the slack ``tol``
of it, the least size; ``minimize_bits`` the least size and, at that size, the least
cost. The DP reads both off its table (the least cost for each exact size); the ILP
solves twice (the primary problem, then the secondary objective with the primary
value as a constraint) and keeps the first answer unless the second is strictly better.
HiGHS runs with both MIP gaps at 0, the cost rows and objectives scaled by the largest
reduced cost; its answers are re-checked in exact integer / ``fsum`` arithmetic and the
bound is tightened and the ILP re-solved when its feasibility tolerance overshot.

Totals are recomputed from the inputs (``math.fsum`` in unit order), so both solvers
report identical numbers for identical choices. The loss bound ``L`` is met up to the
same ``1e-12`` relative rounding slack; the budget is met exactly (integers).
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import csr_array

from ..util.errors import SlqError
from ..util.quiet import quiet_stdout

METHODS = ("ilp", "dp", "auto")
RTOL = 1e-12  # relative slack for float ties and for the loss bound
DP_MAX_CELLS = 200_000_000  # n * (W + 1) bytes of back-pointers the DP may use

Costs = Sequence[Sequence[float]]
Sizes = Sequence[Sequence[int]]


@dataclass(frozen=True)
class Allocation:
    """One choice index per unit (into that unit's original choice list) and its totals.

    ``status`` is ``"optimal"`` or ``"time_limit"`` (HiGHS stopped with a feasible but
    unproven allocation); ``solver`` is ``"highs"`` or ``"dp"``; ``seconds`` is wall time.
    """

    choice: list[int]
    total_cost: float
    total_size: int
    status: str = "optimal"
    solver: str = "highs"
    seconds: float = 0.0


class _SolverFailed(SlqError):
    """HiGHS gave no usable answer; :func:`allocate` falls back to the DP on this."""


@dataclass
class _Reduced:
    """The reduced problem: per unit, frontier choices with shifted integer sizes/costs."""

    keep: list[np.ndarray]  # original indices, sizes ascending
    d: list[np.ndarray]  # (s - m_i) / g, int64, starts at 0
    c: list[np.ndarray]  # c - min_j c_ij, float64, >= 0
    g: int
    size_offset: int  # sum_i m_i
    cost_offset: float  # sum_i min_j c_ij
    tol: float  # absolute slack: RTOL * sum_i max_j |c_ij|


# ---------------------------------------------------------------------------- input


def _check(costs: Costs, sizes: Sizes) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Validate and convert to per-unit float64 costs and int64 sizes."""
    if len(costs) != len(sizes):
        raise SlqError(f"costs have {len(costs)} units but sizes have {len(sizes)}")
    if len(costs) == 0:
        raise SlqError("nothing to allocate: no units")
    cs, ss = [], []
    for i, (ci, si) in enumerate(zip(costs, sizes)):
        c = np.asarray(ci, dtype=np.float64)
        s = np.asarray(si)
        if c.ndim != 1 or c.shape != s.shape or c.size == 0:
            raise SlqError(f"unit {i}: costs {c.shape} and sizes {s.shape} must be equal, non-empty lists")
        if np.isnan(c).any() or (c == -np.inf).any():
            raise SlqError(f"unit {i}: costs must be finite or +inf (forbidden), got {c.tolist()}")
        if not np.isfinite(c).any():
            raise SlqError(f"unit {i}: every choice is forbidden (cost +inf)")
        if s.dtype.kind not in "iuf" or (s.dtype.kind == "f" and not (np.isfinite(s) & (s == np.round(s))).all()):
            raise SlqError(f"unit {i}: sizes must be integers (storage bits), got {s.tolist()}")
        s = s.astype(np.int64)
        if (s < 0).any():
            raise SlqError(f"unit {i}: sizes must be >= 0, got {s.tolist()}")
        cs.append(c)
        ss.append(s)
    return cs, ss


def _frontier(c: np.ndarray, s: np.ndarray) -> np.ndarray:
    """Indices of the Pareto-optimal choices, sizes ascending and costs strictly falling.

    Sorting by (size, cost, index) and keeping each choice that is strictly cheaper than
    every smaller one implements the per-unit tie rule; +inf costs are never kept.
    """
    order = np.lexsort((np.arange(len(c)), c, s))
    keep, best = [], math.inf
    for j in order:
        if c[j] < best:
            keep.append(j)
            best = c[j]
    return np.asarray(keep, dtype=np.int64)


def prune_dominated(sizes: Sequence[int], scores: Sequence[float], protected: Sequence[bool] | None = None
                    ) -> tuple[list[int], dict[int, int]]:
    """One unit's choices without the dominated ones: ``j`` goes when some ``k`` has ``sizes[k] <= sizes[j]``
    and ``scores[k] <= scores[j]`` (the tie rule of :func:`_frontier`: the smaller size among equal scores, the
    lower score among equal sizes, the lower index among duplicates). ``protected[j]`` keeps ``j`` anyway.

    Returns (kept indices ascending, pruned index -> the smallest frontier index that dominates it). When the solve's
    costs are the scores (or order the choices the same way), no choice it can pick is pruned: both solvers only
    ever pick from this frontier.
    """
    c = np.asarray(scores, dtype=np.float64)
    s = np.asarray(sizes, dtype=np.int64)
    if c.shape != s.shape or c.ndim != 1:
        raise SlqError(f"prune_dominated: {c.shape} scores for {s.shape} sizes")
    front = [int(j) for j in _frontier(c, s)] if c.size else []
    if not front:  # nothing finite to judge by: keep everything
        return list(range(len(c))), {}
    prot = [False] * len(c) if protected is None else [bool(p) for p in protected]
    kept = sorted(set(front) | {j for j in range(len(c)) if prot[j]})
    by = {}
    for j in range(len(c)):
        if j in kept:
            continue
        # the dominating frontier choice named: the smallest one (fewest bits at no more loss)
        cands = [k for k in front if s[k] <= s[j] and c[k] <= c[j]]
        by[j] = min(cands, key=lambda k: (s[k], c[k], k)) if cands else front[0]
    return kept, by


def _reduce(cs: list[np.ndarray], ss: list[np.ndarray], keep: list[np.ndarray]) -> _Reduced:
    """Shift and scale the kept choices: d = (s - m_i) / g, c - min_j c_ij."""
    m = [int(s[k].min()) for s, k in zip(ss, keep)]
    g = 0
    for s, k, mi in zip(ss, keep, m):
        g = math.gcd(g, *(int(v) - mi for v in s[k]))
    g = max(g, 1)
    d = [(s[k] - mi) // g for s, k, mi in zip(ss, keep, m)]
    cmin = [float(c[k].min()) for c, k in zip(cs, keep)]
    c = [c[k] - cm for c, k, cm in zip(cs, keep, cmin)]
    scale = math.fsum(float(np.abs(ci[np.isfinite(ci)]).max()) for ci in cs)
    return _Reduced(keep, d, c, g, sum(m), math.fsum(cmin), RTOL * max(scale, 1e-300))


def _capacity(r: _Reduced, budget: int, n_params: int | None) -> int:
    """W = floor((B - sum m_i) / g); raises when even the smallest allocation is too big."""
    if budget < r.size_offset:
        if n_params:
            raise SlqError(
                f"no allocation within {budget / n_params:.4g} bits/param; "
                f"the smallest possible is {r.size_offset / n_params:.4g} bits/param"
            )
        raise SlqError(f"no allocation within {budget} bits; the smallest possible is {r.size_offset} bits")
    return (int(budget) - r.size_offset) // r.g


def _slack(r: _Reduced, max_loss: float) -> float:
    """R = L - sum_i min_j c_ij, the loss the reduced problem may spend; raises when < 0."""
    R = max_loss - r.cost_offset
    if R < -r.tol:
        raise SlqError(
            f"no allocation reaches a predicted loss of {max_loss:.6g}; the least possible is "
            f"{r.cost_offset:.6g} (every unit at its lowest-cost choice)"
        )
    return max(R, 0.0)


def _result(cs, ss, choice, status: str, solver: str, t0: float) -> Allocation:
    choice = [int(j) for j in choice]
    cost = math.fsum(float(c[j]) for c, j in zip(cs, choice))
    size = sum(int(s[j]) for s, j in zip(ss, choice))
    return Allocation(choice, cost, size, status, solver, time.perf_counter() - t0)


def _original(r: _Reduced, local: Sequence[int]) -> list[int]:
    return [int(k[j]) for k, j in zip(r.keep, local)]


def _prepare_loss(costs, sizes, budget, n_params):
    if not math.isfinite(budget):
        raise SlqError(f"the budget must be a finite number of bits, got {budget}")
    budget = math.floor(budget)  # a float budget (b * params) rounds down to whole bits
    cs, ss = _check(costs, sizes)
    front = [_frontier(c, s) for c, s in zip(cs, ss)]
    r = _reduce(cs, ss, front)
    W = _capacity(r, budget, n_params)  # raises when infeasible
    # drop choices that cannot fit even with every other unit at its smallest
    r = _reduce(cs, ss, [k[d <= W] for k, d in zip(front, r.d)])
    return cs, ss, r, _capacity(r, budget, n_params)


def _prepare_bits(costs, sizes, max_loss):
    if not math.isfinite(max_loss):
        raise SlqError(f"max_loss must be finite, got {max_loss}")
    cs, ss = _check(costs, sizes)
    front = [_frontier(c, s) for c, s in zip(cs, ss)]
    r = _reduce(cs, ss, front)
    R = _slack(r, max_loss)  # raises when infeasible
    # drop choices that overshoot the bound even with every other unit at its cheapest
    r = _reduce(cs, ss, [k[c <= R + r.tol] for k, c in zip(front, r.c)])
    return cs, ss, r, R


# ---------------------------------------------------------------------------- ILP


def _milp(r: _Reduced, objective: np.ndarray, row: np.ndarray, rhs: float, time_limit: float | None):
    """min objective.x  s.t.  one choice per unit, row.x <= rhs, x binary -> (local choice, status)."""
    n = len(r.d)
    counts = np.array([len(d) for d in r.d])
    nvar = int(counts.sum())
    one_hot = csr_array((np.ones(nvar), (np.repeat(np.arange(n), counts), np.arange(nvar))), shape=(n, nvar))
    # O(1) coefficients: sizes of large models reach 1e9 and more, and HiGHS's tolerances are absolute, so an
    # unscaled row can make it loop on "feasible" points that fail the original constraint. The callers check
    # every answer exactly and tighten, so scaling changes no result.
    rs = float(np.abs(row).max()) or 1.0
    objective = objective / (float(np.abs(objective).max()) or 1.0)
    constraints = [LinearConstraint(one_hot, 1.0, 1.0), LinearConstraint(row[None, :] / rs, -np.inf, rhs / rs)]
    # mip_abs_gap is not among milp's documented options; scipy passes it to HiGHS verbatim
    options = {"mip_rel_gap": 0.0, "mip_abs_gap": 0.0}
    if time_limit is not None:
        options["time_limit"] = float(time_limit)
    with warnings.catch_warnings(), quiet_stdout():  # HiGHS printf()s a debug line past its log options
        warnings.filterwarnings("ignore", "Unrecognized options", RuntimeWarning)
        res = milp(objective, integrality=np.ones(nvar), bounds=Bounds(0, 1), constraints=constraints,
                   options=options)
    if res.x is None or res.status not in (0, 1):
        raise _SolverFailed(f"HiGHS: {res.message}")
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    local = [int(np.argmax(res.x[a:a + k])) for a, k in zip(starts, counts)]
    return local, ("optimal" if res.status == 0 else "time_limit")


def _lift(r: _Reduced, local: list[int]) -> tuple[int, float]:
    """(reduced size, shifted cost) of a local choice."""
    return (int(sum(int(d[j]) for d, j in zip(r.d, local))), math.fsum(float(c[j]) for c, j in zip(r.c, local)))


def _unit(r: _Reduced) -> float:
    """Cost scale for the ILP rows and objectives: the largest shifted cost (1 when all are 0)."""
    top = max(float(c.max()) for c in r.c)
    return top if top > 0 else 1.0


def _least_cost(r: _Reduced, W: int, time_limit: float | None) -> tuple[list[int], str]:
    """min sum c x  s.t.  sum d x <= W (integers: checked exactly, tightened on overshoot)."""
    d, c = np.concatenate(r.d).astype(np.float64), np.concatenate(r.c)
    rhs = float(W)
    for _ in range(3):
        local, status = _milp(r, c / _unit(r), d, rhs, time_limit)
        size, _ = _lift(r, local)
        if size <= W:
            return local, status
        rhs -= size - W
    raise _SolverFailed("HiGHS kept returning allocations over the budget")


def _least_size(r: _Reduced, R: float, time_limit: float | None) -> tuple[list[int], str]:
    """min sum d x  s.t.  sum c x <= R (checked after solving, tightened on overshoot)."""
    d, c = np.concatenate(r.d).astype(np.float64), np.concatenate(r.c)
    unit = _unit(r)
    rhs = R
    for _ in range(3):
        local, status = _milp(r, d, c / unit, rhs / unit, time_limit)
        _, cost = _lift(r, local)
        if cost <= R:
            return local, status
        rhs -= cost - R
    raise _SolverFailed("HiGHS kept returning allocations over the loss bound")


def _ilp_loss(r: _Reduced, W: int, time_limit: float | None) -> tuple[list[int], str]:
    """Least cost within W; then the least size at that cost (+ tol), if smaller."""
    local, status = _least_cost(r, W, time_limit)
    size, cost = _lift(r, local)
    if status == "optimal" and size > 0:
        try:
            alt, alt_status = _least_size(r, cost + r.tol, time_limit)
        except _SolverFailed:
            return local, status
        if alt_status == "optimal" and _lift(r, alt)[0] < size:
            return alt, status
    return local, status


def _ilp_bits(r: _Reduced, R: float, time_limit: float | None) -> tuple[list[int], str]:
    """Least size with cost <= R (+ tol); then the least cost at that size, if lower."""
    local, status = _least_size(r, R + r.tol, time_limit)
    size, cost = _lift(r, local)
    if status == "optimal" and cost > 0:
        try:
            alt, alt_status = _least_cost(r, size, time_limit)
        except _SolverFailed:
            return local, status
        if alt_status == "optimal" and _lift(r, alt)[1] < cost:
            return alt, status
    return local, status


def minimize_loss(costs: Costs, sizes: Sizes, budget_bits: int, *, time_limit: float | None = None,
                  n_params: int | None = None) -> Allocation:
    """Least total cost with total size <= ``budget_bits``, by ILP (HiGHS).

    ``n_params`` (optional) lets the infeasibility message speak in bits/param.
    """
    t0 = time.perf_counter()
    cs, ss, r, W = _prepare_loss(costs, sizes, budget_bits, n_params)
    local, status = _ilp_loss(r, W, time_limit)
    return _result(cs, ss, _original(r, local), status, "highs", t0)


def minimize_bits(costs: Costs, sizes: Sizes, max_loss: float, *, time_limit: float | None = None) -> Allocation:
    """Least total size with total cost <= ``max_loss``, by ILP (HiGHS)."""
    t0 = time.perf_counter()
    cs, ss, r, R = _prepare_bits(costs, sizes, max_loss)
    local, status = _ilp_bits(r, R, time_limit)
    return _result(cs, ss, _original(r, local), status, "highs", t0)


# ---------------------------------------------------------------------------- DP


def _dp_table(r: _Reduced, W: int, max_cells: int) -> tuple[np.ndarray, np.ndarray]:
    """best[w] = least shifted cost of any allocation of reduced size exactly w (w = 0..W).

    Recurrence over units: best_i[w] = min_j best_{i-1}[w - d_ij] + c_ij; ``arg[i, w]`` is
    the minimizing j (the lowest such j on ties). Time O(n * choices * W), memory n * W bytes.
    """
    n = len(r.d)
    if n * (W + 1) > max_cells:
        raise SlqError(
            f"the DP table would need {n} x {W + 1} cells (over {max_cells}); "
            "the sizes share too small a gcd: use method='ilp'"
        )
    best = np.full(W + 1, np.inf)
    best[0] = 0.0
    arg = np.zeros((n, W + 1), dtype=np.int8 if max(map(len, r.d)) < 128 else np.int16)
    for i, (d, c) in enumerate(zip(r.d, r.c)):
        stack = np.full((len(d), W + 1), np.inf)
        for j, (dj, cj) in enumerate(zip(d, c)):
            if dj <= W:
                stack[j, dj:] = best[: W + 1 - dj] + cj
        arg[i] = stack.argmin(axis=0)
        best = np.take_along_axis(stack, arg[i][None, :].astype(np.int64), axis=0)[0]
    return best, arg


def _backtrack(r: _Reduced, arg: np.ndarray, w: int) -> list[int]:
    local = [0] * len(r.d)
    for i in range(len(r.d) - 1, -1, -1):
        j = int(arg[i, w])
        local[i] = j
        w -= int(r.d[i][j])
    assert w == 0, "DP back-pointers are inconsistent"
    return local


def _greedy_bound(r: _Reduced, R: float) -> int:
    """Reduced size of a feasible allocation for ``cost <= R``: an upper bound for the DP.

    Start every unit at its smallest choice and apply upgrades along each unit's lower
    convex hull in order of best cost saved per bit (the LP-relaxation order), stopping
    as soon as the total cost fits.
    """
    steps = []  # (cost per size unit, size step, cost step)
    cost = 0.0
    for d, c in zip(r.d, r.c):
        cost += float(c[0])
        hull = [0]
        for j in range(1, len(d)):  # lower convex hull of (d, c), d ascending
            while len(hull) >= 2:
                a, b = hull[-2], hull[-1]
                if (c[b] - c[a]) * (d[j] - d[a]) >= (c[j] - c[a]) * (d[b] - d[a]):
                    hull.pop()
                else:
                    break
            hull.append(j)
        for a, b in zip(hull, hull[1:]):
            steps.append(((c[b] - c[a]) / (d[b] - d[a]), int(d[b] - d[a]), float(c[b] - c[a])))
    steps.sort(key=lambda t: t[0])
    size = 0
    for _, dd, dc in steps:
        if cost <= R + r.tol / 2:  # half the slack: the DP's own sums then fit for sure
            break
        cost += dc
        size += dd
    return size


def dp_minimize_loss(costs: Costs, sizes: Sizes, budget_bits: int, *, n_params: int | None = None,
                     max_cells: int = DP_MAX_CELLS) -> Allocation:
    """Least total cost with total size <= ``budget_bits``, by exact dynamic programming.

    Among allocations within ``tol`` of the least cost, the smallest size is returned.
    """
    t0 = time.perf_counter()
    cs, ss, r, W = _prepare_loss(costs, sizes, budget_bits, n_params)
    best, arg = _dp_table(r, W, max_cells)
    w = int(np.flatnonzero(best <= best.min() + r.tol)[0])
    return _result(cs, ss, _original(r, _backtrack(r, arg, w)), "optimal", "dp", t0)


def dp_minimize_bits(costs: Costs, sizes: Sizes, max_loss: float, *, max_cells: int = DP_MAX_CELLS) -> Allocation:
    """Least total size with total cost <= ``max_loss``, by exact dynamic programming.

    The table spans sizes up to a greedy feasible allocation's; the first size whose
    least cost fits is the answer, and that least cost breaks ties.
    """
    t0 = time.perf_counter()
    cs, ss, r, R = _prepare_bits(costs, sizes, max_loss)
    best, arg = _dp_table(r, _greedy_bound(r, R), max_cells)
    w = int(np.flatnonzero(best <= R + r.tol)[0])
    return _result(cs, ss, _original(r, _backtrack(r, arg, w)), "optimal", "dp", t0)


# ---------------------------------------------------------------------------- entry point


def allocate(costs: Costs, sizes: Sizes, *, budget: int | None = None, max_loss: float | None = None,
             method: str = "auto", time_limit: float | None = 30.0, n_params: int | None = None) -> Allocation:
    """Solve one of the two knapsacks; give exactly one of ``budget`` (bits) or ``max_loss``.

    ``method``: ``"ilp"`` (HiGHS), ``"dp"``, or ``"auto"`` = ILP, falling back to the DP
    when HiGHS fails or stops at ``time_limit`` (seconds per HiGHS call) unproven.
    Infeasible problems raise :class:`SlqError` naming the nearest feasible value
    (in bits/param when ``n_params``, the total parameter count, is given).
    """
    if method not in METHODS:
        raise SlqError(f"unknown allocation method {method!r}; choose one of {', '.join(METHODS)}")
    if (budget is None) == (max_loss is None):
        raise SlqError("give exactly one of budget (bits) or max_loss")
    if budget is not None:
        ilp = lambda: minimize_loss(costs, sizes, budget, time_limit=time_limit, n_params=n_params)  # noqa: E731
        dp = lambda: dp_minimize_loss(costs, sizes, budget, n_params=n_params)  # noqa: E731
    else:
        ilp = lambda: minimize_bits(costs, sizes, max_loss, time_limit=time_limit)  # noqa: E731
        dp = lambda: dp_minimize_bits(costs, sizes, max_loss)  # noqa: E731
    if method == "dp":
        return dp()
    try:
        found = ilp()
    except _SolverFailed:
        if method == "ilp":
            raise
        return dp()
    return dp() if method == "auto" and found.status != "optimal" else found
