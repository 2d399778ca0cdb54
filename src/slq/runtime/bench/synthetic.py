"""Weights for ``slq bench``: random QuantLinears, swapping a model's linears, and the bytes a forward streams.

Values do not change speed, so quantized variants hold random codes with a fixed scale and zero
(dequantized weights ~ +-0.02, like the FP16 ones). Bytes are those of the storage format:
``N K bits_per_param / 8`` for a QuantLinear (codes, fp16 scale and ``bits``-bit zero per group),
``N K x element size`` for a dense linear.
"""

from __future__ import annotations

import torch
from torch import nn

from ...models import arch
from ...quant.grid import QuantizedWeight
from ...quant.spec import QuantSpec, resolve_group_size
from ..qlinear import QuantLinear


def weight_bytes(m: nn.Module) -> float:
    """Bytes of the stored format that a forward must stream (see the module docstring)."""
    if isinstance(m, QuantLinear):
        return m.out_features * m.in_features * m.spec.bits_per_param(m.in_features) / 8
    return m.weight.numel() * m.weight.element_size()


def random_qlinear(n: int, k: int, bits: int, group: int | None, device, gen: torch.Generator) -> QuantLinear:
    """A QuantLinear of random codes, asymmetric, group resolved for K (weights ~ +-0.02)."""
    g, _ = resolve_group_size(k, group)
    spec = QuantSpec(bits, g, False)
    G = spec.effective_group(k)
    codes = torch.randint(0, 1 << bits, (n, k), dtype=torch.uint8, device=device, generator=gen)
    scale = torch.full((n, k // G), 0.04 / ((1 << bits) - 1), dtype=torch.float16, device=device)
    zero = torch.full((n, k // G), 1 << (bits - 1), dtype=torch.uint8, device=device)
    return QuantLinear(QuantizedWeight(codes, scale, zero, spec))


def bpp(bits: int, k: int, group: int | None) -> float:
    return QuantSpec(bits, resolve_group_size(k, group)[0], False).bits_per_param(k)


def decoder_linear_shapes(model) -> dict[str, tuple[int, int]]:
    """Full name -> [N, K] of every linear (dense or quantized) in the decoder layers."""
    prefix = arch.layers_prefix(model)
    out = {}
    for i, layer in enumerate(arch.decoder_layers(model)):
        for rel, mod in layer.named_modules():
            if isinstance(mod, (nn.Linear, QuantLinear)):
                out[f"{prefix}.{i}.{rel}"] = (mod.out_features, mod.in_features)
    return out


def put(model, name: str, mod: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, mod)


def quantize_random(model, names: dict, bits_of: dict[str, int], group, device, dtype, gen) -> None:
    for name, (n, k) in names.items():
        b = bits_of[name]
        if b == 16:
            lin = nn.Linear(k, n, bias=False, device=device, dtype=dtype)
            with torch.no_grad():
                lin.weight.normal_(0, 0.02, generator=gen)
            put(model, name, lin.requires_grad_(False))
        else:
            put(model, name, random_qlinear(n, k, b, group, device, gen))


def set_backend(model, backend: str) -> list[str]:
    """Prepare every QuantLinear for ``backend``; layers it cannot take stay on reference (returned)."""
    left = []
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            try:
                m.set_backend(backend)
            except Exception:  # noqa: BLE001 - shape the kernel refuses
                m.set_backend("reference")
                left.append(name)
    return left


def plan_bpp(model, names) -> float:
    """bits/param over the decoder linears of the model as it is now (exact, scales included)."""
    tot = n = 0
    for name in names:
        m = model.get_submodule(name)
        bits = m.spec.bits_per_param(m.in_features) if isinstance(m, QuantLinear) else 16.0
        tot += bits * m.out_features * m.in_features
        n += m.out_features * m.in_features
    return tot / n
