"""The one place that knows a decoder: layers, linears and their roles, fused groups, the head.

A causal LM, for slq, is a list of decoder layers (an ``nn.ModuleList`` at a path such as
``model.layers``, its *prefix*), each holding ``nn.Linear`` projections, followed by a final norm
and an output head (``lm_head``, possibly tied to the input embedding). Each family below is a
short declarative table (after GPTQModel's ``models/definitions``): where the layers are, and per
layer its linears grouped by *kind*; the linears of one kind read the very same input tensor, so a
serving engine computes them as one GEMM and they must share one bitwidth:

    kind          roles                   input
    attn.qkv      q, k, v  (or fused qkv)  the attention block's normed hidden state
    attn.o        o                       the attention output
    mlp.gate_up   gate, up (or gate_up)   the MLP block's normed hidden state
    mlp.down      down                    act(gate) * up

A *role* is what a linear computes (q, k, v, o, gate, up, down; phi3 stores q/k/v as one ``qkv``
and gate/up as one ``gate_up``). Full module names are ``{prefix}.{layer}.{path}``, e.g.
``model.layers.3.self_attn.k_proj``.

Families outside the table are handled generically where that is sound: the layers are the
``ModuleList`` of ``config.num_hidden_layers`` blocks and every ``nn.Linear`` inside is
quantizable, each its own allocation unit (no fused kinds, no decode engine). A model whose layers
hold projections that are not ``nn.Linear`` (GPT-2's ``Conv1D``) is reported as unsupported by
:func:`decoder_linears` rather than quantized as if it had no linears.

Supported uses, decided per family by what the code does (the two lists that disagreed before:
fused units named nine families, the decode engine four):

* fused units (``slq.quant.units``): every family in the table. The allocation only needs the
  grouping of linears, which each table states.
* decode engine (``slq.runtime.decode``): llama, mistral, qwen2, qwen3 only. The engine rebuilds
  the Llama step (RMSNorm before attention and MLP, full rotary, separate q/k/v and gate/up).
  Gemma multiplies the embeddings by sqrt(hidden) inside the model's forward, gemma2/gemma3 add
  pre/post feed-forward norms, soft-capping and alternating sliding windows, and phi3 stores q/k/v
  and gate/up as single linears with partial rotary: the engine would compute something else, so
  they decode through transformers' ``generate``.
* probing (``slq.search``): any family whose final norm and head :func:`head` can find.
* the head as a quantized linear (``QuantConfig.head_bits``, the search's head unit): any family :func:`head`
  can find; its input is the final norm's output, which :func:`slq.quant.calib.head_hessian` collects.

This module imports only torch and ``slq.util``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from torch import nn

from ..util.errors import SlqError

ROLES = ("q", "k", "v", "qkv", "o", "gate", "up", "gate_up", "down")
KINDS = ("attn.qkv", "attn.o", "mlp.gate_up", "mlp.down")


@dataclass(frozen=True)
class Family:
    """One decoder family: ``kinds`` maps each kind to {path inside a layer: role}."""

    name: str
    layers: str  # path of the decoder ModuleList
    norm: str  # path of the final norm
    kinds: dict[str, dict[str, str]]
    decode: bool = False  # the decode engine runs it (see the module docstring)

    def roles(self) -> dict[str, str]:
        """path inside a layer -> role, in model order."""
        return {p: r for group in self.kinds.values() for p, r in group.items()}

    def kind_of(self, path: str) -> str | None:
        """The kind of the linear at ``path`` inside a layer, None for a linear the table does not name."""
        return next((k for k, group in self.kinds.items() if path in group), None)


_LLAMA_LAYER = {
    "attn.qkv": {"self_attn.q_proj": "q", "self_attn.k_proj": "k", "self_attn.v_proj": "v"},
    "attn.o": {"self_attn.o_proj": "o"},
    "mlp.gate_up": {"mlp.gate_proj": "gate", "mlp.up_proj": "up"},
    "mlp.down": {"mlp.down_proj": "down"},
}
_PHI3_LAYER = {
    "attn.qkv": {"self_attn.qkv_proj": "qkv"},
    "attn.o": {"self_attn.o_proj": "o"},
    "mlp.gate_up": {"mlp.gate_up_proj": "gate_up"},
    "mlp.down": {"mlp.down_proj": "down"},
}

FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("llama", "model.layers", "model.norm", _LLAMA_LAYER, decode=True),
    Family("mistral", "model.layers", "model.norm", _LLAMA_LAYER, decode=True),
    Family("qwen2", "model.layers", "model.norm", _LLAMA_LAYER, decode=True),
    Family("qwen3", "model.layers", "model.norm", _LLAMA_LAYER, decode=True),  # + q_norm / k_norm (not linears)
    Family("gemma", "model.layers", "model.norm", _LLAMA_LAYER),
    Family("gemma2", "model.layers", "model.norm", _LLAMA_LAYER),
    Family("gemma3_text", "model.layers", "model.norm", _LLAMA_LAYER),
    Family("gemma3", "model.language_model.layers", "model.language_model.norm", _LLAMA_LAYER),  # text part
    Family("phi3", "model.layers", "model.norm", _PHI3_LAYER),
)}
FUSED_FAMILIES = tuple(FAMILIES)
DECODE_FAMILIES = tuple(n for n, f in FAMILIES.items() if f.decode)

# the last name component of every linear a table names -> (role, kind); for callers that see a bare
# module name (the kernel chooser), the same in every family
_LEAF = {p.rsplit(".", 1)[-1]: (r, k) for f in FAMILIES.values() for k, g in f.kinds.items() for p, r in g.items()}


def model_type(model: nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "model_type", None)


def family(model: nn.Module) -> Family | None:
    """The table of ``model``'s family (by ``config.model_type``), None when it has none."""
    return FAMILIES.get(model_type(model))


def role_of(name: str) -> str | None:
    """Role of a linear from its (full or relative) module name, e.g. ``...self_attn.k_proj`` -> ``k``."""
    hit = _LEAF.get(name.rsplit(".", 1)[-1])
    return hit[0] if hit else None


def kind_of(name: str) -> str | None:
    """Kind of a linear from its module name, e.g. ``...mlp.up_proj`` -> ``mlp.gate_up``."""
    hit = _LEAF.get(name.rsplit(".", 1)[-1])
    return hit[1] if hit else None


def unsupported(model: nn.Module, use: str) -> str | None:
    """Why ``model`` cannot be used for ``use`` ("fused" units or "decode"), None when it can."""
    fam, mt = family(model), model_type(model)
    if use == "fused":
        if fam is None:
            return f"model family {mt!r} has no known fused projections (known: {', '.join(FUSED_FAMILIES)})"
        return None
    if use == "decode":
        if fam is None or not fam.decode:
            return f"the decode engine supports {', '.join(DECODE_FAMILIES)} models; got model_type {mt!r}"
        return None
    raise ValueError(f"unknown use {use!r}")


def _get(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of decoder blocks: the family's path, else the ModuleList of ``num_hidden_layers`` blocks."""
    fam = family(model)
    if fam is not None:
        layers = _get(model, fam.layers)
        if isinstance(layers, nn.ModuleList) and len(layers):
            return layers
    base = getattr(model, "model", None)
    for cand in (getattr(base, "layers", None), getattr(getattr(base, "decoder", None), "layers", None)):
        if isinstance(cand, nn.ModuleList) and len(cand):
            return cand
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for _, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) == n:
            return mod
    raise SlqError(f"unsupported architecture {type(model).__name__}: cannot find its decoder layers")


def layers_prefix(model: nn.Module) -> str:
    """Module name of the decoder layer list, e.g. ``model.layers``."""
    layers = decoder_layers(model)
    return next(n for n, m in model.named_modules() if m is layers)


def layer_linears(layer: nn.Module) -> dict[str, nn.Linear]:
    """path inside the layer -> every ``nn.Linear`` of one decoder layer, in model order."""
    return {name: m for name, m in layer.named_modules() if isinstance(m, nn.Linear)}


def decoder_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Full name -> every ``nn.Linear`` inside the decoder layers (not the head), in model order.

    Raises SlqError when a layer holds projections that are not ``nn.Linear`` (``Conv1D``) or no
    linear at all: such a model would otherwise be "quantized" by leaving it as it is."""
    prefix, out = layers_prefix(model), {}
    for i, layer in enumerate(decoder_layers(model)):
        odd = sorted({type(m).__name__ for m in layer.modules() if type(m).__name__ == "Conv1D"})
        lins = layer_linears(layer)
        if odd or not lins:
            what = f"projections of type {', '.join(odd)}" if odd else "no nn.Linear"
            raise SlqError(f"unsupported architecture {type(model).__name__} (model_type {model_type(model)!r}): "
                           f"decoder layer {i} holds {what}; slq quantizes nn.Linear projections")
        out.update({f"{prefix}.{i}.{rel}": m for rel, m in lins.items()})
    return out


class Head(NamedTuple):
    """What turns the last hidden state into logits: ``softcap * tanh(lm_head(norm(h)) / softcap)``."""

    norm: nn.Module
    lm_head: nn.Module  # may share its weight with the input embedding (tied)
    softcap: float | None


def head(model: nn.Module) -> Head:
    """The final norm, output head and logit soft-cap of a causal LM."""
    fam = family(model)
    norm = _get(model, fam.norm) if fam is not None else getattr(getattr(model, "model", None), "norm", None)
    lm_head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if norm is None or lm_head is None:
        raise SlqError(f"cannot find the final norm / lm_head of {type(model).__name__}")
    cfg = getattr(model, "config", None)
    cap = getattr(cfg, "final_logit_softcapping", None)
    if cap is None:
        cap = getattr(getattr(cfg, "text_config", None), "final_logit_softcapping", None)
    return Head(norm, lm_head, cap)


def head_name(model: nn.Module) -> str:
    """Full module name of the output head (``lm_head`` in every family above)."""
    lm_head = head(model).lm_head
    return next(n for n, m in model.named_modules() if m is lm_head)


def head_tied(model: nn.Module) -> bool:
    """The output head shares its weight Parameter with the input embedding (``tie_word_embeddings``): quantizing
    the head then changes the embedding too, and a checkpoint stores the pair untied (see
    :mod:`slq.runtime.checkpoint`)."""
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    inp = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return out is not None and inp is not None and out.weight is inp.weight


__all__ = ["DECODE_FAMILIES", "FAMILIES", "FUSED_FAMILIES", "Family", "Head", "KINDS", "ROLES", "decoder_layers",
           "decoder_linears", "family", "head", "head_name", "head_tied", "kind_of", "layer_linears", "layers_prefix", "model_type", "role_of",
           "unsupported"]
