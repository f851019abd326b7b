"""One training step of a TopK / BatchTopK SAE whose latents are sharded over a process group (issue 13, item 5).

Every rank gets the same batch and trains its own slice of the latents (`vlmsae.sharded_sae.ShardedSAE`):

    pre_local  = center(x) @ W_enc_local + b_enc_local          dense, as the unsharded loss pass
    latents    = the global TopK / BatchTopK (candidates exchanged; see vlmsae.sharded_sae)
    recon_n    = all_reduce_sum(latents_local @ W_dec_local) + b_dec
    loss       = mse(x * act_scale, recon_n)                    replicated: the same scalar on every rank

Backward sends each rank's slice its own gradient; the replicated b_dec gets the whole gradient on every rank
(the encoder input's gradient is all-reduced, Megatron-LM's f, Shoeybi et al. 2019). Adam is elementwise, so
Adam on each slice (and on the replicated b_dec, identically on every rank) is Adam on the whole SAE; decoder
rows are renormalised locally. The result equals one `vlmsae.SAETrainer` step on the unsharded SAE (to float
rounding: 1e-5 in the tests) with these limits:

- topk and batchtopk only (ConfigError otherwise); no `k` annealing.
- No AuxK: it equals SAETrainer while SAETrainer's AuxK is off, i.e. until a readout finds a dead latent, or
  with ``aux_coefficient=0``. No metric window, readouts or checkpoints.
- The loss pass is dense over this rank's ``(n_tokens, d_local)`` latents, not the sparse kernels of
  `vlmsae.sparse`; the selection runs in the weights' dtype (``compute_dtype`` is not read).
"""

import math
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from vlmsae import metrics
from vlmsae.distributed import collective
from vlmsae.errors import ConfigError
from vlmsae.sharded_sae import ShardedSAE
from vlmsae.trainer import SAETrainerConfig


class ShardedTrainer:
    """Trains a :class:`ShardedSAE` one batch at a time: ``trainer.step(x)`` on every rank, with the same x
    (..., d_in). Reads ``lr``, ``betas``, ``eps`` and ``init_from_first_batch`` of an SAETrainerConfig (the
    default lr scales with the full d_sae, as SAETrainer's). Raises ConfigError for an architecture other than
    topk / batchtopk.
    """

    def __init__(self, sae: ShardedSAE, cfg: SAETrainerConfig | None = None, **fields: Any):
        if cfg is None:
            cfg = SAETrainerConfig(**fields)
        elif fields:
            raise ConfigError(f"pass either an SAETrainerConfig or its fields, not both (got cfg and {sorted(fields)})")
        if sae.cfg.architecture not in ("topk", "batchtopk"):
            raise ConfigError(f"ShardedTrainer trains topk and batchtopk SAEs, not {sae.cfg.architecture!r}; train "
                              "relu and jumprelu SAEs unsharded with SAETrainer")
        if sae.cfg.matryoshka_widths is not None:
            raise ConfigError(f"ShardedTrainer has no Matryoshka losses (matryoshka_widths="
                              f"{list(sae.cfg.matryoshka_widths)}); train Matryoshka SAEs unsharded with SAETrainer")
        self.sae, self.cfg = sae, cfg
        lr = cfg.lr if cfg.lr is not None else 2e-4 / math.sqrt(sae.cfg.d_sae / 2**14)
        options = dict(lr=lr, betas=cfg.betas, eps=cfg.eps)
        try:  # as SAETrainer: fused Adam where the device has it
            self.optimizer = torch.optim.Adam(sae.parameters(), fused=True, **options)
        except RuntimeError:
            self.optimizer = torch.optim.Adam(sae.parameters(), foreach=True, **options)
        self.initialized = not cfg.init_from_first_batch
        self.n_steps = 0
        self.n_tokens = 0

    def step(self, x: Tensor) -> Tensor:
        """One optimiser step on ``x`` (..., d_in), the same batch on every rank (a collective).

        Returns the loss (), detached, the same on every rank (no host synchronisation).
        """
        sae = self.sae
        x = x.reshape(-1, sae.cfg.d_in).to(device=sae.W_dec.device, dtype=sae.W_dec.dtype)
        if not self.initialized:
            sae.init_from_batch(x)
            self.initialized = True
        sae.train()
        with torch.enable_grad():
            pre = sae.pre_acts(x)
            latents = sae.activate(pre)
            # act_scale is a power of two: recon * act_scale is exactly the normalised reconstruction.
            recon_n = sae.decode(latents) * sae.act_scale.to(x.dtype)
            loss = metrics.mse(x * sae.act_scale.to(x.dtype), recon_n)
            sae.zero_grad(set_to_none=True)
            loss.backward()
        if sae.cfg.architecture == "batchtopk":
            self.update_threshold(latents.detach())
        sae.remove_parallel_decoder_grad_()
        self.optimizer.step()
        sae.normalize_decoder_()
        self.n_steps += 1
        self.n_tokens += x.shape[0]
        return loss.detach()

    @torch.no_grad()
    def update_threshold(self, latents: Tensor) -> None:
        """BatchTopK inference threshold: moving average of the smallest kept activation over all ranks (one
        all_reduce MIN), as SAETrainer's (Bussmann et al. 2024)."""
        sae = self.sae
        smallest = torch.where(latents > 0, latents, math.inf).min()
        if sae.world > 1:
            collective(dist.all_reduce, smallest, op=dist.ReduceOp.MIN, group=sae.group)
        lr = sae.cfg.batchtopk_threshold_lr
        moved = (1 - lr) * sae.threshold + lr * smallest.to(sae.threshold.dtype)
        sae.threshold.copy_(torch.where(torch.isfinite(smallest), moved, sae.threshold))
