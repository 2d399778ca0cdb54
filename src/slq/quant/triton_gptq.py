"""One Triton kernel for GPTQ's inner loop: a sub-block of up to 16 columns for every row at once.

GPTQ quantizes columns one after another, and each column's error updates the columns to its right.
In :func:`slq.quant.gptq.gptq_quantize_many` the updates are lazy on two levels, so the only strictly
sequential part is a sub-block of ``S <= 16`` columns: quantize column ``c``, divide its error by
``U[c, c]``, subtract ``err * U[c, c+1:]`` from the columns after it, next column. In torch that is
about fifteen kernel launches per column, and on a GPU the launches, not the arithmetic, set the time
(an 8B layer has 26,624 columns). Rows are independent given the factor, so this kernel gives each
program ``BLOCK_R`` rows and runs the whole sub-block in registers: one launch per sub-block.

It computes exactly what the torch loop computes, operation for operation: the division and the
error division are IEEE round-to-nearest (``div_rn``), rounding to an integer is round-half-even
(``(t + 1.5 * 2^23) - 1.5 * 2^23``, exact for |t| < 2^22; larger |t| only ever meets the clamp), and
the launch turns off multiply-add contraction, so ``w - err * u`` is rounded twice, as torch's
rank-1 product followed by a subtraction is. Tests compare the codes, scales and zero points bit for bit
against the torch loop (on CPU under ``TRITON_INTERPRET=1``, and on a GPU).
"""

from __future__ import annotations

import os

import torch

try:  # Triton is optional: importing slq must work without it.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on machines without triton
    triton = None
    tl = None

BLOCK_R = 128


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def usable(t: torch.Tensor) -> bool:
    """True when the kernel can run on this tensor's device (a CUDA GPU, or any device under the interpreter)."""
    if triton is None or os.environ.get("SLQ_GPTQ_KERNEL", "1") == "0":
        return False
    return _interpreting() or t.is_cuda


if triton is not None:

    @triton.jit
    def _gptq_subblock_kernel(w_ptr, stride_w, u_ptr, stride_u, s_ptr, stride_s, z_ptr, stride_z, m_ptr,
                              c_ptr, stride_c, e_ptr, stride_e, NR, width,
                              S: tl.constexpr, BLOCK: tl.constexpr, PER_COL: tl.constexpr):
        pid = tl.program_id(0)
        rows = pid * BLOCK + tl.arange(0, BLOCK)
        cols = tl.arange(0, S)
        rmask = rows < NR
        cmask = cols < width
        m2 = rmask[:, None] & cmask[None, :]
        w = tl.load(w_ptr + rows[:, None] * stride_w + cols[None, :], mask=m2, other=0.0)
        if PER_COL:  # act-order: every column of the sub-block may belong to another group
            s_all = tl.load(s_ptr + rows[:, None] * stride_s + cols[None, :], mask=m2, other=1.0).to(tl.float32)
            z_all = tl.load(z_ptr + rows[:, None] * stride_z + cols[None, :], mask=m2, other=0).to(tl.float32)
        else:
            s = tl.load(s_ptr + rows * stride_s, mask=rmask, other=1.0).to(tl.float32)
            z = tl.load(z_ptr + rows * stride_z, mask=rmask, other=0).to(tl.float32)
        mq = tl.load(m_ptr + rows, mask=rmask, other=0.0)
        diag = tl.load(u_ptr + cols * stride_u + cols, mask=cmask, other=1.0)
        q_all = tl.zeros([BLOCK, S], dtype=tl.float32)
        e_all = tl.zeros([BLOCK, S], dtype=tl.float32)
        for c in tl.static_range(S):
            sel = cols == c
            x = tl.sum(tl.where(sel[None, :], w, 0.0), axis=1)
            if PER_COL:
                s = tl.sum(tl.where(sel[None, :], s_all, 0.0), axis=1)
                z = tl.sum(tl.where(sel[None, :], z_all, 0.0), axis=1)
            t = tl.math.div_rn(x, s)
            r = (t + 12582912.0) - 12582912.0  # 1.5 * 2^23: round to the nearest integer, ties to even
            q = tl.minimum(tl.maximum(r + z, 0.0), mq)
            wq = (q - z) * s
            d = tl.sum(tl.where(sel, diag, 0.0), axis=0)
            err = tl.math.div_rn(x - wq, d)
            urow = tl.load(u_ptr + c * stride_u + cols, mask=cmask & (cols > c), other=0.0)
            w = w - err[:, None] * urow[None, :]
            q_all = tl.where(sel[None, :], q[:, None], q_all)
            e_all = tl.where(sel[None, :], err[:, None], e_all)
        tl.store(c_ptr + rows[:, None] * stride_c + cols[None, :], q_all.to(tl.uint8), mask=m2)
        tl.store(e_ptr + rows[:, None] * stride_e + cols[None, :], e_all, mask=m2)


def subblock(W1: torch.Tensor, U1: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: torch.Tensor,
             codes: torch.Tensor, err: torch.Tensor) -> None:
    """Quantize the columns of ``W1`` [NR, S] in order (GPTQ, errors fed forward inside the sub-block).

    ``U1`` [S, S]: the sub-block of the upper Cholesky factor; ``scale`` / ``zero`` [NR] and ``maxq`` [NR]: the
    group parameters and largest code of each row, or ``scale`` / ``zero`` [NR, S]: each column's own group
    parameters (act-order, where the columns of a sub-block come from different groups); writes ``codes`` [NR, S] (uint8) and ``err`` [NR, S]
    (the scaled errors ``(w - w_hat) / U[c, c]`` the caller spreads over later columns). Every tensor may
    be a strided view with unit stride along its last dimension.
    """
    NR, width = W1.shape
    S = max(1, triton.next_power_of_2(width))
    per_col = scale.dim() == 2
    for t in (W1, U1, codes, err) + ((scale, zero) if per_col else ()):
        assert t.stride(-1) == 1, "unit stride along columns"
    grid = (triton.cdiv(NR, BLOCK_R),)
    extra = {} if _interpreting() else {"enable_fp_fusion": False}
    _gptq_subblock_kernel[grid](W1, W1.stride(0), U1, U1.stride(0), scale, scale.stride(0), zero, zero.stride(0),
                                maxq, codes, codes.stride(0), err, err.stride(0), NR, width,
                                S=S, BLOCK=BLOCK_R, PER_COL=per_col, **extra)
