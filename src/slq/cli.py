"""The `slq` command line (typer + rich). Each verb calls one public function."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from .errors import SlqError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Statistically-lossless quantization of Hugging Face causal LLMs.")
console = Console(width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True)


def _quiet_transformers() -> None:
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:  # pragma: no cover
        pass


def _run(fn, *a, **k):
    """Call fn; bad input becomes one line on stderr and exit code 1."""
    _quiet_transformers()
    try:
        return fn(*a, **k)
    except SlqError as e:
        err.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        raise typer.Exit(1)
    except KeyboardInterrupt:
        err.print("[bold red]interrupted[/]")
        raise typer.Exit(130)


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


@app.command()
def quantize(
    model: Optional[str] = typer.Argument(None, help="HF directory, .gguf file or hub id; default: embedded SmolLM2-135M-Instruct"),
    bits: int = typer.Option(4, "--bits", "-b", help="bits per weight, 2..8"),
    group_size: str = typer.Option("128", "--group-size", "-g", help="16/32/64/128/256 or 'channel'"),
    sym: bool = typer.Option(False, "--sym", help="symmetric grid (default: asymmetric, integer zero point)"),
    method: str = typer.Option("gptq", "--method", help="rtn or gptq"),
    calib: Optional[str] = typer.Option(None, "--calib", help="text file, .jsonl, HF dataset id, or 'generated' (default)"),
    calib_samples: int = typer.Option(128, "--calib-samples", help="number of calibration windows"),
    seq_len: int = typer.Option(512, "--seq-len", help="tokens per calibration window"),
    no_clip: bool = typer.Option(False, "--no-clip", help="disable the MSE-optimal clipping search"),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda"),
    seed: int = typer.Option(0, "--seed"),
    out: Path = typer.Option(..., "--out", "-o", help="output checkpoint directory"),
    force: bool = typer.Option(False, "--force", help="replace --out if it exists"),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code"),
):
    """Quantize a model to a compressed-tensors checkpoint."""
    from .api import quantize as run

    def go():
        if device not in ("cpu", "cuda"):
            raise SlqError(f"--device must be cpu or cuda, got {device!r}")
        if calib_samples < 1 or seq_len < 2:
            raise SlqError("--calib-samples must be >= 1 and --seq-len >= 2")
        return run(model, bits=bits, group_size=_group(group_size), symmetric=sym, method=method, calib=calib,
                   calib_samples=calib_samples, seq_len=seq_len, clip=not no_clip, device=device, seed=seed,
                   out=out, force=force, progress=sys.stderr.isatty(), trust_remote_code=trust_remote_code)

    report = _run(go)
    console.print(f"wrote [bold]{out}[/]: {report['bits_per_param']:.3f} bits/param over quantized linears, "
                  f"{report['bits_per_param_model']:.3f} over the whole model, "
                  f"{report['timings']['total_s']:.1f} s")


@app.command()
def info(path: Path = typer.Argument(..., help="an slq checkpoint directory"),
         as_json: bool = typer.Option(False, "--json", help="print the report as JSON")):
    """Show a checkpoint's plan: layer, bits, group, sym, gamma; and bits per parameter."""
    from .api import info as run

    report = _run(run, path)
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
    for k, v in (report.get("fidelity") or {}).items():
        console.print(f"{k}: {v}")


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.3f}"


@app.command()
def generate(source: Optional[str] = typer.Argument(None, help="checkpoint, HF dir, .gguf or hub id; default: embedded model"),
             prompt: str = typer.Option(..., "--prompt", "-p"),
             max_new_tokens: int = typer.Option(32, "--max-new-tokens", "-n"),
             device: str = typer.Option("cpu", "--device"),
             trust_remote_code: bool = typer.Option(False, "--trust-remote-code")):
    """Greedy generation from a model or checkpoint."""
    from .api import generate as run

    text = _run(run, source, prompt, max_new_tokens=max_new_tokens, device=device, trust_remote_code=trust_remote_code)
    print(prompt + text)


def main():  # pragma: no cover
    app()
