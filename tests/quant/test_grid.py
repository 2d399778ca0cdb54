"""The quantizer oracle against first principles, for every bitwidth and group size."""

import itertools

import pytest
import torch

from slq.quant.grid import dequantize, gamma_stats, qparams, quantize, quantize_rtn
from slq.quant.spec import QuantSpec

BITS = range(2, 9)
GROUPS = [16, 32, 64, 128, 256, None]


def _weights(rng, N=24, K=512):
    # heavy-ish tails and per-row scales, like real weights
    w = torch.randn(N, K, generator=rng) * torch.rand(N, 1, generator=rng).add(0.1)
    w[0, 5] = 8.0  # an outlier
    return w


@pytest.mark.parametrize("bits, G, sym", list(itertools.product(BITS, GROUPS, [False, True])))
def test_codes_levels_and_half_step_error(rng, bits, G, sym):
    w = _weights(rng)
    spec = QuantSpec(bits, G, sym)
    g = spec.effective_group(w.shape[1])
    q = quantize_rtn(w, spec, clip=False)
    assert q.codes.dtype == torch.uint8
    assert int(q.codes.max()) <= 2**bits - 1
    assert int(q.zero.max()) <= 2**bits - 1
    # at most 2^bits distinct dequantized levels per group
    deq = q.dequantize()
    for row in range(0, w.shape[0], 7):
        for c in range(0, w.shape[1], g):
            assert deq[row, c : c + g].unique().numel() <= 2**bits
    # min-max grid: every weight within half a step of its dequantized value
    step = q.scale.float().repeat_interleave(g, dim=1)
    assert ((w - deq).abs() <= step / 2 * (1 + 1e-5) + 1e-7).all()
    # dequantization is exactly (q - z) * s, computed independently here
    z = q.zero.float().repeat_interleave(g, dim=1)
    assert torch.equal(deq, (q.codes.float() - z) * step)
    if sym:
        assert (q.zero == 2 ** (bits - 1)).all()


@pytest.mark.parametrize("bits, G, sym", list(itertools.product(BITS, [32, 128, None], [False, True])))
def test_clipping_never_worse_than_minmax(rng, bits, G, sym):
    w = _weights(rng)
    spec = QuantSpec(bits, G, sym)
    g = spec.effective_group(w.shape[1])
    err_clip = (quantize_rtn(w, spec, clip=True).dequantize() - w).pow(2).reshape(w.shape[0], -1, g).sum(-1)
    err_mm = (quantize_rtn(w, spec, clip=False).dequantize() - w).pow(2).reshape(w.shape[0], -1, g).sum(-1)
    assert (err_clip <= err_mm).all()
    assert err_clip.sum() < err_mm.sum() or bits >= 7  # the outlier group gains at low bits


def test_symmetric_noise_is_gamma_squared_times_asymmetric():
    """gamma^2 law: with min-max grids, MSE(sym) / MSE(asym) = E[gamma^2 s^2] / E[s^2]."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(512, 1024, generator=gen) + 0.4  # shifted groups: gamma well above 1
    G = 128
    for bits in (6, 8):  # fine grids: rounding noise is uniform, variance s^2 / 12
        a = quantize_rtn(w, QuantSpec(bits, G, False), clip=False)
        s = quantize_rtn(w, QuantSpec(bits, G, True), clip=False)
        mse_a = (a.dequantize() - w).pow(2).mean()
        mse_s = (s.dequantize() - w).pow(2).mean()
        wg = w.reshape(512, -1, G)
        gamma = 2 * wg.abs().amax(-1) / (wg.amax(-1) - wg.amin(-1))
        sa2 = a.scale.float().pow(2)
        predicted = (gamma.pow(2) * sa2).mean() / sa2.mean()
        assert (mse_s / mse_a).item() == pytest.approx(predicted.item(), rel=0.03)
        assert predicted > 1.2


def test_gamma_stats_match_definition(rng):
    w = _weights(rng, 8, 256)
    g, g2 = gamma_stats(w, 64)
    wg = w.reshape(8, 4, 64)
    gam = 2 * wg.abs().amax(-1) / (wg.amax(-1) - wg.amin(-1))
    assert g == pytest.approx(gam.mean().item(), rel=1e-6)
    assert g2 == pytest.approx(gam.pow(2).mean().item(), rel=1e-6)
    assert 1.0 <= g <= 2.0


def test_constant_and_zero_groups_are_finite():
    w = torch.zeros(4, 64)
    w[1] = 0.5
    w[2] = -3.0
    for sym in (False, True):
        q = quantize_rtn(w, QuantSpec(4, 32, sym), clip=False)
        assert torch.isfinite(q.dequantize()).all()
        step = q.scale.float().repeat_interleave(32, dim=1)
        assert ((q.dequantize() - w).abs() <= step / 2 * 1.001).all()
        if not sym:  # a constant group is exactly representable on the asymmetric grid
            assert torch.allclose(q.dequantize(), w, rtol=1e-3)


def test_quantize_dequantize_roundtrip_of_grid_points(rng):
    """Dequantized weights are fixed points: quantizing them again gives the same codes."""
    w = _weights(rng)
    spec = QuantSpec(3, 64)
    q = quantize_rtn(w, spec)
    codes2 = quantize(q.dequantize(), q.scale, q.zero, spec, 64)
    assert torch.equal(codes2, q.codes)
    assert torch.equal(dequantize(codes2, q.scale, q.zero, 64), q.dequantize())
    s, z = qparams(w, spec, 64, clip=False)
    assert s.dtype == torch.float16 and s.shape == (w.shape[0], w.shape[1] // 64)


@pytest.mark.parametrize("sym", [False, True])
def test_clip_search_error_equals_dequantizing_the_codes(sym):
    """The clip search's fast per-group error is exactly the error of dequantizing the codes, for one
    bitwidth and for a per-row bitwidth tensor (the bank's multi-bitwidth pass)."""
    from slq.quant.grid import _codes, _dequant_grouped, _group_sq_error, _params_for_shrink

    gen = torch.Generator().manual_seed(11)
    wg = (torch.randn(12, 5, 32, generator=gen) * torch.rand(12, 1, 1, generator=gen) * 3).float()
    spec = QuantSpec(4, 32, sym)
    per_row = torch.tensor([float(2 ** b - 1) for b in (2, 3, 4, 5, 6, 7, 8, 8, 3, 4, 2, 6)])[:, None]
    for maxq in (spec.maxq, per_row):
        for p in (1.0, 0.8, 0.5):
            s, z = _params_for_shrink(wg, spec, p, maxq)
            want = (_dequant_grouped(_codes(wg, s, z, maxq), s, z) - wg).pow(2).sum(-1)
            assert torch.equal(_group_sq_error(wg, s, z, maxq), want)
