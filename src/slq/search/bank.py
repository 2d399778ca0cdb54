"""The bank: every allocation unit quantized once at every candidate choice (bitwidth, group size).

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
- Choices (:class:`~slq.quant.units.Choice`): every candidate bitwidth at every requested group size
  (``groups``; default the config's one ``group_size``), resolved per unit K and deduplicated. The group
  sizes of one linear share its Hessian's one factor (:func:`slq.quant.solve.solve_layer`).
- Pruning (several group sizes only): before GPTQ runs, each choice is scored by RTN's relative output
  error ``t_rtn`` (below; cheap: no column loop). A choice is *dominated* when another choice of the unit
  stores no more bits and has no larger ``t_rtn`` (the allocator's own per-unit frontier rule,
  :func:`slq.search.allocate.prune_dominated`, on (storage bits, ``t_rtn``)); dominated choices are not
  solved, and ``bank.json`` records each with the choice that dominates it. The choices at the config's own
  group size are never pruned (uniform assemblies, probes and the TL anchor use them).
- Per unit and choice it records the relative output error
  ``t(b) = sum_members tr(dW H dW^T) / sum_members tr(W H W^T)``, the quantity the linearity
  estimator scales.

The head unit (kind ``"head"``, numbered ``L`` after the last decoder layer): its Hessian comes from the final
norm applied to the last reference layer's outputs (:func:`slq.quant.calib.head_hessian`), and it is solved,
scored and stored like a layer (``layer_{L}.safetensors``) at its choices (8-bit at each group size).

Storage (``workdir``): one safetensors file per decoder layer holding the packed codes, scales
and zero points of every member at every choice (``{member}.b{bits}.*`` with one group size, as before, so
existing banks resume; ``{member}.b{label}.*``, e.g. ``b8g64``, with several) (the checkpoint's own packing, so b/8 bytes
per weight), plus ``bank.json`` with the settings fingerprint and the error statistics. Each
layer file is written to a temporary name, fsync'ed and renamed, and ``bank.json`` (with each layer
file's size and sha256) is rewritten the same way after each layer: an interrupted build resumes at
the first layer whose file is missing or does not match its record, and the same inputs give
bit-identical files. A work directory built with other settings is refused, not mixed. ``bank.json`` also
keeps ``total_bytes``, the sum of the layer files' sizes (each in ``files``). Pruned choices are never
written. :func:`bank_size` gives the size before the build from the units alone: the bytes of the choices
pruning never removes (a lower bound, what the session refuses to start without) and of every choice before
pruning (the upper bound); equal with one group size.

Streaming and ranks. ``model`` may be a :class:`~slq.models.stream.StreamedModel`: layer 0's inputs are caught
with only the embeddings read, then each block is materialized for its turn (Hessians, solves, forward) and
released after, the skipped (resumed) layers too, since the forward still runs through them; the head unit
reads the final norm and ``lm_head`` for its turn. The reference weights (``Bank.original``) are read from the
files when asked for, and the fingerprint reads the parameters one module at a time, as the in-memory loader
reads them, so a streamed build writes the very bytes of the in-memory build (``bank.json`` included) and
either resumes the other's directory.

The ranks (:class:`slq.util.dist.Group`) split the bank *by layer*: the bank is non-sequential, so layer l's
entries depend only on its own weights and on its inputs from the reference layers before it, which every
rank computes alike by running the same forward over every window. Each layer built in this run belongs to one
rank (:func:`slq.util.dist.split`, longest first by cost ``sum n_params * K``); that rank collects the layer's
Hessians, solves it, writes its file into the shared work directory and hashes it; the layer's statistics and
file record are then gathered to every rank (one small object collective per layer), and rank 0 rewrites
``bank.json``. A layer is computed by one process from the same inputs as in a single process, and nothing
is summed across ranks, so the files are byte-identical to one process; only statistics travel, never the
packed tensors. (Splitting by solve group within a layer would keep the bytes too, but the codes would then
travel to one writer, and pruning judges a whole unit's choices together.) Every rank takes the same list of
layers to build from the same files, so a bank interrupted under N ranks (or one) resumes under any number.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..models.arch import head as model_head
from ..models.stream import StreamedModel, batches_bytes, free_device_bytes, offload_batches
from ..quant.calib import (capture_layer0_inputs, collect_hessians, decoder_layers, eager_attention, head_hessian,
                           layer_linears, run_layer)
from ..quant.config import QuantConfig
from ..quant.gptq import RowBlockHessians, output_error
from ..quant.grid import QuantizedWeight, quantize_rtn
from ..quant.solve import layer_weights, solve_layer
from ..quant.spec import QuantSpec, resolve_group_size
from ..quant.units import KEEP, KEEP_BITS, Choice, Unit, choice_storage_bits, unit_choices
from .allocate import prune_dominated
from ..runtime.checkpoint import pack_weight, unpack_weight
from ..util.atomic import replace_file
from ..util.dist import SINGLE, Group, all_gather_dict, split
from ..util.errors import ConfigError, SlqError
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


def _parameters(model: nn.Module | StreamedModel) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of every parameter in ``named_parameters`` order (tied ones once). A streamed model's are
    read one module at a time from its files, as the in-memory loader reads them, so the two give the same
    tensors; a module already materialized is read as it is and left so."""
    if not isinstance(model, StreamedModel):
        for name, p in model.named_parameters():
            yield name, p.detach()
        return
    by_module: dict[str, list[str]] = {}
    for name, _ in model.model.named_parameters():
        mod, _, leaf = name.rpartition(".")
        by_module.setdefault(mod, []).append(leaf)
    for mod_name, leaves in by_module.items():
        mod = model.model.get_submodule(mod_name)
        on_meta = any(getattr(mod, leaf).device.type == "meta" for leaf in leaves)
        with model.onloaded(mod) if on_meta else contextlib.nullcontext():
            for leaf in leaves:
                yield f"{mod_name}.{leaf}", getattr(mod, leaf).detach()


class _FileWeights(Mapping):
    """Member -> fp32 reference weight on the CPU, read from a streamed model's files when asked for (the
    bank's ``original`` for a model that is never whole in memory; nothing is cached)."""

    def __init__(self, stream: StreamedModel, members: list[str]):
        self.stream, self.members, self._known = stream, list(members), set(members)

    def __getitem__(self, member: str) -> torch.Tensor:
        if member not in self._known:
            raise KeyError(member)
        mod = self.stream.model.get_submodule(member)
        with self.stream.onloaded(mod) if mod.weight.device.type == "meta" else contextlib.nullcontext():
            return mod.weight.detach().float().cpu().clone()

    def __iter__(self):
        return iter(self.members)

    def __len__(self) -> int:
        return len(self.members)


def fingerprint(model: nn.Module | StreamedModel, windows: torch.Tensor | None, settings: dict) -> str:
    """sha256 of what the bank depends on: the settings, the calibration tokens and every parameter's
    name, dtype, shape and bytes. Any change to any weight (one bit, or two rows swapped) changes it;
    the bytes are exact, so it is the same for any device or thread count, and for a model streamed from its
    files (read one module at a time) and the same model loaded whole. The tensors are hashed
    from CPU copies of ``_HASH_CHUNK`` bytes at a time (no second copy of the model; sha256 runs at
    about 1-2 GB/s, so seconds for an 8B model)."""
    h = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    if windows is not None:
        h.update(windows.to(torch.int64).cpu().numpy().tobytes())
    for name, x in _parameters(model):
        h.update(f"{name}|{x.dtype}|{tuple(x.shape)}|".encode())
        flat = x.reshape(-1)
        step = max(1, _HASH_CHUNK // max(1, x.element_size()))
        for s in range(0, flat.numel(), step):
            h.update(flat[s:s + step].cpu().contiguous().view(torch.uint8).numpy())
    return h.hexdigest()[:32]


@dataclass
class Bank:
    """Quantized weights of every unit at every surviving choice, plus the original weights.

    ``t[unit][choice]``: relative output error of the unit at that :class:`Choice` (0 at :data:`KEEP`); its
    keys are the unit's choices (after pruning), with :data:`KEEP`. ``group_size`` is the config's own
    (requested) group size, the one a bare bitwidth means; ``groups`` every requested one.
    ``pruned[unit]``: label -> the label of the choice that dominates it (and the RTN scores compared).
    """

    workdir: Path
    units: list[Unit]
    bitwidths: tuple[int, ...]
    group_size: int | None
    symmetric: bool
    method: str
    t: dict[str, dict[Choice, float]]
    original: Mapping[str, torch.Tensor]  # member -> fp32 weight of the reference (read from the files when streamed)
    timings: dict[str, float] = field(default_factory=dict)
    device: str = "cpu"  # where entries are unpacked and dequantized (the model's device)
    groups: tuple = ()
    pruned: dict[str, dict[str, dict]] = field(default_factory=dict)
    layer_bytes: dict[int, int] = field(default_factory=dict)  # layer (the head: L) -> bytes of its file
    _tensors: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict, repr=False)

    @property
    def total_bytes(self) -> int:
        """Bytes of the bank's layer files on disk (what ``bank.json`` records as ``total_bytes``)."""
        return sum(self.layer_bytes.values())

    def __post_init__(self) -> None:
        if not self.groups:
            self.groups = (self.group_size,)

    @property
    def unit_map(self) -> dict[str, Unit]:
        return {u.name: u for u in self.units}

    def choices(self, unit: Unit) -> list[Choice]:
        """The unit's quantized choices held by the bank (pruned ones left out), bits ascending."""
        return sorted((c for c in self.t[unit.name] if not c.keep), key=Choice.sort_key)

    def choice(self, unit: Unit, value) -> Choice:
        """``value`` as a :class:`Choice` of ``unit``: a Choice or its label as is; a bare bitwidth at the
        config's own group size (resolved for the unit's K); 16 is :data:`KEEP`."""
        if isinstance(value, (Choice, str)):
            return Choice.parse(value)
        if int(value) == KEEP_BITS:
            return KEEP
        return Choice(int(value), resolve_group_size(unit.K, self.group_size)[0])

    def spec(self, unit: Unit, bits) -> QuantSpec:
        c = self.choice(unit, bits)
        return QuantSpec(c.bits, c.group, self.symmetric)

    def _layer(self, i: int) -> dict[str, torch.Tensor]:
        if i not in self._tensors:
            self._tensors[i] = load_file(str(_layer_file(self.workdir, i)))
        return self._tensors[i]

    def qweight(self, unit: Unit, member: str, bits) -> QuantizedWeight:
        c = self.choice(unit, bits)
        if c.keep or c not in self.t[unit.name]:
            raise SlqError(f"choice {c} of {unit.name} is not in the bank "
                           f"({', '.join(map(str, self.choices(unit)))})")
        t = self._layer(unit.layer)
        prefix = f"{member}.b{_entry_key(c, self.groups)}."
        parts = {k[len(prefix):]: v.to(self.device, non_blocking=True) for k, v in t.items() if k.startswith(prefix)}
        return unpack_weight(parts, self.spec(unit, c), f"bank {member} @ {c}")

    def dequantized(self, unit: Unit, member: str, bits) -> torch.Tensor:
        """The weight a unit gets at a choice (or bitwidth); 16 is the reference weight rounded to fp16 (what
        the checkpoint stores for a unit kept in 16-bit, so what is measured is what is shipped)."""
        if self.choice(unit, bits).keep:
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

    def apply(self, model: nn.Module, allocation: dict) -> None:
        """Set the model's weights to the allocation (unit -> choice, label or bitwidth; 16 = the reference
        rounded to fp16)."""
        mods = dict(model.named_modules())
        umap = self.unit_map
        state = self._state(model)
        for name, value in allocation.items():
            u = umap[name]
            c = self.choice(u, value)
            if state.get(name) == c:
                continue
            for m in u.members:
                w = mods[m].weight
                w.data.copy_(self.dequantized(u, m, c).to(w.device, w.dtype))
            state[name] = c

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

    def qweights(self, allocation: dict) -> dict[str, QuantizedWeight]:
        """Member -> codes for every quantized unit of the allocation (for the checkpoint)."""
        out = {}
        for u in self.units:
            c = self.choice(u, allocation[u.name])
            if not c.keep:
                for m in u.members:
                    q = self.qweight(u, m, c)
                    out[m] = QuantizedWeight(q.codes.cpu(), q.scale.cpu(), q.zero.cpu(), q.spec)
        return out


def _entry_key(c: Choice, groups: tuple) -> str:
    """How a choice is named in the layer files and ``bank.json``: its bitwidth alone with one requested group
    size (the layout of banks built before group choices), its label with several."""
    return str(c.bits) if len(set(groups)) == 1 else c.label


def _settings(units, bitwidths, group_size, symmetric, method, clip, damp, attention) -> dict:
    return {"version": BANK_VERSION, "units": [[u.name, list(u.members)] for u in units],
            "bitwidths": list(bitwidths), "group_size": group_size, "symmetric": symmetric,
            "method": method, "clip": clip, "damp": damp, "attention_hessians": attention}


def bank_size(units: list[Unit], bitwidths: tuple[int, ...], groups: tuple | None, group_size: int | None,
              symmetric: bool) -> tuple[int, int]:
    """(``sure``, ``most``): bytes of the packed entries the bank will write, before it is built. ``sure``
    counts the choices pruning never removes (every bitwidth at the config's own group size, resolved per unit
    K), ``most`` every requested choice before pruning; with one group size they are equal and exact. Each
    entry is :func:`~slq.quant.units.choice_storage_bits` (codes, scales and zero points as the checkpoint
    packs them); the safetensors headers and ``bank.json`` (kilobytes) come on top."""
    groups = (group_size,) if groups is None else tuple(dict.fromkeys(groups))
    sure = most = 0
    for u in units:
        own = resolve_group_size(u.K, group_size)[0]
        for c in unit_choices(u, tuple(sorted(set(bitwidths))), groups, keep=False):
            n = choice_storage_bits(u, c, symmetric) // 8
            most += n
            sure += n if c.group == own else 0
    return sure, most


@torch.no_grad()
def build_bank(
    model: nn.Module | StreamedModel,
    units: list[Unit],
    windows: torch.Tensor | None,
    workdir: str | os.PathLike,
    config: QuantConfig,
    *,
    bitwidths: tuple[int, ...],
    groups: tuple | None = None,
    progress: bool = True,
    group: Group = SINGLE,
) -> Bank:
    """Quantize every unit at every choice (resuming from ``workdir`` when it holds a partial bank).

    ``model`` is the reference; its weights are left untouched. ``config`` gives the grid (group size,
    symmetry), the method and GPTQ's options, the batch size and the device (its ``bits`` is unused).
    ``bitwidths`` are the quantized candidates (2..8); "keep in 16-bit" needs no bank entry. ``groups``: the
    requested group sizes (``None`` per-channel; default ``(config.group_size,)``); with several, dominated
    choices are pruned before GPTQ (module docstring). With
    ``config.attention`` key and value projections get attention-aware Hessians (one per key/value head,
    :mod:`slq.quant.calib`), for GPTQ and for the error statistics.

    ``model`` may be a :class:`~slq.models.stream.StreamedModel`: each block is then read onto
    ``config.device`` for its turn (its Hessians, solves and forward) and released after, and ``original``
    reads the reference weights from the files when asked. ``group`` splits the layers over ranks
    (module docstring, "Streaming and ranks"); ``workdir`` must be one directory every rank sees.
    """
    bitwidths = tuple(sorted(set(int(b) for b in bitwidths)))
    group_size, symmetric, method, attention = config.group_size, config.symmetric, config.method, config.attention
    groups = (group_size,) if groups is None else tuple(dict.fromkeys(groups))
    for b in bitwidths:
        for g in groups:
            QuantSpec(b, g, symmetric)  # validates
    if windows is None or len(windows) == 0:
        raise SlqError("the bank needs calibration windows (Hessians for GPTQ and the error statistics)")
    stream = model if isinstance(model, StreamedModel) else None
    if stream is not None and stream.device != config.device:
        raise SlqError(f"the streamed model reads its blocks onto {stream.device}, the config asks for "
                       f"{config.device}")
    skeleton = stream.model if stream is not None else model
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    settings = _settings(units, bitwidths, group_size, symmetric, method, config.clip, config.damp, attention)
    if config.act_order:  # only when on, so the fingerprints of banks built before the option stay valid
        settings["act_order"] = True
    if groups != (group_size,):  # only with group choices, so the fingerprints of one-group banks stay valid
        settings["groups"] = list(groups)
    fp = fingerprint(model, windows, settings)
    meta_path = workdir / META
    meta = {"fingerprint": fp, "settings": settings, "layers": {}}
    if meta_path.exists():
        old = read_json(meta_path, "the bank's record")
        if not isinstance(old, dict) or not isinstance(old.get("layers"), dict):
            raise ConfigError("workdir", f"{meta_path} is not a bank record; use another {{field}} or delete it")
        if old.get("fingerprint") != fp:
            raise SlqError(f"work directory {workdir} holds a bank built with other settings, data or model; "
                           "use another --workdir or delete it")
        meta = old

    layers = decoder_layers(skeleton)
    by_layer: dict[int, list[Unit]] = {}
    for u in units:
        by_layer.setdefault(u.layer, []).append(u)
    prefix = next(n for n, m in skeleton.named_modules() if m is layers)
    members = [m for u in units for m in u.members]
    if stream is not None:
        original: Mapping[str, torch.Tensor] = _FileWeights(stream, members)
    else:
        mods = dict(model.named_modules())
        original = {m: mods[m].weight.detach().float().cpu().clone() for m in members}

    t0 = time.perf_counter()
    # a layer is resumed only if its file is complete (size and sha256 as recorded), else it is rebuilt
    todo = [i for i in sorted(by_layer) if str(i) not in meta["layers"] or not _layer_complete(workdir, i, meta)]
    mine = set(split(todo, group.rank, group.world, cost=lambda i: sum(u.n_params * u.K for u in by_layer[i])))
    parts: dict[str, float] = {}
    onloaded = stream.onloaded if stream is not None else lambda *_: contextlib.nullcontext()
    run_on = None  # where a layer runs when the activations sit in host memory (streamed, on CUDA)
    with eager_attention(skeleton, attention and bool(todo)), progress_bar(progress and group.writes) as bar:
        batches = []
        if todo:
            if stream is not None:
                batches = stream.layer0_inputs(windows, config.batch_size)
                if str(config.device).startswith("cuda") and 3 * batches_bytes(batches) > free_device_bytes(
                        config.device):
                    batches, run_on = offload_batches(batches), config.device
            else:
                batches = capture_layer0_inputs(model, windows, config.batch_size, config.device)
        task = bar.add_task(f"bank ({method.upper()}, {len(bitwidths)} bitwidths)", total=len(layers))
        for i, layer in enumerate(layers):
            if not todo or i > max(todo):
                bar.advance(task, len(layers) - i)
                break
            with onloaded(layer):  # resumed and other ranks' layers too: the forward needs them
                if i in todo:
                    built = (_bank_layer(layer, i, by_layer[i], batches, workdir, config, bitwidths, prefix, groups,
                                         run_on) if i in mine else None)
                    _record(group, meta, meta_path, workdir, i, built, parts)
                if i + 1 < len(layers) or len(layers) in todo:  # the head unit needs the last layer's outputs
                    batches = run_layer(layer, batches, run_on)
            bar.advance(task)
        if len(layers) in todo:  # the head unit
            built = None
            if len(layers) in mine:
                h = model_head(skeleton)
                with onloaded(h.norm, h.lm_head):
                    built = _bank_head(skeleton, by_layer[len(layers)], batches, workdir, config, bitwidths, groups,
                                       run_on)
            _record(group, meta, meta_path, workdir, len(layers), built, parts)
    group.barrier()  # bank.json and every layer file are written before any rank reads them

    t, pruned = {}, {}
    for u in units:
        rec = meta["layers"][str(u.layer)][u.name]
        named = {_entry_key(c, groups): c for c in unit_choices(u, bitwidths, groups, keep=False)}
        t[u.name] = {named[k]: v for k, v in rec["t"].items()}
        t[u.name][KEEP] = 0.0
        if rec.get("pruned"):
            pruned[u.name] = rec["pruned"]
    layer_bytes = {int(i): rec["size"] for i, rec in meta.get("files", {}).items() if int(i) in by_layer}
    return Bank(workdir, units, bitwidths, group_size, symmetric, method, t, original,
                timings={"bank_s": time.perf_counter() - t0, "layers_built": len(todo), **parts},
                device=str(config.device), groups=groups, pruned=pruned, layer_bytes=dict(sorted(layer_bytes.items())))


def _record(group: Group, meta: dict, meta_path: Path, workdir: Path, i: int, built: "LayerBank | None",
            parts: dict) -> None:
    """Add layer ``i``'s statistics and file record to ``bank.json`` (rewritten atomically by rank 0). Every
    rank calls it for every layer built in this run; the rank that built the layer (``built``) hashes its
    file, and the record reaches every rank, so each holds the whole ``bank.json``."""
    mine = {} if built is None else {str(i): (built.stats, _file_record(_layer_file(workdir, i)), built.timings)}
    for key, (stats, rec, timings) in all_gather_dict(group, mine).items():
        meta["layers"][key] = stats
        meta.setdefault("files", {})[key] = rec
        for k, v in timings.items():
            parts[k] = parts.get(k, 0.0) + v
    meta["total_bytes"] = sum(r["size"] for r in meta["files"].values())
    if group.writes:
        tmp = meta_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(meta, indent=1))
        replace_file(tmp, meta_path)


class LayerBank(NamedTuple):
    """What one decoder layer adds to the bank: its units' statistics as ``bank.json`` stores them
    (unit -> ``{"t": {choice: t}, "pruned": {choice: why}}``) and where the time went."""

    stats: dict[str, dict[str, dict]]
    timings: dict[str, float]


def _rtn_scores(W: dict[str, torch.Tensor], units: list[Unit], choices: dict[str, list[Choice]], symmetric: bool,
                hessians: dict, relname: dict[str, str], clip: bool) -> dict[str, list[float]]:
    """Per unit, RTN's relative output error ``sum tr(dW H dW^T) / sum tr(W H W^T)`` at each choice: the cheap
    score pruning judges by (the attention-aware Hessians' row blocks included, as GPTQ sees them)."""
    def err(m: str, W_hat: torch.Tensor) -> float:
        h = hessians[relname[m]]
        if isinstance(h, RowBlockHessians):
            return sum(output_error(W[m][g * h.rows:(g + 1) * h.rows], W_hat[g * h.rows:(g + 1) * h.rows],
                                    acc.H.to(W_hat.device)) for g, acc in enumerate(h.blocks))
        return output_error(W[m], W_hat, h.H.to(W_hat.device))

    out = {}
    for u in units:
        base = sum(err(m, torch.zeros_like(W[m])) for m in u.members)
        out[u.name] = [sum(err(m, quantize_rtn(W[m], QuantSpec(c.bits, c.group, symmetric), clip=clip).dequantize())
                           for m in u.members) / max(base, 1e-30) for c in choices[u.name]]
    return out


def _prune(units: list[Unit], choices: dict[str, list[Choice]], scores: dict[str, list[float]], symmetric: bool,
           protected_group: int | None) -> tuple[dict[str, list[Choice]], dict[str, dict[str, dict]]]:
    """Each unit's choices with the dominated ones removed (by storage bits and RTN score), and why."""
    kept, why = {}, {}
    for u in units:
        cs = choices[u.name]
        sizes = [choice_storage_bits(u, c, symmetric) for c in cs]
        own = resolve_group_size(u.K, protected_group)[0]
        keep, by = prune_dominated(sizes, scores[u.name], protected=[c.group == own for c in cs])
        kept[u.name] = [cs[j] for j in keep]
        why[u.name] = {cs[j].label: {"by": cs[k].label, "bits": sizes[j], "by_bits": sizes[k],
                                     "rtn_t": scores[u.name][j], "by_rtn_t": scores[u.name][k]}
                       for j, k in by.items()}
    return kept, why


def _bank_layer(layer: nn.Module, i: int, units: list[Unit], batches: list, workdir: Path, config: QuantConfig,
                bitwidths: tuple[int, ...], prefix: str, groups: tuple | None = None, run_on=None) -> LayerBank:
    """Quantize the units of decoder layer ``i`` at every choice (:func:`slq.quant.solve.solve_layer`; with
    several group sizes the dominated choices are pruned first), write their packed entries to the layer's
    file and return their error statistics. ``run_on``: where the layer runs when ``batches`` sit in host
    memory."""
    t_start = time.perf_counter()
    rel = layer_linears(layer)
    members = [m for u in units for m in u.members]
    relname = {m: m[len(f"{prefix}.{i}."):] for m in members}
    found = collect_hessians(layer, batches, [relname[m] for m in members], attention=config.attention,
                             device=run_on)
    W = layer_weights({m: rel[relname[m]] for m in members})
    return _bank_entries(i, units, W, {m: found[relname[m]] for m in members}, workdir, config, bitwidths, groups,
                         t_start)


def _bank_head(model: nn.Module, units: list[Unit], batches: list, workdir: Path, config: QuantConfig,
               bitwidths: tuple[int, ...], groups: tuple | None, run_on=None) -> LayerBank:
    """The head unit's entries: its Hessian from the final-normed outputs of the last (reference) layer."""
    t_start = time.perf_counter()
    (u,) = units
    (m,) = u.members
    W = layer_weights({m: model_head(model).lm_head})
    return _bank_entries(len(decoder_layers(model)), units, W, {m: head_hessian(model, batches, run_on)}, workdir, config,
                         bitwidths, groups, t_start)


def _bank_entries(i: int, units: list[Unit], W: dict[str, torch.Tensor], hessians: dict, workdir: Path,
                  config: QuantConfig, bitwidths: tuple[int, ...], groups: tuple | None, t_start: float) -> LayerBank:
    """Solve the members' weights ``W`` (fp32) at every choice of their units with their Hessians (member ->
    Hessian), prune first with several group sizes, write the packed entries to file ``i`` and return the
    units' error statistics."""
    groups = (config.group_size,) if groups is None else groups
    members = [m for u in units for m in u.members]
    relname = {m: m for m in members}
    choices = {u.name: unit_choices(u, bitwidths, groups, keep=False) for u in units}
    pruned: dict[str, dict[str, dict]] = {u.name: {} for u in units}
    t_prune = 0.0
    if len(set(groups)) > 1:
        tp = time.perf_counter()
        scores = _rtn_scores(W, units, choices, config.symmetric, hessians, relname, config.clip)
        choices, pruned = _prune(units, choices, scores, config.symmetric, config.group_size)
        t_prune = time.perf_counter() - tp
    unit_of = {m: u for u in units for m in u.members}
    specs = {m: tuple(QuantSpec(c.bits, c.group, config.symmetric) for c in choices[unit_of[m].name])
             for m in members}
    solved = solve_layer(W, specs, config, {m: hessians[m] for m in members})
    t_stats = time.perf_counter()
    # Error statistics and packing run where the layer runs (a GPU for large models); only the packed
    # tensors travel to the host for the file.
    tensors = {}
    stats = {}
    for u in units:
        base = sum(solved[m].output_error(W[m], torch.zeros_like(W[m])) for m in u.members)
        t = {}
        for k, c in enumerate(choices[u.name]):
            key = _entry_key(c, groups)
            err = 0.0
            for m in u.members:
                q = solved[m].qweights[k]
                err += solved[m].output_error(W[m], q.dequantize())
                for name, v in pack_weight(q).items():
                    tensors[f"{m}.b{key}.{name}"] = v.cpu()
            t[key] = err / max(base, 1e-30)
        stats[u.name] = {"t": t, **({"pruned": pruned[u.name]} if pruned[u.name] else {})}
    t_save = time.perf_counter()
    path = _layer_file(workdir, i)
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"producer": "slq bank"})
    replace_file(tmp, path)  # fsync'ed before the rename: a renamed layer file is a complete one
    return LayerBank(stats, {"hessian_gptq_s": t_stats - t_start - t_prune, "prune_s": t_prune,
                             "stats_pack_s": t_save - t_stats, "save_s": time.perf_counter() - t_save})
