"""GPU backends for QuantLinear: one file each (``triton_gemv``, ``humming``), and the chooser.

``prepare(backend, layer)`` repacks a layer's kernel-agnostic buffers (codes, scale, zero) once
and returns a callable ``x -> y``. ``reference`` (dequantize + F.linear) lives in QuantLinear.
A backend reads a layer only through those buffers and ``bits`` / ``group`` / ``out_features``,
so nothing here imports QuantLinear (``qlinear`` imports this package, not the other way round).
``triton_gemv`` is imported when first needed, since importing it imports Triton.
"""

from __future__ import annotations

import torch

from ...util.errors import SlqError
from . import humming

BACKENDS = ("reference", "triton", "humming")


def prepare(backend: str, layer):
    if backend == "triton":
        from . import triton_gemv  # lazy: imports triton

        if not triton_gemv.available():
            raise SlqError("the triton backend needs Triton and a CUDA GPU")
        return triton_gemv.repack(layer.codes, layer.scale, layer.zero, layer.bits, layer.group)
    if backend == "humming":
        if layer.out_features % 128:  # its sm90 tile policy needs a 128-wide block of outputs
            raise SlqError(f"the humming backend needs out_features % 128 == 0, got {layer.out_features}")
        return humming.repack(layer.codes, layer.scale, layer.zero, layer.bits, layer.group, dtype=torch.float16)
    raise SlqError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
