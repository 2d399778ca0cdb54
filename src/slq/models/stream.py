"""Block streaming: a model whose weights stay in their safetensors files, one decoder block at a time on the device.

A :class:`StreamedModel` builds the model's *skeleton* with every parameter on the ``meta`` device (shapes and
dtypes, no storage); buffers (rotary frequencies) are computed for real, they are tiny. The weights stay in the
model directory's safetensors files, opened with ``safe_open`` (memory-mapped: a tensor is read from disk only
when it is asked for). A module is *materialized* (its parameters read onto the device) when it is needed and
*released* (set back to meta) after, so a forward over a decoder of depth L holds at most one block, the
modules before the blocks (embeddings) or the head (final norm, ``lm_head``) at a time.

The forward is cut at the decoder layers, as in GPTQ calibration: the inputs of layer 0 (hidden states and
the keyword arguments the model gives every layer: rotary embeddings, masks) are caught once, by running the
model with only its embeddings materialized and stopping at layer 0's pre-hook; then each layer runs on its
own over every batch (:func:`run_layer`), and the activations pass from block to block. When they do not fit
the device they sit in host memory (pinned under CUDA) and each batch moves to the device for its turn
(``offload_activations``).

Invariant: the streamed computation is the in-memory one. The same modules run the same operations on the
same tensors (read as the in-memory loader reads them: stored dtype cast to ``dtype``), so codes, activations
and logits are equal bit for bit to those of the model loaded whole (the tests check it). Tied parameters
(``lm_head`` sharing the embedding) are materialized and released together, from whichever name the files hold.

Memory accounting: ``live_bytes`` counts the bytes of materialized parameters, ``peak_bytes`` its maximum
since :meth:`StreamedModel.reset_peak`; on CUDA ``torch.cuda.max_memory_allocated`` is the figure to trust,
on CPU this count (plus the activations, which the caller counts) is the one reported: tracemalloc does not
see torch's allocator and RSS mixes in the interpreter and page cache.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from ..util.errors import SlqError
from .arch import decoder_layers, head, layers_prefix


@dataclass
class Batch:
    """Inputs of one decoder layer for one batch of windows: hidden states and the layer's keyword arguments."""

    hidden: torch.Tensor
    kwargs: dict


class _Stop(Exception):
    pass


def first_output(out):
    """The hidden state of a layer's output (a tensor, or the first item of a tuple)."""
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def capture_layer0_inputs(model: nn.Module, windows: torch.Tensor, batch_size: int, device: str) -> list[Batch]:
    """Inputs of the first decoder layer for every batch of windows (the model stops at layer 0's pre-hook,
    so the decoder layers themselves may still be on the meta device)."""
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


@torch.no_grad()
def run_layer(layer: nn.Module, batches: list[Batch], device: str | torch.device | None = None) -> list[Batch]:
    """The layer's outputs, which are the next layer's inputs (same kwargs). With ``device`` each batch's hidden
    state moves there to run and its output comes back to where the input was (activation offloading)."""
    if device is None:
        return [Batch(first_output(layer(b.hidden, **b.kwargs)), b.kwargs) for b in batches]
    out = []
    for b in batches:
        h = first_output(layer(b.hidden.to(device, non_blocking=True), **b.kwargs))
        out.append(Batch(_to_host(h) if b.hidden.device.type == "cpu" else h, b.kwargs))
    return out


def _to_host(t: torch.Tensor) -> torch.Tensor:
    """``t`` in host memory, pinned when CUDA is there (so the next copy to the device is asynchronous)."""
    if t.device.type == "cpu":
        return t
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=torch.cuda.is_available())
    host.copy_(t)
    return host


def batches_bytes(batches: list[Batch]) -> int:
    """Bytes of the hidden states of ``batches`` (the activations passed from block to block)."""
    return sum(b.hidden.numel() * b.hidden.element_size() for b in batches)


def offload_batches(batches: list[Batch]) -> list[Batch]:
    """The same batches with their hidden states in (pinned) host memory."""
    return [Batch(_to_host(b.hidden), b.kwargs) for b in batches]


@contextlib.contextmanager
def parameters_on_meta():
    """Inside the block, every parameter a module registers is replaced by a meta tensor of its shape and dtype
    (the temporary ``torch.empty`` it was made from is never touched, so no memory is committed); buffers stay
    real."""
    register = nn.Module.register_parameter

    def on_meta(self, name, param):
        register(self, name, param)
        p = self._parameters.get(name)
        if p is not None and p.device.type != "meta":
            self._parameters[name] = nn.Parameter(p.to("meta"), requires_grad=p.requires_grad)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def weight_index(path: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file holding it, for every ``*.safetensors`` file of the directory."""
    path = Path(path)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise SlqError(f"cannot stream {path}: it holds no .safetensors weights")
    out: dict[str, Path] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as st:
                out.update({k: f for k in st.keys()})
        except (SafetensorError, OSError) as e:
            raise SlqError(f"corrupt, truncated or unreadable weights file {f}: {str(e).splitlines()[0]}") from e
    return out


def checkpoint_bytes(path: Path, dtype: torch.dtype = torch.float32) -> int:
    """Bytes the model's parameters take at ``dtype`` (from the safetensors headers; no data is read)."""
    size = torch.empty((), dtype=dtype).element_size()
    n = 0
    for name, f in weight_index(path).items():
        with safe_open(str(f), framework="pt") as st:
            shape = st.get_slice(name).get_shape()
        n += int(torch.Size(shape).numel())
    return n * size


def free_device_bytes(device: str) -> int:
    """Free memory of ``device``: CUDA's free bytes, or the host's available memory for ``cpu``."""
    if str(device).startswith("cuda"):
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


def should_stream(path: Path, device: str, dtype: torch.dtype = torch.float32, headroom: float = 0.8) -> bool:
    """True when the model's weights at ``dtype`` exceed ``headroom`` of the device's free memory."""
    return checkpoint_bytes(path, dtype) > headroom * free_device_bytes(device)


class StreamedModel:
    """A causal LM whose parameters are read from its safetensors files one module at a time.

    ``model`` is the skeleton (parameters on meta, buffers on ``device``); :meth:`materialize` reads a
    module's parameters onto ``device`` and :meth:`release` returns them to meta. ``overrides`` (parameter
    name -> tensor, or anything with ``dequantize()`` such as a ``QuantizedWeight``, dequantized only when read)
    replaces what the files hold for those names: a quantized model is streamed as the reference files plus
    its codes.
    """

    def __init__(self, path: str | Path, *, dtype: torch.dtype = torch.float32, device: str = "cpu",
                 trust_remote_code: bool = False, overrides: dict[str, torch.Tensor] | None = None):
        from transformers import AutoConfig, AutoModelForCausalLM

        self.path, self.dtype, self.device = Path(path), dtype, device
        self.index = weight_index(self.path)
        try:
            config = AutoConfig.from_pretrained(self.path, trust_remote_code=trust_remote_code)
        except (ValueError, KeyError, OSError) as e:
            raise SlqError(f"cannot read the config of {self.path}: {str(e).strip().splitlines()[0]}") from e
        with parameters_on_meta():
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
        model.eval()
        for m in model.modules():
            for n, b in m._buffers.items():
                if b is not None and b.device.type != "meta":
                    m._buffers[n] = b.to(device)
        model.name_or_path = str(self.path)
        self.model = model
        self.overrides = dict(overrides or {})
        # parameter name -> every name of that parameter (tied weights have several)
        groups: dict[int, list[str]] = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            groups.setdefault(id(p), []).append(name)
        self._aliases = {n: g for g in groups.values() for n in g}
        self._module_names = {id(m): n for n, m in model.named_modules(remove_duplicate=False)}
        self.live_bytes = 0
        self.peak_bytes = 0

    @property
    def config(self):
        return self.model.config

    # -- materialize / release ---------------------------------------------------------------------------
    def _names(self, module: nn.Module) -> list[list[str]]:
        """Alias lists of the parameters of ``module`` (each tied group once)."""
        seen, out = set(), []
        prefix = self._module_names[id(module)]
        for name, _ in module.named_parameters(prefix=prefix, remove_duplicate=False):
            names = self._aliases[name]
            if names[0] not in seen:
                seen.add(names[0])
                out.append(names)
        return out

    def _read(self, names: list[str]) -> torch.Tensor:
        for n in names:
            if n in self.overrides:
                o = self.overrides[n]
                t = o.dequantize() if hasattr(o, "dequantize") else o  # a QuantizedWeight: dequantized when read
                return t.to(self.device, self.dtype)
        for n in names:
            f = self.index.get(n)
            if f is not None:
                with safe_open(str(f), framework="pt", device="cpu") as st:
                    t = st.get_tensor(n)
                return t.to(self.device, self.dtype) if t.is_floating_point() else t.to(self.device)
        raise SlqError(f"{self.path}: no weight file holds {names[0]}")

    def _assign(self, names: list[str], tensor: torch.Tensor) -> None:
        p = nn.Parameter(tensor, requires_grad=False)
        for n in names:
            mod, _, leaf = n.rpartition(".")
            self.model.get_submodule(mod)._parameters[leaf] = p

    def materialize(self, module: nn.Module) -> nn.Module:
        """Read every parameter of ``module`` (a submodule of ``model``) onto the device; returns it."""
        for names in self._names(module):
            p = self.model.get_parameter(names[0])
            if p.device.type != "meta":
                continue
            t = self._read(names)
            if tuple(t.shape) != tuple(p.shape):
                raise SlqError(f"the weights in {self.path} do not have the shapes its config.json describes "
                               f"({names[0]}: {tuple(t.shape)} vs {tuple(p.shape)})")
            self._assign(names, t)
            self.live_bytes += t.numel() * t.element_size()
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        return module

    def release(self, module: nn.Module) -> None:
        """Return every parameter of ``module`` to the meta device (its memory is freed)."""
        for names in self._names(module):
            p = self.model.get_parameter(names[0])
            if p.device.type == "meta":
                continue
            self.live_bytes -= p.numel() * p.element_size()
            self._assign(names, torch.empty(p.shape, dtype=p.dtype, device="meta"))

    @contextlib.contextmanager
    def onloaded(self, *modules: nn.Module):
        """Materialize ``modules`` for the duration of the block, release them after."""
        try:
            for m in modules:
                self.materialize(m)
            yield modules[0] if len(modules) == 1 else modules
        finally:
            for m in modules:
                self.release(m)

    def reset_peak(self) -> None:
        self.peak_bytes = self.live_bytes

    # -- the parts of the model --------------------------------------------------------------------------
    @property
    def layers(self) -> nn.ModuleList:
        return decoder_layers(self.model)

    def _outer(self) -> list[nn.Module]:
        """The modules holding parameters outside the decoder layers and the head (the embeddings)."""
        prefix, h = layers_prefix(self.model), head(self.model)
        return [m for name, m in self.model.named_modules()
                if not (name == prefix or name.startswith(prefix + ".") or m is h.norm or m is h.lm_head)
                and any(True for _ in m.parameters(recurse=False))]

    @torch.no_grad()
    def layer0_inputs(self, windows: torch.Tensor, batch_size: int) -> list[Batch]:
        """Inputs of decoder layer 0 for every batch of ``windows`` (only the embeddings are materialized)."""
        with self.onloaded(*self._outer()):
            return capture_layer0_inputs(self.model, windows, batch_size, self.device)

    @torch.no_grad()
    def hidden_states(self, windows: torch.Tensor, batch_size: int, offload_activations: bool = False
                      ) -> list[Batch]:
        """Outputs of the last decoder layer for every batch of ``windows``, one block at a time."""
        batches = self.layer0_inputs(windows, batch_size)
        if offload_activations:
            batches = offload_batches(batches)
        for layer in self.layers:
            with self.onloaded(layer):
                batches = run_layer(layer, batches, self.device if offload_activations else None)
        return batches

    @torch.no_grad()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``softcap * tanh(lm_head(norm(hidden)) / softcap)``; the head must be materialized (see :meth:`head`)."""
        h = head(self.model)
        z = h.lm_head(h.norm(hidden.to(self.device)))
        if h.softcap:
            z = torch.tanh(z / h.softcap) * h.softcap
        return z

    def head(self):
        """Context manager: the final norm and ``lm_head`` materialized for the duration."""
        h = head(self.model)
        return self.onloaded(h.norm, h.lm_head)

    def load_rest(self, exclude: set[str] | frozenset[str] = frozenset()) -> nn.Module:
        """Materialize on the CPU every parameter except the weights of the linears named in ``exclude``
        (module names): the skeleton then holds what a checkpoint stores beside the quantized linears."""
        dev, self.device = self.device, "cpu"
        try:
            for names in self._names(self.model):
                if any(n.endswith(".weight") and n[: -len(".weight")] in exclude for n in names):
                    continue
                if self.model.get_parameter(names[0]).device.type == "meta":
                    self._assign(names, self._read(names))
        finally:
            self.device = dev
        for m in self.model.modules():
            for n, b in m._buffers.items():
                if b is not None:
                    m._buffers[n] = b.cpu()
        return self.model


__all__ = ["Batch", "StreamedModel", "batches_bytes", "capture_layer0_inputs", "checkpoint_bytes", "first_output",
           "parameters_on_meta",
           "free_device_bytes", "offload_batches", "run_layer", "should_stream", "weight_index"]
