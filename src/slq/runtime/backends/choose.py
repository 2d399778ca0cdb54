"""Choosing a QuantLinear backend per layer and batch size from a measured kernel table.

A table is a JSON file written by ``bench/kernels_gpu.py`` (``per_layer`` rows, possibly inside
``runs``) or by ``slq bench`` (``rows`` of kind ``layer``). A row says: backend (``ours`` is the
Triton backend), bits, M (rows of the activation = batch size at decode), the layer it timed
(``layer`` = qkv / o / gate_up / down with ``shapes`` giving its [N, K], or ``N`` and ``K``
directly), and ``us`` per call.

The rule, for a layer with [N, K], ``bits`` and group ``G`` at batch ``m``:

1. Candidates are the backends available here (triton: Triton + CUDA, fp16/bf16 models;
   humming: the package + CUDA, fp16 models) that can take the layer (triton: 32 | K and G a power of two >= 16 dividing K or
   per-channel; humming: 128 | N and 32 | K). No candidate -> ``reference``.
2. Rows of candidate backends are narrowed step by step: the measured bitwidth nearest to
   ``bits`` (ties -> the wider one, it is the slower and so the safer estimate); the measured M
   nearest to ``m`` in log2 (ties -> the larger M); then rows of the same [N, K]; failing that,
   rows of the same role (q/k/v -> qkv, o, gate/up -> gate_up, down); failing that, every
   measured layer, compared by the sum of times over the layers all candidates were timed on.
3. The candidate with the least time wins (the mean when a row was measured more than once).
   With no rows at all for the candidates: triton for m <= 4, humming above (the H100 result:
   the tiled Triton path loses to Humming at M = 16), whichever of the two is available.

On CPU ``slq.load(..., backend="auto")`` takes ``reference`` without reading a table. On CUDA the
default table is ``$SLQ_KERNEL_TABLE``, else the one shipped with slq for this GPU
(:mod:`slq.runtime.backends.tables`, package data), so a wheel chooses as a source checkout does.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from torch import nn

from ...models.arch import kind_of
from ...quant.spec import QuantSpec
from . import humming, tables
from .tables import Row, read_table  # noqa: F401 - a table's rows, read here by choose_backends

def eligible(backend: str, n: int, k: int, group: int | None) -> bool:
    g = k if group is None or group >= k else group
    if backend == "reference":
        return True
    if backend == "triton":
        return k % 32 == 0 and k % g == 0 and g >= 16 and (g == k or (g & (g - 1) == 0))
    if backend == "humming":
        return n % 128 == 0 and k % 32 == 0 and k % g == 0
    return False


def _nearest(values, target: float, key):
    return min(values, key=lambda v: (abs(key(v) - key(target)), -v))


def choose(n: int, k: int, bits: int, group: int | None, batch: int, rows: list[Row], available,
           role: str | None = None) -> tuple[str, str]:
    """(backend, why) for one layer; see the module docstring for the rule."""
    cands = [b for b in ("triton", "humming") if b in available and eligible(b, n, k, group)]
    if not cands:
        return "reference", "no fast backend available for this layer"
    rs = [r for r in rows if r.backend in cands]
    if not rs:
        pref = ["triton", "humming"] if batch <= 4 else ["humming", "triton"]
        return next(b for b in pref if b in cands), "no measurements: default by batch size"
    b = _nearest({r.bits for r in rs}, bits, key=float)
    rs = [r for r in rs if r.bits == b]
    m = _nearest({r.M for r in rs}, batch, key=lambda v: math.log2(max(v, 1)))
    rs = [r for r in rs if r.M == m]
    same = [r for r in rs if (r.N, r.K) == (n, k)]
    how = "same shape"
    if not same and role is not None:
        same = [r for r in rs if r.role == role]
        how = "same role"
    if same:
        t = {c: [r.us for r in same if r.backend == c] for c in cands}
        t = {c: sum(v) / len(v) for c, v in t.items() if v}
    else:
        how = "all layers"
        keys = {c: {(r.role, r.N, r.K) for r in rs if r.backend == c} for c in cands}
        keys = {c: v for c, v in keys.items() if v}
        common = set.intersection(*keys.values())
        t = {}
        for c in keys:
            per = {}
            for r in rs:
                if r.backend == c and (r.role, r.N, r.K) in common:
                    per.setdefault((r.role, r.N, r.K), []).append(r.us)
            t[c] = sum(sum(v) / len(v) for v in per.values())
    best = min(t, key=t.get)
    return best, f"measured b={b} M={m} ({how}): " + ", ".join(f"{c} {t[c]:.1f} us" for c in sorted(t))


def available_backends() -> set[str]:
    out = {"reference"}
    if not torch.cuda.is_available():
        return out
    from . import triton_gemv  # lazy: importing it imports triton

    if triton_gemv.available():
        out.add("triton")
    if humming.available():
        out.add("humming")
    return out


def default_table(device_name: str | None = None):
    """$SLQ_KERNEL_TABLE, else the table slq ships for ``device_name`` (default: this CUDA GPU), else None."""
    env = os.environ.get("SLQ_KERNEL_TABLE")
    if env:
        return Path(env)
    if device_name is None:
        if not torch.cuda.is_available():
            return None
        device_name = torch.cuda.get_device_name()
    return tables.packaged(device_name)


def _is_quantized(m: nn.Module) -> bool:
    """A QuantLinear, known by what the chooser reads (a QuantSpec ``spec`` and its shape)."""
    return isinstance(getattr(m, "spec", None), QuantSpec) and hasattr(m, "out_features") and hasattr(m, "codes")


def choose_backends(model, batch_size: int = 1, table=None, available=None) -> dict:
    """Backend per QuantLinear of ``model`` for decode at ``batch_size``; returns the record that
    ``slq.load`` stores as ``model.slq_backends`` ({"rule", "table", "batch_size", "layers", "why"})."""
    available = available_backends() if available is None else set(available)
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    dtype = emb.weight.dtype if emb is not None else torch.float16
    if dtype not in (torch.float16, torch.bfloat16):
        available -= {"triton", "humming"}  # both take fp16/bf16 activations only
    elif dtype != torch.float16:
        available -= {"humming"}  # slq prepares Humming layers for fp16 activations
    src = default_table() if table is None else table
    rows = read_table(src) if src is not None else []
    layers, why = {}, {}
    for name, m in model.named_modules():
        if _is_quantized(m):
            kind = kind_of(name)  # the kernel table names a layer by its kind: qkv, o, gate_up, down
            role = kind.split(".")[-1] if kind else None
            layers[name], why[name] = choose(m.out_features, m.in_features, m.bits, m.group, batch_size,
                                             rows, available, role)
    return {"rule": "measured table" if rows else "default by batch size", "table": None if src is None or
            isinstance(src, dict) else tables.label(src), "batch_size": batch_size, "layers": layers, "why": why}
