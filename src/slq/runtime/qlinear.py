"""QuantLinear: a linear layer that holds integer codes and per-group parameters.

Buffers ``codes`` (uint8 [N, K]), ``scale`` (fp16 [N, K/G]) and ``zero`` (uint8 [N, K/G])
are kernel-agnostic; a backend may repack them once at load (``set_backend``), and
forward cannot run on a backend that has not been prepared.

The ``reference`` backend dequantizes (q - z) * s in fp32 and calls F.linear: it runs on
CPU and GPU and is the oracle every kernel is tested against.

Every backend computes through a ``torch.library`` custom op (``slq::dequant_linear`` for the
reference, ``slq::quant_matmul`` for Triton, ``slq::prepared_linear`` for Humming; see ``ops.py``),
so ``torch.compile(..., fullgraph=True)`` traces a model of QuantLinears without graph breaks.
"""

from __future__ import annotations

import torch
from torch import nn

from ..quant.grid import QuantizedWeight, dequantize
from ..quant.spec import QuantSpec
from . import ops
from .backends import prepare


class QuantLinear(nn.Module):
    def __init__(self, q: QuantizedWeight, bias: torch.Tensor | None = None):
        super().__init__()
        self.spec: QuantSpec = q.spec
        self.out_features, self.in_features = q.codes.shape
        self.group = q.group
        self.register_buffer("codes", q.codes)
        self.register_buffer("scale", q.scale)
        self.register_buffer("zero", q.zero)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.backend = "reference"
        self._prepared = None
        self._handle: int | None = None  # ops table key of a prepared weight that is not an op itself

    @property
    def bits(self) -> int:
        return self.spec.bits

    def quantized_weight(self) -> QuantizedWeight:
        return QuantizedWeight(self.codes, self.scale, self.zero, self.spec)

    def dequantized_weight(self) -> torch.Tensor:
        """The dense fp32 weight [N, K] this layer computes with."""
        return dequantize(self.codes, self.scale, self.zero, self.group)

    def set_backend(self, backend: str) -> None:
        """Prepare (repack) for a backend; 'reference' needs nothing."""
        if backend == "reference":
            prepared = None
        else:
            prepared = prepare(backend, self)
        ops.release(self._handle)
        self._prepared = prepared
        # Triton's weight calls its own custom op; any other prepared weight goes behind a handle
        self._handle = None if prepared is None or backend == "triton" else ops.register(prepared)
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.backend == "reference":
            return ops.dequant_linear(x, self.codes, self.scale, self.zero, self.bias, self.group)
        if self._prepared is None:
            raise RuntimeError(f"backend {self.backend!r} was not prepared; call set_backend first")
        y = self._prepared(x) if self._handle is None else ops.prepared_linear(x, self._handle, self.out_features)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, {self.spec.label()}, backend={self.backend}"
