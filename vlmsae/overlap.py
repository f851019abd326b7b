"""``StepStreams``: the SAE steps of online training on their own CUDA stream, overlapping the next forwards.

Online training alternates a fill (model forwards writing the ring buffers) with a read phase (SAE steps
on half the buffer). Neither depends on the other within a phase: the steps read rows gathered before the
fill writes over their slots, and the forwards never touch an SAE. On CUDA the steps are therefore
launched on a side stream of each device and the next fill's forwards on the device's current stream, so
the GPU runs them at once while the host launches the forwards (the host waits only for the current
stream: one sync per forward). On the CPU, or with ``enabled=False``, every method is a no-op and the run
is the plain alternation.

The rules that make this safe (CUDA caching allocator semantics, ``torch.cuda.Stream``):

- a phase's batches are gathered on the current stream before any step is launched, and each side stream
  waits for that gather (:meth:`gathered`); the gathered tensors are marked as used by the side stream
  (``Tensor.record_stream``) so that their memory is not handed out again before the steps have read them.
  This holds a read phase's rows twice (half the buffer) while the steps run;
- the steps run under :meth:`steps` (the side streams are current there);
- before the host or the current stream reads anything the steps wrote (SAE weights, trainer state,
  the run's NaN markers), :meth:`join` makes the current streams wait for the side streams. Tensors both
  sides write are updated in place, never reallocated, while a phase runs.

The design goal this serves (issue 17, DESIGN.md's performance model): harvest + train at least 0.85 of
harvest alone for a 7B config on one GPU; ``benchmarks/gpu_figures.py`` measures it with and without.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch


class StepStreams:
    """One side stream per CUDA device in ``devices`` (none on the CPU or when ``enabled`` is False)."""

    def __init__(self, devices: Iterable[torch.device], enabled: bool = True):
        cuda = {_indexed(torch.device(d)) for d in devices if torch.device(d).type == "cuda"} if enabled else set()
        self.side = {d: torch.cuda.Stream(device=d) for d in sorted(cuda, key=str)}

    @property
    def active(self) -> bool:
        """Whether any step runs on a side stream (CUDA devices and ``enabled``)."""
        return bool(self.side)

    def gathered(self, batches: Iterator) -> Iterable:
        """The phase's batches (tuples of ``Rows``), gathered now on the current streams; the side streams
        wait for the gather and own the gathered tensors until they are done. Without side streams:
        ``batches`` as given (gathered lazily, step by step)."""
        if not self.side:
            return batches
        batches = list(batches)
        for device, stream in self.side.items():
            stream.wait_stream(torch.cuda.current_stream(device))
        for rows in batches:
            for r in rows:
                for tensor in r:
                    if tensor.device in self.side:
                        tensor.record_stream(self.side[tensor.device])
        return batches

    @contextlib.contextmanager
    def steps(self):
        """The side streams are current inside (a no-op without them). Entering a stream also makes its device
        the current one: with several GPUs the last one is current inside, which nothing in a read phase relies
        on (every tensor names its device)."""
        with contextlib.ExitStack() as stack:
            for stream in self.side.values():
                stack.enter_context(torch.cuda.stream(stream))
            yield

    def join(self) -> None:
        """Every device's current stream waits for its side stream (before reading what the steps wrote)."""
        for device, stream in self.side.items():
            torch.cuda.current_stream(device).wait_stream(stream)


def _indexed(device: torch.device) -> torch.device:
    """``cuda`` as ``cuda:N`` (the current device), the form a tensor's ``.device`` takes."""
    return device if device.index is not None else torch.device("cuda", torch.cuda.current_device())
