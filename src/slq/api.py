"""Public entry points: each CLI verb calls exactly one of these."""

from __future__ import annotations

import multiprocessing as mp
import queue
import time
import traceback
import warnings
from dataclasses import fields
from pathlib import Path

import torch

from .measure.data import GENERATED, windows_from_source
from .measure.evaluate import evaluate as evaluate_models
from .measure.fidelity import Fidelity
from .models.arch import head_name, head_tied
from .models.sources import check_finite, is_slq_checkpoint, load_model, resolve_model
from .models.stream import StreamedModel, should_stream
from .quant.config import QuantConfig
from .quant.pipeline import build_report, quantize_model
from .quant.spec import Plan
from .runtime.card import _HUB_ID, _offline, write_card
from .runtime.card import push_to_hub as push_checkpoint
from .runtime.checkpoint import load as load_checkpoint
from .runtime.checkpoint import open_model, read_report, read_specs, save_checkpoint
from .runtime.checkpoint import verify as verify_tensors
from .runtime.decode import SUPPORTED, supports
from .runtime.decode import generate as engine_generate
from .runtime.export import export as export_checkpoint
from .runtime.speculative import generate as speculative_generate
from .util.dist import SINGLE, Group, broadcast_dict, free_port
from .util.dist import init as dist_init
from .util.dist import shutdown as dist_shutdown
from .util.errors import ConfigError, SlqError
from .util.jsonio import read_json


def quantize(
    model: str | None = None,
    *,
    config: QuantConfig | None = None,
    out: str | Path | None = None,
    force: bool = False,
    progress: bool = True,
    trust_remote_code: bool = False,
    eval: bool = False,
    eval_data: str | None = GENERATED,
    eval_tokens: int = 8 * 512,
    gpus: int = 1,
    **settings,
) -> dict:
    """Quantize every decoder linear to ``config.bits`` and (if ``out``) write the checkpoint.

    ``config`` (:class:`slq.quant.config.QuantConfig`) holds every quantization setting. The settings
    may instead be given as keywords (``bits``, ``group_size``, ``symmetric``, ``method``, ``calib``,
    ``calib_samples``, ``seq_len``, ``clip``, ``attention``, ``act_order``, ``damp``, ``batch_size``,
    ``device``, ``seed``, ``offload``, ``head_bits``), which build the config; not both. With ``eval`` the
    quantized model is measured against the reference on ``eval_tokens`` tokens of ``eval_data`` (held out:
    generated data uses another seed than calibration; for a text file, the windows after the calibration
    windows are used) and the numbers go into the report under ``fidelity``. Returns the report (also
    slq_report.json); its ``settings`` are the config's fields, its ``memory`` the run's peak.

    The model is streamed one block at a time (:class:`slq.models.stream.StreamedModel`) when
    ``config.offload`` is set or its weights do not fit the device's free memory; streaming needs text
    calibration for GPTQ (generated windows sample from the whole model in memory) and rules out ``eval``.
    ``gpus`` > 1 spawns that many processes (:mod:`slq.util.dist`; on CUDA rank r computes on cuda:r, on
    the CPU they are gloo ranks) that split each layer's solves; rank 0 writes, and the checkpoint is the
    one a single process writes, byte for byte.
    """
    config = _quant_config(config, settings)
    if out is not None and Path(out).exists() and not force:
        raise ConfigError("force", f"output directory {_literal(out)} exists; set {{field}} to replace it")
    if not (isinstance(gpus, int) and not isinstance(gpus, bool) and gpus >= 1):
        raise ConfigError("gpus", f"{{field}} must be an integer >= 1, got {_literal(repr(gpus))}")
    kw = dict(out=out, force=force, progress=progress, trust_remote_code=trust_remote_code, eval=eval,
              eval_data=eval_data, eval_tokens=eval_tokens)
    if gpus > 1:
        return _quantize_ranks(model, config, gpus, kw)
    return _quantize(model, config, SINGLE, **kw)


def _quantize(model, c: QuantConfig, group: Group, *, out, force, progress, trust_remote_code, eval, eval_data,
              eval_tokens) -> dict:
    """One rank's quantization (:func:`quantize`); rank 0 evaluates and writes."""
    t0 = time.perf_counter()
    torch.manual_seed(c.seed)
    path = resolve_model(model)
    if is_slq_checkpoint(path):
        raise SlqError(f"{path} is already a quantized checkpoint; quantize the reference model instead")
    streamed = c.offload or _too_big(path, c.device)
    if streamed:
        where = "a streamed model (offload)" if c.offload else \
            f"{_literal(path)} does not fit {_literal(c.device)} and is streamed; that"
        if c.method == "gptq" and c.calib in (None, GENERATED):
            raise ConfigError("calib", f"{where} needs calibration text for GPTQ in {{field}} (a file or dataset "
                                       "id): generated windows sample from the whole model in memory")
        if eval:
            raise ConfigError("offload", f"{where} rules out eval, which measures the quantized model in memory"
                              .replace("(offload)", "({field})"))
        m = StreamedModel(path, device=c.device, trust_remote_code=trust_remote_code)
        tok = _tokenizer(path, trust_remote_code)
    else:
        m, tok = load_model(path, device=c.device, trust_remote_code=trust_remote_code)
        check_finite(m)
    t_load = time.perf_counter() - t0
    windows = None
    t = time.perf_counter()
    if c.method == "gptq":
        if group.writes:  # rank 0 draws the windows (generated ones sample from the model), the others get them
            windows = windows_from_source(c.calib, m, tok, n=c.calib_samples, seq_len=c.seq_len, seed=c.seed,
                                          device=c.device, progress=progress)
        windows = broadcast_dict(group, {"windows": windows} if group.writes else None)["windows"] \
            if group.distributed else windows
    t_calib = time.perf_counter() - t
    res = quantize_model(m, c, windows=windows, progress=progress, group=group)
    if streamed:  # the skeleton takes every weight but the quantized linears' (the checkpoint stores their codes)
        codes_only = set(res.qweights)
        h = head_name(m.model)
        if h in codes_only and head_tied(m.model):
            codes_only.discard(h)  # a tied embedding is the dequantized head, as in the in-memory run
            m.overrides[f"{h}.weight"] = res.qweights[h]
        m = m.load_rest(exclude=codes_only)
    report = build_report(m, path, res.plan, c.spec, **_report_settings(c))
    report["timings"] = {"load_s": t_load, "calibration_data_s": t_calib, **res.timings}
    report["memory"] = res.memory
    if eval and group.writes:
        t = time.perf_counter()
        ref, _ = load_model(path, device=c.device, trust_remote_code=trust_remote_code)
        skip = c.calib_samples if (eval_data == c.calib and eval_data not in (None, GENERATED)) else 0
        fid = evaluate_models((ref, tok), (m, tok), data=eval_data, tokens=eval_tokens, seq_len=c.seq_len,
                              skip_windows=skip, device=c.device, seed=c.seed + 101, progress=progress)
        report["fidelity"] = fid.to_dict()
        report["timings"]["eval_s"] = time.perf_counter() - t
        del ref
    if out is not None and group.writes:
        if not streamed:  # load_rest put the streamed skeleton's weights on the CPU (the quantized ones on meta)
            m.cpu()
        # the report goes in with save_s and total_s, inside the same atomic write
        save_checkpoint(out, m, tok, res.qweights, report, force=force, started=t0)
    return report


def _tokenizer(path: Path, trust_remote_code: bool):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise SlqError(f"cannot load the tokenizer of {path}: {(str(e).strip().splitlines() or [''])[0]}") from e


def _too_big(path: Path, device: str) -> bool:
    """Whether the model's weights exceed the device's free memory (only safetensors weights can stream)."""
    return any(Path(path).glob("*.safetensors")) and should_stream(path, device)


def _quantize_ranks(model, config: QuantConfig, world: int, kw: dict) -> dict:
    """:func:`quantize` over ``world`` spawned ranks; returns rank 0's report. A rank's bad-input error is
    raised here as the same error (the other ranks are stopped)."""

    if config.device.startswith("cuda") and torch.cuda.device_count() < world:
        raise ConfigError("gpus", f"{{field}} {world} needs {world} GPUs, found {torch.cuda.device_count()}")
    threads = 1 if config.device.startswith("cuda") else max(1, torch.get_num_threads() // world)
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, world, port, threads, q, model, config, kw), daemon=True)
             for r in range(world)]
    for p in procs:
        p.start()
    got: dict[int, tuple] = {}
    try:
        while len(got) < world:
            try:
                rank, *msg = q.get(timeout=0.5)
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if r not in got and p.exitcode not in (None, 0)]
                if dead:
                    raise SlqError(f"rank {dead[0]} of {world} exited with code {procs[dead[0]].exitcode}")
                continue
            got[rank] = tuple(msg)
            kind = msg[0]
            if kind == "config":
                raise ConfigError(msg[1], msg[2])
            if kind == "error":
                raise SlqError(msg[1])
            if kind == "crash":
                raise RuntimeError(f"rank {rank} of {world} failed:\n{msg[1]}")
        for p in procs:
            p.join()
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join()
    return got[0][1]


def _rank_main(rank: int, world: int, port: int, threads: int, q, model, config: QuantConfig, kw: dict) -> None:
    """One spawned rank: join the group, quantize, send ``(rank, "ok", report)`` (the report on rank 0 only)
    or the error."""

    torch.set_num_threads(threads)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # one load bar per rank is noise
        hf_logging.set_verbosity_error()
    except ImportError:  # pragma: no cover
        pass
    try:
        group = dist_init(rank, world, port, config.device)
        try:
            c = config.with_(device=group.device) if group.device != config.device else config
            report = _quantize(model, c, group, **kw)
            group.barrier()
        finally:
            dist_shutdown(group)
        q.put((rank, "ok", report if group.writes else None))
    except ConfigError as e:
        q.put((rank, "config", e.field, e.template))
    except (SlqError, OSError) as e:
        q.put((rank, "error", str(e)))
    except BaseException:
        q.put((rank, "crash", traceback.format_exc()))


def resolve_device(device: str) -> str:
    """``"auto"``: ``"cuda"`` when CUDA is available, else ``"cpu"``; any other value is returned as given
    (validated where it is used)."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def export(checkpoint: str | Path, out: str | Path, *, to: str = "transformers", force: bool = False,
           allow_unsupported: bool = False, warn=None, trust_remote_code: bool = False) -> Path:
    """Write an slq checkpoint in the layout of ``to`` (transformers, vllm, llama.cpp) into ``out``
    (see :func:`slq.runtime.export.export`)."""
    return export_checkpoint(checkpoint, out, to=to, force=force, allow_unsupported=allow_unsupported, warn=warn,
                             trust_remote_code=trust_remote_code)


def check_hub_repo(repo: str) -> None:
    """Before any work: ``repo`` is ``owner/name`` and the hub is not switched off (one SlqError line)."""

    if not _HUB_ID.match(repo or ""):
        raise SlqError(f"hub repo must be 'owner/name', got {repo!r}")
    if _offline():
        raise SlqError(f"cannot push to {repo}: offline (HF_HUB_OFFLINE is set)")


def card(checkpoint: str | Path, *, base_model: str | None = None, push_to_hub: str | None = None,
         private: bool = False) -> str:
    """Write the model card (``README.md``) of a checkpoint; with ``push_to_hub`` (``owner/name``) then
    upload the checkpoint there. Returns the card's path, or the repo URL when pushed."""
    path = write_card(checkpoint, base_model=base_model, repo=push_to_hub)
    if push_to_hub is None:
        return str(path)
    return push_checkpoint(checkpoint, push_to_hub, private=private, base_model=base_model)


def _quant_config(config: QuantConfig | None, settings: dict) -> QuantConfig:
    """``config``, or one built from keyword settings (the older call form of :func:`quantize`)."""
    if config is not None:
        if settings:
            raise SlqError(f"give either config or keyword settings, not both (got {', '.join(sorted(settings))})")
        if not isinstance(config, QuantConfig):
            raise SlqError(f"config must be a QuantConfig, got {type(config).__name__}")
        return config
    unknown = sorted(set(settings) - {f.name for f in fields(QuantConfig)})
    if unknown:
        raise SlqError(f"unknown quantization setting(s): {', '.join(unknown)}")
    if settings.get("device") == "auto":
        settings["device"] = resolve_device("auto")
    return QuantConfig(**settings)


def _report_settings(config: QuantConfig) -> dict:
    """The report's ``settings``: the config's fields, with ``attention`` recorded as what GPTQ used."""
    s = config.to_dict()
    s["attention_hessians"] = s.pop("attention") and config.method == "gptq"
    return s


def _literal(x) -> str:
    """``x`` as text inside a :class:`ConfigError` template (braces escaped)."""
    return str(x).replace("{", "{{").replace("}", "}}")


def evaluate(reference, candidate, *, device: str = "cpu", trust_remote_code: bool = False, **kwargs) -> Fidelity:
    """Compare ``candidate`` to ``reference`` on the same tokens (see :func:`slq.measure.evaluate.evaluate`).

    Each of ``reference``/``candidate`` is anything ``slq quantize`` accepts or writes (a path, hub id, None for
    the embedded default) or an in-memory ``(model, tokenizer)`` pair.
    """
    device = resolve_device(device)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SlqError(f"device {device!r} was asked for but CUDA is not available")
    pairs = []
    for x in (reference, candidate):
        if isinstance(x, tuple):
            pairs.append(x)
        else:
            m, tok, _ = open_model(x, device=device, trust_remote_code=trust_remote_code)
            pairs.append((m, tok))
    return evaluate_models(*pairs, device=device, **kwargs)


def info(path: str | Path, *, verify: bool = True, trust_remote_code: bool = False) -> dict:
    """The report and plan of a checkpoint, checked against its config; with ``verify`` (the default)
    its tensors are checked too (keys, dtypes, shapes, finite scales; nothing is dequantized, see
    :func:`slq.runtime.checkpoint.verify`)."""

    p = Path(path)
    if not (p / "config.json").is_file():
        raise SlqError(f"{p} is not an slq checkpoint (no config.json)")
    if verify:
        specs = verify_tensors(p, trust_remote_code=trust_remote_code)
    else:
        specs = read_specs(read_json(p / "config.json", "corrupt checkpoint: its config"))
    report = read_report(p)
    if not report:
        raise SlqError(f"{p} has no slq_report.json (not written by slq?)")
    try:
        plan = Plan.from_dict(report["plan"])
    except (KeyError, TypeError, ValueError) as e:
        raise SlqError(f"corrupt {p / 'slq_report.json'}: its plan is incomplete or malformed ({e!r})") from e
    for name, s in specs.items():
        if name not in plan.layers or plan[name].spec != s:
            raise SlqError(f"slq_report.json disagrees with config.json about {name}")
    return report


def generate(source: str | None, prompt: str, *, max_new_tokens: int = 32, device: str = "cpu",
             trust_remote_code: bool = False, backend: str = "auto", engine: bool = True, note=None,
             temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, chat_template: bool = True,
             draft: str | None = None, k: int | str = 8) -> str:
    """Continuation of ``prompt`` by a model or checkpoint: greedy at ``temperature`` 0 (the default),
    else sampled from ``softmax(logits / temperature)`` restricted to the smallest set of tokens whose
    probability reaches ``top_p`` (nucleus sampling), with ``torch.manual_seed(seed)``.

    With ``chat_template`` and a tokenizer that has one, the prompt is one user turn rendered by the
    template (with the generation prompt appended); otherwise the prompt is tokenized as is.
    Greedy Llama-family runs (llama, mistral, qwen2, qwen3) decode through :mod:`slq.decode` (static KV
    cache; a CUDA graph per step on GPU). Sampling, other families, or ``engine=False`` use transformers'
    ``generate``; ``note`` (default: :func:`warnings.warn`) is told why. ``backend`` is the
    QuantLinear backend for slq checkpoints (see :func:`slq.load`).

    ``draft`` (a checkpoint or any model source) turns on speculative decoding
    (:func:`slq.runtime.speculative.generate`): the draft proposes ``k`` tokens a round (or ``"auto"``), the
    model verifies them in one forward, and the tokens follow the model's own greedy or sampled distribution
    exactly. Both must be families the decode engine runs and share one vocabulary. ``note`` is then told
    the acceptance rate, tokens per target forward, tokens/s and the draft/verify time split.
    """


    if not prompt:
        raise SlqError("the prompt is empty")
    if max_new_tokens < 1:
        raise SlqError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not (temperature >= 0 and temperature < float("inf")):
        raise SlqError(f"temperature must be >= 0 (0: greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise SlqError(f"top_p must be in (0, 1], got {top_p}")
    if draft is not None and not engine:
        raise SlqError("speculative decoding (a draft) runs slq's decode engine: engine must be on")
    if draft is not None and k != "auto" and not (isinstance(k, int) and not isinstance(k, bool) and k >= 1):
        raise ConfigError("k", f"{{field}} must be an integer >= 1 or 'auto', got {_literal(repr(k))}")
    device = resolve_device(device)
    m, tok = _open_for_decode(source, device, backend, trust_remote_code)
    ids = prompt_ids(tok, prompt, chat_template=chat_template).to(device)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    if draft is not None:

        d, dtok = _open_for_decode(draft, device, backend, trust_remote_code)
        for role, model in (("model", m), ("draft", d)):
            if not supports(model):
                family = getattr(model.config, "model_type", type(model).__name__)
                raise SlqError(f"the {role}'s model_type {family!r} is not one the decode engine runs "
                               f"({', '.join(SUPPORTED)}); speculative decoding needs both")
        nm, nd = m.get_output_embeddings().out_features, d.get_output_embeddings().out_features
        if nm != nd or tok.get_vocab() != dtok.get_vocab():
            raise SlqError(f"the draft's vocabulary ({len(dtok.get_vocab())} tokens, {nd} logits) is not the "
                           f"model's ({len(tok.get_vocab())} tokens, {nm} logits): speculative decoding needs one")
        out, r = speculative_generate(m, d, ids, k=k, temperature=temperature, top_p=top_p, seed=seed,
                                      max_new_tokens=max_new_tokens, pad_token_id=pad)
        if note is not None:
            note(f"speculative (k={k}): acceptance {r.acceptance_rate:.3f}, mean accepted length "
                 f"{r.mean_accepted_length:.2f}, {r.tokens_per_target_forward:.2f} tokens per target forward, "
                 f"{r.tokens_per_s:.1f} tok/s; draft {r.draft_s:.3f} s, verify {r.verify_s:.3f} s, "
                 f"accept {r.accept_s:.3f} s over {r.rounds} rounds")
        return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    sample = temperature > 0
    if engine and not sample and supports(m):
        out = engine_generate(m, ids, max_new_tokens, eos_token_id="auto", pad_token_id=pad)
    else:
        if engine and not sample:
            family = getattr(m.config, "model_type", type(m).__name__)
            msg = (f"model_type {family!r} is not one the decode engine runs ({', '.join(SUPPORTED)}); "
                   "using transformers generate")
            (note or (lambda s: warnings.warn(s, stacklevel=3)))(msg)
        kw = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0) if sample else dict(do_sample=False)
        torch.manual_seed(seed)
        with torch.inference_mode():
            out = m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             pad_token_id=pad, **kw)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def _open_for_decode(source, device: str, backend: str, trust_remote_code: bool):
    """(model, tokenizer) of a checkpoint (on ``backend``) or any model source."""
    path = resolve_model(source)
    if is_slq_checkpoint(path):
        m = load_checkpoint(path, device=device, backend=backend, trust_remote_code=trust_remote_code)
        return m, _tokenizer(path, trust_remote_code)
    return load_model(path, device=device, trust_remote_code=trust_remote_code)


def prompt_ids(tokenizer, prompt: str, *, chat_template: bool = True) -> torch.Tensor:
    """LongTensor [1, T]: ``prompt`` as one user turn through the tokenizer's chat template when it has
    one and ``chat_template`` is set, else the plain tokenization."""
    if chat_template and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        return tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
    return tokenizer(prompt, return_tensors="pt").input_ids


__all__ = ["quantize", "evaluate", "info", "generate", "export", "card", "resolve_device", "open_model", "GENERATED"]
