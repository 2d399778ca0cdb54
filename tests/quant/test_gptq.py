"""GPTQ against RTN on real calibration activations of stories260K."""

import pytest
import torch

from slq.quant.calib import capture_layer0_inputs, decoder_layers, layer_linears
from slq.quant.gptq import HessianAccumulator, factor, gptq_quantize
from slq.quant.grid import quantize_rtn
from slq.quant.spec import QuantSpec, resolve_group_size


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
    from slq.quant.gptq import gptq_quantize_many

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
    from slq.quant.grid import _codes, _dequant_grouped, qparams

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


def _naive_act_order(W, H, spec, damp=0.01):
    """Act-order from its definition: permute the columns by decreasing diag(H), factor the permuted
    Hessian, run the textbook column loop in fp64 with every column's parameters taken from its original
    (contiguous) group of the unquantized W, and permute the codes back."""
    from slq.quant.grid import _codes, _dequant_grouped, qparams

    N, K = W.shape
    G = spec.effective_group(K)
    s_all, z_all = qparams(W.float(), spec, G)
    perm = torch.argsort(torch.diag(H), descending=True, stable=True)
    U = factor(H[perm][:, perm], damp).U.double()
    Wp = W.double()[:, perm].clone()
    codes = torch.zeros(N, K, dtype=torch.uint8)
    for j in range(K):
        g = int(perm[j]) // G
        s, z = s_all[:, g:g + 1], z_all[:, g:g + 1]
        q = _codes(Wp[:, j:j + 1].float().unsqueeze(1), s, z, spec.maxq).reshape(N, 1)
        codes[:, perm[j]] = q[:, 0].to(torch.uint8)
        err = (Wp[:, j:j + 1] - _dequant_grouped(q.unsqueeze(1), s, z).reshape(N, 1).double()) / U[j, j]
        Wp[:, j:] -= err @ U[j:j + 1, j:]
    return codes, s_all, z_all


@pytest.mark.parametrize("bits,G,K", [(3, 32, 320), (8, 64, 192), (4, None, 96)])
def test_act_order_equals_its_definition(bits, G, K):
    from slq.quant.gptq import gptq_quantize_many

    gen = torch.Generator().manual_seed(bits * 11 + K)
    scale = torch.rand(K, generator=gen, dtype=torch.float64) * 4  # unequal input energies: a real reordering
    X = (torch.randn(600, K, generator=gen, dtype=torch.float64) * scale) @ torch.randn(K, K, generator=gen,
                                                                                        dtype=torch.float64) / K**0.5
    acc = HessianAccumulator(K)
    acc.add(X)
    fac = factor(acc.H)
    assert not torch.equal(torch.argsort(torch.diag(fac.H), descending=True), torch.arange(K))
    W = torch.randn(40, K, generator=gen)
    spec = QuantSpec(bits, G, False)
    got = gptq_quantize(W, fac, spec, act_order=True)
    want, s, z = _naive_act_order(W, fac.H, spec)
    assert torch.equal(got.scale, s) and torch.equal(got.zero, z.to(torch.uint8))  # static: from the original W
    agree = (got.codes == want).float().mean().item()
    assert agree > 0.995, f"{agree:.4f} of codes agree with the definition"
    # stacked bitwidths give each the codes of its own run, as without act-order
    many = gptq_quantize_many(W, fac, [QuantSpec(2, G, False), spec], act_order=True)
    assert (many[1].codes == got.codes).float().mean().item() > 0.999


def test_act_order_lowers_layer_output_error_on_real_activations(stories, tiny_windows):
    """On stories260K's real layer inputs, act-order's layer-output error at 3 and 4 bits is at most plain
    GPTQ's, summed over the layer's linears."""
    from slq.quant.gptq import output_error

    m, _ = stories
    xs, lins = _linear_inputs(m, tiny_windows)
    for bits in (3, 4):
        plain = act = 0.0
        for name, lin in lins.items():
            W = lin.weight.detach().float()
            acc = HessianAccumulator(W.shape[1])
            acc.add(xs[name].double())
            fac = factor(acc.H)
            spec = QuantSpec(bits, resolve_group_size(W.shape[1], 32)[0], False)
            plain += output_error(W, gptq_quantize(W, fac, spec).dequantize(), fac.H)
            act += output_error(W, gptq_quantize(W, fac, spec, act_order=True).dequantize(), fac.H)
        assert act <= plain * 1.02, (bits, act, plain)


_KERNEL_SCRIPT = r"""
import json, sys, torch
from slq.quant.gptq import factor, gptq_quantize_many
from slq.quant.spec import QuantSpec
out = {}
for name, (N, K, G, bits, sym, clip, *act) in json.loads(sys.argv[1]).items():
    gen = torch.Generator().manual_seed(len(name))
    X = torch.randn(4 * K, K, generator=gen) * torch.rand(K, generator=gen) * 3
    X[:, 3] = 0  # a dead input
    W = torch.randn(N, K, generator=gen)
    W[0] = 1.25  # exact rounding ties: with min-max 4-bit groups [0, 7.5] the step is 0.5, and 1.25 / 0.5 = 2.5
    W[0, ::16] = 7.5
    fac = factor(X.double().T @ X.double() / X.shape[0])
    specs = [QuantSpec(b, None if G < 0 else G, sym) for b in bits]
    a = gptq_quantize_many(W, fac, specs, clip=clip, kernel=True, act_order=bool(act))
    b = gptq_quantize_many(W, fac, specs, clip=clip, kernel=False, act_order=bool(act))
    out[name] = [[bool(torch.equal(x.codes, y.codes)), bool(torch.equal(x.scale, y.scale)),
                  bool(torch.equal(x.zero, y.zero)), int((x.codes != y.codes).sum())] for x, y in zip(a, b)]
print("RESULT" + json.dumps(out))
"""
KERNEL_CASES = {  # N, K, group (-1 per channel), bits, symmetric, clip
    "asym-g32-one": (40, 96, 32, [4], False, True),
    "asym-g64-many": (24, 128, 64, [2, 3, 8], False, True),
    "sym-g16-many": (17, 64, 16, [3, 5], True, True),
    "per-channel-ragged": (9, 76, -1, [4, 7], False, True),  # K = 76: the last sub-block has 12 columns
    "g128-two-blocks": (130, 256, 128, [6], False, True),  # more rows than one program
    "ties-min-max": (8, 64, 16, [4], False, False),  # row 0 meets exact ties: round half to even
    # act-order: each column of a sub-block reads its own group's parameters (the 7th field turns it on)
    "act-order-g32-many": (40, 96, 32, [3, 8], False, True, True),
    "act-order-per-channel-ragged": (9, 76, -1, [4], False, True, True),
    "act-order-g64-sym": (130, 256, 64, [5], True, True, True),
}


def test_triton_gptq_kernel_is_bit_identical_to_the_torch_loop():
    """The one-launch-per-sub-block kernel (run here by Triton's interpreter) gives the torch loop's codes,
    scales and zero points bit for bit: every bitwidth stack, both grids, per-channel, a ragged last sub-block,
    and act-order (columns permuted, so a sub-block mixes groups)."""
    pytest.importorskip("triton", reason="triton is not installed; the CPU check needs its interpreter")
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    src = Path(__file__).resolve().parents[2] / "src"
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1",
               PYTHONPATH=f"{src}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    proc = subprocess.run([sys.executable, "-c", _KERNEL_SCRIPT, json.dumps(KERNEL_CASES)], env=env,
                          capture_output=True, text=True, timeout=600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")]
    assert proc.returncode == 0 and lines, f"interpreter run failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    res = json.loads(lines[-1][len("RESULT"):])
    assert set(res) == set(KERNEL_CASES)
    for name, per_spec in res.items():
        for codes_eq, scale_eq, zero_eq, n_diff in per_spec:
            assert codes_eq and scale_eq and zero_eq, (name, n_diff)
