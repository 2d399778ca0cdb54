"""The bank built from a streamed model (one block materialized at a time) or over two gloo ranks (layers split
between them) writes the very files of the bank built in one process from the model loaded whole: every layer
file and ``bank.json``, byte for byte, also after an interrupted build is resumed. The oracle is the in-memory,
single-process build. The memory oracle is independent of the streaming code's own count: a pre-hook on every
decoder block sums the bytes of every parameter not on the meta device at that moment.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

import slq.search.bank as bank_mod
from slq.models.stream import StreamedModel
from slq.quant.config import QuantConfig
from slq.quant.units import build_units
from slq.search.bank import bank_size, build_bank
from slq.util import dist
from slq.util.dist import SINGLE
from slq.util.errors import ConfigError
from slq.util.preflight import check_bank_space
from conftest import live_block_peak

CONFIG = QuantConfig(group_size=32, batch_size=4)
BITS = (2, 4, 8)


def _plain(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _tiny_llama(path: Path, layers: int) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False)
    LlamaForCausalLM(cfg).eval().save_pretrained(path)
    return path


def _stories_copy(stories_dir: Path, tmp: Path) -> Path:
    """The safetensors model in a directory of its own (only what StreamedModel and transformers read)."""
    out = tmp / "stories"
    out.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(stories_dir / name, out / name)
    return out


def _build(model, workdir, windows, groups=None, group=SINGLE, head=True):
    units = build_units(model.model if isinstance(model, StreamedModel) else model, head=head)
    return build_bank(model, units, windows, workdir, CONFIG, bitwidths=BITS, groups=groups, progress=False,
                      group=group)


def _same_files(a: Path, b: Path) -> None:
    names = sorted(f.name for f in a.iterdir())
    assert names == sorted(f.name for f in b.iterdir())
    assert "bank.json" in names and any(n.startswith("layer_") for n in names)
    for n in names:
        assert (a / n).read_bytes() == (b / n).read_bytes(), n




@pytest.mark.parametrize("groups", [None, (32, None)])
def test_streamed_bank_writes_the_in_memory_bank_on_stories(stories_dir, tiny_windows, tmp_path, groups):
    path = _stories_copy(stories_dir, tmp_path)
    windows = tiny_windows[:8, :64]
    whole = _build(_plain(path), tmp_path / "whole", windows, groups)
    sm = StreamedModel(path)
    streamed = _build(sm, tmp_path / "streamed", windows, groups)
    _same_files(tmp_path / "whole", tmp_path / "streamed")
    assert streamed.t == whole.t and streamed.pruned == whole.pruned
    assert all(p.device.type == "meta" for p in sm.model.parameters()) and sm.live_bytes == 0
    assert set(streamed.original) == set(whole.original)
    assert all(torch.equal(streamed.original[m], whole.original[m]) for m in whole.original)
    # the size is recorded, and the estimate made before the build is a lower bound of it
    assert streamed.total_bytes == sum(f.stat().st_size for f in (tmp_path / "streamed").glob("layer_*"))
    sure, most = bank_size(whole.units, BITS, groups, CONFIG.group_size, CONFIG.symmetric)
    assert 0 < sure <= whole.total_bytes and sure <= most and (sure == most) == (groups is None)


def test_streamed_bank_of_a_deep_llama_holds_one_block(tmp_path):
    path = _tiny_llama(tmp_path / "deep", layers=12)
    windows = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1))
    _build(_plain(path), tmp_path / "whole", windows)
    sm = StreamedModel(path)
    peak = live_block_peak(sm, lambda: _build(sm, tmp_path / "streamed", windows))
    _same_files(tmp_path / "whole", tmp_path / "streamed")
    one_block = sum(p.numel() * p.element_size() for p in sm.layers[0].parameters())
    whole = sum(p.numel() * p.element_size() for p in sm.model.parameters())
    assert 0 < peak <= one_block < whole / 12  # at a block's start, only that block is materialized
    assert sm.live_bytes == 0


def test_interrupted_streamed_bank_resumes_byte_identical(stories_dir, tiny_windows, tmp_path, monkeypatch):
    path = _stories_copy(stories_dir, tmp_path)
    windows = tiny_windows[:8, :64]
    _build(_plain(path), tmp_path / "whole", windows)
    real = bank_mod._bank_layer

    def flaky(layer, i, *a, **k):
        if i == 2:
            raise KeyboardInterrupt  # interrupted after two layers were written
        return real(layer, i, *a, **k)

    monkeypatch.setattr(bank_mod, "_bank_layer", flaky)
    sm = StreamedModel(path)
    with pytest.raises(KeyboardInterrupt):
        _build(sm, tmp_path / "resumed", windows)
    assert all(p.device.type == "meta" for p in sm.model.parameters())  # the block was released on the way out
    assert sorted(f.name for f in (tmp_path / "resumed").glob("layer_*")) == ["layer_0000.safetensors",
                                                                             "layer_0001.safetensors"]
    monkeypatch.setattr(bank_mod, "_bank_layer", real)
    resumed = _build(StreamedModel(path), tmp_path / "resumed", windows)
    assert resumed.timings["layers_built"] == len({u.layer for u in resumed.units}) - 2
    _same_files(tmp_path / "whole", tmp_path / "resumed")


def test_a_disk_too_small_for_the_bank_is_one_error_naming_the_workdir(tmp_path):
    import shutil as sh

    free = sh.disk_usage(tmp_path).free
    check_bank_space(tmp_path / "bank", free // 2)  # fits: no error
    with pytest.raises(ConfigError, match="the bank needs at least") as e:
        check_bank_space(tmp_path / "bank", 2 * free, 3 * free)
    msg = str(e.value)
    assert e.value.field == "workdir" and str(tmp_path / "bank") in msg and "before pruning" in msg
    assert "\n" not in msg


# ------------------------------------------------------------------ two gloo ranks


def _rank(rank: int, world: int, port: int, model_dir: str, windows: torch.Tensor, out: str, stream: bool,
          fail_after: int):
    torch.set_num_threads(1)
    g = dist.init(rank, world, port)
    try:
        if fail_after:  # every rank stops at the same point, after `fail_after` layers were recorded
            real, calls = bank_mod.run_layer, [0]

            def flaky(*a, **k):
                calls[0] += 1
                if calls[0] == fail_after:  # the forward after layer fail_after - 1 was recorded
                    raise RuntimeError("simulated kill")  # (spawn swallows a KeyboardInterrupt)
                return real(*a, **k)

            bank_mod.run_layer = flaky
        model = StreamedModel(model_dir) if stream else _plain(model_dir)
        _build(model, Path(out), windows, group=g)
    finally:
        dist.shutdown(g)


def _spawn(model_dir, windows, out, stream=False, fail_after=0):
    mp.spawn(_rank, args=(2, dist.free_port(), str(model_dir), windows, str(out), stream, fail_after), nprocs=2,
             join=True)


def test_two_gloo_ranks_write_the_single_process_bank(stories_dir, tiny_windows, tmp_path):
    windows = tiny_windows[:8, :64].clone()
    _build(_plain(stories_dir), tmp_path / "one", windows)
    _spawn(stories_dir, windows, tmp_path / "two")
    _same_files(tmp_path / "one", tmp_path / "two")


def test_a_bank_interrupted_under_two_streaming_ranks_resumes_byte_identical(stories_dir, tiny_windows, tmp_path):
    path = _stories_copy(stories_dir, tmp_path)
    windows = tiny_windows[:8, :64].clone()
    one = _build(_plain(path), tmp_path / "one", windows)
    with pytest.raises(mp.ProcessRaisedException, match="simulated kill"):
        _spawn(path, windows, tmp_path / "two", stream=True, fail_after=2)
    import json

    meta = json.loads((tmp_path / "two" / "bank.json").read_text())
    assert sorted(meta["layers"]) == ["0", "1"]  # two layers recorded (one by each rank), then the stop
    _spawn(path, windows, tmp_path / "two", stream=True)
    _same_files(tmp_path / "one", tmp_path / "two")
    assert one.total_bytes == meta["total_bytes"] + sum(
        (tmp_path / "two" / f"layer_{i:04d}.safetensors").stat().st_size for i in range(2, len(one.layer_bytes)))


def test_search_refuses_a_workdir_without_room_for_the_bank_before_building(stories_dir, tmp_path, monkeypatch):
    """The session checks the exact estimate once its units are known: one ConfigError naming the work
    directory, and no layer written."""
    import shutil as sh

    import slq.util.preflight as pf
    from slq.search.session import search

    monkeypatch.setattr(pf.shutil, "disk_usage", lambda p: sh._ntuple_diskusage(10**12, 10**12 - 1000, 1000))
    with pytest.raises(ConfigError, match="the bank needs at least") as e:
        search(str(stories_dir), calib_samples=4, seq_len=32, sens_windows=2, verify_windows=2, confirm_windows=0,
               group_size=32, workdir=tmp_path / "work", progress=False, bitwidths=(2, 4, 16))
    assert e.value.field == "workdir" and str(tmp_path / "work" / "bank") in str(e.value)
    assert not list((tmp_path / "work").rglob("layer_*"))
