"""Quantize a whole model, layer by layer: RTN, or GPTQ on captured activations.

GPTQ runs sequentially by default: the inputs of decoder layer l are produced by
layers 0..l-1 *already quantized*, so each layer corrects for the error upstream.
Each layer is one stacked solve (:func:`slq.quant.solve.solve_layer`, shared with the
search's bank); the settings come in one :class:`slq.quant.config.QuantConfig`.
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

from ..models.arch import decoder_layers, decoder_linears, layer_linears, layers_prefix
from ..util.errors import SlqError
from ..util.progress import progress_bar
from ..util.provenance import git_commit, versions
from .calib import capture_layer0_inputs, collect_hessians, eager_attention, run_layer
from .config import QuantConfig
from .grid import QuantizedWeight, gamma_stats
from .solve import layer_weights, solve_layer
from .spec import LayerPlan, Plan, QuantSpec, model_bits_per_param, resolve_group_size


@dataclass
class QuantizeResult:
    qweights: dict[str, QuantizedWeight]
    plan: Plan
    timings: dict[str, float] = field(default_factory=dict)


def quantizable_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Full name -> linear for every nn.Linear inside the decoder layers (not lm_head); see
    :func:`slq.models.arch.decoder_linears`."""
    return decoder_linears(model)


def layer_spec(name: str, lin: nn.Linear, spec: QuantSpec, method: str) -> LayerPlan:
    """Resolve the group size for this layer's K and record the decision."""
    N, K = lin.weight.shape
    g, note = resolve_group_size(K, spec.group_size)
    s = QuantSpec(spec.bits, g, spec.symmetric)
    return LayerPlan(name, N, K, s, spec.group_size, note, method)


@torch.no_grad()
def quantize_model(
    model: nn.Module,
    config: QuantConfig | QuantSpec | None = None,
    *,
    specs: dict[str, QuantSpec | None] | None = None,
    windows: torch.Tensor | None = None,
    sequential: bool = True,
    progress: bool = True,
    **settings,
) -> QuantizeResult:
    """Quantize every linear in the decoder layers in place (weights become dequantized).

    ``config`` (:class:`QuantConfig`) says how: method, grid, GPTQ's options, batch size, device; its
    ``spec`` applies to every layer. ``specs`` (full module name -> spec) overrides it per layer, which
    is how mixed-bitwidth plans are built; a ``None`` value keeps that layer unquantized (the "16-bit"
    choice of the bit search). GPTQ needs ``windows`` (LongTensor [n, seq_len] of calibration tokens).
    ``sequential``: each layer's inputs come from the layers before it already quantized; ``False``: from
    the reference layers.

    The older call form is kept: a :class:`QuantSpec` (or ``None`` with ``specs`` for every layer) as the
    second argument and the settings as keywords (``method``, ``clip``, ``damp``, ``attention``,
    ``act_order``, ``batch_size``, ``device``), which build the config (their defaults are its defaults).
    """
    if isinstance(config, QuantConfig):
        if settings:
            raise SlqError(f"give either a QuantConfig or keyword settings, not both (got {', '.join(settings)})")
    else:
        spec = config
        if spec is None and len(specs or {}) != len(quantizable_linears(model)):
            raise SlqError("give a spec for every layer, or a default spec")
        if spec is not None:
            settings.update(bits=spec.bits, group_size=spec.group_size, symmetric=spec.symmetric)
        config = QuantConfig(**settings)
    return _quantize(model, config, specs or {}, windows, sequential, progress)


def _quantize(model: nn.Module, config: QuantConfig, specs: dict[str, QuantSpec | None],
              windows: torch.Tensor | None, sequential: bool, progress: bool) -> QuantizeResult:
    method, gptq = config.method, config.method == "gptq"
    if gptq and (windows is None or len(windows) == 0):
        raise SlqError("GPTQ needs calibration windows")
    linears = quantizable_linears(model)
    if not linears:
        raise SlqError("the model has no linear layers to quantize")
    unknown = set(specs) - set(linears)
    if unknown:
        raise SlqError(f"spec given for modules the model does not have: {sorted(unknown)[:3]}")

    plan = Plan()
    for name, lin in linears.items():
        s = specs.get(name, config.spec)
        if s is not None:
            plan.add(layer_spec(name, lin, s, method))
    qweights: dict[str, QuantizedWeight] = {}
    t0 = time.perf_counter()
    timings = {"capture_s": 0.0, "hessian_s": 0.0, "solve_s": 0.0, "forward_s": 0.0}
    layers, prefix = decoder_layers(model), layers_prefix(model)

    batches = None
    with eager_attention(model, gptq and config.attention), progress_bar(progress) as bar:
        if gptq:
            t = time.perf_counter()
            batches = capture_layer0_inputs(model, windows, config.batch_size, config.device)
            timings["capture_s"] = time.perf_counter() - t
        task = bar.add_task(f"{method.upper()} layers", total=len(layers))
        for i, layer in enumerate(layers):
            rel = layer_linears(layer)
            names = {f"{prefix}.{i}.{r}": r for r in rel if f"{prefix}.{i}.{r}" in plan.layers}
            hessians = None
            if gptq and names:
                t = time.perf_counter()
                found = collect_hessians(layer, batches, list(names.values()), attention=config.attention)
                hessians = {full: found[r] for full, r in names.items()}
                timings["hessian_s"] += time.perf_counter() - t
            if gptq and not sequential and i + 1 < len(layers):
                # non-sequential: the next layer sees the outputs of this layer *unquantized*
                t = time.perf_counter()
                next_batches = run_layer(layer, batches)
                timings["forward_s"] += time.perf_counter() - t
            t = time.perf_counter()
            weights = layer_weights({full: rel[r] for full, r in names.items()})
            for full, W in weights.items():
                lp = plan[full]
                lp.gamma_mean, lp.gamma2_mean = gamma_stats(W, lp.spec.effective_group(lp.K))
            solved = solve_layer(weights, {full: (plan[full].spec,) for full in names}, config, hessians)
            for full, r in names.items():
                lin, lp, W, sol = rel[r], plan[full], weights[full], solved[full]
                q = sol.qweights[0]
                q = QuantizedWeight(q.codes.cpu(), q.scale.cpu(), q.zero.cpu(), q.spec)
                W_hat = q.dequantize().to(W.device)
                if gptq:
                    base = sol.output_error(W, torch.zeros_like(W))
                    lp.metrics["rel_output_error"] = sol.output_error(W, W_hat) / max(base, 1e-30)
                lp.metrics["rel_weight_error"] = float((W - W_hat).pow(2).sum() / W.pow(2).sum().clamp_min(1e-30))
                lin.weight.data.copy_(W_hat.to(lin.weight.dtype))
                qweights[full] = q
            timings["solve_s"] += time.perf_counter() - t
            if gptq and i + 1 < len(layers):
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
