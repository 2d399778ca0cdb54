"""The SLQ bit search: per-unit bitwidths chosen by an exact knapsack from measured sensitivities, then
assembled from the bank and *measured* on held-out windows.

A :class:`SearchSession` prepares, once, everything a measurement needs, in named steps:

1. open the reference model and build its allocation units;
2. sample the windows: calibration (the bank and the sensitivities), verification, and a second held-out
   sample (confirmation). They never overlap: text sources use the windows after the calibration ones (then
   after the verification ones), ``generated`` data one sampling pass whose sequence ``i`` depends only on
   ``(seed, i)``, and another ``verify_data`` source (real text) is held out by construction; with it, the
   calibration source's own held-out windows are kept too (``policy_w``), so that DL verifies on both;
3. build (or resume) the bank: every unit quantized once at every candidate bitwidth (with ``head``, the output
   head is one more unit, at 8 bits or kept at 16; uniform assemblies keep it at 16);
4. record the reference's logits on the verification windows, and prepare the prober on the sensitivity
   windows (the first ``sens_windows`` calibration windows) with uniform assemblies measured for the
   KL -> EAR map;
5. estimate the sensitivities (:mod:`slq.search.estimators`), cached in the work directory, and fit the map.

Then a measurement costs one candidate pass: :meth:`SearchSession.measure` (verification windows),
:meth:`~SearchSession.confirm` (second sample), :meth:`~SearchSession.solve` (the exact allocation),
:meth:`~SearchSession.baselines`, :meth:`~SearchSession.frontier`. The targets (:mod:`slq.search.targets`) are
rounds of these, dispatched by :meth:`SearchSession.run` through :data:`~slq.search.targets.TARGETS`; the
report is built by :func:`slq.search.report.build_search_report`. Benchmarks run many targets on one session.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path

import torch

from .allocate import allocate
from .bank import BANK_VERSION, bank_size, build_bank
from .config import SearchConfig
from .estimators import ESTIMATORS, EstimatorInputs
from .prober import EarMap, Prober, Sensitivity
from .report import build_search_report, fid_summary, write_reports
from .targets import TARGETS, check_target
from ..measure.data import GENERATED, generated_windows, windows_from_source
from ..measure.fidelity import CachedLogits, compare_windows
from ..models.sources import cache_dir, check_finite, is_slq_checkpoint
from ..quant.units import HEAD_KIND, KEEP, KEEP_BITS, Choice, build_units, choice_storage_bits
from ..runtime.checkpoint import open_model, save_checkpoint
from ..util.dist import SINGLE, Group
from ..util.errors import ConfigError, SlqError
from ..util.preflight import check_bank_space


def _cache_key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


class SearchSession:
    """Everything the search needs, prepared once: reference, bank, prober, sensitivities, EAR map, and the
    reference's logits on the verification windows."""

    def __init__(self, model=None, config: SearchConfig | None = None, *, progress: bool = True,
                 trust_remote_code: bool = False, group: Group = SINGLE):
        self.config = config if config is not None else SearchConfig()
        self.progress, self.t_start, self.timings = progress, time.perf_counter(), {}
        self.group = group  # the bank's layers split over its ranks; the other steps run whole on each rank
        self.confirm_note = self.ref_confirm = self.ref_tasks = None
        self.policy_w = self.policy_note = self.ref_policy = None  # held-out calibration-source windows (verify_data)
        torch.manual_seed(self.seed)
        self._open(model, trust_remote_code)
        check_target(self.config, self.units)  # a budget it cannot reach fails before the (long) bank
        self._check_disk()  # so does a disk that cannot hold the bank
        self._timed("data_s", self._sample_windows)
        self._build_bank()
        self._timed("reference_s", self._record_reference)
        self._timed("prober_s", self._prepare_prober)
        self.estimate()

    # ---------------------------------------------------------------- settings the steps read

    @property
    def quant_bits(self) -> tuple[int, ...]:
        return self.config.quant_bits

    @property
    def allow16(self) -> bool:
        return self.config.allow16

    @property
    def choices(self) -> list[int]:
        """The candidate bitwidths of every unit: the quantized ones, and 16 ("keep") when allowed."""
        return list(self.quant_bits) + ([KEEP_BITS] if self.allow16 else [])

    def unit_choices(self, unit, *, one_group: bool = False) -> list[Choice]:
        """What the allocator may give ``unit``: the bank's choices (after pruning), and :data:`KEEP` when
        allowed. ``one_group``: only those at the config's own group size (the one-group search)."""
        own = self.bank.choice(unit, min(self.quant_bits)).group
        cs = [c for c in self.bank.choices(unit) if not one_group or c.group == own]
        return cs + ([KEEP] if self.allow16 or unit.kind == HEAD_KIND else [])  # the head may always stay 16

    @property
    def device(self) -> str:
        return self.config.quant.device

    @property
    def seed(self) -> int:
        return self.config.quant.seed

    # ---------------------------------------------------------------- the steps of __init__

    def _timed(self, key: str, step) -> None:
        t = time.perf_counter()
        step()
        self.timings[key] = time.perf_counter() - t

    def _open(self, model, trust_remote_code: bool) -> None:
        self.model, self.tok, self.path = open_model(model, device=self.device, trust_remote_code=trust_remote_code)
        if is_slq_checkpoint(self.path):
            raise SlqError(f"{self.path} is already a quantized checkpoint; search from the reference model instead")
        check_finite(self.model)
        self.units = build_units(self.model, self.config.units, head=self.config.head)
        self.n_params = sum(u.n_params for u in self.units)

    def _windows(self, source, n: int, *, skip: int = 0, seed: int) -> torch.Tensor:
        return windows_from_source(source, self.model, self.tok, n=n, seq_len=self.config.quant.seq_len, skip=skip,
                                   seed=seed, device=self.device, progress=self.progress)

    def _sample_windows(self) -> None:
        c, q = self.config, self.config.quant
        n_cal, n_ver, n_conf = q.calib_samples, c.verify_windows, c.confirm_windows
        if c.verify_data is None and (q.calib is None or q.calib == GENERATED):
            # one sampling pass: the first calib_samples are the calibration, the next ones held out
            both = generated_windows(self.model, self.tok, n_cal + n_ver + n_conf, q.seq_len, seed=q.seed,
                                     device=self.device, progress=self.progress)
            self.calib_w, self.verify_w = both[:n_cal], both[n_cal : n_cal + n_ver]
            self.confirm_w = both[n_cal + n_ver :] if n_conf else None
        elif c.verify_data is None:  # the windows after the calibration ones, then after the verification ones
            self.calib_w = self._windows(q.calib, n_cal, seed=q.seed)
            self.verify_w = self._windows(q.calib, n_ver, skip=n_cal, seed=q.seed)
            self.confirm_w = self._confirm_windows(q.calib, n_cal + n_ver, q.seed)
        else:  # another source: held out by construction (e.g. WikiText-2 test against C4 calibration)
            if q.calib is None or q.calib == GENERATED:  # one pass: the calibration, then its held-out windows
                both = generated_windows(self.model, self.tok, n_cal + n_ver, q.seq_len, seed=q.seed,
                                         device=self.device, progress=self.progress)
                self.calib_w, self.policy_w = both[:n_cal], both[n_cal:]
            else:
                self.calib_w = self._windows(q.calib, n_cal, seed=q.seed)
                try:
                    self.policy_w = self._windows(q.calib, n_ver, skip=n_cal, seed=q.seed)
                except SlqError as e:
                    self.policy_note = f"no held-out calibration-source windows: {e}"
            self.verify_w = self._windows(c.verify_data, n_ver, seed=q.seed + 1)
            self.confirm_w = self._confirm_windows(c.verify_data, n_ver, q.seed + 1)
        self.sens_w = self.calib_w[: c.sens_windows, : (c.sens_seq_len or q.seq_len)]

    def _confirm_windows(self, source, skip: int, seed: int):
        """The ``confirm_windows`` after ``skip`` windows, or None (with a note) when none are asked for or the
        source has too few."""
        if not self.config.confirm_windows:
            return None
        try:
            return self._windows(source, self.config.confirm_windows, skip=skip, seed=seed)
        except SlqError as e:
            self.confirm_note = f"no confirmation: {e}"
            return None

    def _default_workdir(self) -> Path:
        """Under the slq cache, keyed by everything the bank depends on."""
        c, q = self.config, self.config.quant
        key = _cache_key(str(self.path), q.method, q.group_size, q.symmetric, self.quant_bits, c.units, q.calib,
                         q.calib_samples, q.seq_len, q.seed, q.clip, q.attention, BANK_VERSION,
                         *((f"groups{list(c.groups)}",) if c.groups != (q.group_size,) else ()),
                         *(("act_order",) if q.act_order else ()), *(("head",) if c.head else ()), *((f"damp{q.damp:g}",) if q.damp != 0.01 else ()))
        return cache_dir() / "work" / key

    def _check_disk(self) -> None:
        """The work directory, and a refusal (one ConfigError naming it) when its filesystem cannot hold the
        bytes the bank certainly writes (:func:`slq.search.bank.bank_size`: every bitwidth at the config's own
        group size; the choices at other group sizes may be pruned)."""
        q = self.config.quant
        self.workdir = Path(self.config.workdir) if self.config.workdir is not None else self._default_workdir()
        self.bank_estimate = bank_size(self.units, self.quant_bits, self.config.groups, q.group_size, q.symmetric)
        check_bank_space(self.workdir / "bank", *self.bank_estimate)

    def _build_bank(self) -> None:
        q = self.config.quant
        self.bank = build_bank(self.model, self.units, self.calib_w, self.workdir / "bank", q,
                               bitwidths=self.quant_bits, groups=self.config.groups, progress=self.progress,
                               group=self.group)
        self.timings["bank_s"] = self.bank.timings["bank_s"]
        for k in ("hessian_gptq_s", "stats_pack_s", "save_s"):  # where the bank's time went (layers built now)
            if k in self.bank.timings:
                self.timings[f"bank_{k}"] = self.bank.timings[k]

    def _record_reference(self) -> None:
        self.ref_verify = CachedLogits().record(self.model, self.verify_w, device=self.device)

    def _prepare_prober(self) -> None:
        """The prober on the sensitivity windows, and the uniform assemblies that anchor the KL -> EAR map."""
        self.prober = Prober(self.model, self.bank, self.sens_w, device=self.device)
        self.uniform_sens = []
        for b in (x for x in self.config.map_bits if x in self.quant_bits):
            self.prober.set(self.uniform(b))
            kl, tv = self.prober.measure()
            self.uniform_sens.append({"bits": b, "kl": kl, "tv": tv})
        self.prober.reset()

    # ---------------------------------------------------------------- sensitivities

    def _sensitivity_path(self, estimator: str) -> Path:
        c = self.config
        fp = json.loads((self.bank.workdir / "bank.json").read_text())["fingerprint"]
        key = _cache_key(tuple(self.sens_w.shape), self.sens_w.sum().item(), c.probe_bits, c.orderings,
                         c.fisher_draws, c.quant.seed, fp, "choices")  # "choices": keyed by choice labels
        return self.workdir / f"sensitivity-{estimator}-{key}.json"

    def estimate(self, estimator: str | None = None) -> Sensitivity:
        """Run (or read back from the work directory) an estimator (default: the config's); it becomes the
        active one, and the KL -> EAR map is fitted again on the uniform points and its probes."""
        t = time.perf_counter()
        if estimator is not None:
            self.config = self.config.with_(estimator=estimator)  # validates the name
        name = self.config.estimator
        path = self._sensitivity_path(name)
        if path.exists():
            sens = Sensitivity.from_dict(json.loads(path.read_text()))
        else:
            inputs = EstimatorInputs(self.model, self.bank, self.prober, self.sens_w, self.device, self.progress)
            sens = ESTIMATORS[name](inputs, self.config)
            if self.group.writes:  # every rank computes the same sensitivities; rank 0 keeps them
                tmp = path.with_suffix(".tmp")
                tmp.write_text(json.dumps(sens.to_dict()))
                tmp.replace(path)
        self.bank.restore(self.model)
        self.prober.reset()
        self.sens = sens
        for p in self.uniform_sens:
            a = self.uniform(p["bits"])
            p["predicted_kl"] = math.fsum(sens.kl[u.name][a[u.name]] for u in self.units)
        self.emap = EarMap().fit([(p["kl"], p["tv"]) for p in self.uniform_sens]
                                 + [(p["kl"], p["tv"]) for p in sens.probes])
        self.timings["sensitivity_s"] = time.perf_counter() - t + self.timings.get("prober_s", 0.0)
        return sens

    # ---------------------------------------------------------------- allocations

    def solve(self, *, budget_bpp=None, max_kl=None, one_group: bool = False):
        """The exact allocation: least predicted KL within ``budget_bpp`` bits per parameter, or fewest bits
        with predicted KL <= ``max_kl``; each unit takes one of :meth:`unit_choices` (a flat list of (cost,
        exact size) per unit). Returns (allocation unit -> :class:`Choice`, solver result)."""
        options = [self.unit_choices(u, one_group=one_group) for u in self.units]
        costs = [[self.sens.kl[u.name][c] for c in cs] for u, cs in zip(self.units, options)]
        sizes = [[self._unit_bits(u, c) for c in cs] for u, cs in zip(self.units, options)]
        if budget_bpp is not None:
            sol = allocate(costs, sizes, budget=int(math.floor(budget_bpp * self.n_params)), n_params=self.n_params)
        else:
            sol = allocate(costs, sizes, max_loss=max_kl)
        return {u.name: cs[j] for u, cs, j in zip(self.units, options, sol.choice)}, sol

    def _unit_bits(self, unit, value) -> int:
        return choice_storage_bits(unit, self.bank.choice(unit, value), self.bank.symmetric)

    def uniform(self, bits: int) -> dict[str, Choice]:
        """Every unit at ``bits``, at the config's own group size; the head unit, which has no such choice below 8
        bits, stays at 16 (as a uniform quantization keeps it)."""
        out = {u.name: self.bank.choice(u, bits) for u in self.units}
        for u in self.units:
            if u.kind == HEAD_KIND and out[u.name] not in self.bank.t[u.name]:
                out[u.name] = KEEP
        return out

    def storage_bits(self, alloc: dict) -> int:
        """Total storage bits of the allocatable linears (scales and zeros included; 16-bit units at 16)."""
        return sum(self._unit_bits(u, alloc[u.name]) for u in self.units)

    def bits_per_param(self, alloc: dict) -> float:
        return self.storage_bits(alloc) / self.n_params

    def predicted(self, alloc: dict) -> dict:
        kl = math.fsum(self.sens.kl[u.name][self.bank.choice(u, alloc[u.name])] for u in self.units)
        return {"kl": kl, "ear": self.emap.ear(kl)}

    # ---------------------------------------------------------------- measurements

    def measure(self, alloc):
        """The allocation assembled from the bank, compared with the reference on the verification windows."""
        self.bank.apply(self.model, alloc)
        return compare_windows(self.ref_verify, self.model, self.verify_w, device=self.device, progress=False,
                               seed=self.seed)

    def confirm(self, allocs: list[dict]) -> list:
        """Each allocation compared with the reference on the confirmation windows (the reference's logits on
        them are computed at the first call and kept, like the verification windows')."""
        if self.ref_confirm is None:
            self.bank.restore(self.model)
            self.ref_confirm = CachedLogits().record(self.model, self.confirm_w, device=self.device)
        out = []
        for alloc in allocs:
            self.bank.apply(self.model, alloc)
            out.append(compare_windows(self.ref_confirm, self.model, self.confirm_w, device=self.device,
                                       progress=False, seed=self.seed))
        return out

    def on_policy(self, alloc):
        """With ``verify_data`` (real text verifies), the allocation compared with the reference on held-out
        windows of the calibration source (the generated ones by default): the DL check covers both."""
        if self.ref_policy is None:
            self.bank.restore(self.model)
            self.ref_policy = CachedLogits().record(self.model, self.policy_w, device=self.device)
        self.bank.apply(self.model, alloc)
        return compare_windows(self.ref_policy, self.model, self.policy_w, device=self.device, progress=False,
                               seed=self.seed)

    def run(self, target: str | None = None, **settings) -> dict:
        """Rounds of allocate -> assemble -> measure for one target (default: the config's), with the config's
        target settings (``ear``, ``recovery``, ``bits``, ``tasks``, ``max_rounds``, ...) changed by
        ``settings``; returns {target, rounds, accepted, final, anchor, confirmation, timings}."""
        config = self.config.with_(**({"target": target} if target is not None else {}), **settings)
        check_target(config, self.units)
        return TARGETS[config.target](self, config)

    def baselines(self, bits_list) -> list[dict]:
        """Uniform assemblies measured on the verification windows (bitwidths not among the candidates skipped)."""
        rows = []
        for b in (x for x in bits_list if x in self.quant_bits):
            a = self.uniform(b)
            rows.append({"bits": b, "bits_per_param": self.bits_per_param(a), "measured": fid_summary(self.measure(a)),
                         "predicted": self.predicted(a)})
        return rows

    def frontier(self, step: float = 0.25, upto: float = 10.0, *, one_group: bool = False) -> list[dict]:
        """Predicted KL / EAR of the least-loss allocation at budgets ``step`` apart, up to ``upto`` b/p
        (``one_group``: choices at the config's own group size only)."""
        rows = []
        lo = min(self.bits_per_param({u.name: min(self.unit_choices(u, one_group=one_group),
                                                   key=lambda c: self._unit_bits(u, c)) for u in self.units}),
                 self.bits_per_param(self.uniform(min(self.quant_bits))))
        hi = min(self.bits_per_param(self.uniform(max(self.choices))), upto)
        b = math.ceil(lo / step) * step
        while b <= hi + 1e-9:
            a, _ = self.solve(budget_bpp=b, one_group=one_group)
            rows.append({"budget": b, "bits_per_param": self.bits_per_param(a), **self.predicted(a)})
            b += step
        return rows

    # ---------------------------------------------------------------- output

    def report(self, result: dict, baselines: list[dict], frontier: list[dict]) -> dict:
        return build_search_report(self, result, baselines, frontier)

    def save(self, report: dict, out, *, force=False, plots=True) -> None:
        """The allocation as a compressed-tensors checkpoint (16-bit units as fp16) with its reports."""
        t = time.perf_counter()
        alloc = {u.name: self.bank.choice(u, report["allocation"][u.name]) for u in self.units}  # labels -> choices
        self.bank.apply(self.model, alloc)
        kept = {m for u in self.units if alloc[u.name].keep for m in u.members}
        self.model.cpu()
        extra = write_reports(report, plots=plots)
        save_checkpoint(out, self.model, self.tok, self.bank.qweights(alloc), report, force=force, half_modules=kept,
                        extra_files=extra)
        self.model.to(self.device)
        report["timings"]["save_s"] = time.perf_counter() - t


def search(model: str | None = None, *, config: SearchConfig | None = None, out: str | Path | None = None,
           force: bool = False, plots: bool = True, progress: bool = True, trust_remote_code: bool = False,
           group: Group = SINGLE, **settings) -> dict:
    """Run the search and (with ``out``) write the mixed-bitwidth checkpoint and its reports.

    ``config`` holds the settings; keyword ``settings`` (any field of :class:`SearchConfig`, and of
    :class:`~slq.quant.config.QuantConfig` except ``bits``, flat) change them, so ``search(m, target="bits",
    bits=4.5, group_size=64)`` is ``search(m, config=SearchConfig(target="bits", bits=4.5,
    quant=QuantConfig(group_size=64, calib_samples=32)))``. Returns the report (also ``slq_report.json`` in
    ``out``). ``group``: the bank's layers split over its ranks (every rank returns the report; rank 0 writes).
    """
    config = SearchConfig.from_settings(config, **settings)
    if out is not None and Path(out).exists() and not force:
        raise ConfigError("force", f"output directory {out} exists; set {{field}} to replace it")
    s = SearchSession(model, config, progress=progress and group.writes, trust_remote_code=trust_remote_code,
                      group=group)
    result = s.run()
    t = time.perf_counter()
    base = s.baselines(config.baselines if config.baselines is not None else tuple(x for x in s.quant_bits if x >= 3))
    result["timings"]["verify_s"] += time.perf_counter() - t
    report = s.report(result, base, s.frontier() if config.frontier else [])
    if config.frontier and len(set(config.groups)) > 1:  # the one-group search beside the new choice set
        report["frontier_one_group"] = s.frontier(one_group=True)
    if out is not None and group.writes:
        s.save(report, out, force=force, plots=plots)
    group.barrier()
    return report
