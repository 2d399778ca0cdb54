"""(bits, group size) choices per unit: the exact solvers over them, pruning, the bits accounting and the
mixed-group checkpoint read back by plain transformers, by ``slq.load`` and by every CPU backend."""

from __future__ import annotations

import itertools
import json
import math
import shutil

import numpy as np
import pytest
import torch

from slq.quant.units import KEEP, Choice, Unit, choice_storage_bits, unit_choices
from slq.search.allocate import (dp_minimize_bits, dp_minimize_loss, minimize_bits, minimize_loss,
                                 prune_dominated)
from slq.util.errors import SlqError

from conftest import TINY_TEXT, need

GROUPS = (128, 64, 32)


# ------------------------------------------------------------------ choices


def test_choices_resolve_per_unit_and_are_distinct():
    """G = 128 on K = 576 resolves to 64, so it is one choice, not two; K = 172 has only per-channel."""
    smol = Unit("u", 0, "attn.qkv", ("a",), 576 * 576, 576)
    got = unit_choices(smol, (7, 8, 16), GROUPS)
    assert [c.label for c in got] == ["7g64", "7g32", "8g64", "8g32", "16"]
    stories_down = Unit("d", 0, "mlp.down", ("d",), 64 * 172, 172)
    assert [c.label for c in unit_choices(stories_down, (4, 8), GROUPS)] == ["4ch", "8ch"]
    assert [c.label for c in unit_choices(smol, (4,), (None, 128, 32))] == ["4ch", "4g64", "4g32"]
    for c in got:
        assert Choice.parse(c.label) == c
    with pytest.raises(SlqError, match="not a choice label"):
        Choice.parse("8")  # a bare bitwidth has no group size


@pytest.mark.parametrize("sym", [False, True])
def test_storage_bits_count_scales_and_zeros_per_group(sym):
    """Independent count: N*K codes of `bits`, one fp16 scale (and a `bits` zero when asymmetric) per group."""
    u = Unit("u", 0, "mlp.down", ("d",), 96 * 256, 256)
    for c in unit_choices(u, range(2, 9), (None, 256, 128, 64, 32, 16)):
        groups = 96 * (256 // (c.group or 256))
        assert choice_storage_bits(u, c, sym) == 96 * 256 * c.bits + groups * (16 + (0 if sym else c.bits))
    assert choice_storage_bits(u, KEEP, sym) == 16 * 96 * 256


# ------------------------------------------------------------------ exact solvers


def _instance(rng, n_units: int, bits=(2, 3, 4, 8), groups=GROUPS, keep=True):
    """Units of assorted K; per choice a cost that falls ~4x per bit and with finer groups (noisy), exact sizes."""
    units, costs, sizes = [], [], []
    for i in range(n_units):
        K = int(rng.choice([128, 192, 256, 172]))
        u = Unit(f"u{i}", i, "attn.o", (f"m{i}",), 32 * K, K)
        cs = unit_choices(u, bits + ((16,) if keep else ()), groups)
        a = rng.lognormal(0, 1)
        costs.append([0.0 if c.keep else a * 4.0 ** -c.bits * ((c.group or K) / 128) ** 0.5 * rng.uniform(0.6, 1.4)
                      for c in cs])
        sizes.append([choice_storage_bits(u, c, False) for c in cs])
        units.append((u, cs))
    return units, costs, sizes


def _brute(costs, sizes, *, budget=None, max_loss=None):
    best = None
    for ch in itertools.product(*map(range, map(len, costs))):
        c = math.fsum(costs[i][j] for i, j in enumerate(ch))
        s = sum(sizes[i][j] for i, j in enumerate(ch))
        if budget is not None and s <= budget:
            key = (c, s)
        elif max_loss is not None and c <= max_loss + 1e-12:
            key = (s, c)
        else:
            continue
        best = key if best is None or key < best else best
    return best


def test_ilp_dp_and_brute_force_agree_over_bits_and_group_choices():
    rng = np.random.default_rng(7)
    for _ in range(25):
        units, costs, sizes = _instance(rng, int(rng.integers(1, 4)))
        lo, hi = sum(map(min, sizes)), sum(map(max, sizes))
        budget = int(rng.integers(lo, hi + 1))
        want = _brute(costs, sizes, budget=budget)
        for a in (minimize_loss(costs, sizes, budget), dp_minimize_loss(costs, sizes, budget)):
            assert a.total_size <= budget
            assert a.total_cost == pytest.approx(want[0], abs=1e-12) and a.total_size == want[1]
        max_loss = float(rng.uniform(sum(map(min, costs)), sum(map(max, costs))))
        want = _brute(costs, sizes, max_loss=max_loss)
        for a in (minimize_bits(costs, sizes, max_loss), dp_minimize_bits(costs, sizes, max_loss)):
            assert a.total_cost <= max_loss + 1e-12
            assert a.total_size == want[0] and a.total_cost == pytest.approx(want[1], abs=1e-12)


def test_ilp_and_dp_agree_on_larger_group_instances():
    rng = np.random.default_rng(8)
    for _ in range(8):
        _, costs, sizes = _instance(rng, 24, bits=(2, 3, 4, 5, 6, 7, 8))
        budget = int(np.mean([sum(map(min, sizes)), sum(map(max, sizes))]) * 0.45)
        ilp, dp = minimize_loss(costs, sizes, budget), dp_minimize_loss(costs, sizes, budget)
        assert ilp.total_cost == pytest.approx(dp.total_cost, rel=1e-9) and ilp.total_size == dp.total_size


# ------------------------------------------------------------------ pruning


@pytest.mark.parametrize("integer_costs", [False, True])
def test_pruning_never_removes_a_choice_the_unpruned_solve_picks(integer_costs):
    """Pruning judges by the solve's own (size, cost): whatever the unpruned exact solve picks survives, and the
    pruned instance has the same optimum. Integer costs make ties and duplicates common."""
    rng = np.random.default_rng(11 + integer_costs)
    for _ in range(60):
        _, costs, sizes = _instance(rng, int(rng.integers(1, 5)))
        if integer_costs:
            costs = [[float(rng.integers(0, 4)) for _ in c] for c in costs]
        protected = [[bool(rng.random() < 0.2) for _ in c] for c in costs]
        kept = [prune_dominated(s, c, p)[0] for s, c, p in zip(sizes, costs, protected)]
        pc = [[c[j] for j in k] for c, k in zip(costs, kept)]
        ps = [[s[j] for j in k] for s, k in zip(sizes, kept)]
        budget = int(rng.integers(sum(map(min, sizes)), sum(map(max, sizes)) + 1))
        max_loss = float(rng.uniform(sum(map(min, costs)), sum(map(max, costs))))
        if integer_costs:
            max_loss = float(math.floor(max_loss))
        for solve, arg in ((minimize_loss, budget), (dp_minimize_loss, budget), (minimize_bits, max_loss),
                           (dp_minimize_bits, max_loss)):
            full = solve(costs, sizes, arg)
            assert all(j in k for j, k in zip(full.choice, kept)), (full.choice, kept)
            pruned = solve(pc, ps, arg)
            assert pruned.total_size == full.total_size
            assert pruned.total_cost == pytest.approx(full.total_cost, abs=1e-12)


def test_pruning_names_the_dominating_choice_and_keeps_protected_ones():
    sizes, scores = [10, 12, 12, 20, 20], [5.0, 6.0, 4.0, 4.0, 1.0]
    kept, by = prune_dominated(sizes, scores)
    assert kept == [0, 2, 4] and by == {1: 0, 3: 2}  # 1: larger and worse than 0; 3: larger than 2, same score
    kept, by = prune_dominated(sizes, scores, protected=[False, True, False, False, False])
    assert kept == [0, 1, 2, 4] and by == {3: 2}


# ------------------------------------------------------------------ a mixed-group checkpoint


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory, stories_dir):
    """A random 2-layer Llama whose K (128, 256) every group size divides, with the stories tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=32, vocab_size=512, initializer_range=0.08,
                      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    path = tmp_path_factory.mktemp("tiny_llama")
    LlamaForCausalLM(cfg).save_pretrained(path)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(stories_dir / f, path / f)
    return path


def _session(path, tmp_path, **kw):
    from slq.search.config import SearchConfig
    from slq.search.session import SearchSession

    settings = dict(calib=str(need(TINY_TEXT)), calib_samples=8, seq_len=64, sens_windows=4, verify_windows=4,
                    confirm_windows=0, group_size=128, groups=GROUPS, bitwidths=(3, 4, 8, 16), map_bits=(4, 8),
                    target="bits", bits=4.5, workdir=tmp_path / "work")
    settings.update(kw)
    return SearchSession(str(path), SearchConfig.from_settings(**settings), progress=False)


def _recount(out) -> tuple[int, int]:
    """Storage bits of the decoder linears counted from the safetensors tensors themselves: codes of `bits` per
    weight, 16 per scale, `bits` per zero point (asymmetric)."""
    from safetensors import safe_open

    from slq.runtime.checkpoint import read_specs

    specs = read_specs(json.loads((out / "config.json").read_text()))
    total = n = 0
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        for mod, s in specs.items():
            N, K = f.get_tensor(f"{mod}.weight_shape").tolist()
            packed, scale = f.get_tensor(f"{mod}.weight_packed"), f.get_tensor(f"{mod}.weight_scale")
            assert packed.numel() * 32 == N * K * s.bits  # no padding at these K
            total += packed.numel() * 32 + scale.numel() * (16 + (0 if s.symmetric else s.bits))
            n += N * K
    return total, n, specs


@pytest.fixture(scope="module")
def mixed(tiny_llama, tmp_path_factory):
    """(session, allocation, checkpoint dir): the search's bank and writer with an allocation that mixes g128,
    g64, g32 and 16-bit."""
    tmp = tmp_path_factory.mktemp("mixed")
    s = _session(tiny_llama, tmp)
    result = s.run()
    report = s.report(result, [], [])
    assert report["allocation"] == result["final"]["allocation"]
    opts = [s.unit_choices(u) for u in s.units]
    alloc = {u.name: cs[i % len(cs)] for i, (u, cs) in enumerate(zip(s.units, opts))}
    alloc[s.units[-2].name] = KEEP
    assert len({c.group for c in alloc.values() if not c.keep}) == 3
    report["allocation"] = {k: str(c) for k, c in alloc.items()}
    s.save(report, tmp / "ck", plots=False)
    return s, alloc, tmp / "ck"


def test_mixed_group_checkpoint_loads_in_plain_transformers_bit_exact(mixed):
    """The bits the session counts are the bits in the file, and transformers + compressed-tensors (no slq)
    decompress exactly the weights slq.load computes with, which are the bank's."""
    from transformers import AutoModelForCausalLM

    from slq.runtime.checkpoint import load

    s, alloc, out = mixed
    total, n, specs = _recount(out)
    kept = sum(u.n_params for u in s.units if alloc[u.name].keep)
    assert total + 16 * kept == s.storage_bits(alloc) and n + kept == s.n_params
    assert {(sp.bits, sp.group_size) for sp in specs.values()} == {(c.bits, c.group) for c in alloc.values()
                                                                    if not c.keep}
    plain = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain(input_ids=ids)  # compressed-tensors decompresses on the first forward
    ours = load(out)
    umap = {m: u for u in s.units for m in u.members}
    for m, sp in specs.items():
        w_ours = ours.get_submodule(m).dequantized_weight()
        assert torch.equal(plain.get_submodule(m).weight.float(), w_ours), m
        assert torch.equal(w_ours, s.bank.dequantized(umap[m], m, alloc[umap[m].name]).cpu()), m
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, ours(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def _oracle(q) -> torch.Tensor:
    """The grid oracle written out: w[n, k] = (codes[n, k] - zero[n, k // G]) * scale[n, k // G], fp32."""
    G = q.spec.effective_group(q.codes.shape[1])
    g = torch.arange(q.codes.shape[1]) // G
    return (q.codes.float() - q.zero.float()[:, g]) * q.scale.float()[:, g]


def test_reference_backend_runs_mixed_groups_against_the_grid_oracle(mixed):
    from slq.runtime.checkpoint import load
    from slq.runtime.qlinear import QuantLinear

    _, alloc, out = mixed
    ours = load(out, backend="reference")
    layers = {n: m for n, m in ours.named_modules() if isinstance(m, QuantLinear)}
    assert len({m.spec.group_size for m in layers.values()}) == 3
    x = torch.randn(3, 5, 256, generator=torch.Generator().manual_seed(1))
    for name, m in layers.items():
        xi = x[..., : m.in_features]
        with torch.no_grad():
            torch.testing.assert_close(m(xi), xi @ _oracle(m.quantized_weight()).T, rtol=1e-6, atol=1e-6)


_TRITON_SCRIPT = """
import json, sys, torch
from slq.runtime.checkpoint import load
from slq.runtime.qlinear import QuantLinear
from slq.runtime.backends import triton_gemv as tg
model = load(sys.argv[1])
gen = torch.Generator().manual_seed(0)
out = {}
for name, m in model.named_modules():
    if not isinstance(m, QuantLinear):
        continue
    q = m.quantized_weight()
    G = q.spec.effective_group(m.in_features)
    g = torch.arange(m.in_features) // G
    ref_w = (q.codes.float() - q.zero.float()[:, g]) * q.scale.float()[:, g]
    w = tg.repack(q.codes, q.scale, q.zero, q.spec.bits, q.spec.group_size)
    for M in (1, 8):
        x = torch.randn(M, m.in_features, generator=gen).half()
        y = tg.quant_matmul(x, w)
        ref = x.float() @ ref_w.T
        out[f"{name}|{M}"] = [q.spec.group_size, float((y.float() - ref).norm() / ref.norm())]
print("RESULT" + json.dumps(out))
"""


def test_triton_interpreter_runs_mixed_groups_against_the_grid_oracle(mixed):
    """Triton's kernels under TRITON_INTERPRET=1 (a subprocess: the variable must be set before triton loads),
    every layer of the mixed-group checkpoint, GEMV (M = 1) and tiled (M = 8), against the oracle."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("triton", reason="triton is not installed; the CPU check needs its interpreter")
    src = Path(__file__).resolve().parents[2] / "src"
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=f"{src}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, "-c", _TRITON_SCRIPT, str(mixed[2])], env=env, capture_output=True,
                          text=True, timeout=600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")]
    assert proc.returncode == 0 and lines, f"interpreter run failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    res = json.loads(lines[-1][len("RESULT"):])
    assert {g for g, _ in res.values()} == {128, 64, 32}
    assert all(err < 2e-3 for _, err in res.values()), res


def test_search_prunes_before_gptq_and_reports_the_choice_set(tiny_llama, tmp_path, monkeypatch):
    """Pruning runs on the RTN scores before GPTQ: a choice whose score is matched by a smaller one is never
    solved (absent from the bank's file), is reported with the choice that dominates it, and the own-group
    choices always stay. Scores that ignore the group size make every finer group dominated."""
    from safetensors import safe_open

    import slq.search.bank as bank_mod
    from slq.search.report import frontier_png, heatmap_png, markdown

    real = bank_mod._rtn_scores
    seen = {}

    def group_blind(W, units, choices, *a, **k):
        seen.update(real(W, units, choices, *a, **k))  # the real scores are computed and finite
        return {u.name: [4.0 ** -c.bits for c in choices[u.name]] for u in units}

    monkeypatch.setattr(bank_mod, "_rtn_scores", group_blind)
    s = _session(tiny_llama, tmp_path, bitwidths=(2, 3, 4, 8, 16))
    assert seen and all(math.isfinite(v) and v > 0 for vs in seen.values() for v in vs)
    report = s.report(s.run(), s.baselines((4, 8)), s.frontier())
    report["frontier_one_group"] = s.frontier(one_group=True)
    ch = report["choices"]
    assert ch["groups"] == [128, 64, 32]
    with safe_open(str(s.bank.workdir / "layer_0000.safetensors"), framework="pt") as f:
        stored = {k.split(".b", 1)[1].split(".")[0] for k in f.keys()}
    assert stored == {f"{b}g128" for b in (2, 3, 4, 8)}
    for u in s.units:
        assert ch["per_unit"][u.name] == ["2g128", "3g128", "4g128", "8g128", "16"]
        why = ch["pruned"][u.name]
        assert set(why) == {f"{b}g{g}" for b in (2, 3, 4, 8) for g in (64, 32)}
        assert all(w["by"] == lbl.split("g")[0] + "g128" and w["by_bits"] < w["bits"] for lbl, w in why.items())
    assert ch["n_pruned"] == 8 * len(s.units)
    assert all(Choice.parse(v) in s.unit_choices(u) for u, v in zip(s.units, report["allocation"].values()))
    assert report["bits_per_param"] <= 4.5
    assert sum(report["choice_histogram"].values()) == pytest.approx(1.0)
    assert [r["kl"] for r in report["frontier"]] == [r["kl"] for r in report["frontier_one_group"]]
    assert len(heatmap_png(report)) > 1000 and len(frontier_png(report)) > 1000
    assert "Pruned choices" in markdown(report)


def test_search_over_groups_is_never_worse_than_one_group(tiny_llama, tmp_path):
    """Real RTN pruning: the own-group choices survive in every unit, and since the one-group choice set is a
    subset, its predicted frontier is never below the full one's."""
    s = _session(tiny_llama, tmp_path)
    full, one = s.frontier(), s.frontier(one_group=True)
    for u in s.units:
        assert {f"{b}g128" for b in (3, 4, 8)} <= {str(c) for c in s.unit_choices(u)}
    by_budget = {r["budget"]: r["kl"] for r in full}
    assert any(r["budget"] in by_budget for r in one)
    for r in one:
        if r["budget"] in by_budget:
            assert by_budget[r["budget"]] <= r["kl"] * (1 + 1e-9)


def test_a_bank_of_group_choices_resumes_byte_identical(stories, tiny_windows, tmp_path, monkeypatch):
    """Several group sizes per unit (and their pruning) keep the bank's resume: an interrupted build finishes
    with the files of an uninterrupted one; entries are named by their labels."""
    from safetensors import safe_open

    import slq.search.bank as bank_mod
    from slq.quant.config import QuantConfig
    from slq.quant.units import build_units

    model, _ = stories
    units = build_units(model)

    def build(d):
        return bank_mod.build_bank(model, units, tiny_windows[:6], d, QuantConfig(group_size=32), bitwidths=(3, 8),
                                   groups=(32, 16), progress=False)

    full = build(tmp_path / "full")
    real = bank_mod._bank_layer

    def flaky(layer, i, *a, **k):
        if i == 2:
            raise KeyboardInterrupt
        return real(layer, i, *a, **k)

    monkeypatch.setattr(bank_mod, "_bank_layer", flaky)
    with pytest.raises(KeyboardInterrupt):
        build(tmp_path / "resumed")
    monkeypatch.setattr(bank_mod, "_bank_layer", real)
    resumed = build(tmp_path / "resumed")
    assert resumed.timings["layers_built"] == len({u.layer for u in units}) - 2
    for f in sorted((tmp_path / "full").glob("layer_*.safetensors")):
        assert f.read_bytes() == (tmp_path / "resumed" / f.name).read_bytes(), f.name
    assert resumed.t == full.t and resumed.pruned == full.pruned
    for u in units:  # K = 64: g32 and g16 (unless pruned); K = 172: per-channel only
        want = {"3g32", "8g32", "3g16", "8g16"} if u.K == 64 else {"3ch", "8ch"}
        got = {c.label for c in full.choices(u)}
        assert got | set(full.pruned.get(u.name, {})) == want and {"3g32", "8g32"} & want <= got
    with safe_open(str(tmp_path / "full" / "layer_0000.safetensors"), framework="pt") as f:
        assert {k.split(".b", 1)[1].split(".")[0] for k in f.keys()} == {
            c.label for u in units if u.layer == 0 for c in full.choices(u)}
    with pytest.raises(SlqError, match="other settings"):  # one group size is another bank
        bank_mod.build_bank(model, units, tiny_windows[:6], tmp_path / "full", QuantConfig(group_size=32),
                            bitwidths=(3, 8), progress=False)
