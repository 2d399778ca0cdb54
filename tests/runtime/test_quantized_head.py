"""A quantized lm_head in the checkpoint: plain transformers + compressed-tensors read the same model as
slq.load (whose head is a QuantLinear), a tied embedding stays equal to the head, and the bits count the head."""

import json

import pytest
import torch

from slq.quant.config import QuantConfig
from slq.quant.pipeline import build_report, quantize_model
from slq.runtime.checkpoint import load, save_checkpoint
from slq.runtime.qlinear import QuantLinear


def _tiny_llama(tie: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie, dtype="float32")
    return LlamaForCausalLM(cfg).eval()


def _plain(path):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(path).eval()  # no slq involved
    with torch.no_grad():
        m(input_ids=torch.tensor([[1, 2, 3]]))  # compressed-tensors decompresses on the first forward
    return m


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_quantized_head_loads_bit_exact_and_tied_embedding_equals_head(tmp_path, tie, method):
    model = _tiny_llama(tie)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tie
    windows = torch.randint(0, 96, (4, 32), generator=torch.Generator().manual_seed(1))
    res = quantize_model(model, QuantConfig(bits=4, group_size=32, method=method, head_bits=8, calib_samples=4,
                                            seq_len=32), windows=windows, progress=False)
    q = res.qweights["lm_head"]
    assert q.spec.bits == 8 and res.plan["lm_head"].spec.group_size == 32
    out = save_checkpoint(tmp_path / "ck", model, None, res.qweights, {})
    cfg = json.loads((out / "config.json").read_text())
    assert "lm_head" not in cfg["quantization_config"]["ignore"]
    assert any("lm_head" in g["targets"] for g in cfg["quantization_config"]["config_groups"].values())
    assert cfg["tie_word_embeddings"] is False  # written untied: the embedding is stored dense on its own
    ours, plain = load(out), _plain(out)
    assert isinstance(ours.lm_head, QuantLinear) and ours.lm_head.bits == 8
    oracle = q.dequantize()  # fp32 (q - z) * s
    assert torch.equal(plain.lm_head.weight, oracle)
    if tie:  # "the tied weights stay tied": the embedding is the dequantized head, after either load
        assert torch.equal(plain.model.embed_tokens.weight, plain.lm_head.weight)
        assert torch.equal(ours.model.embed_tokens.weight, oracle)
    else:  # untied: the embedding is the model's own, untouched
        assert torch.equal(plain.model.embed_tokens.weight, model.model.embed_tokens.weight)
    x = torch.randint(0, 96, (2, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a, b, c = ours(x).logits, plain(x).logits, model(x).logits
    assert torch.equal(a, b)
    assert torch.equal(a, c)  # the model measured (fake-quantized in place) is the model shipped


@pytest.mark.parametrize("tie", [True, False])
def test_bits_per_param_counts_the_head_from_the_files(tmp_path, tie):
    """bits_per_param_model recounted from the safetensors: packed codes, fp16 scales, zero points (b bits per
    group), and every dense tensor at its stored width."""
    from safetensors import safe_open

    model = _tiny_llama(tie)
    res = quantize_model(model, QuantConfig(bits=4, group_size=32, method="rtn", head_bits=8), progress=False)
    rep = build_report(model, tmp_path, res.plan, QuantConfig().spec)
    out = save_checkpoint(tmp_path / "ck", model, None, res.qweights, rep)
    bits = n = 0
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        for k in f.keys():
            t = f.get_tensor(k)
            mod, _, leaf = k.rpartition(".")
            if mod in res.qweights:
                s = res.qweights[mod].spec
                N, K = res.qweights[mod].codes.shape
                if leaf == "weight_packed":
                    bits += N * K * s.bits
                    n += N * K
                elif leaf == "weight_scale":
                    bits += 16 * t.numel()
                elif leaf == "weight_zero_point":
                    bits += s.bits * N * (K // s.effective_group(K))
            else:
                bits += t.numel() * t.element_size() * 8
                n += t.numel()
    assert rep["bits_per_param_model"] == pytest.approx(bits / n, rel=1e-12)
    V, H = model.lm_head.weight.shape
    head_bits = V * H * (8 + (16 + 8) / 32)
    if tie:  # the embedding is stored beside the packed head: the file holds both
        assert n == sum(p.numel() for p in model.parameters()) + V * H
    assert bits >= head_bits
