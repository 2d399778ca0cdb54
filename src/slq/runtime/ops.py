"""QuantLinear's matmuls as ``torch.library`` custom ops, so that ``torch.compile`` traces a whole
decode step (``fullgraph=True``) with every quantized linear as one opaque node.

Ops (namespace ``slq``; the Triton GEMV registers its own ``slq::quant_matmul`` in
``backends/triton_gemv.py``):

* ``slq::dequant_linear(x, codes, scale, zero, bias?, G) -> y``: the reference backend,
  ``y = x @ ((codes - zero) * scale).T + bias`` with the weight dequantized in fp32 (exact: codes,
  zeros and fp16 scales are all representable) and cast once to ``x.dtype`` before ``F.linear``.
  This is bit for bit what ``QuantLinear`` computed before it went through an op, so the op does
  not change any result; what it changes is what a tracer or a ``TorchDispatchMode`` sees: one
  node per linear instead of the dequantization's ~8 ATen ops. It has an autograd formula for ``x``
  (``dx = dy @ W``), so gradients through a reference QuantLinear still flow to the activations.
* ``slq::prepared_linear(x, handle, N) -> y``: any other prepared backend (Humming) whose weight
  is a Python object that no op schema can carry. The object is kept in a process-wide table under
  an integer ``handle``; the op takes the handle (a compile-time constant to Dynamo, which guards
  on it) and calls ``table[handle](x)``. The table holds weak references: the QuantLinear that
  registered the object owns it, and the entry goes when the object does. :func:`register` /
  :func:`release` manage the table; ``QuantLinear.set_backend`` does both.

Fake (meta) implementations give the output shape ``[*x.shape[:-1], N]`` in ``x.dtype`` without
computing, which is all that tracing needs.
"""

from __future__ import annotations

import itertools
import weakref
from typing import Callable

import torch
import torch.nn.functional as F

from ..quant.grid import dequantize

__all__ = ["dequant_linear", "prepared_linear", "register", "release"]


# ----------------------------------------------------------------------------- reference


@torch.library.custom_op("slq::dequant_linear", mutates_args=())
def _dequant_linear(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                    bias: torch.Tensor | None, group: int) -> torch.Tensor:
    w = dequantize(codes, scale, zero, group).to(x.dtype)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))


@_dequant_linear.register_fake
def _(x, codes, scale, zero, bias, group):
    return x.new_empty((*x.shape[:-1], codes.shape[0]))


def _setup(ctx, inputs, output):
    _, codes, scale, zero, _, group = inputs
    ctx.save_for_backward(codes, scale, zero)
    ctx.group = group


def _backward(ctx, dy):
    codes, scale, zero = ctx.saved_tensors
    w = dequantize(codes, scale, zero, ctx.group).to(dy.dtype)
    return dy @ w, None, None, None, None, None


_dequant_linear.register_autograd(_backward, setup_context=_setup)


def dequant_linear(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                   bias: torch.Tensor | None, group: int) -> torch.Tensor:
    """``x [..., K] -> [..., N]`` through ``slq::dequant_linear`` (the reference backend)."""
    return torch.ops.slq.dequant_linear(x, codes, scale, zero, bias, group)


# ----------------------------------------------------------------------------- prepared backends

_TABLE: weakref.WeakValueDictionary[int, Callable[[torch.Tensor], torch.Tensor]] = weakref.WeakValueDictionary()
_NEXT = itertools.count(1)


def register(fn: Callable[[torch.Tensor], torch.Tensor]) -> int:
    """Refer to ``fn`` (a prepared weight, ``x [..., K] -> [..., N]``, weakly referable; the caller keeps
    it alive) under a fresh handle."""
    h = next(_NEXT)
    _TABLE[h] = fn
    return h


def release(handle: int | None) -> None:
    """Forget a handle (no-op for None or an unknown handle)."""
    if handle is not None:
        _TABLE.pop(handle, None)


@torch.library.custom_op("slq::prepared_linear", mutates_args=())
def _prepared_linear(x: torch.Tensor, handle: int, n: int) -> torch.Tensor:
    fn = _TABLE.get(handle)
    if fn is None:
        raise RuntimeError(f"slq::prepared_linear: no prepared weight under handle {handle}")
    return fn(x)


@_prepared_linear.register_fake
def _(x, handle, n):
    return x.new_empty((*x.shape[:-1], n))


def prepared_linear(x: torch.Tensor, handle: int, n: int) -> torch.Tensor:
    """``x [..., K] -> [..., N]`` through the prepared weight kept under ``handle``."""
    return torch.ops.slq.prepared_linear(x, handle, n)
