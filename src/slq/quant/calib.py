"""Layer-by-layer activation capture for decoder-only transformers.

The model is cut at its decoder layers: the inputs of layer 0 (hidden states plus the
keyword arguments the model passes each layer: position embeddings, masks) are caught
once; then each layer is run on its own, and Hessians H = 2/n X^T X of its linears'
inputs are accumulated with forward pre-hooks. Linears that receive the very same input
tensor (q/k/v; gate/up) share one Hessian. The output head's Hessian (:func:`head_hessian`) comes from the
final norm applied to the last layer's outputs.

Attention-aware key/value Hessians (``attention=True``): the error a value projection makes reaches
the rest of the model only through the attention mixing, o_t = sum_s a_ts v_s. Its relevant error is
therefore ||A_h X dW_g^T||^2 summed over the query heads h that read key/value head g, whose Hessian
is H_g = sum_h (A_h X)^T (A_h X), one per key/value head, instead of X^T X. The plain Hessian weighs
every token alike, while the attention sink (the first position, which most heads attend to heavily)
broadcasts its value error to every later token; GPTQ with X^T X moves error into exactly such rare
directions. A key projection's error acts through the logits q_t . k_s: weighting their squared
error by the attention probabilities, with q_t q_t^T replaced by its isotropic part, gives
H_g = sum_s c_s x_s x_s^T with c_s = sum_h sum_t a_ts |q_t|^2, again one per key/value head.
The attention probabilities come from the eager attention path, so the calibration passes run
under :func:`eager_attention` (its masks are explicit and causal).
"""

from __future__ import annotations

import contextlib
import warnings

import torch
from torch import nn

from ..models.arch import decoder_layers, head, layer_linears  # noqa: F401 - re-exported for pipeline, bank
# the forward cut at the decoder layers lives with block streaming; re-exported for the bank and the prober
from ..models.stream import Batch, first_output, capture_layer0_inputs, run_layer  # noqa: F401
from .gptq import HessianAccumulator, RowBlockHessians, accumulate


def _configs(model: nn.Module) -> list:
    seen, out = set(), []
    for m in model.modules():
        c = getattr(m, "config", None)
        if c is not None and id(c) not in seen and hasattr(c, "_attn_implementation"):
            seen.add(id(c))
            out.append(c)
    return out


@contextlib.contextmanager
def eager_attention(model: nn.Module, enabled: bool = True):
    """Run ``model``'s attention through the eager path inside the block (it returns the attention
    probabilities, and the masks the model builds are explicit), restoring the previous choice after."""
    if not enabled:
        yield
        return
    configs = _configs(model)
    old = [c._attn_implementation for c in configs]
    try:
        for c in configs:
            c._attn_implementation = "eager"
        yield
    finally:
        for c, o in zip(configs, old):
            c._attn_implementation = o


def attention_heads(layer: nn.Module, name: str) -> tuple[nn.Module, int, int, int] | None:
    """(attention module, query heads, key/value heads, head dim) when ``name`` is the key or value
    projection of a standard multi-/grouped-query attention block (with a ``q_proj``), else None."""
    if not name.endswith(("k_proj", "v_proj")) or "." not in name:
        return None
    attn = layer.get_submodule(name.rsplit(".", 1)[0])
    if not isinstance(getattr(attn, "q_proj", None), nn.Linear):
        return None
    cfg = getattr(attn, "config", None)
    nh = getattr(cfg, "num_attention_heads", None)
    if not nh:
        return None
    nkv = getattr(cfg, "num_key_value_heads", None) or nh
    hd = getattr(attn, "head_dim", None) or getattr(cfg, "head_dim", None) or cfg.hidden_size // nh
    if nh % nkv or layer.get_submodule(name).out_features != nkv * hd:
        return None
    return attn, nh, nkv, hd


@torch.no_grad()
def collect_hessians(layer: nn.Module, batches: list[Batch], names: list[str], attention: bool = False,
                     device: str | torch.device | None = None) -> dict[str, HessianAccumulator | RowBlockHessians]:
    """One Hessian per distinct input among the named linears (shared objects for fused ones).

    ``device``: where the layer runs when the batches' hidden states sit elsewhere (offloaded to host memory);
    each batch moves there for its turn.

    With ``attention`` a key or value projection gets a :class:`RowBlockHessians` (one attention-weighted
    Hessian per key/value head, see the module docstring) instead; the layer must run under
    :func:`eager_attention` then.
    """
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
        first_output(layer(_on(batches[0].hidden[:1], device), **_slice_kwargs(batches[0].kwargs, 1)))
    finally:
        for h in hs:
            h.remove()
    alive.clear()
    dev = linears[names[0]].weight.device  # Hessians live where the layer runs
    accs = {n: HessianAccumulator(linears[n].in_features, device=dev) for n in set(owner.values())}

    def add(name):
        def f(_m, args):
            accumulate(accs[name], args[0].detach().reshape(-1, args[0].shape[-1]).float())

        return f

    hs = [linears[n].register_forward_pre_hook(add(n)) for n in accs]
    blocks: dict[str, RowBlockHessians] = {}
    for n in names if attention else ():
        ah = attention_heads(layer, n)
        if ah is None:
            continue
        attn, nh, nkv, hd = ah
        blocks[n] = RowBlockHessians([HessianAccumulator(linears[n].in_features, device=dev) for _ in range(nkv)], hd)
        hs += _attention_hooks(attn, linears[n], blocks[n], nh, nkv, hd, n, key=n.endswith("k_proj"))
    try:
        for b in batches:
            layer(_on(b.hidden, device), **b.kwargs)
    finally:
        for h in hs:
            h.remove()
    for n in [n for n, rb in blocks.items() if rb.failed]:
        warnings.warn(f"{n}: the attention block returned no attention probabilities; using the plain X^T X "
                      "Hessian for it", stacklevel=2)
        del blocks[n]
    return {n: blocks[n] if n in blocks else accs[owner[n]] for n in names}


@torch.no_grad()
def head_hessian(model: nn.Module, batches: list[Batch], device: str | torch.device | None = None
                 ) -> HessianAccumulator:
    """The output head's Hessian ``H = 2/n X^T X`` with ``X`` its input, ``norm(h)`` for the hidden states
    ``h`` that leave the last decoder layer (``batches``: the last layer's outputs over the calibration
    windows). The logit soft-cap acts after the head and does not enter its input."""
    h = head(model)
    dev = h.lm_head.weight.device if device is None else device
    acc = HessianAccumulator(h.lm_head.in_features, device=dev)
    for b in batches:
        x = h.norm(_on(b.hidden, device))
        accumulate(acc, x.detach().reshape(-1, x.shape[-1]).float())
    return acc


def _attention_hooks(attn: nn.Module, lin: nn.Linear, rb: RowBlockHessians, nh: int, nkv: int, hd: int, name: str,
                     key: bool) -> list:
    """Hooks that add one attention block's contribution to the per key/value head Hessians of ``lin``.

    Value projection: (A_h X)^T (A_h X) of every query head h that reads head g. Key projection: the
    logit error q_t . dk_s weighted by the attention probability a_ts, with q_t q_t^T replaced by its
    isotropic part, which gives sum_s c_s x_s x_s^T with c_s = sum_h sum_t a_ts |q_t|^2 (RoPE rotates
    q and k but keeps |q_t|).
    """
    held = {}
    rep = nh // nkv

    def grab(_m, args):
        held["x"] = args[0].detach()

    def grab_q(_m, _args, out):
        held["q"] = out.detach()

    def mix(_m, _args, out):
        A = out[1] if isinstance(out, (tuple, list)) and len(out) > 1 else None
        if not isinstance(A, torch.Tensor) or A.dim() != 4 or A.shape[1] != nh:
            held.clear()
            rb.failed = True  # no probabilities from this attention block: collect_hessians falls back
            return
        X = held.pop("x").float()  # [b, T, K]
        A = A.detach().float()  # [b, nh, T, S]
        if key:
            q = held.pop("q").float()
            q2 = q.reshape(*q.shape[:2], nh, -1).pow(2).sum(-1)  # [b, T, nh]
            c = torch.einsum("bhts,bth->bhs", A, q2)  # [b, nh, S]
            for g in range(nkv):
                w = c[:, g * rep:(g + 1) * rep].sum(1).clamp_min(0).sqrt()  # [b, S]
                accumulate(rb.blocks[g], (X * w.unsqueeze(-1)).reshape(-1, X.shape[-1]))
        else:
            for g in range(nkv):
                AX = torch.matmul(A[:, g * rep:(g + 1) * rep], X.unsqueeze(1))  # [b, rep, T, K]
                accumulate(rb.blocks[g], AX.reshape(-1, X.shape[-1]))

    hooks = [lin.register_forward_pre_hook(grab), attn.register_forward_hook(mix)]
    if key:
        hooks.append(attn.q_proj.register_forward_hook(grab_q))
    return hooks


def _on(t: torch.Tensor, device) -> torch.Tensor:
    return t if device is None else t.to(device, non_blocking=True)


def _slice_kwargs(kwargs: dict, b: int) -> dict:
    def cut(v):
        if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] > 1:
            return v[:b]
        if isinstance(v, tuple):
            return tuple(cut(x) for x in v)
        return v

    return {k: cut(v) for k, v in kwargs.items()}
