"""Allocation units: the linears that must share one bitwidth.

Serving engines fuse some projections into one GEMM over a shared input, so they can
only hold one bitwidth: q/k/v become one unit ``attn.qkv`` and gate/up one unit
``mlp.gate_up``; ``o_proj`` (``attn.o``) and ``down_proj`` (``mlp.down``) stand alone.
Phi-3 style checkpoints already store ``qkv_proj`` / ``gate_up_proj`` as single linears,
which map onto the same kinds. A unit is named after its layer and kind, e.g.
``model.layers.3.attn.qkv``.

Modes: ``fused`` (default) for the families :mod:`slq.models.arch` has a table for (detected from
``config.model_type``; the table says which linears form each kind); ``linear`` makes every linear its own unit. An unknown family
falls back to per-linear units with a warning. Per-linear units are named after their
module and their ``kind`` is the module's path inside its layer (``self_attn.q_proj``).

Sizes count weights only (biases stay in 16-bit and are not allocated): for a unit of
``n`` weights sharing in_features ``K`` at ``bits`` with effective group ``G``::

    storage bits = n * bits + (n / G) * (16 + zero_bits)     zero_bits = 0 if symmetric else bits
    bits/param   = bits + (16 + zero_bits) / G                (QuantSpec.bits_per_param)

``n / G`` is an integer because ``G`` divides ``K`` after :func:`slq.spec.resolve_group_size`;
``bits = 16`` means "kept in 16-bit": exactly ``16 * n`` bits, no scales.

The head (``build_units(..., head=True)``): the output head ``lm_head`` (N = vocabulary, K = hidden; with a
tied embedding the pair, one Parameter) is one more unit, of kind ``"head"``, numbered after the last decoder
layer (``layer = L``). Its choices are the candidate bitwidths >= :data:`HEAD_MIN_BITS` (8) at the requested
group sizes, and always :data:`KEEP`: below 8 bits the head's error reaches every logit directly, and it is
the head kept at 16 that the decoder-only search measured. Its input is the final norm's output.

Choices: what the search may give one unit is a :class:`Choice`, a bitwidth with a group size
*resolved for the unit's K* (``None``: per-channel), or :data:`KEEP` (16-bit). Its label reads
``"8g64"``, ``"8ch"`` (per-channel) or ``"16"``. :func:`unit_choices` lists a unit's choices for
candidate bitwidths and requested group sizes; requests that resolve to the same group for this K
(G = 128 and G = 64 on K = 576, or every G on K = 172) give one choice, not two.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass

from torch import nn

from ..models import arch
from ..models.arch import FUSED_FAMILIES  # noqa: F401 - the families fused mode knows
from ..util.errors import SlqError
from .spec import SCALE_BITS, QuantSpec, resolve_group_size

MODES = ("fused", "linear")
KEEP_BITS = 16  # the allocation value meaning "leave this unit unquantized"
HEAD_KIND = "head"  # the kind of the output head's unit
HEAD_MIN_BITS = 8  # the head's quantized choices are the candidates >= this


@dataclass(frozen=True)
class Choice:
    """One allocation value: ``bits`` (2..8, or 16 = keep) at the resolved group size ``group`` (``None``:
    per-channel; always ``None`` at 16)."""

    bits: int
    group: int | None = None

    def __post_init__(self) -> None:
        if self.bits == KEEP_BITS:
            if self.group is not None:
                raise SlqError(f"a unit kept in 16-bit has no group size, got g{self.group}")
        else:
            QuantSpec(self.bits, self.group)  # validates bits and the group size

    @property
    def keep(self) -> bool:
        return self.bits == KEEP_BITS

    @property
    def label(self) -> str:
        if self.keep:
            return str(KEEP_BITS)
        return f"{self.bits}{'ch' if self.group is None else f'g{self.group}'}"

    def __str__(self) -> str:
        return self.label

    def sort_key(self) -> tuple:
        """Bits ascending, then coarse to fine groups (per-channel first)."""
        return (self.bits, -(self.group or 1 << 30))

    @classmethod
    def parse(cls, label: "str | Choice") -> "Choice":
        """``"8g64"`` -> Choice(8, 64), ``"8ch"`` -> Choice(8, None), ``"16"`` -> :data:`KEEP`."""
        if isinstance(label, Choice):
            return label
        m = re.fullmatch(r"(\d+)(?:g(\d+)|(ch))?", str(label).strip())
        if not m or (m.group(2) is None and m.group(3) is None and int(m.group(1)) != KEEP_BITS):
            raise SlqError(f"not a choice label: {label!r} (expected e.g. '8g64', '8ch' or '16')")
        return cls(int(m.group(1)), None if m.group(2) is None else int(m.group(2)))


KEEP = Choice(KEEP_BITS, None)


def unit_choices(unit: "Unit", bitwidths, groups, *, keep: bool | None = None) -> list[Choice]:
    """The unit's distinct choices: each quantized bitwidth at each requested group resolved for ``unit.K``
    (bits ascending, coarse groups first), then :data:`KEEP` when 16 is among ``bitwidths`` (or ``keep``).
    The head unit takes only the bitwidths >= :data:`HEAD_MIN_BITS`, and :data:`KEEP` unless ``keep`` is False."""
    out: list[Choice] = []
    is_head = unit.kind == HEAD_KIND
    for b in sorted(set(int(x) for x in bitwidths if x != KEEP_BITS and (not is_head or x >= HEAD_MIN_BITS))):
        for g in groups:
            c = Choice(b, resolve_group_size(unit.K, g)[0])
            if c not in out:
                out.append(c)
    out.sort(key=Choice.sort_key)
    if keep if keep is not None else (KEEP_BITS in bitwidths or is_head):
        out.append(KEEP)
    return out


def choice_storage_bits(unit: "Unit", choice: Choice, symmetric: bool) -> int:
    """Exact integer storage of ``unit`` at ``choice`` (see :func:`storage_bits`)."""
    return storage_bits(unit, choice.bits, choice.group, symmetric)


@dataclass(frozen=True)
class Unit:
    """Linears that share one bitwidth: ``members`` are full module names in model order."""

    name: str
    layer: int
    kind: str
    members: tuple[str, ...]
    n_params: int  # sum of N * K over members (weights only)
    K: int  # in_features, shared by all members


def build_units(model: nn.Module, mode: str = "fused", *, head: bool = False) -> list[Unit]:
    """Allocation units of ``model`` in model order (order of each unit's first member); ``head``: the output
    head last, as one unit of kind ``"head"`` (module docstring)."""
    if mode not in MODES:
        raise SlqError(f"unknown unit mode {mode!r}; choose one of {', '.join(MODES)}")
    linears = arch.decoder_linears(model)
    prefix = arch.layers_prefix(model)
    family = arch.family(model)
    why = arch.unsupported(model, "fused") if mode == "fused" else None
    if why:
        warnings.warn(f"{why}: allocating every linear on its own", stacklevel=2)
        mode = "linear"

    groups: dict[tuple[int, str], list[str]] = {}  # (layer, kind) -> members, insertion = model order
    for name in linears:
        layer, rel = name[len(prefix) + 1:].split(".", 1)
        kind = family.kind_of(rel) if mode == "fused" else None
        groups.setdefault((int(layer), kind or rel), []).append(name)

    units = []
    for (layer, kind), members in groups.items():
        Ks = {linears[m].in_features for m in members}
        if len(Ks) > 1:  # cannot be one GEMM: keep them apart rather than guess
            warnings.warn(f"layer {layer} {kind}: members {members} differ in in_features {sorted(Ks)}; "
                          "allocating them one by one", stacklevel=2)
            units += [_unit(m, layer, m[len(f"{prefix}.{layer}."):], (m,), linears) for m in members]
        elif kind in arch.KINDS:
            units.append(_unit(f"{prefix}.{layer}.{kind}", layer, kind, tuple(members), linears))
        else:
            units.append(_unit(members[0], layer, kind, tuple(members), linears))
    if head:
        name = arch.head_name(model)
        units.append(_unit(name, len(arch.decoder_layers(model)), HEAD_KIND, (name,),
                           {name: arch.head(model).lm_head}))
    return units


def _unit(name: str, layer: int, kind: str, members: tuple[str, ...], linears: dict[str, nn.Linear]) -> Unit:
    n = sum(linears[m].in_features * linears[m].out_features for m in members)
    return Unit(name, layer, kind, members, n, linears[members[0]].in_features)


def _spec(unit: Unit, bits: int, group_size: int | None, symmetric: bool) -> QuantSpec:
    """The spec the unit is stored with, group size resolved for its K."""
    return QuantSpec(bits, resolve_group_size(unit.K, group_size)[0], symmetric)


def bits_per_param(unit: Unit, bits: int, group_size: int | None, symmetric: bool) -> float:
    """Storage bits per weight of ``unit`` at ``bits`` (16 -> 16.0 exactly), scales included."""
    if bits == KEEP_BITS:
        return float(KEEP_BITS)
    return _spec(unit, bits, group_size, symmetric).bits_per_param(unit.K)


def storage_bits(unit: Unit, bits: int, group_size: int | None, symmetric: bool) -> int:
    """Exact integer storage of ``unit`` at ``bits``: ``n_params * bits_per_param``.

    This is the knapsack size :mod:`slq.allocate` expects.
    """
    if bits == KEEP_BITS:
        return KEEP_BITS * unit.n_params
    spec = _spec(unit, bits, group_size, symmetric)
    zero_bits = 0 if symmetric else bits
    return unit.n_params * bits + unit.n_params // spec.effective_group(unit.K) * (SCALE_BITS + zero_bits)


def unit_specs(units: list[Unit], bits: dict[str, int], group_size: int | None,
               symmetric: bool) -> dict[str, QuantSpec]:
    """Expand a unit allocation (unit name -> bits, or a :class:`Choice` / its label) to module name ->
    :class:`QuantSpec`.

    Units at 16 bits are kept unquantized and are *absent* from the result. The specs
    carry the *requested* ``group_size``: :func:`slq.quantize.layer_spec` resolves it per
    layer and records why (as :func:`bits_per_param` / :func:`storage_bits` assume).
    """
    names = {u.name for u in units}
    missing, extra = names - set(bits), set(bits) - names
    if missing or extra:
        raise SlqError(f"allocation does not match the units: missing {sorted(missing)[:3]}, "
                       f"unknown {sorted(extra)[:3]}")
    out = {}
    for u in units:
        v = bits[u.name]
        if isinstance(v, (str, Choice)):  # a choice carries its own (resolved) group size
            c = Choice.parse(v)
            if c.keep:
                continue
            spec = QuantSpec(c.bits, c.group, symmetric)
            out.update({m: spec for m in u.members})
            continue
        if v == KEEP_BITS:
            continue
        spec = QuantSpec(v, group_size, symmetric)
        out.update({m: spec for m in u.members})
    return out
