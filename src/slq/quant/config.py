"""How a model is quantized: one typed, frozen object, each default declared once and validated once.

:class:`QuantConfig` holds every setting of the quantization pipeline (the grid, GPTQ's options and the
calibration data). The CLI builds one from its flags; :func:`slq.quantize`, :func:`slq.quant.pipeline.quantize_model`
and the search's bank take it whole. A bad value raises :class:`ConfigError` naming the field.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import torch

from ..util.errors import ConfigError
from .spec import ALLOWED_GROUP_SIZES, QuantSpec

METHODS = ("rtn", "gptq")


@dataclass(frozen=True)
class QuantConfig:
    """Settings of one quantization run.

    :param bits: uniform bitwidth (2..8) for :func:`slq.quantize`; the search chooses per unit instead.
    :param method: ``"gptq"`` (error feedback through the layer's Hessian) or ``"rtn"`` (round to nearest).
    :param group_size: input columns sharing a scale and zero (16..256, a power of two), ``None`` per-channel.
    :param symmetric: symmetric grid (no zero point); the default asymmetric grid has an integer zero.
    :param clip: search the MSE-optimal clipping range per group.
    :param attention: attention-aware Hessians for keys and values (GPTQ); ``False``: plain ``X^T X``.
    :param act_order: GPTQ's columns by decreasing Hessian diagonal, static groups. ``None``: on for GPTQ.
    :param damp: GPTQ's damping, a fraction of the Hessian's mean diagonal, in (0, 1).
    :param calib: calibration source (text file, .jsonl, dataset id, ``"generated"``); ``None``: generated.
    :param calib_samples: calibration windows.
    :param seq_len: tokens per calibration window.
    :param batch_size: windows per forward during calibration.
    :param seed: seeds sampling and every random choice.
    :param device: ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
    :param head_bits: the output head (``lm_head``; with a tied embedding, the pair) quantized at this bitwidth
        (2..8; 8 typical), with ``group_size`` and ``symmetric``, by GPTQ on the final-normed hidden states (RTN
        with method ``rtn``). ``None``: the head is kept at 16-bit.
    :param offload: stream the model: its weights stay in their safetensors files and one decoder block at a
        time is read onto ``device`` (see :mod:`slq.models.stream`); also on by itself when the model does not
        fit the device's free memory.
    """

    bits: int = 4
    method: str = "gptq"
    group_size: int | None = 128
    symmetric: bool = False
    clip: bool = True
    attention: bool = True
    act_order: bool | None = None
    damp: float = 0.01
    calib: str | None = None
    calib_samples: int = 128
    seq_len: int = 512
    batch_size: int = 8
    seed: int = 0
    device: str = "cpu"
    offload: bool = False
    head_bits: int | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError("method", f"{{field}} must be one of {', '.join(METHODS)}, got {_lit(self.method)}")
        g = self.group_size
        if g not in ALLOWED_GROUP_SIZES or (g is not None and (not isinstance(g, int) or isinstance(g, bool))):
            raise ConfigError("group_size", "{field} must be 16, 32, 64, 128, 256 or per-channel (None), "
                                            f"got {_lit(g)}")
        if not _is_int(self.bits) or not 2 <= self.bits <= 8:
            raise ConfigError("bits", f"{{field}} must be an integer in 2..8, got {_lit(self.bits)}")
        if self.head_bits is not None and (not _is_int(self.head_bits) or not 2 <= self.head_bits <= 8):
            raise ConfigError("head_bits", "{field} must be an integer in 2..8 (the head's bitwidth) or None "
                                           f"(kept at 16-bit), got {_lit(self.head_bits)}")
        for name in ("symmetric", "clip", "attention", "offload"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(name, f"{{field}} must be True or False, got {_lit(getattr(self, name))}")
        if self.act_order is not None and not isinstance(self.act_order, bool):
            raise ConfigError("act_order", f"{{field}} must be True, False or None, got {_lit(self.act_order)}")
        if self.act_order and self.method != "gptq":
            raise ConfigError("act_order", "{field} orders GPTQ's columns: it needs method 'gptq'")
        object.__setattr__(self, "act_order", self.method == "gptq" if self.act_order is None else self.act_order)
        if not (isinstance(self.damp, (int, float)) and not isinstance(self.damp, bool) and math.isfinite(self.damp)
                and 0 < self.damp < 1):
            raise ConfigError("damp", "{field} must be in (0, 1) (a fraction of the Hessian's mean diagonal), "
                                      f"got {_lit(self.damp)}")
        object.__setattr__(self, "damp", float(self.damp))
        for name, lo in (("calib_samples", 1), ("seq_len", 2), ("batch_size", 1), ("seed", 0)):
            v = getattr(self, name)
            if not _is_int(v) or v < lo:
                raise ConfigError(name, f"{{field}} must be an integer >= {lo}, got {_lit(v)}")
        if self.calib is not None and not isinstance(self.calib, str):
            raise ConfigError("calib", f"{{field}} must be a path, a dataset id or 'generated', got {_lit(self.calib)}")
        d = self.device
        if not isinstance(d, str) or not (d == "cpu" or d == "cuda" or (d.startswith("cuda:") and d[5:].isdigit())):
            raise ConfigError("device", f"{{field}} must be cpu, cuda or cuda:N, got {_lit(d)}")
        if d.startswith("cuda"):
            if not torch.cuda.is_available():
                raise ConfigError("device", f"{{field}} {_lit(d, repr_=False)} was asked for but CUDA is not available")

    @property
    def spec(self) -> QuantSpec:
        """The uniform grid: ``bits``, ``group_size``, ``symmetric``."""
        return QuantSpec(self.bits, self.group_size, self.symmetric)

    @property
    def head_spec(self) -> QuantSpec | None:
        """The head's grid (``head_bits`` at ``group_size``, ``symmetric``), None when it stays 16-bit."""
        return None if self.head_bits is None else QuantSpec(self.head_bits, self.group_size, self.symmetric)

    def with_(self, **changes) -> "QuantConfig":
        """A copy with ``changes`` (validated again; a new method re-derives the act-order default)."""
        if changes.get("method", self.method) != self.method and "act_order" not in changes:
            changes["act_order"] = None
        return replace(self, **changes)

    def to_dict(self) -> dict:
        """Every field by name (``act_order`` resolved to a bool), JSON-ready."""
        return asdict(self)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _lit(v, repr_: bool = True) -> str:
    """A value as quoted inside a :class:`ConfigError` message."""
    return repr(v) if repr_ else str(v)
