"""The bank: every allocation unit quantized once at every candidate bitwidth.

Trying an allocation during the bit search is then a tensor copy, not a re-quantization.

How it is built (``build_bank``):

- The reference model runs layer by layer on the calibration windows. For each decoder layer the
  inputs of its linears are caught and Hessians ``H = 2/n X^T X`` accumulated (linears sharing an
  input share one; with ``attention`` a key or value projection gets one attention-weighted Hessian
  per key/value head instead, see :mod:`slq.quant.calib`). The inputs come from the *unquantized* layers
  before it, so every unit's entry is independent of how the other units end up quantized: any
  allocation can be assembled from the same bank (unlike sequential GPTQ, whose layer l depends on the bits chosen upstream).
- GPTQ: one Cholesky factor per Hessian; all linears sharing it and all candidate bitwidths are
  solved in one pass over the columns (:func:`slq.quant.gptq.gptq_quantize_many`), which gives each
  bitwidth exactly the codes of a separate run. RTN on request (Hessians are still taken, for the
  error statistics below).
- Per unit and bitwidth it records the relative output error
  ``t(b) = sum_members tr(dW H dW^T) / sum_members tr(W H W^T)``, the quantity the linearity
  estimator scales.

Storage (``workdir``): one safetensors file per decoder layer holding the packed codes, scales
and zero points of every member at every bitwidth (the checkpoint's own packing, so b/8 bytes
per weight), plus ``bank.json`` with the settings fingerprint and the error statistics. Each
layer file is written to a temporary name, fsync'ed and renamed, and ``bank.json`` (with each layer
file's size and sha256) is rewritten the same way after each layer: an interrupted build resumes at
the first layer whose file is missing or does not match its record, and the same inputs give
bit-identical files. A work directory built with other settings is refused, not mixed.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..quant.calib import (capture_layer0_inputs, collect_hessians, decoder_layers, eager_attention, layer_linears,
                           run_layer)
from ..quant.config import QuantConfig
from ..quant.grid import QuantizedWeight
from ..quant.solve import layer_weights, solve_layer
from ..quant.spec import QuantSpec, resolve_group_size
from ..quant.units import KEEP_BITS, Unit
from ..runtime.checkpoint import pack_weight, unpack_weight
from ..util.atomic import replace_file
from ..util.errors import SlqError
from ..util.jsonio import read_json
from ..util.progress import progress_bar

BANK_VERSION = 4  # 2: two-level GPTQ updates (codes can differ from version 1 at rounding ties); 3: attention-aware key/value Hessians; 4: the fingerprint hashes the weight bytes, bank.json records each layer file
META = "bank.json"


_HASH_CHUNK = 1 << 26


def _file_record(path: Path) -> dict:
    """Size and sha256 of a written layer file (what ``bank.json`` keeps to check a resumed layer)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return {"size": path.stat().st_size, "sha256": h.hexdigest()}


def _layer_complete(workdir: Path, i: int, meta: dict) -> bool:
    """Layer ``i``'s file is there, with the size and sha256 ``bank.json`` recorded when it was written."""
    rec = meta.get("files", {}).get(str(i))
    path = _layer_file(workdir, i)
    if rec is None or not path.is_file() or path.stat().st_size != rec.get("size"):
        return False
    return _file_record(path)["sha256"] == rec.get("sha256")


def _layer_file(workdir: Path, i: int) -> Path:
    return workdir / f"layer_{i:04d}.safetensors"


def fingerprint(model: nn.Module, windows: torch.Tensor | None, settings: dict) -> str:
    """sha256 of what the bank depends on: the settings, the calibration tokens and every parameter's
    name, dtype, shape and bytes. Any change to any weight (one bit, or two rows swapped) changes it;
    the bytes are exact, so it is the same for any device or thread count. The tensors are hashed
    from CPU copies of ``_HASH_CHUNK`` bytes at a time (no second copy of the model; sha256 runs at
    about 1-2 GB/s, so seconds for an 8B model)."""
    h = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    if windows is not None:
        h.update(windows.to(torch.int64).cpu().numpy().tobytes())
    for name, p in model.named_parameters():
        x = p.detach()
        h.update(f"{name}|{x.dtype}|{tuple(x.shape)}|".encode())
        flat = x.reshape(-1)
        step = max(1, _HASH_CHUNK // max(1, x.element_size()))
        for s in range(0, flat.numel(), step):
            h.update(flat[s:s + step].cpu().contiguous().view(torch.uint8).numpy())
    return h.hexdigest()[:32]


@dataclass
class Bank:
    """Quantized weights of every unit at every bitwidth, plus the original weights.

    ``t[unit][bits]``: relative output error of the unit at that bitwidth (0 at 16).
    """

    workdir: Path
    units: list[Unit]
    bitwidths: tuple[int, ...]
    group_size: int | None
    symmetric: bool
    method: str
    t: dict[str, dict[int, float]]
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
    config: QuantConfig,
    *,
    bitwidths: tuple[int, ...],
    progress: bool = True,
) -> Bank:
    """Quantize every unit at every bitwidth (resuming from ``workdir`` when it holds a partial bank).

    ``model`` is the reference; its weights are left untouched. ``config`` gives the grid (group size,
    symmetry), the method and GPTQ's options, the batch size and the device (its ``bits`` is unused).
    ``bitwidths`` are the quantized candidates (2..8); "keep in 16-bit" needs no bank entry. With
    ``config.attention`` key and value projections get attention-aware Hessians (one per key/value head,
    :mod:`slq.quant.calib`), for GPTQ and for the error statistics.
    """
    bitwidths = tuple(sorted(set(int(b) for b in bitwidths)))
    group_size, symmetric, method, attention = config.group_size, config.symmetric, config.method, config.attention
    for b in bitwidths:
        QuantSpec(b, group_size, symmetric)  # validates
    if windows is None or len(windows) == 0:
        raise SlqError("the bank needs calibration windows (Hessians for GPTQ and the error statistics)")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    settings = _settings(units, bitwidths, group_size, symmetric, method, config.clip, config.damp, attention)
    if config.act_order:  # only when on, so the fingerprints of banks built before the option stay valid
        settings["act_order"] = True
    fp = fingerprint(model, windows, settings)
    meta_path = workdir / META
    meta = {"fingerprint": fp, "settings": settings, "layers": {}}
    if meta_path.exists():
        old = read_json(meta_path, "the bank's record")
        if not isinstance(old, dict) or not isinstance(old.get("layers"), dict):
            raise SlqError(f"{meta_path} is not a bank record; use another --workdir or delete it")
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
    # a layer is resumed only if its file is complete (size and sha256 as recorded), else it is rebuilt
    todo = [i for i in sorted(by_layer) if str(i) not in meta["layers"] or not _layer_complete(workdir, i, meta)]
    parts: dict[str, float] = {}
    with eager_attention(model, attention and bool(todo)), progress_bar(progress) as bar:
        batches = capture_layer0_inputs(model, windows, config.batch_size, config.device) if todo else []
        task = bar.add_task(f"bank ({method.upper()}, {len(bitwidths)} bitwidths)", total=len(layers))
        for i, layer in enumerate(layers):
            if not todo or i > max(todo):
                bar.advance(task, len(layers) - i)
                break
            if i in todo and i in by_layer:
                built = _bank_layer(layer, i, by_layer[i], batches, workdir, config, bitwidths, prefix)
                meta["layers"][str(i)] = built.stats
                meta.setdefault("files", {})[str(i)] = _file_record(_layer_file(workdir, i))
                for k, v in built.timings.items():
                    parts[k] = parts.get(k, 0.0) + v
                tmp = meta_path.with_suffix(".json.tmp")
                tmp.write_text(json.dumps(meta, indent=1))
                replace_file(tmp, meta_path)
            if i + 1 < len(layers):
                batches = run_layer(layer, batches)
            bar.advance(task)

    t = {u.name: {int(b): v for b, v in meta["layers"][str(u.layer)][u.name]["t"].items()} for u in units}
    for u in units:
        t[u.name][KEEP_BITS] = 0.0
    return Bank(workdir, units, bitwidths, group_size, symmetric, method, t, original,
                timings={"bank_s": time.perf_counter() - t0, "layers_built": len(todo), **parts},
                device=str(config.device))


class LayerBank(NamedTuple):
    """What one decoder layer adds to the bank: its units' statistics as ``bank.json`` stores them
    (unit -> ``{"t": {bits: t(b)}}``) and where the time went."""

    stats: dict[str, dict[str, dict[str, float]]]
    timings: dict[str, float]


def _bank_layer(layer: nn.Module, i: int, units: list[Unit], batches: list, workdir: Path, config: QuantConfig,
                bitwidths: tuple[int, ...], prefix: str) -> LayerBank:
    """Quantize the units of decoder layer ``i`` at every bitwidth (:func:`slq.quant.solve.solve_layer`),
    write their packed entries to the layer's file and return their error statistics."""
    t_start = time.perf_counter()
    rel = layer_linears(layer)
    members = [m for u in units for m in u.members]
    relname = {m: m[len(f"{prefix}.{i}."):] for m in members}
    hessians = collect_hessians(layer, batches, [relname[m] for m in members], attention=config.attention)
    W = layer_weights({m: rel[relname[m]] for m in members})
    specs = {m: tuple(QuantSpec(b, resolve_group_size(W[m].shape[1], config.group_size)[0], config.symmetric)
                      for b in bitwidths) for m in members}
    solved = solve_layer(W, specs, config, {m: hessians[relname[m]] for m in members})
    t_stats = time.perf_counter()
    # Error statistics and packing run where the layer runs (a GPU for large models); only the packed
    # tensors travel to the host for the file.
    tensors = {}
    stats = {}
    for u in units:
        base = sum(solved[m].output_error(W[m], torch.zeros_like(W[m])) for m in u.members)
        t = {}
        for k, b in enumerate(bitwidths):
            err = 0.0
            for m in u.members:
                q = solved[m].qweights[k]
                err += solved[m].output_error(W[m], q.dequantize())
                for name, v in pack_weight(q).items():
                    tensors[f"{m}.b{b}.{name}"] = v.cpu()
            t[str(b)] = err / max(base, 1e-30)
        stats[u.name] = {"t": t}
    t_save = time.perf_counter()
    path = _layer_file(workdir, i)
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"producer": "slq bank"})
    replace_file(tmp, path)  # fsync'ed before the rename: a renamed layer file is a complete one
    return LayerBank(stats, {"hessian_gptq_s": t_stats - t_start, "stats_pack_s": t_save - t_stats,
                             "save_s": time.perf_counter() - t_save})
