"""What a bit search reports: the report dict (:func:`build_search_report`), a Markdown page and two PNG plots.

- :func:`build_search_report` turns a session and one target's result into the JSON report: the settings, the
  final allocation, its predicted and measured fidelity, bits per parameter (scales and zeros included; units
  kept in 16-bit count 16), every round, the sensitivities and the EAR map, baselines and frontier, timings.
  Bits per parameter is the exact storage of the allocation divided by the allocatable parameters, so it
  equals what the checkpoint holds.
- ``allocation.png``: the allocation as a heat map, decoder layer x unit kind, colour = bits, each cell
  labelled with its choice (``8g64``; ``ch`` per-channel).
- ``frontier.png``: EAR and KL vs bits per parameter: the measured search result(s), the measured
  uniform baselines (same verification windows), and the predicted frontier of the sensitivities; with
  several group sizes, also the predicted frontier of the one-group search (``frontier_one_group``).

The allocation is reported by choice labels (``"8g64"``, ``"8ch"``, ``"16"``); ``bits_histogram`` counts
parameters by bitwidth, ``choice_histogram`` by choice, and ``choices.pruned`` lists every choice the bank
pruned before GPTQ with the choice that dominates it.
"""

from __future__ import annotations

import io
import time
from typing import TYPE_CHECKING

from torch import nn

from ..measure.data import GENERATED
from ..quant.grid import gamma_stats
from ..quant.pipeline import build_report, other_params
from ..quant.spec import LayerPlan, Plan, QuantSpec, resolve_group_size
from ..quant.units import Choice
from ..runtime.export import vllm_check

if TYPE_CHECKING:  # annotations only: the session imports this module
    from .session import SearchSession

KIND_ORDER = ("attn.qkv", "attn.o", "mlp.gate_up", "mlp.down")


def fid_summary(fid) -> dict:
    """The part of a :class:`~slq.measure.fidelity.Fidelity` a search round records."""
    d = fid.to_dict()
    return {"ear": {"mean": d["ear"]["mean"], "ci95": d["ear"]["ci95"]},
            "ear_top10": {"mean": d["ear_top10"]["mean"], "ci95": d["ear_top10"]["ci95"]},
            "kl": {"mean": d["kl"]["mean"], "p99": d["kl"]["p99"]}, "top1": d["top1"],
            "ppl_ratio": d["ppl"]["ratio"], "ppl": d["ppl"], "n_tokens": d["n_tokens"]}


def _plan(session: "SearchSession", alloc: dict) -> Plan:
    """The quantized linears of an allocation (units kept in 16-bit are not in it)."""
    q = session.config.quant
    plan, mods = Plan(), dict(session.model.named_modules())
    for u in session.units:
        bu = session.bank.choice(u, alloc[u.name])
        if bu.keep:
            continue
        for m in u.members:
            N, K = mods[m].weight.shape
            own = resolve_group_size(K, q.group_size)[0]
            note = "chosen by the search" if bu.group != own else resolve_group_size(K, q.group_size)[1]
            lp = LayerPlan(m, N, K, QuantSpec(bu.bits, bu.group, q.symmetric), q.group_size, note, q.method)
            lp.gamma_mean, lp.gamma2_mean = gamma_stats(session.bank.original[m], lp.spec.effective_group(K))
            lp.metrics["unit"] = u.name
            lp.metrics["rel_output_error_unit"] = session.bank.t[u.name][bu]
            plan.add(lp)
    return plan


def _settings(session: "SearchSession", target: str) -> dict:
    c = session.config
    return {"search": True, "bits": None, "target": target, "estimator": session.sens.estimator, "units": c.units,
            "bitwidths": list(c.bitwidths), "groups": ["ch" if g is None else g for g in c.groups], "sens_windows": int(session.sens_w.shape[0]),
            "sens_seq_len": int(session.sens_w.shape[1]), "verify_windows": c.verify_windows,
            "confirm_windows": c.confirm_windows,
            "verify_data": c.verify_data or "calibration source, windows after the calibration ones",
            "real_text_margin": c.real_text_margin, "runtime": c.runtime,
            "probe_bits": list(c.probe_bits), "orderings": c.orderings, "fisher_draws": c.fisher_draws,
            "attention_hessians": c.quant.attention, "act_order": c.quant.act_order, "damp": c.quant.damp,
            "workdir": str(session.workdir)}


def _timings(session: "SearchSession", result: dict) -> dict:
    timings = dict(session.timings)
    for k in ("solve_s", "verify_s", "anchor_s", "confirm_s"):
        if k in result["timings"]:
            timings[k] = result["timings"][k]
    timings["total_s"] = time.perf_counter() - session.t_start
    return timings


def build_search_report(session: "SearchSession", result: dict, baselines: list[dict], frontier: list[dict]) -> dict:
    """The search's JSON report for one target's ``result`` (from :meth:`SearchSession.run`)."""
    q = session.config.quant
    final = result["final"]
    alloc = {u.name: session.bank.choice(u, final["allocation"][u.name]) for u in session.units}
    plan = _plan(session, alloc)
    report = build_report(session.model, session.path, plan, QuantSpec(max(session.quant_bits), q.group_size,
                                                                       q.symmetric),
                          method=q.method, calib=q.calib or GENERATED, calib_samples=q.calib_samples,
                          seq_len=q.seq_len, clip=q.clip, seed=q.seed, device=q.device)
    report["settings"].update(_settings(session, result["target"]["kind"]))
    total = session.storage_bits(alloc)
    other = other_params(session.model, {m for u in session.units for m in u.members})
    n_other = sum(n for n, _ in other.values())
    n = session.n_params
    sens = session.sens
    report.update({
        "target": result["target"],
        "verified": result["accepted"] is not None,
        "bits_per_param": total / n,
        "bits_per_param_model": (total + sum(k * bb for k, bb in other.values())) / (n + n_other),
        "bits_per_param_quantized_only": plan.bits_per_param() if len(plan) else None,
        "n_params_allocated": n,
        "n_params_kept_16bit": sum(u.n_params for u in session.units if alloc[u.name].keep),
        "predicted": final["predicted"],
        "measured": final["measured"],
        "confirmed": final.get("confirmation"),
        "confirmation": result.get("confirmation"),
        "on_policy": final.get("on_policy"),
        "verification": result.get("verification"),
        "allocation": {name: str(c) for name, c in alloc.items()},
        "bits_histogram": {str(b): sum(u.n_params for u in session.units if alloc[u.name].bits == b) / n
                           for b in session.choices},
        "choice_histogram": _choice_histogram(session, alloc),
        "choices": _choice_summary(session),
        "rounds": result["rounds"],
        "anchor": result["anchor"],
        "ear_map": session.emap.to_dict(),
        "sensitivity": {"estimator": sens.estimator, "seconds": sens.seconds, "forward_calls": sens.forward_calls,
                        "details": sens.details, "uniform_check": session.uniform_sens,
                        "kl": {u: {str(b): v for b, v in d.items()} for u, d in sens.kl.items()}},
        "baselines": baselines,
        "frontier": frontier,
        "units": [{"name": u.name, "layer": u.layer, "kind": u.kind, "members": list(u.members),
                   "n_params": u.n_params, "K": u.K} for u in session.units],
        "runtime": _runtime(session, plan),
        "bank": {"total_bytes": session.bank.total_bytes,
                 "layer_bytes_max": max(session.bank.layer_bytes.values(), default=0),
                 "estimate_bytes": {"sure": session.bank_estimate[0], "most": session.bank_estimate[1]},
                 "workdir": str(session.workdir)},
        "timings": _timings(session, result),
    })
    return report


def _runtime(session: "SearchSession", plan: Plan) -> dict:
    """Which runtimes load the result: transformers always; vLLM per its rules (:func:`slq.runtime.export.vllm_check`).
    With ``config.runtime`` the candidates were restricted to what that runtime loads, so ``ready`` should hold;
    a False names the layers (e.g. a K that the packed shape cannot take)."""
    shapes = {n: tuple(m.weight.shape) for n, m in session.model.named_modules() if isinstance(m, nn.Linear)}
    check = vllm_check({lp.name: lp.spec for lp in plan}, shapes)
    return {"asked": session.config.runtime, "ready_for": ["transformers"] + (["vllm"] if check.loads else []),
            "vllm": check.to_dict()}


def _choice_histogram(session: "SearchSession", alloc: dict) -> dict[str, float]:
    out: dict[Choice, float] = {}
    for u in session.units:
        out[alloc[u.name]] = out.get(alloc[u.name], 0.0) + u.n_params / session.n_params
    return {str(c): v for c, v in sorted(out.items(), key=lambda kv: kv[0].sort_key())}


def _choice_summary(session: "SearchSession") -> dict:
    """Which choices each unit had after pruning, and what was pruned (and by what)."""
    bank = session.bank
    return {"groups": ["ch" if g is None else g for g in session.config.groups],
            "per_unit": {u.name: [str(c) for c in session.unit_choices(u)] for u in session.units},
            "pruned": {name: why for name, why in bank.pruned.items()},
            "n_pruned": sum(len(v) for v in bank.pruned.values()),
            "n_choices": sum(len(session.unit_choices(u)) for u in session.units)}


def _kinds(report: dict) -> list[str]:
    kinds = []
    for u in report["units"]:
        if u["kind"] not in kinds:
            kinds.append(u["kind"])
    return sorted(kinds, key=lambda k: (KIND_ORDER.index(k) if k in KIND_ORDER else len(KIND_ORDER), k))


def heatmap_png(report: dict) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    kinds = _kinds(report)
    layers = sorted({u["layer"] for u in report["units"]})
    grid = np.full((len(kinds), len(layers)), np.nan)
    labels = {}
    for u in report["units"]:
        c = Choice.parse(report["allocation"][u["name"]])
        i, j = kinds.index(u["kind"]), layers.index(u["layer"])
        grid[i, j] = c.bits
        labels[i, j] = c.label if c.keep else f"{c.bits}\n{'ch' if c.group is None else c.group}"
    fig, ax = plt.subplots(figsize=(max(5.0, 0.28 * len(layers) + 2), 0.5 * len(kinds) + 1.6))
    im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=2, vmax=max(8, np.nanmax(grid)))
    ax.set_yticks(range(len(kinds)), kinds)
    ax.set_xticks(range(len(layers)), [str(x) for x in layers], fontsize=7)
    ax.set_xlabel("decoder layer")
    for i in range(len(kinds)):
        for j in range(len(layers)):
            if not np.isnan(grid[i, j]):
                ax.text(j, i, labels[i, j], ha="center", va="center", fontsize=5,
                        color="white" if grid[i, j] < 6 else "black")
    fig.colorbar(im, ax=ax, label="bits (16 = kept); label: bits / group size")
    ax.set_title(f"allocation: {report['bits_per_param']:.3f} bits/param ({report['target']['kind']})", fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return buf.getvalue()


def frontier_png(report: dict) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    base = sorted(report.get("baselines", []), key=lambda r: r["bits_per_param"])
    if base:
        x = [r["bits_per_param"] for r in base]
        ax1.errorbar(x, [r["measured"]["ear"]["mean"] for r in base],
                     yerr=[[r["measured"]["ear"]["mean"] - r["measured"]["ear"]["ci95"][0] for r in base],
                           [r["measured"]["ear"]["ci95"][1] - r["measured"]["ear"]["mean"] for r in base]],
                     marker="s", capsize=3, label="uniform (measured)")
        ax2.plot(x, [r["measured"]["kl"]["mean"] for r in base], marker="s", label="uniform (measured)")
    fr = report.get("frontier", [])
    groups = report.get("settings", {}).get("groups") or []
    name = f"SLQ predicted frontier (groups {'/'.join(map(str, groups))})" if len(groups) > 1 else \
        "SLQ predicted frontier"
    if fr:
        ax1.plot([r["bits_per_param"] for r in fr], [r["ear"] for r in fr], ls=":", color="gray", label=name)
        ax2.plot([r["bits_per_param"] for r in fr], [r["kl"] for r in fr], ls=":", color="gray", label=name)
    fr1 = report.get("frontier_one_group", [])
    if fr1:
        ax1.plot([r["bits_per_param"] for r in fr1], [r["ear"] for r in fr1], ls="--", color="C2",
                 label="predicted frontier, one group size")
        ax2.plot([r["bits_per_param"] for r in fr1], [r["kl"] for r in fr1], ls="--", color="C2",
                 label="predicted frontier, one group size")
    for r in report.get("rounds", []):
        m = r["measured"]
        style = dict(marker="*", ms=12, color="C3" if r.get("accepted") else "C1")
        ax1.errorbar([r["bits_per_param"]], [m["ear"]["mean"]],
                     yerr=[[m["ear"]["mean"] - m["ear"]["ci95"][0]], [m["ear"]["ci95"][1] - m["ear"]["mean"]]],
                     capsize=3, **style, label=f"SLQ round {r['round']} (measured)")
        ax2.plot([r["bits_per_param"]], [m["kl"]["mean"]], ls="", **style, label=f"SLQ round {r['round']}")
    t = report["target"]
    if t.get("ear"):
        ax1.axhline(t["ear"], color="gray", lw=1, ls="--", label=f"target EAR {t['ear']}")
    ax1.set_xlabel("bits per parameter (scales and zeros included)")
    ax1.set_ylabel("EAR, held-out windows (95% CI)")
    ax2.set_xlabel("bits per parameter")
    ax2.set_ylabel("KL(reference || candidate) per token")
    ax2.set_yscale("log")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return buf.getvalue()


def markdown(report: dict) -> str:
    t = report["target"]
    m = report["measured"]
    p = report["predicted"]
    goal = {"dl": f"distribution-lossless: EAR lower bound >= {t.get('ear')}",
            "tl": f"task-lossless: recovery >= {t.get('recovery')} (paired test, tolerance {t.get('tolerance')})",
            "bits": f"least predicted KL at <= {t.get('bits')} bits/param"}[t["kind"]]
    lines = [
        "# slq bit search report", "",
        f"- model: `{report['model']}`",
        f"- target: {goal} — **{'verified' if report['verified'] else 'NOT verified'}**",
        f"- bits/param: **{report['bits_per_param']:.4f}** over the allocated linears (scales and zeros included; "
        f"{report['n_params_kept_16bit']:,} of {report['n_params_allocated']:,} parameters kept in 16-bit), "
        f"{report['bits_per_param_model']:.4f} over the whole model",
        f"- estimator: {report['sensitivity']['estimator']} ({report['sensitivity']['seconds']:.1f} s, "
        f"{report['sensitivity']['forward_calls']} passes)",
        f"- predicted: EAR {p['ear']:.5f}, KL {p['kl']:.3e}",
        f"- measured on {m['n_tokens']} held-out tokens: EAR {m['ear']['mean']:.5f} "
        f"[{m['ear']['ci95'][0]:.5f}, {m['ear']['ci95'][1]:.5f}], top-10-renormalized EAR "
        f"{m['ear_top10']['mean']:.5f} (peers' variant), KL {m['kl']['mean']:.3e}, top-1 {m['top1']:.4f}, "
        f"PPL ratio {m['ppl_ratio']:.4f}", "",
        "## Rounds", "",
        "| round | KL budget | predicted KL | predicted EAR | bits/param | measured EAR [95% CI] | measured KL | accepted |",
        "|---:|---:|---:|---:|---:|---|---:|---|",
    ]
    for r in report["rounds"]:
        mm = r["measured"]
        kb = "-" if r["kl_budget"] is None else f"{r['kl_budget']:.3e}"
        lines.append(f"| {r['round']} | {kb} | {r['predicted']['kl']:.3e} | {r['predicted']['ear']:.5f} | "
                     f"{r['bits_per_param']:.4f} | {mm['ear']['mean']:.5f} [{mm['ear']['ci95'][0]:.5f}, "
                     f"{mm['ear']['ci95'][1]:.5f}] | {mm['kl']['mean']:.3e} | {'yes' if r['accepted'] else 'no'} |")
    conf = report.get("confirmation")
    if conf and conf.get("tries"):
        lines += ["", f"Second held-out sample ({conf['windows']} windows after the verification ones; a round is "
                      "accepted only when its lower bound passes there too):", ""]
        for c in conf["tries"]:
            e = c["measured"]["ear"]
            lines.append(f"- round {c['round']} ({c['bits_per_param']:.4f} b/p): EAR {e['mean']:.5f} "
                         f"[{e['ci95'][0]:.5f}, {e['ci95'][1]:.5f}], {'passed' if c['passed'] else 'failed'}")
    elif conf and conf.get("note"):
        lines += ["", f"Confirmation: {conf['note']}."]
    ver = report.get("verification") or {}
    if ver.get("on_policy_tries"):
        lines += ["", f"On-policy check ({ver['on_policy_windows']} held-out windows of the calibration source; "
                      f"the verification windows above are real text, {ver['real_text']}):", ""]
        for c in ver["on_policy_tries"]:
            e = c["measured"]["ear"]
            lines.append(f"- round {c['round']} ({c['bits_per_param']:.4f} b/p): EAR {e['mean']:.5f} "
                         f"[{e['ci95'][0]:.5f}, {e['ci95'][1]:.5f}], {'passed' if c['passed'] else 'failed'}")
    elif ver.get("margin"):
        lines += ["", f"No real text verified this run: the lower bound had to reach {ver['threshold']:.4f} "
                      f"(target + a real-text margin of {ver['margin']:g})."]
    if report.get("anchor"):
        a = report["anchor"]
        lines += ["", f"TL anchor (uniform 4-bit): KL {a['kl']:.3e}, recovery {a['recovery']:.4f}, "
                      f"alpha {a['alpha']:.3g}, KL budget {a['kl_budget']:.3e}"]
    if report.get("baselines"):
        lines += ["", "## Uniform baselines (same held-out windows)", "",
                  "| bits | bits/param | EAR [95% CI] | KL | predicted KL |", "|---:|---:|---|---:|---:|"]
        for r in report["baselines"]:
            mm = r["measured"]
            lines.append(f"| {r['bits']} | {r['bits_per_param']:.4f} | {mm['ear']['mean']:.5f} "
                         f"[{mm['ear']['ci95'][0]:.5f}, {mm['ear']['ci95'][1]:.5f}] | {mm['kl']['mean']:.3e} | "
                         f"{r['predicted']['kl']:.3e} |")
    hist = report["bits_histogram"]
    lines += ["", "## Allocation", "",
              "share of parameters per bitwidth: " + ", ".join(f"{b}: {v:.1%}" for b, v in hist.items() if v), "",
              "per choice: " + ", ".join(f"{c}: {v:.1%}" for c, v in report.get("choice_histogram", {}).items()), "",
              "![allocation](allocation.png)", "", "![frontier](frontier.png)", "",
              "| unit | choice |", "|---|---:|"]
    lines += [f"| {u} | {b} |" for u, b in report["allocation"].items()]
    ch = report.get("choices") or {}
    if ch.get("n_pruned"):
        lines += ["", f"## Pruned choices ({ch['n_pruned']}; dominated on RTN's relative output error at no "
                      "fewer storage bits, so GPTQ never ran them)", "",
                  "| unit | pruned | dominated by | RTN t | its RTN t |", "|---|---|---|---:|---:|"]
        for unit, why in ch["pruned"].items():
            lines += [f"| {unit} | {lbl} | {w['by']} | {w['rtn_t']:.3e} | {w['by_rtn_t']:.3e} |"
                      for lbl, w in why.items()]
    tm = report["timings"]
    lines += ["", "timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in tm.items())]
    return "\n".join(lines) + "\n"


def write_reports(report: dict, plots: bool = True) -> dict[str, bytes]:
    """File name -> contents, written by the caller inside its atomic checkpoint directory."""
    out = {"slq_report.md": markdown(report).encode()}
    if plots:
        out["allocation.png"] = heatmap_png(report)
        out["frontier.png"] = frontier_png(report)
    return out
