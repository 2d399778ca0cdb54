"""Adapter for the Humming kernel library (PyPI ``humming-kernels==0.1.19``), imported lazily.

Humming computes ``w = (q - z) * s`` for unsigned ``b``-bit codes with integer zero points,
the same function as our checkpoint. Its own (pre-transform) tensors are:

* ``weight``     int32 ``[N, K*b/32]``: codes packed along K, 32 codes in ``b`` words, code ``i``
  of a run at bit ``i*b`` of the little-endian bit stream (``humming.ops.pack_weight``);
* ``weight_scale`` ``[N, K/G]`` in the activation dtype (``[N, 1]`` per-channel);
* ``zero_point`` int32 ``[N*b/32, K/G]``: zero points packed the same way along N.

``HummingLayer.transform()`` then builds its kernel layout and picks kernels. A layer is built
for one activation dtype (its scales are stored in it): bf16 activations get bf16 scales.
"""

from __future__ import annotations

import dataclasses
import importlib.util

import torch

__all__ = ["HummingWeight", "available", "repack"]


def available() -> bool:
    """True when humming is importable and a CUDA GPU is present (it has no CPU path)."""
    return importlib.util.find_spec("humming") is not None and torch.cuda.is_available()


@dataclasses.dataclass(frozen=True, eq=False)
class HummingWeight:
    layer: torch.nn.Module  # humming.layer.HummingLayer, transformed
    n: int
    k: int
    dtype: torch.dtype

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != self.dtype:
            raise TypeError(f"this Humming layer was built for {self.dtype}, got {x.dtype} activations")
        lead = x.shape[:-1]
        y = self.layer(x.reshape(-1, self.k).contiguous())
        return y.reshape(*lead, self.n)


def repack(
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    bits: int,
    group_size: int | None,
    dtype: torch.dtype = torch.float16,
) -> HummingWeight:
    """Build a transformed Humming layer from (codes uint8 [N, K], scale [N, K/G], zero uint8 [N, K/G])."""
    from humming import ops
    from humming.layer import HummingLayer

    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be in 2..8, got {bits}")
    n, k = codes.shape
    per_channel = group_size is None or group_size >= k
    ng = 1 if per_channel else k // group_size
    if scale.shape != (n, ng) or zero.shape != (n, ng):
        raise ValueError(f"scale/zero must be [{n}, {ng}], got {tuple(scale.shape)} / {tuple(zero.shape)}")
    if k % 32 or (n * bits) % 32 or n % 32:
        raise ValueError(f"Humming needs 32 | K and 32 | N (got N={n}, K={k})")
    dev = torch.device("cuda", torch.cuda.current_device()) if not codes.is_cuda else codes.device
    with torch.cuda.device(dev):
        weight = ops.pack_weight(codes.to(dev, torch.int32).contiguous(), bits)
        zp = ops.pack_weight(zero.to(dev, torch.int32).t().contiguous(), bits).t().contiguous()
        layer = HummingLayer(
            shape_n=n,
            shape_k=k,
            weight_config={
                "quant_method": "humming",
                "dtype": f"uint{bits}",
                "group_size": 0 if per_channel else int(group_size),
                "has_zero_point": True,
            },
            torch_dtype=dtype,
            pad_n_to_multiple=64,
            pad_k_to_multiple=128,
        ).to(dev)
        layer.load_from_tensors({"weight": weight, "weight_scale": scale.to(dev, dtype).contiguous(), "zero_point": zp})
        layer.transform()
    return HummingWeight(layer=layer, n=n, k=k, dtype=dtype)
