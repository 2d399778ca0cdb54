"""Fidelity of a candidate (quantized) model Q to its reference P, measured on the same tokens.

At each position t, with temperature T, both distributions over the full vocabulary, in fp32:

    p_t = softmax(ref_logits_t / T)        q_t = softmax(cand_logits_t / T)

    ear_t        = sum_v min(p_t(v), q_t(v)) = 1 - TV(p_t, q_t)     acceptance rate of Q drafting for P
    kl_pq_t      = sum_v p_t(v) (log p_t(v) - log q_t(v))            KL(P || Q); kl_qp_t the reverse
    top1_t       = [argmax p_t == argmax q_t]
    dp_t         = q_t(x_{t+1}) - p_t(x_{t+1})                       x_{t+1} the observed next token
    nll_ref_t    = -log softmax(ref_logits_t)(x_{t+1})               always at T = 1 (perplexity is a
    nll_cand_t   = -log softmax(cand_logits_t)(x_{t+1})              property of the model, not the sampler)
    entropy_ref_t = -sum_v p_t(v) log p_t(v)
    ear_top10_t  = sum_{v in S} min(p_t(v)/p_t(S), q_t(v)/q_t(S)),  S = top-10 tokens of p_t

`ear_top10` is NOT the acceptance rate: it renormalizes both models over the reference's ten most likely
tokens, as some re-implementations of the paper do, and is blind to mass outside them. It is reported
only to compare with those numbers.

Two pure functions (`token_metrics` on logits, `bootstrap_ci` over sequences) and a streaming runner
(`compare_windows`) that pushes two models over token windows batch by batch and keeps per-token scalars
only: logits never outlive their batch, so memory does not grow with vocabulary x tokens.
`sample_continuations` draws on-policy text from the reference; `on_policy_ear` measures the candidate
on it, which is exactly the per-token acceptance rate a speculative decoder would see.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..util.progress import progress_bar

__all__ = [
    "EAR_TOP10_DEFINITION",
    "CachedLogits",
    "StreamedLogits",
    "Fidelity",
    "bootstrap_ci",
    "compare_windows",
    "on_policy_ear",
    "sample_continuations",
    "token_metrics",
]

TOP_K = 10
EAR_TOP10_DEFINITION = (
    "top-10 tokens of the reference; reference and candidate both renormalized over that set; "
    "not the acceptance rate (blind to mass outside the set)"
)
# Elements of one fp32 [rows, V] temporary in token_metrics: 2**24 floats = 64 MiB.
_CHUNK_ELEMENTS = 1 << 24


# ---------------------------------------------------------------------------------------------------------
# Pure metrics
# ---------------------------------------------------------------------------------------------------------


def _ear(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """sum_v min(p, q), computed as 1 - TV = 1 - |p - q|_1 / 2: exactly 1 when p == q, and better
    conditioned than summing minima when EAR is close to 1 (the regime that matters)."""
    return (1.0 - 0.5 * (p - q).abs().sum(-1)).clamp(0.0, 1.0)


def _chunk_metrics(
    ref: torch.Tensor, cand: torch.Tensor, next_tokens: torch.Tensor | None, temperature: float
) -> dict[str, torch.Tensor]:
    """Every metric of the module docstring for M rows of logits [M, V]; fp32 results of shape [M]."""
    x, y = ref.float(), cand.float()
    lp = torch.log_softmax(x / temperature, dim=-1)
    lq = torch.log_softmax(y / temperature, dim=-1)
    p, q = lp.exp(), lq.exp()
    d = lp - lq  # nan where both are -inf; those terms are masked out below
    out = {
        "ear": _ear(p, q),
        "kl_pq": torch.where(p > 0, p * d, 0.0).sum(-1).clamp_min(0.0),
        "kl_qp": torch.where(q > 0, -q * d, 0.0).sum(-1).clamp_min(0.0),
        "top1": (x.argmax(-1) == y.argmax(-1)).float(),
        "entropy_ref": torch.where(p > 0, -p * lp, 0.0).sum(-1).clamp_min(0.0),
    }
    del d
    top = lp.topk(min(TOP_K, lp.shape[-1]), dim=-1).indices
    p_top = torch.softmax(lp.gather(-1, top), dim=-1)
    q_top = torch.softmax(lq.gather(-1, top), dim=-1).nan_to_num(0.0)  # q has no mass on the set: EAR10 = 0
    out["ear_top10"] = _ear(p_top, q_top)
    if next_tokens is not None:
        i = next_tokens[:, None]
        out["dp"] = (q.gather(-1, i) - p.gather(-1, i))[:, 0]
        if temperature == 1.0:
            out["nll_ref"], out["nll_cand"] = -lp.gather(-1, i)[:, 0], -lq.gather(-1, i)[:, 0]
        else:
            out["nll_ref"] = torch.logsumexp(x, -1) - x.gather(-1, i)[:, 0]
            out["nll_cand"] = torch.logsumexp(y, -1) - y.gather(-1, i)[:, 0]
    return out


@torch.no_grad()
def token_metrics(
    ref_logits: torch.Tensor,
    cand_logits: torch.Tensor,
    next_tokens: torch.Tensor | None = None,
    temperature: float = 1.0,
    chunk: int | None = None,
) -> dict[str, torch.Tensor]:
    """Per-position metrics of the module docstring for logits of shape [..., V].

    Returns fp32 tensors of shape [...] on the logits' device, keyed `ear, kl_pq, kl_qp, top1,
    entropy_ref, ear_top10`, plus `dp, nll_ref, nll_cand` when `next_tokens` (shape [...]) is given.
    Positions are processed `chunk` at a time (default: 64 MiB of fp32 per [chunk, V] temporary), each
    cast to fp32 only inside its chunk, so peak memory is a few chunks whatever the number of positions.
    """
    if ref_logits.shape != cand_logits.shape:
        raise ValueError(f"logit shapes differ: {tuple(ref_logits.shape)} vs {tuple(cand_logits.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    *lead, V = ref_logits.shape
    ref, cand = ref_logits.reshape(-1, V), cand_logits.reshape(-1, V)
    M = ref.shape[0]
    nxt = None
    if next_tokens is not None:
        if tuple(next_tokens.shape) != tuple(lead):
            raise ValueError(f"next_tokens shape {tuple(next_tokens.shape)} != logits' leading shape {tuple(lead)}")
        nxt = next_tokens.reshape(-1).to(device=ref.device, dtype=torch.long)
    rows = chunk or max(1, _CHUNK_ELEMENTS // V)
    parts: dict[str, list[torch.Tensor]] = {}
    for start in range(0, M, rows):
        end = start + rows
        piece = _chunk_metrics(ref[start:end], cand[start:end], None if nxt is None else nxt[start:end], temperature)
        for key, value in piece.items():
            parts.setdefault(key, []).append(value)
    if M == 0:
        keys = ["ear", "kl_pq", "kl_qp", "top1", "entropy_ref", "ear_top10"]
        keys += [] if nxt is None else ["dp", "nll_ref", "nll_cand"]
        return {k: torch.empty(lead, dtype=torch.float32, device=ref.device) for k in keys}
    return {key: torch.cat(values).reshape(lead) for key, values in parts.items()}


def bootstrap_ci(
    values_per_seq: Sequence[float] | np.ndarray | torch.Tensor,
    counts_per_seq: Sequence[float] | np.ndarray | torch.Tensor,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float]:
    """Percentile bootstrap interval, over sequences, of a token-weighted mean.

    `values_per_seq[i]` is the SUM of a metric over the counted tokens of sequence i and
    `counts_per_seq[i]` their number; the statistic is sum_i s_i / sum_i c_i. Each resample draws the
    N sequences with replacement (an [n_boot, N] index matrix, in blocks), so tokens of one sequence move
    together: their correlation widens the interval, as it should. Returns (nan, nan) without data.
    """
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    s = np.asarray(torch.as_tensor(values_per_seq).detach().cpu(), dtype=np.float64).reshape(-1)
    c = np.asarray(torch.as_tensor(counts_per_seq).detach().cpu(), dtype=np.float64).reshape(-1)
    if s.shape != c.shape:
        raise ValueError(f"{s.size} sums but {c.size} counts")
    N = s.size
    if N == 0 or c.sum() <= 0:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    stats = np.empty(n_boot)
    block = max(1, (1 << 22) // N)
    for b0 in range(0, n_boot, block):
        idx = rng.integers(0, N, size=(min(block, n_boot - b0), N))
        with np.errstate(invalid="ignore", divide="ignore"):
            stats[b0 : b0 + idx.shape[0]] = s[idx].sum(1) / c[idx].sum(1)
    alpha = 1.0 - level
    lo, hi = np.nanquantile(stats, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


# ---------------------------------------------------------------------------------------------------------
# Result
# ---------------------------------------------------------------------------------------------------------


def _pair(x: Sequence[float]) -> tuple[float, float]:
    return float(x[0]), float(x[1])


@dataclass
class Fidelity:
    """Candidate-vs-reference agreement over n_tokens positions of n_sequences windows.

    Means are token-weighted; every `*_ci95` is a 95% bootstrap interval over sequences. KL is
    KL(reference || candidate) unless named `kl_qp`. Flip rate = 1 - top-1 agreement, per quintile of
    the reference entropy (`entropy_quintile_edges` has 6 edges). `tokens_per_s` counts window positions
    pushed through both models per second of `wall_s`.
    """

    n_tokens: int
    n_sequences: int
    temperature: float
    ear: float
    ear_ci95: tuple[float, float]
    kl_pq_mean: float
    kl_pq_ci95: tuple[float, float]
    kl_pq_median: float
    kl_pq_p90: float
    kl_pq_p99: float
    kl_pq_max: float
    kl_qp_mean: float
    top1: float
    top1_ci95: tuple[float, float]
    dp_rms: float
    ppl_reference: float
    ppl_candidate: float
    ppl_ratio: float
    flip_rate_by_entropy: list[float]
    entropy_quintile_edges: list[float]
    entropy_quintile_tokens: list[int]
    ear_top10: float
    ear_top10_ci95: tuple[float, float]
    wall_s: float = 0.0
    tokens_per_s: float = 0.0
    on_policy: Fidelity | dict[str, Any] | None = None
    tasks: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """Nested, JSON-serializable view (non-finite floats stay floats: json writes them as NaN/Infinity)."""
        out: dict[str, Any] = {
            "n_tokens": self.n_tokens,
            "n_sequences": self.n_sequences,
            "temperature": self.temperature,
            "ear": {"mean": self.ear, "ci95": list(self.ear_ci95)},
            "kl": {
                "direction": "KL(reference || candidate)",
                "mean": self.kl_pq_mean,
                "ci95": list(self.kl_pq_ci95),
                "median": self.kl_pq_median,
                "p90": self.kl_pq_p90,
                "p99": self.kl_pq_p99,
                "max": self.kl_pq_max,
            },
            "kl_qp": {"direction": "KL(candidate || reference)", "mean": self.kl_qp_mean},
            "top1": self.top1,
            "top1_ci95": list(self.top1_ci95),
            "dp_rms": self.dp_rms,
            "ppl": {"reference": self.ppl_reference, "candidate": self.ppl_candidate, "ratio": self.ppl_ratio},
            "flip_by_entropy": {
                "edges": list(self.entropy_quintile_edges),
                "rate": list(self.flip_rate_by_entropy),
                "tokens": list(self.entropy_quintile_tokens),
            },
            "ear_top10": {
                "definition": EAR_TOP10_DEFINITION,
                "mean": self.ear_top10,
                "ci95": list(self.ear_top10_ci95),
            },
            "timing": {"wall_s": self.wall_s, "tokens_per_s": self.tokens_per_s},
        }
        if self.on_policy is not None:
            op = self.on_policy
            out["on_policy"] = op.to_dict() if isinstance(op, Fidelity) else dict(op)
        if self.tasks is not None:
            out["tasks"] = dict(self.tasks)
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Fidelity:
        """Inverse of `to_dict`; a nested `on_policy` holding `ear` becomes a Fidelity again."""
        kl, ppl, flip, top10 = d["kl"], d["ppl"], d["flip_by_entropy"], d["ear_top10"]
        op = d.get("on_policy")
        if isinstance(op, dict) and "ear" in op:
            op = cls.from_dict(op)
        return cls(
            n_tokens=int(d["n_tokens"]),
            n_sequences=int(d["n_sequences"]),
            temperature=float(d["temperature"]),
            ear=float(d["ear"]["mean"]),
            ear_ci95=_pair(d["ear"]["ci95"]),
            kl_pq_mean=float(kl["mean"]),
            kl_pq_ci95=_pair(kl["ci95"]),
            kl_pq_median=float(kl["median"]),
            kl_pq_p90=float(kl["p90"]),
            kl_pq_p99=float(kl["p99"]),
            kl_pq_max=float(kl["max"]),
            kl_qp_mean=float(d["kl_qp"]["mean"]),
            top1=float(d["top1"]),
            top1_ci95=_pair(d["top1_ci95"]),
            dp_rms=float(d["dp_rms"]),
            ppl_reference=float(ppl["reference"]),
            ppl_candidate=float(ppl["candidate"]),
            ppl_ratio=float(ppl["ratio"]),
            flip_rate_by_entropy=[float(v) for v in flip["rate"]],
            entropy_quintile_edges=[float(v) for v in flip["edges"]],
            entropy_quintile_tokens=[int(v) for v in flip["tokens"]],
            ear_top10=float(top10["mean"]),
            ear_top10_ci95=_pair(top10["ci95"]),
            wall_s=float(d.get("timing", {}).get("wall_s", 0.0)),
            tokens_per_s=float(d.get("timing", {}).get("tokens_per_s", 0.0)),
            on_policy=op,
            tasks=d.get("tasks"),
        )


def _summarize(
    tok: dict[str, np.ndarray], seq: np.ndarray, n_seq: int, temperature: float, n_boot: int, seed: int
) -> Fidelity:
    """Fidelity from per-token scalars `tok[key]` (float64, [M]) and their sequence ids `seq` ([M])."""
    M = seq.size
    if M == 0:
        raise ValueError("no positions selected: the mask is empty")
    counts = np.bincount(seq, minlength=n_seq)

    def mean_ci(key: str) -> tuple[float, tuple[float, float]]:
        sums = np.bincount(seq, weights=tok[key], minlength=n_seq)
        return float(sums.sum() / M), bootstrap_ci(sums, counts, n_boot=n_boot, seed=seed)

    ear, ear_ci = mean_ci("ear")
    ear10, ear10_ci = mean_ci("ear_top10")
    kl, kl_ci = mean_ci("kl_pq")
    top1, top1_ci = mean_ci("top1")
    kl_q = np.quantile(tok["kl_pq"], [0.5, 0.9, 0.99])

    edges = np.quantile(tok["entropy_ref"], np.linspace(0.0, 1.0, 6))
    quintile = np.searchsorted(edges[1:-1], tok["entropy_ref"], side="right")
    in_bin = np.bincount(quintile, minlength=5)
    flips = np.bincount(quintile, weights=1.0 - tok["top1"], minlength=5)
    flip_rate = [float(f / n) if n else math.nan for f, n in zip(flips, in_bin)]

    ppl_ref = math.exp(tok["nll_ref"].mean())
    ppl_cand = math.exp(tok["nll_cand"].mean())
    return Fidelity(
        n_tokens=int(M),
        n_sequences=int((counts > 0).sum()),
        temperature=float(temperature),
        ear=ear,
        ear_ci95=ear_ci,
        kl_pq_mean=kl,
        kl_pq_ci95=kl_ci,
        kl_pq_median=float(kl_q[0]),
        kl_pq_p90=float(kl_q[1]),
        kl_pq_p99=float(kl_q[2]),
        kl_pq_max=float(tok["kl_pq"].max()),
        kl_qp_mean=float(tok["kl_qp"].mean()),
        top1=top1,
        top1_ci95=top1_ci,
        dp_rms=float(np.sqrt(np.mean(tok["dp"] ** 2))),
        ppl_reference=ppl_ref,
        ppl_candidate=ppl_cand,
        ppl_ratio=ppl_cand / ppl_ref,
        flip_rate_by_entropy=flip_rate,
        entropy_quintile_edges=[float(e) for e in edges],
        entropy_quintile_tokens=[int(n) for n in in_bin],
        ear_top10=ear10,
        ear_top10_ci95=ear10_ci,
    )


# ---------------------------------------------------------------------------------------------------------
# Streaming over models
# ---------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _evaluating(*models: torch.nn.Module) -> Iterator[None]:
    """Eval mode (no dropout) for the duration; each model's previous mode is restored after."""
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        yield
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)


def _batch_metrics(
    reference: torch.nn.Module,
    candidate: torch.nn.Module,
    ids: torch.Tensor,
    mask: torch.Tensor,
    temperature: float,
    device: str | torch.device,
) -> dict[str, torch.Tensor]:
    """Metrics at the masked positions of one batch of windows [B, L], as CPU fp32 scalars.

    Only positions 0..L-2 have a next token, so the models see ids[:, :-1] (causal: same logits).
    Logits are locals here: they are freed when this returns, before the next batch runs.
    """
    ids, mask = ids.to(device), mask.to(device)
    inputs, targets = ids[:, :-1], ids[:, 1:]
    every = bool(mask.all())

    def logits(model: torch.nn.Module) -> torch.Tensor:
        z = model(input_ids=inputs).logits.to(device)
        return z.flatten(0, 1) if every else z[mask]

    ref = logits(reference)
    cand = logits(candidate)
    if ref.shape != cand.shape:
        raise ValueError(f"vocabularies differ: reference {ref.shape[-1]}, candidate {cand.shape[-1]}")
    metrics = token_metrics(ref, cand, targets.flatten() if every else targets[mask], temperature)
    return {key: value.cpu() for key, value in metrics.items()}


class CachedLogits(torch.nn.Module):
    """A stand-in for a model whose logits on a fixed set of inputs were computed once.

    ``record(model, windows, batch_size)`` runs ``model`` over ``windows[:, :-1]`` in the same batches
    `compare_windows` uses and keeps each batch's logits (fp32 on the CPU by default); calling the cache
    with exactly one of those batches returns them. Comparing many candidates against one reference
    (benchmarks, the bit search's verification rounds) then costs one reference pass instead of one per
    candidate. Memory is n_windows x (L - 1) x V x 4 bytes, so this is for bounded window sets; any input
    it has not seen raises KeyError rather than being silently recomputed.
    """

    def __init__(self, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.dtype = dtype
        self._store: dict[tuple, torch.Tensor] = {}

    @staticmethod
    def _key(ids: torch.Tensor) -> tuple:
        ids = ids.detach().cpu()
        return tuple(ids.shape), ids.numpy().tobytes()

    @torch.inference_mode()
    def record(self, model: torch.nn.Module, windows: torch.Tensor, *, batch_size: int = 8,
               device: str | torch.device = "cpu") -> "CachedLogits":
        with _evaluating(model):
            for b0 in range(0, windows.shape[0], batch_size):
                ids = windows[b0 : b0 + batch_size, :-1].to(device)
                self._store[self._key(ids)] = model(input_ids=ids).logits.to("cpu", self.dtype)
        return self

    def forward(self, input_ids: torch.Tensor, **_: Any):
        from types import SimpleNamespace

        return SimpleNamespace(logits=self._store[self._key(input_ids)].to(input_ids.device))


class StreamedLogits(CachedLogits):
    """A stand-in for a :class:`slq.models.stream.StreamedModel` on a fixed set of windows.

    ``record(windows, batch_size)`` runs the decoder over ``windows[:, :-1]`` one block at a time (each block
    read from the files once for all windows, in the batches `compare_windows` uses) and keeps each batch's
    last hidden state; calling it with one of those batches applies the final norm and ``lm_head`` (read once,
    kept until :meth:`close`). The logits are the in-memory model's, bit for bit, for the same batches.
    Memory: one block, the head, and n_windows x (L - 1) x hidden activations, instead of x V logits.
    """

    def __init__(self, streamed, *, offload_activations: bool = False):
        super().__init__()
        self.streamed = streamed
        self.config = streamed.model.config
        self.offload_activations = offload_activations
        self._head = None

    @torch.inference_mode()
    def record(self, windows: torch.Tensor, *, batch_size: int = 8, **_: Any) -> "StreamedLogits":
        batches = self.streamed.hidden_states(windows[:, :-1], batch_size, self.offload_activations)
        for b0, b in zip(range(0, windows.shape[0], batch_size), batches):
            self._store[self._key(windows[b0 : b0 + batch_size, :-1])] = b.hidden
        return self

    def forward(self, input_ids: torch.Tensor, **_: Any):
        from types import SimpleNamespace

        if self._head is None:
            self._head = self.streamed.head()
            self._head.__enter__()
        return SimpleNamespace(logits=self.streamed.logits(self._store[self._key(input_ids)]))

    def close(self) -> None:
        """Release the head and the kept hidden states."""
        if self._head is not None:
            self._head.__exit__(None, None, None)
            self._head = None
        self._store.clear()


def compare_windows(
    reference: torch.nn.Module,
    candidate: torch.nn.Module,
    windows: torch.Tensor,
    *,
    batch_size: int = 8,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
    n_boot: int = 1000,
    seed: int = 0,
) -> Fidelity:
    """Run both models side by side over `windows` [n_seq, L] and summarize their agreement.

    Position t of a window is scored against token t+1, so each window yields L-1 positions;
    `mask` (bool [n_seq, L-1]) keeps a subset (e.g. the sampled continuation of on-policy windows).
    Both models are called as `model(input_ids=...)` and must return `.logits`; they run in eval mode
    under inference_mode and must already sit on `device` (or return logits movable there). Only
    per-token scalars are kept across batches, so memory is bounded by one batch of logits.
    """
    windows = torch.as_tensor(windows, dtype=torch.long)
    if windows.ndim != 2 or windows.shape[1] < 2:
        raise ValueError(f"windows must be [n_seq, L] with L >= 2, got {tuple(windows.shape)}")
    n_seq, L = windows.shape
    if mask is None:
        mask = torch.ones(n_seq, L - 1, dtype=torch.bool)
    mask = torch.as_tensor(mask, dtype=torch.bool)
    if tuple(mask.shape) != (n_seq, L - 1):
        raise ValueError(f"mask must be [{n_seq}, {L - 1}], got {tuple(mask.shape)}")

    parts: dict[str, list[torch.Tensor]] = {}
    start = time.perf_counter()
    with progress_bar(progress) as bar, torch.inference_mode(), _evaluating(reference, candidate):
        task = bar.add_task("fidelity (windows)", total=n_seq)
        for b0 in range(0, n_seq, batch_size):
            rows = slice(b0, b0 + batch_size)
            for key, value in _batch_metrics(reference, candidate, windows[rows], mask[rows], temperature, device).items():
                parts.setdefault(key, []).append(value)
            bar.advance(task, windows[rows].shape[0])
    wall = time.perf_counter() - start

    tok = {key: torch.cat(values).double().numpy() for key, values in parts.items()}
    seq = torch.nonzero(mask)[:, 0].numpy()  # row-major, the order in which positions were gathered
    fid = _summarize(tok, seq, n_seq, temperature, n_boot, seed)
    fid.wall_s = wall
    fid.tokens_per_s = n_seq * (L - 1) / wall if wall > 0 else math.inf
    return fid


def _sample_batch(
    model: torch.nn.Module,
    ids: torch.Tensor,
    max_new_tokens: int,
    temperature: float,
    gens: list[torch.Generator],
    advance=lambda k: None,
) -> torch.Tensor:
    """Extend ids [B, P] by max_new_tokens tokens drawn from softmax(logits / T), one KV-cached step at a
    time (row r draws from gens[r]); a model returning no `past_key_values` is re-run on the whole
    sequence instead."""
    out = model(input_ids=ids, use_cache=True)
    seq = ids
    for step in range(max_new_tokens):
        probs = torch.softmax(out.logits[:, -1].float() / temperature, dim=-1).cpu()
        token = torch.stack([torch.multinomial(probs[r], 1, generator=g) for r, g in enumerate(gens)])
        token = token.to(ids.device)
        seq = torch.cat([seq, token], dim=1)
        advance(len(gens))
        if step == max_new_tokens - 1:
            break
        # transformers >= 5.2x names the returned cache `cache` (and the keyword too); older: past_key_values
        cache = getattr(out, "cache", None)
        if cache is not None:
            out = model(input_ids=token, cache=cache, use_cache=True)
            continue
        cache = getattr(out, "past_key_values", None)
        if cache is not None:
            out = model(input_ids=token, past_key_values=cache, use_cache=True)
        else:
            out = model(input_ids=seq)
    return seq


def sample_continuations(
    reference: torch.nn.Module,
    prompts: torch.Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ancestral sampling from the reference: x_{t+1} ~ softmax(ref_logits_t / T), after each prompt.

    `prompts` is [n, P] (one common length, no padding). Returns `windows` [n, P + max_new_tokens] and
    `mask` [n, P + max_new_tokens - 1], True exactly at the positions t >= P-1 whose next token was
    sampled. Sequence i draws from its own CPU torch.Generator seeded with (seed, i), so a fixed seed gives
    the same text on any device and with any batch size. Generation does not stop at end-of-sequence tokens.
    """
    prompts = torch.as_tensor(prompts, dtype=torch.long)
    if prompts.ndim != 2 or prompts.shape[1] < 1:
        raise ValueError(f"prompts must be [n, P] with P >= 1, got {tuple(prompts.shape)}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    n, P = prompts.shape
    batches = []
    with progress_bar(progress) as bar, torch.inference_mode(), _evaluating(reference):
        task = bar.add_task("sampling", total=n * max_new_tokens)
        for b0 in range(0, n, batch_size):
            ids = prompts[b0 : b0 + batch_size].to(device)
            gens = [torch.Generator().manual_seed(seed * 1_000_003 + b0 + r) for r in range(ids.shape[0])]
            seq = _sample_batch(reference, ids, max_new_tokens, temperature, gens, lambda k: bar.advance(task, k))
            batches.append(seq.cpu())
    windows = torch.cat(batches)
    mask = torch.zeros(n, P + max_new_tokens - 1, dtype=torch.bool)
    mask[:, P - 1 :] = True
    return windows, mask


def on_policy_ear(
    reference: torch.nn.Module, candidate: torch.nn.Module, prompts: torch.Tensor, max_new_tokens: int, **kw: Any
) -> Fidelity:
    """`compare_windows` on continuations sampled from the reference, scored on the sampled positions
    only. `temperature, seed, batch_size, device` and `progress` go to both steps; `n_boot` to the comparison."""
    shared = {key: kw.pop(key) for key in ("temperature", "seed", "batch_size", "device") if key in kw}
    windows, mask = sample_continuations(reference, prompts, max_new_tokens, progress=kw.get("progress", False),
                                         **shared)
    return compare_windows(reference, candidate, windows, mask=mask, **shared, **kw)
