"""Exact speculative decoding: a draft model proposes k tokens, the target model verifies them in one forward.

One round, with both models' caches filled up to position ``P`` (the last emitted token ``x0``
sits at ``P`` and is not yet in either cache):

1. **Draft.** The draft engine runs k single-token steps (``x0`` at P, then each proposal), and
   after each samples the next proposal ``d_i ~ q_i`` from its own warped distribution.
2. **Verify.** The target runs ``[x0, d_1 .. d_k]`` at positions ``P .. P+k`` in ONE forward over
   its static cache (:meth:`DecodeEngine.forward_tokens`), which gives ``p_1 .. p_{k+1}``.
3. **Accept.** Standard speculative sampling (Leviathan et al. 2023; Chen et al. 2023): ``d_i`` is
   accepted with probability ``min(1, p_i(d_i) / q_i(d_i))`` (``u * q <= p`` with ``u ~ U(0, 1)``),
   scanning left to right; at the first rejection the emitted token is drawn from
   ``norm(max(0, p_i - q_i))``; when all k are accepted one bonus token is drawn from ``p_{k+1}``.
   Each emitted token, given the tokens before it, is then distributed exactly as ``p``:
   ``P(out = x) = min(p, q)(x) + (1 - sum min(p, q)) * (p - q)+(x) / sum (p - q)+ = p(x)``.
   Temperature and top-p are applied to the logits of p and q alike before the test (``warp``), so the
   output follows the target's *warped* distribution, exactly what its own sampler would draw from.
   Greedy (temperature 0) is the same rule with one-hot p and q: accept while the draft's argmax equals
   the target's, then emit the target's argmax; the output equals the target's own greedy tokens.
4. **Rollback.** Both caches keep the accepted prefix by resetting their position
   (:meth:`DecodeEngine.set_position`); nothing is copied. The target wrote ``P .. P+k``, keeps
   ``P .. P+m``. The draft wrote ``P .. P+k-1``; when all k are accepted it lacks ``d_k`` at ``P+k``
   and catches up in the next round's first draft forward, which runs ``[d_k, x0']`` as 2 tokens
   (one forward, so a round always costs k draft forwards).

Batches (rows share one position, as in the engine): the test runs per row, giving row b its
accepted count ``n_b``; the round keeps ``m = min_b n_b`` (over unfinished rows) and emits
``m + 1`` tokens per row: rows with ``n_b = m`` emit their resampled (or bonus) token, rows with
``n_b > m`` their accepted ``d_{m+1}``. Each row thus emits a prefix of its own speculative output,
cut at a point that depends only on tokens already drawn and on the other rows' independent draws
(a stopping time), so every row is still exactly target-distributed; rows only lose speed.

Cost model (``k="auto"``): with a per-token acceptance rate ``a`` (the probability that a proposal
is accepted given the ones before it were; it is ``E[sum min(p, q)]`` = EAR on the positions the
target visits), a round emits ``E[tokens] = (1 - a^(k+1)) / (1 - a)`` tokens (k + 1 at a = 1) and
costs ``k * t_draft + t_verify(k+1)``. ``k="auto"`` measures ``t_verify`` at 2 and ``k_max + 1``
tokens (affine in between), ``t_draft`` from the draft steps so far and ``a`` from the tests so far
(``(accepted + 1) / (tests + 2)``), and picks each round's k in ``1 .. k_max`` maximizing
``E[tokens] / time``. The prediction (:func:`predict`) is in the report next to the measurement.

Randomness: one ``torch.Generator`` on the device, seeded with ``seed``; the same seed, inputs and k
give the same tokens.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch

from ..util.errors import SlqError
from .decode import DecodeEngine, _after_eos, _eos_list

AUTO_K0 = 4  # k of the first round under k="auto", before any acceptance has been measured


# ----------------------------------------------------------------------------- the pure parts


def warp(logits: torch.Tensor, temperature: float, top_p: float = 1.0) -> torch.Tensor:
    """float32 probabilities [..., V]: ``softmax(logits / temperature)`` restricted to the smallest set of
    most probable tokens whose probability reaches ``top_p`` (ties by index order), renormalized."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sp, idx = probs.sort(dim=-1, descending=True)
        keep = (sp.cumsum(-1) - sp) < top_p  # mass before this token has not reached top_p; keeps the top one
        probs = torch.zeros_like(probs).scatter_(-1, idx, sp * keep)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def accept_mask(p_x: torch.Tensor, q_x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The acceptance test: True where ``u < p(x) / q(x)``, i.e. accept with probability min(1, p/q).
    (A module-level function so that a test can break it and watch the statistical test fail.)"""
    return u * q_x < p_x


def expected_tokens(a: float, k: int) -> float:
    """Expected tokens per round with k proposals at per-token acceptance ``a``: ``(1 - a^(k+1)) / (1 - a)``."""
    if a >= 1.0:
        return float(k + 1)
    return (1.0 - a ** (k + 1)) / (1.0 - a)


def predict(a: float, k: int, t_draft: float, t_verify: float) -> dict:
    """The cost model for one round: expected tokens, seconds, and tokens per second."""
    e = expected_tokens(a, k)
    t = k * t_draft + t_verify
    return {"acceptance": a, "k": k, "tokens_per_round": e, "round_s": t, "tokens_per_s": e / t if t > 0 else None}


def choose_k(a: float, t_draft: float, t_verify, k_max: int) -> int:
    """The k in 1..k_max maximizing ``expected_tokens(a, k) / (k t_draft + t_verify(k + 1))``."""
    return max(range(1, k_max + 1), key=lambda k: expected_tokens(a, k) / (k * t_draft + t_verify(k + 1)))


def _sample(probs: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """One draw per row of ``probs`` [B, V] -> [B] (exponential race: argmax p / E, E ~ Exp(1))."""
    e = torch.empty_like(probs).exponential_(generator=gen)
    return (probs / e).argmax(-1)


# ----------------------------------------------------------------------------- the report


@dataclass
class SpeculativeReport:
    """What one :func:`generate` run measured. Counts are summed over unfinished rows."""

    batch: int = 0
    prompt_len: int = 0
    new_tokens: int = 0  # generated columns returned
    k: int | str = 8  # as asked
    ks: list = field(default_factory=list)  # k of each round
    rounds: int = 0
    row_rounds: int = 0  # rounds x unfinished rows
    proposed: int = 0  # draft tokens proposed (rows x k per round)
    tests: int = 0  # acceptance tests performed (up to and including each row's first rejection)
    accepted: int = 0
    emitted: int = 0  # tokens emitted by rounds (rows x (m + 1)), before truncation to max_new_tokens
    target_forwards: int = 0  # prefill + one verify forward per round
    draft_forwards: int = 0
    prefill_s: float = 0.0
    draft_s: float = 0.0  # draft forwards and drawing the proposals
    verify_s: float = 0.0  # target verify forwards
    accept_s: float = 0.0  # acceptance tests, resampling, bookkeeping
    total_s: float = 0.0
    t_verify: dict = field(default_factory=dict)  # T -> seconds, measured under k="auto"
    predicted: dict = field(default_factory=dict)

    @property
    def acceptance_rate(self) -> float:
        """Accepted / tests: the per-token acceptance probability ``a`` of the cost model (an EAR estimate)."""
        return self.accepted / self.tests if self.tests else float("nan")

    @property
    def mean_accepted_length(self) -> float:
        """Accepted draft tokens per row and round (before the batch keeps its minimum)."""
        return self.accepted / self.row_rounds if self.row_rounds else float("nan")

    @property
    def tokens_per_target_forward(self) -> float:
        """Generated tokens per row / target forwards (the prefill, which yields the first, included)."""
        return self.new_tokens / self.target_forwards if self.target_forwards else float("nan")

    @property
    def tokens_per_s(self) -> float:
        """Generated tokens (all rows) per second after the prefill."""
        t = self.total_s - self.prefill_s
        return self.batch * max(self.new_tokens - 1, 0) / t if t > 0 else float("nan")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["t_verify"] = {str(k): v for k, v in self.t_verify.items()}
        for name in ("acceptance_rate", "mean_accepted_length", "tokens_per_target_forward", "tokens_per_s"):
            d[name] = getattr(self, name)
        return d


# ----------------------------------------------------------------------------- the loop


class Speculator:
    """Speculative rounds over two engines (see the module docstring). :meth:`start` prefills both models
    and draws the first token from the target; each :meth:`round` emits ``m + 1`` tokens per row."""

    def __init__(self, target: DecodeEngine, draft: DecodeEngine, *, k: int | str = 8, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int = 0, k_max: int = 16):
        if target.device != draft.device:
            raise SlqError(f"target and draft must be on one device, got {target.device} and {draft.device}")
        vt, vd = target.lm_head.out_features, draft.lm_head.out_features
        if vt != vd:
            raise SlqError(f"target and draft must share a vocabulary, got {vt} and {vd} logits")
        if not (isinstance(k_max, int) and k_max >= 1):
            raise SlqError(f"k_max must be a positive integer, got {k_max!r}")
        if k != "auto" and not (isinstance(k, int) and not isinstance(k, bool) and 1 <= k <= 64):
            raise SlqError(f"k must be an integer in 1..64 or 'auto', got {k!r}")
        if not (temperature >= 0 and temperature < float("inf")):
            raise SlqError(f"temperature must be >= 0 (0: greedy), got {temperature}")
        if not 0 < top_p <= 1:
            raise SlqError(f"top_p must be in (0, 1], got {top_p}")
        self.target, self.draft = target, draft
        self.auto = k == "auto"
        self.k_max = k_max if self.auto else k
        self.k = min(AUTO_K0, k_max) if self.auto else k
        self.temperature, self.top_p = float(temperature), float(top_p)
        self.sample = self.temperature > 0
        self.gen = torch.Generator(device=target.device).manual_seed(seed)
        self.report = SpeculativeReport(k=k)

    def _sync(self) -> None:
        if self.target.device.type == "cuda":
            torch.cuda.synchronize(self.target.device)

    def _probs(self, logits: torch.Tensor) -> torch.Tensor:
        return warp(logits, self.temperature, self.top_p)

    def _pick(self, logits: torch.Tensor) -> torch.Tensor:
        """A token per row of logits [B, V]: sampled from the warped distribution, or the argmax."""
        return _sample(self._probs(logits), self.gen) if self.sample else logits.argmax(-1)

    def start(self, ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """Prefill both models with the prompt [B, T]; returns the first generated token [B]."""
        B, T = ids.shape
        need = T + max_new_tokens + self.k_max + 1
        for eng in (self.target, self.draft):
            eng.allocate(B, need)
        r = self.report
        r.batch, r.prompt_len = B, T
        self._sync()
        t0 = time.perf_counter()
        logits = self.target.prefill(ids).float()
        self.draft.prefill(ids)
        first = self._pick(logits)
        self._sync()
        r.prefill_s += time.perf_counter() - t0
        r.target_forwards += 1
        self.P = T  # both caches hold 0..P-1
        self.last = first  # [B], at position P, in neither cache
        self.pending = None  # the draft's missing token at P-1 after an all-accepted round
        self.tokens = [ids, first[:, None]]
        if self.auto:
            self._time_verify()
        return first

    def _time_verify(self) -> None:
        """t_verify at 2 and k_max + 1 tokens (k="auto"), on the stale part of the target cache."""
        for T in sorted({2, self.k_max + 1}):
            self.target.set_position(self.P)
            ts = []
            for _ in range(3):  # the first call may capture a graph or warm caches
                self._sync()
                t0 = time.perf_counter()
                self.target.forward_tokens(T, self.P)
                self._sync()
                ts.append(time.perf_counter() - t0)
            self.report.t_verify[T] = min(ts[1:])

    def _t_verify(self, T: int) -> float:
        tv = self.report.t_verify
        (t1, y1), (t2, y2) = min(tv.items()), max(tv.items())
        return y1 if t1 == t2 else y1 + (y2 - y1) * (T - t1) / (t2 - t1)

    def _pick_k(self) -> int:
        r = self.report
        a = (r.accepted + 1) / (r.tests + 2)
        t_draft = r.draft_s / r.draft_forwards
        return choose_k(a, t_draft, self._t_verify, self.k_max)

    def round(self, active: torch.Tensor | None = None) -> torch.Tensor:
        """One draft-verify-accept round; returns the emitted tokens [B, m + 1]. ``active`` [B] bool marks
        the rows whose acceptance counts (finished rows follow along and are padded later)."""
        tgt, dft, r = self.target, self.draft, self.report
        if self.auto and r.draft_forwards:
            self.k = self._pick_k()
        k, P = self.k, self.P
        B = self.last.shape[0]

        # 1. draft: k forwards, each followed by drawing a proposal
        self._sync()
        t0 = time.perf_counter()
        d = torch.empty((B, k), dtype=torch.long, device=tgt.device)
        qlog = []
        if self.pending is not None:  # catch up: d_k of the last round at P-1, then x0 at P, in one forward
            ids2, _ = dft.token_buffers(2)
            ids2[:, 0] = self.pending
            ids2[:, 1] = self.last
            dft.set_position(P - 1)
            lg = dft.forward_tokens(2, P - 1)[:, 1]
            dft.set_position(P + 1)
        else:
            dft.ids[:, 0] = self.last
            dft.set_position(P)
            dft.step(P)
            lg = dft.logits
        for i in range(k):
            if self.sample:
                qlog.append(lg.clone())
                d[:, i] = _sample(self._probs(lg), self.gen)
            else:
                d[:, i] = lg.argmax(-1)
            if i + 1 < k:
                dft.ids[:, 0] = d[:, i]
                dft.step(P + 1 + i)
                lg = dft.logits
        self._sync()
        r.draft_s += time.perf_counter() - t0
        r.draft_forwards += k

        # 2. verify: [x0, d_1..d_k] at P..P+k in one target forward
        t0 = time.perf_counter()
        ids, _ = tgt.token_buffers(k + 1)
        ids[:, 0] = self.last
        ids[:, 1:] = d
        tgt.set_position(P)
        logits = tgt.forward_tokens(k + 1, P)
        self._sync()
        r.verify_s += time.perf_counter() - t0
        r.target_forwards += 1

        # 3. accept per row, keep the batch minimum
        t0 = time.perf_counter()
        if self.sample:
            p = self._probs(logits)  # [B, k+1, V]
            q = self._probs(torch.stack(qlog, 1))  # [B, k, V]
            p_x = p[:, :k].gather(-1, d[..., None])[..., 0]
            q_x = q.gather(-1, d[..., None])[..., 0]
            u = torch.rand((B, k), generator=self.gen, device=tgt.device)
            acc = accept_mask(p_x, q_x, u)
        else:
            best = logits.argmax(-1)  # [B, k+1]
            acc = d == best[:, :k]
        n = acc.long().cumprod(1).sum(1)  # [B] accepted per row
        live = n if active is None else n[active]
        m = int(live.min()) if live.numel() else k
        if self.sample:
            if m < k:
                res = (p[:, m] - q[:, m]).clamp_min(0)
                s = res.sum(-1, keepdim=True)
                res = torch.where(s > 0, res / s.clamp_min(1e-30), p[:, m])
                fresh = _sample(res, self.gen)
                y = torch.where(n == m, fresh, d[:, m])
            else:
                y = _sample(p[:, k], self.gen)
        else:
            y = best[:, m]
        out = torch.cat([d[:, :m], y[:, None]], 1)

        # 4. rollback by position
        tgt.set_position(P + m + 1)
        self.pending = d[:, k - 1].clone() if m == k else None
        self.P, self.last = P + m + 1, y
        self.tokens.append(out)
        r.rounds += 1
        r.ks.append(k)
        rows = int(live.numel())
        r.row_rounds += rows
        r.proposed += rows * k
        r.accepted += int(live.sum())
        r.tests += int(torch.clamp(live + 1, max=k).sum())
        r.emitted += rows * (m + 1)
        self._sync()
        r.accept_s += time.perf_counter() - t0
        return out

    def sequence(self) -> torch.Tensor:
        """Prompt and every token emitted so far [B, T + n]."""
        return torch.cat(self.tokens, 1)

    def draft_position(self) -> int:
        """Positions the draft cache holds valid (P, or P - 1 while it owes the pending token)."""
        return self.P - (self.pending is not None)


@torch.inference_mode()
def generate(target, draft, input_ids: torch.Tensor, *, k: int | str = 8, temperature: float = 0.0,
             top_p: float = 1.0, seed: int = 0, max_new_tokens: int = 32, eos_token_id="auto",
             pad_token_id: int | None = None, k_max: int = 16, engine_kw: dict | None = None,
             draft_engine_kw: dict | None = None) -> tuple[torch.Tensor, SpeculativeReport]:
    """Speculative decoding: ``draft`` proposes, ``target`` verifies; the tokens follow the target's own
    (greedy, or temperature/top-p) distribution exactly. Returns (LongTensor [B, T + n], report).

    ``target`` / ``draft``: models the decode engine runs (an slq checkpoint from :func:`slq.load` drafts
    as well as any), or :class:`DecodeEngine` objects (reused across calls: their caches and graphs).
    ``k``: proposals per round, or "auto" (the cost model of the module docstring, k <= ``k_max``).
    ``eos_token_id="auto"`` takes the target's ``generation_config``; rows stop as in
    :meth:`DecodeEngine.generate` (tokens after a row's EOS become ``pad_token_id``).
    ``engine_kw`` / ``draft_engine_kw`` go to :class:`DecodeEngine` when models are given.
    """
    tgt = target if isinstance(target, DecodeEngine) else DecodeEngine(target, **(engine_kw or {}))
    dft = draft if isinstance(draft, DecodeEngine) else DecodeEngine(draft, **(draft_engine_kw or engine_kw or {}))
    if eos_token_id == "auto":
        gc = getattr(tgt.model, "generation_config", None)
        eos_token_id = getattr(gc, "eos_token_id", None)
        if pad_token_id is None:
            pad_token_id = getattr(gc, "pad_token_id", None)
    eos = _eos_list(eos_token_id)
    if eos and pad_token_id is None:
        pad_token_id = eos[0]
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if input_ids.dim() != 2 or input_ids.shape[1] < 1 or input_ids.shape[0] < 1:
        raise SlqError(f"input_ids must be [batch, prompt_len] with prompt_len >= 1, got {tuple(input_ids.shape)}")
    if max_new_tokens < 1:
        raise SlqError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    spec = Speculator(tgt, dft, k=k, temperature=temperature, top_p=top_p, seed=seed, k_max=k_max)
    ids = input_ids.to(tgt.device, torch.long)
    T = ids.shape[1]
    t0 = time.perf_counter()
    spec.start(ids, max_new_tokens)
    eos_t = torch.tensor(eos, device=tgt.device) if eos else None
    made = 1

    def finished() -> torch.Tensor:
        return torch.isin(spec.sequence()[:, T:], eos_t).any(1)

    done = finished() if eos_t is not None else None
    while made < max_new_tokens and not (done is not None and bool(done.all())):
        out = spec.round(None if done is None else ~done)
        made += out.shape[1]
        if eos_t is not None:
            done = finished()
    spec._sync()
    r = spec.report
    r.total_s = time.perf_counter() - t0
    gen = spec.sequence()[:, T:T + max_new_tokens]
    if eos_t is not None:
        gen = _after_eos(gen, eos_t, pad_token_id)
    r.new_tokens = gen.shape[1]
    if r.rounds and r.draft_forwards:
        tv = r.t_verify.get(r.ks[-1] + 1, r.verify_s / r.rounds)
        r.predicted = predict(r.acceptance_rate if r.tests else 0.0, r.ks[-1], r.draft_s / r.draft_forwards, tv)
    return torch.cat([ids, gen], 1), r


__all__ = ["SpeculativeReport", "Speculator", "accept_mask", "choose_k", "expected_tokens", "generate", "predict",
           "warp"]
