"""The uniform pipeline's quantized head (QuantConfig.head_bits): its Hessian is that of the final-normed hidden
states, and it lowers bits_per_param_model by exactly what its shapes say."""

import pytest
import torch

from slq.quant.calib import capture_layer0_inputs, head_hessian, run_layer
from slq.quant.config import QuantConfig
from slq.quant.pipeline import build_report, quantize_model


def test_head_hessian_is_that_of_the_final_normed_hidden_states(stories, tiny_windows):
    model, _ = stories
    w = tiny_windows[:3, :40]
    batches = capture_layer0_inputs(model, w, 2, "cpu")
    for layer in model.model.layers:
        batches = run_layer(layer, batches)
    H = head_hessian(model, batches).H
    with torch.no_grad():  # oracle: transformers' last hidden state is already normed (the head's input)
        X = model(input_ids=w, output_hidden_states=True).hidden_states[-1].reshape(-1, 64).double()
    ref = 2.0 / X.shape[0] * X.T @ X  # fp32 products in the accumulator: compare at fp32's precision of the scale
    torch.testing.assert_close(H, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))


def test_head_bits_lowers_bits_per_param_by_the_heads_saving(stories_dir, tiny_windows):
    """stories260K is untied, fp32: the head goes from 32 bits to 8 + (16 + 8) / 32 bits per weight."""
    from slq.models.sources import load_model

    reps = {}
    for hb in (None, 8):
        model, _ = load_model(stories_dir)
        cfg = QuantConfig(bits=4, group_size=32, head_bits=hb, calib_samples=4, seq_len=64)
        res = quantize_model(model, cfg, windows=tiny_windows[:4, :64], progress=False)
        reps[hb] = build_report(model, stories_dir, res.plan, cfg.spec)
        assert ("lm_head" in res.qweights) == (hb is not None)
    V, H = model.lm_head.weight.shape
    n = sum(p.numel() for p in model.parameters())
    assert not model.config.tie_word_embeddings
    saving = V * H * (32 - (8 + (16 + 8) / 32)) / n
    assert reps[None]["bits_per_param_model"] - reps[8]["bits_per_param_model"] == pytest.approx(saving, rel=1e-9)
    assert "lm_head" in reps[8]["plan"] and "lm_head" not in reps[None]["plan"]  # the head is in the plan
