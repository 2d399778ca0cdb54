"""Layer-by-layer activation capture for decoder-only transformers.

The model is cut at its decoder layers: the inputs of layer 0 (hidden states plus the
keyword arguments the model passes each layer: position embeddings, masks) are caught
once; then each layer is run on its own, and Hessians H = 2/n X^T X of its linears'
inputs are accumulated with forward pre-hooks. Linears that receive the very same input
tensor (q/k/v; gate/up) share one Hessian.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .errors import SlqError
from .gptq import HessianAccumulator


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of decoder blocks of a causal LM (Llama/Qwen/Mistral/Gemma-style)."""
    base = getattr(model, "model", None)
    for cand in (getattr(base, "layers", None), getattr(getattr(base, "decoder", None), "layers", None)):
        if isinstance(cand, nn.ModuleList) and len(cand):
            return cand
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for _, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) == n:
            return mod
    raise SlqError(f"unsupported architecture {type(model).__name__}: cannot find its decoder layers")


def layer_linears(layer: nn.Module) -> dict[str, nn.Linear]:
    return {name: m for name, m in layer.named_modules() if isinstance(m, nn.Linear)}


class _Stop(Exception):
    pass


@dataclass
class Batch:
    hidden: torch.Tensor
    kwargs: dict


@torch.no_grad()
def capture_layer0_inputs(model: nn.Module, windows: torch.Tensor, batch_size: int, device: str) -> list[Batch]:
    """Inputs of the first decoder layer for every batch of windows."""
    layers = decoder_layers(model)
    caught: list[Batch] = []

    def hook(_mod, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        kw = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "past_key_value", "cache", "use_cache")}
        caught.append(Batch(hidden, kw))
        raise _Stop

    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for b0 in range(0, windows.shape[0], batch_size):
            try:
                model(input_ids=windows[b0 : b0 + batch_size].to(device), use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    return caught


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def run_layer(layer: nn.Module, batches: list[Batch]) -> list[Batch]:
    """The layer's outputs, which are the next layer's inputs (same kwargs)."""
    return [Batch(_first(layer(b.hidden, **b.kwargs)), b.kwargs) for b in batches]


@torch.no_grad()
def collect_hessians(layer: nn.Module, batches: list[Batch], names: list[str]) -> dict[str, HessianAccumulator]:
    """One Hessian per distinct input among the named linears (shared objects for fused ones)."""
    linears = layer_linears(layer)
    seen: dict[int, str] = {}
    owner: dict[str, str] = {}
    alive = []  # keep probed inputs referenced so their ids cannot be reused

    def probe(name):
        def f(_m, args):
            alive.append(args[0])
            owner[name] = seen.setdefault(id(args[0]), name)

        return f

    # Which linears see the same input tensor: decided on the first batch.
    hs = [linears[n].register_forward_pre_hook(probe(n)) for n in names]
    try:
        _first(layer(batches[0].hidden[:1], **_slice_kwargs(batches[0].kwargs, 1)))
    finally:
        for h in hs:
            h.remove()
    alive.clear()
    dev = linears[names[0]].weight.device  # Hessians live where the layer runs
    accs = {n: HessianAccumulator(linears[n].in_features, device=dev) for n in set(owner.values())}

    def add(name):
        def f(_m, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            acc = accs[name]
            m = x.shape[0]
            acc.H *= acc.n / (acc.n + m)
            acc.n += m
            acc.H += ((x.T @ x) * (2.0 / acc.n)).to(acc.H)

        return f

    hs = [linears[n].register_forward_pre_hook(add(n)) for n in accs]
    try:
        for b in batches:
            layer(b.hidden, **b.kwargs)
    finally:
        for h in hs:
            h.remove()
    return {n: accs[owner[n]] for n in names}


def _slice_kwargs(kwargs: dict, b: int) -> dict:
    def cut(v):
        if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] > 1:
            return v[:b]
        if isinstance(v, tuple):
            return tuple(cut(x) for x in v)
        return v

    return {k: cut(v) for k, v in kwargs.items()}
