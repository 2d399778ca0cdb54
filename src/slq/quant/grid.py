"""Uniform integer grids, group-wise along the input dimension. Pure torch: the oracle.

For a weight W [N, K] and group length G, each row is cut into K/G groups. A group
with values w gets a scale s (stored fp16) and an integer zero point z, and codes

    q = clamp(round(w / s) + z, 0, 2^bits - 1)              (unsigned codes)
    w_hat = (q - z) * s                                       (exact in fp32)

The product of an integer below 2^8 and an fp16 scale is exact in fp32, so the fp32
dequantized weight is the true grid point; a reader that dequantizes in fp16 or bf16
(compressed-tensors does it in the model's dtype) gets this value rounded once.

Asymmetric (default): the range [L, U] = [min(w, 0), max(w, 0)] (0 is always inside,
so z is a valid code), s = (U - L) / (2^bits - 1), z = round(-L / s).
Symmetric: z = 2^(bits-1) and s = 2 M / (2^bits - 1) with M = max |w|: the same
number of steps spread over [-M, M] instead of [L, U]. With
gamma = 2M / (U - L) the symmetric step is gamma times the asymmetric one, so its
rounding-noise variance is gamma^2 times larger (the gamma^2 law).

Clipping: the range is shrunk by factors p in CLIP_GRID (1.0 first) and each group
keeps the p whose dequantized values have the least squared error; p = 1 is min-max,
so clipping is never worse than min-max.

Scales are rounded *up* to fp16 so that the grid always spans the clipped range:
every unclipped weight is then within half a step of its dequantized value.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .spec import QuantSpec

CLIP_GRID = tuple(1.0 - 0.025 * i for i in range(21))  # 1.0, 0.975, ..., 0.5
_FP16_TINY = float(torch.finfo(torch.float16).tiny)


@dataclass
class QuantizedWeight:
    """Integer codes plus per-group parameters of one [N, K] weight."""

    codes: torch.Tensor  # uint8 [N, K], values in [0, 2^bits - 1]
    scale: torch.Tensor  # fp16 [N, K/G]
    zero: torch.Tensor  # uint8 [N, K/G], values in [0, 2^bits - 1]
    spec: QuantSpec

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    @property
    def group(self) -> int:
        return self.spec.effective_group(self.codes.shape[1])

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.codes, self.scale, self.zero, self.group).to(dtype)


def _fp16_ceil(x: torch.Tensor) -> torch.Tensor:
    """Smallest fp16 value >= x (x > 0), returned as fp16."""
    x = x.clamp(min=_FP16_TINY, max=65504.0)
    h = x.to(torch.float16)
    low = h.float() < x  # no .any() test: on a GPU it would wait for the device at every call
    return torch.where(low, torch.nextafter(h, torch.full_like(h, float("inf"))), h)


def _grouped(w: torch.Tensor, G: int) -> torch.Tensor:
    N, K = w.shape
    if K % G:
        raise ValueError(f"group length {G} does not divide K={K}")
    return w.reshape(N, K // G, G)


def _params_for_shrink(wg: torch.Tensor, spec: QuantSpec, p: float, maxq=None,
                       extremes: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (fp16) and zero (int64) per group, range shrunk by factor p. wg: [N, ng, G].

    ``maxq`` (default ``spec.maxq``) may be a float tensor [N, 1] giving each row its own bitwidth
    (the bank quantizes one weight at several bitwidths in one pass); ``spec`` then only says
    whether the grid is symmetric.
    """
    if maxq is None:
        maxq = spec.maxq
    wmin, wmax = extremes if extremes is not None else (wg.amin(dim=-1), wg.amax(dim=-1))
    if spec.symmetric:
        M = torch.maximum(wmax, -wmin) * p
        scale = _fp16_ceil(2.0 * M / maxq)
        if isinstance(maxq, torch.Tensor):
            zero = ((maxq + 1) / 2).to(torch.int64).expand_as(M).clone()
        else:
            zero = torch.full_like(M, (maxq + 1) // 2, dtype=torch.int64)
        return scale, zero
    lo = wmin.clamp(max=0.0) * p
    hi = wmax.clamp(min=0.0) * p
    scale = _fp16_ceil((hi - lo) / maxq)
    zero = torch.minimum(torch.round(-lo / scale.float()).clamp(min=0), torch.as_tensor(maxq, dtype=lo.dtype))
    return scale, zero.to(torch.int64)


def _codes(wg: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq) -> torch.Tensor:
    """Codes of grouped weights; ``maxq`` is an int or a float tensor [N, 1] (one bitwidth per row)."""
    s = scale.float().unsqueeze(-1)
    q = torch.round(wg / s) + zero.unsqueeze(-1)
    if isinstance(maxq, torch.Tensor):
        return torch.minimum(q.clamp(min=0), maxq.unsqueeze(-1))
    return torch.clamp(q, 0, maxq)


def _dequant_grouped(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return (q - zero.unsqueeze(-1)) * scale.float().unsqueeze(-1)


def _group_sq_error(wg: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq) -> torch.Tensor:
    """Per-group sum of (dequantized - w)^2: the same numbers as dequantizing :func:`_codes`, in fewer passes.

    clamp(round(w/s) + z, 0, maxq) - z equals clamp(round(w/s), -z, maxq - z) exactly (small integers
    in fp32), so the zero point is never added and taken off again, and every step runs in place.
    """
    s = scale.float().unsqueeze(-1)
    z = zero.to(torch.float32).unsqueeze(-1)
    hi = (maxq.unsqueeze(-1) if isinstance(maxq, torch.Tensor) else float(maxq)) - z
    e = torch.div(wg, s).round_()
    e = torch.maximum(e, -z, out=e)
    e = torch.minimum(e, hi, out=e)
    return e.mul_(s).sub_(wg).square_().sum(-1)


def qparams(w: torch.Tensor, spec: QuantSpec, G: int, clip: bool = True, maxq=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group scale (fp16 [N, K/G]) and zero (int64 [N, K/G]) for w [N, K].

    With ``clip`` the shrink factor per group minimizes the squared error of the
    dequantized group over CLIP_GRID (ties keep the larger range). ``maxq``: see
    :func:`_params_for_shrink`.
    """
    if maxq is None:
        maxq = spec.maxq
    wg = _grouped(w.float(), G)
    ext = (wg.amin(dim=-1), wg.amax(dim=-1))  # one pass for all shrink factors
    scale, zero = _params_for_shrink(wg, spec, 1.0, maxq, ext)
    if not clip:
        return scale, zero
    best = _group_sq_error(wg, scale, zero, maxq)
    for p in CLIP_GRID[1:]:
        s_p, z_p = _params_for_shrink(wg, spec, p, maxq, ext)
        err = _group_sq_error(wg, s_p, z_p, maxq)
        better = err < best
        best = torch.where(better, err, best)
        scale = torch.where(better, s_p, scale)
        zero = torch.where(better, z_p, zero)
    return scale, zero


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec, G: int) -> torch.Tensor:
    """Unsigned integer codes (uint8 [N, K]) of w on the given grid."""
    q = _codes(_grouped(w.float(), G), scale, zero.to(torch.int64), spec.maxq)
    return q.reshape(w.shape).to(torch.uint8)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, G: int) -> torch.Tensor:
    """Dense fp32 weight (q - z) * s, shape [N, K] (exact: no rounding happens)."""
    N, K = codes.shape
    q = codes.to(torch.float32).reshape(N, K // G, G)
    return _dequant_grouped(q, scale, zero.to(torch.float32)).reshape(N, K)


def quantize_rtn(w: torch.Tensor, spec: QuantSpec, clip: bool = True) -> QuantizedWeight:
    """Round-to-nearest quantization of w [N, K] (the group size must divide K)."""
    G = spec.effective_group(w.shape[1])
    scale, zero = qparams(w, spec, G, clip=clip)
    codes = quantize(w, scale, zero, spec, G)
    return QuantizedWeight(codes, scale, zero.to(torch.uint8), spec)


def gamma_stats(w: torch.Tensor, G: int) -> tuple[float, float]:
    """Mean gamma and mean gamma^2 over groups, gamma = 2 max|w| / (max w - min w).

    Constant groups (max = min) have no defined gamma and are left out.
    """
    wg = _grouped(w.float(), G)
    hi, lo = wg.amax(-1), wg.amin(-1)
    rng = hi - lo
    ok = rng > 0
    if not ok.any():
        return float("nan"), float("nan")
    gamma = (2.0 * torch.maximum(hi.abs(), lo.abs()))[ok] / rng[ok]
    return gamma.mean().item(), gamma.pow(2).mean().item()
