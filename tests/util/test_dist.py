"""The rank helpers: split is a deterministic partition, and the dict collectives move every rank's items
(checked in a real two-process gloo group spawned here)."""

from __future__ import annotations

import torch
import torch.multiprocessing as mp

from slq.util import dist


def test_split_partitions_items_once_each_whatever_the_world():
    items = [f"x{i}" for i in range(11)]
    cost = {f"x{i}": (i * 7) % 5 + 1 for i in range(11)}.get
    for world in (1, 2, 3, 5):
        for c in (None, cost):
            parts = [dist.split(items, r, world, c) for r in range(world)]
            assert sorted(x for p in parts for x in p) == sorted(items)
            assert all(p == sorted(p, key=items.index) for p in parts)  # original order kept
            assert parts == [dist.split(items, r, world, c) for r in range(world)]  # deterministic
            if c is not None:
                loads = [sum(map(c, p)) for p in parts]
                assert max(loads) - min(loads) <= max(map(c, items))


def test_single_group_helpers_are_the_identity():
    d = {"b": torch.ones(2), "a": torch.zeros(1)}
    assert list(dist.all_gather_dict(dist.SINGLE, d)) == ["a", "b"]
    assert dist.gather_dict(dist.SINGLE, d)["b"] is d["b"]
    assert dist.SINGLE.writes and not dist.SINGLE.distributed


def _rank(rank: int, world: int, port: int, out: str):
    torch.set_num_threads(1)
    g = dist.init(rank, world, port)
    mine = {f"r{rank}.{i}": torch.full((2,), float(rank * 10 + i)) for i in range(rank + 1)}
    everyone = dist.all_gather_dict(g, mine)
    at0 = dist.gather_dict(g, mine)
    told = dist.broadcast_dict(g, {"from0": torch.arange(3)} if g.rank == 0 else None)
    if g.writes:
        torch.save({"all": everyone, "at0": at0, "told": told}, out)
    g.barrier()
    dist.shutdown(g)


def test_gloo_ranks_gather_and_broadcast_dicts(tmp_path):
    out = str(tmp_path / "r.pt")
    mp.spawn(_rank, args=(2, dist.free_port(), out), nprocs=2, join=True)
    got = torch.load(out)
    assert list(got["all"]) == ["r0.0", "r1.0", "r1.1"]
    assert torch.equal(got["all"]["r1.1"], torch.full((2,), 11.0))
    assert list(got["at0"]) == list(got["all"])
    assert torch.equal(got["told"]["from0"], torch.arange(3))
