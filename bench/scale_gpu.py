"""Block-streamed uniform quantization of Llama-3-70B- and 8B-shaped models: per-layer time, peak memory, and the
extrapolation to the full depth (Scale issue).

A random model of the chosen shape with a few decoder layers is written once as bf16 safetensors (one file per
layer, the embeddings and the head apart), tensor by tensor, so writing it never holds the model in memory.
Then ``quantize_model`` streams it (:class:`slq.models.stream.StreamedModel`): one block at a time on the
device, GPTQ over random calibration tokens (random weights carry no language: only time and memory count).
A streamed forward over the verification windows (the reference logits' pass) is timed too. Reported: the
time of each layer, the peak GPU memory (``torch.cuda.max_memory_allocated``) and host memory (max RSS), the
model's bytes on disk, and ``total(L) = capture + L * median(layer time)`` for the full depth (80 layers for
70B, 32 for 8B). The bit search does not stream yet (the bank's per-layer loop must adopt the same helpers);
this measures the uniform pipeline and the streamed forward.

    python bench/scale_gpu.py --shape llama3-70b --layers 2             # one GPU
    torchrun --nproc-per-node 2 bench/scale_gpu.py --shape llama3-70b --layers 2    # solves split over 2 GPUs
    python bench/scale_gpu.py --tiny --out /tmp/scale.json               # the CPU dry run (tested)
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "bench"))

SHAPES = {
    "llama3-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                       num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=8192),
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=8192),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=24, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256, max_position_embeddings=256),
}


def write_random_model(path: Path, shape: str, layers: int, dtype: torch.dtype, seed: int = 0) -> Path:
    """A random Llama of ``shape`` with ``layers`` blocks, written tensor by tensor (never whole in memory)."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    from slq.models.stream import parameters_on_meta

    if (path / "config.json").is_file():
        return path  # a workdir from an earlier call
    path.mkdir(parents=True, exist_ok=True)
    cfg = LlamaConfig(**{**SHAPES[shape], "num_hidden_layers": layers}, tie_word_embeddings=False)
    cfg.dtype = dtype
    with parameters_on_meta():
        skeleton = LlamaForCausalLM(cfg)
    g = torch.Generator().manual_seed(seed)
    parts: dict[str, list[tuple[str, torch.Size]]] = {}  # one file per layer, one for the rest
    for name, p in skeleton.named_parameters():
        part = f"layer{int(name.split('.')[2]):03d}" if name.startswith("model.layers.") else "outer"
        parts.setdefault(part, []).append((name, p.shape))
    for part, params in parts.items():
        tensors = {name: torch.ones(shape, dtype=dtype) if len(shape) == 1
                   else (torch.randn(shape, generator=g) * 0.02).to(dtype) for name, shape in params}
        save_file(tensors, str(path / f"model-{part}.safetensors"), {"format": "pt"})
        del tensors
    cfg.save_pretrained(path)
    return path


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama3-70b", choices=sorted(SHAPES))
    ap.add_argument("--layers", type=int, default=2, help="decoder layers of the random model (a few)")
    ap.add_argument("--tiny", action="store_true", help="the CPU dry run: tiny shape, 24 layers, a few windows")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--method", default="gptq", choices=["gptq", "rtn"])
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--verify-windows", type=int, default=16)
    ap.add_argument("--workdir", default=None, help="keep the random model here (reused by a later call)")
    ap.add_argument("--out", default=None, help="result JSON (default: the next bench/results/scale_gpu/run-NN.json)")
    args = ap.parse_args(argv)
    if args.tiny:
        args.shape, args.device, args.dtype = "tiny", "cpu", "float32"
        args.layers = args.layers if args.layers != 2 else 24
        args.calib_samples, args.seq_len, args.batch_size, args.verify_windows, args.group_size = 4, 32, 2, 4, 32
    dtype = getattr(torch, args.dtype)

    from slq.models.stream import StreamedModel
    from slq.quant.config import QuantConfig
    from slq.quant.pipeline import quantize_model
    from slq.util import dist
    from slq.util.provenance import git_commit, versions

    group = dist.init_from_env(args.device)
    device = group.device
    tmp = None
    if args.workdir:
        root = Path(args.workdir)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="slq-scale-") if group.writes else None
        root = Path(dist.broadcast_dict(group, {"root": tmp.name} if group.writes else None)["root"])
    model_dir = root / f"{args.shape}-{args.layers}l"
    t = time.perf_counter()
    if group.writes:
        write_random_model(model_dir, args.shape, args.layers, dtype)
    group.barrier()
    write_s = time.perf_counter() - t

    g = torch.Generator().manual_seed(1)
    vocab = SHAPES[args.shape]["vocab_size"]
    windows = torch.randint(0, vocab, (args.calib_samples, args.seq_len), generator=g)
    verify = torch.randint(0, vocab, (args.verify_windows, args.seq_len), generator=g)
    config = QuantConfig(bits=args.bits, group_size=args.group_size, method=args.method, batch_size=args.batch_size,
                         calib_samples=args.calib_samples, seq_len=args.seq_len, device=device, offload=True)
    sm = StreamedModel(model_dir, dtype=dtype, device=device)
    res = quantize_model(sm, config, windows=windows if args.method == "gptq" else None, progress=False,
                         group=group)
    peak_quant = res.timings["peak_memory_bytes"]

    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    sm.reset_peak()
    hidden = sm.hidden_states(verify, args.batch_size)
    if cuda:
        torch.cuda.synchronize()
    forward_s = time.perf_counter() - t
    peak_forward = torch.cuda.max_memory_allocated() if cuda else sm.peak_bytes + sum(
        b.hidden.numel() * b.hidden.element_size() for b in hidden)
    del hidden

    full = SHAPES[args.shape]["num_hidden_layers"]
    layer_s = res.layer_s
    med = statistics.median(layer_s[1:] if len(layer_s) > 1 else layer_s)  # the first layer carries warm-up
    result = {
        "script": "bench/scale_gpu.py",
        "device": torch.cuda.get_device_name(device) if cuda else platform.processor() or platform.machine(),
        "versions": versions(),
        "git_commit": git_commit(),
        "settings": {**vars(args), "world": group.world, "config": config.to_dict()},
        "model": {"shape": args.shape, "layers": args.layers, "full_depth": full, "disk_bytes": _dir_bytes(model_dir),
                  "write_s": write_s},
        "quantize": {"timings": res.timings, "layer_s": layer_s, "memory": res.memory,
                     "peak_device_bytes": peak_quant,
                     "extrapolated_total_s": res.timings["capture_s"] + full * med},
        "streamed_forward": {"windows": args.verify_windows, "total_s": forward_s,
                             "per_layer_s": forward_s / args.layers, "peak_device_bytes": peak_forward,
                             "extrapolated_total_s": forward_s / args.layers * full},
        "peak_host_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "search": "not streamed: the bank's per-layer loop has not adopted slq.models.stream yet",
    }
    if group.writes:
        if args.out:
            out = Path(args.out)
        else:
            from _results import next_run

            out = next_run("scale_gpu")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps({k: result[k] for k in ("device", "model", "streamed_forward")}, indent=1))
        print(f"quantize: median layer {med:.2f} s, peak {peak_quant / 2**30:.2f} GiB, "
              f"{full} layers ~ {result['quantize']['extrapolated_total_s'] / 60:.1f} min -> {out}")
    group.barrier()
    dist.shutdown(group)
    if tmp is not None:
        tmp.cleanup()
    return result


if __name__ == "__main__":
    main()
