"""`slq.evaluate`: how lossless is a candidate? Distribution metrics, on-policy EAR, zero-shot tasks.

Two judgements are made from a measurement, never more than its interval supports:

- :func:`ear_verdict` against a target EAR ``e``: with the 95% interval ``[lo, hi]`` of the mean EAR,
  ``pass`` when ``lo >= e`` (the target is met with 95% confidence), ``fail`` when ``hi < e`` (it is
  missed with 95% confidence), ``undetermined`` otherwise (the interval straddles the target: more
  tokens are needed to tell).
- the bootstrap interval over sequences is unreliable with few of them: below
  :data:`MIN_SEQUENCES` the caller is warned (:func:`few_sequences_warning`).

:func:`provenance` is what an evaluation's JSON records so that it can be re-run: the two model
sources, the data, ``seq_len``, the token and sequence counts, slq's and the libraries' versions, the
git commit and the UTC time.
"""

from __future__ import annotations

import math
import time
from datetime import datetime, timezone

import torch

from ..models.stream import StreamedModel
from ..util.errors import ConfigError, SlqError
from ..util.provenance import git_commit, versions
from .data import GENERATED, windows_from_source
from .fidelity import Fidelity, StreamedLogits, compare_windows, on_policy_ear
from .tasks import TASK_BACKENDS, require_lm_eval, run_tasks

MIN_SEQUENCES = 16  # fewer sequences than this: the bootstrap interval is shown with a warning

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
    tasks_backend: str = "builtin",
) -> Fidelity:
    """Compare ``candidate`` to ``reference`` on the same tokens.

    ``reference``/``candidate``: in-memory ``(model, tokenizer)`` pairs (:func:`slq.evaluate` opens paths);
    a model may be a :class:`slq.models.stream.StreamedModel` (weights read one block at a time; fixed windows
    only, its logits equal the in-memory model's bit for bit).
    ``tokens``/``seq_len``: ``tokens // seq_len`` windows of ``data`` (consecutive,
    non-overlapping slices of ``tokenizer(text).input_ids`` after ``skip_windows``).
    ``on_policy``: number of continuations sampled from the reference (``ON_POLICY_NEW``
    tokens after a ``ON_POLICY_PROMPT``-token prompt from the data) and scored by both.
    ``tasks``: zero-shot task names with a paired test per task (``limit`` items each), scored by
    ``tasks_backend`` (``"builtin"`` or ``"lm-eval"``, see :func:`slq.measure.tasks.run_tasks`).
    """
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device", "{field} cuda was asked for but CUDA is not available")
    if not (temperature > 0 and math.isfinite(temperature)):  # nan fails both comparisons
        raise ConfigError("temperature", f"{{field}} must be a finite number > 0, got {temperature}")
    if tasks and tasks_backend not in TASK_BACKENDS:
        raise SlqError(f"unknown tasks backend {tasks_backend!r}; choose one of {', '.join(TASK_BACKENDS)}")
    if tasks and tasks_backend == "lm-eval":
        require_lm_eval()  # absent: one line now, before the models are compared
    ref, tok = _as_model(reference)
    cand, tok_c = _as_model(candidate)
    if ref.config.vocab_size != cand.config.vocab_size or tok.get_vocab() != tok_c.get_vocab():
        raise SlqError("reference and candidate use different tokenizers; they cannot be compared token by token")
    n = tokens // seq_len
    if windows is None and isinstance(ref, StreamedModel) and (data is None or data == GENERATED):
        raise SlqError("generated evaluation data is sampled token by token from the reference, which a streamed "
                       "model cannot do block by block; give a text source as the data")
    if windows is None:
        if n < 1:
            raise ConfigError("tokens", f"{{field}} {tokens} is less than one window of seq_len {seq_len}")
        windows = windows_from_source(data, ref, tok, n=n, seq_len=seq_len, skip=skip_windows, seed=seed + 1,
                                      device=device, progress=progress)
    t0 = time.perf_counter()
    ref, cand = _streamed(ref, windows, batch_size, on_policy, tasks), _streamed(cand, windows, batch_size,
                                                                                 on_policy, tasks)
    fid = compare_windows(ref, cand, windows, batch_size=batch_size, temperature=temperature, device=device,
                          progress=progress, seed=seed)
    fid.wall_s = time.perf_counter() - t0
    for m in (ref, cand):
        if isinstance(m, StreamedLogits):
            m.close()
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

        fid.tasks = run_tasks(ref, cand, tok, tasks, limit=limit, data_dir=task_dir, device=device,
                              progress=progress, seed=seed, backend=tasks_backend)
    return fid


def _streamed(model, windows: torch.Tensor, batch_size: int, on_policy: int, tasks):
    """A :class:`StreamedModel` as the logits of its block-by-block forward over ``windows`` (see
    :class:`slq.measure.fidelity.StreamedLogits`); an in-memory model as it is."""
    if not isinstance(model, StreamedModel):
        return model
    if on_policy or tasks:
        raise SlqError("on-policy sampling and zero-shot tasks need the model in memory; a streamed model is "
                       "measured on fixed windows only")
    return StreamedLogits(model).record(windows, batch_size=batch_size)


def ear_verdict(ci95, target: float) -> str:
    """``pass``, ``fail`` or ``undetermined`` for a target EAR, from the 95% interval (module docstring)."""
    lo, hi = ci95
    if lo >= target:
        return "pass"
    if hi < target:
        return "fail"
    return "undetermined"


def few_sequences_warning(n_sequences: int) -> str | None:
    """A warning line when the interval rests on fewer than :data:`MIN_SEQUENCES` sequences, else None."""
    if n_sequences >= MIN_SEQUENCES:
        return None
    return (f"the 95% interval rests on {n_sequences} sequence(s), fewer than {MIN_SEQUENCES}: the bootstrap "
            f"over so few sequences is unreliable; measure more tokens")


def provenance(reference, candidate, *, data, seq_len: int, tokens: int, n_sequences: int, n_tokens: int,
               **extra) -> dict:
    """What produced an evaluation (module docstring): sources as given (``None``: the embedded default),
    data and sizes, versions, git commit and UTC time; ``extra`` keys are added as is."""
    return {
        "reference": _source(reference), "candidate": _source(candidate),
        "data": GENERATED if data is None else str(data), "seq_len": seq_len, "tokens_requested": tokens,
        "n_sequences": n_sequences, "n_tokens": n_tokens, "versions": versions(), "git_commit": git_commit(),
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"), **extra,
    }


def _source(x) -> str:
    """A model source as recorded: ``default``, an absolute path when it exists, else the hub id as given."""
    from pathlib import Path

    if x is None or x == "default":
        return "default"
    p = Path(str(x))
    return str(p.resolve()) if p.exists() else str(x)
