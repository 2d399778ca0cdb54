"""End-to-end decode through slq's engine: eager step vs compiled step, FP16 vs quantized, per batch.

For each variant (the FP16 model, then uniform ``--bits`` QuantLinears of random codes on the
backend chosen here) x batch x step mode (``eager``: the engine's Python step; ``compiled``:
``torch.compile(decode_one_token, fullgraph=True)``), one row with:

* ``ms_per_step``, ``tokens_per_s`` (batch / step time), ``prefill_ms``: median of ``--repeats``
  timed ``generate`` calls after a warm-up call (compilation, graph capture);
* ``ops_per_step``: operators one decode step dispatches (``slq.runtime.opcount``; for the compiled
  step only what the generated code leaves to the dispatcher), and ``ops_per_layer``;
* on CUDA, ``graph_nodes``: the node count of the step's CUDA graph (``slq.runtime.graphs``),
  i.e. the kernels per step;
* ``tokens_equal_eager``: the compiled variant's greedy tokens equal the eager ones.

Usage (GPU, one call): ``python bench/decode_e2e.py --device cuda --shape llama3-8b --batch 1,16``;
CPU dry path: ``python bench/decode_e2e.py --device cpu --shape tiny`` (the compiled step then uses
the ``aot_eager`` backend unless ``--compile-backend`` says otherwise: inductor's C++ build is slow
on a small CPU). The JSON (default ``bench/results/decode_e2e/run-NN.json``) holds the device,
versions, git commit and settings, and is rewritten after every row.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import next_run  # noqa: E402

from slq.runtime.bench.plans import SHAPES  # noqa: E402
from slq.runtime.bench.synthetic import decoder_linear_shapes, quantize_random, set_backend  # noqa: E402
from slq.runtime.decode import DecodeEngine  # noqa: E402
from slq.runtime.opcount import OpCounter, counting_backend  # noqa: E402
from slq.util.jsonio import write_json  # noqa: E402
from slq.util.provenance import git_commit, versions  # noqa: E402


def _device_info(dev: torch.device) -> dict:
    if dev.type == "cuda":
        p = torch.cuda.get_device_properties(dev)
        return {"type": "cuda", "name": p.name, "sms": p.multi_processor_count, "memory_gb": p.total_memory / 2**30}
    import os

    return {"type": "cpu", "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()}


def _model(shape: str, layers: int | None, dev, dtype, seed: int = 0):
    from transformers import AutoModelForCausalLM

    sh = SHAPES[shape]
    torch.manual_seed(seed)
    with torch.device(dev):
        m = AutoModelForCausalLM.from_config(sh.config(layers), dtype=dtype).eval()
    m.requires_grad_(False)
    return m


def _count(eng: DecodeEngine, compiled: bool) -> OpCounter:
    c = OpCounter()
    with torch.inference_mode():
        eng.pos.fill_(eng.S - 1)  # a valid position after generate: the last one of the cache
        kv_len = eng._window_len(eng.S - 1)
        with (c.inside_compiled() if compiled else c):
            eng._step(kv_len)
    return c


def _graph_nodes(eng: DecodeEngine) -> dict | None:
    if not eng._graphs:
        return None
    from slq.runtime.graphs import node_counts

    kv_len = max(eng._graphs)
    try:
        return {"kv_len": kv_len, **node_counts(eng._graphs[kv_len])}
    except (OSError, RuntimeError, AttributeError) as e:  # no driver library, or a graph not kept
        return {"kv_len": kv_len, "error": str(e).splitlines()[0]}


def main(argv=None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--shape", default="tiny", choices=sorted(SHAPES))
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default: the shape's)")
    ap.add_argument("--batch", default="1,16")
    ap.add_argument("--bits", default="4", help="uniform bitwidths of the quantized variants ('' for none)")
    ap.add_argument("--backend", default="auto", help="QuantLinear backend: auto (triton on CUDA, else reference)")
    ap.add_argument("--modes", default="eager,compiled")
    ap.add_argument("--compile-backend", default=None, help="torch.compile backend (default: inductor on CUDA, "
                                                               "aot_eager on CPU)")
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)

    dev = torch.device("cuda" if a.device == "auto" and torch.cuda.is_available() else
                       ("cpu" if a.device == "auto" else a.device))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but no CUDA device is available")
    dtype = torch.float16 if dev.type == "cuda" else torch.float32
    cb = a.compile_backend or ("inductor" if dev.type == "cuda" else "aot_eager")
    backend = a.backend if a.backend != "auto" else ("triton" if dev.type == "cuda" else "reference")
    batches = [int(b) for b in a.batch.split(",") if b]
    bits = [int(b) for b in a.bits.split(",") if b]
    modes = [m for m in a.modes.split(",") if m]
    out = Path(a.out) if a.out else next_run("decode_e2e")
    t_start = time.perf_counter()
    res = {
        "what": "end-to-end greedy decode through slq.runtime.decode.DecodeEngine: eager vs compiled step",
        "device": _device_info(dev), "versions": versions(), "git_commit": git_commit(),
        "settings": {"shape": a.shape, "layers": a.layers or SHAPES[a.shape].layers, "batch": batches, "bits": bits,
                     "backend": backend, "modes": modes, "compile_backend": cb, "dtype": str(dtype),
                     "prompt_len": a.prompt_len, "new_tokens": a.new_tokens, "repeats": a.repeats, "fuse": True},
        "definitions": {"ops_per_step": "operators dispatched by one decode step (TorchDispatchMode); compiled: "
                                        "only what the generated code leaves to the dispatcher",
                        "graph_nodes": "nodes of the step's CUDA graph (kernels per step), CUDA only"},
        "rows": [], "errors": [],
    }
    print(f"device {dev} ({res['device'].get('name', 'cpu')}), shape {a.shape}, compile backend {cb}", flush=True)
    model = _model(a.shape, a.layers, dev, dtype)
    names = decoder_linear_shapes(model)
    n_layers = model.config.num_hidden_layers
    gen = torch.Generator(device=dev).manual_seed(1)
    variants = [("fp16" if dtype == torch.float16 else "dense", None)] + [(f"int{b}", b) for b in bits]
    for vname, b in variants:
        if b is not None:
            quantize_random(model, names, {n: b for n in names}, 128, dev, dtype, gen)
            left = set_backend(model, backend)
            if left:
                res["errors"].append(f"{vname}: {len(left)} layers stay on reference ({backend} refused them)")
        for batch in batches:
            ids = torch.randint(3, model.config.vocab_size, (batch, a.prompt_len), device=dev, generator=gen)
            eager_tokens = None
            for mode in modes:
                t0 = time.perf_counter()
                try:
                    compiled = mode == "compiled"
                    eng = DecodeEngine(model, fuse=True, compile=counting_backend(cb) if compiled else False)
                    tokens = eng.generate(ids, a.new_tokens, eos_token_id=None)  # warm-up: compile, capture
                    warm_s = time.perf_counter() - t0
                    runs = []
                    for _ in range(a.repeats):
                        eng.generate(ids, a.new_tokens, eos_token_id=None)
                        st = eng.stats
                        runs.append((st.decode_s / max(st.decode_steps, 1) * 1e3, st.prefill_s * 1e3))
                    ms = statistics.median(r[0] for r in runs)
                    c = _count(eng, compiled)
                    row = {"variant": vname, "bits": b, "backend": backend if b else None, "batch": batch,
                           "mode": mode, "ms_per_step": ms, "tokens_per_s": batch * 1e3 / ms,
                           "prefill_ms": statistics.median(r[1] for r in runs), "warmup_s": warm_s,
                           "cuda_graph": eng.cuda_graph, "kv_block": eng.kv_block,
                           "ops_per_step": c.total, "ops_per_layer": c.total / n_layers,
                           "ops_by_namespace": c.by_namespace(), "ops": dict(c.counts.most_common()),
                           "graph_nodes": _graph_nodes(eng)}
                    if mode == "eager":
                        eager_tokens = tokens
                    elif eager_tokens is not None:
                        row["tokens_equal_eager"] = bool(torch.equal(tokens, eager_tokens))
                    res["rows"].append(row)
                    print(f"{vname:6s} b={batch:<3d} {mode:8s} {ms:8.3f} ms/step {row['tokens_per_s']:9.1f} tok/s "
                          f"ops/step {c.total:5d} graph {row['graph_nodes']}", flush=True)
                except Exception as e:  # noqa: BLE001 - one failing variant must not lose the others' rows
                    res["errors"].append(f"{vname} batch {batch} {mode}: {type(e).__name__}: {str(e).splitlines()[0]}")
                    print("ERROR", res["errors"][-1], flush=True)
                res["elapsed_s"] = time.perf_counter() - t_start
                write_json(out, res)
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
    res["elapsed_s"] = time.perf_counter() - t_start
    write_json(out, res)
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
