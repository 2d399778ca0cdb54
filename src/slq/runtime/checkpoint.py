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
names. Everything else (embeddings, norms, lm_head) is stored as in the model.
Writes go to a temporary directory that is renamed into place at the end.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..util.jsonio import read_json

from ..util.atomic import atomic_directory
from ..util.errors import SlqError
from ..quant.grid import QuantizedWeight
from .qlinear import QuantLinear
from ..quant.spec import QuantSpec
from ..models.sources import is_slq_checkpoint, load_model, resolve_model

REPORT = "slq_report.json"
WEIGHTS = "model.safetensors"


def _ct():
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    return pack_to_int32, unpack_from_int32, QuantizationArgs, QuantizationConfig, QuantizationScheme


def quantization_config(specs: dict[str, QuantSpec]) -> dict:
    """The ``quantization_config`` dict for config.json (compressed-tensors schema)."""
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
        config_groups=config_groups, format="pack-quantized", quantization_status="compressed", ignore=["lm_head"]
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
) -> Path:
    """Write the checkpoint atomically; refuses to overwrite unless ``force``.

    ``half_modules``: unquantized linears (the bit search's "16-bit" choice) whose weights are stored
    in fp16 whatever the model's dtype; the caller has already rounded them to fp16 values, so the
    file holds exactly what was measured, and loaders cast them back to the model's dtype.
    """
    out = Path(out_dir)
    if out.exists() and not force:
        raise SlqError(f"output directory {out} exists; pass --force to replace it")
    with atomic_directory(out, replace=True) as tmp:
        tensors: dict[str, torch.Tensor] = {}
        seen_ptrs: dict[int, str] = {}
        skip = {f"{n}.weight" for n in qweights}
        for key, val in model.state_dict().items():
            if key in skip:
                continue
            ptr = val.data_ptr()
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
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt", "producer": "slq"})
        cfg = model.config.to_dict()
        cfg["quantization_config"] = quantization_config({n: q.spec for n, q in qweights.items()})
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / REPORT).write_text(json.dumps(report, indent=2, default=_json_default))
        for name, data in (extra_files or {}).items():  # reports and plots, inside the same atomic write
            (tmp / name).write_bytes(data)
    return out


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
            if target.startswith("re:") or "." not in target:
                raise SlqError(f"config group {gname}: target {target!r} is not an exact module name")
            specs[target] = s
    if not specs:
        raise SlqError("the checkpoint's quantization_config names no quantized modules")
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
    ``$SLQ_KERNEL_TABLE`` or the bench/results file of this GPU) when ``device`` is CUDA, by the
    rule in :mod:`slq.kernels.choose`; on CPU it is ``reference``. The choice is recorded in
    ``model.slq_backends``.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    from .backends import BACKENDS

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
    try:
        f = safe_open(str(w_path), framework="pt")
    except Exception as e:
        raise SlqError(f"corrupt checkpoint {path}: cannot read {WEIGHTS} ({str(e).splitlines()[0]})") from e
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
            from .backends.choose import choose_backends

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
