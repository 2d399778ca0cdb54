"""Verdicts say only what the interval supports: task verdicts (lossless / not lossless / undetermined),
the EAR verdict against a target, and lm-eval's per-item results feeding the same paired test."""

import numpy as np
import pytest

from slq.measure.evaluate import MIN_SEQUENCES, ear_verdict, few_sequences_warning
from slq.measure.tasks import TaskResult, compare_tasks, lm_eval_samples_to_result, task_verdict


def _result(name, correct):
    c = np.asarray(correct, bool)
    return TaskResult(name, len(c), {"acc": float(c.mean())}, {"acc": c})


def _paired(n_both, n_ref_only, n_cand_only, n_neither):
    ref = [1] * n_both + [1] * n_ref_only + [0] * n_cand_only + [0] * n_neither
    cand = [1] * n_both + [0] * n_ref_only + [1] * n_cand_only + [0] * n_neither
    return np.array(ref, bool), np.array(cand, bool)


def test_four_points_up_at_n50_is_undetermined_not_a_loss():
    """The issue's case: +4 points on 50 items. The interval reaches past the tolerance on both sides of 0."""
    ref, cand = _paired(20, 3, 5, 22)  # delta = +2/50 = +0.04
    out = compare_tasks({"t": _result("t", ref)}, {"t": _result("t", cand)})["t"]
    lo, hi = out["ci95"]
    assert out["delta"] == pytest.approx(0.04) and lo < -0.01 and hi > 0.01
    assert out["verdict"] == "undetermined" and not out["lossless"]


def test_identical_is_lossless_and_a_significant_drop_is_not():
    ref, _ = _paired(60, 0, 0, 40)
    assert compare_tasks({"t": _result("t", ref)}, {"t": _result("t", ref)})["t"]["verdict"] == "lossless"
    ref, cand = _paired(500, 100, 0, 400)
    out = compare_tasks({"t": _result("t", ref)}, {"t": _result("t", cand)})["t"]
    assert out["ci95"][1] < 0 and out["verdict"] == "not lossless"


@pytest.mark.parametrize("delta, ci, tol, verdict", [
    (0.0, [-0.02, 0.02], 0.01, "undetermined"),     # wide on both sides: the boolean says yes, the verdict not
    (0.0, [-0.005, 0.02], 0.01, "lossless"),        # one side within the tolerance
    (-0.004, [-0.008, 0.0], 0.01, "lossless"),      # 0 is on the interval's edge: inside
    (-0.03, [-0.08, 0.005], 0.01, "undetermined"),  # beyond the tolerance but not significant
    (-0.002, [-0.004, -0.001], 0.01, "not lossless"),  # significant, however small
    (0.05, [0.01, 0.09], 0.01, "not lossless"),     # a significant gain is a change too
])
def test_task_verdict_rule(delta, ci, tol, verdict):
    assert task_verdict(delta, ci, tol) == verdict


def test_ear_verdict_from_the_interval():
    assert ear_verdict((0.991, 0.995), 0.99) == "pass"
    assert ear_verdict((0.990, 0.995), 0.99) == "pass"  # the bound itself meets the target
    assert ear_verdict((0.980, 0.989), 0.99) == "fail"
    assert ear_verdict((0.985, 0.995), 0.99) == "undetermined"
    assert few_sequences_warning(MIN_SEQUENCES) is None
    assert "fewer than 16" in few_sequences_warning(4)


def test_lm_eval_samples_feed_the_same_paired_test():
    """lm-eval's logged samples (shuffled, floats) give the same per-item vectors and the same comparison
    as the built-in result with those vectors."""
    rng = np.random.default_rng(0)
    ref, cand = _paired(30, 6, 2, 12)
    order = rng.permutation(len(ref))

    def samples(v):
        return [{"doc_id": int(i), "acc": float(v[i]), "acc_norm": float(v[i]), "prompt_hash": f"h{i}"} for i in order]

    r = lm_eval_samples_to_result("piqa", samples(ref), "acc")
    c = lm_eval_samples_to_result("piqa", samples(cand), "acc")
    assert np.array_equal(r.correct["acc"], ref) and r.n == len(ref) and r.metric == "acc"
    got = compare_tasks({"piqa": r}, {"piqa": c})["piqa"]
    want = compare_tasks({"piqa": _result("piqa", ref)}, {"piqa": _result("piqa", cand)})["piqa"]
    assert got == want
    other = [dict(s, prompt_hash="x") for s in samples(cand)]  # other prompts: refused
    with pytest.raises(Exception, match="different items"):
        compare_tasks({"piqa": r}, {"piqa": lm_eval_samples_to_result("piqa", other, "acc")})
