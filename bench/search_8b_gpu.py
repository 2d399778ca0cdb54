"""Wall time and peak GPU memory of the full DL search on a randomly initialised Llama-3-8B shape.

Only time and memory count here (random weights carry no language): calibration and verification
windows are sampled from the model itself (``generated``), the bank is GPTQ at 2..8 bits, the
sensitivities use the chosen estimator, and the DL target runs its verification rounds. Stages are
timed separately (bank, sensitivity, solve, verify) and the peak of ``torch.cuda.max_memory_allocated``
is reported. Goal (Search issue): under 20 minutes on one H100.

    python bench/search_8b_gpu.py                          # on a GPU (through the device tool)
    python bench/search_8b_gpu.py --shape tiny --device cpu --out /tmp/s.json   # a smoke run on CPU
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

SHAPES = {
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=8192),
    "tiny": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=4, vocab_size=2048, max_position_embeddings=1024),
}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--estimator", default="linear")
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--sens-windows", type=int, default=8)
    ap.add_argument("--verify-windows", type=int, default=16)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--calib", default=None,
                    help="calibration source (default: the C4 text of the shared data, tokenized by the stories260K "
                         "tokenizer, else 'generated')")
    ap.add_argument("--layers", type=int, default=None, help="override the number of decoder layers (a timing probe)")
    ap.add_argument("--workdir", default=None,
                    help="keep the model and the search's work directory here (default: a temporary directory); a "
                         "rerun reuses the model and resumes the bank, e.g. after a device call's time limit")
    ap.add_argument("--out", default=None)
    ap.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=True,
                    help="GPTQ act-order in the bank (on by default, as in the library)")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("error: CUDA is not available (use --device cpu --shape tiny for a smoke run)")

    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from slq.util.provenance import git_commit, versions
    from slq.search.session import search

    torch.manual_seed(0)
    t0 = time.perf_counter()
    with contextlib.ExitStack() as stack:
        tmp = args.workdir or stack.enter_context(tempfile.TemporaryDirectory())
        shape = dict(SHAPES[args.shape], **({"num_hidden_layers": args.layers} if args.layers else {}))
        shared = Path(os.environ.get("SLQ_SHARED", REPO.parent / "shared"))
        resumed = (Path(tmp) / "model" / "DONE").exists()
        if not resumed:
            cfg = LlamaConfig(**shape, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
            with torch.device(args.device):  # random init on the GPU: minutes faster than on the host for 8B
                model = LlamaForCausalLM(cfg).to(getattr(torch, args.dtype))
            model.save_pretrained(f"{tmp}/model")
            tok_dir = shared / "models" / "stories260K"  # any tokenizer: ids are drawn by the model
            tok = AutoTokenizer.from_pretrained(tok_dir)
            tok.save_pretrained(f"{tmp}/model")
            (Path(tmp) / "model" / "DONE").touch()
            del model
        make_s = time.perf_counter() - t0
        if args.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        c4, wiki = shared / "data" / "calib" / "c4.utf8", shared / "data" / "wikitext2" / "wiki.test.raw"
        calib = args.calib or (str(c4) if c4.exists() else "generated")
        verify = str(wiki) if calib != "generated" and wiki.exists() else None
        args.calib, args.verify_data = calib, verify
        rep = search(f"{tmp}/model", target="dl", ear=0.99, estimator=args.estimator, calib=calib, verify_data=verify,
                     calib_samples=args.calib_samples, seq_len=args.seq_len, sens_windows=args.sens_windows,
                     verify_windows=args.verify_windows, group_size=args.group_size, act_order=args.act_order, device=args.device,
                     workdir=f"{tmp}/work", out=None, frontier=False, progress=sys.stderr.isatty(), baselines=(), max_rounds=3)
        wall = time.perf_counter() - t
    peak = torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else None
    result = {
        "benchmark": "search_8b_gpu",
        "shape": args.shape, "config": shape,
        "device": torch.cuda.get_device_name() if args.device == "cuda" else f"cpu {platform.machine()}",
        "versions": versions(), "git_commit": git_commit(REPO), "settings": vars(args),
        "model_build_s": make_s, "resumed": resumed, "search_wall_s": wall, "peak_gpu_memory_gib": peak,
        "act_order": rep["settings"]["act_order"], "timings": rep["timings"], "bits_per_param": rep["bits_per_param"], "rounds": len(rep["rounds"]),
        "goal": "DL search under 20 minutes on one H100",
        "goal_met": (wall < 1200) if args.shape == "llama3-8b" and not args.layers else None,
    }
    name = f"search_8b_{result['device'].replace(' ', '_')}" + (f"_{args.layers}layers" if args.layers else "")
    out = args.out or str(REPO / "bench/results" / f"{name}.json")
    from slq.util.jsonio import write_json

    write_json(out, result)
    print(json.dumps({k: result[k] for k in ("search_wall_s", "peak_gpu_memory_gib", "timings")}, indent=1))


if __name__ == "__main__":
    main()
