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
from .measure.evaluate import ear_verdict, few_sequences_warning, provenance
from .quant.config import QuantConfig
from .runtime.bench import run as run_bench
from .search import SearchConfig, search
from .util.errors import ConfigError, SlqError
from .util.jsonio import write_json
from .util.preflight import (
    bank_bytes,
    check_out_dir,
    check_writable_dir,
    check_writable_file,
    checkpoint_bytes,
)
from .util.provenance import __version__

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Statistically-lossless quantization of Hugging Face causal LLMs.")
WIDTH = 100  # tables are laid out to fit this many columns off a terminal (logs, pipes)
console = Console(width=None if sys.stdout.isatty() else WIDTH)
err = Console(stderr=True)

def _version(value: bool) -> None:
    if value:
        print(f"slq {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="print slq's version and exit")) -> None:
    """Statistically-lossless quantization of Hugging Face causal LLMs."""


# Config field -> the flag that sets it (a ConfigError names the field; the CLI prints the flag).
FLAGS = {
    # QuantConfig
    "bits": "--bits", "method": "--method", "group_size": "--group-size", "symmetric": "--sym", "clip": "--no-clip",
    "attention": "--plain-hessians", "act_order": "--act-order", "damp": "--damp", "calib": "--calib",
    "calib_samples": "--calib-samples", "seq_len": "--seq-len", "seed": "--seed", "device": "--device",
    "head_bits": "--head-bits", "offload": "--offload",
    # SearchConfig
    "target": "--target", "ear": "--ear", "recovery": "--recovery", "tasks": "--tasks", "task_limit": "--task-limit",
    "bitwidths": "--bitwidths", "units": "--units", "estimator": "--estimator", "sens_windows": "--sens-windows",
    "sens_seq_len": "--sens-seq-len", "verify_windows": "--verify-windows", "confirm_windows": "--confirm-windows",
    "probe_bits": "--probe-bits", "orderings": "--orderings", "max_rounds": "--max-rounds",
    "baselines": "--baselines", "workdir": "--workdir", "groups": "--groups", "head": "--head",
    "verify_data": "--verify-data", "real_text_margin": "--real-text-margin", "runtime": "--runtime",
    # the entry points' own arguments
    "shape": "--shape", "measure": "--measure", "layers": "--layers", "prompt_len": "--prompt-len",
    "backends": "--backends", "tokens": "--tokens", "temperature": "--temperature", "force": "--force", "out": "--out", "gpus": "--gpus", "k": "--draft-k",
}


def _quiet_transformers() -> None:
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:  # pragma: no cover
        pass


def _run(fn, *a, flags: Optional[dict] = None, **k):
    """Call fn; bad input, or a file or disk that fails (OSError, a corrupt safetensors or JSON file),
    becomes one line on stderr and exit code 1; ``SLQ_DEBUG=1`` prints the traceback first. Errors of
    the code itself are not caught here: they surface as tracebacks."""
    _quiet_transformers()
    try:
        return fn(*a, **k)
    except ConfigError as e:
        _fail(e.render({**FLAGS, **(flags or {})}), e)
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


def _groups(value: str) -> tuple[Optional[int], ...]:
    """``--groups``: a comma list of group sizes, ``ch`` (or ``channel``) for per-channel."""
    items = [x.strip() for x in value.split(",") if x.strip()]
    if not items:
        raise SlqError("--groups is empty")
    try:
        return tuple(_group(x) for x in items)
    except SlqError:
        raise SlqError(f"--groups must be a comma list of 16, 32, 64, 128, 256 or 'ch' (per-channel), got {value!r}")


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


# --help panels
P_MODE, P_SEARCH, P_GRID, P_CALIB, P_OUT, P_EVAL, P_RUN = (
    "Mode: uniform or search", "Search (fractional --bits, --budget or --target)", "Grid and method",
    "Calibration", "Output and publishing", "Uniform: measure after quantizing", "Run")

# the search's own options: given in uniform mode they would be ignored, so they are refused
SEARCH_ONLY = ("ear", "recovery", "tasks", "task_limit", "bitwidths", "units", "estimator", "sens_windows",
               "sens_seq_len", "verify_windows", "confirm_windows", "probe_bits", "orderings", "max_rounds",
               "baselines", "workdir", "groups", "head", "verify_data", "real_text_margin", "runtime")
UNIFORM_ONLY = ("do_eval", "eval_data", "eval_tokens")

# --fast: cheaper settings for a uniform run (an option given explicitly wins). RTN with the MSE-optimal
# clipping (on by default): GPTQ's solve alone takes minutes on SmolLM2 on 2 cores whatever the calibration
# size (110-300 s in bench/results/quantize_smollm2.json), RTN about 10 s. bench/fast_preset.py measures the
# time and EAR against the default.
FAST = {"method": "rtn"}


def _given(ctx: typer.Context, name: str) -> bool:
    """Whether the option ``name`` was set on the command line (or by the environment), not defaulted."""
    src = ctx.get_parameter_source(name)
    return src is not None and src.name not in ("DEFAULT", "DEFAULT_MAP")


def _flag(ctx: typer.Context, name: str) -> str:
    for p in ctx.command.params:
        if p.name == name:
            return max(p.opts, key=len)
    return name


def _model(x: Optional[str]) -> Optional[str]:
    """The model argument: omitted or the word ``default`` is the embedded default model."""
    return None if x in (None, "default") else x


def _device(value: str) -> str:
    """``auto`` (cuda if available, else cpu), cpu, cuda or cuda:N."""
    ok = value in ("auto", "cpu", "cuda") or (value.startswith("cuda:") and value[5:].isdigit())
    if not ok:
        raise SlqError(f"--device must be auto, cpu, cuda or cuda:N, got {value!r}")
    return api.resolve_device(value)


@app.command(no_args_is_help=False)
def quantize(
    ctx: typer.Context,
    model: Optional[str] = typer.Argument(None, help="HF directory, .gguf file, hub id, or 'default' (omitted: "
                                                     "the embedded SmolLM2-135M-Instruct)"),
    bits: Optional[str] = typer.Option(None, "--bits", "-b", rich_help_panel=P_MODE,
                                       help="integer 2..8: uniform (default 4); fractional (e.g. 4.5): search at "
                                            "that bits/param budget"),
    budget: Optional[float] = typer.Option(None, "--budget", rich_help_panel=P_MODE,
                                           help="search at this bits/param budget (any number, integers too)"),
    target: Optional[str] = typer.Option(None, "--target", rich_help_panel=P_MODE,
                                         help="search target: dl (EAR) or tl (zero-shot recovery)"),
    fast: bool = typer.Option(False, "--fast", rich_help_panel=P_MODE,
                              help="uniform: a faster preset (RTN with clipping, no calibration); options given "
                                   "explicitly win"),
    ear: float = typer.Option(0.99, "--ear", rich_help_panel=P_SEARCH, help="DL target: 95% lower bound of EAR"),
    recovery: float = typer.Option(0.99, "--recovery", rich_help_panel=P_SEARCH,
                                   help="TL target: zero-shot accuracy recovery"),
    tasks: Optional[str] = typer.Option(None, "--tasks", rich_help_panel=P_SEARCH,
                                        help="TL tasks (default piqa,arc_easy,hellaswag,winogrande)"),
    task_limit: Optional[int] = typer.Option(200, "--task-limit", rich_help_panel=P_SEARCH,
                                             help="TL: first K items of each task"),
    bitwidths: str = typer.Option("2,3,4,5,6,7,8,16", "--bitwidths", rich_help_panel=P_SEARCH,
                                  help="candidates; 16 = keep in 16-bit"),
    units: str = typer.Option("fused", "--units", rich_help_panel=P_SEARCH,
                              help="fused (q/k/v, gate/up share bits) or linear"),
    estimator: str = typer.Option("linear", "--estimator", rich_help_panel=P_SEARCH,
                                  help="sensitivities: linear, shapley or fisher"),
    sens_windows: int = typer.Option(8, "--sens-windows", rich_help_panel=P_SEARCH,
                                     help="calibration windows for sensitivities"),
    sens_seq_len: Optional[int] = typer.Option(None, "--sens-seq-len", rich_help_panel=P_SEARCH,
                                               help="tokens per sensitivity window (default --seq-len)"),
    verify_windows: int = typer.Option(16, "--verify-windows", rich_help_panel=P_SEARCH,
                                       help="held-out windows for verification"),
    confirm_windows: Optional[int] = typer.Option(
        None, "--confirm-windows", rich_help_panel=P_SEARCH,
        help="dl: further held-out windows that confirm the accepted round (default --verify-windows; 0: none)"),
    probe_bits: Optional[str] = typer.Option(None, "--probe-bits", rich_help_panel=P_SEARCH,
                                             help="linear estimator: probe bitwidth(s) (default 4 or nearest)"),
    orderings: int = typer.Option(2, "--orderings", rich_help_panel=P_SEARCH, help="Shapley: random orderings"),
    max_rounds: int = typer.Option(4, "--max-rounds", rich_help_panel=P_SEARCH, help="verification rounds at most"),
    baselines: Optional[str] = typer.Option(None, "--baselines", rich_help_panel=P_SEARCH,
                                            help="uniform bitwidths measured for the report (default 3..8)"),
    workdir: Optional[Path] = typer.Option(None, "--workdir", rich_help_panel=P_SEARCH,
                                           help="bank/sensitivity cache (resumable)"),
    groups: Optional[str] = typer.Option(None, "--groups", rich_help_panel=P_SEARCH,
                                         help="candidate group sizes per unit, e.g. 32,64,128 ('ch': per-channel); "
                                              "must include --group-size (default: --group-size alone)"),
    head: bool = typer.Option(False, "--head", rich_help_panel=P_SEARCH,
                              help="the lm_head is one more unit (8-bit or 16-bit)"),
    verify_data: Optional[str] = typer.Option(None, "--verify-data", rich_help_panel=P_SEARCH,
                                              help="real text for verification (default: the windows after the "
                                                   "calibration ones)"),
    real_text_margin: float = typer.Option(0.0, "--real-text-margin", rich_help_panel=P_SEARCH,
                                           help="dl without --verify-data: the bound must reach --ear plus this"),
    runtime: Optional[str] = typer.Option(None, "--runtime", rich_help_panel=P_SEARCH,
                                          help="vllm: only the choices vLLM loads today (the report says if ready)"),
    group_size: str = typer.Option("128", "--group-size", "-g", rich_help_panel=P_GRID,
                                   help="16/32/64/128/256 or 'channel'"),
    sym: bool = typer.Option(False, "--sym", rich_help_panel=P_GRID,
                             help="symmetric grid (default: asymmetric, integer zero point)"),
    method: str = typer.Option("gptq", "--method", rich_help_panel=P_GRID, help="rtn or gptq"),
    no_clip: bool = typer.Option(False, "--no-clip", rich_help_panel=P_GRID,
                                 help="disable the MSE-optimal clipping search"),
    plain_hessians: bool = typer.Option(False, "--plain-hessians", rich_help_panel=P_GRID,
                                        help="GPTQ: plain X^T X Hessians for keys/values too"),
    act_order: Optional[bool] = typer.Option(None, "--act-order/--no-act-order", rich_help_panel=P_GRID,
                                             help="GPTQ: columns by decreasing Hessian diagonal (default on)"),
    damp: float = typer.Option(0.01, "--damp", rich_help_panel=P_GRID,
                               help="GPTQ: damping, a fraction of the Hessian's mean diagonal"),
    head_bits: Optional[int] = typer.Option(None, "--head-bits", rich_help_panel=P_GRID,
                                            help="uniform: quantize the lm_head to this bitwidth (8 typical; "
                                                 "default: kept 16-bit)"),
    calib: Optional[str] = typer.Option(None, "--calib", rich_help_panel=P_CALIB,
                                        help="text file, .jsonl, HF dataset id, or 'generated' (default)"),
    calib_samples: int = typer.Option(128, "--calib-samples", rich_help_panel=P_CALIB,
                                      help="calibration windows"),
    seq_len: int = typer.Option(512, "--seq-len", rich_help_panel=P_CALIB, help="tokens per calibration window"),
    out: Path = typer.Option(..., "--out", "-o", rich_help_panel=P_OUT, help="output checkpoint directory"),
    force: bool = typer.Option(False, "--force", rich_help_panel=P_OUT, help="replace --out if it exists"),
    card: bool = typer.Option(True, "--card/--no-card", rich_help_panel=P_OUT,
                              help="write the model card (README.md) into the checkpoint"),
    base_model: Optional[str] = typer.Option(None, "--base-model", rich_help_panel=P_OUT,
                                             help="hub id of the base model, for the card"),
    push_to_hub: Optional[str] = typer.Option(None, "--push-to-hub", rich_help_panel=P_OUT,
                                              help="then upload the checkpoint to this hub repo (owner/name)"),
    do_eval: bool = typer.Option(False, "--eval", rich_help_panel=P_EVAL,
                                 help="measure EAR/KL/PPL vs the reference right after quantizing"),
    eval_data: str = typer.Option("generated", "--eval-data", rich_help_panel=P_EVAL, help="held-out text"),
    eval_tokens: int = typer.Option(8 * 512, "--eval-tokens", rich_help_panel=P_EVAL),
    device: str = typer.Option("auto", "--device", rich_help_panel=P_RUN, help="auto, cpu, cuda or cuda:N"),
    seed: int = typer.Option(0, "--seed", rich_help_panel=P_RUN),
    offload: bool = typer.Option(False, "--offload", rich_help_panel=P_RUN,
                                 help="stream the model one block at a time from its files (GPTQ: needs --calib "
                                      "text); automatic when it does not fit the device"),
    gpus: int = typer.Option(1, "--gpus", rich_help_panel=P_RUN,
                             help="uniform: split each layer's solves over N processes (cuda:0..N-1; gloo ranks "
                                  "with --device cpu); the checkpoint is the single process's"),
    progress: bool = typer.Option(True, "--progress/--no-progress", rich_help_panel=P_RUN,
                                  help="progress: a bar on a terminal, log lines with ETA elsewhere"),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", rich_help_panel=P_RUN),
):
    """Quantize a model to a compressed-tensors checkpoint: uniform bits, or the SLQ per-unit search."""

    def go():
        b = _parse_bits(bits)
        if target is not None and target not in ("dl", "tl"):
            raise SlqError(f"--target must be dl or tl, got {target!r}")
        modes = [f for f, v in (("--bits", b), ("--budget", budget), ("--target", target)) if v is not None]
        if len(modes) > 1:
            raise SlqError(f"give one of --bits, --budget and --target, not {' and '.join(modes)}")
        if budget is not None and not (math.isfinite(budget) and budget > 0):
            raise SlqError(f"--budget must be a finite positive number of bits per parameter, got {budget}")
        budget_bits = budget if budget is not None else b
        is_search = target is not None or budget is not None or (b is not None and not float(b).is_integer())
        given = [n for n in (SEARCH_ONLY if not is_search else UNIFORM_ONLY + ("fast",)) if _given(ctx, n)]
        if given:
            mode = (f"uniform mode (--bits {bits})" if bits is not None else "uniform mode (the default, 4 bits)") \
                if not is_search else "a search"
            what = "a search option" if not is_search else "an option of uniform runs"
            hint = ("; for a search give a fractional --bits, --budget B or --target" if not is_search else "")
            raise SlqError(f"{_flag(ctx, given[0])} is {what} and would be ignored in {mode}{hint}")
        if is_search and gpus != 1:
            raise SlqError("--gpus: the search does not split over ranks yet; give --gpus 1")
        fast_kw = {k: v for k, v in FAST.items() if fast and not _given(ctx, k)}
        m = fast_kw.get("method", method)
        dev = _device(device)
        # uniform: --bits (default 4); the search chooses bits per unit, so its QuantConfig keeps the default
        qc = QuantConfig(**({} if is_search or b is None else {"bits": int(b)}), group_size=_group(group_size),
                         symmetric=sym, method=m, calib=calib,
                         calib_samples=fast_kw.get("calib_samples", calib_samples),
                         seq_len=fast_kw.get("seq_len", seq_len), clip=not no_clip, attention=not plain_hessians,
                         act_order=act_order, damp=damp, device=dev, seed=seed, head_bits=head_bits,
                         offload=offload)
        sc = None if not is_search else SearchConfig(
            quant=qc, target=target or "bits", ear=ear, recovery=recovery, bits=budget_bits,
            tasks=[t.strip() for t in tasks.split(",") if t.strip()] if tasks else None, task_limit=task_limit,
            bitwidths=_int_list(bitwidths, "--bitwidths"), units=units, estimator=estimator,
            sens_windows=sens_windows, sens_seq_len=sens_seq_len, verify_windows=verify_windows,
            confirm_windows=confirm_windows,
            probe_bits=None if probe_bits is None else _int_list(probe_bits, "--probe-bits"), orderings=orderings,
            max_rounds=max_rounds, baselines=_int_list(baselines, "--baselines") if baselines else None,
            workdir=workdir, groups=None if groups is None else _groups(groups), head=head,
            verify_data=verify_data, real_text_margin=real_text_margin, runtime=runtime)
        if push_to_hub is not None:
            if not card:
                raise SlqError("--push-to-hub publishes the model card with the checkpoint: drop --no-card")
            api.check_hub_repo(push_to_hub)
        # output paths are checked before any work: a bad one costs seconds, not a quantization
        check_out_dir(out, _model(model), force=force,
                      need=checkpoint_bytes(_model(model), 4 if budget_bits is None else budget_bits))
        if is_search and workdir is not None:
            check_writable_dir(workdir, "--workdir",
                               bank_bytes(_model(model), _int_list(bitwidths, "--bitwidths"), workdir))
        if sc is None:
            rep = api.quantize(_model(model), config=qc, out=out, force=force, progress=progress,
                               trust_remote_code=trust_remote_code, eval=do_eval, eval_data=eval_data,
                               eval_tokens=eval_tokens, gpus=gpus)
        else:
            rep = search(_model(model), config=sc, out=out, force=force, plots=True, progress=progress,
                         trust_remote_code=trust_remote_code)
        if card:
            api.card(out, base_model=base_model)
        return rep

    report = _run(go, flags={"bits": "--budget"} if budget is not None else None)
    if report.get("allocation") is not None:
        print_search(report)
    elif report.get("fidelity"):
        print_fidelity(report["fidelity"])
    console.print(f"wrote [bold]{out}[/]: {report['bits_per_param']:.3f} bits/param over quantized linears, "
                  f"{report['bits_per_param_model']:.3f} over the whole model, "
                  f"{report['timings']['total_s']:.1f} s", highlight=False)
    if push_to_hub is not None:
        url = _run(api.card, out, base_model=base_model, push_to_hub=push_to_hub)
        console.print(f"pushed {out} to {url}", highlight=False)


def print_search(report: dict) -> None:
    t = report["target"]
    m, p = report["measured"], report["predicted"]
    tb = Table(title=f"SLQ search ({t['kind']}, estimator {report['sensitivity']['estimator']}): "
                     f"{'verified' if report['verified'] else 'NOT verified'}")
    for c in ("#", "KL budget", "pred. KL", "pred. EAR", "bits/p", "EAR [95% CI] held-out", "KL", "accepted"):
        tb.add_column(c, justify="right", no_wrap=True)
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
         summary: bool = typer.Option(False, "--summary", help="one row per (bits, group, sym) instead of per layer"),
         no_verify: bool = typer.Option(False, "--no-verify",
                                        help="skip the tensor checks (keys, dtypes, shapes, finite scales)")):
    """Show a checkpoint's plan: layer, bits, group, sym, gamma; and bits per parameter (after checking its tensors)."""
    run = api.info

    report = _run(run, path, verify=not no_verify)
    if as_json:
        console.print_json(json.dumps(report))
        return
    if summary:
        print_plan_summary(report)
    else:
        print_plan(report, path)
    console.print(f"bits/param: {report['bits_per_param']:.4f} (quantized linears, scales and zeros included), "
                  f"{report['bits_per_param_model']:.4f} (whole model, other tensors at stored precision)")
    if report.get("allocation") is not None:
        print_search(report)
    if report.get("fidelity"):
        print_fidelity(report["fidelity"])


def print_plan_summary(report: dict) -> None:
    """One row per (bits, group, sym): layers, parameters, their share, bits/param (parameter-weighted)."""
    rows: dict = {}
    total = 0
    for lp in report["plan"].values():
        s = lp["spec"]
        n = lp["N"] * lp["K"]
        key = (s["bits"], -1 if s["group_size"] is None else s["group_size"], s["symmetric"])
        r = rows.setdefault(key, [0, 0, 0.0])
        r[0], r[1], r[2] = r[0] + 1, r[1] + n, r[2] + n * lp["bits_per_param"]
        total += n
    t = Table(title=f"plan summary (model: {report.get('model')})")
    for col in ("bits", "group", "sym", "layers", "parameters", "share", "bits/param"):
        t.add_column(col, justify="right")
    for (b, g, sym), (k, n, bp) in sorted(rows.items()):
        t.add_row(str(b), "channel" if g == -1 else str(g), "yes" if sym else "no", str(k), f"{n:,}",
                  f"{n / max(total, 1):.1%}", f"{bp / max(n, 1):.3f}")
    t.add_section()
    t.add_row("all", "", "", str(sum(r[0] for r in rows.values())), f"{total:,}", "100.0%",
              f"{report['bits_per_param']:.3f}")
    console.print(t)


def print_plan(report: dict, path) -> None:
    t = Table(title=f"{path}  (model: {report.get('model')})")
    for col in ("layer", "bits", "group", "sym", "gamma", "gamma^2", "bits/param", "note"):
        # numbers keep their width; the note folds into the room that is left (100 columns off a terminal)
        t.add_column(col, justify="left" if col in ("layer", "note") else "right", no_wrap=col != "note",
                     min_width=None if col == "note" else len(col), overflow="fold" if col == "note" else "ellipsis")
    for name, lp in report["plan"].items():
        s = lp["spec"]
        g = "channel" if s["group_size"] is None else str(s["group_size"])
        note = "" if lp["group_note"] == "as requested" else lp["group_note"]
        t.add_row(name, str(s["bits"]), g, "yes" if s["symmetric"] else "no", _fmt(lp.get("gamma_mean")),
                  _fmt(lp.get("gamma2_mean")), f"{lp['bits_per_param']:.3f}", note)
    console.print(t)


@app.command("eval")
def eval_(
    reference: str = typer.Argument(..., help="reference: HF dir, .gguf, hub id, or 'default' (the embedded model)"),
    candidate: str = typer.Argument(..., help="candidate: an slq checkpoint (or any model source, or 'default')"),
    data: str = typer.Option("generated", "--data", help="text file, .jsonl, HF dataset id, or 'generated'"),
    tokens: int = typer.Option(16 * 512, "--tokens", help="tokens to compare (tokens // seq-len windows)"),
    seq_len: int = typer.Option(512, "--seq-len"),
    ear: float = typer.Option(0.99, "--ear", help="target EAR: the verdict line says pass, fail or undetermined"),
    on_policy: int = typer.Option(0, "--on-policy", help="continuations sampled from the reference and scored"),
    tasks: Optional[str] = typer.Option(None, "--tasks", rich_help_panel="Tasks",
                                        help="comma list: piqa,arc_easy,arc_challenge,boolq,winogrande,hellaswag,"
                                             "lambada"),
    limit: Optional[int] = typer.Option(None, "--limit", rich_help_panel="Tasks", help="first K items of each task"),
    tasks_backend: str = typer.Option("builtin", "--tasks-backend", rich_help_panel="Tasks",
                                      help="builtin (offline) or lm-eval (needs lm-evaluation-harness)"),
    temperature: float = typer.Option(1.0, "--temperature"),
    batch_size: int = typer.Option(8, "--batch-size"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="write the numbers and their provenance here"),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N"),
    seed: int = typer.Option(0, "--seed"),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="progress bar / log lines"),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code"),
):
    """Measure how lossless CANDIDATE is against REFERENCE: EAR, KL, top-1, PPL, tasks."""
    evaluate = api.evaluate

    def go():
        if not 0 < ear < 1:
            raise SlqError(f"--ear must be in (0, 1), got {ear}")
        if json_out is not None:
            check_writable_file(json_out, "--json")
        names = [t.strip() for t in tasks.split(",") if t.strip()] if tasks else None
        return evaluate(_model(reference), _model(candidate), data=data, tokens=tokens, seq_len=seq_len,
                        on_policy=on_policy, tasks=names, limit=limit, temperature=temperature,
                        batch_size=batch_size, device=_device(device), seed=seed, progress=progress,
                        trust_remote_code=trust_remote_code, tasks_backend=tasks_backend)

    fid = _run(go)
    d = fid.to_dict()
    print_fidelity(d)
    warning = few_sequences_warning(d["n_sequences"])
    if warning:
        err.print(f"[bold yellow]warning:[/] {warning}", highlight=False)
    lo, hi = d["ear"]["ci95"]
    verdict = ear_verdict((lo, hi), ear)
    console.print(f"verdict: {verdict.upper()} against EAR >= {ear:g} (95% interval [{lo:.5f}, {hi:.5f}]"
                  + (", more tokens needed)" if verdict == "undetermined" else ")"), highlight=False)
    if json_out is not None:
        d["verdict"] = {"ear_target": ear, "ear": verdict, "warning": warning}
        d["provenance"] = provenance(_model(reference), _model(candidate), data=data, seq_len=seq_len,
                                     tokens=tokens, n_sequences=d["n_sequences"], n_tokens=d["n_tokens"],
                                     device=_device(device), seed=seed, tasks_backend=tasks_backend if tasks else None)
        _run(write_json, json_out, d)
        console.print(f"wrote {json_out}", highlight=False)


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
        tt = Table(title="zero-shot, paired (candidate - reference)", show_edge=False)
        for c in ("task", "n", "ref", "cand", "delta", "95% CI", "p", "verdict"):
            tt.add_column(c, justify="left" if c in ("task", "verdict") else "right", no_wrap=True)
        for name, r in d["tasks"].items():
            verdict = r.get("verdict") or ("lossless" if r["lossless"] else "not lossless")
            tt.add_row(name, str(r.get("n", "")), f"{r['acc_reference']:.4f}",
                       f"{r['acc_candidate']:.4f}", f"{r['delta']:+.4f}", f"[{r['ci95'][0]:+.4f}, {r['ci95'][1]:+.4f}]",
                       f"{r['p_value']:.3g}", verdict)
        console.print(tt)
        other = {n: r.get("metric") for n, r in d["tasks"].items() if r.get("metric") not in ("acc", "mean", None)}
        console.print("accuracy: acc" + "".join(f"; {n}: {m}" for n, m in other.items()) + "; p: exact McNemar",
                      highlight=False)
        console.print("verdict: lossless / not lossless (interval excludes 0) / undetermined (interval wider "
                      "than the tolerance on both sides of 0, or a change beyond it that is not significant)",
                      highlight=False)


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def _draft_k(value: str):
    if value == "auto":
        return "auto"
    try:
        kk = int(value)
    except ValueError:
        kk = 0
    if kk < 1:
        raise SlqError(f"--draft-k must be an integer >= 1 or 'auto', got {value!r}")
    return kk


@app.command()
def generate(source: Optional[str] = typer.Argument(None, help="checkpoint, HF dir, .gguf, hub id or 'default' "
                                                                "(omitted: the embedded model)"),
             prompt: str = typer.Option(..., "--prompt", "-p"),
             max_new_tokens: int = typer.Option(32, "--max-new-tokens", "-n"),
             temperature: float = typer.Option(0.0, "--temperature", "-t", help="0: greedy; > 0: sample"),
             top_p: float = typer.Option(1.0, "--top-p", help="sampling: nucleus mass in (0, 1]"),
             seed: int = typer.Option(0, "--seed", help="sampling seed"),
             chat_template: bool = typer.Option(True, "--chat-template/--no-chat-template",
                                                help="wrap the prompt in the tokenizer's chat template if it has one"),
             device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N"),
             backend: str = typer.Option("auto", "--backend", help="checkpoints: auto, reference, triton, humming"),
             hf: bool = typer.Option(False, "--hf", help="decode with transformers generate, not slq's engine"),
             draft: Optional[str] = typer.Option(None, "--draft", help="speculative decoding: a draft model or "
                                                 "checkpoint (same vocabulary) proposes, SOURCE verifies"),
             k: Optional[str] = typer.Option(None, "--draft-k", "-k", help="with --draft: proposals per round, "
                                             "or 'auto' (default 8)"),
             trust_remote_code: bool = typer.Option(False, "--trust-remote-code")):
    """Generate from a model or checkpoint: greedy through slq's static-cache engine (Llama family), or sampled;
    with --draft, speculative decoding (the same tokens as SOURCE alone would give, faster)."""
    run = api.generate

    def go():
        if k is not None and draft is None:
            raise SlqError("--draft-k is the draft's proposals per round: give --draft too")
        if draft is not None and hf:
            raise SlqError("--draft runs slq's decode engine: drop --hf")
        kk = 8 if k is None else _draft_k(k)
        return run(_model(source), prompt, max_new_tokens=max_new_tokens, device=_device(device),
                   trust_remote_code=trust_remote_code, backend=backend, engine=not hf,
                   note=lambda s: err.print(f"note: {s}", highlight=False, soft_wrap=True),
                   temperature=temperature, top_p=top_p, seed=seed, chat_template=chat_template, draft=draft, k=kk)

    text = _run(go)
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
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda"),
):
    """Decode speed: per-layer GEMV/GEMM, the linear stack, end-to-end tokens/s, beside FP16 and the roofline."""
    run = run_bench

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


@app.command()
def export(
    checkpoint: Path = typer.Argument(..., help="an slq checkpoint directory"),
    to: str = typer.Option("transformers", "--to", help="transformers (a copy), vllm or llama.cpp"),
    out: Path = typer.Option(..., "--out", "-o", help="the export's directory"),
    force: bool = typer.Option(False, "--force", help="replace --out if it exists"),
    allow_unsupported: bool = typer.Option(False, "--allow-unsupported",
                                           help="vllm: write it even when vLLM cannot load some layers today"),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code"),
):
    """Write a checkpoint for an engine: vLLM's compressed-tensors layout, or a llama.cpp tensor-type file."""
    path = _run(api.export, checkpoint, out, to=to, force=force, allow_unsupported=allow_unsupported,
                warn=lambda m: err.print(f"[bold yellow]warning:[/] {m}", highlight=False, soft_wrap=True),
                trust_remote_code=trust_remote_code)
    console.print(f"wrote {path} ({to})", highlight=False)
    if to == "llama.cpp":
        console.print(f"next: see {Path(path) / 'LLAMA_CPP.md'} (llama-quantize --tensor-type-file)", highlight=False)


@app.command("card")
def card_(
    checkpoint: Path = typer.Argument(..., help="an slq checkpoint directory (or an export of one)"),
    base_model: Optional[str] = typer.Option(None, "--base-model", help="hub id of the base model"),
    push_to_hub: Optional[str] = typer.Option(None, "--push-to-hub", help="then upload the checkpoint (owner/name)"),
    private: bool = typer.Option(False, "--private", help="with --push-to-hub: a private repo"),
):
    """Write the model card (README.md) from the checkpoint's measured report; optionally publish it."""
    where = _run(api.card, checkpoint, base_model=base_model, push_to_hub=push_to_hub, private=private)
    console.print(f"{'pushed' if push_to_hub else 'wrote'} {where}", highlight=False)


def main():  # pragma: no cover
    app()
