"""`slq eval` and `quantize --eval` end to end on stories260K."""

import json

import pytest
from typer.testing import CliRunner

from conftest import TINY_TEXT, need
from slq.cli import app

runner = CliRunner()
KEYS = ["n_tokens", "ear.mean", "ear.ci95", "kl.mean", "kl.p99", "top1", "ppl.reference", "ppl.candidate", "ppl.ratio"]


def _get(d, path):
    for k in path.split("."):
        d = d[k]
    return d


def test_eval_of_a_model_against_itself_is_exactly_lossless(stories_dir, tmp_path):
    out = tmp_path / "e.json"
    r = runner.invoke(app, ["eval", str(stories_dir), str(stories_dir), "--data", str(need(TINY_TEXT)),
                            "--tokens", "1024", "--seq-len", "128", "--json", str(out)])
    assert r.exit_code == 0, r.output
    d = json.loads(out.read_text())
    for k in KEYS:
        _get(d, k)
    assert d["n_tokens"] == 8 * 127
    assert d["ear"]["mean"] == 1.0 and d["ear"]["ci95"] == [1.0, 1.0]
    assert d["kl"]["mean"] == 0.0 and d["top1"] == 1.0 and d["ppl"]["ratio"] == 1.0


def test_quantize_eval_then_eval_agree(stories_dir, tmp_path):
    ck = tmp_path / "q"
    tiny = str(need(TINY_TEXT))
    r = runner.invoke(app, ["quantize", str(stories_dir), "--bits", "3", "--calib", tiny, "--calib-samples", "4",
                            "--seq-len", "128", "--eval", "--eval-data", tiny, "--eval-tokens", "1024", "--out", str(ck)])
    assert r.exit_code == 0, r.output
    rep = json.loads((ck / "slq_report.json").read_text())
    fid = rep["fidelity"]
    assert 0.3 < fid["ear"]["mean"] < 0.999
    lo, hi = fid["ear"]["ci95"]
    assert lo <= fid["ear"]["mean"] <= hi
    # the same held-out windows (after the 4 calibration windows), measured again from the written checkpoint
    out = tmp_path / "e.json"
    r = runner.invoke(app, ["eval", str(stories_dir), str(ck), "--data", tiny, "--tokens", str(12 * 128),
                            "--seq-len", "128", "--json", str(out), "--on-policy", "2", "--tasks", "piqa", "--limit", "6"])
    assert r.exit_code == 0, r.output
    d = json.loads(out.read_text())
    assert d["ppl"]["candidate"] > d["ppl"]["reference"]
    assert 0.3 < d["on_policy"]["ear"]["mean"] < 1.0
    t = d["tasks"]["piqa"]
    assert {"acc_reference", "acc_candidate", "delta", "ci95", "p_value", "lossless"} <= set(t)
    assert t["delta"] == pytest.approx(t["acc_candidate"] - t["acc_reference"])


def test_eval_rejects_mismatched_tokenizers_and_bad_input(stories_dir, tmp_path):
    r = runner.invoke(app, ["eval", str(stories_dir), str(tmp_path / "nope")])
    assert r.exit_code == 1 and "no such file or directory" in r.output
    r = runner.invoke(app, ["eval", str(stories_dir), str(stories_dir), "--tokens", "10", "--seq-len", "128",
                            "--data", str(need(TINY_TEXT))])
    assert r.exit_code == 1 and "less than one window" in r.output
