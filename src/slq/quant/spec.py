"""Typed, frozen descriptions of what gets quantized and how, and the bits accounting.

A :class:`QuantSpec` says how one linear's weight is stored: ``bits`` per weight, the
group size ``G`` along the input dimension (``None`` = one group per output row, i.e.
per-channel) and whether the grid is symmetric. A :class:`Plan` maps exact module
names to :class:`LayerPlan` records (the spec actually used, shapes, the decision that
led to it, gamma statistics).

Bits per parameter count everything a reader must load for the layer::

    bits_per_param = bits + (16 + zero_bits) / G        # fp16 scale per group
    zero_bits      = bits for asymmetric grids, 0 for symmetric ones

so uniform 8-bit at G = 64 is 8 + 24/64 = 8.375 bits/param.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ..util.errors import SlqError

SCALE_BITS = 16  # scales are stored as fp16
ALLOWED_GROUP_SIZES = (16, 32, 64, 128, 256, None)
MIN_BITS, MAX_BITS = 2, 8


@dataclass(frozen=True)
class QuantSpec:
    """How one weight matrix is quantized.

    ``group_size`` is the number of consecutive input columns that share a scale and a
    zero point; ``None`` means per-channel (one group spanning all K inputs).
    """

    bits: int
    group_size: int | None = 128
    symmetric: bool = False
    version: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or not MIN_BITS <= self.bits <= MAX_BITS:
            raise SlqError(f"bits must be an integer in {MIN_BITS}..{MAX_BITS}, got {self.bits!r}")
        g = self.group_size
        if g is not None and (not isinstance(g, int) or g < 16 or g & (g - 1)):
            raise SlqError(f"group_size must be a power of two >= 16 or None (per-channel), got {g!r}")

    @property
    def maxq(self) -> int:
        """Largest integer code: codes live in [0, 2^bits - 1]."""
        return (1 << self.bits) - 1

    def effective_group(self, K: int) -> int:
        """Group length in columns for a layer with K inputs."""
        return K if self.group_size is None else self.group_size

    def bits_per_param(self, K: int) -> float:
        """Storage bits per weight, scale and zero point included."""
        zero_bits = 0 if self.symmetric else self.bits
        return self.bits + (SCALE_BITS + zero_bits) / self.effective_group(K)

    def label(self) -> str:
        g = "ch" if self.group_size is None else f"g{self.group_size}"
        return f"int{self.bits}-{g}-{'sym' if self.symmetric else 'asym'}"


def resolve_group_size(K: int, requested: int | None) -> tuple[int | None, str]:
    """Group size actually used for a layer with ``K`` inputs, and why.

    The requested size is kept when it divides K. Otherwise the largest power of two
    >= 16 that divides K (and is below the request) is used, else per-channel.
    SmolLM2 (K = 576) at G = 128 gets 64; stories260K (K = 172) gets per-channel.
    """
    if requested is None:
        return None, "per-channel requested"
    if K % requested == 0:
        return requested, "as requested"
    g = requested // 2
    while g >= 16:
        if K % g == 0:
            return g, f"K={K} not divisible by {requested}: g{g}"
        g //= 2
    return None, f"K={K} has no power-of-two divisor >= 16: per-channel"


@dataclass
class LayerPlan:
    """The decision for one linear: its spec and the facts it rests on."""

    name: str
    N: int
    K: int
    spec: QuantSpec
    requested_group_size: int | None
    group_note: str = "as requested"
    method: str = "gptq"
    gamma_mean: float | None = None
    gamma2_mean: float | None = None
    metrics: dict = field(default_factory=dict)

    @property
    def n_params(self) -> int:
        return self.N * self.K

    @property
    def bits_per_param(self) -> float:
        return self.spec.bits_per_param(self.K)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["spec"] = asdict(self.spec)
        d["bits_per_param"] = self.bits_per_param
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "LayerPlan":
        d = dict(d)
        d.pop("bits_per_param", None)
        d["spec"] = QuantSpec(**d["spec"])
        return cls(**d)


@dataclass
class Plan:
    """Module name -> :class:`LayerPlan`, in model order."""

    layers: dict[str, LayerPlan] = field(default_factory=dict)

    def __iter__(self):
        return iter(self.layers.values())

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, name: str) -> LayerPlan:
        return self.layers[name]

    def add(self, lp: LayerPlan) -> None:
        self.layers[lp.name] = lp

    @property
    def n_params(self) -> int:
        return sum(lp.n_params for lp in self)

    @property
    def total_bits(self) -> float:
        return sum(lp.n_params * lp.bits_per_param for lp in self)

    def bits_per_param(self) -> float:
        """Average over the quantized linears, weighted by parameter count."""
        return self.total_bits / max(self.n_params, 1)

    def to_dict(self) -> dict:
        return {name: lp.to_dict() for name, lp in self.layers.items()}

    @classmethod
    def from_dict(cls, d: dict) -> "Plan":
        return cls({name: LayerPlan.from_dict(v) for name, v in d.items()})


def model_bits_per_param(plan: Plan, other_params: dict[str, tuple[int, int]]) -> float:
    """Bits per parameter over the whole model.

    ``other_params`` maps each unquantized tensor name to (numel, bits at its stored
    precision), e.g. embeddings at 32 for fp32; tied tensors must appear once.
    """
    bits = plan.total_bits + sum(n * b for n, b in other_params.values())
    n = plan.n_params + sum(n for n, _ in other_params.values())
    return bits / max(n, 1)
