"""bench/decode_e2e.py's CPU dry path: it runs, writes its JSON with provenance, counts ops per
step, and the compiled step's greedy tokens equal the eager step's for every variant."""

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "decode_e2e.py"


def test_decode_e2e_cpu_dry_path_writes_its_json(tmp_path):
    spec = importlib.util.spec_from_file_location("decode_e2e", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = mod.main(["--device", "cpu", "--shape", "tiny", "--batch", "1,2", "--new-tokens", "5", "--repeats", "1",
                    "--prompt-len", "4", "--out", str(tmp_path / "e2e.json")])
    res = json.loads(Path(out).read_text())
    assert res["errors"] == []
    assert {"device", "versions", "git_commit", "settings"} <= res.keys() and res["device"]["type"] == "cpu"
    rows = res["rows"]
    assert {(r["variant"], r["batch"], r["mode"]) for r in rows} == {
        (v, b, m) for v in ("dense", "int4") for b in (1, 2) for m in ("eager", "compiled")}
    for r in rows:
        assert r["ms_per_step"] > 0 and r["ops_per_step"] > 0 and r["graph_nodes"] is None  # no CUDA graph on CPU
        if r["mode"] == "compiled":
            assert r["tokens_equal_eager"] is True
        if r["variant"] == "int4":  # each QuantLinear is one op: 4 fused linears per layer
            assert r["ops"]["slq.dequant_linear.default"] == 4 * res["settings"]["layers"]
