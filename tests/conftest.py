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
