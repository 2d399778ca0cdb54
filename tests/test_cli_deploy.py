"""The deployment commands end to end on stories260K (RTN, seconds): the model card written by quantize,
`slq export` for each engine, `slq card`, and --push-to-hub failing with one line when offline."""

import json
import os
import re
import stat

import pytest
from safetensors import safe_open
from typer.testing import CliRunner

from slq.cli import app

runner = CliRunner()


def _slq(*args, env=None):
    return runner.invoke(app, [str(a) for a in args], env=env)


@pytest.fixture(scope="module")
def ckpt(stories_dir, tmp_path_factory):
    """A 4-bit symmetric RTN checkpoint of stories260K written by the CLI under umask 022."""
    out = tmp_path_factory.mktemp("deploy") / "q4"
    old = os.umask(0o022)
    try:
        r = _slq("quantize", stories_dir, "--bits", "4", "--method", "rtn", "--sym", "--out", out)
    finally:
        os.umask(old)
    assert r.exit_code == 0, r.output
    return out


def _mode(p) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


def test_quantize_writes_the_card_and_0644_files(ckpt):
    card = (ckpt / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: transformers" in card
    report = json.loads((ckpt / "slq_report.json").read_text())
    assert f"{report['bits_per_param']:.3f}" in card  # the card's number is the report's
    for name in ("README.md", "slq_report.json", "config.json", "model.safetensors"):
        assert _mode(ckpt / name) == 0o644, name


def test_no_card_writes_none(stories_dir, tmp_path):
    r = _slq("quantize", stories_dir, "--bits", "8", "--method", "rtn", "--no-card", "--out", tmp_path / "q")
    assert r.exit_code == 0, r.output
    assert not (tmp_path / "q" / "README.md").exists()


def test_export_llama_cpp_type_file_covers_every_quantized_tensor(ckpt, tmp_path):
    out = tmp_path / "gguf"
    r = _slq("export", ckpt, "--to", "llama.cpp", "--out", out)
    assert r.exit_code == 0, r.output
    lines = (out / "tensor_types.txt").read_text().split()
    plan = json.loads((ckpt / "slq_report.json").read_text())["plan"]
    assert len(lines) == len(plan)
    names = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
             "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
    expect = {f"blk.{n.split('.')[2]}.{names[n.rsplit('.', 1)[1]]}.weight" for n in plan}
    got = set()
    for line in lines:
        pattern, typ = line.split("=")
        assert typ == "q4_K"  # 4 bits -> q4_K
        got |= {e for e in expect if re.search(pattern, e)}
        assert sum(bool(re.search(pattern, e)) for e in expect) == 1, pattern  # anchored: one tensor each
    assert got == expect


def test_export_vllm_ignores_the_head_and_keeps_the_weights(ckpt, tmp_path):
    out = tmp_path / "vllm"
    r = _slq("export", ckpt, "--to", "vllm", "--out", out)
    if r.exit_code != 0:  # stories260K's odd widths may break vLLM's rules: then one line, nothing written
        assert "vLLM cannot load" in r.output and "--allow-unsupported" in r.output, r.output
        assert not out.exists()
        r = _slq("export", ckpt, "--to", "vllm", "--out", out, "--allow-unsupported")
        assert r.exit_code == 0 and "warning:" in r.output, r.output
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert "lm_head" in qc["ignore"]
    with safe_open(str(ckpt / "model.safetensors"), "pt") as a, safe_open(str(out / "model.safetensors"), "pt") as b:
        k = next(k for k in a.keys() if k.endswith("weight_packed"))
        assert bool((a.get_tensor(k) == b.get_tensor(k)).all())


def test_export_bad_format_and_existing_out_are_one_line(ckpt, tmp_path):
    r = _slq("export", ckpt, "--to", "onnx", "--out", tmp_path / "x")
    assert r.exit_code == 1 and "unknown export format 'onnx'" in r.output and "Traceback" not in r.output
    (tmp_path / "exists").mkdir()
    r = _slq("export", ckpt, "--to", "transformers", "--out", tmp_path / "exists")
    assert r.exit_code == 1 and "--force" in r.output, r.output


def test_card_command_rewrites_the_card(ckpt, tmp_path):
    (ckpt / "README.md").unlink()
    r = _slq("card", ckpt, "--base-model", "someone/base-model")
    assert r.exit_code == 0, r.output
    assert "base_model: someone/base-model" in (ckpt / "README.md").read_text()


def test_push_to_hub_offline_is_one_line_before_any_work(stories_dir, ckpt, tmp_path):
    env = {"HF_HUB_OFFLINE": "1"}
    r = _slq("card", ckpt, "--push-to-hub", "someone/repo", env=env)
    assert r.exit_code == 1 and "offline" in r.output and r.output.count("\n") == 1, r.output
    out = tmp_path / "q"
    r = _slq("quantize", stories_dir, "--bits", "8", "--method", "rtn", "--out", out, "--push-to-hub",
             "someone/repo", env=env)
    assert r.exit_code == 1 and "offline" in r.output, r.output
    assert not out.exists()  # refused before quantizing
    r = _slq("quantize", stories_dir, "--bits", "8", "--method", "rtn", "--out", out, "--push-to-hub", "no-slash")
    assert r.exit_code == 1 and "owner/name" in r.output and not out.exists()
