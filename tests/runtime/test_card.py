"""The model card states the report's numbers (parsed back from the card), with valid YAML front matter;
publishing offline fails with one line."""

from __future__ import annotations

import json
import re

import pytest
import yaml

import slq
from slq.runtime.card import hub_id, push_to_hub, write_card
from slq.runtime.export import export
from slq.util.errors import SlqError


def _parse(card: str) -> tuple[dict, dict[str, list[str]]]:
    """(front matter, first cell -> the other cells) of every table row of the card."""
    assert card.startswith("---\n")
    head, body = card[4:].split("\n---\n", 1)
    rows = {}
    for line in body.splitlines():
        if line.startswith("| ") and not line.startswith("|---"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0]] = cells[1:]
    return yaml.safe_load(head), rows


def _num(cell: str) -> float:
    return float(cell)


def _ci(cell: str) -> tuple[float, float]:
    a, b = re.fullmatch(r"\[(\S+), (\S+)\]", cell).groups()
    return float(a), float(b)


@pytest.fixture(scope="module")
def ckpt(stories_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("card") / "ck"
    slq.quantize(str(stories_dir), bits=4, group_size=32, method="rtn", eval=True, eval_tokens=1024, out=out,
                 progress=False)
    return out


def test_card_numbers_equal_the_report(ckpt):
    path = write_card(ckpt, base_model="karpathy/tinyllamas")
    assert path.stat().st_mode & 0o777 == 0o644
    report = json.loads((ckpt / "slq_report.json").read_text())
    meta, rows = _parse(path.read_text())
    f = report["fidelity"]
    assert meta["base_model"] == "karpathy/tinyllamas" and meta["base_model_relation"] == "quantized"
    assert meta["library_name"] == "transformers" and "slq" in meta["tags"] and "int4" in meta["tags"]
    q = meta["quantization"]
    assert q["bits_per_param"] == report["bits_per_param"] and q["bitwidths"] == [4]
    assert q["modules_quantized"] == len(report["plan"])
    assert _num(rows["quantized linears (scales and zero points included)"][0]) == pytest.approx(
        report["bits_per_param"], abs=5e-4)
    assert _num(rows["whole model"][0]) == pytest.approx(report["bits_per_param_model"], abs=5e-4)
    ear, ci = rows["EAR"]
    assert _num(ear) == pytest.approx(f["ear"]["mean"], abs=5e-6)
    assert _ci(ci) == pytest.approx(tuple(f["ear"]["ci95"]), abs=5e-6)
    kl, kci = rows["KL(reference ‖ quantized) per token"]
    assert _num(kl) == pytest.approx(f["kl"]["mean"], rel=5e-4)
    assert _ci(kci) == pytest.approx(tuple(f["kl"]["ci95"]), rel=5e-4)
    top1, tci = rows["top-1 agreement"]
    assert _num(top1) == pytest.approx(f["top1"], abs=5e-5)
    assert _ci(tci) == pytest.approx(tuple(f["top1_ci95"]), abs=5e-5)
    assert _num(rows["perplexity ratio"][0]) == pytest.approx(f["ppl"]["ratio"], abs=5e-5)
    text = path.read_text()
    assert "AutoModelForCausalLM.from_pretrained" in text and "slq.load(" in text
    # stories260K's shapes (K = 172, N = 172 at 4 bits) are not what vLLM's 4-bit path allocates: said, not hidden
    assert "vllm serve" not in text and "vLLM cannot load this allocation today" in text


def test_search_report_with_tasks(ckpt, tmp_path):
    """A search-shaped report: the final round's verification and task deltas are what the card shows."""
    import shutil

    ck = tmp_path / "s"
    shutil.copytree(ckpt, ck)
    report = json.loads((ck / "slq_report.json").read_text())
    alloc = {"u0": 4}
    meas = {"ear": {"mean": 0.991234, "ci95": [0.98811, 0.99402]}, "kl": {"mean": 0.0012345, "p99": 0.02},
            "top1": 0.95551, "ppl_ratio": 1.01234, "n_tokens": 4096}
    tasks = {"arc_easy": {"metric": "acc", "n": 200, "acc_reference": 0.655, "acc_candidate": 0.64, "delta": -0.015,
                          "ci95": [-0.04, 0.01], "lossless": False},
             "average": {"metric": "mean", "n": 200, "acc_reference": 0.655, "acc_candidate": 0.64,
                         "delta": -0.015, "ci95": [-0.04, 0.01], "lossless": False}}
    report.update({"target": {"kind": "dl", "ear": 0.99}, "verified": False, "allocation": alloc, "measured": meas,
                   "rounds": [{"round": 1, "allocation": {"u0": 3}, "measured": meas},
                              {"round": 2, "allocation": alloc, "measured": meas, "tasks": tasks}]})
    (ck / "slq_report.json").write_text(json.dumps(report))
    meta, rows = _parse(write_card(ck).read_text())
    assert meta["quantization"]["target"] == {"kind": "dl", "ear": 0.99} and meta["quantization"]["verified"] is False
    assert "base_model" not in meta  # a local path is no hub id
    assert _num(rows["EAR"][0]) == pytest.approx(0.99123, abs=1e-9)
    assert _ci(rows["EAR"][1]) == pytest.approx((0.98811, 0.99402), abs=1e-9)
    assert _num(rows["KL(reference ‖ quantized) per token"][0]) == pytest.approx(0.001234, rel=1e-9)
    assert rows["KL(reference ‖ quantized) per token"][1] == "–"  # no interval in the report: none invented
    n, ref, cand, delta, ci, verdict = rows["arc_easy"]
    assert (int(n), _num(ref), _num(cand), _num(delta), verdict) == (200, 0.655, 0.64, -0.015, "no")
    assert _ci(ci) == (-0.04, 0.01)


def test_vllm_snippet_only_where_vllm_loads(stories, tmp_path):
    """A symmetric 8-bit per-channel checkpoint loads in vLLM (K and N multiples of 4): the card says how."""
    from slq.quant.pipeline import quantize_model
    from slq.quant.spec import QuantSpec
    from slq.runtime.checkpoint import save_checkpoint

    model, tok = stories
    res = quantize_model(model, QuantSpec(8, None, True), method="rtn", progress=False)
    ck = save_checkpoint(tmp_path / "c", model, tok, res.qweights, {"plan": res.plan.to_dict(),
                                                                     "bits_per_param": res.plan.bits_per_param()})
    text = write_card(ck, repo="someone/stories-slq").read_text()
    assert "vllm serve someone/stories-slq" in text
    assert 'slq.load(snapshot_download("someone/stories-slq"))' in text
    out = export(ck, tmp_path / "v", to="vllm")
    assert "vllm serve" in write_card(out).read_text()


def test_hub_id_from_cache_path_and_name():
    assert hub_id("/root/.cache/huggingface/hub/models--HuggingFaceTB--SmolLM2-135M/snapshots/abc") == \
        "HuggingFaceTB/SmolLM2-135M"
    assert hub_id("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"
    assert hub_id("/work/shared/models/stories260K") is None


def test_push_offline_fails_with_one_line(ckpt, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SlqError) as e:
        push_to_hub(ckpt, "someone/stories-slq")
    assert "offline" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(SlqError, match="owner/name"):
        push_to_hub(ckpt, "not a repo")


def test_card_needs_a_report(ckpt, tmp_path):
    import shutil

    ck = tmp_path / "n"
    shutil.copytree(ckpt, ck)
    (ck / "slq_report.json").unlink()
    with pytest.raises(SlqError, match="no slq_report.json"):
        write_card(ck)
