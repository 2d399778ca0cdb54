"""Model and text sources: GGUF, hub ids offline, windows, generated calibration."""

import json

import pytest
import torch

from slq.measure.data import generated_windows, load_text, token_windows, windows_from_source
from slq.util.errors import SlqError
from slq.models.sources import resolve_model

from conftest import SHARED, TINY_TEXT, need


def test_gguf_is_converted_once_and_matches_the_hf_model(stories_dir):
    from slq.models.sources import load_model

    gguf = need(SHARED / "models" / "stories260K.gguf")
    d1 = resolve_model(gguf)
    d2 = resolve_model(gguf)
    assert d1 == d2 and (d1 / "config.json").is_file()
    m_gguf, _ = load_model(d1)
    m_hf, _ = load_model(stories_dir)
    x = torch.tensor([[1, 403, 407, 261, 378]])
    with torch.no_grad():
        assert torch.allclose(m_gguf(x).logits, m_hf(x).logits, atol=1e-4)


def test_hub_id_offline_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SlqError, match="could not fetch 'some-org/some-model'"):
        resolve_model("some-org/some-model")


def test_windows_are_consecutive_slices_of_the_tokenized_text(stories):
    _, tok = stories
    text = load_text(str(need(TINY_TEXT)))
    ids = tok(text).input_ids
    w = token_windows(tok, text, 64, 5, skip=2)
    assert w.shape == (5, 64)
    assert w.flatten().tolist() == ids[2 * 64 : 7 * 64]
    with pytest.raises(SlqError, match="too few|only has"):
        token_windows(tok, "hello", 64, 1)


def test_jsonl_source(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_text(json.dumps({"text": "a b"}) + "\n\n" + json.dumps({"text": "c"}) + "\n")
    assert load_text(str(p)) == "a b\n\nc"
    p.write_text('{"body": "x"}\n')
    with pytest.raises(SlqError, match="'text' field"):
        load_text(str(p))


def test_generated_windows_are_deterministic_samples(stories):
    model, tok = stories
    a = generated_windows(model, tok, 3, 12, seed=5, batch_size=2)
    b = windows_from_source("generated", model, tok, n=3, seq_len=12, seed=5)
    c = generated_windows(model, tok, 3, 12, seed=6)
    assert a.shape == (3, 12) and torch.equal(a, b) and not torch.equal(a, c)
    assert (a[:, 0] == tok.bos_token_id).all()
    assert a[:, 1:].unique().numel() > 5  # real sampling, not a constant


def test_dataset_id_without_datasets_package_is_one_clear_error(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_datasets(name, *a, **k):
        if name == "datasets":
            raise ImportError("No module named 'datasets'")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_datasets)
    with pytest.raises(SlqError, match="pip install datasets"):
        load_text("wikitext:wikitext-2-raw-v1:test")
