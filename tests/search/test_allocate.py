import ast
import itertools
import math
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import slq.search.allocate as A
from slq.search.allocate import allocate, dp_minimize_bits, dp_minimize_loss, minimize_bits, minimize_loss
from slq.util.errors import SlqError

TOL = 1e-9


def random_instance(rng, n, k_range=(3, 8), integer_costs=False):
    """n units with 3..8 choices; sizes share a random per-unit step (so the gcd varies)."""
    costs, sizes = [], []
    for _ in range(n):
        k = int(rng.integers(k_range[0], k_range[1] + 1))
        step, base = int(rng.integers(1, 4)), int(rng.integers(0, 20))
        sizes.append((base + step * rng.integers(0, 50, size=k)).tolist())
        c = rng.integers(0, 10, size=k).astype(float) if integer_costs else rng.random(k)
        costs.append(c.tolist())
    return costs, sizes


def totals(costs, sizes, choice):
    return math.fsum(c[j] for c, j in zip(costs, choice)), sum(s[j] for s, j in zip(sizes, choice))


def brute_loss(costs, sizes, budget):
    """(least cost, then least size) over all allocations within budget."""
    feasible = (totals(costs, sizes, ch) for ch in itertools.product(*map(range, map(len, costs))))
    return min((c, s) for c, s in feasible if s <= budget)


def brute_bits(costs, sizes, max_loss):
    """(least size, then least cost) over all allocations with cost <= max_loss."""
    feasible = (totals(costs, sizes, ch) for ch in itertools.product(*map(range, map(len, costs))))
    return min((s, c) for c, s in feasible if c <= max_loss + 1e-12)


def random_budget(rng, sizes):
    return int(rng.integers(sum(map(min, sizes)), sum(map(max, sizes)) + 1))


def random_max_loss(rng, costs):
    return float(rng.uniform(sum(map(min, costs)), sum(map(max, costs))))


def check(a, costs, sizes):
    """The reported totals are those of the reported choice."""
    assert len(a.choice) == len(costs)
    c, s = totals(costs, sizes, a.choice)
    assert a.total_cost == pytest.approx(c, rel=1e-12, abs=1e-15) and a.total_size == s


# ------------------------------------------------------------------ exactness


@pytest.mark.parametrize("integer_costs", [False, True])
def test_minimize_loss_equals_brute_force_on_tiny_instances(integer_costs):
    rng = np.random.default_rng(11 + integer_costs)
    for _ in range(80):
        costs, sizes = random_instance(rng, int(rng.integers(1, 6)), integer_costs=integer_costs)
        budget = random_budget(rng, sizes)
        best_cost, best_size = brute_loss(costs, sizes, budget)
        for a in (minimize_loss(costs, sizes, budget), dp_minimize_loss(costs, sizes, budget)):
            check(a, costs, sizes)
            assert a.total_size <= budget
            assert a.total_cost == pytest.approx(best_cost, abs=TOL)
            assert a.total_size == best_size  # fewest bits among the least-cost allocations


@pytest.mark.parametrize("integer_costs", [False, True])
def test_minimize_bits_equals_brute_force_on_tiny_instances(integer_costs):
    rng = np.random.default_rng(21 + integer_costs)
    for _ in range(80):
        costs, sizes = random_instance(rng, int(rng.integers(1, 6)), integer_costs=integer_costs)
        max_loss = random_max_loss(rng, costs)
        if integer_costs:
            max_loss = float(math.floor(max_loss))  # lands exactly on achievable totals
        best_size, best_cost = brute_bits(costs, sizes, max_loss)
        for a in (minimize_bits(costs, sizes, max_loss), dp_minimize_bits(costs, sizes, max_loss)):
            check(a, costs, sizes)
            assert a.total_cost <= max_loss + 1e-12
            assert a.total_size == best_size
            assert a.total_cost == pytest.approx(best_cost, abs=TOL)  # least cost at that size


def test_ilp_equals_dp_on_random_instances():
    rng = np.random.default_rng(3)
    for t in range(30):
        costs, sizes = random_instance(rng, int(rng.integers(6, 13)), integer_costs=t % 3 == 0)
        budget = random_budget(rng, sizes)
        ilp, dp = minimize_loss(costs, sizes, budget), dp_minimize_loss(costs, sizes, budget)
        assert ilp.total_cost == pytest.approx(dp.total_cost, abs=TOL) and ilp.total_size == dp.total_size
        assert max(ilp.total_size, dp.total_size) <= budget
        max_loss = random_max_loss(rng, costs)
        ilp, dp = minimize_bits(costs, sizes, max_loss), dp_minimize_bits(costs, sizes, max_loss)
        assert ilp.total_size == dp.total_size
        assert ilp.total_cost == pytest.approx(dp.total_cost, abs=TOL)
        assert max(ilp.total_cost, dp.total_cost) <= max_loss + 1e-12


@settings(max_examples=40, deadline=None)
@given(
    units=st.lists(
        st.lists(st.tuples(st.integers(0, 5), st.integers(0, 30)), min_size=1, max_size=5),
        min_size=1, max_size=4,
    ),
    slack=st.floats(0, 1),
)
def test_both_solvers_match_brute_force_with_many_ties(units, slack):
    """Small integer costs and sizes: ties everywhere, duplicates, dominated choices."""
    costs = [[float(c) for c, _ in u] for u in units]
    sizes = [[s for _, s in u] for u in units]
    budget = int(sum(map(min, sizes)) + slack * (sum(map(max, sizes)) - sum(map(min, sizes))))
    want = brute_loss(costs, sizes, budget)
    for a in (minimize_loss(costs, sizes, budget), dp_minimize_loss(costs, sizes, budget)):
        assert (a.total_cost, a.total_size) == want
    max_loss = float(round(sum(map(min, costs)) + slack * (sum(map(max, costs)) - sum(map(min, costs)))))
    want = brute_bits(costs, sizes, max_loss)
    for a in (minimize_bits(costs, sizes, max_loss), dp_minimize_bits(costs, sizes, max_loss)):
        assert (a.total_size, a.total_cost) == want


def test_optimum_is_no_worse_than_a_known_allocation():
    rng = np.random.default_rng(5)
    for _ in range(20):
        costs, sizes = random_instance(rng, 10)
        known = [int(rng.integers(len(c))) for c in costs]
        k_cost, k_size = totals(costs, sizes, known)
        for a in (allocate(costs, sizes, budget=k_size), allocate(costs, sizes, budget=k_size, method="dp")):
            assert a.total_size <= k_size and a.total_cost <= k_cost + TOL
        for a in (allocate(costs, sizes, max_loss=k_cost), allocate(costs, sizes, max_loss=k_cost, method="dp")):
            assert a.total_cost <= k_cost + 1e-12 and a.total_size <= k_size


# ------------------------------------------------------------------ rules


@pytest.mark.parametrize("method", ["ilp", "dp"])
def test_non_monotone_costs_never_pick_a_dominated_choice(method):
    # unit 0's second choice costs more than its first and is larger: never worth taking
    costs = [[1.0, 2.0, 0.5, 0.0], [1.0, 0.6, 0.3, 0.0]]
    sizes = [[20, 30, 40, 160], [20, 30, 40, 160]]
    assert allocate(costs, sizes, budget=60, method=method).choice == [0, 2]  # 1.3 beats 0.5 + 1.0
    assert allocate(costs, sizes, budget=70, method=method).choice == [2, 1]  # 0.5 + 0.6
    for budget in range(40, 321, 10):
        assert allocate(costs, sizes, budget=budget, method=method).choice[0] != 1


@pytest.mark.parametrize("method", ["ilp", "dp"])
def test_ties_prefer_fewer_bits_then_lower_index(method):
    # unit 0: 8 bits and 16 bits both cost 0 -> 8 bits; unit 1: two identical choices -> index 0
    costs = [[0.5, 0.0, 0.0], [0.2, 0.2]]
    sizes = [[40, 80, 160], [30, 30]]
    a = allocate(costs, sizes, budget=1000, method=method)
    assert a.choice == [1, 0] and a.total_size == 110
    b = allocate(costs, sizes, max_loss=0.2, method=method)
    assert b.choice == [1, 0]
    assert [allocate(costs, sizes, budget=1000, method=method).choice for _ in range(3)] == [a.choice] * 3


@pytest.mark.parametrize("method", ["ilp", "dp"])
def test_float_budget_rounds_down_to_whole_bits(method):
    costs, sizes = [[1.0, 0.0], [1.0, 0.0]], [[10, 20], [10, 20]]
    assert allocate(costs, sizes, budget=29.99, method=method).choice == [0, 0]
    a = allocate(costs, sizes, budget=30.0, method=method)
    assert a.total_size == 30 and a.total_cost == 1.0


@pytest.mark.parametrize("method", ["ilp", "dp"])
def test_infinite_cost_marks_a_forbidden_choice(method):
    costs = [[1.0, math.inf, 0.0], [1.0, 0.0]]
    sizes = [[10, 20, 40], [10, 20]]
    a = allocate(costs, sizes, budget=40, method=method)
    assert a.choice == [0, 1] and a.total_cost == 1.0


@pytest.mark.parametrize("method", ["ilp", "dp"])
def test_infeasible_budget_names_the_smallest_possible(method):
    costs = [[1.0, 0.0], [1.0, 0.0]]
    sizes = [[114, 200], [114, 200]]
    with pytest.raises(SlqError, match=r"no allocation within 2 bits/param; the smallest possible is 2\.28 bits/param"):
        allocate(costs, sizes, budget=200, n_params=100, method=method)
    with pytest.raises(SlqError, match=r"no allocation within 200 bits; the smallest possible is 228 bits"):
        allocate(costs, sizes, budget=200, method=method)


@pytest.mark.parametrize("method", ["ilp", "dp"])
def test_unreachable_loss_names_the_least_possible(method):
    costs = [[1.0, 0.25], [1.0, 0.5]]
    sizes = [[10, 20], [10, 20]]
    with pytest.raises(SlqError, match=r"predicted loss of 0\.5; the least possible is 0\.75"):
        allocate(costs, sizes, max_loss=0.5, method=method)
    assert allocate(costs, sizes, max_loss=0.75, method=method).choice == [1, 1]  # the bound is inclusive


@pytest.mark.parametrize(
    "costs, sizes, kwargs, match",
    [
        ([[1.0]], [[1], [2]], {"budget": 5}, "units"),
        ([[math.nan, 1.0]], [[1, 2]], {"budget": 5}, "finite"),
        ([[math.inf]], [[1]], {"budget": 5}, "forbidden"),
        ([[1.0, 0.0]], [[1.5, 2]], {"budget": 5}, "integers"),
        ([[1.0, 0.0]], [[math.inf, 2]], {"budget": 5}, "integers"),
        ([[1.0]], [[1]], {"budget": math.nan}, "finite number of bits"),
        ([[1.0]], [[1]], {"max_loss": math.inf}, "finite"),
        ([[1.0, 0.0]], [[-1, 2]], {"budget": 5}, ">= 0"),
        ([], [], {"budget": 5}, "no units"),
        ([[1.0]], [[1]], {}, "exactly one"),
        ([[1.0]], [[1]], {"budget": 5, "max_loss": 1.0}, "exactly one"),
        ([[1.0]], [[1]], {"budget": 5, "method": "greedy"}, "unknown allocation method"),
    ],
)
def test_bad_input_is_a_clear_error(costs, sizes, kwargs, match):
    with pytest.raises(SlqError, match=match):
        allocate(costs, sizes, **kwargs)


# ------------------------------------------------------------------ fallback


def test_auto_falls_back_to_dp_when_highs_fails(monkeypatch):
    def broken(*args, **kwargs):
        raise A._SolverFailed("HiGHS: simulated failure")

    monkeypatch.setattr(A, "_milp", broken)
    costs, sizes = random_instance(np.random.default_rng(0), 6)
    budget = random_budget(np.random.default_rng(1), sizes)
    a = allocate(costs, sizes, budget=budget)
    assert a.solver == "dp" and a.total_size <= budget
    assert allocate(costs, sizes, max_loss=sum(map(max, costs))).solver == "dp"
    with pytest.raises(SlqError, match="simulated failure"):
        allocate(costs, sizes, budget=budget, method="ilp")


def test_auto_falls_back_to_dp_on_time_limit(monkeypatch):
    real = A._milp
    monkeypatch.setattr(A, "_milp", lambda *a, **k: (real(*a, **k)[0], "time_limit"))
    costs, sizes = random_instance(np.random.default_rng(2), 6)
    budget = random_budget(np.random.default_rng(3), sizes)
    assert allocate(costs, sizes, budget=budget).solver == "dp"
    unproven = allocate(costs, sizes, budget=budget, method="ilp")
    assert unproven.solver == "highs" and unproven.status == "time_limit" and unproven.total_size <= budget


def test_dp_refuses_a_table_too_large():
    # sizes with gcd 1 and a budget of 2e9 bits: a 3 x 2e9 table
    costs, sizes = [[1.0, 0.0]] * 3, [[0, 10**9 + 7], [0, 10**9 + 9], [1, 10**9]]
    with pytest.raises(SlqError, match="method='ilp'"):
        dp_minimize_loss(costs, sizes, 2 * 10**9 + 20)
    a = minimize_loss(costs, sizes, 2 * 10**9 + 20)
    assert a.total_cost == 1.0 and a.total_size <= 2 * 10**9 + 20


def test_allocate_module_does_not_import_torch():
    tree = ast.parse(Path(A.__file__).read_text())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert "torch" not in imported


# ------------------------------------------------------------------ realistic


def realistic_instance(seed=0):
    """30 layers x 7 linears (SmolLM2-135M shapes), bits 2..8 and 16, G = 64 asymmetric."""
    rng = np.random.default_rng(seed)
    H, I, KV, G = 576, 1536, 192, 64
    shapes = [(H, H), (KV, H), (KV, H), (H, H), (I, H), (I, H), (H, I)]  # (N, K)
    costs, sizes, n_params = [], [], 0
    for _ in range(30):
        for N, K in shapes:
            n = N * K
            n_params += n
            sizes.append([n * b + n // G * (16 + b) for b in range(2, 9)] + [16 * n])
            scale = rng.lognormal(0.0, 1.5) * n / 1e6
            costs.append([scale * 4.0 ** -b * rng.uniform(0.8, 1.2) for b in range(2, 9)] + [0.0])
    return costs, sizes, n_params


def test_realistic_instance_solves_fast_and_matches_dp():
    costs, sizes, n_params = realistic_instance()
    budget = int(4.5 * n_params)
    t = time.perf_counter()
    ilp = allocate(costs, sizes, budget=budget, method="ilp")
    ilp_s = time.perf_counter() - t
    dp = allocate(costs, sizes, budget=budget, method="dp")
    assert ilp.solver == "highs" and ilp.status == "optimal" and ilp_s < 1.0
    assert ilp.total_size <= budget and ilp.total_cost == pytest.approx(dp.total_cost, rel=1e-9)
    assert ilp.total_size == dp.total_size
    assert 4.45 < ilp.total_size / n_params <= 4.5

    max_loss = 1.01 * ilp.total_cost
    t = time.perf_counter()
    ilp_b = allocate(costs, sizes, max_loss=max_loss, method="ilp")
    ilp_b_s = time.perf_counter() - t
    dp_b = allocate(costs, sizes, max_loss=max_loss, method="dp")
    assert ilp_b.status == "optimal" and ilp_b_s < 1.0
    assert ilp_b.total_size == dp_b.total_size <= ilp.total_size
    assert max(ilp_b.total_cost, dp_b.total_cost) <= max_loss
