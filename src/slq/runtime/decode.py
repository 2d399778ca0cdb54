"""A static-cache decode engine for Llama-family models (Llama, Mistral, Qwen2, Qwen3).

The decoder step is written here from the Hugging Face modules' own weights and submodules, so
the same engine runs an FP16 model and an slq model whose linears are
:class:`slq.modules.QuantLinear` (they compute through whatever backend they were prepared for):

* RMSNorm: the model's own norm modules (``input_layernorm``, ``post_attention_layernorm``,
  Qwen3's ``q_norm`` / ``k_norm``, the final ``norm``) are called as they are;
* rotary embeddings: a cos/sin table for positions ``0..S-1`` made once by the model's own rotary
  module (``model.model.rotary_emb``), so rope scaling (linear, llama3, yarn, ...) is whatever
  the model does; the step gathers its row by position;
* attention: grouped-query attention over the filled part of the cache, with the query heads of
  one KV head packed together (no ``repeat_kv``);
* MLP: ``down(act(gate(x)) * up(x))`` with the model's own activation.

KV cache: one tensor ``[layers, 2 (k, v), batch, kv_heads, S, head_dim]`` in the model dtype,
allocated once per (batch, S) and reused across calls; ``S`` covers prompt + new tokens, rounded
up to ``kv_block``.

Prefill runs the prompt eagerly (causal SDPA over the prompt), writes its keys/values into the
cache and takes the greedy token from the last position. Each following token is one decode
step: embed the previous token, write this position's k/v into the cache (``index_copy_`` at a
position held in a device tensor), attend over cache positions ``0..pos``, and write the greedy
token and the next position back into static buffers. With ``kv_block`` set the step attends
over a fixed window of ``kv_len`` = ``pos + 1`` rounded up to ``kv_block`` positions with a mask
for the unfilled tail, so its shapes are static; on CUDA that step is captured once per window
length in a CUDA graph and replayed per token (all graphs share one memory pool; every tensor
that outlives a step lives in the engine's own static buffers). On CPU it runs eagerly and, by
default, attends over exactly ``pos + 1`` positions.

The step functions are named after what they do, as in gpt-fast: :meth:`DecodeEngine.prefill`
(the prompt), :meth:`DecodeEngine.decode_one_token` (one step on the static buffers) and
:meth:`DecodeEngine.decode_n_tokens` (the loop, with stopping). With ``compile`` the engine runs
``torch.compile(decode_one_token, fullgraph=True)`` instead of the eager step: every quantized
linear is a ``torch.library`` custom op (``slq.runtime.ops``), so nothing breaks the graph, and
inductor fuses each layer's small work (RMSNorm with the residual add, rotary with the cache
write, SiLU(gate) x up) into a few kernels. Compiling needs static shapes, so it implies KV
windows (``kv_block``); one compiled graph serves each window length. On CUDA the compiled step is
then captured in the engine's own CUDA graph. The eager step stays the oracle: compiled logits
equal eager ones within the dtype's tolerance (tests/runtime/test_step_compile.py).

Several tokens in one forward (the speculative verify step, :mod:`slq.runtime.speculative`):
:meth:`DecodeEngine.decode_tokens` runs T tokens at positions ``pos .. pos+T-1`` over the same
static cache: it writes their T keys/values at those positions and each token attends to cache
positions ``<= its own`` (a ``[T, kv_len]`` mask), so its logits equal those of T single steps.
It does not advance ``pos``. Rollback is :meth:`DecodeEngine.set_position`: the cache is never
copied; entries at positions ``>= pos`` are stale, are never attended (outside the exact window or
masked in a padded one) and are overwritten by the next write there. On CUDA each (T, window)
pair gets its own CUDA graph (:meth:`DecodeEngine.forward_tokens`), from the same pool.

Batches: rows must share one prompt length (no padding; give equal-length prompts). Stopping
follows ``transformers`` generate: when every row has produced an EOS the loop stops (checked
every ``check_every`` steps on CUDA, every step on CPU), and tokens after a row's first EOS are
replaced by the pad token, so outputs compare 1:1 with ``model.generate(do_sample=False)``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..models import arch
from ..util.errors import SlqError
from ..quant.grid import QuantizedWeight
from .qlinear import QuantLinear

SUPPORTED = arch.DECODE_FAMILIES  # llama, mistral, qwen2, qwen3 (arch's docstring says why not the others)
_SCALE_FREE_ROPE = ("dynamic", "longrope")  # rope types whose frequencies depend on the sequence length


def _family(model) -> str:
    why = arch.unsupported(model, "decode")
    if why:
        raise SlqError(f"{why} ({type(model).__name__})")
    return arch.model_type(model)


def supports(model) -> bool:
    """True when :class:`DecodeEngine` can run this model."""
    try:
        _family(model)
        _check_structure(model)
    except SlqError:
        return False
    return True


def _check_structure(model) -> None:
    base = getattr(model, "model", None)
    layers = getattr(base, "layers", None)
    ok = base is not None and isinstance(layers, nn.ModuleList) and len(layers) > 0
    need = (*arch.family(model).roles(), "input_layernorm", "post_attention_layernorm")
    if ok:
        for n in need:
            try:
                layers[0].get_submodule(n)
            except AttributeError:
                ok = False
                break
    if not ok or not all(hasattr(base, a) for a in ("embed_tokens", "norm", "rotary_emb")):
        raise SlqError(f"{type(model).__name__} does not have the Llama module layout the decode engine needs")


# ----------------------------------------------------------------------------- fusion


def _fuse(mods: list[nn.Module]) -> nn.Module | None:
    """One linear computing ``cat([m(x) for m in mods], -1)``, or None when they cannot be fused.

    nn.Linear: concatenated weights (a copy). QuantLinear: concatenated codes/scales/zeros with the
    same spec, prepared for the same backend (a copy of the prepared weights too)."""
    if all(type(m) is nn.Linear for m in mods):
        w0 = mods[0].weight
        if len({m.in_features for m in mods}) > 1 or len({(m.weight.dtype, m.weight.device) for m in mods}) > 1:
            return None
        if len({m.bias is None for m in mods}) > 1:
            return None
        n = sum(m.out_features for m in mods)
        lin = nn.Linear(mods[0].in_features, n, bias=mods[0].bias is not None, device=w0.device, dtype=w0.dtype)
        with torch.no_grad():
            lin.weight.copy_(torch.cat([m.weight for m in mods]))
            if lin.bias is not None:
                lin.bias.copy_(torch.cat([m.bias for m in mods]))
        lin.requires_grad_(False)
        return lin
    if all(isinstance(m, QuantLinear) for m in mods):
        m0 = mods[0]
        if any(m.spec != m0.spec or m.in_features != m0.in_features or m.backend != m0.backend for m in mods):
            return None
        if len({m.bias is None for m in mods}) > 1:
            return None
        q = QuantizedWeight(torch.cat([m.codes for m in mods]), torch.cat([m.scale for m in mods]),
                            torch.cat([m.zero for m in mods]), m0.spec)
        bias = None if m0.bias is None else torch.cat([m.bias.data for m in mods])
        lin = QuantLinear(q, bias)
        lin.set_backend(m0.backend)
        return lin
    return None


class _Proj:
    """Several projections of one input, fused into one GEMM when possible."""

    def __init__(self, mods: list[nn.Module], fuse: bool):
        self.sizes = [m.out_features for m in mods]
        self.fused = _fuse(mods) if fuse and len(mods) > 1 else None
        self.mods = mods

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self.fused is not None:
            return list(self.fused(x).split(self.sizes, dim=-1))
        return [m(x) for m in self.mods]


@dataclass
class _Layer:
    in_norm: nn.Module
    post_norm: nn.Module
    qkv: _Proj
    o: nn.Module
    gate_up: _Proj
    down: nn.Module
    act: nn.Module
    q_norm: nn.Module | None
    k_norm: nn.Module | None
    n_heads: int
    n_kv: int
    head_dim: int
    scaling: float


@dataclass
class DecodeStats:
    """Timings of the last :meth:`DecodeEngine.generate` call (seconds; CUDA synchronized)."""

    batch: int = 0
    prompt_len: int = 0
    new_tokens: int = 0
    decode_steps: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0  # excludes graph capture
    capture_s: float = 0.0
    graphs: list = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        """Decode throughput: batch x decode steps / decode time."""
        return self.batch * self.decode_steps / self.decode_s if self.decode_s > 0 else float("nan")


class DecodeEngine:
    """Static KV cache + (on CUDA) one CUDA graph per KV window; see the module docstring.

    ``cuda_graph``: "auto" (on when the model is on CUDA), True or False.
    ``kv_block``: window granularity of the static decode step; "auto" = 256 with CUDA graphs,
    None (exact, unpadded attention) otherwise. An int forces windows (testable on CPU).
    ``fuse``: fuse q/k/v and gate/up into one GEMM each ("auto": on CUDA only). Fusion copies those
    weights (the model itself is not modified).
    ``compile``: False (eager step), True (``torch.compile`` with inductor) or a torch.compile backend
    (a name: "aot_eager", "inductor", ..., or a backend callable); the step is compiled with ``fullgraph=True``, and
    ``kv_block`` "auto" becomes 256 (or 16 on CPU) since the compiled step needs static shapes.
    """

    def __init__(self, model: nn.Module, *, cuda_graph="auto", kv_block="auto", fuse="auto",
                 check_every: int | None = None, compile: bool | str = False):
        self.family = _family(model)
        _check_structure(model)
        self.model = model
        cfg = model.config
        base = model.model
        self.embed = base.embed_tokens
        self.norm = base.norm
        self.rotary = base.rotary_emb
        self.lm_head = model.get_output_embeddings()
        self.device = self.embed.weight.device
        self.dtype = self.embed.weight.dtype
        on_cuda = self.device.type == "cuda"
        self.cuda_graph = on_cuda if cuda_graph == "auto" else bool(cuda_graph)
        if self.cuda_graph and not on_cuda:
            raise SlqError("cuda_graph=True needs the model on a CUDA device")
        self.compile = "inductor" if compile is True else (compile or None)
        if self.compile is not None and not (isinstance(self.compile, str) or callable(self.compile)):
            raise SlqError(f"compile must be True, False or a torch.compile backend, got {compile!r}")
        if kv_block == "auto":
            kv_block = 256 if self.cuda_graph else (16 if self.compile else None)
        self.kv_block = kv_block
        if self.cuda_graph and self.kv_block is None:
            raise SlqError("CUDA graphs need static shapes: kv_block cannot be None with cuda_graph=True")
        if self.compile and self.kv_block is None:
            raise SlqError("a compiled step needs static shapes: kv_block cannot be None with compile")
        if self.kv_block is not None and (not isinstance(self.kv_block, int) or self.kv_block < 1):
            raise SlqError(f"kv_block must be a positive integer, got {self.kv_block!r}")
        fuse = on_cuda if fuse == "auto" else bool(fuse)
        self.check_every = check_every or (8 if on_cuda else 1)
        self.layers: list[_Layer] = []
        for layer in base.layers:
            at, mlp = layer.self_attn, layer.mlp
            hd = at.head_dim
            nq, nkv = at.q_proj.out_features // hd, at.k_proj.out_features // hd
            self.layers.append(_Layer(
                layer.input_layernorm, layer.post_attention_layernorm,
                _Proj([at.q_proj, at.k_proj, at.v_proj], fuse), at.o_proj,
                _Proj([mlp.gate_proj, mlp.up_proj], fuse), mlp.down_proj, mlp.act_fn,
                getattr(at, "q_norm", None), getattr(at, "k_norm", None), nq, nkv, hd, float(at.scaling)))
        self.n_kv = self.layers[0].n_kv
        self.head_dim = self.layers[0].head_dim
        if any((lay.n_kv, lay.head_dim) != (self.n_kv, self.head_dim) for lay in self.layers):
            raise SlqError("the decode engine needs the same KV heads and head_dim in every layer")
        self._window = self._sliding_window(cfg)
        self.batch = 0
        self.S = 0
        self.kv = None
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._tgraphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}  # (T, kv_len) -> decode_tokens graph
        self._tbufs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # T -> (ids [B, T], logits [B, T, V])
        self._pool = None
        self.stats = DecodeStats()
        self._step = self.decode_one_token
        self._tokens = self.decode_tokens
        if self.compile:
            import torch._dynamo

            # one graph per (buffers, window length): allow as many as a long generation needs
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
            self._step = torch.compile(self.decode_one_token, backend=self.compile, fullgraph=True, dynamic=False)
            self._tokens = torch.compile(self.decode_tokens, backend=self.compile, fullgraph=True, dynamic=False)

    # ------------------------------------------------------------------ set-up

    @staticmethod
    def _sliding_window(cfg) -> int | None:
        types = getattr(cfg, "layer_types", None) or []
        sw = getattr(cfg, "sliding_window", None)
        if cfg.model_type == "mistral":
            return sw
        return sw if "sliding_attention" in types else None

    def _allocate(self, batch: int, need: int) -> None:
        """(Re)allocate the cache and static buffers for ``batch`` rows and >= ``need`` positions."""
        if batch == self.batch and need <= self.S:
            return
        blk = self.kv_block or 1
        S = max(need, self.S if batch == self.batch else 0)
        S = -(-S // blk) * blk
        if self._window is not None and need > self._window:
            raise SlqError(f"this model uses sliding-window attention ({self._window} tokens); the decode engine "
                           f"handles sequences up to that length, asked for {need}")
        rope_type = getattr(self.rotary, "rope_type", "default")
        if isinstance(rope_type, str) and any(t in rope_type for t in _SCALE_FREE_ROPE):
            limit = getattr(self.rotary, "original_max_seq_len", None)
            if limit is not None and S > limit:
                raise SlqError(f"rope type {rope_type!r} changes its frequencies beyond {limit} positions; the "
                               f"decode engine handles up to {limit}, asked for {S}")
        self._graphs.clear()
        self._tgraphs.clear()
        self._tbufs.clear()
        self.kv = None
        n_layers = len(self.layers)
        dev, dt = self.device, self.dtype
        self.kv = torch.zeros((n_layers, 2, batch, self.n_kv, S, self.head_dim), dtype=dt, device=dev)
        with torch.inference_mode():
            pos = torch.arange(S, device=dev)
            cos, sin = self.rotary(torch.empty(1, dtype=dt, device=dev), pos[None])
        if cos.shape[-1] != self.head_dim:
            raise SlqError(f"rotary width {cos.shape[-1]} != head_dim {self.head_dim} (partial rotary is not supported)")
        self.cos, self.sin = cos[0].contiguous(), sin[0].contiguous()  # [S, head_dim]
        self.arange = pos
        self.ids = torch.zeros((batch, 1), dtype=torch.long, device=dev)  # input of the decode step
        self.pos = torch.zeros(1, dtype=torch.long, device=dev)  # its position
        self.next = torch.zeros((batch, 1), dtype=torch.long, device=dev)  # greedy output
        self.logits = torch.zeros((batch, self.lm_head.out_features), dtype=torch.float32, device=dev)
        self.batch, self.S = batch, S

    def allocate(self, batch: int, positions: int) -> None:
        """Make the cache hold ``batch`` rows and at least ``positions`` positions (reused when it does)."""
        self._allocate(batch, positions)

    def set_position(self, pos: int) -> None:
        """Roll the cache back (or forward) to ``pos`` filled positions, without copying it: the next
        step writes at ``pos``; entries at ``>= pos`` are stale and never attended."""
        if not 0 <= pos < self.S:
            raise SlqError(f"position {pos} is outside the cache (0..{self.S - 1})")
        self.pos.fill_(pos)

    # ------------------------------------------------------------------ the model

    def _qkv(self, lay: _Layer, x: torch.Tensor):
        B, T, _ = x.shape
        q, k, v = lay.qkv(x)
        q = q.view(B, T, lay.n_heads, lay.head_dim)
        k = k.view(B, T, lay.n_kv, lay.head_dim)
        if lay.q_norm is not None:
            q = lay.q_norm(q)
        if lay.k_norm is not None:
            k = lay.k_norm(k)
        return q.transpose(1, 2), k.transpose(1, 2), v.view(B, T, lay.n_kv, lay.head_dim).transpose(1, 2)

    @staticmethod
    def _rope(q, k, cos, sin):
        def rot(x):
            h = x.shape[-1] // 2
            return torch.cat((-x[..., h:], x[..., :h]), dim=-1)

        return q * cos + rot(q) * sin, k * cos + rot(k) * sin

    def _mlp(self, lay: _Layer, h: torch.Tensor) -> torch.Tensor:
        r = h
        x = lay.post_norm(h)
        g, u = lay.gate_up(x)
        return r + lay.down(lay.act(g) * u)

    def _head(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(h))[:, -1]  # [B, V] in the model dtype

    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        """Run the prompt [B, T], fill cache positions 0..T-1; logits of the last position."""
        B, T = ids.shape
        h = self.embed(ids)
        cos, sin = self.cos[:T][None, None], self.sin[:T][None, None]
        for li, lay in enumerate(self.layers):
            r = h
            q, k, v = self._qkv(lay, lay.in_norm(h))
            q, k = self._rope(q, k, cos, sin)
            self.kv[li, 0, :, :, :T] = k
            self.kv[li, 1, :, :, :T] = v
            a = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, scale=lay.scaling,
                                               enable_gqa=lay.n_heads != lay.n_kv)
            h = r + lay.o(a.transpose(1, 2).reshape(B, T, -1))
            h = self._mlp(lay, h)
        return self._head(h[:, -1:])

    def decode_one_token(self, kv_len: int) -> None:
        """One decode step on the static buffers: reads ids/pos, writes k/v at pos, logits, next,
        then ids <- next and pos <- pos + 1. Attends over cache positions [0, kv_len) masked to <= pos."""
        B = self.batch
        h = self.embed(self.ids)  # [B, 1, D]
        cos = self.cos.index_select(0, self.pos).view(1, 1, 1, -1)
        sin = self.sin.index_select(0, self.pos).view(1, 1, 1, -1)
        exact = self.kv_block is None  # kv_len == pos + 1: nothing to mask
        mask = None if exact else (self.arange[:kv_len] <= self.pos).view(1, 1, 1, kv_len)
        for li, lay in enumerate(self.layers):
            r = h
            q, k, v = self._qkv(lay, lay.in_norm(h))
            q, k = self._rope(q, k, cos, sin)
            kc, vc = self.kv[li, 0], self.kv[li, 1]
            kc.index_copy_(2, self.pos, k)
            vc.index_copy_(2, self.pos, v)
            g = lay.n_heads // lay.n_kv
            qp = q.reshape(B, lay.n_kv, g, lay.head_dim)  # the g query heads of one KV head as g queries
            a = F.scaled_dot_product_attention(qp, kc[:, :, :kv_len], vc[:, :, :kv_len], attn_mask=mask,
                                               scale=lay.scaling)
            h = r + lay.o(a.reshape(B, 1, lay.n_heads * lay.head_dim))
            h = self._mlp(lay, h)
        logits = self._head(h)
        self.logits.copy_(logits)
        self.next.copy_(logits.argmax(-1, keepdim=True))
        self.ids.copy_(self.next)
        self.pos.add_(1)

    def decode_tokens(self, ids: torch.Tensor, logits: torch.Tensor, kv_len: int) -> None:
        """T tokens ``ids`` [B, T] at positions pos..pos+T-1 in one forward over the static cache: writes
        their k/v there, each attends over cache positions [0, kv_len) masked to <= its own position;
        float32 logits [B, T, V] into ``logits``. ``pos`` is not advanced (see :meth:`set_position`)."""
        B, T = ids.shape
        h = self.embed(ids)  # [B, T, D]
        at = self.pos + self.arange[:T]  # [T] positions
        cos = self.cos.index_select(0, at)[None, None]  # [1, 1, T, head_dim]
        sin = self.sin.index_select(0, at)[None, None]
        mask = (self.arange[:kv_len][None, :] <= at[:, None]).view(1, 1, T, kv_len)
        for li, lay in enumerate(self.layers):
            r = h
            q, k, v = self._qkv(lay, lay.in_norm(h))
            q, k = self._rope(q, k, cos, sin)
            kc, vc = self.kv[li, 0], self.kv[li, 1]
            kc.index_copy_(2, at, k)
            vc.index_copy_(2, at, v)
            a = F.scaled_dot_product_attention(q, kc[:, :, :kv_len], vc[:, :, :kv_len], attn_mask=mask,
                                               scale=lay.scaling, enable_gqa=lay.n_heads != lay.n_kv)
            h = r + lay.o(a.transpose(1, 2).reshape(B, T, -1))
            h = self._mlp(lay, h)
        logits.copy_(self.lm_head(self.norm(h)))

    def token_buffers(self, T: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The static (ids [B, T], float32 logits [B, T, V]) buffers of :meth:`forward_tokens`."""
        b = self._tbufs.get(T)
        if b is None:
            if not 1 <= T <= self.S:
                raise SlqError(f"cannot run {T} tokens at once in a cache of {self.S} positions")
            b = self._tbufs[T] = (torch.zeros((self.batch, T), dtype=torch.long, device=self.device),
                                  torch.zeros((self.batch, T, self.lm_head.out_features), dtype=torch.float32,
                                              device=self.device))
        return b

    def forward_tokens(self, T: int, pos: int) -> torch.Tensor:
        """:meth:`decode_tokens` on ``token_buffers(T)[0]`` with the engine at position ``pos`` (the caller
        knows it on the host; ``self.pos`` must hold it); a CUDA graph per (T, window) on CUDA.
        Returns the logits buffer [B, T, V] (overwritten by the next call)."""
        if pos + T > self.S:
            raise SlqError(f"{T} tokens at position {pos} do not fit a cache of {self.S} positions")
        ids, logits = self.token_buffers(T)
        kv_len = self._window_len(pos + T - 1)
        if self.cuda_graph:
            key = (T, kv_len)
            g = self._tgraphs.get(key)
            if g is None:
                g = self._tgraphs[key] = self._capture(lambda: self._tokens(ids, logits, kv_len), restore=False)
            g.replay()
        else:
            self._tokens(ids, logits, kv_len)
        return logits

    def step(self, pos: int) -> None:
        """One :meth:`decode_one_token` with the engine at host-known position ``pos`` (graph replay on CUDA)."""
        kv_len = self._window_len(pos)
        if self.cuda_graph:
            self._graph(kv_len).replay()
        else:
            self._step(kv_len)

    # ------------------------------------------------------------------ graphs

    def _window_len(self, pos: int) -> int:
        if self.kv_block is None:
            return pos + 1
        return min(self.S, -(-(pos + 1) // self.kv_block) * self.kv_block)

    def _graph(self, kv_len: int) -> torch.cuda.CUDAGraph:
        g = self._graphs.get(kv_len)
        if g is not None:
            return g
        g = self._capture(lambda: self._step(kv_len))
        self._graphs[kv_len] = g
        self.stats.graphs.append(kv_len)
        return g

    def _capture(self, fn, restore: bool = True) -> torch.cuda.CUDAGraph:
        """Warm ``fn`` up on a side stream (restoring ids/pos after each run when ``restore``), then
        capture it into a CUDA graph in the engine's pool."""
        t0 = time.perf_counter()
        ids0, pos0 = self.ids.clone(), self.pos.clone()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):  # warm-up: Triton JIT, cuBLAS handles, allocator; state restored after each
                fn()
                if restore:
                    self.ids.copy_(ids0)
                    self.pos.copy_(pos0)
        torch.cuda.current_stream().wait_stream(s)
        torch.cuda.synchronize()
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        try:
            g, kept = torch.cuda.CUDAGraph(keep_graph=True), True  # kept: its nodes can be counted (graphs.py)
        except TypeError:  # a torch without keep_graph
            g, kept = torch.cuda.CUDAGraph(), False
        with torch.cuda.graph(g, pool=self._pool):  # capture records, it does not run: state unchanged
            fn()
        if kept:
            g.instantiate()  # now, not at the first replay (which is timed)
        torch.cuda.synchronize()
        self.stats.capture_s += time.perf_counter() - t0
        return g

    # ------------------------------------------------------------------ generate

    def decode_n_tokens(self, out: torch.Tensor, T: int, eos_t: torch.Tensor | None) -> int:
        """Fill ``out[:, 1:]`` ([B, n], column 0 holds prefill's token; the prompt has T tokens) one
        decode step per column; returns the number of columns made (< n when every row hit EOS)."""
        n = out.shape[1]
        done_at = n
        if eos_t is not None and bool(torch.isin(out[:, :1], eos_t).any(1).all()):
            done_at = 1
        self.ids.copy_(out[:, :1])
        self.pos.fill_(T)
        i = 1
        while i < done_at:
            kv_len = self._window_len(T + i - 1)
            if self.cuda_graph:
                self._graph(kv_len).replay()
            else:
                self._step(kv_len)
            out[:, i] = self.next[:, 0]
            i += 1
            if eos_t is not None and (i % self.check_every == 0 or i == done_at):
                if bool(torch.isin(out[:, :i], eos_t).any(1).all()):
                    done_at = i
        return done_at

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 32, *, eos_token_id=None,
                 pad_token_id: int | None = None) -> torch.Tensor:
        """Greedy continuation: LongTensor [B, T + n] (prompt then new tokens), n <= max_new_tokens."""
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        if input_ids.dim() != 2 or input_ids.shape[1] < 1 or input_ids.shape[0] < 1:
            raise SlqError(f"input_ids must be [batch, prompt_len] with prompt_len >= 1, got {tuple(input_ids.shape)}")
        if max_new_tokens < 1:
            raise SlqError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        eos = _eos_list(eos_token_id)
        if eos and pad_token_id is None:
            pad_token_id = eos[0]
        ids = input_ids.to(self.device, torch.long)
        B, T = ids.shape
        n = max_new_tokens
        self._allocate(B, T + n - 1)
        st = self.stats = DecodeStats(batch=B, prompt_len=T)
        out = torch.empty((B, n), dtype=torch.long, device=self.device)
        eos_t = torch.tensor(eos, device=self.device) if eos else None

        self._sync()
        t0 = time.perf_counter()
        logits = self.prefill(ids)
        out[:, 0] = logits.argmax(-1)
        self.logits.copy_(logits)
        self._sync()
        st.prefill_s = time.perf_counter() - t0

        t0 = time.perf_counter()
        done_at = self.decode_n_tokens(out, T, eos_t)
        self._sync()
        st.decode_s = time.perf_counter() - t0 - (st.capture_s if self.cuda_graph else 0.0)
        st.decode_steps = done_at - 1
        gen = out[:, :done_at]
        if eos_t is not None:
            gen = _after_eos(gen, eos_t, pad_token_id)
        st.new_tokens = gen.shape[1]
        return torch.cat([ids, gen], dim=1)


def _eos_list(eos) -> list[int]:
    if eos is None:
        return []
    if isinstance(eos, int):
        return [eos]
    return [int(e) for e in eos]


def _after_eos(gen: torch.Tensor, eos_t: torch.Tensor, pad: int) -> torch.Tensor:
    """transformers' convention: tokens after a row's first EOS become ``pad``; the length is that
    of the longest row up to and including its EOS."""
    hit = torch.isin(gen, eos_t)
    seen = hit.cumsum(1)
    after = (seen - hit.long()) > 0  # strictly after the first EOS
    gen = gen.masked_fill(after, pad)
    first = torch.where(hit.any(1), hit.float().argmax(1) + 1, torch.full_like(hit[:, 0], gen.shape[1], dtype=torch.long))
    return gen[:, : int(first.max())]


def generate(model: nn.Module, input_ids: torch.Tensor, max_new_tokens: int = 32, *, eos_token_id="auto",
             pad_token_id: int | None = None, **engine_kw) -> torch.Tensor:
    """Greedy decoding through a fresh :class:`DecodeEngine`: [B, T + n] like ``model.generate``.

    ``eos_token_id="auto"`` takes the model's ``generation_config.eos_token_id``; None never stops early.
    ``engine_kw`` go to :class:`DecodeEngine` (cuda_graph, kv_block, fuse, check_every).
    """
    if eos_token_id == "auto":
        gc = getattr(model, "generation_config", None)
        eos_token_id = getattr(gc, "eos_token_id", None)
        if pad_token_id is None:
            pad_token_id = getattr(gc, "pad_token_id", None)
    eng = DecodeEngine(model, **engine_kw)
    return eng.generate(input_ids, max_new_tokens, eos_token_id=eos_token_id, pad_token_id=pad_token_id)


__all__ = ["DecodeEngine", "DecodeStats", "SUPPORTED", "generate", "supports"]
