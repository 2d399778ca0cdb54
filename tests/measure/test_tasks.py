"""Zero-shot tasks: readers, batched scorer vs unbatched float64 oracle, paired statistics."""

from __future__ import annotations

import bz2
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from slq.util.errors import SlqError
from slq.measure.tasks import (
    TASKS,
    Item,
    Request,
    TaskResult,
    bootstrap_deltas,
    compare_tasks,
    default_task_dir,
    lm_eval_adapter,
    load_task,
    run_tasks,
    score_task,
)

SHARED = Path(__file__).resolve().parents[2].parent / "shared"
TASK_DIR = SHARED / "data" / "tasks"
MODEL_DIR = SHARED / "models" / "stories260K"
README_COUNTS = {
    "piqa": 1838, "arc_easy": 2376, "arc_challenge": 1172, "winogrande": 1267,
    "boolq": 3270, "lambada": 5153, "hellaswag": 10042,
}

needs_tasks = pytest.mark.skipif(not TASK_DIR.is_dir(), reason=f"offline task files not found at {TASK_DIR}")
needs_model = pytest.mark.skipif(not MODEL_DIR.is_dir(), reason=f"stories260K not found at {MODEL_DIR}")


@pytest.fixture(scope="module")
def stories():
    """(model, tokenizer) of stories260K, on one CPU thread (the machine's cores are shared)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR).eval()
    yield model, AutoTokenizer.from_pretrained(MODEL_DIR)
    torch.set_num_threads(threads)


def oracle_request(model, tokenizer, request: Request, max_length: int | None = None):
    """(log-likelihood, greedy match, n continuation tokens) from ONE unbatched forward in float64.

    Tokenizes with the tokenizer's own special tokens (its BOS), independent of the scorer's prefix.
    """
    context, continuation = request
    n_ws = len(context) - len(context.rstrip())
    if n_ws:
        context, continuation = context[:-n_ws], context[-n_ws:] + continuation
    ctx = tokenizer(context).input_ids
    cont = tokenizer(context + continuation).input_ids[len(ctx):]
    full = (ctx + cont)[-(max_length + 1):] if max_length else ctx + cont
    with torch.no_grad():
        logp = model(torch.tensor([full])).logits[0].double().log_softmax(-1)
    positions = range(len(full) - len(cont), len(full))
    ll = sum(float(logp[p - 1, full[p]]) for p in positions)
    greedy = all(int(logp[p - 1].argmax()) == full[p] for p in positions)
    return ll, greedy, len(cont)


def synthetic_result(name: str, correct: np.ndarray) -> TaskResult:
    correct = np.asarray(correct, bool)
    return TaskResult(name, len(correct), {"acc": float(correct.mean())}, {"acc": correct})


def paired(n_both: int, n_ref_only: int, n_cand_only: int, n_neither: int) -> tuple[np.ndarray, np.ndarray]:
    ref = np.repeat([True, True, False, False], [n_both, n_ref_only, n_cand_only, n_neither])
    cand = np.repeat([True, False, True, False], [n_both, n_ref_only, n_cand_only, n_neither])
    return ref, cand


# ----------------------------------------------------------------------------- readers


@needs_tasks
@pytest.mark.parametrize("name", list(README_COUNTS))
def test_reader_parses_every_item_with_readme_count(name):
    items = load_task(name, TASK_DIR)
    assert len(items) == README_COUNTS[name]
    for item in items:
        assert 0 <= item.gold < len(item.requests)
        assert all(r.context and r.continuation.startswith(" ") and r.continuation.strip() for r in item.requests)
    n_choices = {len(item.requests) for item in items}
    expected = {"lambada": {1}, "piqa": {2}, "boolq": {2}, "winogrande": {2}, "hellaswag": {4}}
    assert n_choices == expected.get(name, {4})


@needs_tasks
@pytest.mark.parametrize("name", ["hellaswag", "winogrande"])
def test_limit_takes_the_first_items_in_file_order(name):
    assert load_task(name, TASK_DIR, limit=5) == load_task(name, TASK_DIR)[:5]
    assert load_task(name, TASK_DIR, limit=0) == []


def test_readers_build_prompts_from_synthetic_files(tmp_path):
    (tmp_path / "piqa.jsonl").write_text(
        json.dumps({"query": "Question: q?\n", "choices": ["a", "b"], "gold": 1}) + "\n"
    )
    (tmp_path / "winogrande.jsonl").write_text(
        json.dumps({"context_options": ["A so A", "A so B"], "continuation": "won.", "gold": 0}) + "\n"
    )
    lines = ["ctx one", "2", "e0", "e1", "e2", "e3", "ctx two", "0", "f0", "f1", "f2", "f3"]
    with bz2.open(tmp_path / "hellaswag_val_full.txt.bz2", "wt", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    assert load_task("piqa", tmp_path) == [Item((Request("Question: q?\nAnswer:", " a"), Request("Question: q?\nAnswer:", " b")), 1)]
    assert load_task("winogrande", tmp_path)[0].requests == (Request("A so A", " won."), Request("A so B", " won."))
    hs = load_task("hellaswag", tmp_path)
    assert [it.gold for it in hs] == [2, 0]
    assert hs[1].requests[3] == Request("ctx two", " f3")


def test_task_dir_comes_from_env_and_bad_names_fail(tmp_path, monkeypatch):
    monkeypatch.setenv("SLQ_TASK_DIR", str(tmp_path))
    assert default_task_dir() == tmp_path
    with pytest.raises(SlqError, match="not found"):
        load_task("piqa")
    with pytest.raises(SlqError, match="unknown task"):
        load_task("mmlu", tmp_path)


# ----------------------------------------------------------------------------- scorer vs oracle


@needs_tasks
@needs_model
@pytest.mark.parametrize(
    "name,limit", [("piqa", 3), ("arc_easy", 2), ("arc_challenge", 2), ("boolq", 2), ("winogrande", 3), ("hellaswag", 3)]
)
def test_batched_loglikelihoods_match_unbatched_float64_oracle(stories, name, limit):
    model, tok = stories
    items = load_task(name, TASK_DIR, limit=limit)
    result = score_task(model, tok, name, items, batch_size=3, progress=False)  # batches mix lengths
    for i, item in enumerate(items):
        oracle = [oracle_request(model, tok, r) for r in item.requests]
        ll = np.array([o[0] for o in oracle])
        np.testing.assert_allclose(result.loglikelihoods[i], ll, atol=1e-4, rtol=0)
        assert list(result.token_counts[i]) == [o[2] for o in oracle]
        assert result.correct["acc"][i] == (np.argmax(ll) == item.gold)
        chars = np.array([len(r.continuation) for r in item.requests])
        assert result.correct["acc_norm"][i] == (np.argmax(ll / chars) == item.gold)
    assert result.n == limit and result.acc == pytest.approx(result.correct["acc"].mean())


@needs_tasks
@needs_model
def test_left_truncation_matches_oracle_on_the_last_window(stories):
    model, tok = stories
    items = load_task("arc_easy", TASK_DIR, limit=2)
    short = score_task(model, tok, "arc_easy", items, batch_size=8, progress=False, max_length=48)
    full = score_task(model, tok, "arc_easy", items, batch_size=8, progress=False)
    for i, item in enumerate(items):
        ll = [oracle_request(model, tok, r, max_length=48)[0] for r in item.requests]
        np.testing.assert_allclose(short.loglikelihoods[i], ll, atol=1e-4, rtol=0)
    assert not np.allclose(np.concatenate(short.loglikelihoods), np.concatenate(full.loglikelihoods), atol=1e-3)


@needs_model
def test_trailing_context_whitespace_moves_onto_the_continuation(stories):
    model, tok = stories
    a = Item((Request("Once upon a time, there was a little ", "girl named Lily."),), 0)
    b = Item((Request("Once upon a time, there was a little", " girl named Lily."),), 0)
    ra, rb = (score_task(model, tok, "lambada", [x], progress=False) for x in (a, b))
    np.testing.assert_allclose(ra.loglikelihoods[0], rb.loglikelihoods[0], atol=1e-6, rtol=0)


@needs_tasks
@needs_model
def test_lambada_greedy_match_and_perplexity_match_oracle(stories):
    model, tok = stories
    story = "Once upon a time, there was a little girl named"
    synthetic = [Item((Request(story, " Lily. She loved to play"),), 0), Item((Request(story, " Lily. She loved to draw"),), 0)]
    items = load_task("lambada", TASK_DIR, limit=3) + synthetic
    result = score_task(model, tok, "lambada", items, batch_size=2, progress=False)
    oracle = [oracle_request(model, tok, item.requests[0]) for item in items]
    assert [o[1] for o in oracle[-2:]] == [True, False]  # teeth: a full match, and one whose only miss is its 7th of 10 tokens
    assert list(result.correct["acc"]) == [o[1] for o in oracle]
    np.testing.assert_allclose([x[0] for x in result.loglikelihoods], [o[0] for o in oracle], atol=1e-4, rtol=0)
    nll, tokens = -sum(o[0] for o in oracle), sum(o[2] for o in oracle)
    # compare logs: exp() turns float32 forward noise (~1e-6 nats) into large absolute differences
    assert math.log(result.metrics["ppl"]) == pytest.approx(nll / tokens, abs=1e-4)
    assert math.log(result.metrics["ppl_item"]) == pytest.approx(nll / len(items), abs=1e-4)


@needs_tasks
@needs_model
def test_run_tasks_on_identical_models_is_lossless(stories):
    model, tok = stories
    out = run_tasks(model, model, tok, ["winogrande", "hellaswag"], limit=4, data_dir=TASK_DIR, progress=False)
    assert out["hellaswag"]["metric"] == "acc_norm"
    for key in ("winogrande", "hellaswag", "average"):
        assert out[key]["delta"] == 0 and out[key]["p_value"] == 1 and out[key]["lossless"]
    json.dumps(out)


# ----------------------------------------------------------------------------- paired statistics


def brute_force_mcnemar(b: int, c: int) -> float:
    """Two-sided exact binomial p at 1/2: total mass of outcomes no more likely than the observed one."""
    n = b + c
    return sum(math.comb(n, k) for k in range(n + 1) if math.comb(n, k) <= math.comb(n, b)) / 2**n


@settings(max_examples=40, deadline=None)
@given(b=st.integers(0, 60), c=st.integers(0, 60))
def test_mcnemar_p_value_equals_brute_force_binomial_sum(b, c):
    ref, cand = paired(7, b, c, 5)
    out = compare_tasks({"t": synthetic_result("t", ref)}, {"t": synthetic_result("t", cand)}, n_boot=10)
    assert out["t"]["p_value"] == pytest.approx(brute_force_mcnemar(b, c), rel=1e-9, abs=1e-300)


def test_multinomial_bootstrap_matches_index_resampling():
    rng = np.random.default_rng(1)
    ref, cand = rng.random(300) < 0.6, rng.random(300) < 0.55
    fast = bootstrap_deltas(ref, cand, 20_000, np.random.default_rng(2))
    idx = np.random.default_rng(3).integers(0, 300, size=(20_000, 300))
    slow = cand[idx].mean(1) - ref[idx].mean(1)
    assert fast.std() == pytest.approx(slow.std(), rel=0.05)
    np.testing.assert_allclose(np.quantile(fast, [0.025, 0.5, 0.975]), np.quantile(slow, [0.025, 0.5, 0.975]), atol=0.0075)


def test_bootstrap_interval_covers_true_delta_at_nominal_rate():
    p = np.array([0.50, 0.08, 0.05, 0.37])  # (both right, ref only, cand only, neither): strong pairing
    true_delta = p[2] - p[1]
    rng, hits, n_rep = np.random.default_rng(0), 0, 300
    for rep in range(n_rep):
        ref, cand = paired(*rng.multinomial(300, p))
        out = compare_tasks({"t": synthetic_result("t", ref)}, {"t": synthetic_result("t", cand)}, n_boot=1000, seed=rep)
        lo, hi = out["t"]["ci95"]
        hits += lo <= true_delta <= hi
    assert 0.90 <= hits / n_rep <= 0.985  # an unpaired bootstrap would cover ~100%


def test_identical_predictions_are_lossless():
    ref, _ = paired(60, 0, 0, 40)
    out = compare_tasks({"t": synthetic_result("t", ref)}, {"t": synthetic_result("t", ref.copy())})
    assert out["t"]["delta"] == 0 and out["t"]["p_value"] == 1 and out["t"]["ci95"] == [0, 0] and out["t"]["lossless"]
    assert out["t"]["se_reference"] == pytest.approx(math.sqrt(0.6 * 0.4 / 100))


def test_flipping_ten_percent_to_wrong_is_not_lossless():
    ref, cand = paired(500, 100, 0, 400)
    out = compare_tasks({"t": synthetic_result("t", ref)}, {"t": synthetic_result("t", cand)})["t"]
    assert out["delta"] == pytest.approx(-0.1) and out["p_value"] < 1e-20
    assert out["ci95"][1] < 0 and not out["lossless"]


def test_tolerance_rejects_an_insignificant_but_large_delta():
    ref, cand = paired(20, 3, 1, 26)  # delta = -0.04, CI contains 0
    args = ({"t": synthetic_result("t", ref)}, {"t": synthetic_result("t", cand)})
    assert compare_tasks(*args)["t"]["ci95"][0] < 0 < compare_tasks(*args)["t"]["ci95"][1]
    assert not compare_tasks(*args, tolerance=0.01)["t"]["lossless"]
    assert compare_tasks(*args, tolerance=0.05)["t"]["lossless"]


def test_average_resamples_within_tasks_and_pools_discordant_pairs():
    same, _ = paired(30, 0, 0, 20)
    ref, cand = paired(200, 30, 10, 160)
    refs = {"same": synthetic_result("same", same), "diff": synthetic_result("diff", ref)}
    cands = {"same": synthetic_result("same", same), "diff": synthetic_result("diff", cand)}
    out = compare_tasks(refs, cands, seed=4)
    alone = compare_tasks({"diff": refs["diff"]}, {"diff": cands["diff"]}, seed=4)["diff"]
    avg = out["average"]
    assert avg["delta"] == pytest.approx(alone["delta"] / 2)
    np.testing.assert_allclose(avg["ci95"], np.array(alone["ci95"]) / 2)  # the null task adds exact zeros
    assert avg["p_value"] == pytest.approx(alone["p_value"]) and avg["n"] == 450


def test_different_item_sets_are_refused():
    a, b = synthetic_result("t", np.ones(10)), synthetic_result("t", np.ones(11))
    with pytest.raises(SlqError, match="different items"):
        compare_tasks({"t": a}, {"t": b})


def test_lm_eval_adapter_fails_clearly_without_lm_eval(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(SlqError, match="lm-eval is not installed"):
        lm_eval_adapter(None, None, ["piqa"])


def test_registry_names():
    assert set(TASKS) == set(README_COUNTS)
