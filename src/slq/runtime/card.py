"""The model card of a checkpoint (``README.md`` with YAML front matter), and publishing to the hub.

The card states what was measured, never more: every number in it is read from the checkpoint's
``slq_report.json`` and printed at a fixed precision (EAR 5 decimals, KL 4 significant digits,
top-1 and perplexity ratio and task accuracies 4 decimals, bits per parameter 3 decimals):

- bits per parameter over the quantized (allocated) linears, scales and zero points included, and
  over the whole model;
- fidelity against the unquantized reference on held-out tokens: EAR (expected acceptance rate of
  the reference's tokens, the fraction a speculative decoder with the reference as target would keep)
  with its 95% interval, KL(reference || quantized) per token, top-1 agreement and the perplexity
  ratio. A search report gives the verification of its final allocation (``measured``); a uniform
  run gives its ``fidelity`` (``slq quantize --eval``). A report with neither says so.
- task accuracy deltas (quantized - reference) with their paired-bootstrap 95% intervals and the
  report's own verdict, when tasks were run (the final search round's, or ``fidelity.tasks``).

The front matter carries what the hub indexes: ``base_model`` (when it is known: given, or found as
a hub id in the report's model path or the config), ``base_model_relation: quantized``,
``library_name: transformers``, ``pipeline_tag``, ``tags`` and a ``quantization`` block (method,
format, layout, bitwidths, bits per parameter, target and verdict).

Load snippets are printed only where they are true: transformers and ``slq.load`` read slq's layout
(or a layout without zero points, where the two coincide); ``vllm serve`` is printed when
:func:`slq.runtime.export.vllm_check` passes and the directory is the vLLM export (or has no zero
points); otherwise the card says what to do instead.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..quant.spec import QuantSpec
from ..util.atomic import atomic_file
from ..util.errors import SlqError
from .checkpoint import read_report, read_specs
from .export import VllmCheck, export_format, layer_of, read_config, linear_shapes, vllm_check

CARD = "README.md"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def hub_id(text: str | None) -> str | None:
    """A hub model id found in ``text``: ``org/name`` itself, or a hub cache path ``.../models--org--name/...``."""
    if not text:
        return None
    m = re.search(r"models--([^/\\]+?)--([^/\\]+)", text)
    if m:
        return f"{m.group(1)}/{m.group(2)}"
    if _HUB_ID.match(text) and not Path(text).exists():
        return text
    return None


def fidelity_numbers(report: dict) -> dict | None:
    """The fidelity the card shows: ``{source, n_tokens, ear, kl, top1, ppl_ratio}``, each metric
    ``{"mean", "ci95"}`` (``ci95`` None where the report has no interval)."""
    m = report.get("measured")
    if m:
        return {"source": "verification of the final allocation on held-out windows", "n_tokens": m.get("n_tokens"),
                "ear": {"mean": m["ear"]["mean"], "ci95": m["ear"].get("ci95")},
                "kl": {"mean": m["kl"]["mean"], "ci95": m["kl"].get("ci95")},
                "top1": {"mean": m.get("top1"), "ci95": m.get("top1_ci95")},
                "ppl_ratio": {"mean": m.get("ppl_ratio"), "ci95": None}}
    f = report.get("fidelity")
    if f:
        return {"source": "held-out evaluation after quantization", "n_tokens": f.get("n_tokens"),
                "ear": {"mean": f["ear"]["mean"], "ci95": f["ear"].get("ci95")},
                "kl": {"mean": f["kl"]["mean"], "ci95": f["kl"].get("ci95")},
                "top1": {"mean": f.get("top1"), "ci95": f.get("top1_ci95")},
                "ppl_ratio": {"mean": (f.get("ppl") or {}).get("ratio"), "ci95": None}}
    return None


def task_numbers(report: dict) -> dict | None:
    """Per-task comparison (``compare_tasks``' dict) of the final allocation, or None."""
    alloc = report.get("allocation")
    rounds = report.get("rounds") or []
    final = next((r for r in rounds if alloc is not None and r.get("allocation") == alloc), None)
    if final is None and rounds:
        final = rounds[-1]
    if final and final.get("tasks"):
        return final["tasks"]
    return (report.get("fidelity") or {}).get("tasks") or None


def _f(x, fmt: str) -> str:
    return "–" if x is None else format(x, fmt)


def _interval(ci, fmt: str) -> str:
    return "–" if not ci or ci[0] is None else f"[{format(ci[0], fmt)}, {format(ci[1], fmt)}]"


def _front_matter(report: dict, specs: dict[str, QuantSpec], base_model: str | None, layout: str,
                  kept: list[str]) -> str:
    import yaml

    bits = sorted({s.bits for s in specs.values()})
    t = report.get("target") or {}
    quant = {
        "method": "slq",
        "format": "compressed-tensors pack-quantized",
        "layout": layout,
        "bitwidths": bits + ([16] if kept else []),
        "group_sizes": [g or "channel" for g in sorted({s.group_size for s in specs.values()},
                                                       key=lambda g: g or 1 << 30)],
        "symmetric": sorted({s.symmetric for s in specs.values()}),
        "bits_per_param": report.get("bits_per_param"),
        "bits_per_param_model": report.get("bits_per_param_model"),
        "modules_quantized": len(specs),
        "linears_kept_16bit": len(kept),
    }
    if t:
        quant["target"] = {k: v for k, v in t.items() if v is not None}
        quant["verified"] = bool(report.get("verified"))
    tags = ["slq", "compressed-tensors", "quantized"] + [f"int{b}" for b in bits]
    if len(bits) + bool(kept) > 1:
        tags.append("mixed-precision")
    meta = {}
    if base_model:
        meta["base_model"] = base_model
        meta["base_model_relation"] = "quantized"
    meta.update({"library_name": "transformers", "pipeline_tag": "text-generation", "tags": tags,
                 "quantization": quant})
    return "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---\n"


def card_markdown(report: dict, config: dict, *, shapes: dict[str, tuple[int, int]] | None = None,
                  base_model: str | None = None, repo: str | None = None, layout: str = "transformers",
                  vllm: VllmCheck | None = None) -> str:
    """The card's text (module docstring). ``shapes``: every linear -> (N, K), for the kept-16-bit count;
    ``repo``: the hub id used in the snippets (a placeholder when None)."""
    specs = read_specs(config)
    shapes = shapes or {}
    kept = sorted(n for n in shapes if n not in specs and layer_of(n) is not None)
    base = base_model or hub_id(str(report.get("model", ""))) or hub_id(config.get("_name_or_path"))
    where = repo or "PATH_OR_REPO"
    asym = any(not s.symmetric for s in specs.values())
    lines = [_front_matter(report, specs, base, layout, kept)]
    title = f"{base} quantized with slq" if base else "slq-quantized model"
    lines += [f"# {title}", ""]
    bits = sorted({s.bits for s in specs.values()})
    lines.append(f"Weights of the decoder linears quantized to {', '.join(map(str, bits))} bits"
                 + (f", {len(kept)} linears kept in 16-bit" if kept else "")
                 + " (compressed-tensors `pack-quantized`).")
    if base is None and report.get("model"):
        lines.append(f"Base model: local `{Path(str(report['model'])).name}`.")
    lines += ["", "## Size", "", "| measure | bits/param |", "|---|---:|",
              f"| quantized linears (scales and zero points included) | {_f(report.get('bits_per_param'), '.3f')} |",
              f"| whole model | {_f(report.get('bits_per_param_model'), '.3f')} |", ""]
    fid = fidelity_numbers(report)
    lines += ["## Measured fidelity", ""]
    if fid is None:
        lines += ["Not measured: the report holds no evaluation (run `slq quantize --eval` or `slq eval`).", ""]
    else:
        t = report.get("target") or {}
        if t.get("kind") == "dl" and t.get("ear") is not None:
            verdict = "passed" if report.get("verified") else "NOT passed"
            lines += [f"Target: EAR lower bound >= {t['ear']} — {verdict}.", ""]
        n = fid["n_tokens"]
        lines += [f"Against the unquantized reference, {fid['source']}" + (f" ({n:,} tokens)." if n else "."), "",
                  "| metric | value | 95% interval |", "|---|---:|---|",
                  f"| EAR | {_f(fid['ear']['mean'], '.5f')} | {_interval(fid['ear']['ci95'], '.5f')} |",
                  f"| KL(reference ‖ quantized) per token | {_f(fid['kl']['mean'], '.4g')} | "
                  f"{_interval(fid['kl']['ci95'], '.4g')} |",
                  f"| top-1 agreement | {_f(fid['top1']['mean'], '.4f')} | {_interval(fid['top1']['ci95'], '.4f')} |",
                  f"| perplexity ratio | {_f(fid['ppl_ratio']['mean'], '.4f')} | – |", "",
                  "EAR is the expected fraction of the reference's sampled tokens a speculative decoder with the "
                  "reference as target would accept from this model; 1 means the same distribution.", ""]
    tasks = task_numbers(report)
    if tasks:
        lines += ["## Tasks", "", "| task | items | reference | quantized | delta | 95% interval | lossless |",
                  "|---|---:|---:|---:|---:|---|---|"]
        for name, r in tasks.items():
            verdict = r.get("verdict") or {True: "yes", False: "no"}.get(r.get("lossless"), "–")
            lines.append(f"| {name} | {r.get('n', '–')} | {_f(r.get('acc_reference'), '.4f')} | "
                         f"{_f(r.get('acc_candidate'), '.4f')} | {_f(r.get('delta'), '+.4f')} | "
                         f"{_interval(r.get('ci95'), '+.4f')} | {verdict} |")
        lines.append("")
    lines += ["## Use", ""]
    slq_layout = layout == "transformers" or not asym
    if slq_layout:
        lines += ["transformers (with `compressed-tensors` installed):", "", "```python",
                  "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                  f'model = AutoModelForCausalLM.from_pretrained("{where}")',
                  f'tokenizer = AutoTokenizer.from_pretrained("{where}")', "```", "",
                  "slq (its own kernels):", "", "```python", "import slq"]
        if repo:
            lines += ["from huggingface_hub import snapshot_download", "",
                      f'model = slq.load(snapshot_download("{repo}"))']
        else:
            lines += ["", f'model = slq.load("{where}")']
        lines += ["```", ""]
    else:
        lines += ["This is the vLLM layout (canonical packed zero points), which transformers and `slq.load` do "
                  "not read today; use the slq checkpoint it was exported from for them.", ""]
    if vllm is not None and vllm.loads and (layout == "vllm" or not asym):
        lines += ["vLLM:", "", "```", f"vllm serve {where}", "```", ""]
    elif vllm is not None and vllm.loads:
        lines += ["vLLM: export the vLLM layout first (`slq export CKPT --to vllm`), then `vllm serve` it.", ""]
    elif vllm is not None:
        lines += [f"vLLM cannot load this allocation today: {vllm.summary()}.", ""]
    lines += ["Made with slq: every number above is read from `slq_report.json` in this repository.", ""]
    return "\n".join(lines)


def write_card(ckpt_dir: str | os.PathLike, *, base_model: str | None = None, repo: str | None = None,
               trust_remote_code: bool = False) -> Path:
    """Write ``README.md`` (0644, atomic) into a checkpoint from its report and config; returns its path."""
    ckpt = Path(ckpt_dir)
    config = read_config(ckpt)
    report = read_report(ckpt)
    if not report:
        raise SlqError(f"{ckpt} has no slq_report.json: the card has nothing measured to state")
    specs = read_specs(config)
    shapes = linear_shapes(ckpt, trust_remote_code=trust_remote_code)
    text = card_markdown(report, config, shapes=shapes, base_model=base_model, repo=repo,
                         layout=export_format(ckpt), vllm=vllm_check(specs, shapes))
    path = ckpt / CARD
    with atomic_file(path) as f:
        f.write(text)
    return path


def _offline() -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except ImportError:
        return False


def push_to_hub(ckpt_dir: str | os.PathLike, repo: str, *, private: bool = False, token: str | None = None,
                base_model: str | None = None) -> str:
    """Upload a checkpoint to the hub model repo ``repo`` (created if missing), writing its card first when
    it has none. Returns the repo URL; offline or on any hub error, one SlqError line."""
    ckpt = Path(ckpt_dir)
    if not _HUB_ID.match(repo or ""):
        raise SlqError(f"hub repo must be 'owner/name', got {repo!r}")
    if not (ckpt / "config.json").is_file():
        raise SlqError(f"{ckpt} is not a checkpoint: config.json is missing")
    if _offline():
        raise SlqError(f"cannot push {ckpt} to {repo}: offline (HF_HUB_OFFLINE is set)")
    if not (ckpt / CARD).is_file():
        write_card(ckpt, base_model=base_model, repo=repo)
    try:
        from huggingface_hub import HfApi

        api = HfApi(token=token)
        url = api.create_repo(repo, repo_type="model", private=private, exist_ok=True)
        api.upload_folder(folder_path=str(ckpt), repo_id=repo, repo_type="model",
                          commit_message="Upload slq checkpoint")
    except Exception as e:  # network, auth, permissions: one line for the user, the cause chained
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise SlqError(f"cannot push {ckpt} to {repo}: {first}") from e
    return str(url)


__all__ = ["CARD", "card_markdown", "fidelity_numbers", "hub_id", "push_to_hub", "task_numbers", "write_card"]
