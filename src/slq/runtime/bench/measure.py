"""The three measurements of ``slq bench``: one layer, the stack of a model's linears, and end-to-end decode.

``layer``: one linear of each fused kind at each bitwidth and batch M, timed over R distinct weight
copies with R x bytes >= 2 x the last-level cache, so every call streams its weights; time / R.
``stack``: every linear the decode engine runs (its fused projections), in one timed call.
``decode``: greedy decode through :class:`~slq.runtime.decode.DecodeEngine`; tokens/s = batch x
decode steps / decode time, prefill apart. A measurement that fails is recorded as an error line.
"""

from __future__ import annotations

import gc
import math
import statistics

import torch
import torch.nn.functional as F

from ...quant.grid import QuantizedWeight
from ..decode import DecodeEngine
from ..qlinear import QuantLinear
from .options import backend_status
from .plans import Shape
from .recorder import Recorder
from .synthetic import bpp, random_qlinear, weight_bytes
from .timing import time_fn


class Bench(Recorder):
    def __init__(self, *, device: torch.device, dtype: torch.dtype, backends: list[str], batches: list[int],
                 group: int | None, prompt_len: int, new_tokens: int, iters: int, repeats: int, json_out, log):
        super().__init__(device=device, dtype=dtype, json_out=json_out, log=log)
        self.backends, self.skipped = backend_status(backends, device)
        self.batches, self.group = batches, group
        self.prompt_len, self.new_tokens, self.iters, self.repeats = prompt_len, new_tokens, iters, repeats
        self.gen = torch.Generator(device=device).manual_seed(0)

    def header(self, settings: dict) -> None:
        self.start({**settings, "dtype": str(self.dtype).replace("torch.", ""), "backends_run": self.backends,
                    "batches": self.batches, "group_size": self.group, "prompt_len": self.prompt_len,
                    "new_tokens": self.new_tokens, "iters": self.iters, "repeats": self.repeats}, self.skipped)

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
                qb = n * k * bpp(b, k, self.group) / 8
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
                                 bits_per_param=bpp(b, k, self.group), M=m, ms=ms, us=ms * 1e3, bytes=qb, reps=r,
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
