"""The checkpoint is read by the real libraries: plain transformers + compressed-tensors."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import slq.runtime.checkpoint as ckpt
from slq.runtime.checkpoint import load, save_checkpoint
from slq.util.errors import SlqError
from slq.runtime.qlinear import QuantLinear
from slq.quant.pipeline import quantizable_linears, quantize_model
from slq.quant.spec import QuantSpec


def _plain_transformers_load(path):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(path)  # no slq involved
    m(input_ids=torch.tensor([[1, 2, 3]]))  # compressed-tensors decompresses on the first forward
    return m


@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("bits", range(2, 9))
def test_transformers_loads_dense_weights_equal_to_ours(stories, tmp_path, bits, sym):
    model, tok = stories
    res = quantize_model(model, QuantSpec(bits, 128, sym), method="rtn", progress=False)
    Ks = {res.plan[n].K for n in res.plan.layers}
    assert 172 in Ks and 64 in Ks  # per-channel fallback (K=172) and g64 fallback are both exercised
    out = save_checkpoint(tmp_path / "ck", model, tok, res.qweights, {"plan": res.plan.to_dict()})
    dense = _plain_transformers_load(out)
    for name, q in res.qweights.items():
        w = dense.get_submodule(name).weight
        assert torch.equal(w.float(), q.dequantize()), name


def test_mixed_bitwidths_roundtrip_and_slq_load_matches_transformers(stories, tiny_windows, tmp_path):
    model, tok = stories
    names = list(quantizable_linears(model))
    specs = {n: QuantSpec(2 + i % 7, [32, 64, None, 16][i % 4], i % 3 == 0) for i, n in enumerate(names)}
    res = quantize_model(model, specs=specs, method="gptq", windows=tiny_windows[:4], progress=False)
    out = save_checkpoint(tmp_path / "mixed", model, tok, res.qweights, {"plan": res.plan.to_dict()})
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "compressed-tensors" and cfg["format"] == "pack-quantized"
    targets = [t for g in cfg["config_groups"].values() for t in g["targets"]]
    assert sorted(targets) == sorted(names)
    assert len(cfg["config_groups"]) == len({(lp.spec.bits, lp.spec.group_size, lp.spec.symmetric) for lp in res.plan})
    x = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(0))
    ours = load(out)
    assert all(isinstance(ours.get_submodule(n), QuantLinear) for n in names)
    assert {n: ours.get_submodule(n).bits for n in names} == {n: s.bits for n, s in specs.items()}
    dense = _plain_transformers_load(out)
    with torch.no_grad():
        a, b, c = ours(x).logits, dense(x).logits, model(x).logits
    assert torch.equal(a, b)
    assert torch.equal(a, c)


@pytest.fixture
def small_ckpt(stories, tmp_path):
    model, tok = stories
    res = quantize_model(model, QuantSpec(4, 32), method="rtn", progress=False)
    return save_checkpoint(tmp_path / "ck", model, tok, res.qweights, {"plan": res.plan.to_dict()})


def _rewrite(path, fn):
    t = load_file(path / "model.safetensors")
    fn(t)
    save_file(t, str(path / "model.safetensors"))


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda t: t.pop("model.layers.1.mlp.up_proj.weight_packed"), "missing tensor model.layers.1.mlp.up_proj.weight_packed"),
        (lambda t: t.pop("model.layers.0.mlp.up_proj.weight_zero_point"), "weight_zero_point"),
        (lambda t: t.__setitem__("model.layers.0.self_attn.q_proj.weight_scale", t["model.layers.0.self_attn.q_proj.weight_scale"].float()), "weight_scale is torch.float32"),
        (lambda t: t.__setitem__("model.layers.0.self_attn.q_proj.weight_packed", t["model.layers.0.self_attn.q_proj.weight_packed"][:, :1].contiguous()), "weight_packed"),
        (lambda t: t.pop("model.norm.weight"), "missing tensor model.norm.weight"),
    ],
)
def test_corrupt_checkpoint_fails_with_clear_message(small_ckpt, damage, message):
    _rewrite(small_ckpt, damage)
    with pytest.raises(SlqError, match=message.replace(".", r"\.")):
        load(small_ckpt)


def test_truncated_or_missing_files(small_ckpt):
    f = small_ckpt / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(SlqError, match="cannot read|corrupt"):
        load(small_ckpt)
    f.unlink()
    with pytest.raises(SlqError, match="model.safetensors is missing"):
        load(small_ckpt)
    (small_ckpt / "config.json").write_text("{not json")
    with pytest.raises(SlqError, match="not JSON"):
        load(small_ckpt)


def test_failed_write_leaves_nothing_behind(stories, tmp_path, monkeypatch):
    model, tok = stories
    res = quantize_model(model, QuantSpec(4, 32), method="rtn", progress=False)

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_file", boom)
    with pytest.raises(OSError):
        save_checkpoint(tmp_path / "out", model, tok, res.qweights, {})
    assert list(tmp_path.iterdir()) == []


def test_existing_output_needs_force(small_ckpt, stories):
    model, tok = stories
    res = quantize_model(model, QuantSpec(8, 32), method="rtn", progress=False)
    with pytest.raises(SlqError, match="exists; pass force") as e:  # the library names the field; the CLI, --force
        save_checkpoint(small_ckpt, model, tok, res.qweights, {})
    assert e.value.field == "force" and e.value.render({"force": "--force"}).endswith("pass --force to replace it")
    save_checkpoint(small_ckpt, model, tok, res.qweights, {"plan": res.plan.to_dict()}, force=True)
    assert load(small_ckpt).get_submodule("model.layers.0.mlp.up_proj").bits == 8
    assert [p.name for p in small_ckpt.parent.iterdir()] == ["ck"]


def test_no_pickle_files_written(small_ckpt):
    names = {p.name for p in small_ckpt.iterdir()}
    assert "model.safetensors" in names and "slq_report.json" in names and "tokenizer.json" in names
    assert not any(n.endswith((".bin", ".pt", ".pth", ".pkl")) for n in names)


def test_layers_kept_unquantized_stay_dense_in_the_checkpoint(stories, tmp_path):
    model, tok = stories
    names = list(quantizable_linears(model))
    keep = {n for n in names if n.endswith("down_proj")}
    original = {n: model.get_submodule(n).weight.detach().clone() for n in keep}
    specs = {n: (None if n in keep else QuantSpec(3, 32)) for n in names}
    res = quantize_model(model, specs=specs, method="rtn", progress=False)
    assert set(res.qweights) == set(names) - keep and set(res.plan.layers) == set(names) - keep
    out = save_checkpoint(tmp_path / "k", model, tok, res.qweights, {"plan": res.plan.to_dict()})
    ours = load(out)
    for n in keep:
        assert not isinstance(ours.get_submodule(n), QuantLinear)
        assert torch.equal(ours.get_submodule(n).weight, original[n])
    dense = _plain_transformers_load(out)
    x = torch.randint(0, 512, (1, 20))
    with torch.no_grad():
        assert torch.equal(ours(x).logits, dense(x).logits)


def test_config_that_is_not_json_fails_with_clear_message(small_ckpt):
    (small_ckpt / "config.json").write_text("{ not json")
    with pytest.raises(SlqError, match=r"corrupt checkpoint: its config .*config\.json is not JSON"):
        load(small_ckpt)
    (small_ckpt / "config.json").unlink()
    with pytest.raises(SlqError, match="is not a checkpoint: config.json is missing"):
        load(small_ckpt)
