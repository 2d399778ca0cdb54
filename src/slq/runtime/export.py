"""Exports of an slq checkpoint for the engines people serve with: vLLM, llama.cpp, transformers.

An slq checkpoint (:mod:`slq.runtime.checkpoint`) is compressed-tensors ``pack-quantized`` in the
layout today's transformers + compressed-tensors load: the asymmetric zero points sit packed in the
leading rows of an int32 ``[N, K/G]`` tensor and the config says ``zp_dtype: int32``. :func:`export`
writes one of three layouts from it, into a new directory (atomic, files 0644):

``transformers`` (the default): a copy, unchanged.

``vllm``: the canonical compressed-tensors layout and a config vLLM's loader matches completely.

- Zero points: int32 ``[ceil(N*b/32), K/G]``, the b-bit values packed densely along N (value ``n``
  of a column occupies bits ``n*b .. n*b+b-1`` of the column's little-endian stream of 32-bit
  words), the same packing as the weights along K. ``zp_dtype`` is dropped from the config, which
  is how compressed-tensors marks zero points as packed. Everything else is byte-for-byte the
  source's tensors; the zero points are re-packed from the validated unpacked values, not sliced.
- ``ignore`` lists every ``nn.Linear`` of the architecture that is not quantized: the units the
  search kept in 16-bit and ``lm_head``. vLLM asks its config, per Linear of its own model, for an
  ignore match first and then a target match, and a Linear matching neither fails the load.
- Rules of the loader encoded here (as read in its compressed-tensors code, the weight-only
  ``WNA16`` path; "today" means that reading, and the rules are re-checked by the CPU test):

  1. a name matches an entry when equal to it, or, for an entry ``re:P``, when the regular
     expression ``P`` matches at the start of the name; a Linear may also match by its class name;
  2. vLLM fuses q/k/v into one ``qkv_proj`` and gate/up into one ``gate_up_proj``: a fused layer is
     ignored when all its parts are (a mix is an error), and otherwise takes the scheme of its
     first part, so all parts must share one (bits, group, symmetry) scheme;
  3. symmetric weights load at 2..8 bits (4 and 8 through Marlin, the others through the Humming
     kernels); asymmetric ones only at 4 and 8 bits (Marlin's unsigned types with a runtime zero
     point); asymmetric 2/3/5/6/7 bits wait on an open vLLM change;
  4. the 4- and 8-bit path allocates the packed weight as ``[N, K / (32/b)]`` and the packed zero
     point as ``[N / (32/b), K/G]`` (integer division), so K, and N for asymmetric layers, must be
     multiples of 32/b for the canonical ``ceil`` shapes to equal the allocated ones;
  5. Marlin takes group sizes 32, 64 and 128 or per-channel; other group sizes at 4/8 bits depend on
     the GPU's fallback kernels (a warning, not a refusal).

  A checkpoint breaking rules 2-4 is refused with one error line that lists the layers by reason,
  unless ``allow_unsupported`` is set, which writes it anyway and passes the same list to ``warn``.

``llama.cpp``: a ``--tensor-type-file`` for ``llama-quantize`` (``tensor_types.txt``), and
``LLAMA_CPP.md`` with the commands. One ``pattern=type`` token per line, no comments (the tool reads
whitespace-separated tokens and lower-cases the pattern, which it uses as a regular expression
searched in each tensor name); the patterns are anchored (``^blk\\.3\\.attn_q\\.weight$``) so that
``blk.1`` never matches ``blk.11``. Every decoder linear of the checkpoint gets exactly one line.

- HF -> GGUF names (llama.cpp's converter, Llama-style families): ``{layers}.N.self_attn.q_proj`` ->
  ``blk.N.attn_q``, ``k_proj`` -> ``attn_k``, ``v_proj`` -> ``attn_v``, fused ``qkv_proj`` ->
  ``attn_qkv``, ``o_proj`` -> ``attn_output``, ``mlp.gate_proj`` -> ``ffn_gate``, ``up_proj`` ->
  ``ffn_up``, fused ``gate_up_proj`` -> ``ffn_up``, ``down_proj`` -> ``ffn_down``; each with
  ``.weight``. ``lm_head`` (``output``) and the embedding are left to llama-quantize's own options.
- bits -> GGUF type, rounding up to the next type llama.cpp has, so no tensor gets less precision
  than the measured allocation: 2 -> q2_K, 3 -> q3_K, 4 -> q4_K, 5 -> q5_K, 6 -> q6_K,
  7 and 8 -> q8_0, 16 (kept) -> f16.
- GGUF's k-quants are not slq's grids (super-blocks of 256 weights with quantized sub-block scales),
  so the file transfers the allocation, not the measured fidelity: measure the GGUF again. Rows whose
  length is not a multiple of 256 (32 for q8_0) are given a fallback type by llama-quantize itself.

The export directories carry ``slq_export.json`` (format, source, the vLLM verdict), which the
model card (:mod:`slq.runtime.card`) reads to decide which load snippets are true.
"""

from __future__ import annotations

import json
import math
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import nn

from ..models.arch import kind_of, role_of
from ..quant.spec import QuantSpec
from ..util.atomic import atomic_directory
from ..util.errors import SlqError
from ..util.jsonio import read_json
from ..util.preflight import check_out_dir
from .checkpoint import REPORT, WEIGHTS, read_specs, save_safetensors, unpack_weight, verify

FORMATS = ("transformers", "vllm", "llama.cpp")
MARKER = "slq_export.json"
TYPE_FILE = "tensor_types.txt"

VLLM_SYMMETRIC_BITS = (2, 3, 4, 5, 6, 7, 8)
VLLM_ASYMMETRIC_BITS = (4, 8)
VLLM_MARLIN_BITS = (4, 8)
VLLM_MARLIN_GROUPS = (32, 64, 128, None)
VLLM_FUSED_KINDS = {"attn.qkv": "qkv_proj", "mlp.gate_up": "gate_up_proj"}

GGUF_TYPES = {2: "q2_K", 3: "q3_K", 4: "q4_K", 5: "q5_K", 6: "q6_K", 7: "q8_0", 8: "q8_0", 16: "f16"}
GGUF_ROLES = {"q": "attn_q", "k": "attn_k", "v": "attn_v", "qkv": "attn_qkv", "o": "attn_output",
              "gate": "ffn_gate", "up": "ffn_up", "gate_up": "ffn_up", "down": "ffn_down"}


# ------------------------------------------------------------------ reading the source


def read_config(ckpt: Path) -> dict:
    return read_json(ckpt / "config.json", "corrupt checkpoint: its config",
                     missing=f"{ckpt} is not a checkpoint: config.json is missing")


def export_format(ckpt: str | Path) -> str:
    """The layout of a checkpoint directory: the format its ``slq_export.json`` names, else transformers."""
    m = Path(ckpt) / MARKER
    if not m.is_file():
        return "transformers"
    return read_json(m, "export record").get("format", "transformers")


def linear_shapes(ckpt: str | Path, *, trust_remote_code: bool = False) -> dict[str, tuple[int, int]]:
    """Every ``nn.Linear`` of the checkpoint's architecture -> (N, K), built on the meta device (no data)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(ckpt, trust_remote_code=trust_remote_code)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    return {n: (m.out_features, m.in_features) for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def layer_of(name: str) -> str | None:
    """``model.layers.3.mlp.up_proj`` -> ``model.layers.3``: the module path up to the layer number."""
    parts = name.split(".")
    for i in range(len(parts) - 1, -1, -1):
        if parts[i].isdigit():
            return ".".join(parts[: i + 1])
    return None


# ------------------------------------------------------------------ vLLM


@dataclass
class VllmCheck:
    """What vLLM would do with a checkpoint: the ``ignore`` list, and the layers it cannot load today."""

    ignore: list[str]
    problems: dict[str, str] = field(default_factory=dict)  # module -> reason (rules 2-4)
    warnings: list[str] = field(default_factory=list)

    @property
    def loads(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        """The problems on one line, grouped by reason."""
        by: dict[str, list[str]] = {}
        for name, why in self.problems.items():
            by.setdefault(why, []).append(name)
        return "; ".join(f"{why}: {', '.join(names)}" for why, names in by.items())

    def to_dict(self) -> dict:
        return {"loads": self.loads, "ignore": self.ignore, "problems": self.problems, "warnings": self.warnings}


def vllm_check(specs: dict[str, QuantSpec], shapes: dict[str, tuple[int, int]]) -> VllmCheck:
    """Apply rules 2-5 of the module docstring to an allocation (``specs``) over the model's linears."""
    ignore = sorted(n for n in shapes if n not in specs)
    problems: dict[str, str] = {}
    warn: list[str] = []
    for name, s in specs.items():
        N, K = shapes[name]
        b = s.bits
        if not s.symmetric and b not in VLLM_ASYMMETRIC_BITS:
            problems[name] = f"asymmetric {b}-bit (vLLM takes zero points at 4 and 8 bits only)"
        elif b in VLLM_MARLIN_BITS and K % (32 // b):
            problems[name] = f"{b}-bit with K={K} not a multiple of {32 // b} (packed weight shape)"
        elif b in VLLM_MARLIN_BITS and not s.symmetric and N % (32 // b):
            problems[name] = f"asymmetric {b}-bit with N={N} not a multiple of {32 // b} (packed zero-point shape)"
        elif b in VLLM_MARLIN_BITS and s.group_size not in VLLM_MARLIN_GROUPS:
            warn.append(f"{name}: group size {s.group_size} is not one of Marlin's (32, 64, 128, per-channel)")
    groups: dict[tuple[str, str], list[str]] = {}
    for name in shapes:
        kind, layer = kind_of(name), layer_of(name)
        if kind in VLLM_FUSED_KINDS and layer is not None:
            groups.setdefault((layer, kind), []).append(name)
    for (layer, kind), names in groups.items():
        schemes = {specs[n] if n in specs else None for n in names}
        if len(names) > 1 and len(schemes) > 1:
            why = f"parts of {VLLM_FUSED_KINDS[kind]} with different schemes (vLLM fuses them into one layer)"
            for n in names:
                problems.setdefault(n, why)
    return VllmCheck(ignore, problems, warn)


def check_vllm(ckpt: str | Path, *, trust_remote_code: bool = False) -> VllmCheck:
    """:func:`vllm_check` for a checkpoint directory."""
    ckpt = Path(ckpt)
    return vllm_check(read_specs(read_config(ckpt)), linear_shapes(ckpt, trust_remote_code=trust_remote_code))


def canonical_zero_point(zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned b-bit zero points ``[N, K/G]`` -> int32 ``[ceil(N*b/32), K/G]``, packed densely along N."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    off = 1 << (bits - 1)
    packed = pack_to_int32((zero.to(torch.int32) - off).to(torch.int8), bits, packed_dim=0)
    assert packed.shape[0] == math.ceil(zero.shape[0] * bits / 32)
    return packed


def vllm_config(config: dict, ignore: list[str]) -> dict:
    """config.json for the vLLM layout: packed zero points (no ``zp_dtype``) and the full ``ignore``."""
    cfg = json.loads(json.dumps(config))
    qc = cfg["quantization_config"]
    for grp in qc.get("config_groups", {}).values():
        (grp.get("weights") or {}).pop("zp_dtype", None)
    qc["ignore"] = list(ignore)
    return cfg


def _write_vllm(ckpt: Path, tmp: Path, specs: dict[str, QuantSpec], check: VllmCheck) -> None:
    from safetensors import safe_open

    f = safe_open(str(ckpt / WEIGHTS), framework="pt")
    tensors = {k: f.get_tensor(k) for k in f.keys()}
    meta = f.metadata() or {"format": "pt"}
    for name, spec in specs.items():
        if spec.symmetric:
            continue
        own = {k.rsplit(".", 1)[1]: v for k, v in tensors.items() if k.rsplit(".", 1)[0] == name}
        q = unpack_weight(own, spec, name)  # validates shapes and dtypes first
        tensors[f"{name}.weight_zero_point"] = canonical_zero_point(q.zero, spec.bits)
    save_safetensors(tensors, tmp / WEIGHTS, dict(meta, producer="slq"))
    cfg = vllm_config(read_config(ckpt), check.ignore)
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))


# ------------------------------------------------------------------ llama.cpp


def gguf_tensor_name(name: str) -> str:
    """HF linear module name -> GGUF tensor name (``model.layers.3.self_attn.q_proj`` -> ``blk.3.attn_q.weight``)."""
    role, layer = role_of(name), layer_of(name)
    if role is None or layer is None:
        raise SlqError(f"no GGUF tensor name for {name}: llama.cpp export knows Llama-style decoder linears "
                       f"({', '.join(sorted(GGUF_ROLES))})")
    return f"blk.{layer.rsplit('.', 1)[1]}.{GGUF_ROLES[role]}.weight"


def gguf_type(bits: int) -> str:
    """Bits of the allocation -> the GGUF type with at least that precision (module docstring)."""
    if bits not in GGUF_TYPES:
        raise SlqError(f"no GGUF type for {bits}-bit weights (known: {', '.join(map(str, GGUF_TYPES))})")
    return GGUF_TYPES[bits]


def tensor_type_lines(specs: dict[str, QuantSpec], shapes: dict[str, tuple[int, int]]) -> list[str]:
    """One anchored ``pattern=type`` per decoder linear: quantized ones by bits, kept ones as f16."""
    lines, seen = [], {}
    for name in shapes:
        if layer_of(name) is None:  # lm_head and other linears outside the decoder layers
            continue
        bits = specs[name].bits if name in specs else 16
        gg = gguf_tensor_name(name)
        if gg in seen:
            raise SlqError(f"{name} and {seen[gg]} would both be GGUF tensor {gg}")
        seen[gg] = name
        lines.append("^" + gg.replace(".", "\\.") + "$=" + gguf_type(bits))
    missing = sorted(set(specs) - set(seen.values()))
    if missing:
        raise SlqError(f"quantized modules outside the decoder layers have no GGUF name: {', '.join(missing)}")
    return lines


_LLAMA_CPP_HOWTO = """# llama.cpp from this allocation

`tensor_types.txt` gives every decoder linear the GGUF type of its slq bitwidth (rounded up to a type
llama.cpp has: 2 q2_K, 3 q3_K, 4 q4_K, 5 q5_K, 6 q6_K, 7-8 q8_0, kept 16-bit f16).

```
python convert_hf_to_gguf.py {base} --outtype f16 --outfile model-f16.gguf
llama-quantize --tensor-type-file tensor_types.txt model-f16.gguf model-slq.gguf Q4_K_M
```

Convert the original (unquantized) model, not the slq checkpoint. The last argument sets the types of
the tensors the file does not name (embedding, output). GGUF's k-quants are other grids than slq's:
the allocation carries over, the measured fidelity does not; measure the GGUF again.
"""


# ------------------------------------------------------------------ export


def export(ckpt_dir: str | Path, out_dir: str | Path, *, to: str = "transformers", force: bool = False,
           allow_unsupported: bool = False, warn: Callable[[str], None] | None = None,
           trust_remote_code: bool = False) -> Path:
    """Write ``ckpt_dir`` in the layout of ``to`` (transformers, vllm, llama.cpp) into ``out_dir``.

    ``force`` replaces an existing ``out_dir``. For vLLM, a checkpoint vLLM cannot load today is
    refused with one SlqError line listing the layers; ``allow_unsupported`` writes it anyway and
    gives that line to ``warn`` (default :func:`warnings.warn`). Returns ``out_dir``.
    """
    if to not in FORMATS:
        raise SlqError(f"unknown export format {to!r}; choose one of {', '.join(FORMATS)}")
    ckpt, out = Path(ckpt_dir), Path(out_dir)
    say = warn or (lambda s: warnings.warn(s, stacklevel=3))
    if export_format(ckpt) != "transformers":
        raise SlqError(f"{ckpt} is already an export ({export_format(ckpt)}); export from the slq checkpoint "
                       "it was made from")
    specs = verify(ckpt, trust_remote_code=trust_remote_code)
    check_out_dir(out, ckpt, force=force)
    record = {"format": to, "source": str(ckpt.resolve()),
              "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    shapes = linear_shapes(ckpt, trust_remote_code=trust_remote_code) if to != "transformers" else {}
    check = None
    if to == "vllm":
        check = vllm_check(specs, shapes)
        if not check.loads:
            msg = f"vLLM cannot load {len(check.problems)} layer(s) of {ckpt} today: {check.summary()}"
            if not allow_unsupported:
                raise SlqError(msg + "; pass allow_unsupported (--allow-unsupported) to write it anyway")
            say(msg)
        if check.warnings:
            say(f"vLLM may fall back from its Marlin kernels: {'; '.join(check.warnings)}")
        record["vllm"] = check.to_dict()
    lines = tensor_type_lines(specs, shapes) if to == "llama.cpp" else None
    with atomic_directory(out, replace=True) as tmp:
        if to == "llama.cpp":
            (tmp / TYPE_FILE).write_text("\n".join(lines) + "\n")
            base = read_config(ckpt).get("_name_or_path") or "BASE_MODEL_DIR"
            (tmp / "LLAMA_CPP.md").write_text(_LLAMA_CPP_HOWTO.replace("{base}", str(base)))
            if (ckpt / REPORT).is_file():
                shutil.copy2(ckpt / REPORT, tmp / REPORT)
        else:
            skip = {WEIGHTS, "config.json"} if to == "vllm" else set()
            for p in ckpt.iterdir():
                if p.name in skip:
                    continue
                (shutil.copytree if p.is_dir() else shutil.copy2)(p, tmp / p.name)
            if to == "vllm":
                _write_vllm(ckpt, tmp, specs, check)
        if to != "transformers":
            (tmp / MARKER).write_text(json.dumps(record, indent=2))
    return out


__all__ = ["FORMATS", "GGUF_TYPES", "VllmCheck", "canonical_zero_point", "check_vllm", "export", "export_format", "layer_of", "read_config",
           "gguf_tensor_name", "gguf_type", "linear_shapes", "tensor_type_lines", "vllm_check", "vllm_config"]
