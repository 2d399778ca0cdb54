"""Would Fisher-weighted GPTQ Hessians help? A side-by-side experiment on SmolLM2 (CPU), not a library feature.

GPTQ minimizes ||dW X||^2, which counts every calibration token alike. The error a token's output makes
downstream is better measured by the Fisher information of the model's next-token distributions: for a
linear with output y_t at token t, KL(p || q) ~ 1/2 E[(sum_t g_t . dy_t)^2] with g_t the gradient of
log p(sampled labels) with respect to y_t. Dropping the cross terms between tokens and between output rows
of one block gives a token-weighted Hessian per block of rows,

    H_b = sum_t (sum_{i in b} g_ti^2) x_t x_t^T,

with one block per attention head for q/k/v (like the attention-aware key/value Hessians of slq.calib)
and one block for o, gate, up and down. One backward pass per calibration window (labels sampled from the
reference itself) gives all of them. Each weighted Hessian is rescaled to the plain one's trace, so the
damping means the same.

Arms, all uniform g64 asym, GPTQ act-order, non-sequential Hessians from the same C4 windows, KL on the
first WikiText-2 test windows (the setting of bench/experiments/act_order.py):
  plain        X^T X everywhere
  fisher       the Fisher-weighted Hessians everywhere
  library      slq's default (attention-aware keys/values, X^T X elsewhere)
  hybrid       library for keys/values, fisher for every other linear
  kv_fisher    library, with keys/values from the fisher Hessians instead

    python bench/experiments/fisher_hessians.py            # about 20 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import copy
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/, for _smol
from _smol import REPO, measure, setup  # noqa: E402
KV = ("k_proj", "v_proj")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bits", default="8")
    ap.add_argument("--calib", type=int, default=16)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--out", default=str(REPO / "bench/results/fisher_hessians.json"))
    args = ap.parse_args()

    from slq.util.provenance import git_commit, versions
    from slq.quant.gptq import factor, gptq_quantize
    from slq.quant.pipeline import quantize_model
    from slq.util.jsonio import write_json
    from slq.quant.spec import QuantSpec

    ref, _, calib, wiki, cache = setup(args.calib, args.windows)
    head_dim = ref.config.hidden_size // ref.config.num_attention_heads
    lins = {n: m for n, m in ref.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n}

    def n_blocks(name, m):
        return m.out_features // head_dim if name.endswith(("q_proj", "k_proj", "v_proj")) else 1

    t0 = time.perf_counter()
    Hp = {n: torch.zeros(m.in_features, m.in_features, dtype=torch.float64) for n, m in lins.items()}
    Hf = {n: torch.zeros(n_blocks(n, m), m.in_features, m.in_features, dtype=torch.float64) for n, m in lins.items()}
    X, G = {}, {}

    def grab_in(name):
        def f(_m, a):
            X[name] = a[0].detach()[0]
        return f

    def grab_grad(name):
        def f(_m, _a, out):
            out.register_hook(lambda g: G.__setitem__(name, g.detach()[0]))
        return f

    hooks = [m.register_forward_pre_hook(grab_in(n)) for n, m in lins.items()]
    hooks += [m.register_forward_hook(grab_grad(n)) for n, m in lins.items()]
    was = [p.requires_grad for p in ref.parameters()]
    for p in ref.parameters():
        p.requires_grad_(False)
    gen = torch.Generator().manual_seed(0)
    try:
        for w in range(args.calib):
            emb = ref.get_input_embeddings()(calib[w : w + 1, :-1]).detach().requires_grad_(True)
            logp = torch.log_softmax(ref(inputs_embeds=emb).logits.float()[0], -1)
            y = torch.multinomial(logp.detach().exp(), 1, generator=gen)[:, 0]
            logp.gather(-1, y[:, None]).sum().backward()
            for n in lins:
                x, g = X[n].double(), G[n].double()
                Hp[n] += x.T @ x
                wt = g.reshape(g.shape[0], Hf[n].shape[0], -1).square().sum(-1)
                for b in range(Hf[n].shape[0]):
                    Hf[n][b] += (x * wt[:, b : b + 1]).T @ x
            print(f"calibration window {w + 1}/{args.calib}", flush=True)
    finally:
        for h in hooks:
            h.remove()
        for p, r in zip(ref.parameters(), was):
            p.requires_grad_(r)
    for n in Hf:
        for b in range(Hf[n].shape[0]):
            Hf[n][b] *= Hp[n].trace() / Hf[n][b].trace()
    hessian_s = time.perf_counter() - t0

    def quantized(name, W, spec, which):
        if which == "plain":
            return gptq_quantize(W, factor(Hp[name]), spec, act_order=True).dequantize()
        nb = Hf[name].shape[0]
        r = W.shape[0] // nb
        return torch.cat([gptq_quantize(W[b * r : (b + 1) * r], factor(Hf[name][b]), spec, act_order=True).dequantize()
                          for b in range(nb)])


    rows = []
    for bits in (int(b) for b in args.bits.split(",")):
        spec = QuantSpec(bits, 64, False)
        lib = copy.deepcopy(ref)
        quantize_model(lib, spec, method="gptq", windows=calib, sequential=False, act_order=True, progress=False)
        arms = {"plain": lambda n: "plain", "fisher": lambda n: "fisher", "library": lambda n: None,
                "hybrid": lambda n: None if n.endswith(KV) else "fisher",
                "kv_fisher": lambda n: "fisher" if n.endswith(KV) else None}
        for arm, pick in arms.items():
            cand = copy.deepcopy(lib)
            for n, m in cand.named_modules():
                if n in lins and pick(n) is not None:
                    m.weight.data.copy_(quantized(n, lins[n].weight.data.float(), spec, pick(n)))
            rows.append({"bits": bits, "arm": arm, **measure(cache, cand, wiki)})
            print(f"{bits}-bit {arm}: KL {rows[-1]['kl']:.4e} EAR {rows[-1]['ear']:.5f}", flush=True)
            del cand
    base = {r["bits"]: r["kl"] for r in rows if r["arm"] == "library"}
    for r in rows:
        r["kl_over_library"] = r["kl"] / base[r["bits"]]
    write_json(args.out, {
        "benchmark": "fisher_hessians", "model": "SmolLM2-135M-Instruct (embedded, fp32)",
        "device": f"cpu: {platform.machine()}, {torch.get_num_threads()} threads",
        "versions": versions(), "git_commit": git_commit(REPO),
        "settings": {**vars(args), "group_size": 64, "symmetric": False, "sequential": False, "act_order": True,
                     "calib_source": "c4.utf8", "data": "wiki.test.raw first windows x 512",
                     "fisher": "one sampled label per position, one backward pass per window"},
        "hessian_s": hessian_s, "rows": rows})


if __name__ == "__main__":
    main()
