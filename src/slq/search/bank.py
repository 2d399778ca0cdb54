"""The bank: every allocation unit quantized once at every candidate bitwidth.

Trying an allocation during the bit search is then a tensor copy, not a re-quantization.

How it is built (``build_bank``):

- The reference model runs layer by layer on the calibration windows. For each decoder layer the
  inputs of its linears are caught and Hessians ``H = 2/n X^T X`` accumulated (linears sharing an
  input share one; with ``attention`` a key or value projection gets one attention-weighted Hessian
  per key/value head instead, see :mod:`slq.calib`). The inputs come from the *unquantized* layers
  before it, so every unit's entry is independent of how the other units end up quantized: any
  allocation can be assembled from the same bank (unlike sequential GPTQ, whose layer l depends on the bits chosen upstream).
- GPTQ: one Cholesky factor per Hessian; all linears sharing it and all candidate bitwidths are
  solved in one pass over the columns (:func:`slq.gptq.gptq_quantize_many`), which gives each
  bitwidth exactly the codes of a separate run. RTN on request (Hessians are still taken, for the
  error statistics below).
- Per unit and bitwidth it records the relative output error
  ``t(b) = sum_members tr(dW H dW^T) / sum_members tr(W H W^T)``, the quantity the linearity
  estimator scales.

Storage (``workdir``): one safetensors file per decoder layer holding the packed codes, scales
and zero points of every member at every bitwidth (the checkpoint's own packing, so b/8 bytes
per weight), plus ``bank.json`` with the settings fingerprint and the error statistics. Each
layer file is written to a temporary name and renamed, and ``bank.json`` is rewritten after each
layer: an interrupted build resumes at the first missing layer, and the same inputs give
bit-identical files. A work directory built with other settings is refused, not mixed.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..quant.calib import (capture_layer0_inputs, collect_hessians, decoder_layers, eager_attention, layer_linears,
                    run_layer)
from ..util.errors import SlqError
from ..quant.gptq import factor, gptq_quantize_many, join_rows, output_error, row_pieces
from ..quant.grid import QuantizedWeight, quantize_rtn
from ..util.progress import progress_bar
from ..quant.spec import QuantSpec, resolve_group_size
from ..quant.units import KEEP_BITS, Unit

BANK_VERSION = 3  # 2: two-level GPTQ updates (codes can differ from version 1 at rounding ties); 3: attention-aware key/value Hessians
META = "bank.json"


def _layer_file(workdir: Path, i: int) -> Path:
    return workdir / f"layer_{i:04d}.safetensors"


def fingerprint(model: nn.Module, windows: torch.Tensor | None, settings: dict) -> str:
    """Hash of what the bank depends on: settings, calibration tokens and the weights themselves."""
    h = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    if windows is not None:
        h.update(windows.to(torch.int64).cpu().numpy().tobytes())
    for name, p in model.named_parameters():
        # Integer sums of the fp32 bit patterns: exact and order-free, so the hash is the same for any
        # thread count or device (a float sum is not: its rounding depends on the reduction order).
        x = p.detach().float().flatten().view(torch.int32).to(torch.int64)
        stats = torch.stack([x.sum(), x[:: max(1, x.numel() // 997)].sum(), (x * x.remainder(7)).sum()])
        h.update(name.encode())
        h.update(stats.cpu().numpy().tobytes())
    return h.hexdigest()[:32]


@dataclass
class Bank:
    """Quantized weights of every unit at every bitwidth, plus the original weights.

    ``t[unit][bits]``: relative output error of the unit at that bitwidth (0 at 16).
    ``weight_error[unit][bits]``: relative weight error ``||dW||^2 / ||W||^2``.
    """

    workdir: Path
    units: list[Unit]
    bitwidths: tuple[int, ...]
    group_size: int | None
    symmetric: bool
    method: str
    t: dict[str, dict[int, float]]
    weight_error: dict[str, dict[int, float]]
    original: dict[str, torch.Tensor]  # member -> fp32 weight of the reference
    timings: dict[str, float] = field(default_factory=dict)
    device: str = "cpu"  # where entries are unpacked and dequantized (the model's device)
    _tensors: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict, repr=False)

    @property
    def unit_map(self) -> dict[str, Unit]:
        return {u.name: u for u in self.units}

    def spec(self, unit: Unit, bits: int) -> QuantSpec:
        return QuantSpec(bits, resolve_group_size(unit.K, self.group_size)[0], self.symmetric)

    def _layer(self, i: int) -> dict[str, torch.Tensor]:
        if i not in self._tensors:
            self._tensors[i] = load_file(str(_layer_file(self.workdir, i)))
        return self._tensors[i]

    def qweight(self, unit: Unit, member: str, bits: int) -> QuantizedWeight:
        from ..runtime.checkpoint import unpack_weight

        if bits not in self.bitwidths:
            raise SlqError(f"bitwidth {bits} is not in the bank ({self.bitwidths})")
        t = self._layer(unit.layer)
        prefix = f"{member}.b{bits}."
        parts = {k[len(prefix):]: v.to(self.device, non_blocking=True) for k, v in t.items() if k.startswith(prefix)}
        return unpack_weight(parts, self.spec(unit, bits), f"bank {member} @ {bits} bits")

    def dequantized(self, unit: Unit, member: str, bits: int) -> torch.Tensor:
        """The weight a unit gets at ``bits``; 16 is the reference weight rounded to fp16 (what the
        checkpoint stores for a unit kept in 16-bit, so what is measured is what is shipped)."""
        if bits == KEEP_BITS:
            return self.original[member].to(self.device).half().float()
        return self.qweight(unit, member, bits).dequantize()

    def reference_weight(self, member: str) -> torch.Tensor:
        return self.original[member]

    def _state(self, model: nn.Module) -> dict:
        # what each unit of `model` currently holds ("ref" = exact reference weights), so that applying an
        # allocation only copies the units that change; valid while the model's weights change through the bank
        key = id(model)
        if getattr(self, "_states", None) is None:
            self._states = {}
        if key not in self._states or self._states[key][0] is not model:
            self._states[key] = (model, {})
        return self._states[key][1]

    def apply(self, model: nn.Module, allocation: dict[str, int]) -> None:
        """Set the model's weights to the allocation (unit -> bits; 16 = the reference rounded to fp16)."""
        mods = dict(model.named_modules())
        umap = self.unit_map
        state = self._state(model)
        for name, bits in allocation.items():
            if state.get(name) == bits:
                continue
            u = umap[name]
            for m in u.members:
                w = mods[m].weight
                w.data.copy_(self.dequantized(u, m, bits).to(w.device, w.dtype))
            state[name] = bits

    def restore(self, model: nn.Module, units: list[str] | None = None) -> None:
        """Put the exact reference weights back (all units, or the named ones)."""
        mods = dict(model.named_modules())
        umap = self.unit_map
        state = self._state(model)
        for name in list(umap) if units is None else units:
            if state.get(name) == "ref":
                continue
            for m in umap[name].members:
                w = mods[m].weight
                w.data.copy_(self.original[m].to(w.device, w.dtype))
            state[name] = "ref"

    def qweights(self, allocation: dict[str, int]) -> dict[str, QuantizedWeight]:
        """Member -> codes for every quantized unit of the allocation (for the checkpoint)."""
        out = {}
        for u in self.units:
            b = allocation[u.name]
            if b != KEEP_BITS:
                for m in u.members:
                    q = self.qweight(u, m, b)
                    out[m] = QuantizedWeight(q.codes.cpu(), q.scale.cpu(), q.zero.cpu(), q.spec)
        return out


def _settings(units, bitwidths, group_size, symmetric, method, clip, damp, attention) -> dict:
    return {"version": BANK_VERSION, "units": [[u.name, list(u.members)] for u in units],
            "bitwidths": list(bitwidths), "group_size": group_size, "symmetric": symmetric,
            "method": method, "clip": clip, "damp": damp, "attention_hessians": attention}


@torch.no_grad()
def build_bank(
    model: nn.Module,
    units: list[Unit],
    windows: torch.Tensor | None,
    workdir: str | os.PathLike,
    *,
    bitwidths: tuple[int, ...] = (2, 3, 4, 5, 6, 7, 8),
    group_size: int | None = 128,
    symmetric: bool = False,
    method: str = "gptq",
    clip: bool = True,
    damp: float = 0.01,
    attention: bool = True,
    act_order: bool = True,
    batch_size: int = 8,
    device: str = "cpu",
    progress: bool = True,
) -> Bank:
    """Quantize every unit at every bitwidth (resuming from ``workdir`` when it holds a partial bank).

    ``model`` is the reference; its weights are left untouched. ``bitwidths`` are the quantized
    candidates (2..8); "keep in 16-bit" needs no bank entry. ``attention``: key and value projections get
    attention-aware Hessians (one per key/value head, :mod:`slq.calib`), for GPTQ and for the error
    statistics.
    """
    bitwidths = tuple(sorted(set(int(b) for b in bitwidths)))
    for b in bitwidths:
        QuantSpec(b, group_size, symmetric)  # validates
    if method not in ("gptq", "rtn"):
        raise SlqError(f"unknown method {method!r}; choose gptq or rtn")
    if windows is None or len(windows) == 0:
        raise SlqError("the bank needs calibration windows (Hessians for GPTQ and the error statistics)")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    settings = _settings(units, bitwidths, group_size, symmetric, method, clip, damp, attention)
    act_order = bool(act_order) and method == "gptq"
    if act_order:  # only when on, so the fingerprints of banks built before the option stay valid
        settings["act_order"] = True
    fp = fingerprint(model, windows, settings)
    meta_path = workdir / META
    meta = {"fingerprint": fp, "settings": settings, "layers": {}}
    if meta_path.exists():
        old = json.loads(meta_path.read_text())
        if old.get("fingerprint") != fp:
            raise SlqError(f"work directory {workdir} holds a bank built with other settings, data or model; "
                           "use another --workdir or delete it")
        meta = old

    layers = decoder_layers(model)
    by_layer: dict[int, list[Unit]] = {}
    for u in units:
        by_layer.setdefault(u.layer, []).append(u)
    prefix = next(n for n, m in model.named_modules() if m is layers)
    original = {m: dict(model.named_modules())[m].weight.detach().float().cpu().clone()
                for u in units for m in u.members}

    t0 = time.perf_counter()
    todo = [i for i in sorted(by_layer) if str(i) not in meta["layers"] or not _layer_file(workdir, i).exists()]
    parts: dict[str, float] = {}
    with eager_attention(model, attention and bool(todo)), progress_bar(progress) as bar:
        batches = capture_layer0_inputs(model, windows, batch_size, device) if todo else []
        task = bar.add_task(f"bank ({method.upper()}, {len(bitwidths)} bitwidths)", total=len(layers))
        for i, layer in enumerate(layers):
            if not todo or i > max(todo):
                bar.advance(task, len(layers) - i)
                break
            if i in todo and i in by_layer:
                meta["layers"][str(i)], lt = _bank_layer(layer, i, prefix, by_layer[i], batches, workdir, bitwidths,
                                                         group_size, symmetric, method, clip, damp, device,
                                                         attention, act_order)
                for k, v in lt.items():
                    parts[k] = parts.get(k, 0.0) + v
                tmp = meta_path.with_suffix(".json.tmp")
                tmp.write_text(json.dumps(meta, indent=1))
                os.replace(tmp, meta_path)
            if i + 1 < len(layers):
                batches = run_layer(layer, batches)
            bar.advance(task)

    t = {u.name: {int(b): v for b, v in meta["layers"][str(u.layer)][u.name]["t"].items()} for u in units}
    we = {u.name: {int(b): v for b, v in meta["layers"][str(u.layer)][u.name]["weight_error"].items()} for u in units}
    for u in units:
        t[u.name][KEEP_BITS] = 0.0
        we[u.name][KEEP_BITS] = 0.0
    return Bank(workdir, units, bitwidths, group_size, symmetric, method, t, we, original,
                timings={"bank_s": time.perf_counter() - t0, "layers_built": len(todo), **parts}, device=str(device))


def _bank_layer(layer, i, prefix, units, batches, workdir, bitwidths, group_size, symmetric, method, clip,
                damp, device, attention, act_order=False) -> dict:
    from ..runtime.checkpoint import pack_weight

    t_start = time.perf_counter()
    rel = layer_linears(layer)
    members = [m for u in units for m in u.members]
    relname = {m: m[len(f"{prefix}.{i}."):] for m in members}
    hessians = collect_hessians(layer, batches, [relname[m] for m in members], attention=attention)
    W = {m: rel[relname[m]].weight.detach().float() for m in members}
    for m, w in W.items():
        if not torch.isfinite(w).all():
            raise SlqError(f"weight {m}.weight contains NaN or Inf values")
    q: dict[tuple[str, int], QuantizedWeight] = {}
    K_of = {m: W[m].shape[1] for m in members}
    # Row pieces with their own Hessian (a key/value projection: one per key/value head when attention-aware);
    # pieces sharing a Hessian (q/k; gate/up) are stacked and solved in one pass at every bitwidth.
    pieces = row_pieces({m: hessians[relname[m]] for m in members}, {m: W[m].shape[0] for m in members})
    stacks: dict[int, list[tuple[str, int, int, object]]] = {}
    for pc in pieces:
        stacks.setdefault(id(pc[3]), []).append(pc)
    parts: dict[tuple[str, int], list[tuple[int, QuantizedWeight]]] = {}
    H_of: dict[tuple[str, int], torch.Tensor] = {}  # (member, first row) -> Hessian used for its errors
    for key, ps in stacks.items():
        acc = ps[0][3]
        G = resolve_group_size(K_of[ps[0][0]], group_size)[0]
        specs = [QuantSpec(b, G, symmetric) for b in bitwidths]
        Ws = torch.cat([W[m][r0:r1] for m, r0, r1, _ in ps])
        if method == "gptq":
            fac = factor(acc.H, damp)
            res = gptq_quantize_many(Ws.to(device), fac, specs, clip=clip, act_order=act_order)
            H = fac.H
        else:
            res = [quantize_rtn(Ws, s, clip=clip) for s in specs]
            H = acc.H
        for b, r in zip(bitwidths, res):
            row = 0
            for m, r0, r1, _ in ps:
                n = r1 - r0
                parts.setdefault((m, b), []).append(
                    (r0, QuantizedWeight(r.codes[row:row + n], r.scale[row:row + n], r.zero[row:row + n], r.spec)))
                row += n
        for m, r0, _, _ in ps:
            H_of[(m, r0)] = H
    for (m, b), lst in parts.items():
        q[(m, b)] = join_rows(lst)
    blocks_of = {m: [(r0, r1, H_of[(m, r0)]) for mm, r0, r1, _ in pieces if mm == m] for m in members}
    t_stats = time.perf_counter()
    # Error statistics and packing run where the layer runs (a GPU for large models); only the packed
    # tensors travel to the host for the file.
    tensors = {}
    stats = {}
    def err_of(m, W_hat):
        Wm = W[m].to(W_hat.device)
        return sum(output_error(Wm[r0:r1], W_hat[r0:r1], H) for r0, r1, H in blocks_of[m])

    for u in units:
        base = sum(err_of(m, torch.zeros_like(W[m])) for m in u.members)
        wnorm = sum(float(W[m].double().pow(2).sum()) for m in u.members)
        st = {"t": {}, "weight_error": {}}
        for b in bitwidths:
            err = werr = 0.0
            for m in u.members:
                Wm = W[m].to(q[(m, b)].codes.device)
                W_hat = q[(m, b)].dequantize()
                err += err_of(m, W_hat)
                werr += float((Wm.double() - W_hat.double()).pow(2).sum())
                for k, v in pack_weight(q[(m, b)]).items():
                    tensors[f"{m}.b{b}.{k}"] = v.cpu()
            st["t"][str(b)] = err / max(base, 1e-30)
            st["weight_error"][str(b)] = werr / max(wnorm, 1e-30)
        stats[u.name] = st
    t_save = time.perf_counter()
    path = _layer_file(workdir, i)
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"producer": "slq bank"})
    os.replace(tmp, path)
    return stats, {"hessian_gptq_s": t_stats - t_start, "stats_pack_s": t_save - t_stats,
                   "save_s": time.perf_counter() - t_save}
