"""Text sources and token windows, shared by calibration and evaluation.

A source is one of: a text file, a ``.jsonl`` file (one object per line with a ``text``
field), a Hugging Face dataset id (``name``, ``name:config`` or ``name:config:split``;
needs the optional ``datasets`` package and a network), or ``generated`` (sequences
sampled from the model itself at temperature 1: the offline default).

Windows are consecutive, non-overlapping ``seq_len`` slices of
``tokenizer(text).input_ids``, taken from the start (after skipping ``skip`` windows),
so an outside script can reproduce them exactly.

Only as much text as the windows need is read and tokenized (memory is flat in the file's size):
a prefix of the file, cut at a line end, is tokenized and grown (doubled) until it yields the
``(skip + n) * seq_len`` tokens plus a margin of ``MARGIN`` tokens. The margin is dropped, so a
token split by the cut never reaches a window: the windows equal those of the whole text's
tokenization. With ``n=None`` (every window) the whole text is needed and read.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..util.errors import SlqError
from .fidelity import sample_continuations

GENERATED = "generated"


MARGIN = 64  # tokens tokenized past what the windows need, then dropped (the cut's neighbourhood)


def load_text(source: str) -> str:
    """The raw text of a file, jsonl file or dataset id."""
    return read_text(source)[0]


def read_text(source: str, max_chars: int | None = None) -> tuple[str, bool]:
    """(text, complete): the text of a file, jsonl file or dataset id, or with ``max_chars`` a prefix of
    about that many characters ending at a line end; ``complete`` says whether it is the whole text."""
    p = Path(source).expanduser()
    if p.is_file():
        try:
            with p.open(encoding="utf-8") as f:
                text, complete = (_read_jsonl(f, p, max_chars) if p.suffix == ".jsonl" else _read_plain(f, max_chars))
        except UnicodeDecodeError as e:
            raise SlqError(f"{p} is not UTF-8 text") from e
        text = text.replace("\r\n", "\n")
    elif p.is_dir() or source.startswith((".", "/", "~")) or source.endswith((".txt", ".jsonl", ".raw")):
        raise SlqError(f"calibration/eval text not found: {source}")
    else:
        text, complete = _load_dataset_text(source), True
    if complete and not text.strip():
        raise SlqError(f"the text source {source} is empty")
    return text, complete


def _read_plain(f, max_chars: int | None) -> tuple[str, bool]:
    if max_chars is None:
        return f.read(), True
    text = f.read(max_chars)
    if not f.read(1):
        return text, True
    cut = text.rfind("\n")
    return (text[: cut + 1] if cut > len(text) // 2 else text), False


def _read_jsonl(f, p: Path, max_chars: int | None) -> tuple[str, bool]:
    texts, size = [], 0
    for i, line in enumerate(f, 1):
        if not line.strip():
            continue
        if max_chars is not None and size >= max_chars:
            return "\n\n".join(texts), False
        try:
            texts.append(json.loads(line)["text"])
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise SlqError(f"{p}:{i}: expected a JSON object with a 'text' field") from e
        size += len(texts[-1]) + 2
    return "\n\n".join(texts), True


def _load_dataset_text(spec: str) -> str:
    try:
        import datasets
    except ImportError as e:
        raise SlqError(
            f"'{spec}' is not a file; reading Hugging Face datasets needs `pip install datasets` (and a network)"
        ) from e
    parts = spec.split(":")
    name, config = parts[0], (parts[1] if len(parts) > 1 and parts[1] else None)
    split = parts[2] if len(parts) > 2 else "train"
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:
        raise SlqError(f"could not load dataset '{spec}' (offline or unknown id?): {str(e).splitlines()[0]}") from e
    column = "text" if "text" in ds.column_names else ds.column_names[0]
    return "\n\n".join(str(t) for t in ds[column])


def token_windows(tokenizer, text: str, seq_len: int, n: int | None = None, skip: int = 0) -> torch.Tensor:
    """LongTensor [n, seq_len]: windows skip .. skip+n-1 of tokenizer(text).input_ids."""
    if seq_len < 2:
        raise SlqError(f"seq_len must be >= 2, got {seq_len}")
    ids = tokenizer(text).input_ids
    available = len(ids) // seq_len - skip
    if available < 1:
        raise SlqError(f"the text has {len(ids)} tokens: too few for a window of {seq_len} after skipping {skip}")
    if n is None:
        n = available
    if n > available:
        raise SlqError(f"asked for {n} windows of {seq_len} tokens but the text only has {available} after skipping {skip}")
    t = torch.tensor(ids[(skip) * seq_len : (skip + n) * seq_len], dtype=torch.long)
    return t.view(n, seq_len)


def generated_windows(
    model, tokenizer, n: int, seq_len: int, *, seed: int = 0, batch_size: int = 32, device: str = "cpu",
    progress: bool = False,
) -> torch.Tensor:
    """n sequences of seq_len tokens sampled from the model at temperature 1 (no top-k/p),
    each starting from the BOS token (EOS if there is none). Sequence i depends only on
    (seed, i), not on the batch size."""

    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start is None:
        raise SlqError("the tokenizer has neither a BOS nor an EOS token to start generation from")
    prompts = torch.full((n, 1), start, dtype=torch.long)
    windows, _ = sample_continuations(model, prompts, seq_len - 1, seed=seed, batch_size=batch_size,
                                      device=device, progress=progress)
    return windows


def windows_from_source(
    source: str | None,
    model,
    tokenizer,
    *,
    n: int,
    seq_len: int,
    skip: int = 0,
    seed: int = 0,
    device: str = "cpu",
    progress: bool = False,
) -> torch.Tensor:
    """Windows from any source; ``None`` or ``"generated"`` samples from the model."""
    if source is None or source == GENERATED:
        # skip only matters for text; for generated data a different seed gives fresh windows
        return generated_windows(model, tokenizer, n, seq_len, seed=seed + 7919 * skip, device=device,
                                 progress=progress)
    return text_windows(tokenizer, source, seq_len, n, skip=skip)


def text_windows(tokenizer, source: str, seq_len: int, n: int | None = None, skip: int = 0,
                 chars_per_token: float = 6.0) -> torch.Tensor:
    """``token_windows`` of a text source, tokenizing a grown prefix only (see the module docstring)."""
    if n is None:
        return token_windows(tokenizer, load_text(source), seq_len, None, skip=skip)
    if seq_len < 2:
        raise SlqError(f"seq_len must be >= 2, got {seq_len}")
    need = (skip + n) * seq_len
    chars = int(chars_per_token * (need + MARGIN)) + 4096
    while True:
        text, complete = read_text(source, chars)
        if complete:
            return token_windows(tokenizer, text, seq_len, n, skip=skip)
        ids = tokenizer(text).input_ids
        if len(ids) >= need + MARGIN:
            return torch.tensor(ids[skip * seq_len: need], dtype=torch.long).view(n, seq_len)
        chars *= 2
