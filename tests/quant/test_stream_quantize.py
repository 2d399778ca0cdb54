"""Block-streamed quantization is the in-memory quantization: same codes bit for bit, same plan and report
numbers; and its memory does not grow with the depth of the model.

The oracle for equality is the in-memory pipeline on the model loaded whole by transformers. The oracle for
memory is independent of the streaming code's own count: a pre-hook on every decoder block sums the bytes of
every parameter of the model that is not on the meta device at that moment.
"""

from __future__ import annotations

import pytest
import torch

from slq.models.sources import load_model
from slq.models.stream import StreamedModel
from slq.quant.config import QuantConfig
from slq.quant.pipeline import build_report, quantize_model
from conftest import live_block_peak


def _tiny_llama(path, layers: int, hidden: int = 64, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=256, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(path)
    return path


def _assert_same(res_mem, res_st, model_mem, model_st, path, config):
    assert list(res_mem.qweights) == list(res_st.qweights)
    for name, q in res_mem.qweights.items():
        s = res_st.qweights[name]
        assert torch.equal(q.codes, s.codes), name
        assert torch.equal(q.scale, s.scale) and torch.equal(q.zero, s.zero), name
        assert q.spec == s.spec
    assert res_mem.plan.to_dict() == res_st.plan.to_dict()
    r_mem = build_report(model_mem, path, res_mem.plan, config.spec, **config.to_dict())
    r_st = build_report(model_st, path, res_st.plan, config.spec, **config.to_dict())
    for key in ("bits_per_param", "bits_per_param_model", "n_params_quantized", "n_params_other", "gamma", "plan"):
        assert r_mem[key] == r_st[key], key


@pytest.mark.parametrize("method", ["gptq", "rtn"])
def test_streamed_quantize_equals_in_memory_on_stories(stories_dir, tiny_windows, method):
    config = QuantConfig(bits=3, group_size=32, method=method, batch_size=4)
    windows = tiny_windows[:8, :64] if method == "gptq" else None
    model, _ = load_model(stories_dir)
    res_mem = quantize_model(model, config, windows=windows, progress=False)
    sm = StreamedModel(stories_dir)
    res_st = quantize_model(sm, config, windows=windows, progress=False)
    assert res_st.memory["streamed"] and not res_mem.memory["streamed"]
    assert all(p.device.type == "meta" for p in sm.model.parameters())  # every block was released
    _assert_same(res_mem, res_st, model, sm.model, stories_dir, config)


def test_streamed_gptq_equals_in_memory_on_a_deep_random_llama(tmp_path):
    path = _tiny_llama(tmp_path / "deep", layers=24)
    config = QuantConfig(bits=4, group_size=32, batch_size=2)
    windows = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1))
    model = _load_plain(path)  # no tokenizer: load_model would ask for one
    res_mem = quantize_model(model, config, windows=windows, progress=False)
    sm = StreamedModel(path)
    res_st = quantize_model(sm, config, windows=windows, progress=False)
    _assert_same(res_mem, res_st, model, sm.model, path, config)


def _load_plain(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()




def test_streamed_peak_memory_is_flat_in_depth(tmp_path):
    config = QuantConfig(bits=4, group_size=32, batch_size=2)
    windows = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(2))
    peaks, reported, whole = {}, {}, {}
    for depth in (8, 32):
        path = _tiny_llama(tmp_path / f"d{depth}", layers=depth)
        sm = StreamedModel(path)
        res = {}
        peaks[depth] = live_block_peak(sm, lambda: res.update(r=quantize_model(sm, config, windows=windows,
                                                                          progress=False)))
        reported[depth] = res["r"].timings["peak_memory_bytes"]
        whole[depth] = sum(p.numel() * p.element_size() for p in sm.model.parameters())
        one_block = sum(p.numel() * p.element_size() for p in sm.layers[0].parameters())
        assert peaks[depth] <= one_block  # at a block's start only that block is on the device
    assert whole[32] > 3 * whole[8]  # the deep model is ~4x larger in full ...
    assert peaks[32] == peaks[8]  # ... but one block at a time is the same size
    assert reported[32] < 1.25 * reported[8]
