"""GPTQ for one linear layer, in pure torch.

The layer-output error ||X W^T - X W_hat^T||^2 = tr((W - W_hat) H (W - W_hat)^T) with
H = X^T X / n is minimized greedily: columns are quantized left to right, and each
column's rounding error is spread over the columns not yet quantized using the
inverse Hessian (optimal brain surgeon update). Work is done in blocks of columns with
lazy updates of the rest of the matrix.

One factorization per layer serves every bitwidth: :func:`factor` returns the upper
Cholesky factor of H^-1 (with damping), and :func:`gptq_quantize` only reads it.
Group parameters are computed from the *updated* weights when a group starts.

``act_order=True`` quantizes the columns in order of decreasing Hessian diagonal (the inputs with the
most energy first, while the most columns are left to absorb their error). It is a permutation around
the one column loop: ``perm`` reorders W's columns and H's rows and columns (the permuted H is factored
again), the loop runs unchanged, and ``invperm`` puts the codes back. The groups stay the contiguous
column ranges of the checkpoint format, so their parameters are fixed from the original weights before
the pass ("static groups") and each loop column reads the group ``perm[j] // G``; the codes need no
column permutation to be read back.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from .grid import QuantizedWeight, _codes, _dequant_grouped, qparams
from .spec import QuantSpec


class HessianAccumulator:
    """Running H = 2/n * sum_i x_i x_i^T over the rows of the inputs fed so far."""

    def __init__(self, K: int, device: torch.device | str = "cpu"):
        self.H = torch.zeros(K, K, dtype=torch.float64, device=device)
        self.n = 0

    @torch.no_grad()
    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).to(self.H.device, torch.float64)
        m = x.shape[0]
        self.H *= self.n / (self.n + m)
        self.n += m
        x = x * (2.0 / self.n) ** 0.5
        self.H += x.T @ x


@dataclass
class RowBlockHessians:
    """One Hessian per consecutive block of ``rows`` output rows of a linear (a key or value projection:
    one block per key/value head, see :mod:`slq.quant.calib`)."""

    blocks: list[HessianAccumulator]
    rows: int
    failed: bool = False  # set when the attention block gave no probabilities (the caller falls back)


def accumulate(acc: HessianAccumulator, x: torch.Tensor) -> None:
    """acc.add for fp32 rows x [m, K]: the product in fp32, the running mean in acc's dtype."""
    m = x.shape[0]
    acc.H *= acc.n / (acc.n + m)
    acc.n += m
    acc.H += ((x.T @ x) * (2.0 / acc.n)).to(acc.H)


def join_rows(pieces: list[tuple[int, QuantizedWeight]]) -> QuantizedWeight:
    """One QuantizedWeight from row pieces given as (first row, piece), in any order."""
    qs = [q for _, q in sorted(pieces, key=lambda x: x[0])]
    return QuantizedWeight(torch.cat([q.codes for q in qs]), torch.cat([q.scale for q in qs]),
                           torch.cat([q.zero for q in qs]), qs[0].spec)


def _triton_gptq():
    from . import triton_gptq  # lazy: it imports Triton (a heavy optional package), about a second

    return triton_gptq


@dataclass
class Factor:
    """Upper Cholesky factor U of the damped inverse Hessian (H^-1 = U^T U)."""

    U: torch.Tensor  # fp32 [K, K]
    dead: torch.Tensor  # bool [K]: inputs that were always zero
    H: torch.Tensor  # fp64 [K, K] undamped Hessian (dead inputs set to 1), for error evaluation
    damp: float = 0.01  # the damping that was asked for (act-order refactors the permuted Hessian with it)


def factor(H: torch.Tensor, damp: float = 0.01) -> Factor:
    """Damp H by ``damp`` x mean(diag H), invert through Cholesky, factor again.

    Columns with zero diagonal (inputs never active) get H_ii = 1 and are zeroed in W.
    Damping is raised tenfold (up to 5 times) if the matrix is not positive definite.
    """
    H = H.to(torch.float64).clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    diag = torch.arange(H.shape[0], device=H.device)
    mean_diag = torch.diag(H).mean()
    for attempt in range(6):
        Hd = H.clone()
        Hd[diag, diag] += damp * (10**attempt) * mean_diag
        L, info = torch.linalg.cholesky_ex(Hd)
        if info == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if info == 0:
                return Factor(U.to(torch.float32), dead, H, damp)
    raise RuntimeError("Hessian is not positive definite even after heavy damping")


@torch.no_grad()
def gptq_quantize(
    W: torch.Tensor, fac: Factor, spec: QuantSpec, clip: bool = True, block_size: int = 128, act_order: bool = False
) -> QuantizedWeight:
    """Quantize W [N, K] with GPTQ error feedback; returns codes and group params."""
    return gptq_quantize_many(W, fac, [spec], clip=clip, block_size=block_size, act_order=act_order)[0]


@torch.no_grad()
def gptq_quantize_many(
    W: torch.Tensor, fac: Factor, specs: list[QuantSpec], clip: bool = True, block_size: int = 128,
    kernel: bool | None = None, act_order: bool = False,
) -> list[QuantizedWeight]:
    """GPTQ of one W [N, K] at several bitwidths in one pass over the columns.

    GPTQ treats rows independently given the factor, so the copies of W at every spec are stacked
    along N, each row carrying its own largest code; the result for each spec is what
    :func:`gptq_quantize` alone gives (it is this function with one spec). The specs must share the
    group size and the symmetry (they differ in bits only).

    ``kernel``: run each sub-block of columns as one Triton launch (:mod:`slq.quant.triton_gptq`,
    bit-identical to the torch loop); the default uses it on CUDA tensors when Triton is installed.
    ``act_order``: columns by decreasing diag(H), static groups (module docstring): a permutation of W's
    columns and of H around the same column loop; the kernel then reads each column's own group parameters.
    """
    if not specs:
        return []
    if len({(s.group_size, s.symmetric) for s in specs}) != 1:
        raise ValueError("gptq_quantize_many: specs must differ in bits only")
    spec0 = specs[0]
    N, K = W.shape
    R = len(specs)
    NR = N * R
    G = spec0.effective_group(K)
    W = W.to(torch.float32).clone()
    W[:, fac.dead] = 0.0
    W = W.repeat(R, 1)
    maxq = torch.tensor([s.maxq for s in specs], dtype=torch.float32, device=W.device).repeat_interleave(N)[:, None]
    if R == 1:
        maxq = spec0.maxq  # plain integer path
    if kernel is None:  # importing Triton costs a second: only where the kernel could run
        kernel = (W.is_cuda or os.environ.get("TRITON_INTERPRET") == "1") and _triton_gptq().usable(W)
    if kernel and not _triton_gptq().usable(W):
        raise ValueError("gptq_quantize_many(kernel=True) needs Triton and a CUDA tensor (or TRITON_INTERPRET=1)")

    # Static groups (act-order, or one group per row): parameters from the original weights, before any
    # update. Otherwise each group's parameters come from its updated weights when its first column is reached.
    static = act_order or G == K
    scales = torch.zeros(NR, K // G, dtype=torch.float16, device=W.device)
    zeros = torch.zeros(NR, K // G, dtype=torch.int64, device=W.device)
    if static:
        scales, zeros = qparams(W, spec0, G, clip=clip, maxq=maxq)
    if act_order:  # the loop runs over the permuted columns; column j of the loop is column perm[j] of W
        perm = torch.argsort(torch.diag(fac.H), descending=True, stable=True).to(W.device)
        invperm = torch.argsort(perm)
        U = factor(fac.H[perm][:, perm], fac.damp).U
        W = W[:, perm]
        group = perm // G  # loop column -> its group in the stored (contiguous) layout
    else:
        U, group = fac.U, None
    U = U.to(W.device).contiguous()  # LAPACK hands back column-major factors; the kernel reads rows
    codes = torch.zeros(NR, K, dtype=torch.uint8, device=W.device)
    # Blocks hold whole groups when groups are computed on the fly. Two levels of lazy updates: inside a
    # sub-block of `inner` columns the rank-1 updates touch only that sub-block; its errors reach the rest of
    # the block in one product, and the rest of the matrix after the block (the reads per column drop from the
    # block's width to the sub-block's). Dynamic group starts are sub-block starts, and every earlier error
    # has been applied to the group's columns by then.
    B = block_size if static else max(block_size, G)
    inner = math.gcd(B, 16) if static else math.gcd(B, G, 16)
    if kernel:
        triton_gptq = _triton_gptq()
        maxq_rows = (maxq[:, 0] if isinstance(maxq, torch.Tensor)
                     else torch.full((NR,), float(maxq), device=W.device)).contiguous()
    for i1 in range(0, K, B):
        i2 = min(i1 + B, K)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        if group is not None:  # each column's own group parameters, [NR, i2 - i1]
            s_blk, z_blk = scales[:, group[i1:i2]], zeros[:, group[i1:i2]]
        for j1 in range(0, i2 - i1, inner):
            j2 = min(j1 + inner, i2 - i1)
            col = i1 + j1
            if group is not None:
                s_sub, z_sub = s_blk[:, j1:j2].contiguous(), z_blk[:, j1:j2].contiguous()
            else:  # the whole sub-block lies in group g: parameters [NR]
                g = col // G
                if not static and col % G == 0:  # B is a multiple of G, so the whole group lies in this block
                    s, z = qparams(W1[:, j1 : j1 + G], spec0, G, clip=clip, maxq=maxq)
                    scales[:, g], zeros[:, g] = s[:, 0], z[:, 0]
                s_sub, z_sub = scales[:, g], zeros[:, g]
            if kernel:  # the same arithmetic as the loop below, one launch per sub-block
                triton_gptq.subblock(W1[:, j1:j2], U1[j1:j2, j1:j2], s_sub, z_sub, maxq_rows,
                                     codes[:, col : i1 + j2], Err1[:, j1:j2])
            for i in range(j1, j2) if not kernel else ():
                if group is not None:
                    s, z = s_sub[:, i - j1 : i - j1 + 1], z_sub[:, i - j1 : i - j1 + 1]
                else:
                    s, z = s_sub[:, None], z_sub[:, None]
                w = W1[:, i : i + 1]
                q = _codes(w.unsqueeze(1), s, z, maxq).reshape(NR, 1)
                codes[:, i1 + i] = q[:, 0].to(torch.uint8)
                wq = _dequant_grouped(q.unsqueeze(1), s, z).reshape(NR, 1)
                err = (w - wq) / U1[i, i]
                W1[:, i:j2] -= err @ U1[i : i + 1, i:j2]
                Err1[:, i] = err[:, 0]
            if j2 < i2 - i1:
                W1[:, j2:] -= Err1[:, j1:j2] @ U1[j1:j2, j2:]
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]
    if act_order:
        codes = codes[:, invperm]  # back to the stored column order
    zeros = zeros.to(torch.uint8)
    return [QuantizedWeight(codes[r * N:(r + 1) * N], scales[r * N:(r + 1) * N], zeros[r * N:(r + 1) * N], s)
            for r, s in enumerate(specs)]


def output_error(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor) -> float:
    """tr((W - W_hat) H (W - W_hat)^T): the layer-output squared error per input row."""
    D = (W.double() - W_hat.double()).to(H.device)
    return float(torch.einsum("nk,kl,nl->", D, H.double(), D))
