"""Speculative decoding (slq.runtime.speculative): measured acceptance and speed, and the cost model's prediction.

Two modes.

``--device cpu`` (default; real models): the target (default stories260K from ../shared) and a draft
(``--draft CKPT``, an slq checkpoint; default: an RTN ``--draft-bits`` copy of the target made here).
Per prompt and per ``--k`` (integers and/or ``auto``), greedy and sampled (``--temperature``), one row
with the acceptance rate, mean accepted length, tokens per target forward, tok/s of speculative
decoding, and the cost model's prediction from the measured acceptance ``a``, ``t_draft`` (one draft
step) and ``t_verify(k+1)`` (one target forward of k + 1 tokens):
``tok/s = (1 - a^(k+1)) / (1 - a) / (k t_draft + t_verify(k+1))``. The target alone and the draft
alone are timed through the same engine (greedy decode steps; tok/s excludes the prefill).

``--device cuda --shape llama3-8b`` (random weights, FP16): ``t_verify(T)`` of the FP16 target for
T = 1 .. k_max + 1 (T = 1 is a plain decode step), ``t_draft`` of the DL and TL mixes
(slq.runtime.bench.plans pattern plans: K/V high, MLP low, ~5.5 and ~3.5 bits/param; random codes on
``--backend``), each step a CUDA-graph replay; then, per mix and per acceptance rate in
``--acceptance``, the best k and the speedup over the FP16 engine that the cost model predicts.

The JSON (default ``bench/results/speculative/run-NN.json``) holds the device, versions, git commit
and settings.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import next_run  # noqa: E402

from slq.runtime import speculative as sp  # noqa: E402
from slq.runtime.bench.plans import PLAN_TARGETS, SHAPES, pattern_plan, plan_bits, units_of  # noqa: E402
from slq.runtime.bench.synthetic import decoder_linear_shapes, quantize_random, set_backend  # noqa: E402
from slq.runtime.decode import DecodeEngine  # noqa: E402
from slq.util.jsonio import write_json  # noqa: E402
from slq.util.provenance import git_commit, versions  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SLQ_SHARED", REPO.parent / "shared"))
PROMPTS = ["Once upon a time", "The little dog", "Lily went to the park", "Tom had a red ball"]


def _device_info(dev: torch.device) -> dict:
    if dev.type == "cuda":
        p = torch.cuda.get_device_properties(dev)
        return {"type": "cuda", "name": p.name, "sms": p.multi_processor_count, "memory_gb": p.total_memory / 2**30}
    return {"type": "cpu", "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()}


def _sync(dev) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _timed(fn, dev, n: int) -> float:
    """Median seconds of ``fn()`` over n calls, after 2 warm-up calls (graph capture, caches)."""
    for _ in range(2):
        fn()
    ts = []
    for _ in range(n):
        _sync(dev)
        t0 = time.perf_counter()
        fn()
        _sync(dev)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


@torch.inference_mode()
def step_costs(eng: DecodeEngine, prompt_len: int, Ts, n: int) -> tuple[float, dict]:
    """(t_step, {T: t_verify(T)}) of ``eng`` at position ``prompt_len``: one decode step, and one forward of
    T tokens; the cache is rolled back to the same position before every call."""
    dev = eng.device
    eng.allocate(1, prompt_len + max(Ts) + 2)
    ids = torch.randint(3, eng.lm_head.out_features, (1, prompt_len), device=dev)
    eng.prefill(ids)

    def one():
        eng.set_position(prompt_len)
        eng.step(prompt_len)

    t_step = _timed(one, dev, n)
    tv = {}
    for T in Ts:
        def many(T=T):
            eng.set_position(prompt_len)
            eng.forward_tokens(T, prompt_len)
        tv[T] = _timed(many, dev, n)
    return t_step, tv


def _best(a: float, t_draft: float, tv: dict, t_target: float) -> dict:
    """The best k in tv's range at acceptance a, and its predicted speedup over the target alone."""
    k_max = max(tv) - 1
    k = sp.choose_k(a, t_draft, lambda T: tv[T], k_max)
    pr = sp.predict(a, k, t_draft, tv[k + 1])
    pr["speedup_over_target"] = pr["tokens_per_s"] * t_target
    return pr


# ----------------------------------------------------------------------------- CPU: real models


def _draft_model(a, target_dir: Path, tmp: Path):
    import slq

    if a.draft:
        return slq.load(a.draft), f"{a.draft}"
    out = tmp / f"rtn{a.draft_bits}"
    slq.quantize(str(target_dir), method="rtn", bits=a.draft_bits, out=out, progress=False)
    return slq.load(out), f"RTN {a.draft_bits}-bit copy of the target (slq.quantize method=rtn)"


def run_cpu(a, res: dict, out: Path) -> None:
    from slq.models.sources import load_model

    target_dir = Path(a.target) if a.target else SHARED / "models" / "stories260K"
    target, tok = load_model(target_dir)
    with tempfile.TemporaryDirectory() as tmp:  # the draft's files stay while it runs (weights may be mapped)
        draft, what = _draft_model(a, target_dir, Path(tmp))
        _run_cpu(a, res, out, target, draft, what, tok, target_dir)


def _run_cpu(a, res, out, target, draft, what, tok, target_dir) -> None:
    res["settings"].update(target=str(target_dir), draft=what)
    ks = [x if x == "auto" else int(x) for x in a.k.split(",")]
    k_max = max([k for k in ks if k != "auto"] + [a.k_max])
    tgt, dft = DecodeEngine(target), DecodeEngine(draft)
    P = len(tok(PROMPTS[0]).input_ids)
    t_target, tv = step_costs(tgt, P, range(1, k_max + 2), a.repeats * 5)
    t_draft, _ = step_costs(dft, P, [1], a.repeats * 5)
    res["step_costs"] = {"t_target_step_s": t_target, "t_draft_step_s": t_draft,
                         "t_verify_s": {str(T): t for T, t in tv.items()}}
    print(f"t_target {t_target * 1e3:.3f} ms  t_draft {t_draft * 1e3:.3f} ms  t_verify "
          + " ".join(f"{T}:{t * 1e3:.2f}" for T, t in tv.items()), flush=True)

    alone = {}
    for name, eng in (("target", tgt), ("draft", dft)):
        rates = []
        for p in PROMPTS[: a.prompts]:
            ids = tok(p, return_tensors="pt").input_ids
            for _ in range(a.repeats):
                eng.generate(ids, a.new_tokens, eos_token_id=None)
                rates.append(eng.stats.tokens_per_s)
        alone[name] = statistics.median(rates)
    res["alone_tokens_per_s"] = alone
    print(f"alone: target {alone['target']:.1f} tok/s, draft {alone['draft']:.1f} tok/s", flush=True)

    for temperature in a.temperature:
        for k in ks:
            reps = []
            for i, p in enumerate(PROMPTS[: a.prompts]):
                ids = tok(p, return_tensors="pt").input_ids
                for r in range(a.repeats):
                    _, rep = sp.generate(tgt, dft, ids, k=k, k_max=a.k_max, temperature=temperature, seed=100 * i + r,
                                         max_new_tokens=a.new_tokens, eos_token_id=None)
                    reps.append(rep)
            acc = sum(r.accepted for r in reps) / sum(r.tests for r in reps)
            k_used = statistics.median(k2 for r in reps for k2 in r.ks)
            kk = int(round(k_used))
            pred = sp.predict(acc, kk, t_draft, tv[kk + 1])
            row = {"k": k, "k_used_median": k_used, "temperature": temperature, "runs": len(reps),
                   "acceptance_rate": acc,
                   "mean_accepted_length": sum(r.accepted for r in reps) / sum(r.row_rounds for r in reps),
                   "tokens_per_target_forward": statistics.mean(r.tokens_per_target_forward for r in reps),
                   "tokens_per_s": statistics.median(r.tokens_per_s for r in reps),
                   "draft_s": sum(r.draft_s for r in reps), "verify_s": sum(r.verify_s for r in reps),
                   "accept_s": sum(r.accept_s for r in reps),
                   "predicted_tokens_per_s": pred["tokens_per_s"],
                   "predicted_tokens_per_round": pred["tokens_per_round"]}
            row["speedup_over_target"] = row["tokens_per_s"] / alone["target"]
            res["rows"].append(row)
            print(f"T={temperature:<4} k={str(k):4s} a={acc:.3f} len={row['mean_accepted_length']:.2f} "
                  f"tok/fwd={row['tokens_per_target_forward']:.2f} {row['tokens_per_s']:8.1f} tok/s "
                  f"(model {pred['tokens_per_s']:8.1f}) x{row['speedup_over_target']:.2f}", flush=True)
            write_json(out, res)


# ----------------------------------------------------------------------------- GPU: the Llama-3-8B shape


def run_shape(a, res: dict, out: Path, dev: torch.device) -> None:
    from transformers import AutoModelForCausalLM

    sh = SHAPES[a.shape]
    dtype = torch.float16 if dev.type == "cuda" else torch.float32
    backend = a.backend if a.backend != "auto" else ("triton" if dev.type == "cuda" else "reference")
    res["settings"].update(shape=a.shape, layers=a.layers or sh.layers, dtype=str(dtype), backend=backend)
    torch.manual_seed(0)
    with torch.device(dev):
        model = AutoModelForCausalLM.from_config(sh.config(a.layers), dtype=dtype).eval().requires_grad_(False)
    Ts = list(range(1, a.k_max + 2))
    n = a.repeats * 10
    eng = DecodeEngine(model, fuse=True)
    t_target, tv = step_costs(eng, a.prompt_len, Ts, n)
    del eng
    res["target"] = {"variant": "fp16" if dtype == torch.float16 else "dense", "t_step_s": t_target,
                     "t_verify_s": {str(T): t for T, t in tv.items()}}
    print(f"target: step {t_target * 1e3:.3f} ms, verify " + " ".join(f"{T}:{t * 1e3:.2f}" for T, t in tv.items()),
          flush=True)
    write_json(out, res)
    names = decoder_linear_shapes(model)
    units = units_of(model)
    gen = torch.Generator(device=dev).manual_seed(1)
    for mix in ("dl", "tl"):
        alloc, per = pattern_plan(units, PLAN_TARGETS[mix], 128)
        by_mod = {m: alloc[u.name] for u in units for m in u.members}
        quantize_random(model, names, by_mod, 128, dev, dtype, gen)
        left = set_backend(model, backend)
        eng = DecodeEngine(model, fuse=True)
        t_draft, _ = step_costs(eng, a.prompt_len, [1], n)
        del eng
        d = {"mix": mix, "per_kind_bits": per, "bits_per_param": plan_bits(units, alloc, 128), "t_draft_s": t_draft,
             "layers_on_reference": len(left), "predicted": {}}
        for acc in a.acceptance:
            d["predicted"][str(acc)] = _best(acc, t_draft, tv, t_target)
        res["drafts"].append(d)
        print(f"{mix}: {d['bits_per_param']:.2f} bits/param, t_draft {t_draft * 1e3:.3f} ms; predicted speedup "
              + ", ".join(f"a={x}: x{p['speedup_over_target']:.2f} (k={p['k']})" for x, p in d["predicted"].items()),
              flush=True)
        write_json(out, res)
        if dev.type == "cuda":
            torch.cuda.empty_cache()


def main(argv=None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--shape", default=None, choices=sorted(SHAPES), help="random-weight shape mode (step costs only)")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers of --shape (default: the shape's)")
    ap.add_argument("--backend", default="auto", help="QuantLinear backend of the draft mixes (auto: triton on CUDA)")
    ap.add_argument("--acceptance", default="0.8,0.9,0.95,0.99", help="acceptance rates of the --shape predictions")
    ap.add_argument("--prompt-len", type=int, default=128, help="--shape mode: cache position of the timed steps")
    ap.add_argument("--target", default=None, help="target model directory (default: stories260K)")
    ap.add_argument("--draft", default=None, help="slq checkpoint of the draft (default: an RTN copy made here)")
    ap.add_argument("--draft-bits", type=int, default=4)
    ap.add_argument("--k", default="1,2,4,8,auto")
    ap.add_argument("--k-max", type=int, default=8)
    ap.add_argument("--temperature", default="0,1")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    a.acceptance = [float(x) for x in a.acceptance.split(",") if x]
    a.temperature = [float(x) for x in a.temperature.split(",") if x]
    dev = torch.device(a.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but no CUDA device is available")
    if dev.type == "cpu":
        torch.set_num_threads(1)
    out = Path(a.out) if a.out else next_run("speculative")
    res = {"what": "speculative decoding: draft proposes k, target verifies k+1 in one forward (exact sampling)",
           "device": _device_info(dev), "versions": versions(), "git_commit": git_commit(REPO),
           "settings": {k: v for k, v in vars(a).items() if k != "out"},
           "cost_model": "tokens/round = (1 - a^(k+1)) / (1 - a); s/round = k t_draft + t_verify(k+1)",
           "rows": [], "drafts": []}
    t0 = time.perf_counter()
    if a.shape:
        run_shape(a, res, out, dev)
    else:
        run_cpu(a, res, out)
    res["elapsed_s"] = time.perf_counter() - t0
    write_json(out, res)
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
