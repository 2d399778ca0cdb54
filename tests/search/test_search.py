"""The SLQ bit search on stories260K: bank, prober, estimators, targets, checkpoint, CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from slq.quant.units import KEEP_BITS, build_units

from conftest import TINY_TEXT, need

GS = 32  # stories260K: K=64 takes g32, K=172 falls back to per-channel


@pytest.fixture(scope="module")
def text_windows(stories_dir):
    from transformers import AutoTokenizer

    from slq.measure.data import load_text, token_windows

    tok = AutoTokenizer.from_pretrained(stories_dir)
    return token_windows(tok, load_text(str(need(TINY_TEXT))), 128, 24)


def _bank(model, windows, workdir, bitwidths=(2, 4, 8), method="gptq"):
    from slq.quant.config import QuantConfig
    from slq.search.bank import build_bank

    units = build_units(model)
    return build_bank(model, units, windows, workdir, QuantConfig(group_size=GS, method=method), bitwidths=bitwidths,
                      progress=False)


def test_bank_entry_is_plain_gptq_of_that_unit(stories, text_windows, tmp_path):
    """A bank entry equals a one-bitwidth quantize_model run of the same (non-sequential) setting."""
    from slq.quant.pipeline import quantize_model

    model, _ = stories
    bank = _bank(model, text_windows[:8], tmp_path / "bank")
    for bits in (2, 8):
        import copy

        m2 = copy.deepcopy(model)
        res = quantize_model(m2, None, specs={m: _spec(bank, u, bits) for u in bank.units for m in u.members},
                             method="gptq", windows=text_windows[:8], sequential=False, progress=False)
        for u in bank.units:
            for m in u.members:
                a, b = bank.qweight(u, m, bits), res.qweights[m]
                agree = (a.codes == b.codes).float().mean().item()
                assert agree > 0.999, f"{m} @ {bits}: {agree}"
                assert torch.equal(a.scale, b.scale) or agree < 1
    # the reference weights were not touched
    for u in bank.units:
        for m in u.members:
            assert torch.equal(dict(model.named_modules())[m].weight.detach(), bank.original[m])
    # every file of the bank has the umask's mode (0644), the layer files included (safetensors writes 0600)
    import stat

    files = sorted((tmp_path / "bank").iterdir())
    assert any(f.name.startswith("layer_") for f in files)
    assert all(stat.S_IMODE(f.stat().st_mode) == 0o644 for f in files), [(f.name, oct(f.stat().st_mode)) for f in files]


def _spec(bank, unit, bits):
    from slq.quant.spec import QuantSpec

    return QuantSpec(bits, GS, False)


def test_resumed_bank_equals_uninterrupted(stories, text_windows, tmp_path, monkeypatch):
    import slq.search.bank as bank_mod

    model, _ = stories
    full = _bank(model, text_windows[:8], tmp_path / "full")
    real = bank_mod._bank_layer
    calls = {"n": 0}

    def flaky(layer, i, *a, **k):
        if i == 2:
            raise KeyboardInterrupt  # interrupted after two layers were written
        calls["n"] += 1
        return real(layer, i, *a, **k)

    monkeypatch.setattr(bank_mod, "_bank_layer", flaky)
    with pytest.raises(KeyboardInterrupt):
        _bank(model, text_windows[:8], tmp_path / "resumed")
    assert calls["n"] == 2
    monkeypatch.setattr(bank_mod, "_bank_layer", real)
    resumed = _bank(model, text_windows[:8], tmp_path / "resumed")
    assert resumed.timings["layers_built"] == len({u.layer for u in resumed.units}) - 2
    for f in sorted((tmp_path / "full").glob("layer_*.safetensors")):
        assert f.read_bytes() == (tmp_path / "resumed" / f.name).read_bytes(), f.name
    assert resumed.t == full.t
    # a different setting must not reuse the directory
    from slq.util.errors import SlqError

    with pytest.raises(SlqError, match="other settings"):
        _bank(model, text_windows[:8], tmp_path / "full", bitwidths=(3, 4))


def test_prober_matches_a_full_forward(stories, text_windows, tmp_path):
    """Incremental re-computation from the first changed layer equals a whole-model comparison."""
    import copy

    from slq.measure.fidelity import compare_windows
    from slq.search.prober import Prober

    model, _ = stories
    reference = copy.deepcopy(model)
    bank = _bank(model, text_windows[:8], tmp_path / "bank")
    sens = text_windows[:6]
    prober = Prober(model, bank, sens)
    assert prober.measure() == (0.0, 0.0)
    last = bank.units[-1].name
    changes = [{last: 2}, {bank.units[3].name: 4}, {last: KEEP_BITS}, {bank.units[0].name: 8}]
    for ch in changes:
        prober.set(ch)
        kl, tv = prober.measure()
        fid = compare_windows(reference, model, sens, progress=False)
        assert kl == pytest.approx(fid.kl_pq_mean, rel=1e-4, abs=1e-9)
        assert tv == pytest.approx(1 - fid.ear, rel=1e-4, abs=1e-9)
    prober.reset()
    for u in bank.units:
        for m in u.members:
            assert torch.equal(dict(model.named_modules())[m].weight.detach(), bank.original[m])


def test_linear_estimator_predicts_uniform_assemblies(stories, text_windows, tmp_path):
    from slq.search.estimators import linear_estimator
    from slq.search.prober import Prober

    model, _ = stories
    bank = _bank(model, text_windows[:8], tmp_path / "bank", bitwidths=(4, 6, 8))
    prober = Prober(model, bank, text_windows[:8])
    sens = linear_estimator(prober, probe_bits=(4,), progress=False)
    for b in (6, 8):
        prober.set({u.name: b for u in bank.units})
        measured, _ = prober.measure()
        predicted = sum(sens.kl[u.name][bank.choice(u, b)] for u in bank.units)
        assert 0.5 < predicted / measured < 2.0, (b, predicted, measured)
    for u in bank.units:  # fewer bits never predicted cheaper
        ks = [sens.kl[u.name][bank.choice(u, b)] for b in (4, 6, 8, KEEP_BITS)]
        assert ks == sorted(ks, reverse=True) and ks[-1] == 0.0


def test_shapley_marginals_add_up_to_the_uniform_loss(stories, text_windows, tmp_path):
    """Efficiency: along every ordering the marginals telescope to the all-units loss."""
    from slq.search.estimators import shapley_estimator
    from slq.search.prober import Prober

    model, _ = stories
    bank = _bank(model, text_windows[:8], tmp_path / "bank", bitwidths=(4, 8))
    prober = Prober(model, bank, text_windows[:6])
    sens = shapley_estimator(prober, orderings=2, progress=False)
    for b in (4, 8):
        prober.set({u.name: b for u in bank.units})
        measured, _ = prober.measure()
        assert sens.details["raw_sum_kl"][str(b)] == pytest.approx(measured, rel=1e-6)
    # noisy marginals never make a unit free: every quantized bitwidth costs something
    for u in bank.units:
        assert all(sens.kl[u.name][bank.choice(u, b)] > 0 for b in (4, 8)), (u.name, sens.kl[u.name])


def test_fisher_estimate_matches_measured_kl_at_high_bits(stories, text_windows, tmp_path):
    """Second-order estimate vs measured KL of single units at 8 bits (small perturbations)."""
    from slq.search.estimators import fisher_estimator
    from slq.search.prober import Prober

    model, _ = stories
    bank = _bank(model, text_windows[:8], tmp_path / "bank", bitwidths=(6, 8))
    sens = fisher_estimator(model, bank, text_windows[:16], draws=2, progress=False)
    prober = Prober(model, bank, text_windows[:16])
    prober.set({u.name: 8 for u in bank.units})
    measured, _ = prober.measure()
    predicted = sum(sens.kl[u.name][bank.choice(u, 8)] for u in bank.units)
    assert 0.4 < predicted / measured < 2.5, (predicted, measured)


def test_estimator_registry_has_one_signature(stories, text_windows, tmp_path):
    """Every registered estimator takes the same call, ``fn(inputs, config)``, reads its settings from the config,
    and returns the same result as the algorithm called directly with those settings."""
    import inspect

    from slq.search.config import SearchConfig
    from slq.search.estimators import (ESTIMATORS, EstimatorInputs, fisher_estimator, linear_estimator,
                                       shapley_estimator)
    from slq.search.prober import Prober, Sensitivity

    assert set(ESTIMATORS) == {"linear", "shapley", "fisher"}
    assert len({tuple(inspect.signature(fn).parameters) for fn in ESTIMATORS.values()}) == 1
    model, _ = stories
    bank = _bank(model, text_windows[:8], tmp_path / "bank", bitwidths=(4, 8))
    windows = text_windows[:4, :64]
    prober = Prober(model, bank, windows)
    inputs = EstimatorInputs(model, bank, prober, windows, progress=False)
    config = SearchConfig.from_settings(bitwidths=(4, 8, 16), probe_bits=(8,), orderings=1, fisher_draws=1, seed=3)
    direct = {"linear": lambda: linear_estimator(prober, probe_bits=(8,), progress=False),
              "shapley": lambda: shapley_estimator(prober, orderings=1, seed=3, progress=False),
              "fisher": lambda: fisher_estimator(model, bank, windows, draws=1, seed=3, progress=False)}
    for name, fn in ESTIMATORS.items():
        sens = fn(inputs, config)
        assert isinstance(sens, Sensitivity) and sens.estimator == name
        assert set(sens.kl) == {u.name for u in bank.units}
        assert all({str(c) for c in sens.kl[u.name]} == {"4g32", "8g32", "16"} if u.K == 64 else
                   {"4ch", "8ch", "16"} for u in bank.units)  # K = 172: per-channel
        assert sens.kl == direct[name]().kl, name


def test_ear_map_recovers_a_power_law():
    from slq.search.prober import EarMap

    pts = [(k, 0.3 * k**0.55) for k in (1e-5, 1e-4, 1e-3, 1e-2)]
    m = EarMap().fit(pts)
    assert m.beta == pytest.approx(0.55, abs=1e-9) and m.c == pytest.approx(0.3, rel=1e-9)
    assert m.ear(m.kl_for(0.99)) == pytest.approx(0.99, abs=1e-12)


def _checkpoint_bits(out):
    """Storage bits of the decoder linears, read back from the checkpoint itself."""
    from safetensors import safe_open

    from slq.runtime.checkpoint import read_specs

    cfg = json.loads((out / "config.json").read_text())
    specs = read_specs(cfg)
    f = safe_open(str(out / "model.safetensors"), framework="pt")
    total = n = 0
    for key in f.keys():
        mod = key.rsplit(".", 1)[0]
        if key.endswith(".weight_shape") and mod in specs:
            N, K = f.get_tensor(key).tolist()
            s = specs[mod]
            G = s.effective_group(K)
            total += N * K * s.bits + (N * K // G) * (16 + (0 if s.symmetric else s.bits))
            n += N * K
        elif key.endswith(".weight") and ".layers." in key and "norm" not in key:
            t = f.get_tensor(key)
            assert t.dtype == torch.float16  # kept units are stored at 16 bits
            total += 16 * t.numel()
            n += t.numel()
    return total, n, specs


def _search(stories_dir, tmp_path, **kw):
    from slq.search.session import search

    args = dict(calib=str(need(TINY_TEXT)), calib_samples=12, seq_len=128, sens_windows=6, verify_windows=12,
                group_size=GS, workdir=tmp_path / "work", out=tmp_path / "out", progress=False,
                baselines=(4, 8), bitwidths=(2, 3, 4, 5, 6, 7, 8, 16))
    args.update(kw)
    return search(str(stories_dir), **args), args["out"]


def test_budget_is_respected_exactly_and_fused_units_share_bits(stories_dir, tmp_path):
    rep, out = _search(stories_dir, tmp_path, target="bits", bits=5.25)
    total, n, specs = _checkpoint_bits(out)
    assert n == rep["n_params_allocated"]
    assert total <= math.floor(5.25 * n)
    assert rep["bits_per_param"] == pytest.approx(total / n, abs=1e-12)
    assert rep["bits_per_param"] > 4.5  # the budget is used, not wasted
    for layer in range(5):
        p = f"model.layers.{layer}."
        qkv = {str(specs.get(p + f"self_attn.{x}_proj")) for x in "qkv"}
        gu = {str(specs.get(p + f"mlp.{x}_proj")) for x in ("gate", "up")}
        assert len(qkv) == 1 and len(gu) == 1, (layer, qkv, gu)
    assert (out / "slq_report.md").is_file() and (out / "allocation.png").stat().st_size > 1000
    assert (out / "frontier.png").stat().st_size > 1000
    # the report's bank block is the bank's size on disk, recounted from its layer files
    bank_dir = Path(rep["bank"]["workdir"]) / "bank"
    assert rep["bank"]["total_bytes"] == sum(f.stat().st_size for f in bank_dir.glob("layer_*.safetensors"))
    assert 0 < rep["bank"]["estimate_bytes"]["sure"] <= rep["bank"]["total_bytes"]
    assert not any("bytes" in k for k in rep["timings"])
    # a rerun on the same work directory reads the bank and sensitivities back and gives the same result
    again, _ = _search(stories_dir, tmp_path, target="bits", bits=5.25, out=None)
    assert again["allocation"] == rep["allocation"]
    assert again["measured"] == rep["measured"]


def test_dl_search_meets_its_target_on_held_out_windows(stories_dir, tmp_path):
    """Verified independently: the written checkpoint, loaded by slq.load, on the held-out windows."""
    from transformers import AutoTokenizer

    from slq.measure.data import load_text, token_windows
    from slq.measure.evaluate import evaluate
    from slq.models.sources import load_model

    rep, out = _search(stories_dir, tmp_path, target="dl", ear=0.99)
    assert rep["verified"], rep["rounds"]
    # a round is accepted only when its lower bound passes on the verification windows and on the second
    # held-out sample; the result is the accepted round with the fewest bits. A round after an accepted one
    # is measured only when it needs fewer bits than every accepted round before it.
    accepted = [r for r in rep["rounds"] if r["accepted"]]
    assert all(r["measured"]["ear"]["ci95"][0] >= 0.99 for r in accepted)
    assert all(r["confirmation"]["passed"] for r in accepted)
    for r in rep["rounds"]:
        passed_verify = r["measured"]["ear"]["ci95"][0] >= 0.99
        assert ("confirmation" in r) == passed_verify
        if passed_verify:
            assert r["confirmation"]["passed"] == (r["confirmation"]["measured"]["ear"]["ci95"][0] >= 0.99)
            assert r["accepted"] == r["confirmation"]["passed"]
    assert rep["confirmation"]["windows"] == 12
    assert [t["round"] for t in rep["confirmation"]["tries"]] == [r["round"] for r in rep["rounds"] if "confirmation" in r]
    best_round = min(accepted, key=lambda r: r["bits_per_param"])
    assert rep["allocation"] == best_round["allocation"] and rep["confirmed"] == best_round["confirmation"]
    best = None
    for r in rep["rounds"]:
        if best is not None:
            assert r["bits_per_param"] < best
        if r["accepted"]:
            best = r["bits_per_param"] if best is None else min(best, r["bits_per_param"])
    tok = AutoTokenizer.from_pretrained(stories_dir)
    held_out = token_windows(tok, load_text(str(need(TINY_TEXT))), 128, 12, skip=12)
    from slq.runtime.checkpoint import load

    fid = evaluate(load_model(stories_dir), (load(out), tok), windows=held_out, progress=False)
    assert fid.ear_ci95[0] >= 0.99
    assert fid.ear == pytest.approx(rep["measured"]["ear"]["mean"], abs=1e-4)
    # and on the confirmation windows (the 12 after the verification ones), which no round chose on
    unseen = token_windows(tok, load_text(str(need(TINY_TEXT))), 128, 12, skip=24)
    fid = evaluate(load_model(stories_dir), (load(out), tok), windows=unseen, progress=False)
    assert fid.ear_ci95[0] >= 0.99
    assert fid.ear == pytest.approx(rep["confirmed"]["measured"]["ear"]["mean"], abs=1e-4)
    assert rep["bits_per_param"] < 16
    for key in ("model", "target", "bits_per_param", "bits_per_param_model", "predicted", "measured",
                "allocation", "rounds", "timings"):
        assert key in rep
    for key in ("bank_s", "sensitivity_s", "solve_s", "verify_s", "total_s"):
        assert key in rep["timings"]


def test_dl_round_failing_the_second_sample_is_rejected_and_tightens(stories_dir, tmp_path, monkeypatch):
    """A round that passes on the verification windows but not on the second held-out sample is rejected,
    and the next budget is tighter; failing there every time leaves the search NOT verified. The second
    sample's lower bound is forced here (its windows and EAR are real)."""
    from slq.search.config import SearchConfig
    from slq.search.session import SearchSession

    cfg = SearchConfig.from_settings(calib=str(need(TINY_TEXT)), calib_samples=8, seq_len=64, sens_windows=4,
                                     verify_windows=6, confirm_windows=5, group_size=GS, bitwidths=(4, 6, 8, 16),
                                     workdir=tmp_path / "w")
    s = SearchSession(str(stories_dir), cfg, progress=False)
    assert s.confirm_w.shape == (5, 64)
    assert not any(torch.equal(c, v) for c in s.confirm_w for v in torch.cat([s.verify_w, s.calib_w]))
    real = s.confirm
    lows = []

    def forced(allocs):
        (fid,) = real(allocs)
        fid.ear_ci95 = (lows.pop(0) if lows else 0.999, 1.0)
        return [fid]

    monkeypatch.setattr(s, "confirm", forced)
    lows[:] = [0.5]
    res = s.run("dl", ear=0.9, max_rounds=4)
    first = next(r for r in res["rounds"] if "confirmation" in r)
    assert not first["confirmation"]["passed"] and not first["accepted"]
    after = [r for r in res["rounds"] if r["round"] > first["round"]]
    assert after and after[0]["kl_budget"] < first["kl_budget"]
    assert res["accepted"] is not None and res["accepted"]["round"] > first["round"]
    lows[:] = [0.5] * 8
    res = s.run("dl", ear=0.9, max_rounds=3)
    assert res["accepted"] is None and res["confirmation"]["tries"]
    assert not any(t["passed"] for t in res["confirmation"]["tries"])
    # no second sample asked for: the verification windows alone decide, and the result says so
    s.confirm_w, s.confirm_windows_n = None, 0
    res = s.run("dl", ear=0.9, max_rounds=4)
    assert res["accepted"] is not None and "no confirmation" in res["confirmation"]["note"]


def test_cli_search_and_bad_input(stories_dir, tmp_path):
    from typer.testing import CliRunner

    from slq.cli import app

    runner = CliRunner()
    base = [str(stories_dir), "--calib", str(need(TINY_TEXT)), "--calib-samples", "8", "--seq-len", "128",
            "--sens-windows", "4", "--verify-windows", "8", "--group-size", "32", "--baselines", "8",
            "--workdir", str(tmp_path / "w")]
    r = runner.invoke(app, ["quantize", *base, "--bits", "6.5", "--out", str(tmp_path / "o")])
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "o" / "slq_report.json").read_text())
    assert rep["bits_per_param"] <= 6.5 and rep["target"]["kind"] == "bits"
    r = runner.invoke(app, ["info", str(tmp_path / "o")])
    assert r.exit_code == 0 and "SLQ search" in r.output
    for bad, msg in ((["--target", "xx"], "--target must be dl or tl"),
                     (["--target", "dl", "--bits", "4.5"], "not --bits and --target"),
                     (["--bits", "1.5"], "below the smallest reachable"),
                     (["--bits", "5.5", "--bitwidths", "3,9"], "--bitwidths"),
                     (["--target", "dl", "--confirm-windows", "-1"], "--confirm-windows must be >= 0")):
        r = runner.invoke(app, ["quantize", *base, *bad, "--out", str(tmp_path / "bad")])
        assert r.exit_code == 1 and "error:" in r.output and msg in r.output, r.output
        assert not (tmp_path / "bad").exists()
    # an unreachable budget is refused before any bank work: a fresh work directory stays empty
    fresh = [a if a != str(tmp_path / "w") else str(tmp_path / "w2") for a in base]
    r = runner.invoke(app, ["quantize", *fresh, "--bits", "1.5", "--out", str(tmp_path / "bad")])
    assert r.exit_code == 1 and "below the smallest reachable" in r.output, r.output
    assert not (tmp_path / "w2" / "bank").exists()


def test_tl_search_calibrates_at_the_4bit_anchor(stories_dir, tmp_path):
    """The KL budget follows recovery ~ 1 - alpha * KL at the anchor; every round runs the paired test."""
    from conftest import SHARED

    need(SHARED / "data" / "tasks" / "piqa.jsonl")
    rep, _ = _search(stories_dir, tmp_path, target="tl", recovery=0.99, tasks=["piqa", "arc_easy"], task_limit=30,
                     max_rounds=2, out=None)
    a = rep["anchor"]
    avg = a["tasks"]["average"]
    assert a["recovery"] == pytest.approx(avg["acc_candidate"] / avg["acc_reference"])
    assert a["alpha"] == pytest.approx(a["loss_used"] / a["kl"])
    assert rep["rounds"][0]["kl_budget"] == pytest.approx(0.01 / a["alpha"])
    for r in rep["rounds"]:
        assert r["accepted"] == r["tasks"]["average"]["lossless"]
        assert r["predicted"]["kl"] <= r["kl_budget"] * (1 + 1e-9)
    if len(rep["rounds"]) == 2:
        assert rep["rounds"][1]["kl_budget"] == pytest.approx(rep["rounds"][0]["kl_budget"] / 2)


def test_kept_16bit_units_load_in_plain_transformers(stories_dir, tmp_path):
    """Units kept at 16 bits are fp16 in the file; transformers + compressed-tensors (no slq) and slq.load
    read the same model, equal to the one the search measured."""
    from transformers import AutoModelForCausalLM

    from slq.runtime.checkpoint import load

    rep, out = _search(stories_dir, tmp_path, target="bits", bits=11.0, baselines=())
    assert rep["n_params_kept_16bit"] > 0
    _checkpoint_bits(out)  # asserts kept linears are stored as fp16
    ids = torch.randint(0, 500, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = AutoModelForCausalLM.from_pretrained(out).eval()
        ours = load(out)
        torch.testing.assert_close(plain(input_ids=ids).logits, ours(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_bank_fingerprint_does_not_depend_on_thread_count():
    """The work-directory fingerprint must be the same for any number of threads: a float sum's rounding
    depends on the reduction order, and a bank built with one thread was once refused with two."""
    from slq.search.bank import fingerprint

    torch.manual_seed(0)
    lin = torch.nn.Linear(2048, 1024)
    win = torch.zeros(1, 4, dtype=torch.long)
    before = torch.get_num_threads()
    try:
        fps = []
        for n in (1, 2):
            torch.set_num_threads(n)
            fps.append(fingerprint(lin, win, {"a": 1}))
    finally:
        torch.set_num_threads(before)
    assert fps[0] == fps[1]
    with torch.no_grad():
        lin.weight[3, 5] += 1e-3  # and it still sees a change of one weight
    assert fingerprint(lin, win, {"a": 1}) != fps[0]


def test_generated_calibration_and_verification_are_independent_draws(stories_dir, tmp_path):
    """With generated data both come from one sampling pass: the calibration is what the data module
    samples alone, and the verification windows are other sequences (held out)."""
    from slq.measure.data import generated_windows
    from slq.search.config import SearchConfig
    from slq.search.session import SearchSession

    cfg = SearchConfig.from_settings(calib="generated", calib_samples=4, seq_len=32, sens_windows=2, verify_windows=3,
                                     group_size=GS, bitwidths=(8, 16), map_bits=(8,), workdir=tmp_path / "w")
    s = SearchSession(str(stories_dir), cfg, progress=False)
    assert s.config.probe_bits == (8,)  # the default probe (4 bits) falls back to the candidate nearest to it
    assert s.config.quant.act_order is True  # GPTQ's default
    alone = generated_windows(s.model, s.tok, 4, 32, seed=0)
    assert torch.equal(s.calib_w, alone)
    assert s.verify_w.shape == (3, 32) and s.confirm_w.shape == (3, 32)  # the second sample: as many by default
    for v in s.verify_w:
        assert not any(torch.equal(v, c) for c in s.calib_w)
    for c in s.confirm_w:
        assert not any(torch.equal(c, x) for x in torch.cat([s.calib_w, s.verify_w]))


def test_second_sample_is_skipped_with_a_note_when_the_text_is_too_short(stories_dir, tmp_path):
    """A text with room for the calibration and verification windows but not for the second sample: the
    session still runs, without it, and says why; a negative count is refused in one line."""
    from transformers import AutoTokenizer

    from slq.search.config import SearchConfig
    from slq.search.session import SearchSession
    from slq.util.errors import ConfigError

    tok = AutoTokenizer.from_pretrained(stories_dir)
    text = need(TINY_TEXT).read_text()
    ids = tok(text).input_ids[: 64 * 7 + 10]  # room for 7 windows of 64 tokens (the last one partial)
    short = tmp_path / "short.txt"
    short.write_text(tok.decode(ids))
    n_windows = len(tok(short.read_text()).input_ids) // 64
    assert 6 <= n_windows < 4 + 2 + 2
    kw = dict(calib=str(short), calib_samples=4, seq_len=64, sens_windows=2, verify_windows=2, group_size=GS,
              bitwidths=(8, 16), map_bits=(8,))
    s = SearchSession(str(stories_dir), SearchConfig.from_settings(workdir=tmp_path / "w", **kw), progress=False)
    assert s.confirm_w is None and "no confirmation" in s.confirm_note and "only has" in s.confirm_note
    res = s.run("dl", ear=0.5, max_rounds=1)
    assert res["confirmation"]["windows"] == 0 and res["confirmation"]["note"] == s.confirm_note
    with pytest.raises(ConfigError, match="confirm_windows must be >= 0") as e:
        SearchConfig.from_settings(confirm_windows=-1, workdir=tmp_path / "w2", **kw)
    assert e.value.field == "confirm_windows"


def test_act_order_default_follows_the_method(stories_dir, tmp_path):
    """RTN has no column order: a session with it runs with act-order off by default and refuses act-order asked
    for explicitly, in one line, before it writes a work directory."""
    from slq.search.config import SearchConfig
    from slq.search.session import SearchSession, search
    from slq.util.errors import ConfigError

    kw = dict(calib=str(need(TINY_TEXT)), calib_samples=4, seq_len=32, sens_windows=2, verify_windows=2,
              group_size=GS, bitwidths=(8, 16), map_bits=(8,), method="rtn")
    s = SearchSession(str(stories_dir), SearchConfig.from_settings(workdir=tmp_path / "w", **kw), progress=False)
    assert s.config.quant.act_order is False
    with pytest.raises(ConfigError, match="needs method 'gptq'") as e:
        search(str(stories_dir), workdir=tmp_path / "w2", act_order=True, progress=False, **kw)
    assert e.value.field == "act_order"
    assert not (tmp_path / "w2").exists()
