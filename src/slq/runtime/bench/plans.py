"""What ``slq bench`` times: model shapes, and the bit plans of mixed-precision variants.

A :class:`Shape` is a Llama-structured model (hidden, intermediate, heads, KV heads, layers,
vocab, head_dim); its decode step runs four fused projections per layer, ``[N, K]``:
qkv ``[(heads + 2 kv_heads) head_dim, hidden]``, o ``[hidden, heads head_dim]``,
gate_up ``[2 intermediate, hidden]``, down ``[hidden, intermediate]``.

A plan is an allocation unit -> bits (:mod:`slq.quant.units`). ``dl`` / ``tl`` are the patterns
"K/V high, MLP low" nearest a bits/param target (:func:`pattern_plan`); a JSON file gives one
explicitly (:func:`file_plan`). Bits/param are exact: scales and zeros included.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

from ...quant.units import build_units, storage_bits
from ...util.errors import SlqError
from ...util.jsonio import read_json

PLAN_TARGETS = {"dl": 5.5, "tl": 3.5}  # bits/param; pattern: K/V (attn.qkv) high, MLP low
KINDS = ("qkv", "o", "gate_up", "down")



@dataclass(frozen=True)
class Shape:
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    layers: int
    vocab: int
    head_dim: int

    def kinds(self) -> dict[str, tuple[int, int]]:
        """Fused decode projections, [N, K]."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return {"qkv": (q + 2 * kv, self.hidden), "o": (self.hidden, q), "gate_up": (2 * self.intermediate, self.hidden),
                "down": (self.hidden, self.intermediate)}

    def config(self, layers: int | None = None, max_positions: int = 4096):
        from transformers import LlamaConfig

        return LlamaConfig(vocab_size=self.vocab, hidden_size=self.hidden, intermediate_size=self.intermediate,
                           num_hidden_layers=layers or self.layers, num_attention_heads=self.heads,
                           num_key_value_heads=self.kv_heads, head_dim=self.head_dim,
                           max_position_embeddings=max_positions, tie_word_embeddings=False)


# Llama-structured shapes (qkv bias / q_norm of the Qwen families do not change the streamed bytes)
SHAPES: dict[str, Shape] = {
    "llama3-8b": Shape(4096, 14336, 32, 8, 32, 128256, 128),
    "llama3-3b": Shape(3072, 8192, 24, 8, 28, 128256, 128),
    "llama3-1b": Shape(2048, 8192, 32, 8, 16, 128256, 64),
    "qwen2.5-7b": Shape(3584, 18944, 28, 4, 28, 152064, 128),
    "qwen2.5-1.5b": Shape(1536, 8960, 12, 2, 28, 151936, 128),
    "qwen3-8b": Shape(4096, 12288, 32, 8, 36, 151936, 128),
    "tiny": Shape(256, 768, 4, 2, 2, 1024, 64),  # CPU / CI
}


def units_of(model):
    """The model's fused allocation units (an unknown family falls back to one unit per linear, silently)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_units(model)


def plan_bits(units, alloc: dict, group: int | None) -> float:
    """Exact bits/param (scales and zeros included) of a unit -> bits allocation."""
    tot = sum(storage_bits(u, alloc[u.name], group, False) for u in units)
    return tot / sum(u.n_params for u in units)


def pattern_plan(units, target: float, group: int | None) -> tuple[dict, dict]:
    """The per-kind allocation (same in every layer) with "K/V high, MLP low" closest to ``target``.

    Pattern: bits(attn.qkv) >= bits(attn.o) >= max(bits(mlp.*)) and bits(attn.qkv) > max(bits(mlp.*)).
    Among the patterns within 0.1 bits/param of the target the least spread one (qkv - lowest MLP
    bits) wins, then the closest; with none that close, the closest. Returns (unit -> bits, kind -> bits)."""
    kinds = sorted({u.kind for u in units})
    need = {"attn.qkv", "attn.o", "mlp.gate_up", "mlp.down"}
    if not need <= set(kinds):
        raise SlqError(f"mixed plans need fused units {sorted(need)}; this model has {kinds}")
    best = None
    for qkv in range(2, 9):
        for o in range(2, qkv + 1):
            for gu in range(2, min(o, qkv - 1) + 1):
                for dn in range(2, min(o, qkv - 1) + 1):
                    per = {"attn.qkv": qkv, "attn.o": o, "mlp.gate_up": gu, "mlp.down": dn}
                    alloc = {u.name: per[u.kind] for u in units}
                    bpp = plan_bits(units, alloc, group)
                    err = abs(bpp - target)
                    key = (err > 0.1, qkv - min(gu, dn) if err <= 0.1 else 0, err, -qkv, -o)
                    if best is None or key < best[0]:
                        best = (key, alloc, per)
    return best[1], best[2]


def file_plan(path: str, units) -> dict:
    """unit -> bits from a JSON file: {unit name: bits} or {kind: bits} (every layer), optionally
    under an "allocation" or "bits" key; 16 keeps a unit in FP16."""
    p = Path(path)
    d = read_json(p, "plan file", missing=f"plan {path!r} is not dl, tl or an existing JSON file")
    for key in ("allocation", "bits"):
        if isinstance(d, dict) and isinstance(d.get(key), dict):
            d = d[key]
    if not isinstance(d, dict) or not d:
        raise SlqError(f"plan file {p} must hold a JSON object unit -> bits")
    kinds = {u.kind for u in units}
    names = {u.name for u in units}
    alloc = {}
    for u in units:
        v = d.get(u.name, d.get(u.kind))
        if v is None:
            raise SlqError(f"plan file {p} gives no bits for unit {u.name}")
        alloc[u.name] = v
    unknown = [k for k in d if k not in names and k not in kinds]
    if unknown:
        raise SlqError(f"plan file {p} names unknown units: {unknown[:3]}")
    for n, v in alloc.items():
        if not isinstance(v, int) or not (2 <= v <= 8 or v == 16):
            raise SlqError(f"plan file {p}: {n} has bits {v!r}; bits must be 2..8 or 16")
    return alloc
