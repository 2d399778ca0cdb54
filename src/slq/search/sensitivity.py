"""Per-unit sensitivities: the predicted loss of each allocation unit at each bitwidth.

All estimators score against the reference on the same *sensitivity windows* (a subset of the
calibration windows, disjoint from the windows the search verifies on) and return
``costs[unit][bits]`` = predicted mean KL(reference || candidate) per token when that unit
alone is quantized to ``bits`` (0 at 16). The search adds them over units (the linearity
assumption) and maps predicted KL to predicted EAR through :class:`EarMap`.

- ``linear`` (linearity theorem, HIGGS): quantize one unit at a time at the probe bitwidth(s)
  from the bank, measure KL and 1-EAR; fit ``alpha_m`` in ``KL = alpha_m * t_m(b)`` (least
  squares through the origin; ``t_m(b)`` is the unit's relative output error, from the bank)
  and predict every bitwidth from ``t_m(b)``. Cost: units x probe bitwidths partial forwards.
- ``shapley`` (the paper's multi-bitwidth Shapley values): for each quantized bitwidth and each
  of ``P`` random orderings, units are switched from 16-bit to that bitwidth one at a time and
  the marginal change of KL is credited to the unit switched; marginals are averaged over the
  orderings. Cost: bitwidths x P x units partial forwards.
- ``fisher`` (ours): a second-order estimate from gradients. Labels ``y_t`` are drawn from the
  reference itself, so the per-window score ``g = grad_theta sum_t log p(y_t | x_<t)`` has
  covariance equal to the summed Fisher information, and ``KL ~ 1/2 dtheta^T F dtheta =
  1/2 E[(g . dtheta)^2]``. For a unit, ``g . dtheta = sum_members <dL/dW, W_hat(b) - W>``: one
  backward pass per window serves every unit and bitwidth. Cost: windows x draws backward passes.

The ``Prober`` keeps the reference's per-layer inputs and logits for the sensitivity windows, and
after a change only re-runs the decoder layers from the first one changed, so probing a unit in
layer l costs ``L - l`` layers plus the head.

Costs are made monotone (fewer bits never cost less) and non-negative before allocation.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from .bank import Bank
from ..quant.calib import Batch, capture_layer0_inputs, decoder_layers, run_layer
from ..util.errors import SlqError
from ..util.progress import progress_bar
from ..quant.units import KEEP_BITS

ESTIMATORS = ("linear", "shapley", "fisher")


# ----------------------------------------------------------------------------------------- probing


def _head(model: nn.Module):
    """(final norm, lm_head, softcap) of a Llama/Qwen/Mistral/Gemma-style causal LM."""
    base = getattr(model, "model", None)
    norm = getattr(base, "norm", None)
    head = model.get_output_embeddings()
    if norm is None or head is None:
        raise SlqError(f"cannot find the final norm / lm_head of {type(model).__name__} for probing")
    cap = getattr(model.config, "final_logit_softcapping", None)
    return norm, head, cap


def _kl_tv(ref_logp: torch.Tensor, cand_logits: torch.Tensor, rows: int = 256) -> tuple[float, float]:
    """Sums over positions of KL(p || q) and TV(p, q) = 1 - EAR, full vocabulary, fp32 (the same formulas as
    :func:`slq.fidelity.token_metrics`, with only what probing needs)."""
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
        self.state = {u.name: KEEP_BITS for u in bank.units}
        self.umap = bank.unit_map
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

    def set(self, changes: dict[str, int]) -> None:
        changes = {u: b for u, b in changes.items() if self.state[u] != b}
        if not changes:
            return
        quant = {u: b for u, b in changes.items() if b != KEEP_BITS}
        back = [u for u, b in changes.items() if b == KEEP_BITS]
        if quant:
            self.bank.apply(self.model, quant)
        if back:  # "16" while probing is the exact reference (its cost is 0 by definition)
            self.bank.restore(self.model, back)
        self.state.update(changes)
        self.dirty = min([self.dirty] + [self.umap[u].layer for u in changes])

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
        self.set({u: KEEP_BITS for u in self.state})


# ----------------------------------------------------------------------------------------- results


@dataclass
class Sensitivity:
    """``kl[unit][bits]`` and ``tv[unit][bits]`` (predicted 1-EAR of that unit alone), monotone."""

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
        conv = lambda x: {u: {int(b): v for b, v in r.items()} for u, r in x.items()}  # noqa: E731
        return cls(d["estimator"], conv(d["kl"]), conv(d["tv"]), d.get("probes", []), d.get("seconds", 0.0),
                   d.get("forward_calls", 0), d.get("details", {}))


def monotone(costs: dict[int, float]) -> dict[int, float]:
    """Non-negative and non-increasing in bits: cost(b) = max(cost(b), cost(b') for b' > b)."""
    out, run = {}, 0.0
    for b in sorted(costs, reverse=True):
        v = costs[b]
        run = max(run, v if math.isfinite(v) else 0.0, 0.0)
        out[b] = 0.0 if b == KEEP_BITS else run
    return dict(sorted(out.items()))


def _fit_through_origin(x: list[float], y: list[float]) -> float:
    x, y = np.asarray(x, float), np.asarray(y, float)
    den = float((x * x).sum())
    return float((x * y).sum() / den) if den > 0 else 0.0


# ----------------------------------------------------------------------------------------- estimators


def linear_estimator(prober: Prober, *, probe_bits: tuple[int, ...] = (4,), progress: bool = True) -> Sensitivity:
    bank = prober.bank
    t0, calls0 = time.perf_counter(), prober.calls
    kl, tv, probes = {}, {}, []
    for b in probe_bits:
        if b not in bank.bitwidths:
            raise SlqError(f"probe bitwidth {b} is not among the bank's bitwidths {bank.bitwidths}")
    prober.reset()
    with progress_bar(progress) as bar:
        task = bar.add_task("sensitivity (linear probes)", total=len(bank.units) * len(probe_bits))
        for u in bank.units:
            xs, ys, zs = [], [], []
            for b in probe_bits:
                prober.set({u.name: b})
                k, d = prober.measure()
                prober.set({u.name: KEEP_BITS})
                t = bank.t[u.name][b]
                probes.append({"unit": u.name, "bits": b, "t": t, "kl": k, "tv": d})
                xs.append(t)
                ys.append(k)
                zs.append(d)
                bar.advance(task)
            alpha = _fit_through_origin(xs, ys)
            # 1-EAR of one unit scales like sqrt(KL) for small perturbations: fit it on sqrt(t)
            beta = _fit_through_origin([math.sqrt(x) for x in xs], zs)
            kl[u.name] = monotone({b: alpha * bank.t[u.name][b] for b in bank.t[u.name]})
            tv[u.name] = monotone({b: beta * math.sqrt(bank.t[u.name][b]) for b in bank.t[u.name]})
    prober.reset()
    return Sensitivity("linear", kl, tv, probes, time.perf_counter() - t0, prober.calls - calls0,
                       {"probe_bits": list(probe_bits)})


def shapley_estimator(prober: Prober, *, orderings: int = 2, bitwidths: tuple[int, ...] | None = None,
                      seed: int = 0, progress: bool = True) -> Sensitivity:
    """Multi-bitwidth Shapley values of KL (and 1-EAR); bitwidths not sampled are interpolated in t."""
    bank = prober.bank
    t0, calls0 = time.perf_counter(), prober.calls
    bits_list = tuple(sorted(bitwidths or bank.bitwidths))
    names = [u.name for u in bank.units]
    rng = np.random.default_rng(seed)
    sums_kl = {n: {b: 0.0 for b in bits_list} for n in names}
    sums_tv = {n: {b: 0.0 for b in bits_list} for n in names}
    with progress_bar(progress) as bar:
        task = bar.add_task("sensitivity (Shapley)", total=len(bits_list) * orderings * len(names))
        for b in bits_list:
            for _ in range(orderings):
                prober.reset()
                prev_k = prev_d = 0.0
                for idx in rng.permutation(len(names)):
                    n = names[idx]
                    prober.set({n: b})
                    k, d = prober.measure()
                    sums_kl[n][b] += k - prev_k
                    sums_tv[n][b] += d - prev_d
                    prev_k, prev_d = k, d
                    bar.advance(task)
    prober.reset()
    # Marginals are noisy: a unit whose average marginal at a sampled bitwidth is not positive would get
    # zero cost there and, scaled by t, at every bitwidth below it. Such entries take the median
    # coefficient (marginal / t) of the units at that bitwidth instead.
    med_kl, med_tv = {}, {}
    for b in bits_list:
        rk = [sums_kl[u.name][b] / orderings / bank.t[u.name][b] for u in bank.units
              if sums_kl[u.name][b] > 0 and bank.t[u.name][b] > 0]
        rd = [sums_tv[u.name][b] / orderings / math.sqrt(bank.t[u.name][b]) for u in bank.units
              if sums_tv[u.name][b] > 0 and bank.t[u.name][b] > 0]
        med_kl[b] = float(np.median(rk)) if rk else 0.0
        med_tv[b] = float(np.median(rd)) if rd else 0.0
    floored = 0
    kl, tv = {}, {}
    for u in bank.units:
        mk = {b: sums_kl[u.name][b] / orderings for b in bits_list}
        md = {b: sums_tv[u.name][b] / orderings for b in bits_list}
        for b in bits_list:
            if mk[b] <= 0:
                mk[b] = med_kl[b] * bank.t[u.name][b]
                floored += 1
            if md[b] <= 0:
                md[b] = med_tv[b] * math.sqrt(bank.t[u.name][b])
        # bitwidths in the bank but not sampled: scale the nearest sampled one by t (linearity)
        for b in bank.bitwidths:
            if b not in mk:
                ref_b = min(bits_list, key=lambda x: abs(x - b))
                ratio = bank.t[u.name][b] / max(bank.t[u.name][ref_b], 1e-30)
                mk[b], md[b] = mk[ref_b] * ratio, md[ref_b] * math.sqrt(ratio)
        mk[KEEP_BITS] = md[KEEP_BITS] = 0.0
        kl[u.name], tv[u.name] = monotone(mk), monotone(md)
    raw = {str(b): math.fsum(sums_kl[n][b] for n in names) / orderings for b in bits_list}
    return Sensitivity("shapley", kl, tv, [], time.perf_counter() - t0, prober.calls - calls0,
                       {"orderings": orderings, "bitwidths": list(bits_list), "seed": seed, "raw_sum_kl": raw,
                        "floored_entries": floored})


def fisher_estimator(model: nn.Module, bank: Bank, windows: torch.Tensor, *, draws: int = 1, seed: int = 0,
                     batch_size: int = 4, device: str = "cpu", progress: bool = True) -> Sensitivity:
    """Second-order (Fisher) KL per unit and bitwidth from per-window gradients of sampled labels."""
    t0 = time.perf_counter()
    mods = dict(model.named_modules())
    members = [(u, m) for u in bank.units for m in u.members]
    # (member, bits) -> W_hat - W; fp32 while that stays under 4 GiB, else bf16 (only inner products
    # with gradients are taken, so bf16's 3 significant digits are plenty)
    n_el = sum(bank.original[m].numel() for _, m in members) * len(bank.bitwidths)
    store = torch.float32 if n_el * 4 <= 4 << 30 else torch.bfloat16
    deltas = {}
    for u, m in members:
        for b in bank.bitwidths:
            deltas[(m, b)] = (bank.dequantized(u, m, b) - bank.original[m].to(bank.device)).to(device, store)
    params = {m: mods[m].weight for _, m in members}
    was = {m: p.requires_grad for m, p in params.items()}
    others = [p for p in model.parameters() if all(p is not q for q in params.values())]
    other_was = [p.requires_grad for p in others]
    for p in others:
        p.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    sq = {(u.name, b): 0.0 for u in bank.units for b in bank.bitwidths}
    gen = torch.Generator().manual_seed(seed)
    n_tok = 0
    ids_all = windows[:, :-1]
    try:
        model.eval()
        with progress_bar(progress) as bar:
            task = bar.add_task("sensitivity (Fisher)", total=ids_all.shape[0] * draws)
            for w in range(ids_all.shape[0]):
                ids = ids_all[w : w + 1].to(device)
                logits = model(input_ids=ids).logits.float()[0]
                logp = torch.log_softmax(logits, -1)
                n_tok += logits.shape[0]
                for r in range(draws):
                    y = torch.multinomial(logp.detach().exp().cpu(), 1, generator=gen)[:, 0].to(logits.device)
                    score = logp.gather(-1, y[:, None]).sum()
                    grads = torch.autograd.grad(score, list(params.values()), retain_graph=r + 1 < draws)
                    g = dict(zip(params, grads))
                    for u in bank.units:
                        for b in bank.bitwidths:
                            s = sum(float(torch.dot(g[m].flatten().float(), deltas[(m, b)].flatten().float()))
                                    for m in u.members)
                            sq[(u.name, b)] += s * s
                    bar.advance(task)
    finally:
        for m, p in params.items():
            p.requires_grad_(was[m])
            p.grad = None
        for p, r in zip(others, other_was):
            p.requires_grad_(r)
    kl = {}
    for u in bank.units:
        est = {b: 0.5 * sq[(u.name, b)] / (draws * n_tok) for b in bank.bitwidths}
        est[KEEP_BITS] = 0.0
        kl[u.name] = monotone(est)
    # 1-EAR of a single unit ~ c * sqrt(KL); c from the Pinsker-like small-perturbation relation
    # TV ~ sqrt(KL / 2) * kappa is not known per model: the search's EarMap is fitted on measured points,
    # so here tv is only reported as sqrt(KL / 2) (an upper-bound-shaped guess, labelled as such).
    tv = {u: {b: math.sqrt(v / 2.0) for b, v in d.items()} for u, d in kl.items()}
    return Sensitivity("fisher", kl, tv, [], time.perf_counter() - t0, int(ids_all.shape[0]),
                       {"draws": draws, "seed": seed, "windows": int(ids_all.shape[0]),
                        "tv_note": "tv = sqrt(KL/2) (Pinsker-shaped), not fitted"})


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
