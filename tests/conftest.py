"""Shared fixtures: the offline data in ../shared (tests that need it skip when absent)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SLQ_SHARED", REPO.parent / "shared"))
STORIES = SHARED / "models" / "stories260K"
TINY_TEXT = SHARED / "data" / "calib" / "tiny.utf8"
WIKI_TEST = SHARED / "data" / "wikitext2" / "wiki.test.raw"

# The test models are tiny: one thread avoids OpenMP spin-waiting on a busy 2-core machine
# (seen here: a 0.3 s sampling test took 31 s with 2 threads under load).
torch.set_num_threads(int(os.environ.get("SLQ_TEST_THREADS", "1")))


def need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"shared data not available: {path} (see ../shared/data/README.md)")
    return path


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Each test session converts models into its own cache, never the user's."""
    monkeypatch.setenv("SLQ_CACHE", str(tmp_path_factory.getbasetemp() / "slq-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", os.environ.get("HF_HUB_OFFLINE", "0"))


@pytest.fixture(scope="session")
def stories_dir() -> Path:
    return need(STORIES)


@pytest.fixture
def stories(stories_dir):
    """(model, tokenizer) of the real 293k-parameter Llama, fp32, fresh each test."""
    from slq.models.sources import load_model

    return load_model(stories_dir)


@pytest.fixture(scope="session")
def tiny_windows(stories_dir):
    """16 calibration windows of 128 tokens from TinyStories text."""
    from transformers import AutoTokenizer

    from slq.measure.data import load_text, token_windows

    tok = AutoTokenizer.from_pretrained(stories_dir)
    return token_windows(tok, load_text(str(need(TINY_TEXT))), 128, 16)


@pytest.fixture
def rng():
    return torch.Generator().manual_seed(1234)


def hf_greedy(model, ids, n, **kw):
    """transformers' own greedy ``generate``: the oracle of slq's decode paths."""
    with torch.inference_mode():
        return model.generate(ids, max_new_tokens=n, do_sample=False, **kw)


def equal_length_ids(tok, prompts):
    """The prompts' token ids cut to the shortest one's length (a batch without padding)."""
    ids = [tok(p, return_tensors="pt").input_ids[0] for p in prompts]
    n = min(len(i) for i in ids)
    return torch.stack([i[:n] for i in ids])


def live_block_peak(sm, run) -> int:
    """Max, over every decoder block's start, of the bytes of a StreamedModel's non-meta parameters during run()."""
    peak = [0]

    def hook(*_):
        peak[0] = max(peak[0], sum(p.numel() * p.element_size() for p in sm.model.parameters()
                                   if p.device.type != "meta"))

    hs = [layer.register_forward_pre_hook(hook) for layer in sm.layers]
    try:
        run()
    finally:
        for h in hs:
            h.remove()
    return peak[0]
