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
    do_eval: bool = typer.Option(False, "--eval", help="measure EAR/KL/PPL vs the reference right after quantizing"),
    eval_data: str = typer.Option("generated", "--eval-data", help="held-out text for --eval"),
    eval_tokens: int = typer.Option(8 * 512, "--eval-tokens"),
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
                   out=out, force=force, progress=sys.stderr.isatty(), trust_remote_code=trust_remote_code,
                   eval=do_eval, eval_data=eval_data, eval_tokens=eval_tokens)

    report = _run(go)
    if report.get("fidelity"):
        print_fidelity(report["fidelity"])
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
    from .evaluate import evaluate

    def go():
        names = [t.strip() for t in tasks.split(",") if t.strip()] if tasks else None
        return evaluate(None if reference == "default" else reference, None if candidate == "default" else candidate,
                        data=data, tokens=tokens, seq_len=seq_len, on_policy=on_policy, tasks=names, limit=limit,
                        temperature=temperature, batch_size=batch_size, device=device, seed=seed,
                        progress=sys.stderr.isatty(), trust_remote_code=trust_remote_code)

    fid = _run(go)
    d = fid.to_dict()
    print_fidelity(d)
    if json_out is not None:
        from .report import write_json

        write_json(json_out, d)
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


def main():  # pragma: no cover
    app()
