"""A StreamedModel computes what the model loaded whole computes: the same logits bit for bit (stories260K,
and a random Llama with tied embeddings), the same fidelity numbers when evaluation streams, and a quantized
candidate streamed from its codes equals the fake-quant model in memory. The oracle is transformers' own
in-memory forward."""

from __future__ import annotations

import pytest
import torch

from slq.measure.evaluate import evaluate
from slq.measure.fidelity import StreamedLogits
from slq.models.sources import load_model
from slq.models.stream import StreamedModel, checkpoint_bytes, should_stream
from slq.util.errors import SlqError


def _ids(n=4, L=33, V=512, seed=0):
    return torch.randint(0, V, (n, L), generator=torch.Generator().manual_seed(seed))


def _streamed_logits(sm, ids, batch_size):
    with torch.no_grad():
        batches = sm.hidden_states(ids, batch_size)
        with sm.head():
            return torch.cat([sm.logits(b.hidden) for b in batches])


def test_streamed_logits_equal_in_memory_logits_bit_for_bit(stories_dir):
    model, _ = load_model(stories_dir)
    ids = _ids()
    with torch.no_grad():
        ref = torch.cat([model(input_ids=ids[i:i + 2]).logits for i in (0, 2)])
    sm = StreamedModel(stories_dir)
    assert torch.equal(_streamed_logits(sm, ids, 2), ref)
    assert all(p.device.type == "meta" for p in sm.model.parameters())
    assert sm.live_bytes == 0
    assert 0 < sm.peak_bytes < sum(p.numel() * 4 for p in model.parameters()) / 2


def test_tied_head_streams_from_the_embedding(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(tmp_path)
    ids = _ids(2, 9, 128)
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    sm = StreamedModel(tmp_path)
    assert torch.equal(_streamed_logits(sm, ids, 2), ref)
    assert checkpoint_bytes(tmp_path) == sum(p.numel() * 4 for p in model.parameters())  # tied: stored once
    assert not should_stream(tmp_path, "cpu")


def test_streamed_evaluation_equals_in_memory_evaluation(stories_dir, tiny_windows):
    from slq.quant.config import QuantConfig
    from slq.quant.pipeline import quantize_model

    ref, tok = load_model(stories_dir)
    cand, _ = load_model(stories_dir)
    res = quantize_model(cand, QuantConfig(bits=3, group_size=32, method="rtn"), progress=False)
    windows = tiny_windows[:6, :40]
    kw = dict(windows=windows, batch_size=4, progress=False)
    whole = evaluate((ref, tok), (cand, tok), **kw).to_dict()
    overrides = {f"{n}.weight": q for n, q in res.qweights.items()}
    streamed = evaluate((StreamedModel(stories_dir), tok), (StreamedModel(stories_dir, overrides=overrides), tok),
                        **kw).to_dict()
    whole.pop("timing"), streamed.pop("timing")
    assert streamed == whole
    assert whole["ear"]["mean"] < 1.0  # the candidate differs from the reference: the comparison is not vacuous


def test_streamed_logits_refuse_unseen_windows(stories_dir):
    sm = StreamedModel(stories_dir)
    cache = StreamedLogits(sm).record(_ids(2, 9), batch_size=2)
    with pytest.raises(KeyError):
        cache(input_ids=_ids(2, 8, seed=5))
    cache.close()
    assert sm.live_bytes == 0


def test_a_directory_without_safetensors_is_one_clear_error(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(SlqError, match="no .safetensors"):
        StreamedModel(tmp_path)
