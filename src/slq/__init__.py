"""slq: statistically-lossless quantization of Hugging Face causal LLMs.

Public API::

    slq.quantize(model, bits=4, ...)      -> report dict; writes a compressed-tensors checkpoint
    slq.load(dir)                         -> model whose linears are QuantLinear
    slq.evaluate(reference, candidate)    -> Fidelity (EAR, KL, top-1, PPL, on-policy, tasks)
    slq.quantize_model(model, spec, ...)  -> in-place, in-memory quantization (codes + plan)
"""

from .util.provenance import __version__  # noqa: E402

from .api import evaluate, generate, info, quantize  # noqa: E402
from .runtime.checkpoint import load  # noqa: E402
from .util.errors import SlqError  # noqa: E402
from .measure.fidelity import Fidelity  # noqa: E402
from .runtime.qlinear import QuantLinear  # noqa: E402
from .quant.pipeline import quantize_model  # noqa: E402
from .quant.spec import LayerPlan, Plan, QuantSpec  # noqa: E402

__all__ = [
    "Fidelity",
    "LayerPlan",
    "Plan",
    "QuantLinear",
    "QuantSpec",
    "SlqError",
    "evaluate",
    "generate",
    "info",
    "load",
    "quantize",
    "quantize_model",
]
