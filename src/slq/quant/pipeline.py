"""Quantize a whole model, layer by layer: RTN, or GPTQ on captured activations.

GPTQ runs sequentially by default: the inputs of decoder layer l are produced by
layers 0..l-1 *already quantized*, so each layer corrects for the error upstream.
After :func:`quantize_model` the model holds the dequantized weights (fake-quant), so
it can be evaluated directly; the integer codes are returned for the checkpoint.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from pathlib import Path
from dataclasses import dataclass, field

import torch
from torch import nn

from .calib import (capture_layer0_inputs, collect_hessians, decoder_layers, eager_attention, layer_linears,
                    run_layer)
from ..util.errors import SlqError
from .gptq import factor, gptq_quantize, join_rows, output_error, row_pieces
from .grid import QuantizedWeight, gamma_stats, quantize_rtn
from ..util.progress import progress_bar
from ..util.provenance import git_commit, versions
from .spec import LayerPlan, Plan, QuantSpec, model_bits_per_param, resolve_group_size

METHODS = ("rtn", "gptq")


@dataclass
class QuantizeResult:
    qweights: dict[str, QuantizedWeight]
    plan: Plan
    timings: dict[str, float] = field(default_factory=dict)


def quantizable_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Full name -> linear for every nn.Linear inside the decoder layers (not lm_head)."""
    layers = decoder_layers(model)
    prefix = next(n for n, m in model.named_modules() if m is layers)
    out = {}
    for i, layer in enumerate(layers):
        for rel, lin in layer_linears(layer).items():
            out[f"{prefix}.{i}.{rel}"] = lin
    return out


def layer_spec(name: str, lin: nn.Linear, spec: QuantSpec, method: str) -> LayerPlan:
    """Resolve the group size for this layer's K and record the decision."""
    N, K = lin.weight.shape
    g, note = resolve_group_size(K, spec.group_size)
    s = QuantSpec(spec.bits, g, spec.symmetric)
    return LayerPlan(name, N, K, s, spec.group_size, note, method)


@torch.no_grad()
def quantize_model(
    model: nn.Module,
    spec: QuantSpec | None = None,
    *,
    specs: dict[str, QuantSpec] | None = None,
    method: str = "gptq",
    windows: torch.Tensor | None = None,
    clip: bool = True,
    damp: float = 0.01,
    attention: bool = True,
    act_order: bool = True,
    sequential: bool = True,
    batch_size: int = 8,
    device: str = "cpu",
    progress: bool = True,
) -> QuantizeResult:
    """Quantize every linear in the decoder layers in place (weights become dequantized).

    ``spec`` applies to every layer; ``specs`` (full module name -> spec) overrides it per
    layer, which is how mixed-bitwidth plans are built; a ``None`` value keeps that layer
    unquantized (the "16-bit" choice of the bit search). GPTQ needs ``windows``
    (LongTensor [n, seq_len] of calibration tokens). ``attention``: GPTQ of key and value projections uses
    attention-aware Hessians, one per key/value head (:mod:`slq.calib`). ``act_order``: GPTQ quantizes the
    columns by decreasing Hessian diagonal, with static groups (:mod:`slq.gptq`).
    """
    if method not in METHODS:
        raise SlqError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if method == "gptq" and (windows is None or len(windows) == 0):
        raise SlqError("GPTQ needs calibration windows")
    linears = quantizable_linears(model)
    if not linears:
        raise SlqError("the model has no linear layers to quantize")
    specs = dict(specs or {})
    unknown = set(specs) - set(linears)
    if unknown:
        raise SlqError(f"spec given for modules the model does not have: {sorted(unknown)[:3]}")
    if spec is None and len(specs) != len(linears):
        raise SlqError("give a spec for every layer, or a default spec")

    plan = Plan()
    for name, lin in linears.items():
        s = specs.get(name, spec)
        if s is not None:
            plan.add(layer_spec(name, lin, s, method))
    qweights: dict[str, QuantizedWeight] = {}
    t0 = time.perf_counter()
    timings = {"capture_s": 0.0, "hessian_s": 0.0, "solve_s": 0.0, "forward_s": 0.0}
    layers = decoder_layers(model)
    prefix = next(n for n, m in model.named_modules() if m is layers)

    batches = None
    with eager_attention(model, method == "gptq" and attention), progress_bar(progress) as bar:
        if method == "gptq":
            t = time.perf_counter()
            batches = capture_layer0_inputs(model, windows, batch_size, device)
            timings["capture_s"] = time.perf_counter() - t
        task = bar.add_task(f"{method.upper()} layers", total=len(layers))
        for i, layer in enumerate(layers):
            rel = layer_linears(layer)
            names = {f"{prefix}.{i}.{r}": r for r in rel if f"{prefix}.{i}.{r}" in plan.layers}
            hessians = {}
            if method == "gptq" and names:
                t = time.perf_counter()
                hessians = collect_hessians(layer, batches, list(names.values()), attention=attention)
                timings["hessian_s"] += time.perf_counter() - t
            if method == "gptq" and not sequential and i + 1 < len(layers):
                # non-sequential: the next layer sees the outputs of this layer *unquantized*
                t = time.perf_counter()
                next_batches = run_layer(layer, batches)
                timings["forward_s"] += time.perf_counter() - t
            t = time.perf_counter()
            weights = {}
            for full, r in names.items():
                lp = plan[full]
                W = rel[r].weight.data.float()
                if not torch.isfinite(W).all():
                    raise SlqError(f"weight {full}.weight contains NaN or Inf values")
                lp.gamma_mean, lp.gamma2_mean = gamma_stats(W, lp.spec.effective_group(lp.K))
                weights[full] = W
            results: dict[str, QuantizedWeight] = {}
            blocks: dict[str, list[tuple[int, int, torch.Tensor]]] = {}  # rows -> Hessian, for the error metric
            if method == "gptq":
                # GPTQ is row-independent given H: row pieces that share a Hessian (linears of one input;
                # a key/value projection has one per key/value head) and a spec are stacked along N and
                # solved in one pass (same codes, fewer Python steps).
                pieces = row_pieces({f: hessians[r] for f, r in names.items()},
                                    {f: weights[f].shape[0] for f in names})
                stacks: dict[tuple, list[tuple]] = {}
                for pc in pieces:
                    stacks.setdefault((id(pc[3]), plan[pc[0]].spec), []).append(pc)
                factors = {}
                got: dict[str, list[tuple[int, QuantizedWeight]]] = {}
                for (key, spec_), ps in stacks.items():
                    if key not in factors:
                        factors[key] = factor(ps[0][3].H, damp)
                    fac = factors[key]
                    W = torch.cat([weights[m][r0:r1] for m, r0, r1, _ in ps]).to(device)
                    q = gptq_quantize(W, fac, spec_, clip=clip, act_order=act_order)
                    row = 0
                    for m, r0, r1, _ in ps:
                        n = r1 - r0
                        got.setdefault(m, []).append((r0, QuantizedWeight(q.codes[row:row + n], q.scale[row:row + n],
                                                                          q.zero[row:row + n], spec_)))
                        blocks.setdefault(m, []).append((r0, r1, fac.H))
                        row += n
                for m, lst in got.items():
                    results[m] = join_rows(lst)
            else:
                for full in names:
                    results[full] = quantize_rtn(weights[full], plan[full].spec, clip=clip)
            for full, r in names.items():
                lin, lp, W = rel[r], plan[full], weights[full]
                q = results[full]
                q = QuantizedWeight(q.codes.cpu(), q.scale.cpu(), q.zero.cpu(), q.spec)
                W_hat = q.dequantize().to(W.device)
                if method == "gptq":
                    base = sum(output_error(W[r0:r1], torch.zeros_like(W[r0:r1]), H) for r0, r1, H in blocks[full])
                    err = sum(output_error(W[r0:r1], W_hat[r0:r1], H) for r0, r1, H in blocks[full])
                    lp.metrics["rel_output_error"] = err / max(base, 1e-30)
                lp.metrics["rel_weight_error"] = float((W - W_hat).pow(2).sum() / W.pow(2).sum().clamp_min(1e-30))
                lin.weight.data.copy_(W_hat.to(lin.weight.dtype))
                qweights[full] = q
            timings["solve_s"] += time.perf_counter() - t
            if method == "gptq" and i + 1 < len(layers):
                if sequential:
                    t = time.perf_counter()
                    batches = run_layer(layer, batches)
                    timings["forward_s"] += time.perf_counter() - t
                else:
                    batches = next_batches
            bar.advance(task)
    timings["total_s"] = time.perf_counter() - t0
    return QuantizeResult(qweights, plan, timings)


def other_params(model, quantized: set[str]) -> dict[str, tuple[int, int]]:
    """Unquantized tensors (tied ones once) -> (numel, bits at stored precision)."""
    out, seen = {}, set()
    for name, p in model.named_parameters(remove_duplicate=True):
        mod = name.rsplit(".", 1)[0]
        if mod in quantized or p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        out[name] = (p.numel(), p.element_size() * 8)
    return out


def build_report(model, path: Path, plan: Plan, spec: QuantSpec, **settings) -> dict:
    gammas = [lp.gamma_mean for lp in plan if lp.gamma_mean == lp.gamma_mean and lp.gamma_mean is not None]
    gammas2 = [lp.gamma2_mean for lp in plan if lp.gamma2_mean == lp.gamma2_mean and lp.gamma2_mean is not None]
    other = other_params(model, set(plan.layers))
    return {
        "model": str(Path(path).resolve()),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(),
        "git_commit": git_commit(),
        "settings": {"bits": spec.bits, "group_size": spec.group_size, "symmetric": spec.symmetric, **settings},
        "bits_per_param": plan.bits_per_param(),
        "bits_per_param_model": model_bits_per_param(plan, other),
        "n_params_quantized": plan.n_params,
        "n_params_other": sum(n for n, _ in other.values()),
        "gamma": {
            "mean": sum(gammas) / len(gammas) if gammas else None,
            "mean_sq": sum(gammas2) / len(gammas2) if gammas2 else None,
        },
        "plan": plan.to_dict(),
    }
