"""Speculative decoding against its oracles: the target's own greedy ``model.generate`` (token for token),
the target's exact next-token distributions enumerated by plain forwards (the sampled output's law),
and a fresh prefill on the accepted prefix (the rolled-back caches).

The statistical test (:func:`_chi2_pvalues`): N seeded generations of 3 new tokens from a tiny-vocab
(V = 16) random Llama whose draft is a perturbed copy (acceptance ~0.73, so rejections, resampling,
bonus tokens and the batch's keep-the-minimum rule all occur). Per generated position j = 2, 3 (the
first token comes from the prefill, not from a round) a chi-square goodness-of-fit test against the
exact marginal ``P(y_j) = sum over y_<j of prod p(y_i | y_<i)``, cells with expected count < 5 pooled,
rejecting at p < 1e-3 per position.

Power: with df = cells - 1 <= 15 and N samples the test rejects, with probability >= 0.9, any output
law whose chi-square divergence from the target's, ``sum (p' - p)^2 / p``, is at least lambda / N,
where lambda is the noncentrality at which the noncentral chi-square exceeds the 1e-3 critical value
with probability 0.9: lambda = 39.6 at df 15 (smaller for fewer cells, so 39.6 bounds it). The fast
test (N = 2000) thus detects a divergence of 0.020, e.g. probability 0.025 moved from one token of
probability 1/16 to another (TV 0.025); the slow one (N = 8000) 0.005 (TV 0.012 the same way).
``test_power_*`` computes lambda, checks that the "accept always" rule's exact law (the draft's;
divergence 0.34 and 0.09 at positions 2 and 3) is far beyond lambda / N, and that the test rejects it.
"""

from __future__ import annotations

import copy

import pytest
import torch

from slq.runtime import speculative as sp
from slq.runtime.decode import DecodeEngine
from slq.util.errors import SlqError
from conftest import equal_length_ids, hf_greedy

PROMPTS = ["Once upon a time", "The little dog", "Lily went to the park"]
ALPHA = 1e-3




def _tiny(seed=0, vocab=256, layers=2):
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                      initializer_range=0.2)
    torch.manual_seed(seed)
    m = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "norm" in n:
                p.add_(0.3 * torch.randn_like(p))
    return m


def _perturbed(model, scale, seed=1):
    """A copy of ``model`` with Gaussian noise of ``scale`` x each weight's std added (a stand-in draft)."""
    d = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in d.parameters():
            p.add_(scale * p.std() * torch.randn(p.shape, generator=g))
    return d


@pytest.fixture(scope="module")
def stories_q4(stories_dir, tmp_path_factory):
    """A 4-bit RTN checkpoint of stories260K written by slq.quantize."""
    import slq

    out = tmp_path_factory.mktemp("spec") / "q4"
    slq.quantize(str(stories_dir), method="rtn", bits=4, out=out, progress=False)
    return out


@pytest.fixture(scope="module")
def stories_pair(stories_dir, stories_q4):
    """(target, the 4-bit RTN draft loaded through slq.load, tokenizer)."""
    import slq
    from slq.models.sources import load_model

    target, tok = load_model(stories_dir)
    return target, slq.load(stories_q4), tok


# ----------------------------------------------------------------------------- greedy exactness


@pytest.mark.parametrize("k, engine_kw", [(4, {}), (1, {}), ("auto", {}), (6, {"kv_block": 8, "fuse": True})],
                         ids=["k4", "k1", "auto", "k6-windowed-fused"])
def test_greedy_equals_the_targets_own_greedy_generate(stories_pair, k, engine_kw):
    target, draft, tok = stories_pair
    for prompt in PROMPTS:
        ids = tok(prompt, return_tensors="pt").input_ids
        ref = hf_greedy(target, ids, 40)
        out, rep = sp.generate(target, draft, ids, k=k, max_new_tokens=40, engine_kw=engine_kw)
        assert torch.equal(out, ref), (tok.decode(out[0]), tok.decode(ref[0]))
        assert 0 < rep.acceptance_rate < 1 and rep.rounds > 0  # the quantized draft is good, not perfect
        assert rep.tokens_per_target_forward > 1.5


@pytest.mark.slow
def test_compiled_draft_and_verify_steps_equal_hf_generate(stories_pair):
    """Both engines with ``compile`` (aot_eager on CPU: the fullgraph compiled step and multi-token forward)."""
    target, draft, tok = stories_pair
    ids = tok(PROMPTS[0], return_tensors="pt").input_ids
    out, _ = sp.generate(target, draft, ids, k=4, max_new_tokens=40, engine_kw={"compile": "aot_eager"})
    assert torch.equal(out, hf_greedy(target, ids, 40))


def test_greedy_batch_with_eos_equals_hf_batch_generate(stories_pair):
    """Rows accept different counts and stop at different steps; the output equals transformers' batch."""
    target, draft, tok = stories_pair
    ids = equal_length_ids(tok, PROMPTS + ["Tom had a red ball"])
    dot = tok.convert_tokens_to_ids(".")
    ref = hf_greedy(target, ids, 40, eos_token_id=dot, pad_token_id=0)
    out, rep = sp.generate(target, draft, ids, k=5, max_new_tokens=40, eos_token_id=dot, pad_token_id=0)
    assert torch.equal(out, ref)
    assert rep.batch == 4 and rep.rounds > 0


def test_greedy_tiny_random_llama_pair_equals_hf_generate():
    """A draft that is a different random model (low acceptance: nearly every round rejects at once)."""
    target, draft = _tiny(0), _tiny(7)
    ids = torch.randint(3, 256, (2, 6), generator=torch.Generator().manual_seed(1))
    ref = hf_greedy(target, ids, 24, eos_token_id=None, pad_token_id=0)
    out, rep = sp.generate(target, draft, ids, k=3, max_new_tokens=24, eos_token_id=None)
    assert torch.equal(out, ref)
    near, _ = sp.generate(target, _perturbed(target, 0.05), ids, k=3, max_new_tokens=24, eos_token_id=None)
    assert torch.equal(near, ref)


# ----------------------------------------------------------------------------- rollback


@pytest.mark.parametrize("temperature", [0.0, 1.0], ids=["greedy", "sampled"])
def test_rollback_caches_equal_a_fresh_prefill_on_the_accepted_prefix(stories_pair, temperature):
    """After a round that rejected, each engine's cache at positions [0, its position) equals the cache a
    fresh engine fills from the accepted sequence alone, and its position is that sequence's length."""
    target, draft, tok = stories_pair
    ids = tok(PROMPTS[1], return_tensors="pt").input_ids.repeat(2, 1)
    tgt, dft = DecodeEngine(target), DecodeEngine(draft)
    spec = sp.Speculator(tgt, dft, k=6, temperature=temperature, seed=0)
    with torch.inference_mode():
        spec.start(ids, 60)
        rejected = 0
        for _ in range(12):
            if spec.round().shape[1] < 7:  # fewer than k + 1 tokens: this round rejected
                rejected += 1
                break
        assert rejected, "no rejection in 12 rounds"
        seq = spec.sequence()
        P = spec.P
        assert seq.shape[1] == P + 1 and int(tgt.pos) == P  # the last token is not yet in the cache
        for eng, model, n in ((tgt, target, P), (dft, draft, spec.draft_position())):
            fresh = DecodeEngine(model)
            fresh.allocate(2, n + 1)
            fresh.prefill(seq[:, :n])
            torch.testing.assert_close(eng.kv[..., :n, :], fresh.kv[..., :n, :], rtol=1e-4, atol=1e-5)
        # and decoding goes on from the rolled-back caches as from the fresh ones
        nxt = spec.round()
    full, _ = sp.generate(target, draft, ids, k=6, temperature=temperature, seed=0, max_new_tokens=seq.shape[1]
                          - ids.shape[1] + nxt.shape[1], eos_token_id=None)
    assert torch.equal(full, torch.cat([seq, nxt], 1))  # same seed, same tokens, without the inspection
    if temperature == 0:
        assert torch.equal(full, hf_greedy(target, ids, full.shape[1] - ids.shape[1], eos_token_id=None, pad_token_id=0))


def test_multi_token_forward_equals_single_steps(stories):
    """decode_tokens (T tokens in one forward) gives the logits and cache of T decode_one_token steps."""
    model, tok = stories
    ids = tok(PROMPTS[0], return_tensors="pt").input_ids
    nxt = torch.tensor([[5, 77, 300, 12, 9]])
    with torch.inference_mode():
        for kw in ({}, {"kv_block": 8}):
            a, b = DecodeEngine(model, **kw), DecodeEngine(model, **kw)
            for e in (a, b):
                e.allocate(1, 20)
                e.prefill(ids)
                e.set_position(ids.shape[1])
            buf, _ = a.token_buffers(5)
            buf.copy_(nxt)
            multi = a.forward_tokens(5, ids.shape[1]).clone()
            for i in range(5):
                b.ids.copy_(nxt[:, i:i + 1])
                b.step(ids.shape[1] + i)
                torch.testing.assert_close(multi[:, i], b.logits, rtol=1e-4, atol=1e-5)
            n = ids.shape[1] + 5
            torch.testing.assert_close(a.kv[..., :n, :], b.kv[..., :n, :], rtol=1e-4, atol=1e-5)
            assert int(a.pos) == ids.shape[1] and int(b.pos) == n  # the multi-token forward leaves pos alone


# ----------------------------------------------------------------------------- the sampled distribution


@pytest.fixture(scope="module")
def tiny_vocab_pair():
    torch.manual_seed(0)
    target = _tiny(3, vocab=16, layers=1)
    draft = _perturbed(target, 0.15, seed=5)
    return target, draft, torch.tensor([[3, 9, 1]])


def _exact_marginals(model, prompt, n, temperature=1.0, top_p=1.0):
    """P(y_j) for j = 1..n by enumerating every continuation with plain full forwards (V^(n-1) rows)."""
    V = model.config.vocab_size
    with torch.no_grad():
        seqs, w = prompt.clone(), torch.ones(1)
        marg = []
        for _ in range(n):
            p = sp.warp(model(seqs).logits[:, -1], temperature, top_p)  # [rows, V]
            joint = w[:, None] * p
            marg.append(joint.sum(0))
            seqs = torch.cat([seqs.repeat_interleave(V, 0), torch.arange(V).repeat(seqs.shape[0])[:, None]], 1)
            w = joint.reshape(-1)
    return marg


def _generate_many(target, draft, prompt, n_calls, rows, temperature=1.0, top_p=1.0, k=2):
    tgt, dft = DecodeEngine(target), DecodeEngine(draft)
    outs, acc = [], []
    for s in range(n_calls):
        out, rep = sp.generate(tgt, dft, prompt.repeat(rows, 1), k=k, temperature=temperature, top_p=top_p, seed=s,
                               max_new_tokens=3, eos_token_id=None)
        outs.append(out[:, prompt.shape[1]:])
        acc.append(rep.acceptance_rate)
    return torch.cat(outs), sum(acc) / len(acc)


def _chi2_pvalues(samples, marginals):
    """Per position: the chi-square goodness-of-fit p-value, cells of expected count < 5 pooled."""
    from scipy.stats import chi2

    N = samples.shape[0]
    ps = []
    for j, p in enumerate(marginals):
        obs = torch.bincount(samples[:, j], minlength=p.numel()).double()
        exp = N * p.double()
        small = exp < 5
        if small.any():
            obs = torch.cat([obs[~small], obs[small].sum()[None]])
            exp = torch.cat([exp[~small], exp[small].sum()[None]])
        stat = float(((obs - exp) ** 2 / exp.clamp_min(1e-12)).sum())
        ps.append(float(chi2.sf(stat, len(obs) - 1)))
    return ps


def test_sampled_tokens_follow_the_targets_distribution(tiny_vocab_pair):
    """Fast version: N = 2000 (500 calls x 4 rows), positions 2 and 3; see the module docstring for the power."""
    target, draft, prompt = tiny_vocab_pair
    samples, a = _generate_many(target, draft, prompt, 500, 4)
    marg = _exact_marginals(target, prompt, 3)
    assert 0.6 < a < 0.9  # rejections and acceptances both frequent
    ps = _chi2_pvalues(samples, marg)
    assert min(ps[1:]) > ALPHA, ps


def test_power_the_statistical_test_rejects_a_broken_acceptance_rule(tiny_vocab_pair, monkeypatch):
    """With acceptance forced to 1 the output follows the draft; the same test, same N, rejects it; and
    lambda of the docstring is what scipy computes."""
    from scipy.stats import chi2, ncx2

    target, draft, prompt = tiny_vocab_pair
    N = 2000
    crit = chi2.isf(ALPHA, 15)
    lam = next(x / 100 for x in range(1, 10000) if ncx2.sf(crit, 15, x / 100) >= 0.9)
    assert abs(lam - 39.6) < 0.01
    exact, broken = _exact_marginals(target, prompt, 3), _exact_marginals(draft, prompt, 3)
    div = [float(((b - p) ** 2 / p).sum()) for p, b in zip(exact, broken)][1:]
    assert min(div) > 4 * lam / N, div  # the broken law is far inside the region of power >= 0.9
    monkeypatch.setattr(sp, "accept_mask", lambda p_x, q_x, u: torch.ones_like(u, dtype=torch.bool))
    samples, a = _generate_many(target, draft, prompt, N // 4, 4)
    assert a == 1.0
    ps = _chi2_pvalues(samples, exact)
    assert max(ps[1:]) < ALPHA, ps  # rejected at both positions


@pytest.mark.slow
@pytest.mark.parametrize("temperature, top_p, k", [(1.0, 1.0, 3), (0.7, 0.8, 2)])
def test_sampled_tokens_follow_the_targets_distribution_large_n(tiny_vocab_pair, temperature, top_p, k):
    """N = 8000 (2000 calls x 4 rows); with temperature and top-p warping both p and q."""
    target, draft, prompt = tiny_vocab_pair
    samples, _ = _generate_many(target, draft, prompt, 2000, 4, temperature, top_p, k)
    ps = _chi2_pvalues(samples, _exact_marginals(target, prompt, 3, temperature, top_p))
    assert min(ps) > ALPHA, ps


# ----------------------------------------------------------------------------- cost model and errors


def test_cost_model():
    for a in (0.0, 0.5, 0.9, 0.999):
        for k in (1, 4, 8):
            assert sp.expected_tokens(a, k) == pytest.approx(sum(a ** j for j in range(k + 1)))
    assert sp.expected_tokens(1.0, 8) == 9
    flat = lambda T: 1.0  # noqa: E731  (a GPU-like verify: T tokens cost one)
    assert sp.choose_k(0.0, 0.01, flat, 16) == 1  # nothing is accepted: propose as little as possible
    assert sp.choose_k(0.999, 0.01, flat, 16) == 16  # almost everything is: as much as allowed
    k = sp.choose_k(0.8, 0.1, flat, 16)  # interior optimum, brute force over k
    assert k == max(range(1, 17), key=lambda j: sp.expected_tokens(0.8, j) / (0.1 * j + 1.0)) and 1 < k < 16
    pr = sp.predict(0.9, 8, 0.1, 1.0)
    assert pr["tokens_per_s"] == pytest.approx(sp.expected_tokens(0.9, 8) / 1.8)


def test_warp_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    torch.testing.assert_close(sp.warp(logits, 1.0, 0.8), torch.tensor([[0.625, 0.375, 0.0, 0.0]]))
    torch.testing.assert_close(sp.warp(logits, 1.0, 0.81), torch.tensor([[0.5, 0.3, 0.15, 0.0]]) / 0.95)
    torch.testing.assert_close(sp.warp(logits, 1.0, 0.1), torch.tensor([[1.0, 0.0, 0.0, 0.0]]))


def test_bad_input_gives_one_line_errors():
    target = _tiny(0, vocab=64, layers=1)
    ids = torch.ones(1, 3, dtype=torch.long)
    for kw, msg in [({"k": 0}, "k must be"), ({"k": "fast"}, "k must be"), ({"temperature": -1}, "temperature"),
                    ({"top_p": 0}, "top_p"), ({"max_new_tokens": 0}, "max_new_tokens")]:
        with pytest.raises(SlqError, match=msg) as e:
            sp.generate(target, target, ids, **kw)
        assert "\n" not in str(e.value)
    with pytest.raises(SlqError, match="share a vocabulary"):
        sp.generate(target, _tiny(0, vocab=32, layers=1), ids)


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_cuda_graph_speculative_greedy_equals_hf_generate(stories_dir, stories_q4):
    """Draft steps and (k+1)-token verify forwards replayed from CUDA graphs (fp32 model, so no near-ties)."""
    import slq
    from slq.models.sources import load_model

    target, tok = load_model(stories_dir, device="cuda")
    draft = slq.load(stories_q4, device="cuda", backend="reference")
    tgt, dft = DecodeEngine(target), DecodeEngine(draft)
    assert tgt.cuda_graph and dft.cuda_graph
    for prompt in PROMPTS:
        ids = tok(prompt, return_tensors="pt").input_ids.cuda()
        ref = hf_greedy(target, ids, 40)
        out, rep = sp.generate(tgt, dft, ids, k=4, max_new_tokens=40)
        assert torch.equal(out, ref)
    assert (5, 256) in tgt._tgraphs and dft._graphs  # the verify graph and the draft step graphs
