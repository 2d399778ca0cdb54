"""The `slq` command line (typer + rich). Each verb calls one public function."""

from __future__ import annotations

import json
import math
import os
import sys
import traceback
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table
from safetensors import SafetensorError

from . import api
from .quant.config import QuantConfig
from .search import SearchConfig, search
from .util.errors import ConfigError, SlqError
from .util.preflight import bank_bytes, check_out_dir, check_writable_dir, check_writable_file, checkpoint_bytes

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Statistically-lossless quantization of Hugging Face causal LLMs.")
console = Console(width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True)

# Config field -> the flag that sets it (a ConfigError names the field; the CLI prints the flag).
FLAGS = {
    # QuantConfig
    "bits": "--bits", "method": "--method", "group_size": "--group-size", "symmetric": "--sym", "clip": "--no-clip",
    "attention": "--plain-hessians", "act_order": "--act-order", "damp": "--damp", "calib": "--calib",
    "calib_samples": "--calib-samples", "seq_len": "--seq-len", "seed": "--seed", "device": "--device",
    # SearchConfig
    "target": "--target", "ear": "--ear", "recovery": "--recovery", "tasks": "--tasks", "task_limit": "--task-limit",
    "bitwidths": "--bitwidths", "units": "--units", "estimator": "--estimator", "sens_windows": "--sens-windows",
    "sens_seq_len": "--sens-seq-len", "verify_windows": "--verify-windows", "confirm_windows": "--confirm-windows",
    "probe_bits": "--probe-bits", "orderings": "--orderings", "max_rounds": "--max-rounds",
    "baselines": "--baselines", "workdir": "--workdir",
    # the entry points' own arguments
    "force": "--force", "out": "--out",
}


def _quiet_transformers() -> None:
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:  # pragma: no cover
        pass


def _run(fn, *a, **k):
    """Call fn; bad input, or a file or disk that fails (OSError, a corrupt safetensors or JSON file),
    becomes one line on stderr and exit code 1; ``SLQ_DEBUG=1`` prints the traceback first. Errors of
    the code itself are not caught here: they surface as tracebacks."""
    _quiet_transformers()
    try:
        return fn(*a, **k)
    except ConfigError as e:
        _fail(e.render(FLAGS), e)
    except SlqError as e:
        _fail(str(e), e)
    except (OSError, SafetensorError, json.JSONDecodeError) as e:
        _fail(_describe(e), e)
    except KeyboardInterrupt:
        err.print("[bold red]interrupted[/]")
        raise typer.Exit(130)


def _fail(msg: str, e: BaseException):
    if os.environ.get("SLQ_DEBUG", "") not in ("", "0"):
        traceback.print_exception(e)
    err.print(f"[bold red]error:[/] {msg}", highlight=False, soft_wrap=True)
    raise typer.Exit(1)


def _describe(e: BaseException) -> str:
    """One line for an environment or file failure, naming the file where the exception knows it."""
    if isinstance(e, OSError):
        what = e.strerror or str(e) or type(e).__name__
        files = " -> ".join(str(f) for f in (e.filename, e.filename2) if f is not None)
        return f"{what}: {files}" if files else what
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    if isinstance(e, SafetensorError):
        return f"a safetensors file cannot be read: {first}"
    return f"a JSON file cannot be parsed: {first}"


def _group(value: str) -> Optional[int]:
    if value in ("channel", "per-channel", "ch", "-1"):
        return None
    try:
        g = int(value)
    except ValueError:
        raise SlqError(f"--group-size must be 16, 32, 64, 128, 256 or 'channel', got {value!r}")
    if g not in (16, 32, 64, 128, 256):
        raise SlqError(f"--group-size must be 16, 32, 64, 128, 256 or 'channel', got {value!r}")
    return g


def _int_list(value: str, what: str) -> tuple[int, ...]:
    try:
        out = tuple(int(x) for x in value.split(",") if x.strip())
    except ValueError:
        raise SlqError(f"{what} must be a comma list of integers, got {value!r}")
    if not out:
        raise SlqError(f"{what} is empty")
    return out


def _parse_bits(value: Optional[str]) -> Optional[float]:
    if value is None:
        return None
    try:
        b = float(value)
    except ValueError:
        raise SlqError(f"--bits must be a number (an integer 2..8 for uniform, or a fractional budget), got {value!r}")
    if not math.isfinite(b):
        raise SlqError(f"--bits must be a finite number (an integer 2..8 for uniform, or a fractional budget), "
                       f"got {value!r}")
    return b


@app.command()
def quantize(
    model: Optional[str] = typer.Argument(None, help="HF directory, .gguf file or hub id; default: embedded SmolLM2-135M-Instruct"),
    bits: Optional[str] = typer.Option(None, "--bits", "-b",
                                       help="integer 2..8: uniform; fractional (e.g. 4.5): SLQ search at that bits/param budget (default 4)"),
    target: Optional[str] = typer.Option(None, "--target", help="SLQ search target: dl (EAR) or tl (zero-shot recovery)"),
    ear: float = typer.Option(0.99, "--ear", help="DL target: 95% lower bound of measured EAR"),
    recovery: float = typer.Option(0.99, "--recovery", help="TL target: zero-shot accuracy recovery"),
    tasks: Optional[str] = typer.Option(None, "--tasks", help="TL tasks (default piqa,arc_easy,hellaswag,winogrande)"),
    task_limit: Optional[int] = typer.Option(200, "--task-limit", help="TL: first K items of each task"),
    bitwidths: str = typer.Option("2,3,4,5,6,7,8,16", "--bitwidths", help="search candidates; 16 = keep in 16-bit"),
    units: str = typer.Option("fused", "--units", help="search units: fused (q/k/v, gate/up share bits) or linear"),
    estimator: str = typer.Option("linear", "--estimator", help="search sensitivities: linear, shapley or fisher"),
    sens_windows: int = typer.Option(8, "--sens-windows", help="search: calibration windows used for sensitivities"),
    sens_seq_len: Optional[int] = typer.Option(None, "--sens-seq-len", help="search: tokens per sensitivity window (default --seq-len)"),
    verify_windows: int = typer.Option(16, "--verify-windows", help="search: held-out windows for verification"),
    confirm_windows: Optional[int] = typer.Option(
        None, "--confirm-windows", help="search (dl): further held-out windows that confirm the accepted round "
                                        "(default --verify-windows; 0: none)"),
    probe_bits: Optional[str] = typer.Option(None, "--probe-bits",
                                             help="linear estimator: probe bitwidth(s) (default 4, or the candidate nearest to it)"),
    orderings: int = typer.Option(2, "--orderings", help="Shapley estimator: random orderings"),
    max_rounds: int = typer.Option(4, "--max-rounds", help="search: verification rounds at most"),
    baselines: Optional[str] = typer.Option(None, "--baselines", help="search: uniform bitwidths measured for the report (default 3..8)"),
    workdir: Optional[Path] = typer.Option(None, "--workdir", help="search: bank/sensitivity cache (resumable)"),
    group_size: str = typer.Option("128", "--group-size", "-g", help="16/32/64/128/256 or 'channel'"),
    sym: bool = typer.Option(False, "--sym", help="symmetric grid (default: asymmetric, integer zero point)"),
    method: str = typer.Option("gptq", "--method", help="rtn or gptq"),
    calib: Optional[str] = typer.Option(None, "--calib", help="text file, .jsonl, HF dataset id, or 'generated' (default)"),
    calib_samples: int = typer.Option(128, "--calib-samples", help="number of calibration windows"),
    seq_len: int = typer.Option(512, "--seq-len", help="tokens per calibration window"),
    no_clip: bool = typer.Option(False, "--no-clip", help="disable the MSE-optimal clipping search"),
    plain_hessians: bool = typer.Option(False, "--plain-hessians",
                                        help="GPTQ: plain X^T X Hessians for keys/values too (default: attention-aware)"),
    act_order: Optional[bool] = typer.Option(None, "--act-order/--no-act-order",
                                             help="GPTQ: columns by decreasing Hessian diagonal, static groups "
                                                  "(default: on for GPTQ)"),
    damp: float = typer.Option(0.01, "--damp", help="GPTQ: damping added to the Hessian, a fraction of its mean diagonal"),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda or cuda:N"),
    seed: int = typer.Option(0, "--seed"),
    out: Path = typer.Option(..., "--out", "-o", help="output checkpoint directory"),
    force: bool = typer.Option(False, "--force", help="replace --out if it exists"),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code"),
    do_eval: bool = typer.Option(False, "--eval", help="uniform: measure EAR/KL/PPL vs the reference right after quantizing"),
    eval_data: str = typer.Option("generated", "--eval-data", help="held-out text for --eval"),
    eval_tokens: int = typer.Option(8 * 512, "--eval-tokens"),
):
    """Quantize a model to a compressed-tensors checkpoint: uniform bits, or the SLQ per-unit search."""

    def go():
        b = _parse_bits(bits)
        if target is not None and target not in ("dl", "tl"):
            raise SlqError(f"--target must be dl or tl, got {target!r}")
        if target is not None and b is not None:
            raise SlqError("give either --target or --bits, not both")
        is_search = target is not None or (b is not None and not float(b).is_integer())
        # uniform: --bits (default 4); the search chooses bits per unit, so its QuantConfig keeps the default
        qc = QuantConfig(**({} if is_search or b is None else {"bits": int(b)}), group_size=_group(group_size),
                         symmetric=sym, method=method, calib=calib, calib_samples=calib_samples, seq_len=seq_len,
                         clip=not no_clip, attention=not plain_hessians, act_order=act_order, damp=damp,
                         device=device, seed=seed)
        sc = None if not is_search else SearchConfig(
            quant=qc, target=target or "bits", ear=ear, recovery=recovery, bits=b,
            tasks=[t.strip() for t in tasks.split(",") if t.strip()] if tasks else None, task_limit=task_limit,
            bitwidths=_int_list(bitwidths, "--bitwidths"), units=units, estimator=estimator,
            sens_windows=sens_windows, sens_seq_len=sens_seq_len, verify_windows=verify_windows,
            confirm_windows=confirm_windows,
            probe_bits=None if probe_bits is None else _int_list(probe_bits, "--probe-bits"), orderings=orderings,
            max_rounds=max_rounds, baselines=_int_list(baselines, "--baselines") if baselines else None,
            workdir=workdir)
        # output paths are checked before any work: a bad one costs seconds, not a quantization
        check_out_dir(out, model, force=force, need=checkpoint_bytes(model, 4 if b is None else b))
        if is_search and workdir is not None:
            check_writable_dir(workdir, "--workdir", bank_bytes(model, _int_list(bitwidths, "--bitwidths"), workdir))
        if sc is None:
            return api.quantize(model, config=qc, out=out, force=force, progress=sys.stderr.isatty(),
                                trust_remote_code=trust_remote_code, eval=do_eval, eval_data=eval_data,
                                eval_tokens=eval_tokens)
        return search(model, config=sc, out=out, force=force, plots=True, progress=sys.stderr.isatty(),
                      trust_remote_code=trust_remote_code)

    report = _run(go)
    if report.get("allocation") is not None:
        print_search(report)
    elif report.get("fidelity"):
        print_fidelity(report["fidelity"])
    console.print(f"wrote [bold]{out}[/]: {report['bits_per_param']:.3f} bits/param over quantized linears, "
                  f"{report['bits_per_param_model']:.3f} over the whole model, "
                  f"{report['timings']['total_s']:.1f} s")


def print_search(report: dict) -> None:
    t = report["target"]
    m, p = report["measured"], report["predicted"]
    tb = Table(title=f"SLQ search ({t['kind']}, estimator {report['sensitivity']['estimator']}): "
                     f"{'verified' if report['verified'] else 'NOT verified'}")
    for c in ("round", "KL budget", "pred. KL", "pred. EAR", "bits/param", "EAR [95% CI] held-out", "KL", "accepted"):
        tb.add_column(c, justify="right")
    for r in report["rounds"]:
        mm = r["measured"]
        tb.add_row(str(r["round"]), "-" if r["kl_budget"] is None else f"{r['kl_budget']:.2e}",
                   f"{r['predicted']['kl']:.2e}", f"{r['predicted']['ear']:.4f}", f"{r['bits_per_param']:.3f}",
                   f"{mm['ear']['mean']:.4f} [{mm['ear']['ci95'][0]:.4f}, {mm['ear']['ci95'][1]:.4f}]",
                   f"{mm['kl']['mean']:.2e}", "yes" if r["accepted"] else "no")
    console.print(tb)
    conf = report.get("confirmation")
    if conf and conf.get("tries"):
        for c in conf["tries"]:
            e = c["measured"]["ear"]
            console.print(f"round {c['round']} ({c['bits_per_param']:.3f} b/p) on the second held-out sample "
                          f"({conf['windows']} windows): EAR {e['mean']:.4f} [{e['ci95'][0]:.4f}, {e['ci95'][1]:.4f}] "
                          f"{'passed' if c['passed'] else 'FAILED'}")
    elif conf and conf.get("note"):
        console.print(f"confirmation: {conf['note']}")
    hist = ", ".join(f"{b}b {v:.0%}" for b, v in report["bits_histogram"].items() if v)
    console.print(f"allocation: {hist}; {report['n_params_kept_16bit']:,} parameters kept in 16-bit")
    console.print(f"measured: EAR {m['ear']['mean']:.5f} [{m['ear']['ci95'][0]:.5f}, {m['ear']['ci95'][1]:.5f}], "
                  f"top-10 EAR {m['ear_top10']['mean']:.5f} (peers' variant), KL {m['kl']['mean']:.3e}, "
                  f"top-1 {m['top1']:.4f}, PPL ratio {m['ppl_ratio']:.4f}; predicted EAR {p['ear']:.5f}")
    if report.get("anchor"):
        a = report["anchor"]
        console.print(f"TL anchor (uniform 4-bit): recovery {a['recovery']:.4f}, KL {a['kl']:.3e} -> KL budget "
                      f"{a['kl_budget']:.3e}")
    tm = report["timings"]
    console.print("timings: " + ", ".join(f"{k} {v:.1f}s" for k, v in tm.items()))


@app.command()
def info(path: Path = typer.Argument(..., help="an slq checkpoint directory"),
         as_json: bool = typer.Option(False, "--json", help="print the report as JSON"),
         no_verify: bool = typer.Option(False, "--no-verify",
                                        help="skip the tensor checks (keys, dtypes, shapes, finite scales)")):
    """Show a checkpoint's plan: layer, bits, group, sym, gamma; and bits per parameter (after checking its tensors)."""
    from .api import info as run

    report = _run(run, path, verify=not no_verify)
    if as_json:
        console.print_json(json.dumps(report))
        return
    t = Table(title=f"{path}  (model: {report.get('model')})")
    for col in ("layer", "bits", "group", "sym", "gamma", "gamma^2", "bits/param", "note"):
        t.add_column(col, justify="left" if col in ("layer", "note") else "right", no_wrap=col == "layer")
    for name, lp in report["plan"].items():
        s = lp["spec"]
        g = "channel" if s["group_size"] is None else str(s["group_size"])
        note = "" if lp["group_note"] == "as requested" else lp["group_note"]
        t.add_row(name, str(s["bits"]), g, "yes" if s["symmetric"] else "no", _fmt(lp.get("gamma_mean")),
                  _fmt(lp.get("gamma2_mean")), f"{lp['bits_per_param']:.3f}", note)
    console.print(t)
    console.print(f"bits/param: {report['bits_per_param']:.4f} (quantized linears, scales and zeros included), "
                  f"{report['bits_per_param_model']:.4f} (whole model, other tensors at stored precision)")
    if report.get("allocation") is not None:
        print_search(report)
    if report.get("fidelity"):
        print_fidelity(report["fidelity"])


@app.command("eval")
def eval_(
    reference: str = typer.Argument(..., help="reference: HF dir, .gguf, hub id, or 'default' for the embedded model"),
    candidate: str = typer.Argument(..., help="candidate: an slq checkpoint (or any model source)"),
    data: str = typer.Option("generated", "--data", help="text file, .jsonl, HF dataset id, or 'generated'"),
    tokens: int = typer.Option(16 * 512, "--tokens", help="tokens to compare (tokens // seq-len windows)"),
    seq_len: int = typer.Option(512, "--seq-len"),
    on_policy: int = typer.Option(0, "--on-policy", help="continuations sampled from the reference and scored"),
    tasks: Optional[str] = typer.Option(None, "--tasks", help="comma list: piqa,arc_easy,arc_challenge,boolq,winogrande,hellaswag,lambada"),
    limit: Optional[int] = typer.Option(None, "--limit", help="first K items of each task"),
    temperature: float = typer.Option(1.0, "--temperature"),
    batch_size: int = typer.Option(8, "--batch-size"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="write the numbers as JSON here"),
    device: str = typer.Option("cpu", "--device"),
    seed: int = typer.Option(0, "--seed"),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code"),
):
    """Measure how lossless CANDIDATE is against REFERENCE: EAR, KL, top-1, PPL, tasks."""
    from .api import evaluate

    def go():
        if json_out is not None:
            check_writable_file(json_out, "--json")
        names = [t.strip() for t in tasks.split(",") if t.strip()] if tasks else None
        return evaluate(None if reference == "default" else reference, None if candidate == "default" else candidate,
                        data=data, tokens=tokens, seq_len=seq_len, on_policy=on_policy, tasks=names, limit=limit,
                        temperature=temperature, batch_size=batch_size, device=device, seed=seed,
                        progress=sys.stderr.isatty(), trust_remote_code=trust_remote_code)

    fid = _run(go)
    d = fid.to_dict()
    print_fidelity(d)
    if json_out is not None:
        from .util.jsonio import write_json

        _run(write_json, json_out, d)
        console.print(f"wrote {json_out}")


def print_fidelity(d: dict) -> None:
    t = Table(title=f"fidelity over {d['n_tokens']} tokens ({d['n_sequences']} windows)")
    t.add_column("metric")
    t.add_column("value", justify="right")
    lo, hi = d["ear"]["ci95"]
    t.add_row("EAR (1 - TV), 95% CI", f"{d['ear']['mean']:.5f}  [{lo:.5f}, {hi:.5f}]")
    lo, hi = d["ear_top10"]["ci95"]
    t.add_row("EAR top-10 renormalized (peers' variant)", f"{d['ear_top10']['mean']:.5f}  [{lo:.5f}, {hi:.5f}]")
    k = d["kl"]
    t.add_row("KL(ref||cand) mean / median / p90 / p99 / max",
              f"{k['mean']:.5f} / {k['median']:.5f} / {k['p90']:.5f} / {k['p99']:.5f} / {k['max']:.4f}")
    t.add_row("KL(cand||ref) mean", f"{d['kl_qp']['mean']:.5f}")
    t.add_row("top-1 agreement", f"{d['top1']:.5f}")
    t.add_row("dp RMS", f"{d['dp_rms']:.5f}")
    p = d["ppl"]
    t.add_row("PPL reference / candidate / ratio", f"{p['reference']:.4f} / {p['candidate']:.4f} / {p['ratio']:.5f}")
    t.add_row("argmax flips by ref-entropy quintile", " ".join(f"{r:.4f}" for r in d["flip_by_entropy"]["rate"]))
    if "on_policy" in d:
        op = d["on_policy"]
        lo, hi = op["ear"]["ci95"]
        t.add_row(f"on-policy EAR ({op['n_tokens']} sampled tokens)", f"{op['ear']['mean']:.5f}  [{lo:.5f}, {hi:.5f}]")
    t.add_row("tokens/s (both models)", f"{d['timing']['tokens_per_s']:.1f}")
    console.print(t)
    if d.get("tasks"):
        tt = Table(title="zero-shot, paired (candidate - reference)")
        for c in ("task", "n", "metric", "reference", "candidate", "delta", "95% CI", "p (McNemar)", "ref SE", "lossless"):
            tt.add_column(c, justify="left" if c in ("task", "metric") else "right")
        for name, r in d["tasks"].items():
            tt.add_row(name, str(r.get("n", "")), str(r.get("metric", "")), f"{r['acc_reference']:.4f}",
                       f"{r['acc_candidate']:.4f}", f"{r['delta']:+.4f}", f"[{r['ci95'][0]:+.4f}, {r['ci95'][1]:+.4f}]",
                       f"{r['p_value']:.3g}", f"{r.get('se_reference', float('nan')):.4f}", "yes" if r["lossless"] else "no")
        console.print(tt)


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.3f}"


@app.command()
def generate(source: Optional[str] = typer.Argument(None, help="checkpoint, HF dir, .gguf or hub id; default: embedded model"),
             prompt: str = typer.Option(..., "--prompt", "-p"),
             max_new_tokens: int = typer.Option(32, "--max-new-tokens", "-n"),
             device: str = typer.Option("cpu", "--device"),
             backend: str = typer.Option("auto", "--backend", help="checkpoints: auto, reference, triton, humming"),
             hf: bool = typer.Option(False, "--hf", help="decode with transformers generate, not slq's engine"),
             trust_remote_code: bool = typer.Option(False, "--trust-remote-code")):
    """Greedy generation from a model or checkpoint (slq's static-cache engine for Llama-family models)."""
    from .api import generate as run

    text = _run(run, source, prompt, max_new_tokens=max_new_tokens, device=device, trust_remote_code=trust_remote_code,
                backend=backend, engine=not hf, note=lambda s: err.print(f"note: {s}", highlight=False))
    print(prompt + text)


@app.command()
def bench(
    checkpoint: Optional[str] = typer.Argument(None, help="an slq checkpoint DIR (or use --shape)"),
    shape: Optional[str] = typer.Option(None, "--shape", help="synthetic random weights: llama3-8b, llama3-3b, "
                                        "llama3-1b, qwen2.5-7b, qwen2.5-1.5b, qwen3-8b, tiny"),
    bits: str = typer.Option("2,3,4,5,6,7,8", "--bits", help="comma list of bitwidths (--shape)"),
    plan: Optional[str] = typer.Option("dl,tl", "--plan", help="comma list: dl (~5.5 b/p), tl (~3.5 b/p), or a "
                                       "JSON unit->bits FILE; 'none' for no mixed plans (--shape)"),
    backends: str = typer.Option("reference,triton,humming", "--backends", help="unavailable ones are skipped"),
    batch: str = typer.Option("1,16", "--batch", help="comma list of batch sizes (GEMV/GEMM rows)"),
    layers: Optional[int] = typer.Option(None, "--layers", help="decoder layers of the synthetic model"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="write every row as JSON here"),
    group_size: str = typer.Option("128", "--group-size", "-g"),
    prompt_len: int = typer.Option(32, "--prompt-len"),
    new_tokens: int = typer.Option(32, "--new-tokens"),
    iters: Optional[int] = typer.Option(None, "--iters", help="timed repetitions (default 20 on GPU, 3 on CPU)"),
    repeats: Optional[int] = typer.Option(None, "--repeats", help="timed decode runs per row, median (default 3 GPU, 1 CPU)"),
    measure: str = typer.Option("layer,stack,decode", "--measure"),
    device: str = typer.Option("auto", "--device"),
):
    """Decode speed: per-layer GEMV/GEMM, the linear stack, end-to-end tokens/s, beside FP16 and the roofline."""
    from .runtime.bench import run

    if json_out is not None:
        _run(check_writable_file, json_out, "--json")
    res = _run(lambda: run(shape=shape, checkpoint=checkpoint, bits=bits,
                           plans=None if (plan or "").lower() == "none" else plan, backends=backends, batches=batch,
                           layers=layers, json_out=json_out, group_size=_group(group_size), prompt_len=prompt_len,
                           new_tokens=new_tokens, iters=iters, repeats=repeats, device=device, measure=measure,
                           log=lambda m: err.print(m, highlight=False)))
    print_bench(res)
    if json_out is not None:
        console.print(f"wrote {json_out}")


def print_bench(res: dict) -> None:
    bw = res["bandwidth"]
    console.print(f"{res['device'].get('name')} ({res['device']['type']}): peak {bw['GBps']:.1f} GB/s "
                  f"({bw['method']}); git {res['git_commit'][:12]}", highlight=False)
    for kind, unit in (("decode", "tok/s"), ("stack", "ms")):
        rows = [r for r in res["rows"] if r["kind"] == kind]
        if not rows:
            continue
        t = Table(title=f"{kind}: " + ("end-to-end greedy decode (slq.decode)" if kind == "decode"
                                       else "all linears of all layers" + (" in one CUDA graph" if
                                                                           res["device"]["type"] == "cuda" else "")))
        for c in ("variant", "backend", "bits/param", "batch", unit, f"FP16 {unit}", "speedup", "% roofline"):
            t.add_column(c, justify="left" if c in ("variant", "backend") else "right")
        for r in rows:
            val = r["tokens_per_s"] if kind == "decode" else r["ms"]
            fp = r.get("fp16_tokens_per_s") if kind == "decode" else r.get("fp16_ms")
            t.add_row(str(r["variant"]), r["backend"], f"{r['bits_per_param']:.3f}", str(r["M"]), f"{val:.3f}",
                      "-" if fp is None else f"{fp:.3f}", "-" if r.get("speedup") is None else f"{r['speedup']:.2f}x",
                      f"{r['pct_roofline']:.1f}%")
        console.print(t)
    n_layer = sum(r["kind"] == "layer" for r in res["rows"])
    if n_layer:
        console.print(f"{n_layer} per-layer rows in the JSON (kind = layer)")
    for s in res.get("skipped", []):
        console.print(f"skipped {s['backend']}: {s['reason']}", highlight=False)
    for e in res.get("errors", []):
        console.print(f"recorded error: {e}", highlight=False)


def main():  # pragma: no cover
    app()
