"""Data-parallel plumbing for online training: the process group, this rank's place, the reductions.

The engine is ``torch.distributed``, set up from the environment that ``torchrun`` and
``accelerate launch`` write (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
``MASTER_PORT``): gloo on CPU, NCCL on CUDA. Each rank runs its own replica of the frozen model on
its own device over its own shard of the data (batch ``i`` goes to rank ``i % world``), feeds its
own ring buffers, and keeps one SAE per layer in sync. The frozen model is never wrapped in DDP.

Why the gradients are all-reduced by hand rather than by ``DistributedDataParallel``: the loss of
a step is a mean over that step's tokens, and DDP averages the ranks' gradients, which equals the
gradient of the global mean only when every rank holds the same number of tokens. SAETrainer also
forms part of its gradients outside autograd (the sparse decode's custom backward, the removal of
the decoder-parallel component), so a wrapped module's hooks would see only part of the step.
Here each rank scales its gradient by its share ``n_rank / n_global`` of the step's tokens and
the ranks' gradients are summed (:meth:`World.sum_`): the gradient of the loss over the whole
global batch, whatever the shard sizes (the decomposable loss of DESIGN.md, "Scale"). Every other
statistic that defines the objective is global too: the token count, the dead-latent counters,
the variance behind FVU (reduced as sums of x and of x^2), and the first batch that sets ``b_dec``
and the input scale (gathered whole, :meth:`World.gather_rows`). Identical gradients, Adam states
and schedules keep the replicas bitwise identical after every step.
"""

from __future__ import annotations

import atexit
import datetime
import os
import pickle
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .errors import ConfigError

TIMEOUT_S = 600
"""Seconds a collective may wait for the other ranks before the process group gives up (no silent hang)."""

RELEASE_S = 10.0
"""Seconds :func:`collective` waits at most for gloo's worker threads to let go of a collective's tensors."""


def collective(fn, /, *args, **kwargs):
    """``fn(*args, **kwargs)`` (a blocking ``torch.distributed`` collective), returning only once no gloo worker
    thread still holds one of the CPU tensors among ``args`` / ``kwargs`` (a list of tensors counts too).

    A gloo worker drops its references to a collective's tensors just after the collective completes, while the
    caller runs on. Should Python have dropped its own first (a temporary), the worker's drop frees the tensor's
    Python object, which takes the GIL. While the interpreter tears down, that aborts a rank whose work is done
    (SIGABRT, "terminate called without an active exception"); inside torch 2.6's ``destroy_process_group``, which
    joins the workers while holding the GIL, it deadlocks (about one two-rank run in two). Holding Python's
    references (``args``) until the workers' are gone, sleeping with the GIL released meanwhile, closes both; the
    wait is a few microseconds. (On torch 2.13 a worker's count can fall a moment before it frees the Python object;
    its ``destroy_process_group`` joins the workers without the GIL, so that is harmless there.) CUDA tensors are
    not waited on: NCCL's watchdog, not the caller, holds them. Every collective on tensors in vlmsae goes through
    here.
    """
    tensors = [t for a in (*args, *kwargs.values()) for t in (a if isinstance(a, (list, tuple)) else [a])
               if isinstance(t, Tensor) and t.device.type == "cpu"]
    held = [t._use_count() for t in tensors]
    out = fn(*args, **kwargs)
    deadline = time.monotonic() + RELEASE_S
    while any(t._use_count() > n for t, n in zip(tensors, held)) and time.monotonic() < deadline:
        time.sleep(1e-5)
    return out


@dataclass(frozen=True)
class World:
    """This process's place among the ranks of an initialised process group (size >= 2).

    ``device`` is where collectives run: ``cuda:LOCAL_RANK`` under NCCL, the CPU under gloo.
    """

    rank: int
    size: int
    local_rank: int
    device: torch.device

    @property
    def main(self) -> bool:
        """Rank 0: the one that shows progress, logs and writes the shared files."""
        return self.rank == 0

    def sum_(self, tensor: Tensor) -> Tensor:
        """All-reduce ``tensor`` in place as a sum over ranks (moved to the collective device and back)."""
        return self._reduce(tensor, dist.ReduceOp.SUM)

    def max_(self, tensor: Tensor) -> Tensor:
        """All-reduce ``tensor`` in place as a maximum over ranks."""
        return self._reduce(tensor, dist.ReduceOp.MAX)

    def _reduce(self, tensor: Tensor, op) -> Tensor:
        moved = tensor if tensor.device == self.device else tensor.to(self.device)
        collective(dist.all_reduce, moved, op=op)
        return tensor if moved is tensor else tensor.copy_(moved)

    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on any (one small all-reduce: ranks agree to stop)."""
        return bool(self.max_(torch.tensor([int(flag)], device=self.device)).item())

    def broadcast_(self, tensor: Tensor, src: int = 0) -> Tensor:
        """Overwrite ``tensor`` in place with rank ``src``'s."""
        moved = tensor if tensor.device == self.device else tensor.to(self.device)
        collective(dist.broadcast, moved, src=src)
        return tensor if moved is tensor else tensor.copy_(moved)

    def gather_rows(self, x: Tensor) -> Tensor:
        """``(sum of n_r, d)``: every rank's rows ``(n_r, d)`` concatenated in rank order, on every rank."""
        return torch.cat(self._gather_parts(x)).to(x.device)

    def gather_objects(self, obj: Any) -> list:
        """Every rank's ``obj`` (anything picklable, e.g. a dict of metrics), in rank order, on every rank."""
        data = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
        return [pickle.loads(part.cpu().numpy().tobytes()) for part in self._gather_parts(data)]

    def _gather_parts(self, x: Tensor) -> list[Tensor]:
        """Every rank's ``x`` (first dimension ``n_r``, the others equal), in rank order, on the collective device."""
        n = torch.tensor([x.shape[0]], device=self.device)
        sizes = [torch.zeros_like(n) for _ in range(self.size)]
        collective(dist.all_gather, sizes, n)
        sizes = [int(s) for s in sizes]
        padded = torch.zeros(max(sizes), *x.shape[1:], dtype=x.dtype, device=self.device)
        padded[:x.shape[0]] = x.to(self.device)
        parts = [torch.empty_like(padded) for _ in range(self.size)]
        collective(dist.all_gather, parts, padded)
        return [p[:s] for p, s in zip(parts, sizes)]

    def barrier(self) -> None:
        """Wait for every rank (on NCCL, on this rank's device)."""
        if self.device.type == "cuda":
            dist.barrier(device_ids=[self.device.index])
        else:
            dist.barrier()


def current() -> World | None:
    """The World of an initialised process group with two or more ranks, else None (one process)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return None
    local_rank = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
    device = torch.device("cuda", local_rank) if dist.get_backend() == "nccl" else torch.device("cpu")
    return World(dist.get_rank(), dist.get_world_size(), local_rank, device)


def init_from_env(backend: str | None = None, timeout_s: float = TIMEOUT_S) -> World | None:
    """Join the process group that ``torchrun`` / ``accelerate launch`` describe in the environment.

    Nothing happens (None) when ``WORLD_SIZE`` is unset or 1; an already initialised group is used as
    it is. ``backend``: None picks NCCL when CUDA is available, else gloo. ``timeout_s`` bounds every
    collective, so that a rank that died fails the others instead of hanging them. Raises
    ``ConfigError`` when ``WORLD_SIZE`` > 1 but ``RANK`` or ``MASTER_ADDR`` is missing.
    """
    if dist.is_available() and dist.is_initialized():
        return current()
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size < 2:
        return None
    if not dist.is_available():
        raise ConfigError(f"WORLD_SIZE={size} but this torch build has no torch.distributed; install one that has "
                          "it, or run one process")
    missing = [name for name in ("RANK", "MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if missing:
        raise ConfigError(f"WORLD_SIZE={size} but {', '.join(missing)} unset; launch with torchrun --nproc_per_node "
                          f"{size} or accelerate launch, which set them")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    atexit.register(_destroy_at_exit)
    return current()


def _destroy_at_exit() -> None:
    """Destroy the process group :func:`init_from_env` created, at exit while the interpreter is still whole
    (left to the teardown, a gloo worker still busy would abort the rank; see :func:`collective`). A group the
    user destroyed already is left alone.
    """
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def local_device(world: World | None, device: str) -> str:
    """The device a rank puts its model replica on: ``cuda`` becomes ``cuda:LOCAL_RANK`` under N ranks."""
    if world is not None and device == "cuda":
        return f"cuda:{world.local_rank}"
    return device


def per_rank(total: int, world: World | None, name: str) -> int:
    """``total`` split evenly over the ranks (``batch_size`` and ``buffer_size`` are global).

    Raises ``ConfigError`` naming the value and the world size when it does not divide evenly.
    """
    if world is None:
        return total
    if total % world.size:
        raise ConfigError(f"{name}={total} is global (summed over ranks) and must divide evenly over the "
                          f"{world.size} ranks; use a multiple of {world.size}, e.g. {total - total % world.size or world.size}")
    return total // world.size


class RankShard:
    """The batches of ``data`` that belong to one rank: batch ``i`` goes to rank ``i % size``.

    Re-iterable whenever ``data`` is (each pass starts over, as a new epoch).
    """

    def __init__(self, data, rank: int, size: int):
        self.data, self.rank, self.size = data, rank, size

    def __iter__(self):
        for i, batch in enumerate(self.data):
            if i % self.size == self.rank:
                yield batch
