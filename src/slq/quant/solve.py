"""One stacked per-layer solve: every linear of a decoder layer at one or more specs, from its Hessians.

Used by the pipeline (:func:`slq.quant.pipeline.quantize_model`, one spec per linear) and by the search's
bank (:func:`slq.search.bank.build_bank`, every candidate bitwidth per linear).

GPTQ is row-independent given the factor of the Hessian. The rows that share one Hessian (the linears
reading one input: q/k/v, gate/up; with attention-aware Hessians a key or value projection has one per
key/value head, i.e. one per block of rows) and one list of specs are stacked along N and solved in one
pass over the columns: one Cholesky factor per Hessian (:func:`slq.quant.gptq.factor`), one pass per
stack (:func:`slq.quant.gptq.gptq_quantize_many`, which gives every spec exactly the codes of its own run).
RTN quantizes the same stacks (it is row-independent too); without Hessians each linear is one stack.

Each linear's result keeps the blocks of its rows with the Hessian they were solved against (GPTQ: the
factor's undamped H, dead inputs set to 1; RTN: the accumulated H), so its layer-output error
``sum_blocks tr(dW_b H_b dW_b^T)`` is measured against what the solve saw.

Invariant: the stacks are formed in row order (the first appearance of each (Hessian, specs) pair), so the
same inputs give the same stacked matrices and the same codes, bit for bit (the bank's files are compared
byte for byte across runs).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from torch import nn

from ..util.errors import SlqError
from .config import QuantConfig
from .gptq import HessianAccumulator, RowBlockHessians, factor, gptq_quantize_many, join_rows, output_error
from .grid import QuantizedWeight, quantize_rtn
from .spec import QuantSpec


@dataclass(frozen=True)
class RowPiece:
    """Rows ``[start, end)`` of linear ``name`` with their own Hessian (``None``: RTN without Hessians)."""

    name: str
    start: int
    end: int
    hessian: HessianAccumulator | None


@dataclass(frozen=True)
class RowBlock:
    """Rows ``[start, end)`` of a linear and the Hessian (fp64 [K, K]) they were solved against."""

    start: int
    end: int
    H: torch.Tensor


@dataclass(frozen=True)
class LinearSolution:
    """One linear's quantized weight at each spec asked for (in that order), and its row blocks."""

    qweights: tuple[QuantizedWeight, ...]
    blocks: tuple[RowBlock, ...]  # empty when solved without Hessians

    def output_error(self, W: torch.Tensor, W_hat: torch.Tensor) -> float:
        """``sum_blocks tr((W - W_hat)_b H_b (W - W_hat)_b^T)``, on ``W_hat``'s device."""
        W = W.to(W_hat.device)
        return sum(output_error(W[b.start:b.end], W_hat[b.start:b.end], b.H) for b in self.blocks)


def row_pieces(hessians: Mapping[str, HessianAccumulator | RowBlockHessians],
               n_rows: Mapping[str, int]) -> list[RowPiece]:
    """Every block of rows that has its own Hessian, linear by linear, in row order."""
    out = []
    for name, h in hessians.items():
        if isinstance(h, RowBlockHessians):
            if len(h.blocks) * h.rows != n_rows[name]:
                raise ValueError(f"{name}: {len(h.blocks)} x {h.rows} row blocks for {n_rows[name]} rows")
            out += [RowPiece(name, g * h.rows, (g + 1) * h.rows, acc) for g, acc in enumerate(h.blocks)]
        else:
            out.append(RowPiece(name, 0, n_rows[name], h))
    return out


def layer_weights(linears: Mapping[str, nn.Linear]) -> dict[str, torch.Tensor]:
    """name -> fp32 weight [N, K] of each linear; a weight with NaN or Inf is refused."""
    out = {}
    for name, lin in linears.items():
        W = lin.weight.detach().float()
        if not torch.isfinite(W).all():
            raise SlqError(f"weight {name}.weight contains NaN or Inf values")
        out[name] = W
    return out


@torch.no_grad()
def solve_layer(weights: Mapping[str, torch.Tensor], specs: Mapping[str, Sequence[QuantSpec]], config: QuantConfig,
                hessians: Mapping[str, HessianAccumulator | RowBlockHessians] | None = None
                ) -> dict[str, LinearSolution]:
    """Quantize each linear of ``weights`` (name -> fp32 [N, K]) at each of ``specs[name]``.

    ``config`` gives the method, ``clip``, ``damp``, ``act_order`` and the ``device`` GPTQ runs on.
    ``hessians`` (name -> its Hessian(s), as :func:`slq.quant.calib.collect_hessians` returns them) is
    required for GPTQ; with RTN it only groups the rows and supplies the blocks' Hessians. A linear's specs
    may mix group sizes: those that share a group size and symmetry are stacked into one pass (they differ
    in bits only), and every pass over one Hessian reuses its one factor.
    """
    gptq = config.method == "gptq"
    if hessians is None:
        if gptq:
            raise SlqError("GPTQ needs the layer's Hessians")
        pieces = [RowPiece(name, 0, W.shape[0], None) for name, W in weights.items()]
    else:
        pieces = row_pieces({name: hessians[name] for name in weights}, {n: W.shape[0] for n, W in weights.items()})
    # A linear's specs are split by (group size, symmetry): one column pass serves specs that differ in bits
    # only. The factor is per Hessian, so every group size of every linear sharing it reuses one factor.
    parts: dict[str, list[tuple[tuple[int, ...], tuple[QuantSpec, ...]]]] = {}
    for n in weights:
        by_grid: dict[tuple, list[int]] = {}
        for k, s in enumerate(specs[n]):
            by_grid.setdefault((s.group_size, s.symmetric), []).append(k)
        parts[n] = [(tuple(ks), tuple(specs[n][k] for k in ks)) for ks in by_grid.values()]
    stacks: dict[tuple, list[RowPiece]] = {}
    where: dict[tuple, dict[str, tuple[int, ...]]] = {}  # stack -> linear -> indices into specs[linear]
    for p in pieces:
        for ks, sub in parts[p.name]:
            key = (id(p.hessian) if p.hessian is not None else p.name, sub)
            stacks.setdefault(key, []).append(p)
            where.setdefault(key, {})[p.name] = ks

    factors = {}
    got: dict[str, list[list[tuple[int, QuantizedWeight]]]] = {n: [[] for _ in specs[n]] for n in weights}
    blocks: dict[str, list[RowBlock]] = {n: [] for n in weights}
    blocked: set[tuple[str, int]] = set()
    for (key, stack_specs), ps in stacks.items():
        Ws = torch.cat([weights[p.name][p.start:p.end] for p in ps])
        H = None
        if gptq:
            if key not in factors:
                factors[key] = factor(ps[0].hessian.H, config.damp)
            fac = factors[key]
            res = gptq_quantize_many(Ws.to(config.device), fac, list(stack_specs), clip=config.clip,
                                     act_order=config.act_order)
            H = fac.H
        else:
            res = [quantize_rtn(Ws, s, clip=config.clip) for s in stack_specs]
            if ps[0].hessian is not None:
                H = ps[0].hessian.H
        for k, r in enumerate(res):
            row = 0
            for p in ps:
                n = p.end - p.start
                got[p.name][where[(key, stack_specs)][p.name][k]].append(
                    (p.start, QuantizedWeight(r.codes[row:row + n], r.scale[row:row + n], r.zero[row:row + n],
                                              r.spec)))
                row += n
        if H is not None:
            for p in ps:
                if (p.name, p.start) not in blocked:  # one block per rows, however many group sizes
                    blocked.add((p.name, p.start))
                    blocks[p.name].append(RowBlock(p.start, p.end, H))
    return {n: LinearSolution(tuple(join_rows(lst) for lst in got[n]),
                              tuple(sorted(blocks[n], key=lambda b: b.start))) for n in weights}
