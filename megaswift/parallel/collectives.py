"""Plain collectives for code outside parallel/: agreement, totals and hand-offs between ranks.

Everything in megaswift that talks to other ranks outside the model's autograd regions (the
loss totals of a step, the non-finite check, a stop request, a reward error, a checkpoint's
barrier) goes through these helpers, so that the one place to read for "what crosses the
network, and when" is parallel/. Each helper is a no-op where the group has one rank or
torch.distributed is not initialised, so a single process runs the same code.

Groups: the default, `WORLD`, is every rank; a process group as ParallelState holds it; or
None, which (as everywhere in parallel/) stands for a group of one rank, so the helper does
nothing. Note the difference from torch.distributed, where None means the world.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


class _World:
    def __repr__(self) -> str:
        return "WORLD"


WORLD = _World()
"""Every rank of the job (torch's default group)."""


def _pg(group):
    return None if group is WORLD else group


def world_size(group=WORLD) -> int:
    """Ranks in `group`: 1 for None, or without torch.distributed."""
    if group is None or not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size(_pg(group))


def initialized() -> bool:
    """Whether this process has a torch.distributed process group."""
    return dist.is_available() and dist.is_initialized()


def rank(group=WORLD) -> int:
    """This process's rank in `group`: 0 for None, or without torch.distributed."""
    if group is None or not initialized():
        return 0
    return dist.get_rank(_pg(group))


def all_reduce(tensor: torch.Tensor, op: str = "sum", group=WORLD) -> torch.Tensor:
    """In place over `group`; returns the tensor. Skipped where the group has one rank."""
    if world_size(group) > 1:
        dist.all_reduce(tensor, op=_OPS[op], group=_pg(group))
    return tensor


def all_reduce_values(values: list[float], device, op: str = "sum", group=WORLD) -> list[float]:
    """Python numbers reduced over `group` in float64, in one collective."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    return all_reduce(t, op, group).tolist()


def any_rank(flag: bool, device, group=WORLD) -> bool:
    """True on every rank when `flag` is True on any rank of `group`."""
    t = torch.tensor(float(flag), device=device)
    return bool(all_reduce(t, "max", group).item())


def broadcast(tensor: torch.Tensor, src: int, group=WORLD) -> torch.Tensor:
    """In place from global rank `src`; returns the tensor."""
    if world_size(group) > 1:
        dist.broadcast(tensor, src=src, group=_pg(group))
    return tensor


def broadcast_object(obj, src: int):
    """A picklable object of our own making (never user data) from global rank `src` to all."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj) -> list:
    """Every rank's object (our own small values), in rank order."""
    if world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def send(tensor: torch.Tensor, dst: int, group=WORLD) -> None:
    dist.send(tensor.contiguous(), dst=dst, group=_pg(group))


def recv(tensor: torch.Tensor, src: int, group=WORLD) -> torch.Tensor:
    dist.recv(tensor, src=src, group=_pg(group))
    return tensor


# -- the job's key-value store: small messages that a collective cannot carry -------------------
def _store():
    return dist.distributed_c10d._get_default_store()


def store_set(key: str, value: str) -> None:
    _store().set(f"megaswift/{key}", value)


def store_get(key: str, default: str | None = None) -> str | None:
    """The value under `key`, or `default` where no rank has set it."""
    full = f"megaswift/{key}"
    store = _store()
    if not store.check([full]):
        return default
    return store.get(full).decode()


def agree_on_error(message: str | None, key: str, device, group=WORLD) -> str | None:
    """Error hand-off: a rank that failed passes its message, the others None; every rank gets
    one failed rank's message (or None when none failed), so all of them can stop with the same
    line instead of the healthy ones waiting in the next collective until the timeout. The
    message travels through the job's store, the fact of a failure through a MAX all-reduce."""
    if world_size(group) == 1:
        return message
    if message is not None:
        store_set(key, message)
    if not any_rank(message is not None, device, group):
        return None
    return message if message is not None else store_get(key, "failed on another rank")
