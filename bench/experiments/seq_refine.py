"""Does quantizing a chosen mixed allocation again, in sequence, lower its KL? SmolLM2 (CPU). An experiment.

The bank quantizes every unit from the reference model's own activations (non-sequential), since it holds every
bitwidth. Once an allocation is chosen, the model can be quantized again with that allocation only, and then
each linear can see what the quantized model feeds it. Three ways, same allocation, same calibration windows,
act-order GPTQ at g64 asym:

- ``nonseq``: as the bank (the library's ``sequential=False``).
- ``seq``: the library's ``sequential=True``: each decoder layer's Hessians come from the quantized layers
  before it.
- ``seq_target``: in-layer order too (q/k/v, then o, then gate/up, then down), each stage's Hessian
  H~ = X~^T X~ from the inputs X~ of the partly quantized model, and the stage's *target* corrected towards what
  the reference computes: GPTQ minimises |W X - Q X~|^2 = |(W' - Q) X~|^2 + const with
  W' = W + W (X^T X~ - H~) (H~ + damp I)^-1 (X: the reference's inputs). Keys and values keep their
  attention-aware Hessians (from X~) and the plain target.

    python bench/experiments/seq_refine.py --alloc bench/results/search_smollm2/run-13.json
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/, for _smol
from _smol import REPO, measure, save, setup  # noqa: E402

STAGES = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
          ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))


@torch.no_grad()
def seq_target(ref, specs, calib, act_order, damp=0.01, correct=True):
    """A copy of ``ref`` quantized stage by stage, as the module docstring says."""
    from slq.quant.calib import capture_layer0_inputs, collect_hessians, decoder_layers, eager_attention, layer_linears
    from slq.quant.calib import run_layer
    from slq.quant.gptq import RowBlockHessians, factor, gptq_quantize, join_rows
    from slq.quant.grid import QuantizedWeight

    qm = copy.deepcopy(ref)
    with eager_attention(ref), eager_attention(qm):
        fb = capture_layer0_inputs(ref, calib, 8, "cpu")
        qb = [copy.copy(b) for b in fb]
        prefix = next(n for n, m in ref.named_modules() if m is decoder_layers(ref))
        for i, (fl, ql) in enumerate(zip(decoder_layers(ref), decoder_layers(qm))):
            flin, qlin = layer_linears(fl), layer_linears(ql)
            for stage in STAGES:
                names = [r for r in stage if specs.get(f"{prefix}.{i}.{r}") is not None]
                if not names:
                    continue
                K = flin[names[0]].in_features
                C = torch.zeros(K, K, dtype=torch.float64)
                Ht = torch.zeros(K, K, dtype=torch.float64)
                got = {}
                hf = flin[names[0]].register_forward_pre_hook(lambda _m, a: got.__setitem__("x", a[0]))
                hq = qlin[names[0]].register_forward_pre_hook(lambda _m, a: got.__setitem__("xt", a[0]))
                try:
                    for b, bt in zip(fb, qb):
                        fl(b.hidden, **b.kwargs)
                        ql(bt.hidden, **bt.kwargs)
                        x = got["x"].reshape(-1, K).double()
                        xt = got["xt"].reshape(-1, K).double()
                        C += x.T @ xt
                        Ht += xt.T @ xt
                finally:
                    hf.remove()
                    hq.remove()
                hess = collect_hessians(ql, qb, names, attention=True)
                Hd = Ht + damp * Ht.diag().mean() * torch.eye(K, dtype=torch.float64)
                corr = torch.linalg.solve(Hd, (C - Ht).T).T  # (C - H~) Hd^-1 (Hd symmetric)
                for r in names:
                    spec = specs[f"{prefix}.{i}.{r}"]
                    W = qlin[r].weight.data.double()
                    h = hess[r]
                    if isinstance(h, RowBlockHessians):
                        pieces = []
                        for g, acc in enumerate(h.blocks):
                            Wg = W[g * h.rows:(g + 1) * h.rows].float()
                            pieces.append((g * h.rows, gptq_quantize(Wg, factor(acc.H, damp), spec,
                                                                     act_order=act_order)))
                        q = join_rows(pieces)
                    else:
                        Wt = W + W @ corr if correct else W
                        q = gptq_quantize(Wt.float(), factor(h.H, damp), spec, act_order=act_order)
                    q = QuantizedWeight(q.codes.cpu(), q.scale.cpu(), q.zero.cpu(), q.spec)
                    qlin[r].weight.data.copy_(q.dequantize())
            if i + 1 < len(decoder_layers(ref)):
                fb, qb = run_layer(fl, fb), run_layer(ql, qb)
    return qm


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--alloc", default=str(REPO / "bench/results/search_smollm2/run-13.json"))
    ap.add_argument("--round", type=int, default=1, help="which DL round's allocation (1-based)")
    ap.add_argument("--calib", type=int, default=32)
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--variants", default="nonseq,seq,seq_plain,seq_target")
    ap.add_argument("--out", default=str(REPO / "bench/results/seq_refine.json"))
    args = ap.parse_args()

    from slq.quant.pipeline import quantize_model
    from slq.quant.spec import QuantSpec

    src = json.load(open(args.alloc))
    rnd = src["stages"]["dl"]["rounds"][args.round - 1]
    alloc = rnd["allocation"]
    specs = {n: (QuantSpec(b, 64, False) if b < 16 else None) for n, b in alloc.items()}
    ref, _, calib, wiki, cache = setup(args.calib, args.windows)
    rows = []
    for v in args.variants.split(","):
        t = time.perf_counter()
        if v in ("nonseq", "seq"):
            m = copy.deepcopy(ref)
            quantize_model(m, specs=specs, windows=calib, sequential=v == "seq", act_order=True, progress=False)
        else:
            m = seq_target(ref, specs, calib, act_order=True, correct=v == "seq_target")
        rows.append({"variant": v, **measure(cache, m, wiki), "quantize_s": time.perf_counter() - t})
        print(f"{v}: KL {rows[-1]['kl']:.4e} EAR {rows[-1]['ear']:.5f} ({rows[-1]['quantize_s']:.0f} s)", flush=True)
    save(args.out, "seq_refine", {**vars(args), "group_size": 64, "symmetric": False, "act_order": True,
                                  "allocation_bits_per_param": rnd["bits_per_param"], "calib_source": "c4.utf8",
                                  "data": "wiki.test.raw first windows x 512"}, rows)


if __name__ == "__main__":
    main()
