"""Two gloo ranks quantize stories260K into a checkpoint byte-identical to the one a single process writes.

The ranks are spawned by the test (torch.multiprocessing, world 2, a free port). Each runs the whole forward,
solves its share of each layer's Hessian groups, and gathers the others' codes; rank 0 writes. The oracle is
the single-process run, written through the same ``save_checkpoint``: its weight file and config are compared
byte for byte (the report holds times and dates, so only its plan is compared).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.multiprocessing as mp

from slq.models.sources import load_model
from slq.quant.config import QuantConfig
from slq.quant.pipeline import quantize_model
from slq.runtime.checkpoint import save_checkpoint
from slq.util import dist
from slq.util.dist import SINGLE

CONFIGS = {"rtn": QuantConfig(bits=4, group_size=32, method="rtn"),
           "gptq": QuantConfig(bits=3, group_size=32, method="gptq", batch_size=4)}


def _write(model_dir: Path, windows: torch.Tensor, out: Path, group) -> None:
    for name, config in CONFIGS.items():
        model, tok = load_model(model_dir)
        res = quantize_model(model, config, windows=windows if config.method == "gptq" else None,
                             progress=False, group=group)
        if group.writes:
            save_checkpoint(out / name, model, tok, res.qweights, {"plan": res.plan.to_dict()})


def _rank(rank: int, world: int, port: int, model_dir: str, windows: torch.Tensor, out: str):
    torch.set_num_threads(1)
    g = dist.init(rank, world, port)
    try:
        _write(Path(model_dir), windows, Path(out), g)
        g.barrier()
    finally:
        dist.shutdown(g)


def test_two_gloo_ranks_write_the_single_process_checkpoint(stories_dir, tiny_windows, tmp_path):
    windows = tiny_windows[:8, :64].clone()
    _write(stories_dir, windows, tmp_path / "one", SINGLE)
    mp.spawn(_rank, args=(2, dist.free_port(), str(stories_dir), windows, str(tmp_path / "two")), nprocs=2,
             join=True)
    for name in CONFIGS:
        one, two = tmp_path / "one" / name, tmp_path / "two" / name
        assert (one / "model.safetensors").read_bytes() == (two / "model.safetensors").read_bytes(), name
        assert (one / "config.json").read_bytes() == (two / "config.json").read_bytes(), name
        plan1 = json.loads((one / "slq_report.json").read_text())["plan"]
        assert plan1 == json.loads((two / "slq_report.json").read_text())["plan"]
