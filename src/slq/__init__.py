"""slq: statistically-lossless quantization of Hugging Face causal LLMs.

Public API::

    slq.quantize(model, bits=4, ...)      -> report dict; writes a compressed-tensors checkpoint
    slq.load(dir)                         -> model whose linears are QuantLinear
    slq.evaluate(reference, candidate)    -> Fidelity (EAR, KL, top-1, PPL, on-policy, tasks)
    slq.quantize_model(model, spec, ...)  -> in-place, in-memory quantization (codes + plan)
"""

__version__ = "0.1.0"

from .api import generate, info, quantize  # noqa: E402
from .checkpoint import load  # noqa: E402
from .errors import SlqError  # noqa: E402
from .evaluate import evaluate  # noqa: E402
from .fidelity import Fidelity  # noqa: E402
from .modules import QuantLinear  # noqa: E402
from .quantize import quantize_model  # noqa: E402
from .spec import LayerPlan, Plan, QuantSpec  # noqa: E402

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
