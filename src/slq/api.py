"""Public entry points: each CLI verb calls exactly one of these."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from .runtime.checkpoint import load as load_checkpoint
from .runtime.checkpoint import open_model, read_report, save_checkpoint
from .measure.data import GENERATED, windows_from_source
from .measure.evaluate import evaluate as evaluate_models
from .measure.fidelity import Fidelity
from .util.errors import SlqError
from .models.sources import check_finite, is_slq_checkpoint, load_model, resolve_model
from .quant.pipeline import build_report, quantize_model
from .quant.spec import Plan, QuantSpec, model_bits_per_param


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
        t = time.perf_counter()
        ref, _ = load_model(path, device=device, trust_remote_code=trust_remote_code)
        skip = calib_samples if (eval_data == calib and eval_data not in (None, GENERATED)) else 0
        fid = evaluate_models((ref, tok), (m, tok), data=eval_data, tokens=eval_tokens, seq_len=seq_len,
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
        from .util.jsonio import write_json

        write_json(Path(out) / "slq_report.json", report)
    return report


def evaluate(reference, candidate, *, device: str = "cpu", trust_remote_code: bool = False, **kwargs) -> Fidelity:
    """Compare ``candidate`` to ``reference`` on the same tokens (see :func:`slq.measure.evaluate.evaluate`).

    Each of ``reference``/``candidate`` is anything ``slq quantize`` accepts or writes (a path, hub id, None for
    the embedded default) or an in-memory ``(model, tokenizer)`` pair.
    """
    if device == "cuda" and not torch.cuda.is_available():
        raise SlqError("device 'cuda' was asked for but CUDA is not available")
    pairs = []
    for x in (reference, candidate):
        if isinstance(x, tuple):
            pairs.append(x)
        else:
            m, tok, _ = open_model(x, device=device, trust_remote_code=trust_remote_code)
            pairs.append((m, tok))
    return evaluate_models(*pairs, device=device, **kwargs)


def info(path: str | Path) -> dict:
    """The report and plan of a checkpoint (validated through its config)."""
    from .runtime.checkpoint import read_specs
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

    from .runtime.decode import SUPPORTED, supports
    from .runtime.decode import generate as engine_generate

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


__all__ = ["quantize", "evaluate", "info", "generate", "open_model", "GENERATED"]
