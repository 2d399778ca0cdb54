"""slq: statistically-lossless quantization of Hugging Face causal LLMs.

Public API::

    slq.quantize(model, config=QuantConfig(...))   -> report dict; writes a compressed-tensors checkpoint
    slq.search.search(model, config=SearchConfig(...)) -> report dict; the per-unit SLQ search
    slq.load(dir)                                  -> model whose linears are QuantLinear
    slq.evaluate(reference, candidate)             -> Fidelity (EAR, KL, top-1, PPL, on-policy, tasks)
    slq.quantize_model(model, config, ...)         -> in-place, in-memory quantization (codes + plan)
    slq.speculative.generate(target, draft, ids)   -> exact speculative decoding (the DL checkpoint drafts)

The keyword settings (``slq.quantize(model, bits=4, group_size=128, ...)``) build the same configs.
"""

from .api import evaluate, generate, info, quantize
from .measure.fidelity import Fidelity
from .quant.config import QuantConfig
from .quant.pipeline import quantize_model
from .quant.spec import LayerPlan, Plan, QuantSpec
from .runtime.checkpoint import load
from .runtime import speculative
from .runtime.qlinear import QuantLinear
from .search.config import SearchConfig
from .util.errors import ConfigError, SlqError
from .util.provenance import __version__

__all__ = [
    "ConfigError",
    "Fidelity",
    "LayerPlan",
    "Plan",
    "QuantConfig",
    "QuantLinear",
    "QuantSpec",
    "SearchConfig",
    "SlqError",
    "__version__",
    "evaluate",
    "generate",
    "info",
    "load",
    "quantize",
    "quantize_model",
    "speculative",
]
