"""Exports: vLLM conformance against a re-statement of its loader's rules, llama.cpp type files, copies.

The vLLM oracle below is written from vLLM's compressed-tensors loader as documented in
:mod:`slq.runtime.export` (target / ignore matching with ``re:`` entries and fused q/k/v, gate/up
layers; the WNA16 allocation of packed weights and zero points), independently of the export code:
a change that breaks what vLLM would allocate or match fails here, on CPU.
"""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch
from safetensors import safe_open

from slq.quant.pipeline import quantizable_linears, quantize_model
from slq.quant.spec import QuantSpec
from slq.runtime.checkpoint import save_checkpoint
from slq.runtime.export import export, gguf_tensor_name
from slq.util.errors import SlqError

# ---------------------------------------------------------------- the vLLM oracle

FUSED = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
VLLM_CLASS = {"qkv_proj": "QKVParallelLinear", "gate_up_proj": "MergedColumnParallelLinear",
              "o_proj": "RowParallelLinear", "down_proj": "RowParallelLinear"}


def _match(name: str, target: str, contains: bool = False) -> bool:
    if target.startswith("re:"):
        return re.match(target[3:], name) is not None
    if contains:
        return target.lower() in name.lower()
    return target == name


def vllm_layers(n_layers: int) -> list[str]:
    """The Linear layers of vLLM's Llama: fused qkv_proj and gate_up_proj (lm_head is not a LinearBase)."""
    return [f"model.layers.{i}.{p}" for i in range(n_layers)
            for p in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")]


def vllm_ignored(layer: str, ignore: list[str]) -> bool:
    proj = layer.rsplit(".", 1)[1]
    if proj in FUSED and layer not in ignore:
        states = {any(_match(layer.replace(proj, s), t) for t in ignore) for s in FUSED[proj]}
        if len(states) > 1:
            raise AssertionError(f"{layer}: parts disagree on ignore (vLLM raises)")
        return states.pop()
    return any(_match(layer, t) for t in ignore)


def vllm_target(layer: str, targets: list[str]) -> str:
    proj = layer.rsplit(".", 1)[1]
    for t in targets:
        if _match(layer, t):
            return t
    for t in targets:
        if _match(VLLM_CLASS[proj], t, contains=True):
            return t
    if proj in FUSED:
        hits = [next((t for t in targets if _match(layer.replace(proj, s), t)), None) for s in FUSED[proj]]
        if all(hits):
            return hits[0]
    raise AssertionError(f"Unable to find matching target for {layer}")


def vllm_plan(cfg: dict, n_layers: int) -> dict[str, dict | None]:
    """HF module (the checkpoint's naming) -> the weight args vLLM loads it with, None when unquantized."""
    qc = cfg["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    scheme = {t: g["weights"] for g in qc["config_groups"].values() for t in g["targets"]}
    out = {}
    for layer in vllm_layers(n_layers):
        proj = layer.rsplit(".", 1)[1]
        shards = [layer.replace(proj, s) for s in FUSED.get(proj, [proj])]
        if vllm_ignored(layer, qc["ignore"]):
            out.update(dict.fromkeys(shards))
            continue
        w = scheme[vllm_target(layer, list(scheme))]  # a fused layer takes its first part's scheme ...
        for s in shards:  # ... so every part must have been quantized with that very scheme
            own = next((scheme[t] for t in scheme if _match(s, t)), None)
            assert own == w, f"{s}: vLLM would load it as {w}, it was written as {own}"
            out[s] = w
    return out


def vllm_loads(w: dict) -> bool:
    return w["type"] == "int" and w["strategy"] in ("group", "channel") and (
        w["num_bits"] in range(2, 9) if w["symmetric"] else w["num_bits"] in (4, 8))


def vllm_shapes(w: dict, N: int, K: int) -> dict[str, tuple]:
    """What vLLM allocates for one part (dense packing for the Humming bitwidths, 32 // b per word for 4/8)."""
    b, G = w["num_bits"], (w["group_size"] if w["strategy"] == "group" else K)
    per_word = 32 // b
    packed_k = K // per_word if b in (4, 8) else math.ceil(K * b / 32)
    shapes = {"weight_packed": ((N, packed_k), torch.int32), "weight_scale": ((N, K // G), None),
              "weight_shape": ((2,), torch.int64)}
    if not w["symmetric"]:
        shapes["weight_zero_point"] = ((N // per_word, K // G), torch.int32)
    return shapes


def unpack_dense(words: torch.Tensor, bits: int, n: int) -> np.ndarray:
    """Independent unpacker: along dim 0, value i of a column is bits i*b .. i*b+b-1 of its little-endian stream."""
    w = words.numpy().astype("<i4").T.copy()  # one row per column of the tensor
    out = np.zeros((w.shape[0], n), dtype=np.int64)
    for j, row in enumerate(w):
        stream = np.unpackbits(row.view(np.uint8), bitorder="little")
        vals = stream[: n * bits].reshape(n, bits)
        out[j] = (vals * (1 << np.arange(bits))).sum(1)
    return out.T


# ---------------------------------------------------------------- checkpoints

KINDS = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "o_proj": "o", "gate_proj": "gu", "up_proj": "gu",
         "down_proj": "down"}
# per layer, per fused kind: a spec, or None = kept in 16-bit. Every combination vLLM loads today
# (symmetric 2..8, asymmetric 4 and 8), group 16..64 and per-channel (K = 172 falls back to it).
GOOD = [
    {"qkv": QuantSpec(4, 32), "o": QuantSpec(3, 32, True), "gu": QuantSpec(8, 32), "down": QuantSpec(5, None, True)},
    {"qkv": QuantSpec(2, 64, True), "o": QuantSpec(8, 64), "gu": QuantSpec(6, 32, True), "down": QuantSpec(8, None)},
    {"qkv": None, "o": QuantSpec(7, 32, True), "gu": None, "down": QuantSpec(8, None, True)},
    {"qkv": QuantSpec(8, 16, True), "o": QuantSpec(4, 64), "gu": QuantSpec(4, 32, True), "down": QuantSpec(3, None, True)},
    {"qkv": QuantSpec(8, 32), "o": QuantSpec(8, 32), "gu": QuantSpec(8, 32), "down": QuantSpec(8, None)},
]


def _build(stories, tmp_path, table, name="ck", overrides=None):
    model, tok = stories
    specs = {}
    for n in quantizable_linears(model):
        i, leaf = int(n.split(".")[2]), n.rsplit(".", 1)[1]
        specs[n] = (overrides or {}).get(n, table[i][KINDS[leaf]])
    kept = {n for n, s in specs.items() if s is None}
    with torch.no_grad():
        for n in kept:  # the search stores kept units as fp16 values
            w = model.get_submodule(n).weight
            w.copy_(w.half().float())
    res = quantize_model(model, specs=specs, method="rtn", progress=False)
    out = save_checkpoint(tmp_path / name, model, tok, res.qweights, {"plan": res.plan.to_dict()}, half_modules=kept)
    return out, res, specs


@pytest.fixture
def good(stories, tmp_path):
    return _build(stories, tmp_path, GOOD)


def test_vllm_export_matches_what_vllm_allocates_and_matches(good, tmp_path):
    ck, res, specs = good
    seen = []
    out = export(ck, tmp_path / "vllm", to="vllm", warn=seen.append)
    assert seen and all("group size 16" in s for s in seen)  # layer 3's q/k/v: a warning, not a refusal
    cfg = json.loads((out / "config.json").read_text())
    assert "lm_head" in cfg["quantization_config"]["ignore"]
    plan = vllm_plan(cfg, n_layers=5)
    assert set(plan) == set(specs)  # every Linear of vLLM's model is matched or ignored
    f = safe_open(str(out / "model.safetensors"), framework="pt")
    keys = set(f.keys())
    for name, w in plan.items():
        if w is None:
            assert specs[name] is None and f.get_tensor(f"{name}.weight").dtype == torch.float16
            continue
        q = res.qweights[name]
        assert vllm_loads(w), name
        assert (w["num_bits"], w["symmetric"]) == (q.spec.bits, q.spec.symmetric)
        N, K = q.codes.shape
        for key, (shape, dtype) in vllm_shapes(w, N, K).items():
            t = f.get_tensor(f"{name}.{key}")
            assert tuple(t.shape) == shape, (name, key, tuple(t.shape), shape)
            assert dtype is None or t.dtype == dtype, (name, key, t.dtype)
        if not q.spec.symmetric:
            zp = f.get_tensor(f"{name}.weight_zero_point")
            assert zp.shape[0] == math.ceil(N * q.spec.bits / 32)  # canonical, = vLLM's N // (32/b) here
            assert np.array_equal(unpack_dense(zp, q.spec.bits, N), q.zero.numpy().astype(np.int64)), name
        else:
            assert f"{name}.weight_zero_point" not in keys


def test_vllm_export_reads_back_through_compressed_tensors(good, tmp_path):
    """compressed-tensors' own decompressor, on the canonical layout, gives our dequantized weights exactly."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    ck, res, _ = good
    out = export(ck, tmp_path / "vllm", to="vllm", warn=lambda s: None)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    f = safe_open(str(out / "model.safetensors"), framework="pt")
    for g in qc["config_groups"].values():
        assert "zp_dtype" not in g["weights"]
        scheme = QuantizationScheme(targets=g["targets"], weights=QuantizationArgs(**g["weights"]))
        for name in g["targets"]:
            sd = {k.rsplit(".", 1)[1]: f.get_tensor(k) for k in f.keys() if k.rsplit(".", 1)[0] == name}
            sd["weight_scale"] = sd["weight_scale"].float()  # the model's dtype, as transformers loads it
            dense = PackedQuantizationCompressor.decompress(sd, scheme)["weight"]
            assert torch.equal(dense.float(), res.qweights[name].dequantize()), name


def test_vllm_refuses_what_it_cannot_load_and_lists_the_layers(stories, tmp_path):
    over = {"model.layers.0.mlp.down_proj": QuantSpec(3, None), "model.layers.1.mlp.down_proj": QuantSpec(6, None),
            "model.layers.2.self_attn.q_proj": QuantSpec(4, 32, True)}
    ck, res, _ = _build(stories, tmp_path, GOOD, overrides=over)
    with pytest.raises(SlqError) as e:
        export(ck, tmp_path / "v", to="vllm")
    msg = str(e.value)
    assert "\n" not in msg
    assert "asymmetric 3-bit" in msg and "model.layers.0.mlp.down_proj" in msg
    assert "asymmetric 6-bit" in msg and "model.layers.1.mlp.down_proj" in msg
    # q_proj quantized while k/v are kept: vLLM's fused qkv_proj cannot be both
    assert "qkv_proj" in msg and "model.layers.2.self_attn.k_proj" in msg
    assert not (tmp_path / "v").exists()
    seen = []
    out = export(ck, tmp_path / "v", to="vllm", allow_unsupported=True, warn=seen.append)
    assert any("model.layers.0.mlp.down_proj" in s for s in seen)
    f = safe_open(str(out / "model.safetensors"), framework="pt")
    zp = f.get_tensor("model.layers.0.mlp.down_proj.weight_zero_point")
    q = res.qweights["model.layers.0.mlp.down_proj"]
    assert tuple(zp.shape) == (math.ceil(64 * 3 / 32), 1)  # dense 3-bit packing along N, per-channel
    assert np.array_equal(unpack_dense(zp, 3, 64), q.zero.numpy().astype(np.int64))
    assert json.loads((out / "slq_export.json").read_text())["vllm"]["loads"] is False


def test_oracle_matches_regex_targets_and_catches_mismatched_parts():
    """The oracle itself: ``re:`` targets match from the start; fused parts must agree."""
    w4 = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 32}
    w8 = dict(w4, num_bits=8)
    cfg = {"quantization_config": {"quant_method": "compressed-tensors", "format": "pack-quantized",
                                   "ignore": ["lm_head", "re:.*mlp\\.down_proj$"],
                                   "config_groups": {"a": {"targets": ["re:.*self_attn\\.(q|k|v|o)_proj$"],
                                                           "weights": w4},
                                                     "b": {"targets": ["re:.*mlp\\.(gate|up)_proj"], "weights": w8}}}}
    plan = vllm_plan(cfg, 1)
    assert plan["model.layers.0.self_attn.k_proj"] == w4 and plan["model.layers.0.mlp.up_proj"] == w8
    assert plan["model.layers.0.mlp.down_proj"] is None
    cfg["quantization_config"]["config_groups"]["a"]["targets"] = ["re:.*self_attn\\.(q|v|o)_proj$"]
    cfg["quantization_config"]["config_groups"]["b"]["targets"] += ["model.layers.0.self_attn.k_proj"]  # k: 8-bit
    with pytest.raises(AssertionError, match="k_proj"):
        vllm_plan(cfg, 1)
    assert not _match("model.layers.0.self_attn.q_proj", "re:self_attn")  # re.match anchors at the start


# ---------------------------------------------------------------- llama.cpp

GGUF_TYPES = {"q2_K", "q3_K", "q4_K", "q5_K", "q6_K", "q8_0", "f16"}
EXPECTED = {2: "q2_K", 3: "q3_K", 4: "q4_K", 5: "q5_K", 6: "q6_K", 7: "q8_0", 8: "q8_0", None: "f16"}


def test_llama_cpp_type_file_covers_every_tensor_exactly_once(good, tmp_path):
    ck, _, specs = good
    out = export(ck, tmp_path / "gguf", to="llama.cpp")
    text = (out / "tensor_types.txt").read_text()
    tokens = text.split()  # llama-quantize reads whitespace-separated tokens
    assert len(tokens) == len(text.splitlines()) == len(specs)
    gguf_names = {}
    for n in specs:  # the converter's names, written out here independently
        i, leaf = n.split(".")[2], n.rsplit(".", 1)[1]
        gguf_names[n] = f"blk.{i}." + {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v",
                                       "o_proj": "attn_output", "gate_proj": "ffn_gate", "up_proj": "ffn_up",
                                       "down_proj": "ffn_down"}[leaf] + ".weight"
    for n, s in specs.items():
        hits = [t for t in tokens if re.search(t.split("=", 1)[0].lower(), gguf_names[n])]
        assert len(hits) == 1, (n, hits)
        pattern, typ = hits[0].split("=")
        assert typ in GGUF_TYPES and typ == EXPECTED[None if s is None else s.bits], (n, typ)
        assert gguf_tensor_name(n) == gguf_names[n]
    # no pattern touches the tensors llama-quantize decides itself, nor a longer layer number
    for other in ("output.weight", "token_embd.weight", "blk.11.attn_q.weight", "blk.0.attn_norm.weight"):
        assert not any(re.search(t.split("=", 1)[0], other) for t in tokens), other
    assert "llama-quantize --tensor-type-file" in (out / "LLAMA_CPP.md").read_text()


# ---------------------------------------------------------------- transformers, errors


def test_transformers_export_is_a_copy(good, tmp_path):
    ck, _, _ = good
    out = export(ck, tmp_path / "t")
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in ck.iterdir())
    for p in ck.iterdir():
        assert (out / p.name).read_bytes() == p.read_bytes()
        assert (out / p.name).stat().st_mode & 0o777 == 0o644


def test_export_errors_are_one_line(good, tmp_path):
    ck, _, _ = good
    with pytest.raises(SlqError, match="unknown export format 'gguf'"):
        export(ck, tmp_path / "x", to="gguf")
    out = export(ck, tmp_path / "v", to="vllm", warn=lambda s: None)
    with pytest.raises(SlqError, match="exists"):
        export(ck, out, to="vllm")
    with pytest.raises(SlqError, match="already an export"):
        export(out, tmp_path / "again", to="vllm")
    with pytest.raises(SlqError, match="config.json is missing"):
        export(tmp_path / "nowhere", tmp_path / "y")
