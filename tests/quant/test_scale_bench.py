"""bench/scale_gpu.py's CPU dry run: it writes a random model, streams its quantization and forward, and
records per-layer times, peak memory, the extrapolation and provenance in its JSON."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench" / "scale_gpu.py"


def test_scale_bench_tiny_dry_run_writes_its_json(tmp_path):
    spec = importlib.util.spec_from_file_location("scale_gpu", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "scale.json"
    mod.main(["--tiny", "--layers", "3", "--workdir", str(tmp_path / "w"), "--out", str(out)])
    r = json.loads(out.read_text())
    assert r["model"]["layers"] == 3 and r["model"]["full_depth"] == 24
    assert len(r["quantize"]["layer_s"]) == 3 and all(t > 0 for t in r["quantize"]["layer_s"])
    assert r["quantize"]["memory"]["streamed"] is True
    # one block of the tiny shape is 4*64*64*... bytes: the peak is far below the 3-layer model on disk
    assert 0 < r["quantize"]["peak_device_bytes"] < r["model"]["disk_bytes"]
    assert r["quantize"]["extrapolated_total_s"] > sum(r["quantize"]["layer_s"])
    assert r["settings"]["world"] == 1 and "torch" in r["versions"] and r["git_commit"]
    assert (tmp_path / "w" / "tiny-3l" / "model-layer002.safetensors").is_file()
