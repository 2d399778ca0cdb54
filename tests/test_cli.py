"""The command line end to end on stories260K, and its handling of bad input."""

import json
import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from slq.cli import app

from conftest import TINY_TEXT, need

runner = CliRunner()


def _slq(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_quantize_info_generate(stories_dir, tmp_path):
    out = tmp_path / "q"
    r = _slq("quantize", stories_dir, "--bits", "3", "--calib", need(TINY_TEXT), "--calib-samples", "4",
             "--seq-len", "64", "--out", out)
    assert r.exit_code == 0, r.output
    report = json.loads((out / "slq_report.json").read_text())
    assert report["model"] == str(stories_dir.resolve())
    assert report["settings"]["method"] == "gptq" and report["settings"]["bits"] == 3
    # independent accounting from the layer shapes: 3 bits + (fp16 scale + 3-bit zero) per group;
    # K=64 layers use g64 (128 does not divide 64), K=172 layers are per-channel
    from safetensors import safe_open

    with safe_open(str(stories_dir / "model.safetensors"), "pt") as f:
        shapes = [f.get_slice(k).get_shape() for k in f.keys() if ".layers." in k and k.endswith("proj.weight")]
    bits = sum(n * k * (3 + 19 / (64 if k % 64 == 0 else k)) for n, k in shapes)
    assert report["bits_per_param"] == pytest.approx(bits / sum(n * k for n, k in shapes), rel=1e-12)
    assert report["gamma"]["mean"] >= 1.0
    assert set(report["timings"]) >= {"load_s", "hessian_s", "solve_s", "total_s"}
    r = _slq("info", out)
    assert r.exit_code == 0 and "model.layers.0.mlp.down_proj" in r.output and "channel" in r.output
    r = _slq("generate", out, "--prompt", "Once upon a time", "-n", "8")
    assert r.exit_code == 0 and r.output.startswith("Once upon a time")


def _quantize3(stories_dir, out, calib_samples, *flags) -> dict:
    """3-bit GPTQ of stories260K on the tiny text through the CLI; returns the written report."""
    r = _slq("quantize", stories_dir, "--bits", "3", "--calib", need(TINY_TEXT), "--calib-samples", calib_samples,
             "--seq-len", "64", "--out", out, *flags)
    assert r.exit_code == 0, r.output
    return json.loads((out / "slq_report.json").read_text())


def test_plain_hessians_flag_changes_only_keys_and_values(stories_dir, tmp_path):
    """--plain-hessians is recorded, and against the default it changes the k/v codes and nothing else in
    layer 0 (later layers see different inputs through sequential GPTQ)."""
    from safetensors import safe_open

    codes = {}
    for flag in ([], ["--plain-hessians"]):
        out = tmp_path / ("plain" if flag else "aware")
        assert _quantize3(stories_dir, out, 4, *flag)["settings"]["attention_hessians"] is (not flag)
        with safe_open(str(out / "model.safetensors"), "pt") as f:
            codes[bool(flag)] = {k: f.get_tensor(k) for k in f.keys() if ".layers.0." in k and k.endswith("weight_packed")}
    assert codes[True]
    for k in codes[True]:
        same = bool((codes[True][k] == codes[False][k]).all())
        assert same != k.endswith(("k_proj.weight_packed", "v_proj.weight_packed")), k


def test_act_order_flag_is_recorded_and_lowers_the_output_error(stories_dir, tmp_path):
    """Act-order is GPTQ's default and --no-act-order turns it off (recorded in the report, different codes);
    summed over the model's linears at 3 bits, act-order gives no more layer-output error than plain GPTQ (the
    report's own metric). RTN runs without it by default, and asking for it with RTN is one error line."""
    errs = {}
    for flag in (["--no-act-order"], [], ["--act-order"]):
        rep = _quantize3(stories_dir, tmp_path / ("plain" if flag == ["--no-act-order"] else f"act{len(flag)}"), 8,
                         *flag)
        on = flag != ["--no-act-order"]
        assert rep["settings"]["act_order"] is on
        errs.setdefault(on, []).append(sum(lp["metrics"]["rel_output_error"] for lp in rep["plan"].values()))
    assert errs[True][0] == errs[True][1], errs  # the default is --act-order
    assert errs[True][0] != errs[False][0] and errs[True][0] <= errs[False][0] * 1.02, errs
    r = _slq("quantize", stories_dir, "--bits", "8", "--method", "rtn", "--out", tmp_path / "rtn")
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "rtn" / "slq_report.json").read_text())["settings"]["act_order"] is False
    r = _slq("quantize", stories_dir, "--bits", "8", "--method", "rtn", "--act-order", "--out", tmp_path / "bad")
    assert r.exit_code == 1 and "--act-order orders GPTQ's columns: it needs method 'gptq'" in r.output, r.output
    assert not (tmp_path / "bad").exists()


def test_damp_reaches_gptq(stories_dir, tmp_path):
    """--damp is recorded and changes GPTQ's codes (a heavy damping pulls GPTQ towards round-to-nearest); a damping
    outside (0, 1) is one error line and writes nothing."""
    from safetensors import safe_open

    codes = {}
    for d in ("0.01", "0.5"):
        out = tmp_path / f"d{d}"
        assert _quantize3(stories_dir, out, 4, "--damp", d)["settings"]["damp"] == float(d)
        with safe_open(str(out / "model.safetensors"), "pt") as f:
            codes[d] = {k: f.get_tensor(k) for k in f.keys() if k.endswith("weight_packed")}
    assert any(not bool((codes["0.01"][k] == codes["0.5"][k]).all()) for k in codes["0.01"])
    for mode in (["--bits", "4"], ["--target", "dl"]):  # the uniform path and the search
        r = _slq("quantize", stories_dir, *mode, "--damp", "0", "--out", tmp_path / "bad")
        assert r.exit_code == 1 and "--damp must be in (0, 1)" in r.output, r.output
        assert not (tmp_path / "bad").exists()


def test_rtn_needs_no_calibration(stories_dir, tmp_path):
    r = _slq("quantize", stories_dir, "--bits", "8", "--method", "rtn", "--sym", "--group-size", "channel",
             "--out", tmp_path / "r")
    assert r.exit_code == 0, r.output
    plan = json.loads((tmp_path / "r" / "slq_report.json").read_text())["plan"]
    assert all(lp["spec"]["group_size"] is None and lp["spec"]["symmetric"] for lp in plan.values())


@pytest.mark.parametrize(
    "args, message",
    [
        (["--bits", "9"], "bits must be an integer in 2..8"),
        (["--bits", "1"], "bits must be an integer in 2..8"),
        (["--group-size", "100"], "--group-size must be"),
        (["--method", "awq"], "--method must be one of rtn, gptq"),
        (["--calib", "/nonexistent/calib.txt"], "not found"),
        (["--device", "tpu"], "--device must be"),
    ],
)
def test_bad_arguments_one_line_nonzero_nothing_written(stories_dir, tmp_path, args, message):
    out = tmp_path / "o"
    r = _slq("quantize", stories_dir, *args, "--out", out)
    assert r.exit_code == 1
    assert message in r.output
    assert "Traceback" not in r.output
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_bad_models_and_sources(stories_dir, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    cases = [
        (["quantize", tmp_path / "missing-dir", "--out", tmp_path / "o"], "no such file or directory"),
        (["quantize", tmp_path, "--out", tmp_path / "o"], "holds no config.json"),
        (["quantize", "nobody/no-such-model-xyz", "--out", tmp_path / "o"], "could not fetch 'nobody/no-such-model-xyz'"),
        (["quantize", stories_dir, "--calib", empty, "--out", tmp_path / "o"], "is empty"),
        (["info", tmp_path], "not an slq checkpoint"),
    ]
    for args, message in cases:
        r = _slq(*args)
        assert r.exit_code == 1, (args, r.output)
        assert message in r.output, (args, r.output)
        assert not (tmp_path / "o").exists()


def test_unknown_architecture(tmp_path):
    d = tmp_path / "weird"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "not-a-real-arch"}))
    r = _slq("quantize", d, "--method", "rtn", "--out", tmp_path / "o")
    assert r.exit_code == 1 and "unsupported or unknown architecture" in r.output


def test_nan_weights_rejected(stories_dir, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    d = tmp_path / "nan"
    shutil.copytree(stories_dir, d)
    t = load_file(d / "model.safetensors")
    t["model.layers.2.mlp.up_proj.weight"][3, 4] = float("nan")
    save_file(t, str(d / "model.safetensors"), metadata={"format": "pt"})
    r = _slq("quantize", d, "--method", "rtn", "--out", tmp_path / "o")
    assert r.exit_code == 1 and "NaN or Inf" in r.output
    assert not (tmp_path / "o").exists()


def test_console_script_exit_code(tmp_path):
    """The installed entry point exits non-zero with one error line."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    p = subprocess.run([sys.executable, "-m", "slq", "info", str(tmp_path)], capture_output=True, text=True, env=env)
    assert p.returncode == 1
    assert p.stderr.strip().count("\n") == 0 and "error:" in p.stderr
