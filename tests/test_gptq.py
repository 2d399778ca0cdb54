"""GPTQ against RTN on real calibration activations of stories260K."""

import pytest
import torch

from slq.calib import capture_layer0_inputs, decoder_layers, layer_linears
from slq.gptq import HessianAccumulator, factor, gptq_quantize
from slq.grid import quantize_rtn
from slq.spec import QuantSpec, resolve_group_size


def _linear_inputs(model, windows):
    """Actual inputs X of every linear in decoder layer 1 (after layer 0), captured by hooks."""
    layers = decoder_layers(model)
    batches = capture_layer0_inputs(model, windows, 8, "cpu")
    with torch.no_grad():
        batches = [type(b)(layers[0](b.hidden, **b.kwargs), b.kwargs) for b in batches]
    xs, hooks = {}, []
    for name, lin in layer_linears(layers[1]).items():
        hooks.append(lin.register_forward_pre_hook(lambda m, a, n=name: xs.setdefault(n, []).append(a[0].reshape(-1, a[0].shape[-1]))))
    with torch.no_grad():
        for b in batches:
            layers[1](b.hidden, **b.kwargs)
    for h in hooks:
        h.remove()
    return {n: torch.cat(v) for n, v in xs.items()}, layer_linears(layers[1])


@pytest.mark.parametrize("sym", [False, True])
def test_gptq_lowers_layer_output_error_vs_rtn(stories, tiny_windows, sym):
    model, _ = stories
    xs, linears = _linear_inputs(model, tiny_windows)
    for name, lin in linears.items():
        X = xs[name].double()
        W = lin.weight.detach().float()
        acc = HessianAccumulator(W.shape[1])
        acc.add(X)
        fac = factor(acc.H)  # one factorization, reused for every bitwidth below
        U_before = fac.U.clone()
        G, _ = resolve_group_size(W.shape[1], 32)
        for bits in range(2, 9):
            spec = QuantSpec(bits, G, sym)
            err_g = torch.linalg.norm(X @ (W.double() - gptq_quantize(W, fac, spec).dequantize().double()).T)
            err_r = torch.linalg.norm(X @ (W.double() - quantize_rtn(W, spec).dequantize().double()).T)
            assert err_g < err_r, f"{name} bits={bits}: GPTQ {err_g:.4g} >= RTN {err_r:.4g}"
        assert torch.equal(fac.U, U_before)  # the factor is only read


def test_hessian_accumulator_is_running_mean():
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(300, 16, generator=gen, dtype=torch.float64)
    acc = HessianAccumulator(16)
    for chunk in X.split(70):
        acc.add(chunk)
    assert torch.allclose(acc.H, 2 * X.T @ X / 300)


def test_dead_inputs_are_zeroed():
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(200, 32, generator=gen, dtype=torch.float64)
    X[:, 3] = 0
    acc = HessianAccumulator(32)
    acc.add(X)
    fac = factor(acc.H)
    q = gptq_quantize(torch.randn(8, 32, generator=gen), fac, QuantSpec(4, 16))
    assert fac.dead[3] and fac.dead.sum() == 1
    assert (q.dequantize()[:, 3] == 0).all()


@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("G", [16, None])
def test_many_bitwidths_in_one_pass_match_one_at_a_time(sym, G):
    """The bank's multi-bitwidth GPTQ gives each bitwidth the codes of a separate run."""
    from slq.gptq import gptq_quantize_many

    gen = torch.Generator().manual_seed(3)
    X = torch.randn(400, 64, generator=gen, dtype=torch.float64) @ torch.randn(64, 64, generator=gen, dtype=torch.float64)
    acc = HessianAccumulator(64)
    acc.add(X)
    fac = factor(acc.H)
    W = torch.randn(24, 64, generator=gen)
    specs = [QuantSpec(b, G, sym) for b in range(2, 9)]
    many = gptq_quantize_many(W, fac, specs)
    for spec, q in zip(specs, many):
        one = gptq_quantize(W, fac, spec)
        assert q.spec == spec and q.codes.max() <= spec.maxq
        agree = (q.codes == one.codes).float().mean().item()
        assert agree > 0.999, f"bits={spec.bits}: {agree:.4f} of codes agree"
        torch.testing.assert_close(q.dequantize(), one.dequantize(), atol=1e-5, rtol=0)


def _naive_gptq(W, fac, spec):
    """The textbook algorithm, column by column with the full update of every later column (no lazy
    batches): an oracle for the blocked implementation, which must give the same codes."""
    from slq.grid import _codes, _dequant_grouped, qparams

    W = W.double().clone()
    W[:, fac.dead] = 0.0
    U = fac.U.double()
    N, K = W.shape
    G = spec.effective_group(K)
    codes = torch.zeros(N, K, dtype=torch.uint8)
    for j in range(K):
        if j % G == 0:
            s, z = qparams(W[:, j:j + G].float(), spec, G)
        q = _codes(W[:, j:j + 1].float().unsqueeze(1), s, z, spec.maxq).reshape(N, 1)
        codes[:, j] = q[:, 0].to(torch.uint8)
        err = (W[:, j:j + 1] - _dequant_grouped(q.unsqueeze(1), s, z).reshape(N, 1).double()) / U[j, j]
        W[:, j:] -= err @ U[j:j + 1, j:]
    return codes


@pytest.mark.parametrize("bits,G,K", [(3, 32, 320), (4, 64, 256), (8, 32, 160), (2, None, 96)])
def test_blocked_gptq_equals_the_textbook_algorithm(bits, G, K):
    gen = torch.Generator().manual_seed(bits * 7 + K)
    X = torch.randn(600, K, generator=gen, dtype=torch.float64) @ torch.randn(K, K, generator=gen, dtype=torch.float64)
    acc = HessianAccumulator(K)
    acc.add(X)
    fac = factor(acc.H)
    W = torch.randn(40, K, generator=gen)
    spec = QuantSpec(bits, G, False)
    got = gptq_quantize(W, fac, spec, block_size=128).codes
    want = _naive_gptq(W, fac, spec)
    agree = (got == want).float().mean().item()
    assert agree > 0.995, f"{agree:.4f} of codes agree with the column-by-column algorithm"
