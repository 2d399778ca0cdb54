"""The user's input to ``slq bench``, checked: each bad value is one SlqError naming its flag."""

from __future__ import annotations

import importlib.util

import torch

from ...util.errors import ConfigError, SlqError
from .plans import SHAPES, Shape

BACKENDS = ("reference", "triton", "humming")


def parse_ints(text: str, what: str, lo: int = 1, hi: int | None = None) -> list[int]:
    try:
        vals = [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise SlqError(f"{what} must be a comma-separated list of integers, got {text!r}") from None
    if not vals:
        raise SlqError(f"{what} is empty")
    for v in vals:
        if v < lo or (hi is not None and v > hi):
            rng = f"in {lo}..{hi}" if hi is not None else f">= {lo}"
            raise SlqError(f"{what} must be {rng}, got {v}")
    return list(dict.fromkeys(vals))


def parse_backends(text: str) -> list[str]:
    names = [b.strip() for b in str(text).split(",") if b.strip()]
    for b in names:
        if b not in BACKENDS:
            raise SlqError(f"unknown backend {b!r}; choose from {', '.join(BACKENDS)}")
    if not names:
        raise ConfigError("backends", "{field} is empty")
    return list(dict.fromkeys(names))


def get_shape(name: str) -> Shape:
    if name not in SHAPES:
        raise SlqError(f"unknown shape {name!r}; choose one of {', '.join(SHAPES)}")
    return SHAPES[name]


def backend_status(backends: list[str], device: torch.device) -> tuple[list[str], list[dict]]:
    """(runnable backends, [{"backend", "reason"}] for the skipped ones)."""
    ok, skipped = [], []
    for b in backends:
        reason = None
        if b in ("triton", "humming") and device.type != "cuda":
            reason = f"{b} needs a CUDA GPU (this run is on {device.type})"
        elif b == "triton":
            from ..backends import triton_gemv  # lazy: imports triton

            if triton_gemv.triton is None:
                reason = "triton is not installed"
        elif b == "humming":
            if importlib.util.find_spec("humming") is None:
                reason = "humming-kernels is not installed"
        (skipped.append({"backend": b, "reason": reason}) if reason else ok.append(b))
    return ok, skipped


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ConfigError("device", f"{{field}} must be auto, cpu or cuda, got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("device", "{field} cuda was asked for but CUDA is not available")
    return torch.device(device)
