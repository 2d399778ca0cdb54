"""Attention-aware key/value Hessians on stories260K (8 query heads, 4 key/value heads, head dim 8).

The oracle is the model's own eager attention (``output_attentions=True`` on a copy switched with
``set_attn_implementation``), hooks on the real projections, and the formulas written out per head
in float64.
"""

from __future__ import annotations

import copy

import pytest
import torch

from slq.quant.calib import (RowBlockHessians, capture_layer0_inputs, collect_hessians, decoder_layers, eager_attention,
                       run_layer)
from slq.quant.gptq import factor, gptq_quantize
from slq.quant.spec import QuantSpec

LAYER = 1


def _oracle_inputs(model, windows):
    """Per window batch: attention probabilities of LAYER, the k/v input X and the q output, from a full forward."""
    m = copy.deepcopy(model)
    m.set_attn_implementation("eager")
    attn = decoder_layers(m)[LAYER].self_attn
    got = {"x": [], "q": [], "a": []}
    hs = [attn.v_proj.register_forward_pre_hook(lambda _m, a: got["x"].append(a[0].double())),
          attn.q_proj.register_forward_hook(lambda _m, _a, o: got["q"].append(o.double()))]
    with torch.no_grad():
        out = m(input_ids=windows, output_attentions=True)
    for h in hs:
        h.remove()
    return got["x"][0], got["q"][0], out.attentions[LAYER].double(), m.config


def _ours(model, windows, names):
    layers = decoder_layers(model)
    with eager_attention(model):
        batches = capture_layer0_inputs(model, windows, len(windows), "cpu")
        for layer in layers[:LAYER]:
            batches = run_layer(layer, batches)
        return collect_hessians(layers[LAYER], batches, names, attention=True)


def test_eager_attention_agrees_with_the_default_path_and_restores_it(stories, tiny_windows):
    model, _ = stories
    before = model.config._attn_implementation
    ids = tiny_windows[:2]
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        with eager_attention(model):
            assert model.config._attn_implementation == "eager"
            eager = model(input_ids=ids).logits
    assert model.config._attn_implementation == before
    torch.testing.assert_close(eager, ref, rtol=1e-4, atol=1e-4)


def test_key_and_value_hessians_match_a_per_head_brute_force(stories, tiny_windows):
    model, _ = stories
    windows = tiny_windows[:4]
    X, Q, A, cfg = _oracle_inputs(model, windows)
    nh, nkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    rep = nh // nkv
    ours = _ours(model, windows, ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"])
    assert isinstance(ours["self_attn.v_proj"], RowBlockHessians) and isinstance(ours["self_attn.k_proj"], RowBlockHessians)
    assert not isinstance(ours["self_attn.q_proj"], RowBlockHessians)  # queries keep X^T X
    b, T, K = X.shape
    for g in range(nkv):
        Hv = torch.zeros(K, K, dtype=torch.float64)
        c = torch.zeros(b, T, dtype=torch.float64)
        for h in range(g * rep, (g + 1) * rep):
            for i in range(b):
                AX = A[i, h] @ X[i]
                Hv += AX.T @ AX
                q2 = Q[i, :, h * hd:(h + 1) * hd].pow(2).sum(-1)  # |q_t|^2 over t
                c[i] += A[i, h].T @ q2  # c_s = sum_t a_ts |q_t|^2
        Hv *= 2.0 / (rep * b * T)
        Hk = torch.einsum("bs,bsk,bsl->kl", c, X, X) * (2.0 / (b * T))
        for got, want in ((ours["self_attn.v_proj"].blocks[g].H, Hv), (ours["self_attn.k_proj"].blocks[g].H, Hk)):
            # ours accumulates fp32 products into fp64: compare at the matrix's own scale
            assert float(torch.linalg.norm(got - want) / torch.linalg.norm(want)) < 1e-5
        assert ours["self_attn.v_proj"].rows == hd


def test_value_gptq_with_the_attention_hessian_lowers_the_attention_output_error(stories, tiny_windows):
    """The quantity the value Hessian encodes, sum_h ||A_h X dW_g^T||^2, computed directly: GPTQ that
    minimizes it beats GPTQ with X^T X at every low bitwidth on the calibration windows."""
    model, _ = stories
    windows = tiny_windows[:8]
    X, _, A, cfg = _oracle_inputs(model, windows)
    nh, nkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    rep = nh // nkv
    W = decoder_layers(model)[LAYER].self_attn.v_proj.weight.detach().float()
    ours = _ours(model, windows, ["self_attn.v_proj"])["self_attn.v_proj"]
    Hplain = torch.einsum("btk,btl->kl", X, X)

    def att_error(W_hat):
        D = (W.double() - W_hat.double())
        return sum(float((A[:, h] @ (X @ D[(h // rep) * hd:(h // rep + 1) * hd].T)).pow(2).sum()) for h in range(nh))

    for bits in (2, 3, 4):
        spec = QuantSpec(bits, 32, False)
        plain = gptq_quantize(W, factor(Hplain), spec).dequantize()
        aware = torch.cat([gptq_quantize(W[g * hd:(g + 1) * hd], factor(ours.blocks[g].H), spec).dequantize()
                           for g in range(nkv)])
        assert att_error(aware) < att_error(plain), bits


def test_quantize_model_uses_per_head_hessians_only_when_asked(stories, tiny_windows):
    """attention=False reproduces plain GPTQ; attention=True changes the k/v codes and nothing else."""
    from slq.quant.pipeline import quantize_model

    model, _ = stories
    spec = QuantSpec(3, 32, False)
    runs = {}
    for att in (False, True):
        m = copy.deepcopy(model)
        runs[att] = quantize_model(m, spec, method="gptq", windows=tiny_windows[:8], attention=att,
                                   sequential=False, progress=False).qweights
    for name in runs[True]:
        same = torch.equal(runs[True][name].codes, runs[False][name].codes)
        if name.endswith(("k_proj", "v_proj")):
            assert not same, name
        else:
            assert same, name
    assert model.config._attn_implementation != "eager"


@pytest.mark.parametrize("name", ["self_attn.o_proj", "mlp.down_proj"])
def test_other_linears_keep_the_plain_hessian(stories, tiny_windows, name):
    model, _ = stories
    h = _ours(model, tiny_windows[:2], [name])[name]
    assert not isinstance(h, RowBlockHessians)


def test_without_attention_probabilities_it_warns_and_keeps_the_plain_hessian(stories, tiny_windows):
    """Outside eager_attention the sdpa path returns no probabilities: one warning per projection, and the
    projection gets the same X^T X Hessian as its sibling query projection."""
    model, _ = stories
    layers = decoder_layers(model)
    batches = capture_layer0_inputs(model, tiny_windows[:2], 2, "cpu")
    names = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]
    with pytest.warns(UserWarning, match="no attention probabilities"):
        hs = collect_hessians(layers[0], batches, names, attention=True)
    assert not any(isinstance(h, RowBlockHessians) for h in hs.values())
    assert hs["self_attn.k_proj"] is hs["self_attn.q_proj"] and hs["self_attn.v_proj"] is hs["self_attn.q_proj"]
