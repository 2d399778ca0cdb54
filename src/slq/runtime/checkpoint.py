"""Checkpoints in the compressed-tensors ``pack-quantized`` format, read and written
through the compressed-tensors library (its config classes and its int32 packing).

Per quantized linear ``name`` (weight [N, K], bits b, G columns per group):

- ``name.weight_packed``  int32 [N, ceil(K*b/32)]: codes as signed ints q - 2^(b-1),
  32 consecutive values in exactly b words, densely (compressed-tensors' packing);
- ``name.weight_scale``   fp16 [N, K/G];
- ``name.weight_zero_point`` (asymmetric only) int32 [N, K/G]: the zero points as
  signed ints, packed the same way along N, in the leading ceil(N*b/32) rows; the
  rest of the rows are 0. The config declares ``zp_dtype: int32`` so that
  ``transformers`` + compressed-tensors allocate exactly this shape when they load
  the model (they allocate the unpacked shape for the zero point, so the canonical
  [ceil(N*b/32), K/G] tensor cannot be loaded by them today);
- ``name.weight_shape``   int64 [2] = [N, K].

One config group per distinct (bits, group, symmetric); ``targets`` are exact module
names. Everything else (embeddings, norms, an unquantized lm_head) is stored as in the model.

The output head. A quantized ``lm_head`` is one more target (and leaves ``ignore``), packed like any
linear. When the model ties it to the input embedding, the format cannot hold the pair as one tensor:
compressed-tensors replaces ``lm_head.weight`` by its packed tensors, so a tie declared in config.json
would make transformers either overwrite the decompressed head with the embedding or leave two
unrelated tensors. The writer therefore *unties* the pair on disk: ``tie_word_embeddings`` is written
false, and the embedding is stored dense as exactly the dequantized head (what a fake-quantized tied
model holds after :func:`slq.quant.pipeline.quantize_model`: one Parameter, so the embedding moved with
the head). The two stay equal after loading, in plain transformers as in :func:`load`: the observable
meaning of "the tied weights stay tied". It costs bytes on disk (the embedding at its dtype plus the
packed head, instead of one tensor), not bytes a decode step reads (the embedding is a row gather).

Writes go to a temporary directory that is fsync'ed and renamed into place at the end
(:mod:`slq.util.atomic`); the report is written inside it, so the report and the weights in a
directory always belong to the same run. The bytes are a function of the tensors alone: the
safetensors header is rewritten with its metadata keys sorted (the library writes them in hash
order, which differs between processes), so two identical runs give identical files.

:func:`verify` checks a checkpoint without dequantizing: every key the config implies, with its
dtype and shape read from the safetensors header (no tensor data), and finite scales.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..util.jsonio import read_json

from ..util.atomic import atomic_directory
from ..util.errors import ConfigError, SlqError
from ..util.preflight import check_out_dir
from ..quant.grid import QuantizedWeight
from .backends import BACKENDS
from .backends.choose import choose_backends
from .qlinear import QuantLinear
from ..quant.spec import QuantSpec
from ..models.sources import is_slq_checkpoint, load_model, resolve_model

REPORT = "slq_report.json"
WEIGHTS = "model.safetensors"


def _ct():
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    return pack_to_int32, unpack_from_int32, QuantizationArgs, QuantizationConfig, QuantizationScheme


def quantization_config(specs: dict[str, QuantSpec], head: str = "lm_head") -> dict:
    """The ``quantization_config`` dict for config.json (compressed-tensors schema); ``head`` (the output
    head's module name) is in ``ignore`` unless it is quantized."""
    _, _, QuantizationArgs, QuantizationConfig, QuantizationScheme = _ct()
    groups: dict[tuple, list[str]] = {}
    for name, s in specs.items():
        groups.setdefault((s.bits, s.group_size, s.symmetric), []).append(name)
    config_groups = {}
    for i, ((bits, g, sym), names) in enumerate(sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1] or 1 << 30, kv[0][2]))):
        args = QuantizationArgs(
            num_bits=bits,
            type="int",
            symmetric=sym,
            strategy="group" if g is not None else "channel",
            group_size=g,
            zp_dtype=None if sym else torch.int32,
        )
        config_groups[f"group_{i}"] = QuantizationScheme(targets=names, weights=args, format="pack-quantized")
    qc = QuantizationConfig(
        config_groups=config_groups, format="pack-quantized", quantization_status="compressed",
        ignore=[] if head in specs else [head],
    )
    return qc.model_dump(mode="json")


def pack_weight(q: QuantizedWeight) -> dict[str, torch.Tensor]:
    pack_to_int32, *_ = _ct()
    b = q.spec.bits
    off = 1 << (b - 1)
    N, K = q.codes.shape
    out = {
        "weight_packed": pack_to_int32((q.codes.to(torch.int32) - off).to(torch.int8), b),
        "weight_scale": q.scale.to(torch.float16).contiguous(),
        "weight_shape": torch.tensor([N, K], dtype=torch.int64),
    }
    if not q.spec.symmetric:
        pz = pack_to_int32((q.zero.to(torch.int32) - off).to(torch.int8), b, packed_dim=0)
        full = torch.zeros(N, pz.shape[1], dtype=torch.int32, device=pz.device)
        full[: pz.shape[0]] = pz
        out["weight_zero_point"] = full
    return out


def unpack_weight(t: dict[str, torch.Tensor], spec: QuantSpec, name: str) -> QuantizedWeight:
    """Validate shapes/dtypes of one module's tensors and return its codes."""
    _, unpack_from_int32, *_ = _ct()
    b = spec.bits
    off = 1 << (b - 1)
    for key in ("weight_packed", "weight_scale", "weight_shape") + (() if spec.symmetric else ("weight_zero_point",)):
        if key not in t:
            raise SlqError(f"corrupt or incomplete checkpoint: missing tensor {name}.{key}")
    shape = t["weight_shape"]
    if shape.numel() != 2:
        raise SlqError(f"corrupt checkpoint: {name}.weight_shape should hold [N, K], got {shape.tolist()}")
    N, K = (int(v) for v in shape.tolist())
    G = spec.effective_group(K)
    ng = K // G if K % G == 0 else -1
    _expect(t["weight_packed"], (N, math.ceil(K * b / 32)), torch.int32, f"{name}.weight_packed")
    _expect(t["weight_scale"], (N, ng), torch.float16, f"{name}.weight_scale")
    codes = (unpack_from_int32(t["weight_packed"], b, torch.Size([N, K])).to(torch.int32) + off).to(torch.uint8)
    if spec.symmetric:
        zero = torch.full((N, ng), off, dtype=torch.uint8, device=t["weight_packed"].device)
    else:
        _expect(t["weight_zero_point"], (N, ng), torch.int32, f"{name}.weight_zero_point")
        zero = (unpack_from_int32(t["weight_zero_point"], b, torch.Size([N, ng]), packed_dim=0).to(torch.int32) + off)
        zero = zero.to(torch.uint8)
    if not torch.isfinite(t["weight_scale"]).all():
        raise SlqError(f"corrupt checkpoint: {name}.weight_scale has NaN/Inf")
    return QuantizedWeight(codes, t["weight_scale"], zero, spec)


def _expect(x: torch.Tensor, shape: tuple, dtype: torch.dtype, what: str) -> None:
    if tuple(x.shape) != tuple(shape) or x.dtype != dtype:
        raise SlqError(
            f"corrupt checkpoint: {what} is {x.dtype} {tuple(x.shape)}, expected {dtype} {tuple(shape)}"
        )


def save_checkpoint(
    out_dir: str | os.PathLike,
    model: torch.nn.Module,
    tokenizer,
    qweights: dict[str, QuantizedWeight],
    report: dict,
    *,
    force: bool = False,
    half_modules: frozenset[str] | set[str] = frozenset(),
    extra_files: dict[str, bytes] | None = None,
    started: float | None = None,
) -> Path:
    """Write the checkpoint atomically; refuses to overwrite unless ``force``, and refuses an ``out``
    that is, holds or lies in the model's own directory.

    ``report`` is written last, inside the temporary directory; with ``started`` (a
    ``time.perf_counter()`` value) its ``timings`` get ``save_s`` and ``total_s`` first.

    ``half_modules``: unquantized linears (the bit search's "16-bit" choice) whose weights are stored
    in fp16 whatever the model's dtype; the caller has already rounded them to fp16 values, so the
    file holds exactly what was measured, and loaders cast them back to the model's dtype.
    """
    t_save = time.perf_counter()
    out = Path(out_dir)
    head, embed = _head_names(model)
    untie = head in qweights and _tied(model)
    if out.exists() and not force:
        raise ConfigError("force", f"output directory {out} exists; pass {{field}} to replace it")
    check_out_dir(out, getattr(model, "name_or_path", None) or None, force=force)
    with atomic_directory(out, replace=True) as tmp:
        tensors: dict[str, torch.Tensor] = {}
        seen_ptrs: dict[int, str] = {}
        skip = {f"{n}.weight" for n in qweights}
        for key, val in model.state_dict().items():
            if key in skip:
                continue
            ptr = val.data_ptr()
            if untie and key == f"{embed}.weight":  # a quantized tied head: the embedding is stored on its own
                ptr = -1
            if ptr in seen_ptrs and val.numel() > 0:  # tied weights are stored once
                continue
            seen_ptrs[ptr] = key
            val = val.detach().cpu()
            if key.endswith(".weight") and key[: -len(".weight")] in half_modules:
                half = val.to(torch.float16)
                if not torch.equal(half.to(val.dtype), val):
                    raise ValueError(f"{key} is not fp16-representable; round it before saving")
                val = half
            tensors[key] = val.contiguous()
        for name, q in qweights.items():
            for k, v in pack_weight(q).items():
                tensors[f"{name}.{k}"] = v
        save_safetensors(tensors, tmp / WEIGHTS, {"format": "pt", "producer": "slq"})
        if untie:
            qh = qweights[head].dequantize()
            stored = tensors[f"{embed}.weight"]
            if not torch.equal(qh.to(stored.dtype), stored):
                raise ValueError(f"{embed}.weight is tied to the quantized {head} but differs from its dequantized "
                                 "weight; quantize the model in place before saving")
        cfg = model.config.to_dict()
        if untie:
            _untie_config(cfg)
        cfg["quantization_config"] = quantization_config({n: q.spec for n, q in qweights.items()}, head)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, data in (extra_files or {}).items():  # reports and plots, inside the same atomic write
            (tmp / name).write_bytes(data)
        if started is not None and isinstance(report.get("timings"), dict):
            report["timings"]["save_s"] = time.perf_counter() - t_save
            report["timings"]["total_s"] = time.perf_counter() - started
        (tmp / REPORT).write_text(json.dumps(report, indent=2, default=_json_default))
    return out


def _head_names(model) -> tuple[str, str | None]:
    """Module names of the output head and the input embedding (``lm_head`` / None when not found)."""
    by_id = {id(m): n for n, m in model.named_modules()}
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    inp = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return by_id.get(id(out), "lm_head"), by_id.get(id(inp))


def _tied(model) -> bool:
    """The output head shares its weight with the input embedding."""
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    inp = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return out is not None and inp is not None and out.weight is inp.weight


def _untie_config(cfg: dict) -> None:
    """``tie_word_embeddings`` false wherever the config declares it (the text config of a composite model too)."""
    cfg["tie_word_embeddings"] = False
    for v in cfg.values():
        if isinstance(v, dict) and "tie_word_embeddings" in v:
            v["tie_word_embeddings"] = False


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str]) -> None:
    """``save_file`` with a deterministic header: the metadata keys sorted (same length, rewritten in place)."""
    save_file(tensors, str(path), metadata=metadata)
    with open(path, "r+b") as f:
        n = int.from_bytes(f.read(8), "little")
        raw = f.read(n)
        header = json.loads(raw)
        header["__metadata__"] = dict(sorted(header.get("__metadata__", {}).items()))
        body = json.dumps({"__metadata__": header.pop("__metadata__"), **header}, separators=(",", ":"),
                          ensure_ascii=False).encode()
        if len(body) > n:  # cannot happen for a reordering; keep the library's header rather than break the file
            return
        f.seek(8)
        f.write(body + b" " * (n - len(body)))


def _json_default(o):
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, torch.Tensor):
        return o.tolist()
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def read_specs(config: dict) -> dict[str, QuantSpec]:
    """Module name -> QuantSpec from a config.json dict; validates what slq supports."""
    qc = config.get("quantization_config")
    if not qc or qc.get("quant_method") != "compressed-tensors":
        raise SlqError("not a compressed-tensors checkpoint (config.json has no such quantization_config)")
    if qc.get("format") != "pack-quantized":
        raise SlqError(f"unsupported compressed-tensors format {qc.get('format')!r}; slq reads pack-quantized")
    specs = {}
    for gname, grp in (qc.get("config_groups") or {}).items():
        w = grp.get("weights") or {}
        if w.get("type") != "int" or w.get("strategy") not in ("group", "channel"):
            raise SlqError(f"config group {gname}: only int weights with group/channel strategy are supported")
        g = w.get("group_size") if w.get("strategy") == "group" else None
        try:
            s = QuantSpec(int(w.get("num_bits")), g, bool(w.get("symmetric")))
        except ValueError as e:
            raise SlqError(f"config group {gname}: {e}") from e
        for target in grp.get("targets", []):
            if target.startswith("re:") or ("." not in target and not target.islower()):  # not a class name
                raise SlqError(f"config group {gname}: target {target!r} is not an exact module name")
            specs[target] = s
    if not specs:
        raise SlqError("the checkpoint's quantization_config names no quantized modules")
    return specs


_ST_DTYPES = {"I32": torch.int32, "I64": torch.int64, "F16": torch.float16, "BF16": torch.bfloat16,
              "F32": torch.float32, "F64": torch.float64, "I8": torch.int8, "U8": torch.uint8}


def _open_weights(path: Path):
    """safe_open of the checkpoint's weights; a missing, truncated or corrupt file is one SlqError naming it."""
    w = path / WEIGHTS
    if not w.is_file():
        raise SlqError(f"corrupt or incomplete checkpoint {path}: {WEIGHTS} is missing")
    try:
        return safe_open(str(w), framework="pt")
    except (SafetensorError, OSError) as e:
        raise SlqError(f"corrupt checkpoint: cannot read {w} ({str(e).splitlines()[0] if str(e) else e})") from e


def verify(path: str | os.PathLike, *, trust_remote_code: bool = False) -> dict[str, QuantSpec]:
    """Check a checkpoint without dequantizing it; returns its specs, raises SlqError on the first fault.

    For every quantized module the config names: the module exists in the architecture, and
    ``weight_packed``/``weight_scale``/``weight_shape`` (and ``weight_zero_point`` when asymmetric) are
    present with the dtype and shape its [N, K] and spec imply (read from the header); ``weight_shape``
    holds [N, K]; the scales are finite. Every other parameter and persistent buffer of the architecture
    is present (or tied to one that is) with its shape. Only the scales and shapes are read as data.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    cfg = read_json(path / "config.json", "corrupt checkpoint: its config",
                    missing=f"{path} is not a checkpoint: config.json is missing")
    specs = read_specs(cfg)
    f = _open_weights(path)
    keys = set(f.keys())
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (ValueError, KeyError, OSError) as e:
        raise SlqError(f"corrupt checkpoint {path}: its config.json describes no known model "
                       f"({str(e).splitlines()[0]})") from e
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)

    def header(key: str) -> tuple[torch.dtype | str, tuple[int, ...]]:
        sl = f.get_slice(key)
        return _ST_DTYPES.get(sl.get_dtype(), sl.get_dtype()), tuple(sl.get_shape())

    try:
        for name, spec in specs.items():
            try:
                lin = model.get_submodule(name)
            except AttributeError as e:
                raise SlqError(f"checkpoint names module {name}, which the model does not have") from e
            N, K = lin.out_features, lin.in_features
            G = spec.effective_group(K)
            ng = K // G if K % G == 0 else -1
            want = {"weight_packed": (torch.int32, (N, math.ceil(K * spec.bits / 32))),
                    "weight_scale": (torch.float16, (N, ng)), "weight_shape": (torch.int64, (2,))}
            if not spec.symmetric:
                want["weight_zero_point"] = (torch.int32, (N, ng))
            for leaf, (dtype, shape) in want.items():
                key = f"{name}.{leaf}"
                if key not in keys:
                    raise SlqError(f"corrupt or incomplete checkpoint: missing tensor {key}")
                got = header(key)
                if got != (dtype, shape):
                    raise SlqError(f"corrupt checkpoint: {key} is {got[0]} {got[1]}, expected {dtype} {shape}")
            if f.get_tensor(f"{name}.weight_shape").tolist() != [N, K]:
                raise SlqError(f"corrupt checkpoint: {name}.weight_shape is "
                               f"{f.get_tensor(f'{name}.weight_shape').tolist()}, the model has [{N}, {K}]")
            if not torch.isfinite(f.get_tensor(f"{name}.weight_scale")).all():
                raise SlqError(f"corrupt checkpoint: {name}.weight_scale has NaN/Inf")
        by_object: dict[int, list[str]] = {}
        for n, p in list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False)):
            by_object.setdefault(id(p), []).append(n)
        for key, v in model.state_dict().items():
            mod, _, leaf = key.rpartition(".")
            if mod in specs and leaf == "weight":
                continue
            if key not in keys:
                tied = [n for ns in by_object.values() if key in ns for n in ns]
                if any(n in keys for n in tied):
                    continue
                raise SlqError(f"corrupt or incomplete checkpoint: missing tensor {key}")
            dtype, shape = header(key)
            if shape != tuple(v.shape):
                raise SlqError(f"corrupt checkpoint: {key} has shape {shape}, the model expects {tuple(v.shape)}")
            if v.is_floating_point() and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
                raise SlqError(f"corrupt checkpoint: {key} is stored as {dtype}, expected a floating-point type")
    except SafetensorError as e:  # a tensor's bytes could not be read
        raise SlqError(f"corrupt checkpoint: cannot read {path / WEIGHTS} ({str(e).splitlines()[0]})") from e
    return specs


def read_report(path: str | os.PathLike) -> dict:
    p = Path(path) / REPORT
    if not p.is_file():
        return {}
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise SlqError(f"corrupt {p}: {e}") from e


def load(path: str | os.PathLike, *, backend: str = "reference", device: str = "cpu", trust_remote_code: bool = False,
         batch_size: int = 1, table=None):
    """Load an slq/compressed-tensors checkpoint as a model whose linears are QuantLinear.

    ``backend``: reference, triton, humming, or ``auto``. ``auto`` picks per layer for decode at
    ``batch_size`` from a measured kernel table (``table``: a path or dict; default
    ``$SLQ_KERNEL_TABLE`` or the table slq ships for this GPU) when ``device`` is CUDA, by the
    rule in :mod:`slq.runtime.backends.choose`; on CPU it is ``reference``. The choice is recorded in
    ``model.slq_backends``.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    if backend != "auto" and backend not in BACKENDS:
        raise SlqError(f"unknown backend {backend!r}; choose one of auto, {', '.join(BACKENDS)}")
    path = Path(path)
    cfg_path, w_path = path / "config.json", path / WEIGHTS
    cfg_dict = read_json(cfg_path, "corrupt checkpoint: its config", missing=f"{path} is not a checkpoint: config.json is missing")
    if not w_path.is_file():
        raise SlqError(f"corrupt or incomplete checkpoint {path}: {WEIGHTS} is missing")
    specs = read_specs(cfg_dict)
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    dtype = getattr(config, "dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code, dtype=dtype)
    f = _open_weights(path)
    keys = set(f.keys())
    for name, spec in specs.items():
        try:
            lin = model.get_submodule(name)
        except AttributeError as e:
            raise SlqError(f"checkpoint names module {name}, which the model does not have") from e
        t = {k.rsplit(".", 1)[1]: f.get_tensor(k) for k in keys if k.rsplit(".", 1)[0] == name}
        q = unpack_weight(t, spec, name)
        if (q.codes.shape[0], q.codes.shape[1]) != (lin.out_features, lin.in_features):
            raise SlqError(f"corrupt checkpoint: {name} has shape {tuple(q.codes.shape)}, model expects "
                           f"{(lin.out_features, lin.in_features)}")
        bias = f.get_tensor(f"{name}.bias") if f"{name}.bias" in keys else None
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, QuantLinear(q, bias))
    dense = {k: v for k, v in model.state_dict().items() if not _is_quant_buffer(k, specs)}
    missing = [k for k in dense if k not in keys]
    # tensors stored at another precision (units the bit search kept in 16-bit) take the model's dtype
    state = {k: f.get_tensor(k).to(dense[k].dtype) for k in dense if k in keys}
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    _rebuild_nonpersistent_buffers(model, config)
    still_meta = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.is_meta]
    if still_meta:
        miss = [k for k in missing if k in still_meta] or still_meta
        raise SlqError(f"corrupt or incomplete checkpoint {path}: missing tensor {miss[0]}")
    model.to(device).eval()
    if backend == "auto":
        if torch.device(device).type == "cuda":
            model.slq_backends = choose_backends(model, batch_size, table)
        else:
            names = [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]
            model.slq_backends = {"rule": "cpu: reference", "table": None, "batch_size": batch_size,
                                  "layers": dict.fromkeys(names, "reference"), "why": {}}
        for name, be in model.slq_backends["layers"].items():
            model.get_submodule(name).set_backend(be)
    elif backend != "reference":
        for m in model.modules():
            if isinstance(m, QuantLinear):
                m.set_backend(backend)
    return model


def _is_quant_buffer(key: str, specs: dict) -> bool:
    mod, _, leaf = key.rpartition(".")
    return mod in specs and leaf in ("codes", "scale", "zero", "bias")


def _rebuild_nonpersistent_buffers(model, config) -> None:
    """Rotary inverse frequencies are non-persistent buffers: recompute them off meta."""
    for name, mod in model.named_modules():
        if hasattr(mod, "inv_freq") and mod.inv_freq.is_meta:
            fresh = type(mod)(config=config)
            mod.inv_freq = fresh.inv_freq
            if hasattr(fresh, "original_inv_freq"):
                mod.original_inv_freq = fresh.original_inv_freq


def open_model(source: str | None, *, device: str = "cpu", trust_remote_code: bool = False):
    """(model, tokenizer, local_dir) for anything slq accepts: HF dir, GGUF, hub id,
    an slq checkpoint, or None for the embedded default."""
    path = resolve_model(source)
    if is_slq_checkpoint(path):
        from transformers import AutoTokenizer

        model = load(path, device=device, trust_remote_code=trust_remote_code)
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        return model, tok, path
    model, tok = load_model(path, device=device, trust_remote_code=trust_remote_code)
    return model, tok, path
