"""Is GPTQ's result a local optimum at 8 bits? Coordinate descent on its codes, SmolLM2 (CPU). An experiment.

After act-order GPTQ (uniform g64 asym, the library's Hessians, non-sequential, 16 C4 windows), every linear
except the keys/values (whose Hessians are attention-aware, one per head) gets ``--sweeps`` passes of greedy
coordinate descent on GPTQ's own objective tr(dW H dW^T), H = X^T X with GPTQ's damping, over the codes with
the grid (scales, zeros) fixed: column by column, each row's code becomes the grid point nearest to the best
real value given every other column. KL on the first WikiText-2 test windows, as in bench/experiments/act_order.py.

    python bench/experiments/cd_refine.py        # about 10 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/, for _smol
from _smol import REPO, measure, save, setup  # noqa: E402


def refine(W, q, H, bits, G, sweeps, damp=0.01):
    """(refined dequantized weight, objective before, objective after) for weight W and its GPTQ result q."""
    K = W.shape[1]
    Hd = H.double() + damp * H.double().diag().mean() * torch.eye(K, dtype=torch.float64)
    sc = q.scale.double().repeat_interleave(G, dim=1)
    zc = q.zero.double().repeat_interleave(G, dim=1)
    Wq = (q.codes.double() - zc) * sc
    R = (Wq - W.double()) @ Hd
    before = float((R * (Wq - W.double())).sum())
    for _ in range(sweeps):
        for j in range(K):
            target = Wq[:, j] - R[:, j] / Hd[j, j]
            c = torch.clamp(torch.round(target / sc[:, j]) + zc[:, j], 0, 2**bits - 1)
            step = (c - zc[:, j]) * sc[:, j] - Wq[:, j]
            if bool((step != 0).any()):
                R += step[:, None] * Hd[j][None, :]
                Wq[:, j] += step
    D = Wq - W.double()
    return Wq.float(), before, float(((D @ Hd) * D).sum())


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bits", type=int, default=8)
    ap.add_argument("--sweeps", default="1,2")
    ap.add_argument("--calib", type=int, default=16)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--out", default=str(REPO / "bench/results/cd_refine.json"))
    args = ap.parse_args()

    from slq.quant.pipeline import quantize_model
    from slq.quant.spec import QuantSpec

    ref, _, calib, wiki, cache = setup(args.calib, args.windows)
    lins = {n: m for n, m in ref.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n
            and not n.endswith(("k_proj", "v_proj"))}
    H = {n: torch.zeros(m.in_features, m.in_features, dtype=torch.float64) for n, m in lins.items()}

    def grab(name):
        def f(_m, a):
            x = a[0].detach().reshape(-1, a[0].shape[-1]).double()
            H[name] += x.T @ x
        return f

    hooks = [m.register_forward_pre_hook(grab(n)) for n, m in lins.items()]
    with torch.no_grad():
        for w in range(args.calib):
            ref(input_ids=calib[w : w + 1])
    for h in hooks:
        h.remove()
    G = 64
    spec = QuantSpec(args.bits, G, False)
    lib = copy.deepcopy(ref)
    res = quantize_model(lib, spec, method="gptq", windows=calib, sequential=False, act_order=True, progress=False)


    rows = [{"sweeps": 0, **measure(cache, lib, wiki), "objective_ratio": 1.0, "refine_s": 0.0}]
    print(f"GPTQ act-order: KL {rows[0]['kl']:.4e} EAR {rows[0]['ear']:.5f}", flush=True)
    for sweeps in (int(x) for x in args.sweeps.split(",")):
        cand = copy.deepcopy(lib)
        t = time.perf_counter()
        before = after = 0.0
        for n, m in cand.named_modules():
            if n in lins:
                Wq, b0, b1 = refine(lins[n].weight.data.float(), res.qweights[n], H[n], args.bits, G, sweeps)
                m.weight.data.copy_(Wq)
                before, after = before + b0, after + b1
        rows.append({"sweeps": sweeps, **measure(cache, cand, wiki), "objective_ratio": after / before,
                     "refine_s": time.perf_counter() - t})
        print(f"{sweeps} sweep(s): objective {after / before:.4f}x, KL {rows[-1]['kl']:.4e} EAR {rows[-1]['ear']:.5f}",
              flush=True)
    save(args.out, "cd_refine", {**vars(args), "group_size": G, "symmetric": False, "sequential": False,
                                 "act_order": True, "refined": "all decoder linears but k_proj / v_proj",
                                 "calib_source": "c4.utf8", "data": "wiki.test.raw first windows x 512"}, rows)


if __name__ == "__main__":
    main()
