"""``slq bench`` from start to end: check the input, then time a synthetic shape or a checkpoint.

Shape mode: FP16 first (a random Llama of the shape), then each uniform bitwidth and each plan with
random codes, on each backend. Checkpoint mode: the checkpoint's FP16 counterpart (every QuantLinear
replaced by a dense linear of its dequantized weight), then the checkpoint on each backend. Layers a
kernel refuses run on ``reference``, and the result says how many.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from ...util.errors import ConfigError, SlqError
from ..checkpoint import load
from ..qlinear import QuantLinear
from .measure import Bench
from .options import get_shape, parse_backends, parse_ints, resolve_device
from .plans import PLAN_TARGETS, Shape, file_plan, pattern_plan, plan_bits, units_of
from .synthetic import decoder_linear_shapes, plan_bpp, put, quantize_random, set_backend


def run(*, shape: str | None = None, checkpoint: str | None = None, bits: str = "2,3,4,5,6,7,8",
        plans: str | None = "dl,tl", backends: str = "reference,triton,humming", batches: str = "1,16",
        layers: int | None = None, json_out=None, group_size: int | None = 128, prompt_len: int = 32,
        new_tokens: int = 32, iters: int | None = None, repeats: int | None = None, device: str = "auto",
        measure: str = "layer,stack,decode", log=None) -> dict:
    """Run ``slq bench`` and return the result dict (also written to ``json_out``)."""
    log = log or (lambda s: None)
    if (shape is None) == (checkpoint is None):
        raise ConfigError("shape", "give either {field} NAME or a checkpoint DIR")
    sh = get_shape(shape) if shape is not None else None
    bits_list = parse_ints(bits, "--bits", 2, 8) if sh is not None else []
    batch_list = parse_ints(batches, "--batch", 1)
    be_list = parse_backends(backends)
    what = {w.strip() for w in measure.split(",") if w.strip()}
    if not what or what - {"layer", "stack", "decode"}:
        raise ConfigError("measure", f"{{field}} must list layer, stack, decode; got {measure!r}")
    if layers is not None and layers < 1:
        raise ConfigError("layers", f"{{field}} must be >= 1, got {layers}")
    if prompt_len < 1 or new_tokens < 2 or (repeats is not None and repeats < 1):
        raise ConfigError("prompt_len", "{field} must be >= 1, new_tokens >= 2 and repeats >= 1")
    plan_names = [p.strip() for p in (plans or "").split(",") if p.strip()] if sh is not None else []
    for p in plan_names:
        if p not in PLAN_TARGETS and not Path(p).is_file():
            raise SlqError(f"plan {p!r} is not dl, tl or an existing JSON file")
    ckpt = None
    if checkpoint is not None:
        ckpt = Path(checkpoint)
        if not ckpt.is_dir():
            raise SlqError(f"checkpoint directory {ckpt} does not exist")
        if not (ckpt / "config.json").is_file():
            raise SlqError(f"{ckpt} is not a checkpoint: config.json is missing")
    dev = resolve_device(device)
    t0 = time.perf_counter()
    iters = iters or (20 if dev.type == "cuda" else 3)
    repeats = repeats or (3 if dev.type == "cuda" else 1)
    dtype = torch.float16
    b = Bench(device=dev, dtype=dtype, backends=be_list, batches=batch_list, group=group_size, prompt_len=prompt_len,
              new_tokens=new_tokens, iters=iters, repeats=repeats, json_out=json_out, log=log)
    if sh is not None:
        n_layers = layers or sh.layers
        settings = {"source": "synthetic", "shape": shape, "shape_params": asdict(sh), "layers": n_layers,
                    "bits": bits_list, "plans": plan_names, "backends": be_list, "measure": sorted(what)}
        b.header(settings)
        if "layer" in what:
            b.layers(sh, bits_list)
        if what & {"stack", "decode"}:
            _shape_models(b, sh, n_layers, bits_list, plan_names, what)
    else:
        settings = {"source": "checkpoint", "checkpoint": str(ckpt.resolve()), "backends": be_list,
                    "measure": sorted(what & {"stack", "decode"})}
        b.header(settings)
        _checkpoint_models(b, ckpt, what)
    b.res["elapsed_s"] = time.perf_counter() - t0
    b.save()
    return b.res


def _shape_models(b: Bench, sh: Shape, n_layers: int, bits_list, plan_names, what) -> None:
    from transformers import AutoModelForCausalLM  # lazy: heavy

    dev, dt = b.device, b.dtype
    cfg = sh.config(n_layers, max_positions=max(4096, b.prompt_len + b.new_tokens))
    torch.manual_seed(0)
    with torch.device(dev):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dt).eval().requires_grad_(False)
    names = decoder_linear_shapes(model)
    units = units_of(model)
    b.model_variant(model, "fp16", "fp16", 16, 16.0, what)
    variants = []
    for bits in bits_list:
        variants.append((f"int{bits}", bits, dict.fromkeys(names, bits)))
    for p in plan_names:
        if p in PLAN_TARGETS:
            alloc, per = pattern_plan(units, PLAN_TARGETS[p], b.group)
        else:
            alloc, per = file_plan(p, units), None
        bpp = plan_bits(units, alloc, b.group)
        b.res["plans"][p] = {"target_bits_per_param": PLAN_TARGETS.get(p), "bits_per_param": bpp,
                             "per_kind": per, "allocation": alloc}
        by_mod = {m: alloc[u.name] for u in units for m in u.members}
        variants.append((p, p, by_mod))
    for label, bits, by_mod in variants:
        quantize_random(model, names, by_mod, b.group, dev, dt, b.gen)
        bpp = plan_bpp(model, names)
        for be in b.backends:
            left = set_backend(model, be)
            if left:
                b.res["errors"].append(f"{label} {be}: {len(left)} layers the kernel refuses ran on reference "
                                       f"(first: {left[0]})")
            b.model_variant(model, label, be, bits, bpp, what)


def _checkpoint_models(b: Bench, ckpt: Path, what) -> None:
    dev, dt = b.device, b.dtype
    model = load(ckpt, device=str(dev)).to(dt)
    names = decoder_linear_shapes(model)
    with torch.no_grad():  # the FP16 counterpart: dequantized weights, same architecture
        for name in names:
            m = model.get_submodule(name)
            if isinstance(m, QuantLinear):
                lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device=dev, dtype=dt)
                lin.weight.copy_(m.dequantized_weight().to(dt))
                if m.bias is not None:
                    lin.bias.copy_(m.bias)
                put(model, name, lin.requires_grad_(False))
    b.model_variant(model, "fp16", "fp16", 16, 16.0, what)
    del model
    b._free()
    model = load(ckpt, device=str(dev)).to(dt)
    bpp = plan_bpp(model, names)
    bits = sorted({m.bits for m in model.modules() if isinstance(m, QuantLinear)})
    label = "checkpoint"
    for be in b.backends:
        left = set_backend(model, be)
        if left:
            b.res["errors"].append(f"{label} {be}: {len(left)} layers the kernel refuses ran on reference "
                                   f"(first: {left[0]})")
        b.model_variant(model, label, be, bits[0] if len(bits) == 1 else "mixed", bpp, what)
