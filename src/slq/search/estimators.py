"""Sensitivity estimators: the predicted KL of each allocation unit at each choice, registered by name.

A choice is a bitwidth at a group size (:class:`~slq.quant.units.Choice`). Probes and Shapley's uniform
switches run at the bank's own group size; the other group sizes are priced through ``t`` (the linear and
Shapley estimators) or directly (Fisher: one inner product per choice).

Every estimator scores against the reference on the same sensitivity windows and returns a
:class:`~slq.search.prober.Sensitivity` (``kl[unit][bits]``, made monotone, 0 at 16).

- ``linear`` (linearity theorem, HIGGS): quantize one unit at a time at the probe bitwidth(s) from the bank,
  measure KL and 1-EAR; fit ``alpha_m`` in ``KL = alpha_m * t_m(b)`` (least squares through the origin;
  ``t_m(b)`` is the unit's relative output error, from the bank) and predict every bitwidth from ``t_m(b)``.
  1-EAR is fitted the same way on ``sqrt(t_m(b))``. Cost: units x probe bitwidths partial forwards.
- ``shapley`` (multi-bitwidth Shapley values): for each quantized bitwidth and each of ``P`` random orderings,
  units are switched from 16-bit to that bitwidth one at a time and the marginal change of KL is credited to
  the unit switched; marginals are averaged over the orderings. Along one ordering the marginals telescope to
  the loss of the whole uniform assembly (efficiency). Cost: bitwidths x P x units partial forwards.
- ``fisher`` (second order): labels ``y_t`` are drawn from the reference itself, so the per-window score
  ``g = grad_theta sum_t log p(y_t | x_<t)`` has covariance equal to the summed Fisher information, and
  ``KL ~ 1/2 dtheta^T F dtheta = 1/2 E[(g . dtheta)^2]``. For a unit, ``g . dtheta = sum_members
  <dL/dW, W_hat(b) - W>``: one backward pass per window serves every unit and bitwidth. Cost: windows x draws
  backward passes.

The algorithms are plain functions of what they need (:func:`linear_estimator`, :func:`shapley_estimator`,
:func:`fisher_estimator`). The registry :data:`ESTIMATORS` maps each name to an adapter with one signature,
``fn(inputs: EstimatorInputs, config: SearchConfig) -> Sensitivity``, which reads its settings (``probe_bits``,
``orderings``, ``fisher_draws``, ``quant.seed``) from the config.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch
from torch import nn

from .bank import Bank
from .prober import Prober, Sensitivity, monotone
from ..quant.units import KEEP
from ..util.errors import ConfigError
from ..util.progress import progress_bar

if TYPE_CHECKING:  # annotations only: the config imports this registry
    from .config import SearchConfig


def _fit_through_origin(x: list[float], y: list[float]) -> float:
    x, y = np.asarray(x, float), np.asarray(y, float)
    den = float((x * x).sum())
    return float((x * y).sum() / den) if den > 0 else 0.0


def linear_estimator(prober: Prober, *, probe_bits: tuple[int, ...] = (4,), progress: bool = True) -> Sensitivity:
    bank = prober.bank
    t0, calls0 = time.perf_counter(), prober.calls
    kl, tv, probes = {}, {}, []
    for b in probe_bits:
        if b not in bank.bitwidths:  # probed at the bank's own group size; alpha serves every group size
            raise ConfigError("probe_bits", f"probe bitwidth {b} ({{field}}) is not among the bank's bitwidths "
                                            f"{bank.bitwidths}")
    prober.reset()
    with progress_bar(progress) as bar:
        task = bar.add_task("sensitivity (linear probes)", total=len(bank.units) * len(probe_bits))
        for u in bank.units:
            xs, ys, zs = [], [], []
            # probes at the probe bitwidths the unit has; a unit with none of them (the head: 8 only) at its lowest
            cs = [bank.choice(u, b) for b in probe_bits if bank.choice(u, b) in bank.t[u.name]] or bank.choices(u)[:1]
            for c in cs:
                b = c.bits
                prober.set({u.name: c})
                k, d = prober.measure()
                prober.set({u.name: KEEP})
                t = bank.t[u.name][c]
                probes.append({"unit": u.name, "bits": b, "choice": c.label, "t": t, "kl": k, "tv": d})
                xs.append(t)
                ys.append(k)
                zs.append(d)
                bar.advance(task)
            alpha = _fit_through_origin(xs, ys)
            # 1-EAR of one unit scales like sqrt(KL) for small perturbations: fit it on sqrt(t)
            beta = _fit_through_origin([math.sqrt(x) for x in xs], zs)
            kl[u.name] = monotone({c: alpha * t for c, t in bank.t[u.name].items()})
            tv[u.name] = monotone({c: beta * math.sqrt(t) for c, t in bank.t[u.name].items()})
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
        tb = {u.name: bank.t[u.name][bank.choice(u, b)] for u in bank.units}
        rk = [sums_kl[u.name][b] / orderings / tb[u.name] for u in bank.units
              if sums_kl[u.name][b] > 0 and tb[u.name] > 0]
        rd = [sums_tv[u.name][b] / orderings / math.sqrt(tb[u.name]) for u in bank.units
              if sums_tv[u.name][b] > 0 and tb[u.name] > 0]
        med_kl[b] = float(np.median(rk)) if rk else 0.0
        med_tv[b] = float(np.median(rd)) if rd else 0.0
    floored = 0
    kl, tv = {}, {}
    for u in bank.units:
        tu = {b: bank.t[u.name][bank.choice(u, b)] for b in bits_list}
        mk = {b: sums_kl[u.name][b] / orderings for b in bits_list}
        md = {b: sums_tv[u.name][b] / orderings for b in bits_list}
        for b in bits_list:
            if mk[b] <= 0:
                mk[b] = med_kl[b] * tu[b]
                floored += 1
            if md[b] <= 0:
                md[b] = med_tv[b] * math.sqrt(tu[b])
        mk = {bank.choice(u, b): v for b, v in mk.items()}
        md = {bank.choice(u, b): v for b, v in md.items()}
        # choices in the bank but not sampled (other bitwidths, other group sizes): scale the sampled one
        # nearest in bits by t (linearity)
        for c in bank.choices(u):
            if c not in mk:
                ref_b = min(bits_list, key=lambda x: (abs(x - c.bits), x))
                ratio = bank.t[u.name][c] / max(tu[ref_b], 1e-30)
                ref = bank.choice(u, ref_b)
                mk[c], md[c] = mk[ref] * ratio, md[ref] * math.sqrt(ratio)
        mk[KEEP] = md[KEEP] = 0.0
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
    n_el = sum(bank.original[m].numel() * len(bank.choices(u)) for u, m in members)
    store = torch.float32 if n_el * 4 <= 4 << 30 else torch.bfloat16
    deltas = {}
    for u, m in members:
        for c in bank.choices(u):
            deltas[(m, c)] = (bank.dequantized(u, m, c) - bank.original[m].to(bank.device)).to(device, store)
    params = {m: mods[m].weight for _, m in members}
    was = {m: p.requires_grad for m, p in params.items()}
    others = [p for p in model.parameters() if all(p is not q for q in params.values())]
    other_was = [p.requires_grad for p in others]
    for p in others:
        p.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    sq = {(u.name, c): 0.0 for u in bank.units for c in bank.choices(u)}
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
                        for c in bank.choices(u):
                            s = sum(float(torch.dot(g[m].flatten().float(), deltas[(m, c)].flatten().float()))
                                    for m in u.members)
                            sq[(u.name, c)] += s * s
                    bar.advance(task)
    finally:
        for m, p in params.items():
            p.requires_grad_(was[m])
            p.grad = None
        for p, r in zip(others, other_was):
            p.requires_grad_(r)
    kl = {}
    for u in bank.units:
        est = {c: 0.5 * sq[(u.name, c)] / (draws * n_tok) for c in bank.choices(u)}
        est[KEEP] = 0.0
        kl[u.name] = monotone(est)
    # 1-EAR of a single unit ~ c * sqrt(KL); c from the Pinsker-like small-perturbation relation
    # TV ~ sqrt(KL / 2) * kappa is not known per model: the search's EarMap is fitted on measured points,
    # so here tv is only reported as sqrt(KL / 2) (an upper-bound-shaped guess, labelled as such).
    tv = {u: {b: math.sqrt(v / 2.0) for b, v in d.items()} for u, d in kl.items()}
    return Sensitivity("fisher", kl, tv, [], time.perf_counter() - t0, int(ids_all.shape[0]),
                       {"draws": draws, "seed": seed, "windows": int(ids_all.shape[0]),
                        "tv_note": "tv = sqrt(KL/2) (Pinsker-shaped), not fitted"})


# ----------------------------------------------------------------------------------------- the registry


@dataclass(frozen=True)
class EstimatorInputs:
    """What every estimator may read: the reference model (weights restored), the bank, a prober on the
    sensitivity windows, those windows, and where to run."""

    model: nn.Module
    bank: Bank
    prober: Prober
    windows: torch.Tensor
    device: str = "cpu"
    progress: bool = True


Estimator = Callable[[EstimatorInputs, "SearchConfig"], Sensitivity]


def _linear(x: EstimatorInputs, config: "SearchConfig") -> Sensitivity:
    return linear_estimator(x.prober, probe_bits=config.probe_bits, progress=x.progress)


def _shapley(x: EstimatorInputs, config: "SearchConfig") -> Sensitivity:
    return shapley_estimator(x.prober, orderings=config.orderings, seed=config.quant.seed, progress=x.progress)


def _fisher(x: EstimatorInputs, config: "SearchConfig") -> Sensitivity:
    return fisher_estimator(x.model, x.bank, x.windows, draws=config.fisher_draws, seed=config.quant.seed,
                            device=x.device, progress=x.progress)


ESTIMATORS: dict[str, Estimator] = {"linear": _linear, "shapley": _shapley, "fisher": _fisher}
