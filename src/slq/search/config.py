"""What the search measures and aims at: one typed, frozen object that composes :class:`QuantConfig`.

The CLI builds a :class:`SearchConfig` from its flags; :func:`slq.search.search`, the session and the
targets read it. Each default is declared here once and validated once; a bad value raises
:class:`ConfigError` naming the field. :meth:`SearchConfig.from_settings` builds one from flat keyword
settings (those of :class:`QuantConfig`, except its ``bits``, go into ``.quant``; ``bits`` is the search's
budget), the form :func:`slq.search.search` also accepts.

Three defaults are derived from other fields: ``probe_bits`` (4, or the candidate nearest to it),
``confirm_windows`` (as many as ``verify_windows``) and ``groups`` (the one ``quant.group_size``). They are resolved at construction, and :meth:`with_`
derives them again from the new settings unless they were given explicitly.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from .estimators import ESTIMATORS
from .targets import ANCHOR_BITS, TARGETS
from ..quant.config import QuantConfig
from ..quant.spec import ALLOWED_GROUP_SIZES
from ..quant.units import HEAD_MIN_BITS, KEEP_BITS
from ..runtime.export import VLLM_ASYMMETRIC_BITS, VLLM_MARLIN_GROUPS, VLLM_SYMMETRIC_BITS
from ..util.errors import ConfigError

RUNTIMES = ("vllm",)
UNIT_MODES = ("fused", "linear")
DEFAULT_BITWIDTHS = (2, 3, 4, 5, 6, 7, 8, 16)
QUANT_FIELDS = frozenset(f.name for f in fields(QuantConfig)) - {"bits"}  # flat settings that go into .quant
SEARCH_CALIB_SAMPLES = 32  # the search's calibration windows (a uniform quantization's default is larger)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _ints(name: str, v) -> tuple[int, ...]:
    if isinstance(v, (str, bytes)):
        raise ConfigError(name, f"{{field}} must be a sequence of integers, got {v!r}")
    try:
        out = tuple(int(x) for x in v)
    except (TypeError, ValueError):
        raise ConfigError(name, f"{{field}} must be a sequence of integers, got {v!r}") from None
    if any(int(x) != x for x in v):
        raise ConfigError(name, f"{{field}} must be integers, got {v!r}")
    return out


def _groups(v, own) -> tuple:
    """The candidate group sizes: ``None`` -> ``(own,)``; else distinct, coarse to fine (per-channel first),
    each an allowed group size, ``own`` among them."""
    if v is None:
        return (own,)
    if isinstance(v, (str, bytes, int)) or not hasattr(v, "__iter__"):
        raise ConfigError("groups", f"{{field}} must be a sequence of group sizes, got {v!r}")
    gs = tuple(dict.fromkeys(v))
    bad = [g for g in gs if g not in ALLOWED_GROUP_SIZES or (g is not None and not _is_int(g))]
    if not gs or bad:
        raise ConfigError("groups", f"{{field}} must be group sizes among 16, 32, 64, 128, 256 or None "
                                    f"(per-channel), got {list(v)!r}")
    if own not in gs:
        raise ConfigError("groups", f"{{field}} {list(gs)} must include the group size {own} (group_size): "
                                    "uniform assemblies and probes use it")
    return tuple(sorted(gs, key=lambda g: -(g or 1 << 30)))


@dataclass(frozen=True)
class SearchConfig:
    """Settings of one search.

    :param quant: the quantization settings of the bank (grid, GPTQ, calibration). Its ``bits`` is unused.
    :param target: ``"dl"`` (EAR lower bound >= ``ear``), ``"tl"`` (zero-shot recovery) or ``"bits"`` (a budget).
    :param ear: DL target: the 95% lower bound of measured EAR to reach, in (0, 1).
    :param recovery: TL target: zero-shot accuracy recovery, in (0, 1].
    :param bits: ``bits`` target: average bits per parameter of the allocatable linears.
    :param tasks: TL tasks; ``None``: piqa, arc_easy, hellaswag, winogrande.
    :param task_limit: TL: first K items of each task (``None``: all).
    :param task_dir: TL: folder of the task files (``None``: the shared data).
    :param tolerance: TL: the largest accuracy change that still counts as lossless.
    :param max_rounds: verification rounds at most.
    :param bitwidths: candidate bitwidths per unit, 2..8, and 16 for "keep in 16-bit".
    :param groups: candidate group sizes per unit (16..256, ``None`` per-channel), each resolved per unit K;
        every choice is a (bitwidth, group size) pair. ``None``: ``(quant.group_size,)``, one group size.
        ``quant.group_size`` is the one uniform assemblies, probes and the TL anchor use, so it must be among them.
    :param head: the lm_head (with a tied embedding, the pair) as one more allocation unit, with the choices
        8 bits (at each group size) and 16; needs 8 among ``bitwidths`` and the linear or Fisher estimator.
        Off by default. (``quant.head_bits`` is the uniform pipeline's; the search refuses it.)
    :param units: ``"fused"`` (linears a fused kernel shares get one bitwidth) or ``"linear"``.
    :param estimator: sensitivity estimator, a name in :data:`slq.search.estimators.ESTIMATORS`.
    :param sens_windows: calibration windows the sensitivities are measured on.
    :param sens_seq_len: tokens per sensitivity window (``None``: ``quant.seq_len``).
    :param verify_windows: held-out windows of the verification.
    :param verify_data: another source for verification (``None``: the windows after the calibration ones).
    :param real_text_margin: DL without ``verify_data``: the lower bound must reach ``ear`` plus this margin,
        the gap between on-policy (generated) and real-text EAR; in [0, 1 - ear).
    :param confirm_windows: DL: a second held-out sample (``None``: as many as ``verify_windows``; 0: none).
    :param probe_bits: linear estimator's probe bitwidths (``None``: 4, or the candidate nearest to it).
    :param orderings: Shapley estimator: random orderings.
    :param fisher_draws: Fisher estimator: sampled labels per token.
    :param map_bits: uniform bitwidths measured to fit the KL -> EAR map.
    :param baselines: uniform bitwidths measured for the report (``None``: the candidates >= 3).
    :param frontier: compute the predicted frontier for the report.
    :param workdir: bank and sensitivity cache (``None``: under the slq cache, keyed by the settings).
    :param runtime: ``"vllm"``: only choices that runtime loads today (asymmetric 4 and 8 bits, or symmetric
        2..8, and 16; group sizes 32, 64, 128 or per-channel; fused units); the report says whether the result
        is ready for it. ``None``: every choice (transformers loads them all).
    """

    quant: QuantConfig = field(default_factory=lambda: QuantConfig(calib_samples=SEARCH_CALIB_SAMPLES))
    target: str = "dl"
    ear: float = 0.99
    recovery: float = 0.99
    bits: float | None = None
    tasks: tuple[str, ...] | None = None
    task_limit: int | None = 200
    task_dir: str | None = None
    tolerance: float = 0.01
    max_rounds: int = 4
    bitwidths: tuple[int, ...] = DEFAULT_BITWIDTHS
    groups: tuple | None = None
    head: bool = False
    units: str = "fused"
    estimator: str = "linear"
    sens_windows: int = 8
    sens_seq_len: int | None = None
    verify_windows: int = 16
    verify_data: str | None = None
    real_text_margin: float = 0.0  # TODO(measure): the on-policy vs real-text EAR gap on SmolLM2
    confirm_windows: int | None = None
    probe_bits: tuple[int, ...] | None = None
    orderings: int = 2
    fisher_draws: int = 1
    map_bits: tuple[int, ...] = (4, 5, 6, 7, 8)
    baselines: tuple[int, ...] | None = None
    frontier: bool = True
    workdir: str | Path | None = None
    runtime: str | None = None
    _derived: frozenset = field(default=frozenset(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.quant, QuantConfig):
            raise ConfigError("quant", f"{{field}} must be a QuantConfig, got {type(self.quant).__name__}")
        if self.target not in TARGETS:
            raise ConfigError("target", f"unknown {{field}} {self.target!r}; choose one of {', '.join(TARGETS)}")
        if self.target == "bits":
            if self.bits is None:
                raise ConfigError("bits", "target 'bits' needs a bits-per-parameter budget ({field})")
        if self.bits is not None and not (_is_num(self.bits) and self.bits > 0):
            raise ConfigError("bits", f"{{field}} must be a finite positive number, got {self.bits!r}")
        if not (_is_num(self.ear) and 0 < self.ear < 1):
            raise ConfigError("ear", f"{{field}} must be in (0, 1), got {self.ear}")
        if not (_is_num(self.recovery) and 0 < self.recovery <= 1):
            raise ConfigError("recovery", f"{{field}} must be in (0, 1], got {self.recovery}")
        if not (_is_num(self.real_text_margin) and 0 <= self.real_text_margin < 1 - self.ear):
            raise ConfigError("real_text_margin", f"{{field}} must be in [0, 1 - ear), got {self.real_text_margin!r}")
        if not (_is_num(self.tolerance) and 0 <= self.tolerance < 1):
            raise ConfigError("tolerance", f"{{field}} must be in [0, 1), got {self.tolerance}")
        bw = tuple(sorted(set(_ints("bitwidths", self.bitwidths))))
        quant_bits = tuple(b for b in bw if b != KEEP_BITS)
        if not quant_bits or any(not 2 <= b <= 8 for b in quant_bits):
            raise ConfigError("bitwidths", f"{{field}} must be values in 2..8 (and 16 for 'keep'), got {list(bw)}")
        if self.runtime is not None:
            bw, quant_bits = self._runtime_bitwidths(bw)
        object.__setattr__(self, "bitwidths", bw)
        if self.target == "tl" and ANCHOR_BITS not in quant_bits:
            raise ConfigError("bitwidths", f"the task-lossless target calibrates at a uniform {ANCHOR_BITS}-bit "
                                           f"anchor: include {ANCHOR_BITS} in {{field}}")
        if not isinstance(self.head, bool):
            raise ConfigError("head", f"{{field}} must be True or False, got {self.head!r}")
        if self.head and HEAD_MIN_BITS not in quant_bits:
            raise ConfigError("head", f"{{field}}: the head's quantized choice is {HEAD_MIN_BITS}-bit; include "
                                      f"{HEAD_MIN_BITS} in the bitwidths")
        if self.head and self.estimator == "shapley":
            raise ConfigError("head", "{field}: the Shapley estimator switches every unit to each bitwidth, the head "
                                      "has only 8 and 16; use the linear or Fisher estimator")
        if self.quant.head_bits is not None:
            raise ConfigError("head_bits", "{field} is the uniform quantization's head bitwidth; the search "
                                           "chooses the head's with head=True")
        if self.units not in UNIT_MODES:
            raise ConfigError("units", f"{{field}} must be one of {', '.join(UNIT_MODES)}, got {self.units!r}")
        if self.estimator not in ESTIMATORS:
            raise ConfigError("estimator", f"unknown {{field}} {self.estimator!r}; choose one of "
                                           f"{', '.join(ESTIMATORS)}")
        for name, lo in (("max_rounds", 1), ("sens_windows", 1), ("verify_windows", 1), ("orderings", 1),
                         ("fisher_draws", 1)):
            v = getattr(self, name)
            if not _is_int(v) or v < lo:
                raise ConfigError(name, f"{{field}} must be an integer >= {lo}, got {v!r}")
        if self.sens_windows > self.quant.calib_samples:
            raise ConfigError("sens_windows", f"{{field}} ({self.sens_windows}) must be <= the calibration windows "
                                              f"({self.quant.calib_samples})")
        if self.sens_seq_len is not None and not (_is_int(self.sens_seq_len)
                                                  and 2 <= self.sens_seq_len <= self.quant.seq_len):
            raise ConfigError("sens_seq_len", f"{{field}} must be in 2..{self.quant.seq_len}, got {self.sens_seq_len}")
        derived = {name for name in ("probe_bits", "confirm_windows", "groups") if getattr(self, name) is None}
        object.__setattr__(self, "groups", _groups(self.groups, self.quant.group_size))
        if self.runtime is not None:
            self._runtime_groups()
        object.__setattr__(self, "_derived", frozenset(derived))
        cw = self.verify_windows if self.confirm_windows is None else self.confirm_windows
        if not _is_int(cw) or cw < 0:
            raise ConfigError("confirm_windows", f"{{field}} must be >= 0 (0: no confirmation), got {cw!r}")
        object.__setattr__(self, "confirm_windows", cw)
        pb = self.probe_bits
        pb = (min(quant_bits, key=lambda b: (abs(b - 4), b)),) if pb is None else _ints("probe_bits", pb)
        bad = [b for b in pb if b not in quant_bits]
        if bad:
            raise ConfigError("probe_bits", f"probe bitwidth {bad[0]} ({{field}}) is not among the bitwidths")
        object.__setattr__(self, "probe_bits", tuple(pb))
        object.__setattr__(self, "map_bits", _ints("map_bits", self.map_bits))
        if self.baselines is not None:
            object.__setattr__(self, "baselines", _ints("baselines", self.baselines))
        if self.tasks is not None:
            if isinstance(self.tasks, str) or not all(isinstance(t, str) for t in self.tasks):
                raise ConfigError("tasks", f"{{field}} must be a sequence of task names, got {self.tasks!r}")
            object.__setattr__(self, "tasks", tuple(self.tasks))
        if self.task_limit is not None and (not _is_int(self.task_limit) or self.task_limit < 1):
            raise ConfigError("task_limit", f"{{field}} must be an integer >= 1, got {self.task_limit!r}")

    def _runtime_bitwidths(self, bw: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The candidate bitwidths the runtime loads (see ``runtime``)."""
        if self.runtime not in RUNTIMES:
            raise ConfigError("runtime", f"unknown {{field}} {self.runtime!r}; choose one of {', '.join(RUNTIMES)}")
        allowed = set(VLLM_SYMMETRIC_BITS if self.quant.symmetric else VLLM_ASYMMETRIC_BITS) | {KEEP_BITS}
        kept = tuple(b for b in bw if b in allowed)
        quant_bits = tuple(b for b in kept if b != KEEP_BITS)
        if not quant_bits:
            grid = "symmetric" if self.quant.symmetric else "asymmetric"
            raise ConfigError("bitwidths", f"none of {{field}} {list(bw)} loads in vLLM as {grid} weights (it loads "
                                           f"{sorted(allowed - {KEEP_BITS})})")
        if self.units != "fused":
            raise ConfigError("units", "vLLM fuses q/k/v and gate/up into one layer each, so they must share a scheme:"
                                       " {field} must be 'fused' with runtime vllm")
        return kept, quant_bits

    def _runtime_groups(self) -> None:
        if self.quant.group_size not in VLLM_MARLIN_GROUPS:
            raise ConfigError("group_size", f"{{field}} {self.quant.group_size} is not one vLLM's kernels take "
                                            "(32, 64, 128 or per-channel)")
        object.__setattr__(self, "groups", tuple(g for g in self.groups if g in VLLM_MARLIN_GROUPS))

    @property
    def quant_bits(self) -> tuple[int, ...]:
        """The candidate bitwidths that quantize (16, "keep", left out)."""
        return tuple(b for b in self.bitwidths if b != KEEP_BITS)

    @property
    def allow16(self) -> bool:
        return KEEP_BITS in self.bitwidths

    @classmethod
    def from_settings(cls, base: "SearchConfig | None" = None, **settings) -> "SearchConfig":
        """``base`` (default: all defaults) with flat keyword ``settings`` of both configs applied."""
        return (base or cls()).with_(**settings)

    def with_(self, **changes) -> "SearchConfig":
        """A copy with ``changes`` (validated again). :class:`QuantConfig`'s fields (except ``bits``) go into
        ``.quant``; the derived defaults follow the new settings unless they were given explicitly."""
        quant = {k: changes.pop(k) for k in list(changes) if k in QUANT_FIELDS}
        unknown = sorted(set(changes) - {f.name for f in fields(self) if f.init})
        if unknown:
            raise TypeError(f"unknown search setting(s): {', '.join(unknown)}")
        if quant:
            changes["quant"] = changes.get("quant", self.quant).with_(**quant)
        for name in self._derived:
            changes.setdefault(name, None)
        return replace(self, **changes)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("_derived")
        d["workdir"] = None if self.workdir is None else str(self.workdir)
        return d
