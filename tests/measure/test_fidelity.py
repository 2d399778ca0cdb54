"""Tests of slq.fidelity against independent oracles: float64 brute-force loops for every metric,
known-truth synthetic data for the bootstrap, and full-logit float64 recomputation on a real model."""

from __future__ import annotations

import copy
import json
import math
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.multiprocessing.reductions import StorageWeakRef

from slq.measure.fidelity import (
    EAR_TOP10_DEFINITION,
    Fidelity,
    bootstrap_ci,
    compare_windows,
    on_policy_ear,
    sample_continuations,
    token_metrics,
)

# Same location rule as conftest.py: $SLQ_SHARED, else ../shared beside the repository.
SHARED = Path(os.environ.get("SLQ_SHARED", Path(__file__).resolve().parents[2] / ".." / "shared"))
STORIES = SHARED / "models" / "stories260K"
TINY_TEXT = SHARED / "data" / "calib" / "tiny.utf8"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These models and arrays are tiny: extra OpenMP threads only spin against other work on a shared
    2-core machine (the sampling loop ran ~100x slower with 2 threads under load). Restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------------------
# Oracles
# ---------------------------------------------------------------------------------------------------------


def _log_softmax64(x: list[float]) -> list[float]:
    m = max(x)
    lse = m + math.log(sum(math.exp(v - m) for v in x))
    return [v - lse for v in x]


def brute_force(ref: np.ndarray, cand: np.ndarray, nxt: np.ndarray, T: float) -> dict[str, np.ndarray]:
    """Every metric, one position and one vocabulary entry at a time, in float64 Python arithmetic."""
    out: dict[str, list[float]] = {k: [] for k in
                                   ("ear", "tv", "kl_pq", "kl_qp", "top1", "dp", "nll_ref", "nll_cand",
                                    "entropy_ref", "ear_top10")}
    for x, y, t in zip(ref.tolist(), cand.tolist(), nxt.tolist()):
        V = len(x)
        lp = _log_softmax64([v / T for v in x])
        lq = _log_softmax64([v / T for v in y])
        p = [math.exp(v) for v in lp]
        q = [math.exp(v) for v in lq]
        out["ear"].append(sum(min(p[v], q[v]) for v in range(V)))
        out["tv"].append(0.5 * sum(abs(p[v] - q[v]) for v in range(V)))
        kl_pq = kl_qp = ent = 0.0
        for v in range(V):
            if p[v] > 0:
                kl_pq += p[v] * (lp[v] - lq[v])
                ent -= p[v] * lp[v]
            if q[v] > 0:
                kl_qp += q[v] * (lq[v] - lp[v])
        out["kl_pq"].append(kl_pq)
        out["kl_qp"].append(kl_qp)
        out["entropy_ref"].append(ent)
        out["top1"].append(float(max(range(V), key=lambda v: x[v]) == max(range(V), key=lambda v: y[v])))
        out["dp"].append(q[t] - p[t])
        out["nll_ref"].append(-_log_softmax64(x)[t])
        out["nll_cand"].append(-_log_softmax64(y)[t])
        top = sorted(range(V), key=lambda v: -p[v])[:10]
        sp, sq = sum(p[v] for v in top), sum(q[v] for v in top)
        out["ear_top10"].append(sum(min(p[v] / sp, q[v] / sq) for v in top))
    return {k: np.array(v) for k, v in out.items()}


def random_logits(seed: int, shape: tuple[int, ...], scale: float, gap: float) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    ref = scale * torch.randn(shape, generator=g)
    cand = ref + gap * torch.randn(shape, generator=g)
    nxt = torch.randint(0, shape[-1], shape[:-1], generator=g)
    return ref, cand, nxt


def assert_matches_brute_force(got: dict[str, torch.Tensor], want: dict[str, np.ndarray]) -> None:
    tol = {"kl_pq": 2e-5, "kl_qp": 2e-5, "entropy_ref": 2e-5, "nll_ref": 2e-5, "nll_cand": 2e-5}
    for key, value in got.items():
        np.testing.assert_allclose(value.reshape(-1).double().numpy(), want[key], rtol=1e-4,
                                   atol=tol.get(key, 2e-6), err_msg=key)


# ---------------------------------------------------------------------------------------------------------
# token_metrics
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("V", [5, 17, 50])
@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.0])
@pytest.mark.parametrize("scale,gap", [(1.0, 0.05), (4.0, 1.0), (10.0, 3.0)])
def test_token_metrics_match_float64_brute_force(V, temperature, scale, gap):
    ref, cand, nxt = random_logits(V, (3, 4, V), scale, gap)
    got = token_metrics(ref, cand, nxt, temperature=temperature)
    assert set(got) == {"ear", "kl_pq", "kl_qp", "top1", "dp", "nll_ref", "nll_cand", "entropy_ref", "ear_top10"}
    assert all(v.shape == (3, 4) and v.dtype == torch.float32 for v in got.values())
    want = brute_force(ref.reshape(-1, V).numpy(), cand.reshape(-1, V).numpy(), nxt.reshape(-1).numpy(), temperature)
    assert_matches_brute_force(got, want)


def test_ear_equals_one_minus_total_variation():
    ref, cand, nxt = random_logits(1, (40, 23), 3.0, 1.0)
    want = brute_force(ref.numpy(), cand.numpy(), nxt.numpy(), 1.0)
    np.testing.assert_allclose(want["ear"], 1.0 - want["tv"], atol=1e-12)
    np.testing.assert_allclose(token_metrics(ref, cand)["ear"].double().numpy(), 1.0 - want["tv"], atol=2e-6)


def test_ear_is_the_speculative_acceptance_rate():
    """Draft y ~ q, accept with probability min(1, p(y)/q(y)): the acceptance frequency estimates EAR."""
    ref, cand, _ = random_logits(2, (3, 30), 2.0, 1.5)
    ear = token_metrics(ref, cand)["ear"].double()
    p, q = torch.softmax(ref.double(), -1), torch.softmax(cand.double(), -1)
    g = torch.Generator().manual_seed(0)
    n = 40_000
    drafts = torch.multinomial(q, n, replacement=True, generator=g)
    accept_prob = (p.gather(-1, drafts) / q.gather(-1, drafts)).clamp(max=1.0)
    accepted = (torch.rand(accept_prob.shape, generator=g, dtype=torch.float64) < accept_prob).double().mean(-1)
    se = torch.sqrt(ear * (1 - ear) / n)
    assert torch.all((accepted - ear).abs() < 5 * se), (accepted, ear)


def test_identical_distributions_give_ear_one_and_kl_zero_exactly():
    ref, _, nxt = random_logits(3, (2, 9, 50), 5.0, 0.0)
    got = token_metrics(ref, ref.clone(), nxt)
    assert torch.all(got["ear"] == 1.0) and torch.all(got["ear_top10"] == 1.0)
    assert torch.all(got["kl_pq"] == 0.0) and torch.all(got["kl_qp"] == 0.0)
    assert torch.all(got["top1"] == 1.0) and torch.all(got["dp"] == 0.0)
    assert torch.equal(got["nll_ref"], got["nll_cand"])


@pytest.mark.parametrize("far", [-math.inf, -1e4])
def test_disjoint_supports_give_ear_zero(far):
    """p lives on the first half of the vocabulary, q on the second (-inf or very negative logits)."""
    V = 12
    ref, cand, nxt = random_logits(4, (6, V), 1.0, 1.0)
    ref[:, V // 2:] = far
    cand[:, : V // 2] = far
    got = token_metrics(ref, cand, nxt)
    assert torch.all(got["ear"].abs() < 1e-6)
    assert torch.all(got["top1"] == 0.0)
    assert torch.all(got["ear_top10"] < 1e-6)  # q has (almost) no mass on p's top 10
    if far == -math.inf:
        assert torch.all(torch.isinf(got["kl_pq"])) and torch.all(torch.isinf(got["kl_qp"]))
    else:
        assert torch.all(got["kl_pq"] > 1e3)
        want = brute_force(ref.numpy(), cand.numpy(), nxt.numpy(), 1.0)
        np.testing.assert_allclose(got["kl_pq"].double().numpy(), want["kl_pq"], rtol=1e-5)


def test_temperature_rescales_logits_but_not_perplexity():
    ref, cand, nxt = random_logits(5, (20, 31), 3.0, 1.0)
    T = 0.6
    hot = token_metrics(ref, cand, nxt, temperature=T)
    scaled = token_metrics(ref / T, cand / T, nxt, temperature=1.0)
    plain = token_metrics(ref, cand, nxt, temperature=1.0)
    for key in ("ear", "kl_pq", "kl_qp", "top1", "entropy_ref", "ear_top10", "dp"):
        torch.testing.assert_close(hot[key], scaled[key], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(hot["ear"], plain["ear"])
    torch.testing.assert_close(hot["nll_ref"], plain["nll_ref"])
    torch.testing.assert_close(hot["nll_cand"], plain["nll_cand"])


def test_top10_equals_full_ear_when_vocabulary_has_at_most_ten_tokens():
    ref, cand, _ = random_logits(6, (15, 10), 2.0, 1.0)
    got = token_metrics(ref, cand)
    torch.testing.assert_close(got["ear_top10"], got["ear"], rtol=0, atol=1e-6)


@pytest.mark.parametrize("chunk", [1, 3, 7, 1000])
def test_chunked_equals_unchunked(chunk):
    ref, cand, nxt = random_logits(7, (5, 4, 33), 3.0, 0.5)
    whole = token_metrics(ref, cand, nxt, chunk=ref.shape[0] * ref.shape[1])
    parts = token_metrics(ref, cand, nxt, chunk=chunk)
    for key in whole:
        torch.testing.assert_close(parts[key], whole[key], rtol=0, atol=1e-7)


def test_llama3_sized_vocabulary_matches_float64():
    """V = 128,256 in chunks of one position, against a vectorized float64 computation."""
    V = 128_256
    ref, cand, nxt = random_logits(8, (3, V), 3.0, 0.3)
    got = token_metrics(ref.bfloat16(), cand.bfloat16(), nxt, chunk=1)
    lp = torch.log_softmax(ref.bfloat16().double(), -1)
    lq = torch.log_softmax(cand.bfloat16().double(), -1)
    p, q = lp.exp(), lq.exp()
    torch.testing.assert_close(got["ear"].double(), 1 - 0.5 * (p - q).abs().sum(-1), rtol=0, atol=2e-5)
    torch.testing.assert_close(got["kl_pq"].double(), (p * (lp - lq)).sum(-1), rtol=2e-4, atol=1e-5)
    torch.testing.assert_close(got["nll_ref"].double(), -lp.gather(-1, nxt[:, None])[:, 0], rtol=1e-5, atol=1e-5)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), V=st.integers(2, 40),
       scale=st.floats(0.1, 20.0), gap=st.floats(0.0, 10.0))
def test_bounds_and_pinsker_inequality(seed, V, scale, gap):
    """0 <= EAR <= 1, KL >= 0, and Pinsker: TV <= sqrt(KL/2), i.e. EAR >= 1 - sqrt(KL/2)."""
    ref, cand, _ = random_logits(seed, (4, V), scale, gap)
    got = token_metrics(ref, cand)
    assert torch.all((got["ear"] >= 0) & (got["ear"] <= 1))
    assert torch.all((got["ear_top10"] >= 0) & (got["ear_top10"] <= 1))
    assert torch.all(got["kl_pq"] >= 0) and torch.all(got["kl_qp"] >= 0)
    # fp32 KL of nearly equal distributions is a difference of nearly equal terms: its absolute error
    # is ~1e-7 (float eps x |log p|), which sqrt turns into ~2e-4 near KL = 0, so the slack sits inside
    for kl in (got["kl_pq"], got["kl_qp"]):
        assert torch.all(got["ear"] >= 1 - torch.sqrt((kl + 1e-6) / 2) - 1e-5)


# ---------------------------------------------------------------------------------------------------------
# bootstrap_ci
# ---------------------------------------------------------------------------------------------------------


def correlated_sequences(rng: np.random.Generator, n_seq: int, mu: float) -> tuple[list[np.ndarray], float]:
    """Tokens share a per-sequence offset (sd 1) plus small token noise (sd 0.3): intra-class corr ~ 0.9.
    Lengths are independent of the offsets, so the token-weighted mean targets mu."""
    lengths = rng.integers(10, 41, size=n_seq)
    offsets = rng.normal(0.0, 1.0, size=n_seq)
    return [mu + b + rng.normal(0.0, 0.3, size=n) for b, n in zip(offsets, lengths)], mu


def coverage(by_sequence: bool, reps: int, n_boot: int) -> float:
    rng = np.random.default_rng(12345)
    hits = 0
    for rep in range(reps):
        seqs, mu = correlated_sequences(rng, n_seq=40, mu=0.5)
        if by_sequence:
            lo, hi = bootstrap_ci([s.sum() for s in seqs], [s.size for s in seqs], n_boot=n_boot, seed=rep)
        else:
            tokens = np.concatenate(seqs)
            lo, hi = bootstrap_ci(tokens, np.ones_like(tokens), n_boot=n_boot, seed=rep)
        hits += lo <= mu <= hi
    return hits / reps


def test_sequence_bootstrap_covers_true_mean_at_nominal_rate():
    assert 0.88 <= coverage(by_sequence=True, reps=200, n_boot=1000) <= 0.99


def test_token_bootstrap_undercovers_correlated_tokens():
    """Why we resample sequences: treating ~1,000 correlated tokens as independent shrinks the interval
    about 4x, and it misses the truth most of the time."""
    assert coverage(by_sequence=False, reps=200, n_boot=300) < 0.6


def test_bootstrap_agrees_with_normal_theory_on_many_equal_length_sequences():
    rng = np.random.default_rng(0)
    means = rng.exponential(1.0, size=400)
    lo, hi = bootstrap_ci(means * 20, np.full(400, 20), n_boot=4000, seed=1)
    center, half = means.mean(), 1.959964 * means.std(ddof=1) / math.sqrt(means.size)
    assert abs(lo - (center - half)) < 0.1 * half and abs(hi - (center + half)) < 0.1 * half


def test_bootstrap_matches_a_loop_over_resampled_token_weighted_means():
    """Long sequences carry higher values, so the token-weighted mean (~0.67) differs from the mean of
    sequence means (~0.52); a slow loop over resamples is the oracle for the interval's endpoints."""
    rng = np.random.default_rng(5)
    lengths = rng.integers(5, 101, size=50)
    seqs = [lengths[i] / 100 + rng.normal(0.0, 0.2, size=lengths[i]) for i in range(50)]
    sums, counts = np.array([s.sum() for s in seqs]), lengths.astype(float)
    stats = []
    for _ in range(4000):
        pick = rng.integers(0, 50, size=50)
        stats.append(np.concatenate([seqs[i] for i in pick]).mean())
    want = np.quantile(stats, [0.025, 0.975])
    lo, hi = bootstrap_ci(sums, counts, n_boot=4000, seed=0)
    assert abs(lo - want[0]) < 0.015 and abs(hi - want[1]) < 0.015
    assert lo < sums.sum() / counts.sum() < hi


def test_bootstrap_edge_cases_and_determinism():
    assert bootstrap_ci([6.0, 3.0, 9.0], [2, 1, 3]) == (3.0, 3.0)  # every sequence has mean 3
    assert all(math.isnan(v) for v in bootstrap_ci([], []))
    rng = np.random.default_rng(3)
    sums, counts = rng.normal(size=6000), rng.integers(1, 5, size=6000)  # several index blocks
    a = bootstrap_ci(sums, counts, n_boot=1500, seed=7)
    assert a == bootstrap_ci(torch.tensor(sums), torch.tensor(counts), n_boot=1500, seed=7)
    assert a != bootstrap_ci(sums, counts, n_boot=1500, seed=8)
    assert a[0] < sums.sum() / counts.sum() < a[1]


# ---------------------------------------------------------------------------------------------------------
# Runner on a real model
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stories_lm():
    if not STORIES.is_dir() or not TINY_TEXT.is_file():
        pytest.skip(f"shared model/data not found at {SHARED}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(STORIES).eval()
    tokenizer = AutoTokenizer.from_pretrained(STORIES)
    ids = tokenizer(TINY_TEXT.read_text(encoding="utf-8")[:20_000]).input_ids
    L = 48
    windows = torch.tensor(ids[: 10 * L]).reshape(10, L)
    return SimpleNamespace(model=model, tokenizer=tokenizer, windows=windows)


@pytest.fixture(scope="module")
def perturbed(stories_lm):
    model = copy.deepcopy(stories_lm.model)
    weight = model.model.layers[2].mlp.down_proj.weight
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        weight.add_(0.3 * weight.std() * torch.randn(weight.shape, generator=g))
    return model


def full_logit_oracle(reference, candidate, windows: torch.Tensor, mask: torch.Tensor) -> dict[str, np.ndarray]:
    """Metrics from the full [n, L, V] logits in float64 numpy, at the masked positions."""
    with torch.no_grad():
        zp = reference(input_ids=windows).logits[:, :-1][mask].double().numpy()
        zq = candidate(input_ids=windows).logits[:, :-1][mask].double().numpy()
    nxt = windows[:, 1:][mask].numpy()

    def log_softmax(z):
        m = z.max(-1, keepdims=True)
        return z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))

    lp, lq = log_softmax(zp), log_softmax(zq)
    p, q = np.exp(lp), np.exp(lq)
    rows = np.arange(nxt.size)
    top = np.argsort(-p, -1)[:, :10]
    pt, qt = np.take_along_axis(p, top, -1), np.take_along_axis(q, top, -1)
    return {
        "ear": np.minimum(p, q).sum(-1),
        "kl_pq": (p * (lp - lq)).sum(-1),
        "kl_qp": (q * (lq - lp)).sum(-1),
        "top1": (zp.argmax(-1) == zq.argmax(-1)).astype(float),
        "entropy_ref": -(p * lp).sum(-1),
        "nll_ref": -lp[rows, nxt],
        "nll_cand": -lq[rows, nxt],
        "dp": q[rows, nxt] - p[rows, nxt],
        "ear_top10": np.minimum(pt / pt.sum(-1, keepdims=True), qt / qt.sum(-1, keepdims=True)).sum(-1),
    }


def test_model_against_itself_is_exactly_lossless(stories_lm):
    fid = compare_windows(stories_lm.model, stories_lm.model, stories_lm.windows, batch_size=4, progress=False)
    assert fid.ear == 1.0 and fid.ear_ci95 == (1.0, 1.0) and fid.ear_top10 == 1.0
    assert fid.kl_pq_mean == 0.0 and fid.kl_pq_max == 0.0 and fid.kl_qp_mean == 0.0
    assert fid.top1 == 1.0 and fid.dp_rms == 0.0 and fid.ppl_ratio == 1.0
    assert fid.n_tokens == 10 * 47 and fid.n_sequences == 10
    assert 2.0 < fid.ppl_reference < 30.0  # an off-by-one next token would give hundreds


def test_perturbed_copy_matches_full_logit_oracle(stories_lm, perturbed):
    windows = stories_lm.windows
    fid = compare_windows(stories_lm.model, perturbed, windows, batch_size=3, progress=False)
    want = full_logit_oracle(stories_lm.model, perturbed, windows, torch.ones(10, 47, dtype=torch.bool))
    assert 0.5 < fid.ear < 1.0
    assert fid.ear == pytest.approx(want["ear"].mean(), abs=1e-6)
    assert fid.ear_top10 == pytest.approx(want["ear_top10"].mean(), abs=1e-6)
    assert fid.kl_pq_mean == pytest.approx(want["kl_pq"].mean(), rel=1e-4)
    assert fid.kl_pq_p99 == pytest.approx(np.quantile(want["kl_pq"], 0.99), rel=1e-4)
    assert fid.kl_pq_median == pytest.approx(np.median(want["kl_pq"]), rel=1e-4)
    assert fid.kl_pq_max == pytest.approx(want["kl_pq"].max(), rel=1e-4)
    assert fid.kl_qp_mean == pytest.approx(want["kl_qp"].mean(), rel=1e-4)
    assert fid.top1 == pytest.approx(want["top1"].mean(), abs=1e-12)
    assert fid.dp_rms == pytest.approx(np.sqrt((want["dp"] ** 2).mean()), rel=1e-4)
    assert fid.ppl_reference == pytest.approx(np.exp(want["nll_ref"].mean()), rel=1e-5)
    assert fid.ppl_candidate == pytest.approx(np.exp(want["nll_cand"].mean()), rel=1e-5)
    assert fid.ear_ci95[0] < fid.ear < fid.ear_ci95[1]
    # Flip rate by reference-entropy quintile, binned independently with the float64 entropies.
    edges = np.quantile(want["entropy_ref"], [0.2, 0.4, 0.6, 0.8])
    bins = np.digitize(want["entropy_ref"], edges)
    flip = [1 - want["top1"][bins == i].mean() for i in range(5)]
    np.testing.assert_allclose(fid.flip_rate_by_entropy, flip, atol=1.5 / min(fid.entropy_quintile_tokens))
    assert sum(fid.entropy_quintile_tokens) == fid.n_tokens
    overall = np.dot(fid.flip_rate_by_entropy, fid.entropy_quintile_tokens) / fid.n_tokens
    assert overall == pytest.approx(1 - fid.top1)


def test_mask_selects_the_counted_positions(stories_lm, perturbed):
    g = torch.Generator().manual_seed(1)
    mask = torch.rand(10, 47, generator=g) < 0.3
    mask[4] = False  # a window with nothing counted
    fid = compare_windows(stories_lm.model, perturbed, stories_lm.windows, mask=mask, batch_size=4, progress=False)
    want = full_logit_oracle(stories_lm.model, perturbed, stories_lm.windows, mask)
    assert fid.n_tokens == int(mask.sum()) and fid.n_sequences == 9
    assert fid.ear == pytest.approx(want["ear"].mean(), abs=1e-6)
    assert fid.ppl_candidate == pytest.approx(np.exp(want["nll_cand"].mean()), rel=1e-5)


class Tracked(torch.nn.Module):
    """Wraps a model; before each call records how many logits storages returned so far are still alive.
    Storage (not tensor-object) references, so views and slices that keep the memory count too."""

    def __init__(self, inner: torch.nn.Module, registry: list, alive_at_call: list):
        super().__init__()
        self.inner, self.registry, self.alive_at_call = inner, registry, alive_at_call

    def forward(self, input_ids, **kw):
        self.alive_at_call.append(sum(not r.expired() for r in self.registry))
        logits = self.inner(input_ids=input_ids, **kw).logits
        self.registry.append(StorageWeakRef(logits.untyped_storage()))
        return SimpleNamespace(logits=logits)


def test_no_more_than_one_batch_of_logits_is_alive(stories_lm, perturbed):
    registry, alive = [], []
    ref, cand = Tracked(stories_lm.model, registry, alive), Tracked(perturbed, registry, alive)
    compare_windows(ref, cand, stories_lm.windows, batch_size=2, progress=False)
    assert len(alive) == 10  # 5 batches x 2 models
    assert max(alive) <= 1  # at most the reference logits of the current batch
    assert all(r.expired() for r in registry)


def test_batch_size_does_not_change_the_result(stories_lm, perturbed):
    a = compare_windows(stories_lm.model, perturbed, stories_lm.windows, batch_size=1, progress=False)
    b = compare_windows(stories_lm.model, perturbed, stories_lm.windows, batch_size=10, progress=False)
    assert a.ear == pytest.approx(b.ear, abs=1e-6) and a.kl_pq_mean == pytest.approx(b.kl_pq_mean, rel=1e-4)


def test_fidelity_dict_round_trip_is_json(stories_lm, perturbed):
    fid = compare_windows(stories_lm.model, perturbed, stories_lm.windows, batch_size=5, progress=False, n_boot=200)
    fid.on_policy = compare_windows(stories_lm.model, perturbed, stories_lm.windows[:3], progress=False, n_boot=200)
    fid.tasks = {"piqa": {"acc": 0.5}}
    d = json.loads(json.dumps(fid.to_dict()))
    assert d["n_tokens"] == 470 and d["ear"]["mean"] == fid.ear and len(d["ear"]["ci95"]) == 2
    assert d["kl"]["mean"] == fid.kl_pq_mean and d["kl"]["p99"] == fid.kl_pq_p99 and d["top1"] == fid.top1
    assert d["ppl"]["ratio"] == fid.ppl_ratio and d["ppl"]["reference"] == fid.ppl_reference
    assert d["on_policy"]["ear"]["mean"] == fid.on_policy.ear and d["tasks"] == {"piqa": {"acc": 0.5}}
    assert d["ear_top10"]["definition"] == EAR_TOP10_DEFINITION
    assert Fidelity.from_dict(d) == fid


# ---------------------------------------------------------------------------------------------------------
# On-policy sampling
# ---------------------------------------------------------------------------------------------------------


class NoCache(torch.nn.Module):
    """Hides the KV cache, forcing sample_continuations onto its full-recompute path."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, input_ids, **kw):
        return SimpleNamespace(logits=self.inner(input_ids=input_ids).logits, past_key_values=None)


def test_sampling_is_deterministic_and_masks_the_generated_positions(stories_lm):
    prompts = stories_lm.windows[:5, :6]
    windows, mask = sample_continuations(stories_lm.model, prompts, 12, seed=3, batch_size=2)
    again, _ = sample_continuations(stories_lm.model, prompts, 12, seed=3, batch_size=2)
    other, _ = sample_continuations(stories_lm.model, prompts, 12, seed=4, batch_size=2)
    assert windows.shape == (5, 18) and mask.shape == (5, 17)
    assert torch.equal(windows, again) and not torch.equal(windows, other)
    assert torch.equal(windows[:, :6], prompts)
    expected = torch.tensor([[t >= 5 for t in range(17)]] * 5)  # position t predicts token t+1
    assert torch.equal(mask, expected) and torch.all(mask.sum(1) == 12)


def test_kv_cache_sampling_equals_full_recompute(stories_lm):
    prompts = stories_lm.windows[:4, :5]
    cached, _ = sample_continuations(stories_lm.model, prompts, 10, seed=11)
    recomputed, _ = sample_continuations(NoCache(stories_lm.model), prompts, 10, seed=11)
    assert torch.equal(cached, recomputed)


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_first_sampled_token_follows_tempered_reference(stories_lm, temperature):
    prompt = torch.tensor(stories_lm.tokenizer("Lily").input_ids)
    n = 4000
    windows, _ = sample_continuations(stories_lm.model, prompt.expand(n, -1), 1, temperature=temperature,
                                      seed=0, batch_size=n)
    with torch.no_grad():
        p = torch.softmax(stories_lm.model(input_ids=prompt[None]).logits[0, -1].double() / temperature, -1)
    freq = torch.bincount(windows[:, -1], minlength=p.numel()).double() / n
    sd = torch.sqrt(p * (1 - p) / n)
    likely = p > 0.005
    assert torch.all((freq - p).abs()[likely] < 5 * sd[likely] + 1e-9)


def test_on_policy_ear_of_model_with_itself_is_one(stories_lm, perturbed):
    prompts = stories_lm.windows[:4, :6]
    same = on_policy_ear(stories_lm.model, stories_lm.model, prompts, 10, seed=2, progress=False, n_boot=100)
    assert same.ear == 1.0 and same.kl_pq_mean == 0.0 and same.n_tokens == 40
    other = on_policy_ear(stories_lm.model, perturbed, prompts, 10, seed=2, progress=False, n_boot=100)
    windows, mask = sample_continuations(stories_lm.model, prompts, 10, seed=2)
    want = full_logit_oracle(stories_lm.model, perturbed, windows, mask)
    assert other.ear < 1.0 and other.ear == pytest.approx(want["ear"].mean(), abs=1e-6)


def test_sampling_uses_the_kv_cache(stories_dir):
    """After the prompt every step feeds one token (an O(n^2) re-run would feed the whole sequence),
    and the tokens equal those of a model that is always re-run on the whole sequence."""
    from slq.measure.fidelity import sample_continuations
    from slq.models.sources import load_model

    model, _ = load_model(stories_dir)
    lengths = []
    handle = model.register_forward_pre_hook(lambda m, a, k: lengths.append(k["input_ids"].shape[1]), with_kwargs=True)
    prompts = torch.randint(0, 500, (3, 5), generator=torch.Generator().manual_seed(0))
    windows, _ = sample_continuations(model, prompts, 20)
    handle.remove()
    assert lengths[0] == 5 and set(lengths[1:]) == {1}

    class NoCache(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, **_):
            return type("Out", (), {"logits": self.m(input_ids=input_ids, use_cache=False).logits})()

    again, _ = sample_continuations(NoCache(model), prompts, 20)
    assert torch.equal(windows, again)
