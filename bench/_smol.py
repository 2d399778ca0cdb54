"""Shared by the SmolLM2 side-by-side experiments (act_order.py, fisher_hessians.py, cd_refine.py): the fp32
reference, its C4 calibration windows, the held-out WikiText-2 windows with the reference's logits cached, and
one measurement of a candidate against them."""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SLQ_SHARED", REPO.parent / "shared"))
sys.path.insert(0, str(REPO / "src"))


def setup(n_calib: int, n_windows: int):
    """(reference, tokenizer, calibration windows, WikiText-2 windows, cached reference logits)."""
    import torch

    from slq.measure.data import windows_from_source
    from slq.measure.fidelity import CachedLogits
    from slq.models.sources import embedded_default_dir, load_model

    torch.manual_seed(0)
    ref, tok = load_model(embedded_default_dir())
    calib = windows_from_source(str(SHARED / "data/calib/c4.utf8"), ref, tok, n=n_calib, seq_len=512)
    wiki = windows_from_source(str(SHARED / "data/wikitext2/wiki.test.raw"), ref, tok, n=n_windows, seq_len=512)
    return ref, tok, calib, wiki, CachedLogits().record(ref, wiki)


def measure(cache, model, wiki) -> dict:
    """KL, EAR with its 95% interval and top-1 agreement of ``model`` against the cached reference."""
    from slq.measure.fidelity import compare_windows

    d = compare_windows(cache, model, wiki, progress=False).to_dict()
    return {"kl": d["kl"]["mean"], "ear": d["ear"]["mean"], "ear_ci95": d["ear"]["ci95"], "top1": d["top1"]}


def save(out, benchmark: str, settings: dict, rows: list[dict]) -> None:
    """Write the experiment's JSON (device, versions, git commit, settings, rows), each row with its KL
    relative to the first row's."""
    import platform

    import torch

    from slq.util.provenance import git_commit, versions
    from slq.util.jsonio import write_json

    for r in rows:
        r["kl_ratio"] = r["kl"] / rows[0]["kl"]
    write_json(out, {
        "benchmark": benchmark, "model": "SmolLM2-135M-Instruct (embedded, fp32)",
        "device": f"cpu: {platform.machine()}, {torch.get_num_threads()} threads",
        "versions": versions(), "git_commit": git_commit(REPO), "settings": settings, "rows": rows})
