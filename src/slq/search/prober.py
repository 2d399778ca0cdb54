"""Probing: the KL and 1-EAR of the model's current weights against the reference, and what the estimators return.

The ``Prober`` keeps the reference's per-layer inputs and logits for the *sensitivity windows* (a subset of the
calibration windows, disjoint from the windows the search verifies on). After a change of some units' weights
(through the bank) it re-runs the decoder layers only from the first one changed, so probing a unit in layer
``l`` costs ``L - l`` layers plus the head. The head unit (numbered ``L``) costs the head alone, unless it is
tied to the embedding: then the embedding changed too, and the layer-0 inputs are caught again and every layer
re-run. KL(p || q) and TV(p, q) = 1 - EAR are taken over the full
vocabulary in fp32, summed over positions and divided by the token count.

A :class:`Sensitivity` holds ``kl[unit][choice]`` (a bitwidth at a group size): the predicted mean KL per token when
that unit alone is quantized to ``bits`` (0 at 16), and ``tv`` likewise for 1-EAR. :func:`monotone` makes costs
non-negative and non-increasing in bits (fewer bits never cost less) before allocation. The search adds the
units' costs (the linearity assumption) and maps predicted KL to predicted EAR with :class:`EarMap`,
``1 - EAR = c * KL^beta``, fitted in log-log space on measured points.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from .bank import Bank
from ..quant.calib import Batch, capture_layer0_inputs, decoder_layers, run_layer
from ..quant.units import HEAD_KIND, KEEP, KEEP_BITS, Choice
from ..models.arch import head as _head  # (final norm, lm_head, softcap)
from ..models.arch import head_tied


# ----------------------------------------------------------------------------------------- probing


def _kl_tv(ref_logp: torch.Tensor, cand_logits: torch.Tensor, rows: int = 256) -> tuple[float, float]:
    """Sums over positions of KL(p || q) and TV(p, q) = 1 - EAR, full vocabulary, fp32 (the same formulas as
    :func:`slq.measure.fidelity.token_metrics`, with only what probing needs)."""
    kl = tv = 0.0
    for i in range(0, ref_logp.shape[0], rows):
        lp = ref_logp[i : i + rows]
        lq = torch.log_softmax(cand_logits[i : i + rows].float(), -1)
        p = lp.exp()
        d = torch.where(p > 0, p * (lp - lq), torch.zeros_like(p))
        kl += float(d.sum(-1).clamp_min(0).double().sum())
        tv += float((0.5 * (p - lq.exp()).abs().sum(-1)).clamp(0, 1).double().sum())
    return kl, tv


class Prober:
    """Measures KL and 1-EAR of the model's current weights against the reference, incrementally.

    Call :meth:`set` to change units (through the bank), then :meth:`measure`. Only the layers from
    the first changed one are recomputed; their inputs under the current weights are cached.
    """

    def __init__(self, model: nn.Module, bank: Bank, windows: torch.Tensor, *, batch_size: int = 8,
                 device: str = "cpu"):
        self.model, self.bank, self.device = model, bank, device
        self.layers = decoder_layers(model)
        self.norm, self.head, self.cap = _head(model)
        self.umap = bank.unit_map
        self.state = {u.name: KEEP for u in bank.units}
        # a head unit tied to the embedding changes the embedding too: the layer-0 inputs are caught again
        self.tied = {u.name for u in bank.units if u.kind == HEAD_KIND} if head_tied(model) else set()
        self.windows, self.batch_size = windows, batch_size
        self.n_tokens = int(windows.shape[0] * (windows.shape[1] - 1))
        self.calls = 0
        with torch.no_grad():
            batches = capture_layer0_inputs(model, windows[:, :-1], batch_size, device)
            self.inputs: list[list[Batch]] = []  # inputs[l] = inputs of layer l under the current weights
            for layer in self.layers:
                self.inputs.append(batches)
                batches = run_layer(layer, batches)
            # reference log-probabilities, kept once (fp32): a probe then costs one log-softmax of its own
            self.ref_logp = [torch.log_softmax(self._logits(b.hidden).flatten(0, 1), -1) for b in batches]
            self.last = batches
        self.dirty = len(self.layers)  # first layer whose inputs downstream are stale

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        z = self.head(self.norm(hidden)).float()
        if self.cap:
            z = torch.tanh(z / self.cap) * self.cap
        return z

    def set(self, changes: dict) -> None:
        """Change units to choices (a :class:`~slq.quant.units.Choice`, its label, or a bitwidth at the bank's
        own group size; 16: the exact reference)."""
        changes = {u: self.bank.choice(self.umap[u], b) for u, b in changes.items()}
        changes = {u: c for u, c in changes.items() if self.state[u] != c}
        if not changes:
            return
        quant = {u: c for u, c in changes.items() if not c.keep}
        back = [u for u, c in changes.items() if c.keep]
        if quant:
            self.bank.apply(self.model, quant)
        if back:  # "16" while probing is the exact reference (its cost is 0 by definition)
            self.bank.restore(self.model, back)
        self.state.update(changes)
        self.dirty = min([self.dirty] + [self.umap[u].layer for u in changes])
        if self.tied & set(changes):
            with torch.no_grad():
                self.inputs[0] = capture_layer0_inputs(self.model, self.windows[:, :-1], self.batch_size, self.device)
            self.dirty = 0

    @torch.no_grad()
    def measure(self) -> tuple[float, float]:
        """(mean KL, mean 1-EAR) over the sensitivity tokens for the current weights."""
        self.calls += 1
        if self.dirty < len(self.layers):
            batches = self.inputs[self.dirty]
            for l in range(self.dirty, len(self.layers)):
                self.inputs[l] = batches
                batches = run_layer(self.layers[l], batches)
            self.last = batches
            self.dirty = len(self.layers)
        kl = tv = 0.0
        for b, lp in zip(self.last, self.ref_logp):
            k, d = _kl_tv(lp, self._logits(b.hidden).flatten(0, 1))
            kl += k
            tv += d
        return kl / self.n_tokens, tv / self.n_tokens

    def reset(self) -> None:
        self.set({u: KEEP for u in self.state})


# ----------------------------------------------------------------------------------------- results


@dataclass
class Sensitivity:
    """``kl[unit][choice]`` and ``tv[unit][choice]`` (predicted 1-EAR of that unit alone), monotone; keys are
    :class:`~slq.quant.units.Choice` objects, stored by their labels."""

    estimator: str
    kl: dict[str, dict[int, float]]
    tv: dict[str, dict[int, float]]
    probes: list[dict] = field(default_factory=list)  # measured points (unit, bits, kl, tv, t)
    seconds: float = 0.0
    forward_calls: int = 0
    details: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"estimator": self.estimator, "seconds": self.seconds, "forward_calls": self.forward_calls,
                "kl": {u: {str(b): v for b, v in d.items()} for u, d in self.kl.items()},
                "tv": {u: {str(b): v for b, v in d.items()} for u, d in self.tv.items()},
                "probes": self.probes, "details": self.details}

    @classmethod
    def from_dict(cls, d: dict) -> "Sensitivity":
        conv = lambda x: {u: {Choice.parse(b): v for b, v in r.items()} for u, r in x.items()}  # noqa: E731
        return cls(d["estimator"], conv(d["kl"]), conv(d["tv"]), d.get("probes", []), d.get("seconds", 0.0),
                   d.get("forward_calls", 0), d.get("details", {}))


def monotone(costs: dict) -> dict:
    """Non-negative and non-increasing in bits at each group size: cost(b, G) = max(cost(b', G) for b' >= b);
    0 at 16. Keys are bitwidths or :class:`~slq.quant.units.Choice` objects (the group is the choice's).
    Across group sizes nothing is imposed: a choice that costs more than a smaller one is dominated, and
    the allocator drops it."""
    def bits(k):
        return k.bits if isinstance(k, Choice) else k

    out = {}
    for g in dict.fromkeys(getattr(k, "group", None) for k in costs if bits(k) != KEEP_BITS):
        run = 0.0
        for k in sorted((k for k in costs if bits(k) != KEEP_BITS and getattr(k, "group", None) == g),
                        key=bits, reverse=True):
            v = costs[k]
            run = max(run, v if math.isfinite(v) else 0.0, 0.0)
            out[k] = run
    for k in costs:
        if bits(k) == KEEP_BITS:
            out[k] = 0.0
    return dict(sorted(out.items(), key=lambda kv: (bits(kv[0]), -(getattr(kv[0], "group", None) or 1 << 30))))


# ----------------------------------------------------------------------------------------- KL -> EAR


@dataclass
class EarMap:
    """Predicted ``1 - EAR = c * KL^beta``, fitted in log-log space on measured (KL, 1-EAR) points.

    With fewer than two usable points it falls back to ``beta = 0.5`` (TV ~ sqrt(KL) for small
    perturbations) through the single point, or ``c = sqrt(1/2)`` (Pinsker's bound) with none.
    """

    c: float = math.sqrt(0.5)
    beta: float = 0.5
    points: list[tuple[float, float]] = field(default_factory=list)

    def fit(self, points: list[tuple[float, float]]) -> "EarMap":
        pts = [(k, d) for k, d in points if k > 0 and d > 0 and math.isfinite(k) and math.isfinite(d)]
        self.points = pts
        if len(pts) >= 2 and len({round(math.log(k), 6) for k, _ in pts}) >= 2:
            x = np.log([k for k, _ in pts])
            y = np.log([d for _, d in pts])
            beta, logc = np.polyfit(x, y, 1)
            self.beta = float(min(max(beta, 0.25), 1.0))
            self.c = float(math.exp(np.mean(y - self.beta * x)))
        elif len(pts) == 1:
            k, d = pts[0]
            self.beta = 0.5
            self.c = d / math.sqrt(k)
        return self

    def ear(self, kl: float) -> float:
        return 1.0 - min(1.0, self.c * max(kl, 0.0) ** self.beta)

    def kl_for(self, ear: float) -> float:
        """Largest KL whose predicted EAR is >= ``ear``."""
        if ear >= 1.0:
            return 0.0
        return ((1.0 - ear) / self.c) ** (1.0 / self.beta)

    def to_dict(self) -> dict:
        return {"c": self.c, "beta": self.beta, "points": [list(p) for p in self.points],
                "form": "1 - EAR = c * KL^beta"}
