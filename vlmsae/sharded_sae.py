"""An SAE whose latents are split over the ranks of a torch.distributed process group (issue 13, item 5).

For SAEs bigger than one device (>= 1M latents, design doc "Scale"): every rank sees the same tokens and holds
one contiguous slice of the latents, ``lo:hi`` with ``hi - lo = d_sae / world``:

    rank r holds   W_enc[:, lo:hi] (d_in, d_local), b_enc[lo:hi], W_dec[lo:hi] (d_local, d_in), threshold[lo:hi]
    every rank     b_dec (d_in,), act_scale ()            (replicated)

    pre_local  = center(x) @ W_enc_local + b_enc_local            (..., d_local), no communication
    latents    = activation(pre), chosen over all ranks:
      topk       each token's local top-k (values, global indices) -> all_gather -> world * k candidates per
                 token -> the global top-k; a rank keeps the winners in its slice
      batchtopk  (training) the same over the whole batch: local top k * n_tokens, exchanged, the global
                 k * n_tokens (a global threshold); at inference a per-latent threshold, no exchange
      relu, jumprelu   elementwise, no exchange
    recon      = (all_reduce_sum(latents_local @ W_dec_local) + b_dec) / act_scale   (..., d_in), replicated

Latents stay in sharded form: each rank's ``(..., d_local)`` slice, latent ``lo + j`` of the full SAE at
column ``j``; concatenating the ranks' slices in rank order gives the unsharded SAE's ``(..., d_sae)`` latents.
The exchange moves ``world * k`` (value, index) pairs per token, never ``d_sae`` scores: the scheme of the
design doc's Scale table (the "SAE > 1 GPU" row; issue 13), after the latent-sharded TopK SAEs of Gao et
al. 2024. The decoder's all_reduce and the encoder input's backward all_reduce are Megatron-LM's g and f
operators (Shoeybi et al. 2019).

Ties. ``torch.topk`` does not say which of equal values it keeps. Every selection here keeps, among equal
values, the lowest global index (the latent for topk, ``token * d_sae + latent`` for batchtopk), on every rank
and for every world size, so a sharded SAE picks the same latents for any number of ranks. On untied scores
(any continuous data) this equals the unsharded ``SAE``; on exact ties the unsharded SAE picks what
``torch.topk`` picks.

With one process (world size 1) the collectives are skipped, and an unsharded ``SAE`` is never touched by
this module: single-process results do not change.
"""

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from vlmsae.distributed import collective
from vlmsae.errors import ConfigError
from vlmsae.sae import SAE, SAEConfig, SAEOutput

SLICED = ("W_enc", "b_enc", "W_dec", "threshold")
"""The tensors split along the latents (W_enc along its columns, the others along their first dimension)."""


def shard_bounds(d_sae: int, world: int, rank: int) -> tuple[int, int]:
    """``(lo, hi)``: the latents of ``rank`` out of ``world`` ranks, a contiguous slice of d_sae / world.

    Raises ConfigError if d_sae is not a multiple of the world size (every rank holds an equal slice, so that the
    exchanges and the gather move equal shapes).
    """
    if world < 1 or not 0 <= rank < world:
        raise ConfigError(f"rank={rank} must be in 0..world size-1 = {world - 1}")
    if d_sae % world:
        raise ConfigError(f"d_sae={d_sae} is not a multiple of the world size {world}; choose d_sae divisible by "
                          f"{world} (e.g. {d_sae - d_sae % world + world}) or run on a world size that divides it")
    d_local = d_sae // world
    return rank * d_local, (rank + 1) * d_local


def topk_lowest_index(scores: Tensor, keep: int) -> Tensor:
    """(rows, width) scores -> (rows, keep) positions of the ``keep`` largest per row, where among equal scores
    the lowest position wins (``torch.topk`` leaves that choice open). The positions come in no set order.

    Costs one ``topk`` and a few elementwise passes over the scores; no host synchronisation.
    """
    kth = scores.topk(keep, dim=-1, sorted=False).values.amin(-1, keepdim=True)  # the keep-th largest score
    above = scores > kth
    tied = scores == kth
    take = above | (tied & (tied.cumsum(-1) <= keep - above.sum(-1, keepdim=True)))  # exactly `keep` per row
    return take.to(torch.uint8).topk(keep, dim=-1, sorted=False).indices


def select_global(scores: Tensor, index: Tensor, keep: int, group: Any = None) -> tuple[Tensor, Tensor]:
    """The ``keep`` largest of each row over all ranks: (rows, keep) global indices and their scores.

    scores (rows, width): this rank's scores; index (rows, width) int64: their global indices, increasing along
    each row, every index held by one rank. Each rank sends its local top ``min(keep, width)`` (values and
    indices, an ``all_gather`` of ``world * min(keep, width)`` pairs per row); the winners among the candidates,
    ties to the lowest global index, are the same on every rank. Every rank must call it with the same rows and
    ``keep``. Raises ConfigError if ``keep`` exceeds the scores of all ranks together.
    """
    world = dist.get_world_size(group) if dist.is_initialized() else 1
    if keep > world * scores.shape[-1]:
        raise ConfigError(f"keep={keep} exceeds the {world * scores.shape[-1]} scores per row over {world} ranks")
    local = topk_lowest_index(scores, min(keep, scores.shape[-1])).sort(dim=-1).values  # ascending index
    values, indices = scores.gather(-1, local), index.gather(-1, local)
    if world > 1:
        values, indices = _all_gather_last(values, group), _all_gather_last(indices, group)
        # Ranks' candidates interleave in global index (batchtopk: token-major); sort them so that
        # "lowest position" below means "lowest global index".
        indices, order = indices.sort(dim=-1)
        values = values.gather(-1, order)
    winners = topk_lowest_index(values, keep)
    return indices.gather(-1, winners), values.gather(-1, winners)


def _all_gather_last(tensor: Tensor, group: Any) -> Tensor:
    """(rows, n) on each rank -> (rows, world * n): the ranks' tensors side by side, in rank order."""
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    collective(dist.all_gather, parts, tensor.contiguous(), group=group)
    return torch.cat(parts, dim=-1)


class _ReduceFromShards(torch.autograd.Function):
    """Sum of the ranks' partial results (Megatron's g): all_reduce forward; identity backward, since every
    rank computes the same replicated loss from the sum."""

    @staticmethod
    def forward(ctx, partial: Tensor, group: Any) -> Tensor:
        total = partial.clone()
        collective(dist.all_reduce, total, group=group)
        return total

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


class _CopyToShards(torch.autograd.Function):
    """A replicated input that every rank's slice reads (Megatron's f): identity forward; all_reduce backward,
    since the input's gradient is the sum of what each slice sends back."""

    @staticmethod
    def forward(ctx, replicated: Tensor, group: Any) -> Tensor:
        ctx.group = group
        return replicated.clone()

    @staticmethod
    def backward(ctx, grad: Tensor):
        total = grad.clone()
        collective(dist.all_reduce, total, group=ctx.group)
        return total, None


class ShardedSAE(nn.Module):
    """One rank's slice of an SAE whose ``d_sae`` latents are split over a process group; see the module docstring.

    Build it with :meth:`from_sae` on every rank (from the same full SAE), use ``encode`` / ``decode`` /
    ``forward`` as on an ``SAE`` (every rank with the same input, at the same time: they are collectives), and
    :meth:`gather` it back to a full ``SAE`` (for ``SAE.save`` on one rank). ``group``: the process group (None:
    the default one); without an initialised process group it is a world of one.
    """

    def __init__(self, cfg: SAEConfig, tensors: dict[str, Tensor], group: Any = None):
        super().__init__()
        if cfg.normalize_per_kind:
            raise ConfigError("a ShardedSAE has one input scale; an SAE with normalize_per_kind=True is not sharded yet: "
                              "train it unsharded (vlmsae.train, SAETrainer)")
        if cfg.k_per_kind is not None:
            raise ConfigError(f"a ShardedSAE keeps one k per token; an SAE with k_per_kind={cfg.k_per_kind} is not "
                              "sharded yet: train it unsharded (vlmsae.train, SAETrainer)")
        self.cfg, self.group = cfg, group
        self.world = dist.get_world_size(group) if dist.is_initialized() else 1
        self.rank = dist.get_rank(group) if dist.is_initialized() else 0
        self.lo, self.hi = shard_bounds(cfg.d_sae, self.world, self.rank)
        d_local = self.hi - self.lo
        shapes = {"W_enc": (cfg.d_in, d_local), "b_enc": (d_local,), "W_dec": (d_local, cfg.d_in),
                  "b_dec": (cfg.d_in,), "act_scale": ()}
        if cfg.architecture in ("jumprelu", "batchtopk"):
            shapes["threshold"] = (d_local,)
        if set(tensors) != set(shapes) or any(tuple(tensors[n].shape) != s for n, s in shapes.items()):
            got = {n: tuple(t.shape) for n, t in tensors.items()}
            raise ConfigError(f"rank {self.rank} of {self.world} of a {cfg.architecture} SAE with d_in={cfg.d_in}, "
                              f"d_sae={cfg.d_sae} holds {shapes}, not {got}")
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            setattr(self, name, nn.Parameter(tensors[name]))
        if cfg.architecture == "jumprelu":
            self.threshold = nn.Parameter(tensors["threshold"])
        elif cfg.architecture == "batchtopk":
            self.register_buffer("threshold", tensors["threshold"])
        self.register_buffer("act_scale", tensors["act_scale"])

    @classmethod
    def from_sae(cls, sae: SAE, group: Any = None) -> "ShardedSAE":
        """This rank's slice of ``sae`` (copies, on ``sae``'s device, in its train / eval mode); every rank of
        ``group`` calls it with the same SAE. Raises ConfigError if d_sae is not a multiple of the world size."""
        world = dist.get_world_size(group) if dist.is_initialized() else 1
        rank = dist.get_rank(group) if dist.is_initialized() else 0
        lo, hi = shard_bounds(sae.cfg.d_sae, world, rank)
        tensors = {}
        for name, value in sae.state_dict().items():
            value = value.detach()
            if name == "W_enc":
                value = value[:, lo:hi]
            elif name in SLICED:
                value = value[lo:hi]
            tensors[name] = value.clone().contiguous()
        return cls(sae.cfg, tensors, group).train(sae.training)

    @torch.no_grad()
    def gather(self, dst: int = 0, device: torch.device | str | None = "cpu") -> SAE | None:
        """The full SAE on rank ``dst`` of the group (None on the others), its tensors on ``device`` (None: this
        rank's device), in this slice's train / eval mode. A collective: every rank calls it.

        The slices come one rank at a time (point-to-point ``send`` / ``recv``), so ``dst`` needs one slice of
        room on its own device besides the full SAE on ``device``.
        """
        full = {}
        for name, value in self.state_dict().items():
            if self.rank != dst:
                if name in SLICED and self.world > 1:
                    collective(dist.send, value.contiguous(), dst=self._global_rank(dst), group=self.group)
                continue
            if name not in SLICED or self.world == 1:
                full[name] = value.to(device)
                continue
            parts = [(value if src == dst else self._receive(value, src)).to(device) for src in range(self.world)]
            full[name] = torch.cat(parts, dim=1 if name == "W_enc" else 0)
        if self.rank != dst:
            return None
        return SAE.from_tensors(self.cfg, full).train(self.training)

    def _global_rank(self, rank: int) -> int:
        """The default group's number of this group's ``rank`` (what ``send`` and ``recv`` take)."""
        return rank if self.group is None else dist.get_global_rank(self.group, rank)

    def _receive(self, like: Tensor, src: int) -> Tensor:
        """Rank ``src``'s slice of the tensor whose local slice is ``like``."""
        buffer = torch.empty_like(like)
        collective(dist.recv, buffer, src=self._global_rank(src), group=self.group)
        return buffer

    # The same on every rank as on the unsharded SAE: they read cfg, W_dec's dtype, act_scale and b_dec only.
    unit_norm_decoder = SAE.unit_norm_decoder
    normalize = SAE.normalize
    center = SAE.center

    def pre_acts(self, x: Tensor) -> Tensor:
        """(..., d_in) -> (..., d_local) this rank's encoder pre-activations (no communication in the forward;
        the backward all-reduces the input's gradient)."""
        u = self.center(x)
        if self.world > 1:
            u = _CopyToShards.apply(u, self.group)
        return u @ self.W_enc + self.b_enc

    def activate(self, pre: Tensor) -> Tensor:
        """(..., d_local) this rank's pre-activations -> its slice of the sparse latents, as ``SAE.activate``:
        topk and batchtopk in training exchange candidates (see the module docstring); relu, jumprelu and
        batchtopk at inference are elementwise. The selection carries no gradient; the kept values do."""
        arch = self.cfg.architecture
        if arch == "topk" or (arch == "batchtopk" and self.training):
            return self._select(pre)
        if arch == "relu":
            return pre.relu()
        return pre.relu() * (pre > self.threshold)

    def _select(self, pre: Tensor) -> Tensor:
        """TopK per token (topk) or over the batch (batchtopk): the kept pre-activations, ReLU'd, zero elsewhere."""
        d_local, d_sae = self.hi - self.lo, self.cfg.d_sae
        latent = torch.arange(self.lo, self.hi, device=pre.device)
        if self.cfg.architecture == "topk":
            scores, keep = pre.detach().reshape(-1, d_local), self.cfg.k
            index = latent.expand_as(scores)
        else:
            n_tokens = pre[..., 0].numel()
            scores, keep = pre.detach().reshape(1, -1), self.cfg.k * n_tokens
            token = torch.arange(n_tokens, device=pre.device)
            index = (token[:, None] * d_sae + latent).reshape(1, -1)  # the unsharded flat index
        with torch.no_grad():
            winners, _ = select_global(scores, index, keep, self.group)
            column, token = winners % d_sae, winners // d_sae
            mine = (column >= self.lo) & (column < self.hi)
            position = column - self.lo if self.cfg.architecture == "topk" else token * d_local + column - self.lo
            position = torch.where(mine, position, scores.shape[1])  # winners of other ranks go to a dropped column
            keep_mask = torch.zeros(scores.shape[0], scores.shape[1] + 1, dtype=torch.bool, device=pre.device)
            keep_mask.scatter_(1, position, True)
        keep_mask = keep_mask[:, :-1].reshape(pre.shape)
        return torch.where(keep_mask, pre, torch.zeros((), dtype=pre.dtype, device=pre.device)).relu()

    def encode(self, x: Tensor) -> Tensor:
        """(..., d_in) -> (..., d_local) this rank's slice of the sparse latents."""
        return self.activate(self.pre_acts(x))

    def decode(self, latents: Tensor) -> Tensor:
        """(..., d_local) this rank's slice of the latents -> (..., d_in) reconstruction in the model's units, the
        same on every rank (one all_reduce of the partial sums), as ``SAE.decode``."""
        partial = latents.to(self.W_dec.dtype) @ self.W_dec
        if self.world > 1:
            partial = _ReduceFromShards.apply(partial, self.group)
        return (partial + self.b_dec) / self.act_scale.to(self.W_dec.dtype)

    def forward(self, x: Tensor) -> SAEOutput:
        """(..., d_in) -> reconstruction (..., d_in), replicated; latents and pre-activations (..., d_local), this
        rank's slice."""
        pre = self.pre_acts(x)
        latents = self.activate(pre)
        return SAEOutput(self.decode(latents), latents, pre)

    @torch.no_grad()
    def init_from_batch(self, x: Tensor) -> None:
        """Set the input scale and b_dec from a first batch (..., d_in), as ``SAE.init_from_batch`` does: both are
        replicated and depend on the batch alone, so every rank computes the same values (no communication)."""
        # The same math, not a copy of it: SAE.init_from_batch reads only cfg, act_scale and b_dec.
        SAE.init_from_batch(self, x)

    # Each decoder row is local to its rank, so SAE's row-wise methods apply to the slice as they are.
    normalize_decoder_ = SAE.normalize_decoder_
    remove_parallel_decoder_grad_ = SAE.remove_parallel_decoder_grad_
