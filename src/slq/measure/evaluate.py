"""`slq.evaluate`: how lossless is a candidate? Distribution metrics, on-policy EAR, zero-shot tasks."""

from __future__ import annotations

import time

import torch

from .data import GENERATED, windows_from_source
from ..util.errors import SlqError
from .fidelity import Fidelity, compare_windows, on_policy_ear

ON_POLICY_PROMPT = 32  # tokens of data text each on-policy continuation starts from
ON_POLICY_NEW = 128  # tokens sampled from the reference after each prompt


def _as_model(x):
    """The ``(model, tokenizer)`` pair; paths and hub ids are opened by :func:`slq.evaluate` (``slq.api``)."""
    if isinstance(x, tuple) and len(x) == 2:
        return x
    raise TypeError(f"expected a (model, tokenizer) pair, got {type(x).__name__}; slq.evaluate opens paths")


def evaluate(
    reference,
    candidate,
    *,
    data: str | None = GENERATED,
    tokens: int = 16 * 512,
    seq_len: int = 512,
    skip_windows: int = 0,
    on_policy: int = 0,
    tasks: list[str] | None = None,
    limit: int | None = None,
    task_dir: str | None = None,
    temperature: float = 1.0,
    batch_size: int = 8,
    device: str = "cpu",
    seed: int = 0,
    progress: bool = True,
    windows: torch.Tensor | None = None,
) -> Fidelity:
    """Compare ``candidate`` to ``reference`` on the same tokens.

    ``reference``/``candidate``: in-memory ``(model, tokenizer)`` pairs (:func:`slq.evaluate` opens paths).
    ``tokens``/``seq_len``: ``tokens // seq_len`` windows of ``data`` (consecutive,
    non-overlapping slices of ``tokenizer(text).input_ids`` after ``skip_windows``).
    ``on_policy``: number of continuations sampled from the reference (``ON_POLICY_NEW``
    tokens after a ``ON_POLICY_PROMPT``-token prompt from the data) and scored by both.
    ``tasks``: zero-shot task names with a paired test per task (``limit`` items each).
    """
    if device == "cuda" and not torch.cuda.is_available():
        raise SlqError("--device cuda was asked for but CUDA is not available")
    if temperature <= 0:
        raise SlqError(f"temperature must be > 0, got {temperature}")
    ref, tok = _as_model(reference)
    cand, tok_c = _as_model(candidate)
    if ref.config.vocab_size != cand.config.vocab_size or tok.get_vocab() != tok_c.get_vocab():
        raise SlqError("reference and candidate use different tokenizers; they cannot be compared token by token")
    n = tokens // seq_len
    if windows is None:
        if n < 1:
            raise SlqError(f"--tokens {tokens} is less than one window of --seq-len {seq_len}")
        windows = windows_from_source(data, ref, tok, n=n, seq_len=seq_len, skip=skip_windows, seed=seed + 1,
                                      device=device)
    t0 = time.perf_counter()
    fid = compare_windows(ref, cand, windows, batch_size=batch_size, temperature=temperature, device=device,
                          progress=progress, seed=seed)
    fid.wall_s = time.perf_counter() - t0
    if on_policy:
        prompts = windows[:, :ON_POLICY_PROMPT]
        if prompts.shape[0] < on_policy:
            extra = windows_from_source(data, ref, tok, n=on_policy, seq_len=max(ON_POLICY_PROMPT, 2),
                                        skip=0, seed=seed + 2, device=device)
            prompts = extra[:, :ON_POLICY_PROMPT]
        prompts = prompts[:on_policy]
        fid.on_policy = on_policy_ear(ref, cand, prompts, ON_POLICY_NEW, temperature=temperature, seed=seed,
                                      batch_size=batch_size, device=device, progress=progress)
    if tasks:
        from .tasks import run_tasks

        fid.tasks = run_tasks(ref, cand, tok, tasks, limit=limit, data_dir=task_dir, device=device,
                              progress=progress, seed=seed)
    return fid
