"""Several processes over torch.distributed: the group, a deterministic split of work, and moving results to rank 0.

A :class:`Group` is this process's place among ``world`` ranks (``rank`` 0..world-1). With ``world == 1`` every
helper is the identity and no process group is created, so library code calls them unconditionally.

* :func:`init_from_env` joins the group ``torchrun`` describes (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``,
  ``MASTER_PORT``, ``LOCAL_RANK``); :func:`init` joins a group of processes spawned by the caller (a test, or
  ``slq quantize --gpus N``) at ``127.0.0.1:port``. The backend is NCCL when the ranks run on CUDA, else gloo.
* :func:`split` partitions a list of items over ranks. It depends only on the items (and their costs), never
  on timing, so every rank computes the same partition without talking to the others; with costs it is the
  greedy longest-first assignment (ties to the lowest rank), which keeps the ranks' loads within one largest
  item of each other.
* :func:`all_gather_dict` / :func:`gather_dict` / :func:`broadcast_dict` move ``{name: value}`` dicts (values
  holding CPU tensors) between ranks through torch's object collectives; the merged dict is rebuilt in
  sorted-key order, so its order does not depend on which rank answered first.
* "rank 0 writes": :attr:`Group.writes` is True on rank 0 only; files are written there, after the others'
  results were gathered.

Invariant for byte-identical results with 1 and N ranks: the ranks divide *independent* computations (each
item is computed by exactly one rank, from inputs every rank holds equally), and only their results travel;
nothing is summed across ranks, since a sum's rounding would depend on how the work was split.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Any, Callable, Sequence, TypeVar

import torch

from .errors import SlqError

T = TypeVar("T")


@dataclass(frozen=True)
class Group:
    """This process's ``rank`` among ``world`` ranks; ``device`` is where it computes."""

    rank: int = 0
    world: int = 1
    device: str = "cpu"

    @property
    def writes(self) -> bool:
        """Rank 0 writes files (checkpoints, reports, banks)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier()


SINGLE = Group()


def _backend(device: str) -> str:
    return "nccl" if device.startswith("cuda") else "gloo"


def init(rank: int, world: int, port: int, device: str = "cpu", addr: str = "127.0.0.1") -> Group:
    """Join the group of ``world`` processes meeting at ``addr:port`` as ``rank``; on CUDA rank r uses cuda:r."""
    if not (isinstance(world, int) and world >= 1 and 0 <= rank < world):
        raise SlqError(f"rank {rank} is not in a group of {world}")
    if device.startswith("cuda"):
        if torch.cuda.device_count() < world:
            raise SlqError(f"{world} ranks on CUDA need {world} GPUs, found {torch.cuda.device_count()}")
        device = f"cuda:{rank}"
        torch.cuda.set_device(device)
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group(_backend(device), init_method=f"tcp://{addr}:{port}", rank=rank,
                                             world_size=world)
    return Group(rank, world, device)


def init_from_env(device: str = "cpu") -> Group:
    """The group ``torchrun`` set up in the environment, or the single-process group when there is none."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Group(0, 1, device)
    rank = int(os.environ["RANK"])
    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', rank))}"
        torch.cuda.set_device(device)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(_backend(device), init_method="env://")
    return Group(rank, world, device)


def shutdown(group: Group) -> None:
    if group.distributed and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def free_port() -> int:
    """A TCP port free on this host right now (for a spawned group's rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def split(items: Sequence[T], rank: int, world: int, cost: Callable[[T], float] | None = None) -> list[T]:
    """The items rank ``rank`` of ``world`` takes, in their original order.

    Without ``cost``: items ``rank, rank + world, ...``. With ``cost``: longest first to the least loaded rank
    (ties: the earlier item, the lower rank). Every rank computes the same partition; together they cover
    every item exactly once.
    """
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in 0..{world - 1}")
    if cost is None:
        return list(items[rank::world])
    load = [0.0] * world
    owner = [0] * len(items)
    for i in sorted(range(len(items)), key=lambda i: (-cost(items[i]), i)):
        r = min(range(world), key=lambda r: (load[r], r))
        owner[i] = r
        load[r] += cost(items[i])
    return [it for i, it in enumerate(items) if owner[i] == rank]


def _to_cpu(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu()
    if isinstance(x, dict):
        return {k: _to_cpu(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)) and not hasattr(x, "_fields"):
        return type(x)(_to_cpu(v) for v in x)
    return x


def all_gather_dict(group: Group, mine: dict[str, Any]) -> dict[str, Any]:
    """Every rank's ``mine`` merged (keys sorted), on every rank; keys must not repeat across ranks."""
    if not group.distributed:
        return dict(sorted(mine.items()))
    parts: list[Any] = [None] * group.world
    torch.distributed.all_gather_object(parts, _to_cpu(mine))
    return _merge(parts)


def gather_dict(group: Group, mine: dict[str, Any]) -> dict[str, Any] | None:
    """Every rank's ``mine`` merged on rank 0 (keys sorted); None on the other ranks."""
    if not group.distributed:
        return dict(sorted(mine.items()))
    parts: list[Any] | None = [None] * group.world if group.rank == 0 else None
    torch.distributed.gather_object(_to_cpu(mine), parts, dst=0)
    return _merge(parts) if group.rank == 0 else None


def broadcast_dict(group: Group, value: dict[str, Any] | None) -> dict[str, Any]:
    """Rank 0's ``value`` on every rank (the others pass None)."""
    if not group.distributed:
        return value
    box = [_to_cpu(value) if group.rank == 0 else None]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def _merge(parts: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for p in parts:
        dup = set(out) & set(p)
        if dup:
            raise SlqError(f"two ranks computed the same item {sorted(dup)[0]!r}")
        out.update(p)
    return dict(sorted(out.items()))


__all__ = ["Group", "SINGLE", "all_gather_dict", "broadcast_dict", "free_port", "gather_dict", "init",
           "init_from_env", "shutdown", "split"]
