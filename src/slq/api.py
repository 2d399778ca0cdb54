"""Public entry points: each CLI verb calls exactly one of these."""

from __future__ import annotations

import platform
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from . import __version__
from .checkpoint import load as load_checkpoint
from .checkpoint import read_report, save_checkpoint
from .data import GENERATED, windows_from_source
from .errors import SlqError
from .models import check_finite, is_slq_checkpoint, load_model, resolve_model
from .quantize import quantize_model
from .spec import Plan, QuantSpec, model_bits_per_param


def versions() -> dict:
    import compressed_tensors
    import transformers

    return {
        "slq": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "compressed_tensors": compressed_tensors.__version__,
        "python": platform.python_version(),
    }


def git_commit(cwd: Path | None = None) -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=cwd or Path(__file__).parent, timeout=5
        ).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def open_model(source: str | None, *, device: str = "cpu", trust_remote_code: bool = False):
    """(model, tokenizer, local_dir) for anything slq accepts: HF dir, GGUF, hub id,
    an slq checkpoint, or None for the embedded default."""
    path = resolve_model(source)
    if is_slq_checkpoint(path):
        from transformers import AutoTokenizer

        model = load_checkpoint(path, device=device, trust_remote_code=trust_remote_code)
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        return model, tok, path
    model, tok = load_model(path, device=device, trust_remote_code=trust_remote_code)
    return model, tok, path


def _other_params(model, quantized: set[str]) -> dict[str, tuple[int, int]]:
    """Unquantized tensors (tied ones once) -> (numel, bits at stored precision)."""
    out, seen = {}, set()
    for name, p in model.named_parameters(remove_duplicate=True):
        mod = name.rsplit(".", 1)[0]
        if mod in quantized or p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        out[name] = (p.numel(), p.element_size() * 8)
    return out


def quantize(
    model: str | None = None,
    *,
    bits: int = 4,
    group_size: int | None = 128,
    symmetric: bool = False,
    method: str = "gptq",
    calib: str | None = None,
    calib_samples: int = 128,
    seq_len: int = 512,
    clip: bool = True,
    attention: bool = True,
    act_order: bool | None = None,
    damp: float = 0.01,
    device: str = "cpu",
    seed: int = 0,
    out: str | Path | None = None,
    force: bool = False,
    progress: bool = True,
    trust_remote_code: bool = False,
    eval: bool = False,
    eval_data: str | None = GENERATED,
    eval_tokens: int = 8 * 512,
) -> dict:
    """Quantize every decoder linear to ``bits`` and (if ``out``) write the checkpoint.

    With ``eval`` the quantized model is measured against the reference on ``eval_tokens``
    tokens of ``eval_data`` (held out: generated data uses another seed than calibration;
    for a text file, the windows after the calibration windows are used) and the numbers
    go into the report under ``fidelity``. ``attention=False`` gives keys and values plain ``X^T X``
    Hessians (see :mod:`slq.calib`); ``act_order`` runs GPTQ by decreasing Hessian diagonal with static
    groups (see :mod:`slq.gptq`; ``None``, the default, means on for GPTQ); ``damp`` is GPTQ's damping, a fraction of the Hessian's mean diagonal. Returns the report (also slq_report.json).
    """
    spec = QuantSpec(bits, group_size, symmetric)  # validates bits and group size
    if act_order and method != "gptq":
        raise SlqError("--act-order orders GPTQ's columns: it needs --method gptq")
    act_order = method == "gptq" if act_order is None else bool(act_order)
    if not 0 < damp < 1:
        raise SlqError(f"--damp must be in (0, 1) (a fraction of the Hessian's mean diagonal), got {damp}")
    if out is not None and Path(out).exists() and not force:
        raise SlqError(f"output directory {out} exists; pass --force to replace it")
    if device == "cuda" and not torch.cuda.is_available():
        raise SlqError("--device cuda was asked for but CUDA is not available")
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    m, tok, path = open_model(model, device=device, trust_remote_code=trust_remote_code)
    if is_slq_checkpoint(path):
        raise SlqError(f"{path} is already a quantized checkpoint; quantize the reference model instead")
    check_finite(m)
    t_load = time.perf_counter() - t0
    windows = None
    t = time.perf_counter()
    if method == "gptq":
        windows = windows_from_source(calib, m, tok, n=calib_samples, seq_len=seq_len, seed=seed, device=device,
                                      progress=progress)
    t_calib = time.perf_counter() - t
    res = quantize_model(m, spec, method=method, windows=windows, clip=clip, attention=attention,
                         act_order=act_order, damp=damp, device=device, progress=progress)
    report = build_report(m, path, res.plan, spec, method=method, calib=calib, calib_samples=calib_samples,
                          seq_len=seq_len, clip=clip, seed=seed, device=device)
    report["settings"]["attention_hessians"] = attention and method == "gptq"
    report["settings"]["act_order"] = act_order and method == "gptq"
    if method == "gptq":
        report["settings"]["damp"] = damp
    report["timings"] = {"load_s": t_load, "calibration_data_s": t_calib, **res.timings}
    if eval:
        from .evaluate import evaluate

        t = time.perf_counter()
        ref, _ = load_model(path, device=device, trust_remote_code=trust_remote_code)
        skip = calib_samples if (eval_data == calib and eval_data not in (None, GENERATED)) else 0
        fid = evaluate((ref, tok), (m, tok), data=eval_data, tokens=eval_tokens, seq_len=seq_len,
                       skip_windows=skip, device=device, seed=seed + 101, progress=progress)
        report["fidelity"] = fid.to_dict()
        report["timings"]["eval_s"] = time.perf_counter() - t
        del ref
    if out is not None:
        t = time.perf_counter()
        m.cpu()
        save_checkpoint(out, m, tok, res.qweights, report, force=force)
        report["timings"]["save_s"] = time.perf_counter() - t
        report["timings"]["total_s"] = time.perf_counter() - t0
        # the report again, with the save time in it (atomic replace of one small file)
        from .report import write_json

        write_json(Path(out) / "slq_report.json", report)
    return report


def build_report(model, path: Path, plan: Plan, spec: QuantSpec, **settings) -> dict:
    gammas = [lp.gamma_mean for lp in plan if lp.gamma_mean == lp.gamma_mean and lp.gamma_mean is not None]
    gammas2 = [lp.gamma2_mean for lp in plan if lp.gamma2_mean == lp.gamma2_mean and lp.gamma2_mean is not None]
    other = _other_params(model, set(plan.layers))
    return {
        "model": str(Path(path).resolve()),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(),
        "git_commit": git_commit(),
        "settings": {"bits": spec.bits, "group_size": spec.group_size, "symmetric": spec.symmetric, **settings},
        "bits_per_param": plan.bits_per_param(),
        "bits_per_param_model": model_bits_per_param(plan, other),
        "n_params_quantized": plan.n_params,
        "n_params_other": sum(n for n, _ in other.values()),
        "gamma": {
            "mean": sum(gammas) / len(gammas) if gammas else None,
            "mean_sq": sum(gammas2) / len(gammas2) if gammas2 else None,
        },
        "plan": plan.to_dict(),
    }


def info(path: str | Path) -> dict:
    """The report and plan of a checkpoint (validated through its config)."""
    from .checkpoint import read_specs
    import json

    p = Path(path)
    if not (p / "config.json").is_file():
        raise SlqError(f"{p} is not an slq checkpoint (no config.json)")
    try:
        specs = read_specs(json.loads((p / "config.json").read_text()))
    except json.JSONDecodeError as e:
        raise SlqError(f"corrupt checkpoint {p}: config.json is not JSON") from e
    report = read_report(p)
    if not report:
        raise SlqError(f"{p} has no slq_report.json (not written by slq?)")
    plan = Plan.from_dict(report["plan"])
    for name, s in specs.items():
        if name not in plan.layers or plan[name].spec != s:
            raise SlqError(f"slq_report.json disagrees with config.json about {name}")
    return report


def generate(source: str | None, prompt: str, *, max_new_tokens: int = 32, device: str = "cpu",
             trust_remote_code: bool = False, backend: str = "auto", engine: bool = True, note=None) -> str:
    """Greedy continuation of ``prompt`` by a model or checkpoint.

    Llama-family models (llama, mistral, qwen2, qwen3) decode through :mod:`slq.decode` (static KV
    cache; a CUDA graph per step on GPU). Other families, or ``engine=False``, use transformers'
    ``generate``; ``note`` (default: :func:`warnings.warn`) is told why. ``backend`` is the
    QuantLinear backend for slq checkpoints (see :func:`slq.load`).
    """
    import warnings

    from .decode import SUPPORTED, supports
    from .decode import generate as engine_generate

    if not prompt:
        raise SlqError("the prompt is empty")
    if max_new_tokens < 1:
        raise SlqError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    path = resolve_model(source)
    if is_slq_checkpoint(path):
        from transformers import AutoTokenizer

        m = load_checkpoint(path, device=device, backend=backend, trust_remote_code=trust_remote_code)
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    else:
        m, tok = load_model(path, device=device, trust_remote_code=trust_remote_code)
    ids = tok(prompt, return_tensors="pt").input_ids.to(device)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    if engine and supports(m):
        out = engine_generate(m, ids, max_new_tokens, eos_token_id="auto", pad_token_id=pad)
    else:
        if engine:
            family = getattr(m.config, "model_type", type(m).__name__)
            msg = (f"model_type {family!r} is not one the decode engine runs ({', '.join(SUPPORTED)}); "
                   "using transformers generate")
            (note or (lambda s: warnings.warn(s, stacklevel=3)))(msg)
        with torch.inference_mode():
            out = m.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


__all__ = ["quantize", "info", "generate", "open_model", "GENERATED"]
