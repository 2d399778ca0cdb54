"""Zero-shot tasks: offline readers, a batched log-likelihood scorer, and paired significance tests.

A candidate is *task-lossless* when its zero-shot accuracy stays within the natural sampling
variance of the reference's on the same items. The flow is one-way:

    load_task    task file -> list[Item]            (first ``limit`` items, file order)
    score_task   model + items -> TaskResult        (per-item correctness vectors)
    compare_tasks  reference vs candidate results  -> delta, McNemar p, bootstrap CI, verdict

Prompts (fixed, so an outside script can rebuild them; they follow the zero-shot conventions of
lm-evaluation-harness):

    piqa, arc_easy, arc_challenge, boolq   context = query.rstrip() + "\\nAnswer:", continuation = " " + choice
    winogrande   context = each context option, continuation = " " + the shared continuation (partial scoring)
    hellaswag    context = line 1 of the item, continuation = " " + ending
    lambada      context, continuation = " " + target word(s); scored by greedy exact match

Each (context, continuation) pair is one *request*. Its log-likelihood is

    LL = sum_{j in continuation} log softmax(logits_{j-1})[token_j],

from one causal forward over ``prefix + context_tokens + continuation_tokens`` (prefix = [BOS] when
the tokenizer adds one by itself, else empty).
"""

from __future__ import annotations

import bz2
import hashlib
import inspect
import json
import math
import os
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from scipy.stats import binomtest

from ..util.errors import SlqError
from ..util.progress import progress_bar

# ----------------------------------------------------------------------------- items and readers


class Request(NamedTuple):
    """One string pair to score: log p(continuation | context)."""

    context: str
    continuation: str


@dataclass(frozen=True)
class Item:
    """One task example: a request per choice and the index of the right one.

    LAMBADA items hold a single request and ``gold == 0``: the "choice" is whether greedy decoding
    reproduces the continuation.
    """

    requests: tuple[Request, ...]
    gold: int


def _jsonl_rows(path: Path, limit: int | None) -> Iterator[dict]:
    """The first ``limit`` non-empty JSON lines of ``path`` (all when ``limit`` is None)."""
    with path.open(encoding="utf-8") as f:
        rows = (json.loads(line) for line in f if line.strip())
        yield from islice(rows, limit)


def read_multiple_choice(path: Path, limit: int | None = None) -> list[Item]:
    """``{"query", "choices", "gold"}`` lines (PIQA, ARC, BoolQ) -> Items with an ``Answer:`` prompt."""
    items = []
    for row in _jsonl_rows(path, limit):
        context = row["query"].rstrip() + "\nAnswer:"
        requests = tuple(Request(context, " " + choice) for choice in row["choices"])
        items.append(_checked(Item(requests, int(row["gold"])), path))
    return items


def read_winogrande(path: Path, limit: int | None = None) -> list[Item]:
    """``{"context_options": [2], "continuation", "gold"}`` -> Items scoring the shared continuation."""
    items = []
    for row in _jsonl_rows(path, limit):
        tail = " " + row["continuation"]
        requests = tuple(Request(option, tail) for option in row["context_options"])
        items.append(_checked(Item(requests, int(row["gold"])), path))
    return items


def read_lambada(path: Path, limit: int | None = None) -> list[Item]:
    """``{"context", "continuation"}`` -> single-request Items (greedy exact-match task)."""
    return [
        _checked(Item((Request(row["context"], " " + row["continuation"]),), 0), path)
        for row in _jsonl_rows(path, limit)
    ]


def read_hellaswag(path: Path, limit: int | None = None) -> list[Item]:
    """bz2 text, 6 lines per item: context, gold label (0-3), four endings."""
    items = []
    with bz2.open(path, "rt", encoding="utf-8") as f:
        lines = (line.rstrip("\n") for line in f)
        while limit is None or len(items) < limit:
            block = list(islice(lines, 6))
            if not block or block == [""]:
                break
            if len(block) != 6 or not block[1].strip().isdigit():
                raise SlqError(f"{path}: item {len(items)}: expected 6 lines (context, label 0-3, 4 endings)")
            requests = tuple(Request(block[0], " " + ending) for ending in block[2:])
            items.append(_checked(Item(requests, int(block[1])), path))
    return items


def _checked(item: Item, path: Path) -> Item:
    if not 0 <= item.gold < len(item.requests):
        raise SlqError(f"{path}: gold index {item.gold} outside 0..{len(item.requests) - 1}")
    return item


@dataclass(frozen=True)
class TaskSpec:
    """How to read and score one task; ``metric`` is the accuracy that ``compare_tasks`` tests."""

    filename: str
    reader: Callable[[Path, int | None], list[Item]]
    greedy: bool = False
    metric: str = "acc"


TASKS: dict[str, TaskSpec] = {
    "piqa": TaskSpec("piqa.jsonl", read_multiple_choice),
    "arc_easy": TaskSpec("arc_easy.jsonl", read_multiple_choice),
    "arc_challenge": TaskSpec("arc_challenge.jsonl", read_multiple_choice),
    "boolq": TaskSpec("boolq.jsonl", read_multiple_choice),
    "winogrande": TaskSpec("winogrande.jsonl", read_winogrande),
    "hellaswag": TaskSpec("hellaswag_val_full.txt.bz2", read_hellaswag, metric="acc_norm"),
    "lambada": TaskSpec("lambada_openai.jsonl", read_lambada, greedy=True),
}


def task_spec(name: str) -> TaskSpec:
    """The registry entry for ``name``, or a one-line error listing the known names."""
    if name not in TASKS:
        raise SlqError(f"unknown task {name!r}; known: {', '.join(TASKS)}")
    return TASKS[name]


def default_task_dir() -> Path:
    """``$SLQ_TASK_DIR`` if set, else ``<repo>/../shared/data/tasks`` when it exists."""
    env = os.environ.get("SLQ_TASK_DIR")
    if env:
        return Path(env).expanduser()
    repo = Path(__file__).resolve().parents[3]
    shared = repo.parent / "shared" / "data" / "tasks"
    if shared.is_dir():
        return shared
    raise SlqError(f"no task directory: pass data_dir, or set SLQ_TASK_DIR (looked for {shared})")


def load_task(name: str, data_dir: str | Path | None = None, limit: int | None = None) -> list[Item]:
    """The items of task ``name`` read from ``data_dir`` (default: ``default_task_dir()``).

    ``limit=K`` keeps the first K items in file order: no shuffling, so every run, reference and
    candidate alike, sees the same items. ``None`` keeps all of them.
    """
    spec = task_spec(name)
    if limit is not None and limit < 0:
        raise SlqError(f"limit must be >= 0, got {limit}")
    path = Path(data_dir).expanduser() if data_dir is not None else default_task_dir()
    path = path / spec.filename
    if not path.is_file():
        raise SlqError(f"task file not found: {path}")
    return spec.reader(path, limit)


# ----------------------------------------------------------------------------- tokenization


def bos_prefix(tokenizer) -> list[int]:
    """``[bos_token_id]`` when the tokenizer prepends BOS on its own, else ``[]``.

    Requests are encoded without special tokens and this prefix is added once, so a context and
    its context+continuation string can never disagree on whether a BOS is present.
    """
    bos = tokenizer.bos_token_id
    ids = tokenizer("a").input_ids
    return [bos] if bos is not None and len(ids) > 0 and ids[0] == bos else []


def encode_request(tokenizer, request: Request, prefix: Sequence[int]) -> tuple[list[int], int]:
    """Token ids ``prefix + context + continuation`` and the continuation's token count.

    Trailing whitespace of the context moves onto the continuation. The continuation tokens are
    the tail of ``encode(context + continuation)`` past ``len(encode(context))``, so a token that
    the joined string merges across the boundary counts as continuation.
    """
    context, continuation = request
    n_ws = len(context) - len(context.rstrip())
    if n_ws:
        context, continuation = context[:-n_ws], context[-n_ws:] + continuation
    whole = tokenizer(context + continuation, add_special_tokens=False).input_ids
    ctx = tokenizer(context, add_special_tokens=False).input_ids
    cont = whole[len(ctx):]
    if not cont:
        raise SlqError(f"continuation {continuation!r} encodes to no tokens after its context")
    start = list(prefix)
    if not start and not ctx:  # nothing to condition the first continuation token on
        start = [tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.bos_token_id]
    return start + ctx + cont, len(cont)


def model_max_length(model, tokenizer) -> int:
    """Longest input the model accepts: its config's position limit, else the tokenizer's, else 2048."""
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(model.config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    value = getattr(tokenizer, "model_max_length", None)
    return value if isinstance(value, int) and 0 < value < 1_000_000 else 2048


# ----------------------------------------------------------------------------- batched scoring


def _forward_at(model, ids: torch.Tensor, mask: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Logits ``[B, len(keep), V]`` at sequence positions ``keep``, projecting only those when the
    model supports ``logits_to_keep`` (saves a ``[B, T, V]`` tensor on large vocabularies)."""
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        return model(input_ids=ids, attention_mask=mask, logits_to_keep=keep, use_cache=False).logits
    return model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, keep]


def _score_batch(model, rows: list[list[int]], cont_lens: list[int], device, pad_id: int):
    """Summed continuation log-likelihood and greedy match for each row of one right-padded batch.

    Row ``i`` has input ``x = full[:-1]`` of length ``L``; positions ``L-c .. L-1`` predict the
    last ``c`` tokens of ``full``. Returns float64 ``ll[B]`` and bool ``greedy[B]``.
    """
    lengths = [len(r) - 1 for r in rows]
    ids = torch.full((len(rows), max(lengths)), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, (r, n) in enumerate(zip(rows, lengths)):
        ids[i, :n] = torch.tensor(r[:-1])
        mask[i, :n] = 1
    positions = [np.arange(n - c, n) for n, c in zip(lengths, cont_lens)]
    keep = np.unique(np.concatenate(positions))
    row_of = np.concatenate([np.full(c, i) for i, c in enumerate(cont_lens)])
    col_of = np.searchsorted(keep, np.concatenate(positions))
    targets = torch.tensor([t for r, c in zip(rows, cont_lens) for t in r[-c:]])
    logits = _forward_at(model, ids.to(device), mask.to(device), torch.from_numpy(keep).to(device))
    # fp64 log-softmax where the logits are (moving [tokens, V] to the host was most of the time on a GPU)
    picked = logits[torch.from_numpy(row_of).to(device), torch.from_numpy(col_of).to(device)].double()
    targets = targets.to(picked.device)
    token_ll = picked.log_softmax(-1).gather(1, targets[:, None])[:, 0].cpu().numpy()
    token_miss = (picked.argmax(-1) != targets).cpu().numpy()
    ll = np.bincount(row_of, weights=token_ll, minlength=len(rows))
    greedy = np.bincount(row_of, weights=token_miss, minlength=len(rows)) == 0
    return ll, greedy


def score_requests(
    model,
    tokens: Sequence[Sequence[int]],
    cont_lens: Sequence[int],
    *,
    batch_size: int = 16,
    device: str | torch.device | None = "cpu",
    max_length: int,
    progress: bool = True,
    description: str = "scoring",
) -> tuple[np.ndarray, np.ndarray]:
    """Log-likelihood and greedy exact match of the last ``cont_lens[i]`` tokens of each ``tokens[i]``.

    Sequences longer than ``max_length + 1`` lose tokens from the left. Requests run longest first
    (less padding; an out-of-memory shows up in the first batch) and come back in input order.
    """
    if device is None:
        device = next(model.parameters()).device
    n = len(tokens)
    rows = [list(t[-(max_length + 1):]) for t in tokens]
    for r, c in zip(rows, cont_lens):
        if not 0 < c < len(r):
            raise SlqError(f"continuation of {c} tokens does not fit a window of {max_length} tokens")
    order = sorted(range(n), key=lambda i: -len(rows[i]))
    ll, greedy = np.empty(n), np.empty(n, dtype=bool)
    pad_id = 0
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), progress_bar(progress) as bar:
            task = bar.add_task(description, total=n)
            for start in range(0, n, batch_size):
                idx = order[start:start + batch_size]
                batch_ll, batch_greedy = _score_batch(
                    model, [rows[i] for i in idx], [cont_lens[i] for i in idx], device, pad_id
                )
                ll[idx], greedy[idx] = batch_ll, batch_greedy
                bar.advance(task, len(idx))
    finally:
        model.train(was_training)
    return ll, greedy


@dataclass
class TaskResult:
    """Scores of one model on one task.

    ``metrics``: ``acc`` for every task; ``acc_norm`` for multiple-choice tasks (each choice's
    log-likelihood divided by its continuation's length in characters, leading space included;
    equal to ``acc`` on WinoGrande, whose continuation is shared); on LAMBADA ``ppl`` =
    exp(sum NLL / sum tokens) over all continuation tokens and ``ppl_item`` = exp(mean over
    items of the summed NLL) (the lm-evaluation-harness convention).
    ``correct[m]``: bool ``[n]`` per accuracy metric ``m``. ``loglikelihoods[i]``/``token_counts[i]``:
    per choice of item ``i``. ``metric``: the accuracy ``compare_tasks`` tests.
    ``items_digest`` fingerprints the prompts, so a comparison can refuse different item sets.
    """

    name: str
    n: int
    metrics: dict[str, float]
    correct: dict[str, np.ndarray]
    metric: str = "acc"
    loglikelihoods: list[np.ndarray] = field(default_factory=list, repr=False)
    token_counts: list[np.ndarray] = field(default_factory=list, repr=False)
    items_digest: str = ""

    @property
    def acc(self) -> float:
        return self.metrics["acc"]

    def to_dict(self) -> dict:
        """JSON-ready summary (no per-item arrays)."""
        return {"name": self.name, "n": self.n, "metric": self.metric, "metrics": dict(self.metrics)}


def items_digest(items: Iterable[Item]) -> str:
    """sha256 of the items' prompts and gold labels."""
    h = hashlib.sha256()
    for item in items:
        h.update(json.dumps([item.gold, item.requests]).encode())
    return h.hexdigest()[:16]


def score_task(
    model,
    tokenizer,
    name: str,
    items: Sequence[Item],
    *,
    batch_size: int = 16,
    device: str | torch.device | None = "cpu",
    progress: bool = True,
    max_length: int | None = None,
) -> TaskResult:
    """Score ``items`` of task ``name`` with one batched forward per ``batch_size`` requests.

    Multiple choice: ``pred = argmax_k LL_k`` (ties go to the lowest index), ``acc = mean(pred == gold)``;
    ``acc_norm`` uses ``LL_k / len(continuation_k)``. LAMBADA: an item is correct when the argmax
    at every continuation position is the target token. ``device`` is where inputs go (None: the
    model's device); the model is not moved. ``max_length`` defaults to ``model_max_length``.
    """
    spec = task_spec(name)
    if not items:
        raise SlqError(f"{name}: no items to score")
    prefix = bos_prefix(tokenizer)
    owner, tokens, cont_lens, chars = [], [], [], []
    for i, item in enumerate(items):
        for request in item.requests:
            ids, c = encode_request(tokenizer, request, prefix)
            owner.append(i)
            tokens.append(ids)
            cont_lens.append(c)
            chars.append(len(request.continuation))
    ll, greedy = score_requests(
        model, tokens, cont_lens, batch_size=batch_size, device=device,
        max_length=max_length or model_max_length(model, tokenizer), progress=progress, description=name,
    )
    bounds = np.cumsum([0] + [len(item.requests) for item in items])
    per_item = [ll[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    counts = [np.asarray(cont_lens[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
    if spec.greedy:
        correct = {"acc": greedy[bounds[:-1]]}
        nll = -ll[bounds[:-1]]
        metrics = {
            "ppl": float(math.exp(nll.sum() / sum(c.sum() for c in counts))),
            "ppl_item": float(math.exp(nll.mean())),
        }
    else:
        gold = np.array([item.gold for item in items])
        norm = [x / np.asarray(chars[a:b]) for x, a, b in zip(per_item, bounds[:-1], bounds[1:])]
        correct = {
            "acc": np.array([np.argmax(x) for x in per_item]) == gold,
            "acc_norm": np.array([np.argmax(x) for x in norm]) == gold,
        }
        metrics = {}
    metrics = {m: float(v.mean()) for m, v in correct.items()} | metrics
    return TaskResult(name, len(items), metrics, correct, spec.metric, per_item, counts, items_digest(items))


# ----------------------------------------------------------------------------- paired comparison


def mcnemar_exact(b: int, c: int) -> float:
    """Exact McNemar p-value: two-sided binomial test of ``b`` successes in ``b + c`` trials at 1/2.

    ``b``, ``c`` are the discordant counts (reference right / candidate wrong and the reverse);
    no discordant pairs gives p = 1.
    """
    return 1.0 if b + c == 0 else float(binomtest(b, b + c, 0.5, alternative="two-sided").pvalue)


def bootstrap_deltas(ref: np.ndarray, cand: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """``n_boot`` paired-bootstrap replicates of ``mean(cand) - mean(ref)``.

    Resampling n items with replacement only matters through how many of them fall in each
    pair class, so a replicate is ``(N_up - N_down) / n`` with
    ``(N_up, N_down, N_same) ~ Multinomial(n, (n_up, n_down, n_same) / n)``: the same distribution
    as index resampling in O(n_boot) memory.
    """
    ref, cand = np.asarray(ref, bool), np.asarray(cand, bool)
    n = len(ref)
    up, down = int(np.sum(cand & ~ref)), int(np.sum(ref & ~cand))
    draws = rng.multinomial(n, [up / n, down / n, (n - up - down) / n], size=n_boot)
    return (draws[:, 0] - draws[:, 1]) / n


def _interval(deltas: np.ndarray) -> list[float]:
    lo, hi = np.quantile(deltas, [0.025, 0.975])
    return [float(lo), float(hi)]


def _verdict(delta: float, ci: list[float], tolerance: float) -> bool:
    """The acceptance rule (``lossless``): the 95% interval contains 0 and ``|delta| <= tolerance``."""
    return bool(ci[0] <= 0.0 <= ci[1] and abs(delta) <= tolerance)


def task_verdict(delta: float, ci: list[float], tolerance: float) -> str:
    """What the paired test supports, in words; ``t`` = ``tolerance``, ``[lo, hi]`` = the 95% interval:

    - ``"not lossless"``: ``hi < 0`` or ``lo > 0``, the change is significant at 5%;
    - ``"undetermined"``: 0 is inside ``[lo, hi]`` but the interval is wider than the tolerance on both
      sides of 0 (``lo < -t`` and ``hi > t``: too few items to tell a loss or a gain larger than the
      tolerance from none), or ``|delta| > t`` (a change beyond the tolerance that is not significant);
    - ``"lossless"``: otherwise, i.e. 0 in ``[lo, hi]``, ``|delta| <= t``, and at least one side of the
      interval within the tolerance.

    ``lossless`` (the boolean the search accepts by) equals ``verdict == "lossless"`` except where the
    interval is wider than the tolerance on both sides with ``|delta| <= t``: the boolean says yes, the
    verdict says ``undetermined``.
    """
    lo, hi = ci
    if hi < 0.0 or lo > 0.0:
        return "not lossless"
    if (lo < -tolerance and hi > tolerance) or abs(delta) > tolerance:
        return "undetermined"
    return "lossless"


def _task_rng(seed: int, name: str) -> np.random.Generator:
    """A stream per (seed, task name): results do not depend on the order of the tasks."""
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def compare_tasks(
    ref_results: Mapping[str, TaskResult],
    cand_results: Mapping[str, TaskResult],
    *,
    tolerance: float = 0.01,
    n_boot: int = 2000,
    seed: int = 0,
) -> dict:
    """Paired test of candidate vs reference accuracy per task, plus their average.

    Per task (on ``TaskResult.metric``): ``delta = acc_cand - acc_ref``; ``p_value`` = exact McNemar
    on the discordant pairs; ``ci95`` = 2.5/97.5 percentiles of the paired bootstrap of delta;
    ``se_reference = sqrt(a (1 - a) / n)``, the reference's own sampling error; ``lossless`` =
    ``ci95`` contains 0 and ``|delta| <= tolerance`` (the search's acceptance rule); ``verdict`` =
    ``"lossless"``, ``"not lossless"`` or ``"undetermined"`` (:func:`task_verdict`), what is printed.

    ``average``: means over tasks of the accuracies and deltas; its bootstrap resamples items within
    each task and averages the task replicates; ``se_reference = sqrt(sum se_t^2) / T``; ``p_value``
    is McNemar on the discordant pairs pooled over all tasks; ``n`` is the total item count.
    """
    if set(ref_results) != set(cand_results):
        raise SlqError(f"task sets differ: {sorted(ref_results)} vs {sorted(cand_results)}")
    if not ref_results:
        raise SlqError("no tasks to compare")
    out: dict = {}
    boots, b_total, c_total = [], 0, 0
    for name, ref in ref_results.items():
        cand = cand_results[name]
        if ref.n != cand.n or (ref.items_digest and cand.items_digest and ref.items_digest != cand.items_digest):
            raise SlqError(f"{name}: reference and candidate were scored on different items")
        r, c = np.asarray(ref.correct[ref.metric], bool), np.asarray(cand.correct[ref.metric], bool)
        b, c_up = int(np.sum(r & ~c)), int(np.sum(c & ~r))
        b_total, c_total = b_total + b, c_total + c_up
        boot = bootstrap_deltas(r, c, n_boot, _task_rng(seed, name))
        boots.append(boot)
        a_ref, a_cand = float(r.mean()), float(c.mean())
        delta, ci = a_cand - a_ref, _interval(boot)
        out[name] = {
            "metric": ref.metric, "n": int(ref.n),
            "acc_reference": a_ref, "acc_candidate": a_cand, "delta": delta, "ci95": ci,
            "p_value": mcnemar_exact(b, c_up), "se_reference": math.sqrt(a_ref * (1 - a_ref) / ref.n),
            "lossless": _verdict(delta, ci, tolerance), "verdict": task_verdict(delta, ci, tolerance),
        }
    tasks = list(out)
    delta = float(np.mean([out[t]["delta"] for t in tasks]))
    ci = _interval(np.mean(boots, axis=0))
    out["average"] = {
        "metric": "mean", "n": int(sum(out[t]["n"] for t in tasks)), "tasks": tasks,
        "acc_reference": float(np.mean([out[t]["acc_reference"] for t in tasks])),
        "acc_candidate": float(np.mean([out[t]["acc_candidate"] for t in tasks])),
        "delta": delta, "ci95": ci, "p_value": mcnemar_exact(b_total, c_total),
        "se_reference": math.sqrt(sum(out[t]["se_reference"] ** 2 for t in tasks)) / len(tasks),
        "lossless": _verdict(delta, ci, tolerance), "verdict": task_verdict(delta, ci, tolerance),
    }
    return out


def run_tasks(
    reference,
    candidate,
    tokenizer,
    names: Sequence[str],
    *,
    limit: int | None = None,
    data_dir: str | Path | None = None,
    batch_size: int = 16,
    device: str | torch.device | None = "cpu",
    progress: bool = True,
    tolerance: float = 0.01,
    n_boot: int = 2000,
    seed: int = 0,
    backend: str = "builtin",
) -> dict:
    """Load each task, score both models on the same items, and ``compare_tasks`` them.

    ``backend``: ``"builtin"`` (this module's readers and scorer, offline) or ``"lm-eval"``
    (lm-evaluation-harness scores both models; its per-item results feed the same paired test, see
    :func:`lm_eval_results`).

    Returns ``compare_tasks``' dict with each task's full metric dicts added as
    ``metrics_reference`` and ``metrics_candidate`` (e.g. LAMBADA perplexity).
    """
    if backend not in TASK_BACKENDS:
        raise SlqError(f"unknown task backend {backend!r}; choose one of {', '.join(TASK_BACKENDS)}")
    refs, cands = {}, {}
    if backend == "lm-eval":
        refs = lm_eval_results(reference, tokenizer, names, limit=limit, batch_size=batch_size, device=device)
        cands = lm_eval_results(candidate, tokenizer, names, limit=limit, batch_size=batch_size, device=device)
    for name in names if backend == "builtin" else ():
        items = load_task(name, data_dir, limit)
        kw = dict(batch_size=batch_size, device=device, progress=progress)
        refs[name] = score_task(reference, tokenizer, name, items, **kw)
        cands[name] = score_task(candidate, tokenizer, name, items, **kw)
    out = compare_tasks(refs, cands, tolerance=tolerance, n_boot=n_boot, seed=seed)
    for name in names:
        out[name]["metrics_reference"] = dict(refs[name].metrics)
        out[name]["metrics_candidate"] = dict(cands[name].metrics)
    return out


# ----------------------------------------------------------------------------- optional lm-eval


_LM_EVAL_NAMES = {"lambada": "lambada_openai"}
TASK_BACKENDS = ("builtin", "lm-eval")


def require_lm_eval():
    """lm-eval's ``simple_evaluate`` and ``HFLM``; one SlqError line when the package is absent."""
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
    except ImportError as e:
        raise SlqError("lm-eval is not installed: the lm-eval task backend needs it (pip install lm-eval); the "
                       "built-in backend needs no extra package") from e
    return simple_evaluate, HFLM


def lm_eval_samples_to_result(name: str, samples: Sequence[Mapping], metric: str) -> TaskResult:
    """A :class:`TaskResult` from lm-eval's logged samples of one task (``log_samples=True``: one dict per
    document with its ``doc_id`` and per-document metric values, 1.0/0.0 for accuracies).

    Items are ordered by ``doc_id``; ``correct[m]`` is ``value > 0.5`` for each accuracy metric present
    (``acc``, ``acc_norm``); ``items_digest`` fingerprints the ``(doc_id, prompt_hash)`` pairs, so the two
    models of a comparison are refused unless lm-eval gave them the same documents and prompts.
    """
    rows = sorted(samples, key=lambda r: r["doc_id"])
    if not rows:
        raise SlqError(f"lm-eval returned no samples for {name}")
    correct = {m: np.array([float(r[m]) > 0.5 for r in rows]) for m in ("acc", "acc_norm") if m in rows[0]}
    if metric not in correct:
        metric = "acc" if "acc" in correct else next(iter(correct), None)
    if metric is None:
        raise SlqError(f"lm-eval's {name} has no per-item accuracy (acc or acc_norm) to compare")
    h = hashlib.sha256(json.dumps([[r["doc_id"], r.get("prompt_hash", "")] for r in rows]).encode())
    metrics = {m: float(v.mean()) for m, v in correct.items()}
    return TaskResult(name, len(rows), metrics, correct, metric, items_digest=h.hexdigest()[:16])


def lm_eval_results(model, tokenizer, names: Sequence[str], *, limit: int | None = None, batch_size: int = 16,
                    device=None) -> dict[str, TaskResult]:
    """Score an in-memory model with lm-evaluation-harness (``simple_evaluate`` on an ``HFLM`` wrapper,
    ``log_samples=True``) and return a :class:`TaskResult` per task of ``names`` (our names; ``lambada``
    is lm-eval's ``lambada_openai``). The metric tested is the built-in backend's for the task (e.g.
    ``acc_norm`` for hellaswag). lm-eval fetches its data sets from the Hugging Face Hub."""
    simple_evaluate, HFLM = require_lm_eval()
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size,
              device=None if device is None else str(device))
    ours = {_LM_EVAL_NAMES.get(t, t): t for t in names}
    out = simple_evaluate(model=lm, tasks=list(ours), limit=limit, log_samples=True)
    samples = out.get("samples") or {}
    res = {}
    for theirs, name in ours.items():
        if theirs not in samples:
            raise SlqError(f"lm-eval returned no per-item results for {theirs}")
        metric = TASKS[name].metric if name in TASKS else "acc"
        res[name] = lm_eval_samples_to_result(name, samples[theirs], metric)
    return res


def lm_eval_adapter(model, tokenizer, tasks: Sequence[str], limit: int | None = None, *, batch_size: int = 16) -> dict:
    """Run lm-evaluation-harness's ``simple_evaluate`` on an in-memory model (optional cross-check).

    Our task names map to lm-eval's (``lambada`` -> ``lambada_openai``). lm-eval fetches its data
    sets from the Hugging Face Hub, so this needs a network. Returns lm-eval's ``results`` dict.
    """
    simple_evaluate, HFLM = require_lm_eval()
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    names = [_LM_EVAL_NAMES.get(t, t) for t in tasks]
    return simple_evaluate(model=lm, tasks=names, limit=limit)["results"]
