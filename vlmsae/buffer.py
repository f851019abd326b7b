"""``RingBuffer``: residuals of live forwards, kept on the model's device, read as shuffled batches.

Rows are tokens, each tagged with its kind, position, token id and sample id. The buffer is a
shuffling reservoir: reading walks a random permutation of the rows, and the slots read become
free for the next forwards to fill. Training alternates *read half, refill half*, so the buffer is
always at least half fresh, every activation is read exactly once, and a batch mixes tokens from
many samples (the tokens of one image are highly correlated).

Writing happens in a hook (``record(..., sink=buffer.sink(layer))``) with one indexed copy per
forward and no host synchronisation: the destination of each kept row is computed on the device.
Pad tokens never enter; special tokens and extreme-norm outliers are left out by default and
counted. Rows holding NaN or Inf are counted in ``nonfinite`` before any filter (an Inf row would
otherwise pass as an outlier and vanish), so that training can stop on them. With ``quota`` each
kind gets its own share of the slots and of every batch.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import NamedTuple

import torch
from torch import Tensor

from .adapters import Kind
from .errors import ConfigError
from .hooks import Forward

KIND_NAMES = {k.name.lower(): k for k in Kind if k != Kind.PAD}


class Rows(NamedTuple):
    """A batch of buffer rows."""

    acts: Tensor  # (n, d_model)
    kind: Tensor  # (n,) int8 Kind
    position: Tensor  # (n,) int32 position in its sequence
    token: Tensor  # (n,) int32 token id (-1 where unknown)
    sample: Tensor  # (n,) int64 sample id: forwards are numbered by the samples they carry


class _Segment:
    """The slots of one quota share: a free list being filled, and a permutation being read."""

    def __init__(self, kinds: tuple[Kind, ...], start: int, size: int, share: float, device):
        self.kinds, self.start, self.size, self.share = kinds, start, size, share
        self.kinds_tensor = torch.tensor([int(k) for k in kinds], dtype=torch.int8, device=device)
        self.free = torch.arange(start, start + size, device=device)  # slots to fill, in order
        self.filled = torch.zeros((), dtype=torch.long, device=device)  # how many of them are filled
        self.order = torch.empty(0, dtype=torch.long, device=device)  # the permutation being read
        self.read = 0  # rows of `order` already read


class Admission:
    """Which rows may enter a ring buffer, and counters of those that did not (all on the device).

    ``kinds``: token kinds that may enter (names: image, text, special, generated; padding never does).
    ``quota``: optional ``{kind name: share}`` summing to 1, read by the buffer as its slot groups
    (:attr:`groups`). ``outlier_factor``: rows whose norm exceeds this multiple of the forward's median
    non-pad norm are left out (``None`` keeps them). Rows holding NaN or Inf are counted in
    :attr:`nonfinite` before any filter and are not dropped as outliers (their norm is no measure).
    Raises ``ConfigError`` for an unknown kind, a quota that does not sum to 1 or names a kind left
    out of ``kinds``, or ``outlier_factor <= 1``.
    """

    def __init__(self, kinds, quota: Mapping[str, float] | None, outlier_factor: float | None, device):
        if outlier_factor is not None and not outlier_factor > 1:
            raise ConfigError(f"outlier_factor={outlier_factor!r} must be > 1 (a multiple of the median norm) or None")
        self.kinds = parse_kinds(kinds, "kinds")
        self.outlier_factor = outlier_factor
        self.groups = quota_groups(self.kinds, quota)
        zero = lambda: torch.zeros((), dtype=torch.long, device=device)  # noqa: E731
        self.kept = zero()
        self.left_out = {name: zero() for name in ("pad", "kind", "outlier", "full")}
        self.nonfinite = zero()

    def screen(self, rows: Rows) -> Tensor:
        """``(n,)`` bool: the rows of one forward that are not padding and not outliers (counting the rest)."""
        keep = rows.kind != Kind.PAD
        self.left_out["pad"] += (~keep).sum()
        finite = torch.isfinite(rows.acts).all(-1)
        self.nonfinite += (keep & ~finite).sum()
        if self.outlier_factor is not None:
            outlier = keep & finite & outliers(rows.acts, keep & finite, self.outlier_factor)
            self.left_out["outlier"] += outlier.sum()
            keep &= ~outlier
        return keep

    def count_nonfinite(self, rows: Rows, keep: Tensor) -> None:
        """Count the rows in ``keep`` holding NaN or Inf (rows that were screened elsewhere, e.g. shards)."""
        device = self.nonfinite.device
        self.nonfinite += (keep.to(device) & ~torch.isfinite(rows.acts.to(device)).all(-1)).sum()

    def count_placed(self, wrong_kind: Tensor, written: Tensor) -> None:
        """Count the rows of a write left out for their kind, and those written."""
        self.left_out["kind"] += wrong_kind.sum()
        self.kept += written.sum()

    def counts(self) -> dict[str, int]:
        """The counters on the host (one sync each): kept, left_out_{reason}, nonfinite."""
        return {"kept": int(self.kept), **{f"left_out_{k}": int(v) for k, v in self.left_out.items()},
                "nonfinite": int(self.nonfinite)}


class RingBuffer:
    """Preallocated ``(capacity, d_model)`` rows on one device, filled by hooks, read as shuffled batches.

    ``kinds``: which token kinds may enter (names: image, text, special, generated).
    ``quota``: optional ``{kind name: share}`` summing to 1; each share gets its own slots and that
    share of every batch (e.g. ``{"image": 0.5, "text": 0.5}``). ``outlier_factor``: tokens whose norm
    exceeds this multiple of the forward's median token norm are left out (``None`` keeps them).
    Those three are the buffer's :class:`Admission` (``buffer.admission``, with the counters of rows left
    out); the buffer itself is storage: slots per quota share, written without a host sync, read shuffled.
    Raises ``ConfigError`` for a bad setting (see :class:`Admission`), ``capacity < 2`` or a share too small.
    """

    def __init__(self, capacity: int, d_model: int, *, device="cpu", dtype: torch.dtype = torch.float32,
                 kinds=("image", "text", "generated"), quota: Mapping[str, float] | None = None,
                 outlier_factor: float | None = 10.0, seed: int = 0):
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 2:
            raise ConfigError(f"capacity={capacity!r} must be an integer >= 2 (rows of the buffer)")
        self.capacity, self.d_model, self.device = capacity, d_model, torch.device(device)
        self.admission = Admission(kinds, quota, outlier_factor, self.device)
        self.segments, start = [], 0
        for i, (group, share) in enumerate(self.admission.groups):
            size = capacity - start if i == len(self.admission.groups) - 1 else round(capacity * share)
            if size < 2:
                raise ConfigError(f"quota share {share} of capacity={capacity} leaves {size} rows; raise capacity")
            self.segments.append(_Segment(group, start, size, share, self.device))
            start += size
        # One row past the end takes every write that is dropped, so that a write needs no branch.
        self.acts = torch.zeros(capacity + 1, d_model, dtype=dtype, device=self.device)
        self.kind = torch.zeros(capacity + 1, dtype=torch.int8, device=self.device)
        self.position = torch.zeros(capacity + 1, dtype=torch.int32, device=self.device)
        self.token = torch.zeros(capacity + 1, dtype=torch.int32, device=self.device)
        self.sample = torch.zeros(capacity + 1, dtype=torch.int64, device=self.device)
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.samples = 0  # samples seen so far: sample ids of the next fresh forward start here

    @property
    def outlier_factor(self) -> float | None:
        return self.admission.outlier_factor

    @property
    def kept(self) -> Tensor:
        """Rows written so far (a device counter)."""
        return self.admission.kept

    @property
    def left_out(self) -> dict[str, Tensor]:
        """Rows left out so far by reason: pad, kind, outlier, full (device counters)."""
        return self.admission.left_out

    @property
    def nonfinite(self) -> Tensor:
        """Non-pad rows written with NaN or Inf, counted before any filter (a device counter)."""
        return self.admission.nonfinite

    # --- writing -------------------------------------------------------------------------------

    def write(self, resid: Tensor, fwd: Forward) -> None:
        """Copy the kept positions of one forward's residual ``(batch, seq, d_model)`` into free slots."""
        if resid.shape[-1] != self.d_model:
            raise ConfigError(f"a residual of width {resid.shape[-1]} does not fit this buffer's d_model={self.d_model}")
        if fwd.past == 0:  # a fresh forward brings new samples; a decode step continues the last ones
            self.samples += resid.shape[0]
        rows = tag_rows(resid, fwd, self.samples - resid.shape[0], self.device)
        self._place(rows, self.admission.screen(rows))

    def write_rows(self, rows: Rows, keep: Tensor | None = None) -> None:
        """Copy tagged rows (those in ``keep``, of the admitted kinds) into free slots; the rest is counted."""
        keep = torch.ones_like(rows.kind, dtype=torch.bool) if keep is None else keep
        self.admission.count_nonfinite(rows, keep)
        self._place(rows, keep)

    def _place(self, rows: Rows, keep: Tensor) -> None:
        """Write the rows in ``keep`` of the admitted kinds to free slots, counting the rest (no host sync)."""
        kinds = rows.kind.to(self.device)
        keep = keep.to(self.device)
        dest = torch.full_like(kinds, self.capacity, dtype=torch.long)
        wanted = torch.zeros_like(keep)
        for seg in self.segments:
            mine = keep & torch.isin(kinds, seg.kinds_tensor)
            wanted |= mine
            rank = seg.filled + mine.long().cumsum(0) - 1  # where each kept row goes in the free list
            fits = mine & (rank < seg.free.numel())
            slots = seg.free[rank.clamp(0, max(seg.free.numel() - 1, 0))] if seg.free.numel() else dest
            dest = torch.where(fits, slots, dest)
            seg.filled += fits.sum()
            self.admission.left_out["full"] += (mine & ~fits).sum()
        self.admission.count_placed(keep & ~wanted, dest < self.capacity)
        for name, value in zip(Rows._fields, rows):
            store = getattr(self, name)
            store.index_copy_(0, dest, value.to(self.device, store.dtype))

    def sink(self):
        """A ``record(..., sink=...)`` callable writing into this buffer (one buffer per layer)."""
        return lambda layer, resid, fwd: self.write(resid, fwd)

    # --- reading -------------------------------------------------------------------------------

    def free_rows(self) -> int:
        """Free slots left to fill (one host synchronisation): refill until this is 0."""
        return int(sum(seg.free.numel() - seg.filled for seg in self.segments).item())

    def read(self, batch_size: int, batches: int | None = None) -> Iterator[Rows]:
        """Shuffled batches from the filled rows: by default half the buffer, then the slots read are free.

        Every row is read exactly once between being written and being overwritten. With a quota,
        each batch takes each share of its rows from that share's slots.
        """
        if self.free_rows():
            raise ConfigError("read() needs a full buffer: refill until free_rows() == 0")
        counts = [round(batch_size * seg.share) for seg in self.segments]
        counts[-1] = batch_size - sum(counts[:-1])
        if batches is None:
            batches = min(seg.size // 2 // max(n, 1) for seg, n in zip(self.segments, counts))
        if any(n > seg.size // 2 for seg, n in zip(self.segments, counts)) or batches < 1:
            raise ConfigError(f"batch_size={batch_size} is too large for capacity={self.capacity} (half the "
                              "buffer is read between refills); raise capacity or lower batch_size")
        for seg, n in zip(self.segments, counts):
            seg.free = seg.free[:0]
            seg.filled.zero_()
            if seg.read + batches * n > seg.order.numel():  # a new cycle: a fresh permutation of all rows
                seg.order = seg.start + torch.randperm(seg.size, generator=self.generator, device=self.device)
                seg.read = 0
        for _ in range(batches):
            parts = []
            for seg, n in zip(self.segments, counts):
                parts.append(seg.order[seg.read:seg.read + n])
                seg.free = torch.cat([seg.free, parts[-1]])
                seg.read += n
            index = parts[0] if len(parts) == 1 else torch.cat(parts)
            yield Rows(self.acts[index], self.kind[index], self.position[index], self.token[index],
                       self.sample[index])

    def counts(self) -> dict[str, int]:
        """Rows kept, rows left out by reason (pad, kind filter, outlier norm, buffer full), rows with NaN/Inf."""
        return self.admission.counts()

    # --- checkpoints ---------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Tensor]:
        state = {"acts": self.acts, "kind": self.kind, "position": self.position, "token": self.token,
                 "sample": self.sample, "kept": self.kept,
                 "generator": self.generator.get_state(),
                 "samples": torch.tensor(self.samples)}
        state |= {f"left_out.{k}": v for k, v in self.left_out.items()}
        for i, seg in enumerate(self.segments):
            state |= {f"segment{i}.free": seg.free, f"segment{i}.filled": seg.filled,
                      f"segment{i}.order": seg.order, f"segment{i}.read": torch.tensor(seg.read)}
        return state

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        if state["acts"].shape != self.acts.shape:
            raise ConfigError(f"a buffer state of shape {tuple(state['acts'].shape)} does not fit this buffer "
                              f"{tuple(self.acts.shape)}; build the buffer with the saved capacity and d_model")
        for name in ("acts", "kind", "position", "token", "sample", "kept"):
            getattr(self, name).copy_(state[name])  # `kept` is the admission's counter, copied in place
        for k, counter in self.left_out.items():
            counter.copy_(state[f"left_out.{k}"])
        self.generator.set_state(state["generator"].cpu())
        self.samples = int(state["samples"])
        for i, seg in enumerate(self.segments):
            seg.free = state[f"segment{i}.free"].to(self.device).clone()
            seg.filled = state[f"segment{i}.filled"].to(self.device).clone()
            seg.order = state[f"segment{i}.order"].to(self.device).clone()
            seg.read = int(state[f"segment{i}.read"])


def tag_rows(resid: Tensor, fwd: Forward, first_sample: int, device) -> Rows:
    """Flatten one forward's residual ``(batch, seq, d)`` into rows tagged with kind, position, token, sample."""
    batch, seq, d = resid.shape
    positions = (fwd.past + torch.arange(seq, device=device, dtype=torch.int32)).expand(batch, seq)
    ids = fwd.ids if fwd.ids is not None else torch.full((batch, seq), -1)
    samples = (first_sample + torch.arange(batch, device=device)).unsqueeze(1).expand(batch, seq)
    return Rows(resid.detach().reshape(batch * seq, d).to(device), fwd.kinds.reshape(-1).to(device),
                positions.reshape(-1), ids.reshape(-1).to(device, torch.int32), samples.reshape(-1))


def outliers(acts: Tensor, among: Tensor, factor: float) -> Tensor:
    """``(n,)`` bool: rows whose norm exceeds ``factor`` times the median norm of the rows in ``among``."""
    norms = acts.float().norm(dim=-1)
    return norms > factor * norms.masked_fill(~among, float("nan")).nanmedian()


def parse_kinds(names, what: str) -> tuple[Kind, ...]:
    """Token kinds from names (image, text, special, generated) or ``Kind`` values, sorted, without repeats.

    ``what`` names the argument in errors. Raises ``ConfigError`` for an unknown name, padding, or none.
    """
    names = [names] if isinstance(names, str) else list(names)
    out = []
    for name in names:
        if isinstance(name, Kind) and name != Kind.PAD:
            out.append(name)
        elif name in KIND_NAMES:
            out.append(KIND_NAMES[name])
        else:
            raise ConfigError(f"{what} names {name!r}, which is not a token kind; use {sorted(KIND_NAMES)}")
    if not out:
        raise ConfigError(f"{what}=[] admits no token; name at least one of {sorted(KIND_NAMES)}")
    return tuple(sorted(set(out)))


def quota_groups(kinds: tuple[Kind, ...], quota: Mapping[str, float] | None) -> list[tuple[tuple[Kind, ...], float]]:
    """``[(kinds, share), ...]``: one group of all ``kinds`` without a quota, else one per quota entry.

    Raises ``ConfigError`` unless the shares are positive and sum to 1 and every named kind is in ``kinds``.
    """
    if quota is None:
        return [(kinds, 1.0)]
    shares = {name: float(v) for name, v in quota.items()}
    if any(v <= 0 for v in shares.values()) or abs(sum(shares.values()) - 1) > 1e-6:
        raise ConfigError(f"quota={dict(quota)!r} must give positive shares that sum to 1")
    groups = [(parse_kinds([name], "quota"), share) for name, share in shares.items()]
    missing = [k.name.lower() for group, _ in groups for k in group if k not in kinds]
    if missing:
        raise ConfigError(f"quota names {missing}, which kinds={[k.name.lower() for k in kinds]} leaves out")
    return groups
