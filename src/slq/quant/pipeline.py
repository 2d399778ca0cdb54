"""Quantize a whole model, layer by layer: RTN, or GPTQ on captured activations.

GPTQ runs sequentially by default: the inputs of decoder layer l are produced by
layers 0..l-1 *already quantized*, so each layer corrects for the error upstream.
Each layer is one stacked solve (:func:`slq.quant.solve.solve_layer`, shared with the
search's bank); the settings come in one :class:`slq.quant.config.QuantConfig`.
After :func:`quantize_model` the model holds the dequantized weights (fake-quant), so
it can be evaluated directly; the integer codes are returned for the checkpoint.

Streaming (:class:`slq.models.stream.StreamedModel`): the same loop, with each block read from the
safetensors files onto the device before its turn and released after; the activations pass from block to
block on the device, or in (pinned) host memory when three copies would not fit it. Peak memory is one
block, the embeddings while layer 0's inputs are caught, and the activations, whatever the depth.

Several ranks (:class:`slq.util.dist.Group`): GPTQ is sequential through the activations, so every rank
runs the same forward over all calibration windows and collects the same Hessians, bit for bit. Within a
layer the linears fall into groups that share a Hessian (:func:`solve_groups`: q/k/v, gate/up, o, down),
each exactly a set of the solve's stacks, so a group solved alone gives the codes it gets in the whole
layer's solve; the groups split over ranks (:func:`slq.util.dist.split`, by cost N*K^2), their codes are
gathered on every rank, and every rank writes the same dequantized weights before the next forward. Nothing
is summed across ranks, so 1 and N ranks give byte-identical codes. (Splitting the windows over ranks would
divide the forward too, but the Hessians' sums would then round differently.)

The output head (``config.head_bits``): after the last decoder layer, its outputs (under the quantized
layers, when sequential) pass through the final norm; ``H = 2/n X^T X`` of those normed states is the head's
Hessian (:func:`slq.quant.calib.head_hessian`), and the head is solved like any linear (N = vocabulary,
K = hidden), with ``head_bits`` at the config's group size; RTN needs no capture. Every rank solves it (one
linear: nothing to split). With a tied embedding the head and the embedding are one Parameter, so the
embedding takes the dequantized head too: the model that is measured is the one the checkpoint stores
(:mod:`slq.runtime.checkpoint` writes the pair untied, the embedding equal to the dequantized head).
"""

from __future__ import annotations

import contextlib
import time
from datetime import datetime, timezone
from pathlib import Path
from dataclasses import dataclass, field

import torch
from torch import nn

from ..models.arch import decoder_layers, decoder_linears, head, head_name, layer_linears, layers_prefix
from ..models.stream import StreamedModel, batches_bytes, free_device_bytes, offload_batches
from ..util.dist import SINGLE, Group, all_gather_dict, split
from ..util.errors import SlqError
from ..util.progress import progress_bar
from ..util.provenance import git_commit, versions
from .calib import capture_layer0_inputs, collect_hessians, eager_attention, head_hessian, run_layer
from .config import QuantConfig
from .gptq import RowBlockHessians
from .grid import QuantizedWeight, gamma_stats
from .solve import layer_weights, solve_layer
from .spec import LayerPlan, Plan, QuantSpec, model_bits_per_param, resolve_group_size


@dataclass
class QuantizeResult:
    qweights: dict[str, QuantizedWeight]
    plan: Plan
    timings: dict[str, float] = field(default_factory=dict)
    memory: dict = field(default_factory=dict)  # peak_bytes, how it was measured, streamed, activations_offloaded
    layer_s: list[float] = field(default_factory=list)  # wall time of each decoder layer (read, solve, forward)


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
    group: Group = SINGLE,
    **settings,
) -> QuantizeResult:
    """Quantize every linear in the decoder layers in place (weights become dequantized).

    ``config`` (:class:`QuantConfig`) says how: method, grid, GPTQ's options, batch size, device; its
    ``spec`` applies to every layer. ``specs`` (full module name -> spec) overrides it per layer, which
    is how mixed-bitwidth plans are built; a ``None`` value keeps that layer unquantized (the "16-bit"
    choice of the bit search). GPTQ needs ``windows`` (LongTensor [n, seq_len] of calibration tokens).
    ``sequential``: each layer's inputs come from the layers before it already quantized; ``False``: from
    the reference layers.

    ``model`` may be a :class:`slq.models.stream.StreamedModel` (the weights stay in their files): each
    block is then read onto ``config.device``, quantized and released, and the codes are the in-memory
    run's, bit for bit; the skeleton keeps no weights. ``group`` (:class:`slq.util.dist.Group`) splits each
    layer's solves over ranks (see the module docstring); every rank returns the whole result.
    The result's ``timings["peak_memory_bytes"]`` and ``memory`` give the peak (see :class:`_Memory`).

    The older call form is kept: a :class:`QuantSpec` (or ``None`` with ``specs`` for every layer) as the
    second argument and the settings as keywords (``method``, ``clip``, ``damp``, ``attention``,
    ``act_order``, ``batch_size``, ``device``), which build the config (their defaults are its defaults).
    """
    if isinstance(config, QuantConfig):
        if settings:
            raise SlqError(f"give either a QuantConfig or keyword settings, not both (got {', '.join(settings)})")
    else:
        spec = config
        skeleton = model.model if isinstance(model, StreamedModel) else model
        if spec is None and len(specs or {}) != len(quantizable_linears(skeleton)):
            raise SlqError("give a spec for every layer, or a default spec")
        if spec is not None:
            settings.update(bits=spec.bits, group_size=spec.group_size, symmetric=spec.symmetric)
        config = QuantConfig(**settings)
    return _quantize(model, config, specs or {}, windows, sequential, progress, group)


def _quantize(model: nn.Module | StreamedModel, config: QuantConfig, specs: dict[str, QuantSpec | None],
              windows: torch.Tensor | None, sequential: bool, progress: bool, group: Group) -> QuantizeResult:
    method, gptq = config.method, config.method == "gptq"
    if gptq and (windows is None or len(windows) == 0):
        raise SlqError("GPTQ needs calibration windows")
    stream = model if isinstance(model, StreamedModel) else None
    if stream is not None:
        if stream.device != config.device:
            raise SlqError(f"the streamed model reads its blocks onto {stream.device}, the config asks for "
                           f"{config.device}")
        model = stream.model
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
    head_at = head_name(model) if config.head_spec is not None else None  # the head, solved after the layers
    if head_at is not None:
        plan.add(layer_spec(head_at, head(model).lm_head, config.head_spec, method))
    qweights: dict[str, QuantizedWeight] = {}
    t0 = time.perf_counter()
    timings = {"capture_s": 0.0, "hessian_s": 0.0, "solve_s": 0.0, "forward_s": 0.0}
    layers, prefix = decoder_layers(model), layers_prefix(model)
    memory = _Memory(config.device, stream, model)

    batches, offload_acts, layer_s = None, False, []
    with eager_attention(model, gptq and config.attention), progress_bar(progress and group.writes) as bar:
        if gptq:
            t = time.perf_counter()
            if stream is not None:
                batches = stream.layer0_inputs(windows, config.batch_size)
                offload_acts = _activations_offloaded(config.device, batches)
                if offload_acts:
                    batches = offload_batches(batches)
            else:
                batches = capture_layer0_inputs(model, windows, config.batch_size, config.device)
            timings["capture_s"] = time.perf_counter() - t
        run_on = config.device if offload_acts else None
        task = bar.add_task(f"{method.upper()} layers", total=len(layers))
        for i, layer in enumerate(layers):
            t_layer = time.perf_counter()
            if stream is not None:
                stream.materialize(layer)
            rel = layer_linears(layer)
            names = {f"{prefix}.{i}.{r}": r for r in rel if f"{prefix}.{i}.{r}" in plan.layers}
            hessians = None
            if gptq and names:
                t = time.perf_counter()
                found = collect_hessians(layer, batches, list(names.values()), attention=config.attention,
                                         device=run_on)
                hessians = {full: found[r] for full, r in names.items()}
                timings["hessian_s"] += time.perf_counter() - t
            next_batches = None
            more = i + 1 < len(layers) or head_at is not None  # the head's Hessian needs the last layer's outputs
            if gptq and not sequential and more:
                # non-sequential: the next layer sees the outputs of this layer *unquantized*
                t = time.perf_counter()
                next_batches = run_layer(layer, batches, run_on)
                timings["forward_s"] += time.perf_counter() - t
            t = time.perf_counter()
            weights = layer_weights({full: rel[r] for full, r in names.items()})
            mine = split(solve_groups(list(names), hessians), group.rank, group.world,
                         cost=lambda g: sum(weights[n].numel() * weights[n].shape[1] for n in g))
            solved = _solve(weights, [n for g in mine for n in g], plan, config, hessians, gptq)
            for full, (q, metrics) in all_gather_dict(group, solved).items():
                lp, W = plan[full], weights[full]
                lp.gamma_mean, lp.gamma2_mean = metrics.pop("gamma")
                lp.metrics.update(metrics)
                rel[names[full]].weight.data.copy_(q.dequantize().to(W.device, rel[names[full]].weight.dtype))
                qweights[full] = q
            timings["solve_s"] += time.perf_counter() - t
            if gptq and more:
                if sequential:
                    t = time.perf_counter()
                    next_batches = run_layer(layer, batches, run_on)
                    timings["forward_s"] += time.perf_counter() - t
                memory.note(batches, next_batches)
                batches = next_batches
            else:
                memory.note(batches)
            if stream is not None:
                stream.release(layer)
            layer_s.append(time.perf_counter() - t_layer)
            bar.advance(task)
        if head_at is not None:
            _quantize_head(model, stream, head_at, batches, plan, config, gptq, run_on, timings, qweights)
    timings["total_s"] = time.perf_counter() - t0
    timings["peak_memory_bytes"] = float(memory.peak())
    qweights = {n: qweights[n] for n in plan.layers if n in qweights}  # model order, whatever the ranks
    return QuantizeResult(qweights, plan, timings, {"peak_bytes": memory.peak(), "measure": memory.measure,
                                                     "streamed": stream is not None,
                                                     "activations_offloaded": offload_acts}, layer_s)


def _quantize_head(model: nn.Module, stream: StreamedModel | None, name: str, batches, plan: Plan,
                   config: QuantConfig, gptq: bool, run_on, timings: dict, qweights: dict) -> None:
    """Solve the output head (its Hessian from the final-normed last hidden states with GPTQ) and write its
    dequantized weight into the model (into the tied embedding too: one Parameter)."""
    with (stream.head() if stream is not None else contextlib.nullcontext()):
        lin = head(model).lm_head
        hessians = None
        if gptq:
            t = time.perf_counter()
            hessians = {name: head_hessian(model, batches, run_on)}
            timings["hessian_s"] += time.perf_counter() - t
        t = time.perf_counter()
        weights = layer_weights({name: lin})
        q, metrics = _solve(weights, [name], plan, config, hessians, gptq)[name]
        lp = plan[name]
        lp.gamma_mean, lp.gamma2_mean = metrics.pop("gamma")
        lp.metrics.update(metrics)
        lin.weight.data.copy_(q.dequantize().to(lin.weight.device, lin.weight.dtype))
        qweights[name] = q
        timings["solve_s"] += time.perf_counter() - t


def solve_groups(names: list[str], hessians: dict | None) -> list[list[str]]:
    """The linears of one layer in groups solved together: those sharing a Hessian (q/k/v, gate/up; with
    attention-aware Hessians k and v have their own) form one group, so each group is exactly a set of the
    solve's stacks and solving it alone gives the same codes as solving the whole layer. Without Hessians
    (RTN) every linear is its own group. Groups and their members are in model order."""
    if hessians is None:
        return [[n] for n in names]
    parent = {n: n for n in names}

    def root(n):
        while parent[n] != n:
            n = parent[n]
        return n

    owner: dict[int, str] = {}
    for n in names:
        h = hessians[n]
        for acc in (h.blocks if isinstance(h, RowBlockHessians) else [h]):
            o = owner.setdefault(id(acc), n)
            parent[root(n)] = root(o)
    out: dict[str, list[str]] = {}
    for n in names:
        out.setdefault(root(n), []).append(n)
    return list(out.values())


def _solve(weights: dict[str, torch.Tensor], names: list[str], plan: Plan, config: QuantConfig,
           hessians: dict | None, gptq: bool) -> dict[str, tuple[QuantizedWeight, dict]]:
    """name -> (quantized weight on the CPU, metrics and gamma stats) for the linears ``names`` of one layer."""
    if not names:
        return {}
    sub = {n: weights[n] for n in names}
    solved = solve_layer(sub, {n: (plan[n].spec,) for n in names}, config,
                         None if hessians is None else {n: hessians[n] for n in names})
    out = {}
    for n in names:
        W, sol, lp = weights[n], solved[n], plan[n]
        q = sol.qweights[0]
        q = QuantizedWeight(q.codes.cpu(), q.scale.cpu(), q.zero.cpu(), q.spec)
        W_hat = q.dequantize().to(W.device)
        metrics = {"gamma": gamma_stats(W, lp.spec.effective_group(lp.K))}
        if gptq:
            base = sol.output_error(W, torch.zeros_like(W))
            metrics["rel_output_error"] = sol.output_error(W, W_hat) / max(base, 1e-30)
        metrics["rel_weight_error"] = float((W - W_hat).pow(2).sum() / W.pow(2).sum().clamp_min(1e-30))
        out[n] = (q, metrics)
    return out


def _activations_offloaded(device: str, batches: list) -> bool:
    """Activations go to host memory when the input, output and a spare copy would not fit the device's free
    memory (CUDA only; on the CPU they are in host memory already)."""
    return str(device).startswith("cuda") and 3 * batches_bytes(batches) > free_device_bytes(device)


class _Memory:
    """Peak memory of a quantization run: ``torch.cuda.max_memory_allocated`` on CUDA; on the CPU the bytes of
    the materialized parameters (the streamed model's count, or every parameter of a resident model) plus the
    activations alive at each block (its inputs and outputs)."""

    def __init__(self, device: str, stream: StreamedModel | None, model: nn.Module):
        self.cuda = str(device).startswith("cuda")
        self.stream = stream
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(torch.device(device))
            self.device = torch.device(device)
        if stream is not None:
            stream.reset_peak()
        self.resident = 0 if stream is not None else sum(p.numel() * p.element_size() for p in model.parameters())
        self.measure = ("cuda.max_memory_allocated" if self.cuda else
                        "materialized parameters + block activations (CPU count)")
        self._peak = 0

    def note(self, *batch_lists) -> None:
        weights = self.stream.live_bytes if self.stream is not None else self.resident
        acts = sum(batches_bytes(b) for b in batch_lists if b)
        self._peak = max(self._peak, weights + acts)

    def peak(self) -> int:
        if self.cuda:
            return int(torch.cuda.max_memory_allocated(self.device))
        weights = self.stream.peak_bytes if self.stream is not None else self.resident
        return max(self._peak, weights)


def other_params(model, quantized: set[str]) -> dict[str, tuple[int, int]]:
    """Unquantized tensors (tied ones once) -> (numel, bits at stored precision)."""
    out, seen = {}, set()
    for name, p in model.named_parameters(remove_duplicate=True):
        mod = name.rsplit(".", 1)[0]
        key = id(p) if p.device.type == "meta" else p.data_ptr()  # meta tensors (a streamed skeleton) share ptr 0
        if mod in quantized or key in seen:
            continue
        seen.add(key)
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
