"""``slq bench``: decode speed of quantized linears and models, beside FP16, against the roofline.

Two sources of weights:

* ``--shape NAME`` (:data:`SHAPES`): synthetic random weights of a real model's shapes, no
  download. FP16 is a random Llama built with ``transformers.LlamaConfig`` +
  ``AutoModelForCausalLM.from_config``; quantized variants replace every decoder linear by a
  :class:`~slq.modules.QuantLinear` holding random codes (values do not change speed).
* ``DIR``: a real slq checkpoint; its FP16 counterpart is the same model with every QuantLinear
  replaced by an fp16 ``nn.Linear`` of its dequantized weight.

Measurements (every figure next to the FP16 figure of the same run, with the speedup and the
% of the memory-bandwidth roofline):

* ``layer`` (shape mode): one linear of each kind (q/k/v fused, o, gate/up fused, down) at each
  bitwidth and batch M, timed over R distinct weight copies with R x bytes >= 2 x the last-level
  cache (L2 on GPU, LLC on CPU), so every call streams its weights from memory; time / R.
  On CUDA the R calls are one CUDA graph.
* ``stack``: every linear of every layer (the decode engine's fused projections), in one CUDA
  graph on GPU, a plain loop on CPU.
* ``decode``: end-to-end greedy decode through :class:`slq.decode.DecodeEngine` (CUDA graph per
  step on GPU), tokens/s = batch x decode steps / decode time, prefill excluded and reported apart.

Roofline: time = bytes that must be streamed / peak bandwidth. Weight bytes are the storage format's:
``N K (b + (16 + b)/G) / 8`` for a quantized linear (codes, fp16 scale and b-bit zero per group),
``2 N K`` for FP16; ``decode`` adds the fp16 lm_head and the KV cache read at the mean context.
The peak is measured here: a device-to-device copy (CUDA graph) on GPU, a large memcpy
(``Tensor.copy_``, beyond the LLC) on CPU, counting bytes read + written.

The package, one job per module: :mod:`.options` (checking the user's input), :mod:`.plans` (which
shapes and bit plans to time), :mod:`.synthetic` (random quantized weights and models, byte
accounting), :mod:`.timing` (CUDA graph / event / CPU timers, peak bandwidth), :mod:`.recorder` (the
JSON: device, versions, commit, settings, rows beside FP16), :mod:`.measure` (layer, stack and
decode measurements) and :mod:`.suite` (:func:`run`, which puts them together).
"""

from .plans import SHAPES, Shape, pattern_plan
from .suite import run
from .synthetic import random_qlinear
from .timing import peak_bandwidth, time_eager, time_graph

__all__ = ["SHAPES", "Shape", "run", "peak_bandwidth", "time_graph", "time_eager", "random_qlinear", "pattern_plan"]
