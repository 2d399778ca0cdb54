"""``slq bench``: decode speed of quantized linears and models, beside FP16, against the roofline.

Two sources of weights:

* ``--shape NAME`` (:data:`SHAPES`): synthetic random weights of a real model's shapes, no
  download. FP16 is a random Llama built with ``transformers.LlamaConfig`` +
  ``AutoModelForCausalLM.from_config``; quantized variants replace every decoder linear by a
  :class:`~slq.modules.QuantLinear` holding random codes (values do not change speed).
* ``DIR``: a real slq checkpoint; its FP16 counterpart is the same model with every QuantLinear
  replaced by an fp16 ``nn.Linear`` of its dequantized weight.

Measurements (every figure next to the FP16 figure of the same run, with the speedup and the
% of the memory-bandwidth roofline):

* ``layer`` (shape mode): one linear of each kind (q/k/v fused, o, gate/up fused, down) at each
  bitwidth and batch M, timed over R distinct weight copies with R x bytes >= 2 x the last-level
  cache (L2 on GPU, LLC on CPU), so every call streams its weights from memory; time / R.
  On CUDA the R calls are one CUDA graph.
* ``stack``: every linear of every layer (the decode engine's fused projections), in one CUDA
  graph on GPU, a plain loop on CPU.
* ``decode``: end-to-end greedy decode through :class:`slq.decode.DecodeEngine` (CUDA graph per
  step on GPU), tokens/s = batch x decode steps / decode time, prefill excluded and reported apart.

Roofline: time = bytes that must be streamed / peak bandwidth. Weight bytes are the storage format's:
``N K (b + (16 + b)/G) / 8`` for a quantized linear (codes, fp16 scale and b-bit zero per group),
``2 N K`` for FP16; ``decode`` adds the fp16 lm_head and the KV cache read at the mean context.
The peak is measured here: a device-to-device copy (CUDA graph) on GPU, a large memcpy
(``Tensor.copy_``, beyond the LLC) on CPU, counting bytes read + written.
"""

from __future__ import annotations

import gc
import json
import math
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..util.errors import SlqError
from ..quant.grid import QuantizedWeight
from .qlinear import QuantLinear
from ..quant.spec import QuantSpec, resolve_group_size

BACKENDS = ("reference", "triton", "humming")
PLAN_TARGETS = {"dl": 5.5, "tl": 3.5}  # bits/param; pattern: K/V (attn.qkv) high, MLP low
KINDS = ("qkv", "o", "gate_up", "down")


@dataclass(frozen=True)
class Shape:
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    layers: int
    vocab: int
    head_dim: int

    def kinds(self) -> dict[str, tuple[int, int]]:
        """Fused decode projections, [N, K]."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return {"qkv": (q + 2 * kv, self.hidden), "o": (self.hidden, q), "gate_up": (2 * self.intermediate, self.hidden),
                "down": (self.hidden, self.intermediate)}

    def config(self, layers: int | None = None, max_positions: int = 4096):
        from transformers import LlamaConfig

        return LlamaConfig(vocab_size=self.vocab, hidden_size=self.hidden, intermediate_size=self.intermediate,
                           num_hidden_layers=layers or self.layers, num_attention_heads=self.heads,
                           num_key_value_heads=self.kv_heads, head_dim=self.head_dim,
                           max_position_embeddings=max_positions, tie_word_embeddings=False)


# Llama-structured shapes (qkv bias / q_norm of the Qwen families do not change the streamed bytes)
SHAPES: dict[str, Shape] = {
    "llama3-8b": Shape(4096, 14336, 32, 8, 32, 128256, 128),
    "llama3-3b": Shape(3072, 8192, 24, 8, 28, 128256, 128),
    "llama3-1b": Shape(2048, 8192, 32, 8, 16, 128256, 64),
    "qwen2.5-7b": Shape(3584, 18944, 28, 4, 28, 152064, 128),
    "qwen2.5-1.5b": Shape(1536, 8960, 12, 2, 28, 151936, 128),
    "qwen3-8b": Shape(4096, 12288, 32, 8, 36, 151936, 128),
    "tiny": Shape(256, 768, 4, 2, 2, 1024, 64),  # CPU / CI
}


# ----------------------------------------------------------------------------- input parsing


def parse_ints(text: str, what: str, lo: int = 1, hi: int | None = None) -> list[int]:
    try:
        vals = [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise SlqError(f"{what} must be a comma-separated list of integers, got {text!r}") from None
    if not vals:
        raise SlqError(f"{what} is empty")
    for v in vals:
        if v < lo or (hi is not None and v > hi):
            rng = f"in {lo}..{hi}" if hi is not None else f">= {lo}"
            raise SlqError(f"{what} must be {rng}, got {v}")
    return list(dict.fromkeys(vals))


def parse_backends(text: str) -> list[str]:
    names = [b.strip() for b in str(text).split(",") if b.strip()]
    for b in names:
        if b not in BACKENDS:
            raise SlqError(f"unknown backend {b!r}; choose from {', '.join(BACKENDS)}")
    if not names:
        raise SlqError("--backends is empty")
    return list(dict.fromkeys(names))


def get_shape(name: str) -> Shape:
    if name not in SHAPES:
        raise SlqError(f"unknown shape {name!r}; choose one of {', '.join(SHAPES)}")
    return SHAPES[name]


def backend_status(backends: list[str], device: torch.device) -> tuple[list[str], list[dict]]:
    """(runnable backends, [{"backend", "reason"}] for the skipped ones)."""
    ok, skipped = [], []
    for b in backends:
        reason = None
        if b in ("triton", "humming") and device.type != "cuda":
            reason = f"{b} needs a CUDA GPU (this run is on {device.type})"
        elif b == "triton":
            from .backends import triton_gemv

            if triton_gemv.triton is None:
                reason = "triton is not installed"
        elif b == "humming":
            import importlib.util

            if importlib.util.find_spec("humming") is None:
                reason = "humming-kernels is not installed"
        (skipped.append({"backend": b, "reason": reason}) if reason else ok.append(b))
    return ok, skipped


# ----------------------------------------------------------------------------- timing


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_graph(fn, iters: int = 20, warm: int = 3) -> float:
    """Median ms of one replay of a CUDA graph that captured ``fn()`` (bench/kernels_gpu.py uses this one too)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    for _ in range(warm):
        g.replay()
    torch.cuda.synchronize()
    ts = []
    for _ in range(iters):
        a, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        e.record()
        e.synchronize()
        ts.append(a.elapsed_time(e))
    del g
    return statistics.median(ts)


def time_eager(fn, iters: int = 5, warm: int = 1, device: torch.device = torch.device("cpu")) -> float:
    """Median ms of ``fn()`` run eagerly (synchronized on CUDA)."""
    for _ in range(warm):
        fn()
    sync(device)
    ts = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        sync(device)
        ts.append((time.perf_counter() - t) * 1e3)
    return statistics.median(ts)


def time_fn(fn, device: torch.device, iters: int) -> float:
    return time_graph(fn, iters=iters) if device.type == "cuda" else time_eager(fn, iters=iters, device=device)


def cache_bytes(device: torch.device) -> tuple[int, str]:
    """(bytes, level) of the cache that rotation must exceed: L2 on GPU, the LLC on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).L2_cache_size), "L2"
    best = 0
    base = Path("/sys/devices/system/cpu/cpu0/cache")
    for idx in base.glob("index*"):
        try:
            txt = (idx / "size").read_text().strip()
            mult = {"K": 1024, "M": 1024**2, "G": 1024**3}.get(txt[-1], 1)
            best = max(best, int(txt.rstrip("KMG")) * mult)
        except (OSError, ValueError):
            continue
    return (best or 32 * 1024**2), "LLC"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def peak_bandwidth(device: torch.device, nbytes: int | None = None) -> dict:
    """Measured copy bandwidth (bytes read + written per second)."""
    if device.type == "cuda":
        nbytes = nbytes or 1024**3
        a = torch.empty(nbytes // 2, dtype=torch.float16, device=device).normal_()
        b = torch.empty_like(a)
        ms = time_graph(lambda: b.copy_(a), iters=10)
        method = f"device-to-device copy of {nbytes / 1024**3:.2f} GiB in a CUDA graph, (read + write bytes) / time"
    else:
        cache, _ = cache_bytes(device)
        nbytes = nbytes or max(64 * 1024**2, 8 * cache)
        a = torch.ones(nbytes // 2, dtype=torch.float16)
        b = torch.empty_like(a)
        ms = time_eager(lambda: b.copy_(a), iters=5, warm=2)
        method = (f"CPU memcpy (Tensor.copy_) of {nbytes / 1024**2:.0f} MiB, {torch.get_num_threads()} torch "
                  "thread(s), (read + write bytes) / time")
    gbps = 2 * a.numel() * 2 / ms / 1e6
    del a, b
    return {"GBps": gbps, "method": method, "bytes": nbytes}


# ----------------------------------------------------------------------------- weights


def weight_bytes(m: nn.Module) -> float:
    """Bytes of the stored format that a forward must stream (see the module docstring)."""
    if isinstance(m, QuantLinear):
        return m.out_features * m.in_features * m.spec.bits_per_param(m.in_features) / 8
    return m.weight.numel() * m.weight.element_size()


def random_qlinear(n: int, k: int, bits: int, group: int | None, device, gen: torch.Generator) -> QuantLinear:
    """A QuantLinear of random codes, asymmetric, group resolved for K (weights ~ +-0.02)."""
    g, _ = resolve_group_size(k, group)
    spec = QuantSpec(bits, g, False)
    G = spec.effective_group(k)
    codes = torch.randint(0, 1 << bits, (n, k), dtype=torch.uint8, device=device, generator=gen)
    scale = torch.full((n, k // G), 0.04 / ((1 << bits) - 1), dtype=torch.float16, device=device)
    zero = torch.full((n, k // G), 1 << (bits - 1), dtype=torch.uint8, device=device)
    return QuantLinear(QuantizedWeight(codes, scale, zero, spec))


def _bpp(bits: int, k: int, group: int | None) -> float:
    return QuantSpec(bits, resolve_group_size(k, group)[0], False).bits_per_param(k)


# ----------------------------------------------------------------------------- plans


def _units(model):
    import warnings

    from ..quant.units import build_units

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_units(model)


def plan_bits(units, alloc: dict, group: int | None) -> float:
    """Exact bits/param (scales and zeros included) of a unit -> bits allocation."""
    from ..quant.units import storage_bits

    tot = sum(storage_bits(u, alloc[u.name], group, False) for u in units)
    return tot / sum(u.n_params for u in units)


def pattern_plan(units, target: float, group: int | None) -> tuple[dict, dict]:
    """The per-kind allocation (same in every layer) with "K/V high, MLP low" closest to ``target``.

    Pattern: bits(attn.qkv) >= bits(attn.o) >= max(bits(mlp.*)) and bits(attn.qkv) > max(bits(mlp.*)).
    Among the patterns within 0.1 bits/param of the target the least spread one (qkv - lowest MLP
    bits) wins, then the closest; with none that close, the closest. Returns (unit -> bits, kind -> bits)."""
    kinds = sorted({u.kind for u in units})
    need = {"attn.qkv", "attn.o", "mlp.gate_up", "mlp.down"}
    if not need <= set(kinds):
        raise SlqError(f"mixed plans need fused units {sorted(need)}; this model has {kinds}")
    best = None
    for qkv in range(2, 9):
        for o in range(2, qkv + 1):
            for gu in range(2, min(o, qkv - 1) + 1):
                for dn in range(2, min(o, qkv - 1) + 1):
                    per = {"attn.qkv": qkv, "attn.o": o, "mlp.gate_up": gu, "mlp.down": dn}
                    alloc = {u.name: per[u.kind] for u in units}
                    bpp = plan_bits(units, alloc, group)
                    err = abs(bpp - target)
                    key = (err > 0.1, qkv - min(gu, dn) if err <= 0.1 else 0, err, -qkv, -o)
                    if best is None or key < best[0]:
                        best = (key, alloc, per)
    return best[1], best[2]


def file_plan(path: str, units) -> dict:
    """unit -> bits from a JSON file: {unit name: bits} or {kind: bits} (every layer), optionally
    under an "allocation" or "bits" key; 16 keeps a unit in FP16."""
    from ..util.jsonio import read_json

    p = Path(path)
    d = read_json(p, "plan file", missing=f"plan {path!r} is not dl, tl or an existing JSON file")
    for key in ("allocation", "bits"):
        if isinstance(d, dict) and isinstance(d.get(key), dict):
            d = d[key]
    if not isinstance(d, dict) or not d:
        raise SlqError(f"plan file {p} must hold a JSON object unit -> bits")
    kinds = {u.kind for u in units}
    names = {u.name for u in units}
    alloc = {}
    for u in units:
        v = d.get(u.name, d.get(u.kind))
        if v is None:
            raise SlqError(f"plan file {p} gives no bits for unit {u.name}")
        alloc[u.name] = v
    unknown = [k for k in d if k not in names and k not in kinds]
    if unknown:
        raise SlqError(f"plan file {p} names unknown units: {unknown[:3]}")
    for n, v in alloc.items():
        if not isinstance(v, int) or not (2 <= v <= 8 or v == 16):
            raise SlqError(f"plan file {p}: {n} has bits {v!r}; bits must be 2..8 or 16")
    return alloc


# ----------------------------------------------------------------------------- the bench


class Bench:
    def __init__(self, *, device: torch.device, dtype: torch.dtype, backends: list[str], batches: list[int],
                 group: int | None, prompt_len: int, new_tokens: int, iters: int, repeats: int, json_out, log):
        self.device, self.dtype = device, dtype
        self.backends, self.skipped = backend_status(backends, device)
        self.batches, self.group = batches, group
        self.prompt_len, self.new_tokens, self.iters, self.repeats = prompt_len, new_tokens, iters, repeats
        self.json_out, self.log = json_out, log
        self.gen = torch.Generator(device=device).manual_seed(0)
        self.cache, self.cache_level = cache_bytes(device)
        self.res: dict = {}
        self._fp16: dict = {}

    # ------------------------------------------------------------ bookkeeping

    def header(self, settings: dict) -> None:
        from ..util.provenance import git_commit, versions

        v = versions()
        for mod in ("triton", "humming"):
            try:
                v[mod] = __import__(mod).__version__
            except Exception:  # noqa: BLE001 - optional, recorded as absent
                v[mod] = None
        dev = {"type": self.device.type, "cache_bytes": self.cache, "cache_level": self.cache_level,
               "torch_threads": torch.get_num_threads()}
        if self.device.type == "cuda":
            p = torch.cuda.get_device_properties(self.device)
            dev.update(name=p.name, sms=p.multi_processor_count, memory_bytes=p.total_memory)
        else:
            dev.update(name=_cpu_name(), cpus=os.cpu_count())
        self.log(f"device: {dev['name']} ({self.device.type}); measuring peak bandwidth")
        bw = peak_bandwidth(self.device)
        self.peak = bw["GBps"] * 1e9
        self.res = {
            "kind": "slq-bench",
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "device": dev,
            "versions": v,
            "git_commit": git_commit(),
            "settings": {**settings, "dtype": str(self.dtype).replace("torch.", ""), "backends_run": self.backends,
                         "batches": self.batches, "group_size": self.group, "prompt_len": self.prompt_len,
                         "new_tokens": self.new_tokens, "iters": self.iters, "repeats": self.repeats},
            "bandwidth": bw,
            "roofline": ("roofline time = bytes of weights streamed (storage format: b + (16 + b)/G bits per weight "
                         "quantized, 16 FP16; decode adds the fp16 lm_head and the KV cache read at the mean context) "
                         "/ the measured peak bandwidth; pct_roofline = 100 x roofline time / measured time"),
            "rotation": f"layer rows: R weight copies with R x bytes >= 2 x {self.cache_level} ({self.cache} bytes)",
            "skipped": list(self.skipped),
            "errors": [],
            "plans": {},
            "rows": [],
        }
        for s in self.skipped:
            self.log(f"skipped {s['backend']}: {s['reason']}")
        self.save()

    def save(self) -> None:
        if self.json_out is not None:
            from ..util.jsonio import write_json

            write_json(self.json_out, self.res)

    def row(self, **r) -> dict:
        t = r["ms"]
        if r.get("bytes") is not None:
            r["roofline_ms"] = r["bytes"] / self.peak * 1e3
            r["pct_roofline"] = 100 * r["roofline_ms"] / t
            r["GBps"] = r["bytes"] / t / 1e6
        key = (r["kind"], r.get("layer"), r["M"])
        if r["backend"] == "fp16":
            self._fp16[key] = r
        fp = self._fp16.get(key)
        if fp is not None:
            r["fp16_ms"] = fp["ms"]
            r["speedup"] = fp["ms"] / t
            if "tokens_per_s" in r:
                r["fp16_tokens_per_s"] = fp["tokens_per_s"]
        self.res["rows"].append(r)
        return r

    def error(self, what: str, exc: BaseException) -> None:
        msg = f"{what}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:400]
        self.res["errors"].append(msg)
        self.log(f"error (recorded): {msg}")

    # ------------------------------------------------------------ per layer

    def layers(self, shape: Shape, bits_list: list[int]) -> None:
        dev, dt = self.device, self.dtype
        xs = {m: {k: torch.randn(m, k, device=dev, generator=self.gen).to(dt) for k in {k for _, k in shape.kinds().values()}}
              for m in self.batches}
        for name, (n, k) in shape.kinds().items():
            nb = 2 * n * k
            r = max(2, math.ceil(2 * self.cache / nb))
            ws = [torch.empty(n, k, device=dev, dtype=dt).normal_(0, 0.02, generator=self.gen) for _ in range(r)]
            for m in self.batches:
                x = xs[m][k]
                ms = time_fn(lambda: [F.linear(x, w) for w in ws], dev, self.iters) / r
                self.row(kind="layer", layer=name, N=n, K=k, backend="fp16", bits=16, bits_per_param=16.0, M=m, ms=ms,
                         us=ms * 1e3, bytes=nb, reps=r, rotated_bytes=r * nb)
            del ws
            for b in bits_list:
                qb = n * k * _bpp(b, k, self.group) / 8
                q0 = random_qlinear(n, k, b, self.group, dev, self.gen)
                # the reference backend reads its uint8 codes (1 byte per weight): fewer copies exceed the cache
                resident = {"reference": sum(t.numel() * t.element_size() for t in (q0.codes, q0.scale, q0.zero))}
                reps = {be: max(2, math.ceil(2 * self.cache / resident.get(be, qb))) for be in self.backends}
                # distinct memory per copy (values equal: they do not change speed)
                pool = [q0] + [QuantLinear(QuantizedWeight(q0.codes.clone(), q0.scale.clone(), q0.zero.clone(), q0.spec))
                               for _ in range(max(reps.values(), default=1) - 1)]
                for be in self.backends:
                    r = reps[be]
                    qls = pool[:r]
                    try:
                        for q in qls:
                            q.set_backend(be)
                    except Exception as exc:  # noqa: BLE001 - one layer a backend cannot take is a note
                        self.error(f"layer {name} b={b} {be} prepare", exc)
                        continue
                    for m in self.batches:
                        x = xs[m][k]
                        try:
                            ms = time_fn(lambda: [q(x) for q in qls], dev, self.iters) / r
                        except Exception as exc:  # noqa: BLE001
                            self.error(f"layer {name} b={b} {be} M={m}", exc)
                            continue
                        self.row(kind="layer", layer=name, N=n, K=k, backend=be, bits=b,
                                 bits_per_param=_bpp(b, k, self.group), M=m, ms=ms, us=ms * 1e3, bytes=qb, reps=r,
                                 rotated_bytes=r * resident.get(be, qb))
                    for q in qls:
                        q.set_backend("reference")  # drop the prepared copy before the next backend
                del pool, qls
                self._free()
            self.log(f"layer {name} [{n} x {k}] done")
            self.save()

    # ------------------------------------------------------------ stack and decode

    def model_variant(self, model, label: str, backend: str, bits, bpp: float, what=("stack", "decode")) -> None:
        """Stack and decode rows of one model (FP16 when backend == 'fp16')."""
        from .decode import DecodeEngine

        dev, dt = self.device, self.dtype
        try:
            eng = DecodeEngine(model, fuse=True)
        except Exception as exc:  # noqa: BLE001
            self.error(f"{label} {backend} engine", exc)
            return
        mods = []
        for lay in eng.layers:
            for p in (lay.qkv, lay.gate_up):
                mods += [p.fused] if p.fused is not None else p.mods
            mods += [lay.o, lay.down]
        stack_bytes = sum(weight_bytes(m) for m in mods)
        head_bytes = weight_bytes(eng.lm_head)
        base = dict(backend=backend, bits=bits, bits_per_param=bpp, variant=label)
        for m in self.batches:
            if "stack" in what:
                xs = {k: torch.randn(m, k, device=dev, generator=self.gen).to(dt) for k in {mod.in_features for mod in mods}}
                try:
                    with torch.inference_mode():
                        ms = time_fn(lambda: [mod(xs[mod.in_features]) for mod in mods], dev, max(3, self.iters // 2))
                    self.row(kind="stack", M=m, ms=ms, bytes=stack_bytes, n_linears=len(mods),
                             beyond_cache=stack_bytes > 2 * self.cache, **base)
                except Exception as exc:  # noqa: BLE001
                    self.error(f"stack {label} {backend} M={m}", exc)
                del xs
            if "decode" not in what:
                continue
            ids = torch.randint(0, model.config.vocab_size, (m, self.prompt_len), device=dev, generator=self.gen)
            try:
                eng.generate(ids, self.new_tokens, eos_token_id=None)  # warm-up: graph capture, JIT
                runs = []
                for _ in range(self.repeats):
                    eng.generate(ids, self.new_tokens, eos_token_id=None)
                    runs.append((eng.stats.decode_s, eng.stats.prefill_s))
                st = eng.stats
                dec = statistics.median(r[0] for r in runs)
                pre = statistics.median(r[1] for r in runs)
                steps = st.decode_steps
                mean_ctx = self.prompt_len + (steps + 1) / 2
                kv_bytes = len(eng.layers) * 2 * m * eng.n_kv * eng.head_dim * mean_ctx * torch.finfo(dt).bits / 8
                step_ms = dec / steps * 1e3
                self.row(kind="decode", M=m, batch=m, ms=step_ms, ms_per_step=step_ms, tokens_per_s=m / step_ms * 1e3,
                         prefill_ms=pre * 1e3, decode_steps=steps, cuda_graph=eng.cuda_graph,
                         bytes=stack_bytes + head_bytes + kv_bytes, weight_bytes=stack_bytes + head_bytes,
                         kv_bytes=kv_bytes, **base)
            except Exception as exc:  # noqa: BLE001
                self.error(f"decode {label} {backend} batch={m}", exc)
        self.log(f"{label} {backend}: done")
        del eng
        self._free()
        self.save()

    def _free(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def _decoder_linears(model) -> dict[str, tuple[int, int]]:
    from ..quant.calib import decoder_layers

    layers = decoder_layers(model)
    prefix = next(n for n, m in model.named_modules() if m is layers)
    out = {}
    for i, layer in enumerate(layers):
        for rel, mod in layer.named_modules():
            if isinstance(mod, (nn.Linear, QuantLinear)):
                out[f"{prefix}.{i}.{rel}"] = (mod.out_features, mod.in_features)
    return out


def _put(model, name: str, mod: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, mod)


def _quantize_random(model, names: dict, bits_of: dict[str, int], group, device, dtype, gen) -> None:
    for name, (n, k) in names.items():
        b = bits_of[name]
        if b == 16:
            lin = nn.Linear(k, n, bias=False, device=device, dtype=dtype)
            with torch.no_grad():
                lin.weight.normal_(0, 0.02, generator=gen)
            _put(model, name, lin.requires_grad_(False))
        else:
            _put(model, name, random_qlinear(n, k, b, group, device, gen))


def _set_backend(model, backend: str) -> list[str]:
    """Prepare every QuantLinear for ``backend``; layers it cannot take stay on reference (returned)."""
    left = []
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            try:
                m.set_backend(backend)
            except Exception:  # noqa: BLE001 - shape the kernel refuses
                m.set_backend("reference")
                left.append(name)
    return left


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise SlqError(f"--device must be auto, cpu or cuda, got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SlqError("--device cuda was asked for but CUDA is not available")
    return torch.device(device)


def run(*, shape: str | None = None, checkpoint: str | None = None, bits: str = "2,3,4,5,6,7,8",
        plans: str | None = "dl,tl", backends: str = "reference,triton,humming", batches: str = "1,16",
        layers: int | None = None, json_out=None, group_size: int | None = 128, prompt_len: int = 32,
        new_tokens: int = 32, iters: int | None = None, repeats: int | None = None, device: str = "auto",
        measure: str = "layer,stack,decode", log=None) -> dict:
    """Run ``slq bench`` and return the result dict (also written to ``json_out``)."""
    log = log or (lambda s: None)
    if (shape is None) == (checkpoint is None):
        raise SlqError("give either --shape NAME or a checkpoint DIR")
    sh = get_shape(shape) if shape is not None else None
    bits_list = parse_ints(bits, "--bits", 2, 8) if sh is not None else []
    batch_list = parse_ints(batches, "--batch", 1)
    be_list = parse_backends(backends)
    what = {w.strip() for w in measure.split(",") if w.strip()}
    if not what or what - {"layer", "stack", "decode"}:
        raise SlqError(f"--measure must list layer, stack, decode; got {measure!r}")
    if layers is not None and layers < 1:
        raise SlqError(f"--layers must be >= 1, got {layers}")
    if prompt_len < 1 or new_tokens < 2 or (repeats is not None and repeats < 1):
        raise SlqError("--prompt-len must be >= 1, --new-tokens >= 2 and --repeats >= 1")
    plan_names = [p.strip() for p in (plans or "").split(",") if p.strip()] if sh is not None else []
    for p in plan_names:
        if p not in PLAN_TARGETS and not Path(p).is_file():
            raise SlqError(f"plan {p!r} is not dl, tl or an existing JSON file")
    ckpt = None
    if checkpoint is not None:
        ckpt = Path(checkpoint)
        if not ckpt.is_dir():
            raise SlqError(f"checkpoint directory {ckpt} does not exist")
        if not (ckpt / "config.json").is_file():
            raise SlqError(f"{ckpt} is not a checkpoint: config.json is missing")
    dev = _resolve_device(device)
    t0 = time.perf_counter()
    iters = iters or (20 if dev.type == "cuda" else 3)
    repeats = repeats or (3 if dev.type == "cuda" else 1)
    dtype = torch.float16
    b = Bench(device=dev, dtype=dtype, backends=be_list, batches=batch_list, group=group_size, prompt_len=prompt_len,
              new_tokens=new_tokens, iters=iters, repeats=repeats, json_out=json_out, log=log)
    if sh is not None:
        n_layers = layers or sh.layers
        settings = {"source": "synthetic", "shape": shape, "shape_params": asdict(sh), "layers": n_layers,
                    "bits": bits_list, "plans": plan_names, "backends": be_list, "measure": sorted(what)}
        b.header(settings)
        if "layer" in what:
            b.layers(sh, bits_list)
        if what & {"stack", "decode"}:
            _shape_models(b, sh, n_layers, bits_list, plan_names, what)
    else:
        settings = {"source": "checkpoint", "checkpoint": str(ckpt.resolve()), "backends": be_list,
                    "measure": sorted(what & {"stack", "decode"})}
        b.header(settings)
        _checkpoint_models(b, ckpt, what)
    b.res["elapsed_s"] = time.perf_counter() - t0
    b.save()
    return b.res


def _shape_models(b: Bench, sh: Shape, n_layers: int, bits_list, plan_names, what) -> None:
    from transformers import AutoModelForCausalLM

    dev, dt = b.device, b.dtype
    cfg = sh.config(n_layers, max_positions=max(4096, b.prompt_len + b.new_tokens))
    torch.manual_seed(0)
    with torch.device(dev):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dt).eval().requires_grad_(False)
    names = _decoder_linears(model)
    units = _units(model)
    b.model_variant(model, "fp16", "fp16", 16, 16.0, what)
    variants = []
    for bits in bits_list:
        variants.append((f"int{bits}", bits, dict.fromkeys(names, bits)))
    for p in plan_names:
        if p in PLAN_TARGETS:
            alloc, per = pattern_plan(units, PLAN_TARGETS[p], b.group)
        else:
            alloc, per = file_plan(p, units), None
        bpp = plan_bits(units, alloc, b.group)
        b.res["plans"][p] = {"target_bits_per_param": PLAN_TARGETS.get(p), "bits_per_param": bpp,
                             "per_kind": per, "allocation": alloc}
        by_mod = {m: alloc[u.name] for u in units for m in u.members}
        variants.append((p, p, by_mod))
    for label, bits, by_mod in variants:
        _quantize_random(model, names, by_mod, b.group, dev, dt, b.gen)
        bpp = _plan_bpp(model, names)
        for be in b.backends:
            left = _set_backend(model, be)
            if left:
                b.res["errors"].append(f"{label} {be}: {len(left)} layers the kernel refuses ran on reference "
                                       f"(first: {left[0]})")
            b.model_variant(model, label, be, bits, bpp, what)


def _plan_bpp(model, names) -> float:
    """bits/param over the decoder linears of the model as it is now (exact, scales included)."""
    tot = n = 0
    for name in names:
        m = model.get_submodule(name)
        bits = m.spec.bits_per_param(m.in_features) if isinstance(m, QuantLinear) else 16.0
        tot += bits * m.out_features * m.in_features
        n += m.out_features * m.in_features
    return tot / n


def _checkpoint_models(b: Bench, ckpt: Path, what) -> None:
    from .checkpoint import load

    dev, dt = b.device, b.dtype
    model = load(ckpt, device=str(dev)).to(dt)
    names = _decoder_linears(model)
    with torch.no_grad():  # the FP16 counterpart: dequantized weights, same architecture
        for name in names:
            m = model.get_submodule(name)
            if isinstance(m, QuantLinear):
                lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device=dev, dtype=dt)
                lin.weight.copy_(m.dequantized_weight().to(dt))
                if m.bias is not None:
                    lin.bias.copy_(m.bias)
                _put(model, name, lin.requires_grad_(False))
    b.model_variant(model, "fp16", "fp16", 16, 16.0, what)
    del model
    b._free()
    model = load(ckpt, device=str(dev)).to(dt)
    bpp = _plan_bpp(model, names)
    bits = sorted({m.bits for m in model.modules() if isinstance(m, QuantLinear)})
    label = "checkpoint"
    for be in b.backends:
        left = _set_backend(model, be)
        if left:
            b.res["errors"].append(f"{label} {be}: {len(left)} layers the kernel refuses ran on reference "
                                   f"(first: {left[0]})")
        b.model_variant(model, label, be, bits[0] if len(bits) == 1 else "mixed", bpp, what)


__all__ = ["SHAPES", "Shape", "run", "peak_bandwidth", "time_graph", "time_eager", "random_qlinear", "pattern_plan"]
