"""`slq bench` end to end on CPU, its bad-input handling, and the measured-table backend chooser."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from slq.cli import app
from slq.runtime.backends.choose import choose, choose_backends, read_table

REPO = Path(__file__).resolve().parents[2]
runner = CliRunner()


def _slq(*args):
    return runner.invoke(app, [str(a) for a in args])


def _bpp(b, k, g=128):  # storage bits per weight, asymmetric: b + (fp16 scale + b-bit zero) / G
    return b + (16 + b) / (g if k % g == 0 else k)


# tiny: hidden 256, intermediate 768, 4 heads, 2 KV heads, head_dim 64 -> fused decode projections
TINY = {"qkv": (512, 256), "o": (256, 256), "gate_up": (1536, 256), "down": (256, 768)}


def test_bench_tiny_on_cpu_writes_every_row_beside_fp16(tmp_path):
    from slq.util.provenance import git_commit

    out = tmp_path / "bench.json"
    r = _slq("bench", "--shape", "tiny", "--bits", "4,8", "--batch", "1,2", "--json", out)
    assert r.exit_code == 0, r.output
    d = json.loads(out.read_text())
    assert d["device"]["type"] == "cpu" and d["device"]["cache_level"] == "LLC"
    assert d["git_commit"] == git_commit() and {"torch", "transformers", "slq"} <= set(d["versions"])
    assert d["settings"]["bits"] == [4, 8] and d["settings"]["batches"] == [1, 2] and d["settings"]["shape"] == "tiny"
    assert "memcpy" in d["bandwidth"]["method"] and d["bandwidth"]["GBps"] > 0
    assert {s["backend"]: "CUDA" in s["reason"] for s in d["skipped"]} == {"triton": True, "humming": True}
    assert d["errors"] == []
    peak = d["bandwidth"]["GBps"] * 1e9
    rows = d["rows"]
    fp16 = {(x["kind"], x.get("layer"), x["M"]): x for x in rows if x["backend"] == "fp16"}

    def check(x):
        ref = fp16[(x["kind"], x.get("layer"), x["M"])]
        assert x["fp16_ms"] == ref["ms"] and x["speedup"] == pytest.approx(ref["ms"] / x["ms"], rel=1e-12)
        assert x["pct_roofline"] == pytest.approx(100 * x["bytes"] / peak / (x["ms"] / 1e3), rel=1e-9)
        assert x["pct_roofline"] > 0  # (may exceed 100: a read-only stream can beat the read+write copy)

    for b in (4, 8):
        for m in (1, 2):
            for name, (n, k) in TINY.items():
                (x,) = [x for x in rows if x["kind"] == "layer" and x["layer"] == name and x["bits"] == b and x["M"] == m]
                assert x["backend"] == "reference" and (x["N"], x["K"]) == (n, k)
                assert x["bytes"] == pytest.approx(n * k * _bpp(b, k) / 8, rel=1e-12)
                assert x["rotated_bytes"] >= 2 * d["device"]["cache_bytes"]  # weights streamed, not cached
                check(x)
            (s,) = [x for x in rows if x["kind"] == "stack" and x["bits"] == b and x["M"] == m]
            stack_bytes = 2 * sum(n * k * _bpp(b, k) / 8 for n, k in TINY.values())
            assert s["n_linears"] == 8 and s["bytes"] == pytest.approx(stack_bytes, rel=1e-12)
            check(s)
            (t,) = [x for x in rows if x["kind"] == "decode" and x["bits"] == b and x["M"] == m]
            assert t["decode_steps"] == 31 and t["tokens_per_s"] == pytest.approx(m * 1e3 / t["ms_per_step"])
            assert t["fp16_tokens_per_s"] == fp16[("decode", None, m)]["tokens_per_s"]
            per_layer = sum(n * k * _bpp(b, k) for n, k in TINY.values()) / sum(n * k for n, k in TINY.values())
            assert t["bits_per_param"] == pytest.approx(per_layer, rel=1e-12)
            check(t)
    # mixed plans: the exact bits/param recomputed from the per-kind bits and the shapes
    n_of = {"attn.qkv": TINY["qkv"], "attn.o": TINY["o"], "mlp.gate_up": TINY["gate_up"], "mlp.down": TINY["down"]}
    for plan, target in (("dl", 5.5), ("tl", 3.5)):
        p = d["plans"][plan]
        per = p["per_kind"]
        bits = sum(n * k * _bpp(per[kd], k) for kd, (n, k) in n_of.items()) / sum(n * k for n, k in n_of.values())
        assert p["bits_per_param"] == pytest.approx(bits, rel=1e-12) and abs(bits - target) <= 0.15
        assert per["attn.qkv"] > max(per["mlp.gate_up"], per["mlp.down"])  # K/V high, MLP low
        assert len(p["allocation"]) == 8 and set(p["allocation"].values()) == set(per.values())
        dec = [x for x in rows if x["kind"] == "decode" and x["bits"] == plan]
        assert len(dec) == 2 and all(x["bits_per_param"] == pytest.approx(bits, rel=1e-12) for x in dec)
    assert "decode" in r.output and "speedup" in r.output and "% roofline" in r.output


def test_bench_plan_file_and_checkpoint_dir(tmp_path, stories):
    from slq.runtime.checkpoint import save_checkpoint
    from slq.quant.pipeline import quantize_model
    from slq.quant.spec import QuantSpec

    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"allocation": {"attn.qkv": 16, "attn.o": 8, "mlp.gate_up": 2, "mlp.down": 3}}))
    out = tmp_path / "p.json"
    r = _slq("bench", "--shape", "tiny", "--bits", "4", "--plan", plan, "--batch", "1", "--measure", "decode",
             "--new-tokens", "4", "--json", out)
    assert r.exit_code == 0, r.output
    d = json.loads(out.read_text())
    n_of = {"attn.qkv": TINY["qkv"], "attn.o": TINY["o"], "mlp.gate_up": TINY["gate_up"], "mlp.down": TINY["down"]}
    per = {"attn.qkv": 16, "attn.o": 8, "mlp.gate_up": 2, "mlp.down": 3}
    want = sum(n * k * (16 if per[kd] == 16 else _bpp(per[kd], k)) for kd, (n, k) in n_of.items())
    want /= sum(n * k for n, k in n_of.values())
    assert d["plans"][str(plan)]["bits_per_param"] == pytest.approx(want, rel=1e-12)
    assert {x["kind"] for x in d["rows"]} == {"decode"}
    (row,) = [x for x in d["rows"] if x["bits"] == str(plan)]
    assert row["bits_per_param"] == pytest.approx(want, rel=1e-12)

    model, tok = stories
    res = quantize_model(model, QuantSpec(4, 32), method="rtn", progress=False)
    ck = save_checkpoint(tmp_path / "ck", model, tok, res.qweights, {"plan": res.plan.to_dict(),
                                                                      "bits_per_param": res.plan.bits_per_param()})
    out = tmp_path / "c.json"
    r = _slq("bench", ck, "--batch", "1", "--new-tokens", "6", "--json", out)
    assert r.exit_code == 0, r.output
    d = json.loads(out.read_text())
    assert d["settings"]["source"] == "checkpoint"
    q = [x for x in d["rows"] if x["backend"] == "reference"]
    assert {x["kind"] for x in q} == {"stack", "decode"}
    assert all(x["bits_per_param"] == pytest.approx(res.plan.bits_per_param(), rel=1e-12) and "speedup" in x for x in q)


@pytest.mark.parametrize("args, message", [
    (["--shape", "llama9-1t"], "unknown shape 'llama9-1t'"),
    (["--shape", "tiny", "--bits", "4,9"], "--bits must be in 2..8, got 9"),
    (["--shape", "tiny", "--bits", "four"], "--bits must be a comma-separated list of integers"),
    (["--shape", "tiny", "--batch", "0"], "--batch must be >= 1, got 0"),
    (["--shape", "tiny", "--backends", "cuda-magic"], "unknown backend 'cuda-magic'"),
    (["--shape", "tiny", "--plan", "xl"], "plan 'xl' is not dl, tl or an existing JSON file"),
    (["/nonexistent/ckpt-dir"], "checkpoint directory /nonexistent/ckpt-dir does not exist"),
    ([], "give either --shape NAME or a checkpoint DIR"),
    (["/tmp", "--shape", "tiny"], "give either --shape NAME or a checkpoint DIR"),
])
def test_bench_bad_input_is_one_error_line(tmp_path, args, message):
    out = tmp_path / "o.json"
    r = _slq("bench", *args, "--json", out)
    assert r.exit_code == 1, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], r.stderr
    assert "Traceback" not in r.output and not out.exists()


def test_bench_console_exit_code():
    p = subprocess.run([sys.executable, "-m", "slq", "bench", "--shape", "nope"], capture_output=True, text=True)
    assert p.returncode == 1 and p.stderr.strip().count("\n") == 0 and p.stderr.startswith("error: unknown shape")


# ----------------------------------------------------------------------------- the chooser

SYNTH = {  # bench/kernels_gpu.py layout: shapes + per_layer rows, "ours" = triton
    "shapes": {"qkv": [6144, 4096], "gate_up": [28672, 4096]},
    "per_layer": [
        # bits 4: triton wins qkv at M=1, humming wins gate_up at M=1 and everything at M=16
        {"backend": "ours", "bits": 4, "layer": "qkv", "M": 1, "us": 10.0},
        {"backend": "humming", "bits": 4, "layer": "qkv", "M": 1, "us": 12.0},
        {"backend": "ours", "bits": 4, "layer": "gate_up", "M": 1, "us": 30.0},
        {"backend": "humming", "bits": 4, "layer": "gate_up", "M": 1, "us": 25.0},
        {"backend": "ours", "bits": 4, "layer": "qkv", "M": 16, "us": 20.0},
        {"backend": "humming", "bits": 4, "layer": "qkv", "M": 16, "us": 11.0},
        {"backend": "ours", "bits": 4, "layer": "gate_up", "M": 16, "us": 80.0},
        {"backend": "humming", "bits": 4, "layer": "gate_up", "M": 16, "us": 29.0},
        {"backend": "fp16", "bits": 16, "layer": "qkv", "M": 1, "us": 5.0},  # not a QuantLinear backend
        # bits 2: humming wins qkv at M=1 (so bits 3 -> 4, the wider, must still pick triton)
        {"backend": "ours", "bits": 2, "layer": "qkv", "M": 1, "us": 9.0},
        {"backend": "humming", "bits": 2, "layer": "qkv", "M": 1, "us": 8.0},
    ],
    # slq bench layout: an exact [N, K] row (k_proj of Llama-3-8B) where humming wins at M=1
    "rows": [{"kind": "layer", "backend": "humming", "bits": 4, "M": 1, "N": 1024, "K": 4096, "us": 5.0},
             {"kind": "layer", "backend": "triton", "bits": 4, "M": 1, "N": 1024, "K": 4096, "us": 7.0}],
}
ALL = {"reference", "triton", "humming"}


def test_chooser_rule_on_a_synthetic_table():
    rows = read_table(SYNTH)
    assert len(rows) == 12 and {r.backend for r in rows} == {"triton", "humming"}
    c = lambda n, k, bits, m, role, avail=ALL, g=128: choose(n, k, bits, g, m, rows, avail, role)[0]  # noqa: E731
    assert c(4096, 4096, 4, 1, "qkv") == "triton"  # q_proj: no exact shape, same role
    assert c(14336, 4096, 4, 1, "gate_up") == "humming"
    assert c(4096, 4096, 4, 16, "qkv") == "humming" and c(14336, 4096, 4, 16, "gate_up") == "humming"
    assert c(4096, 4096, 4, 2, "qkv") == "triton"  # M=2 is nearest 1 (log2)
    assert c(4096, 4096, 4, 8, "qkv") == "humming"  # M=8 is nearest 16 (log2: 1 vs 3)
    assert c(4096, 4096, 3, 1, "qkv") == "triton"  # bits 3: tie 2/4 -> 4
    assert c(4096, 4096, 2, 1, "qkv") == "humming"
    assert c(1024, 4096, 4, 1, "qkv") == "humming"  # exact [N, K] beats the role
    assert c(4096, 4096, 4, 1, "down") == "humming"  # no such role: sum over all measured layers (47 vs 42 us)
    assert c(4000, 4096, 4, 16, "qkv") == "triton"  # humming needs 128 | N
    assert c(4096, 4100, 4, 1, "qkv", g=None) == "reference"  # neither takes 32 ∤ K
    assert c(4096, 4096, 4, 16, "qkv", avail={"reference", "triton"}) == "triton"
    assert c(4096, 4096, 4, 1, "qkv", avail={"reference"}) == "reference"
    assert choose(4096, 4096, 4, 128, 1, [], ALL, "qkv")[0] == "triton"  # no table: by batch size
    assert choose(4096, 4096, 4, 128, 16, [], ALL, "qkv")[0] == "humming"


def test_chooser_on_the_h100_table_picks_the_fastest_measured_backend():
    path = REPO / "bench" / "results" / "kernels_NVIDIA_H100_80GB_HBM3.json"
    if not path.is_file():
        pytest.skip(f"{path} not present")
    raw = json.loads(path.read_text())
    rows = read_table(path)
    shapes = raw["runs"][0]["shapes"]
    seen = 0
    for run in raw["runs"]:
        for r0 in run["per_layer"]:
            if r0["backend"] != "ours":
                continue
            other = [r for r in run["per_layer"] if r["backend"] == "humming" and
                     (r["bits"], r["layer"], r["M"]) == (r0["bits"], r0["layer"], r0["M"])]
            if not other:
                continue
            n, k = shapes[r0["layer"]]
            want = "triton" if r0["us"] < other[0]["us"] else "humming"
            assert choose(n, k, r0["bits"], 128, r0["M"], rows, ALL, r0["layer"])[0] == want
            seen += 1
    assert seen >= 40


def test_choose_backends_per_layer_of_a_checkpoint_model(stories, tmp_path):
    from slq.runtime.checkpoint import load, save_checkpoint
    from slq.quant.pipeline import quantize_model
    from slq.quant.spec import QuantSpec

    model, tok = stories
    res = quantize_model(model, QuantSpec(4, 32), method="rtn", progress=False)
    q = load(save_checkpoint(tmp_path / "ck", model, tok, res.qweights, {"plan": res.plan.to_dict()}))
    table = {"per_layer": [{"backend": "ours", "bits": 4, "layer": "qkv", "M": 1, "us": 1.0},
                           {"backend": "humming", "bits": 4, "layer": "qkv", "M": 1, "us": 0.5}]}
    # fp32 activations: neither kernel takes them
    assert set(choose_backends(q, 1, table, available=ALL)["layers"].values()) == {"reference"}
    q.half()
    rec = choose_backends(q, 1, table, available=ALL)
    assert rec["rule"] == "measured table" and rec["batch_size"] == 1
    lay = rec["layers"]
    assert len(lay) == 35
    # stories: N = 64/32/172 fails 128 | N (humming), K = 172 fails 32 | K (triton)
    assert lay["model.layers.0.self_attn.q_proj"] == "triton" and lay["model.layers.0.mlp.up_proj"] == "triton"
    assert lay["model.layers.0.mlp.down_proj"] == "reference"
    # a model whose every layer humming could take: the table decides, and bf16 rules humming out
    from slq.quant.grid import QuantizedWeight
    from slq.runtime.qlinear import QuantLinear

    big = torch.nn.Module()
    big.q_proj = QuantLinear(QuantizedWeight(torch.zeros(256, 256, dtype=torch.uint8),
                                             torch.ones(256, 2, dtype=torch.float16),
                                             torch.zeros(256, 2, dtype=torch.uint8), QuantSpec(4, 128)))
    big.emb = torch.nn.Embedding(4, 8, dtype=torch.float16)
    big.get_input_embeddings = lambda: big.emb
    assert choose_backends(big, 1, table, available=ALL)["layers"]["q_proj"] == "humming"  # 0.5 us vs 1.0
    big.emb = torch.nn.Embedding(4, 8, dtype=torch.bfloat16)
    assert choose_backends(big, 1, table, available=ALL)["layers"]["q_proj"] == "triton"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_bench_tiny_all_backends(tmp_path):
    out = tmp_path / "g.json"
    r = _slq("bench", "--shape", "tiny", "--bits", "4", "--plan", "none", "--batch", "1,16", "--json", out)
    assert r.exit_code == 0, r.output
    d = json.loads(out.read_text())
    assert d["device"]["type"] == "cuda" and "device-to-device" in d["bandwidth"]["method"]
    ran = {x["backend"] for x in d["rows"]}
    assert {"fp16", "reference"} <= ran
    for be in set(d["settings"]["backends_run"]) - {"reference"}:
        assert {x["kind"] for x in d["rows"] if x["backend"] == be} == {"layer", "stack", "decode"}, be
    assert all(x["decode_steps"] == 31 and x["cuda_graph"] for x in d["rows"] if x["kind"] == "decode")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_load_auto_uses_the_table(tmp_path):
    from slq.runtime.checkpoint import load, save_checkpoint
    from slq.runtime.backends.choose import available_backends
    from slq.quant.pipeline import quantize_model
    from slq.quant.spec import QuantSpec
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=64)
    m = AutoModelForCausalLM.from_config(cfg, dtype=torch.float16)  # the kernels take fp16 activations
    res = quantize_model(m, QuantSpec(4, 128), method="rtn", progress=False)
    ck = save_checkpoint(tmp_path / "ck", m, None, res.qweights, {"plan": res.plan.to_dict()})
    table = {"per_layer": [{"backend": "ours", "bits": 4, "layer": "qkv", "M": 1, "us": 1.0},
                           {"backend": "humming", "bits": 4, "layer": "qkv", "M": 1, "us": 2.0}]}
    q = load(ck, device="cuda", backend="auto", table=table)
    want = "triton" if "triton" in available_backends() else ("humming" if "humming" in available_backends() else "reference")
    assert q.get_submodule("model.layers.0.self_attn.q_proj").backend == want
    assert q.slq_backends["layers"]["model.layers.0.self_attn.q_proj"] == want
