"""Training an MGSAE on (image, text) pairs: :class:`MGSAETrainer` (one step) and :func:`train_mgsae` (a run).

The step is SAETrainer's sparse TopK step (one dense encoder matmul, then k rows per code; Adam, decoder
renormalisation, AuxK, the metric readout and its NaN/Inf check, ``state_dict`` for exact resume) on the 2n rows
of n pairs, image rows first, with three changes (Kaushik et al. 2026, arXiv 2601.20028; :mod:`vlmsae.mgsae`):
each row is centred by its modality's b_pre and decoded with its modality's b_dec; a random mask over latents,
one per pair (or per batch) and the same for its two rows, leaves latents out of the TopK selection; and the
loss adds the group-sparsity penalty, computed on the selected entries (never a dense (n, d_sae) code). The mask
is drawn from the trainer's own generator, whose state the checkpoint keeps.

Metrics: a pair is two rows (``tokens`` counts rows, ``l0`` is per code), and FVU is within each modality
(squared error over the sum of the two modalities' variances), so the gap between image and text embeddings
does not count as explained variance.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor
from tqdm.auto import tqdm

from . import metrics
from .checkpoints import read_json, read_tensors
from .errors import ConfigError, NonFiniteError, SAEFileError
from .files import write_folder_atomic
from .mgsae import MGSAE, pair_norm
from .sparse import sparse_decode
from .trainer import SAETrainer, SAETrainerConfig, StepLoss

CHECKPOINT = "checkpoint"
"""``out/checkpoint``: the trainer's state, replaced whole at every checkpoint."""
SAE_FOLDER = "sae"
"""``out/sae``: the trained MGSAE, written at the end of a run."""


def group_sparsity_at(pairs: Tensor, latents: Tensor, values: Tensor, d_sae: int) -> Tensor:
    """() sum over (pair, latent) of sqrt(sum of values^2 of that pair's entries at that latent): the group-sparsity
    penalty of sparse codes, N entries (pair (N,), latent (N,), value (N,)), at most one per row and latent. Equal to
    :func:`vlmsae.mgsae.group_sparsity` of the dense codes, gradient included; no host sync."""
    key, order = (pairs * d_sae + latents).sort()
    squares = values[order].pow(2)
    first = torch.ones_like(key, dtype=torch.bool)
    first[1:] = key[1:] != key[:-1]
    group = first.cumsum(0) - 1  # entries of one (pair, latent) share a group; unused groups stay 0
    return pair_norm(torch.zeros_like(squares).index_add(0, group, squares)).sum()


class MGSAETrainer(SAETrainer):
    """Trains an :class:`~vlmsae.MGSAE` one batch of pairs at a time: ``trainer.step(x)``, x (2, n, d_in) with
    x[0] the image and x[1] the text embeddings of the same n pairs.

    ``seed`` seeds the generator of the training masks. One process only (no ``world``). Raises ConfigError for
    bad settings or a batch that is not (2, n, d_in), NonFiniteError at a readout whose loss is NaN/Inf.
    """

    def __init__(self, sae: MGSAE, cfg: SAETrainerConfig | None = None, *, seed: int = 0, **fields):
        if not isinstance(sae, MGSAE):
            raise ConfigError(f"MGSAETrainer trains an MGSAE, not a {type(sae).__name__}; use SAETrainer for it")
        if "world" in fields:
            raise ConfigError("MGSAETrainer runs in one process; drop world=")
        super().__init__(sae, cfg, **fields)
        self.generator = torch.Generator(device=self.sae.W_dec.device)
        self.generator.manual_seed(seed)
        self._mask: Tensor | None = None  # this step's mask, while its selection runs

    def step(self, x: Tensor, k: int | None = None) -> None:
        """One optimiser step on the pairs x (2, n, d_in); `k`: this step's TopK, None: the SAE's own."""
        if x.ndim != 3 or x.shape[0] != 2 or x.shape[2] != self.sae.cfg.d_in:
            raise ConfigError(f"x has shape {tuple(x.shape)}; a batch of n pairs is (2, n, d_in={self.sae.cfg.d_in}):"
                              " torch.stack([x_image, x_text])")
        super().step(x, k)

    def _loss(self, x: Tensor, k: int | None, kinds: Tensor | None = None) -> StepLoss:
        """The MGSAE loss (:mod:`vlmsae.mgsae`) of the pairs x (2n, d_in), image rows first, plus AuxK."""
        sae, cfg = self.sae, self.sae.cfg
        n = x.shape[0] // 2
        k = cfg.k if k is None else k
        aux_k, dense_aux, dead = self._aux_plan()
        x_n = x * sae.act_scale.to(x.dtype)
        u = torch.cat([sae.center(x[:n], "image"), sae.center(x[n:], "text")])
        mask = sae.random_mask(n, self.generator)
        self._mask = mask
        try:
            chosen = self._select(u, dead, 0 if dense_aux else aux_k, k)
        finally:
            self._mask = None
        if mask is not None:  # a masked latent picked because fewer than k were left stays at 0, even recomputed
            at = mask[chosen.code.rows % n if mask.shape[0] > 1 else 0, chosen.code.cols]
            chosen = chosen._replace(values=chosen.values.masked_fill(at, -math.inf))
        acts, aux_acts, aux_code = self._encode_selected(u, chosen)
        recon_n = sparse_decode(acts, sae.W_dec, chosen.code) + sae.b_dec.repeat_interleave(n, dim=0)
        group = group_sparsity_at(chosen.code.rows % n, chosen.code.cols, acts, cfg.d_sae)
        loss = ((x_n - recon_n).pow(2).sum() + cfg.group_coefficient * group) / n
        aux_loss = torch.zeros((), device=x.device)
        if aux_k:
            aux_loss = self._auxk_loss(u, x_n - recon_n, dead, aux_k, dense_aux, aux_acts, aux_code)
            # a per-element MSE; the loss sums squared errors over d_in and the pair's two rows
            loss = loss + cfg.aux_coefficient * aux_loss * (2 * cfg.d_in)
        return StepLoss(loss, recon_n, *self._fired(acts, chosen.code), aux_loss)

    def _encoder_chunks(self, u: Tensor):
        """SAETrainer's chunks of pre-activations, with this step's masked latents at -inf (out of every TopK)."""
        mask, n = self._mask, u.shape[0] // 2
        for start, stop, pre in super()._encoder_chunks(u):
            if mask is not None:
                rows = mask if mask.shape[0] == 1 else mask[torch.arange(start, stop, device=u.device) % n]
                pre.masked_fill_(rows, -math.inf)
            yield start, stop, pre

    def _total_variance(self, x_n: Tensor) -> Tensor:
        """Within each modality: the variance of the image rows plus that of the text rows."""
        n = x_n.shape[0] // 2
        return metrics.total_variance(x_n[:n]) + metrics.total_variance(x_n[n:])

    def state_dict(self) -> tuple[dict[str, Tensor], dict]:
        """SAETrainer's state and the mask generator's."""
        tensors, meta = super().state_dict()
        tensors["mask_generator"] = self.generator.get_state()
        return tensors, meta

    def load_state_dict(self, tensors: dict[str, Tensor], meta: dict, source: str = "checkpoint") -> None:
        """Restore what :meth:`state_dict` returned; ``source`` names where it came from in errors."""
        if "mask_generator" not in tensors:
            raise ConfigError(f"{source}: holds no mask_generator state, so it is not an MGSAETrainer's")
        super().load_state_dict(tensors, meta, source)
        self.generator.set_state(tensors["mask_generator"].to("cpu", torch.uint8))


def train_mgsae(x_image: Tensor, x_text: Tensor, sae: MGSAE, *, steps: int, batch_size: int = 4096, seed: int = 0,
                trainer_cfg: SAETrainerConfig | None = None, out: str | Path | None = None,
                checkpoint_every: int | None = None, resume: bool = False, progress: bool = True,
                **trainer_fields) -> MGSAETrainer:
    """Train `sae` on n (image, text) pairs, x_image and x_text (n, d_in) (row i of each is pair i), for `steps`
    steps of `batch_size` pairs; returns the trainer (``.sae`` the trained MGSAE, ``.history`` the readouts).

    Every epoch visits the pairs in a permutation drawn from ``seed + epoch``, dropping its last incomplete batch
    (``batch_size`` is at most n); the training masks come from ``seed`` too. ``trainer_cfg`` or
    ``trainer_fields`` (lr, sync_every, ...) set the :class:`~vlmsae.SAETrainerConfig`. With ``out``: the trainer's
    state goes to ``out/checkpoint`` every ``checkpoint_every`` steps and at the end, and the SAE to ``out/sae``;
    ``resume=True`` continues from ``out/checkpoint`` (the SAE's weights replaced by the checkpoint's), ending
    bitwise where an uninterrupted run ends. A tqdm bar shows FVU, L0 and dead fraction at each readout.

    Raises ConfigError for a bad setting or a resume with other pairs, seed or batch size; NonFiniteError if a
    row holds NaN or Inf (checked before any step: the SAE and ``out`` are left as they were) or the loss or the
    weights turn NaN/Inf (no checkpoint is written from that state); SAEFileError for a damaged checkpoint.
    """
    n = _check_pairs(x_image, x_text, sae.cfg.d_in)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"steps={steps!r} must be an integer >= 1")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size={batch_size!r} must be an integer >= 1")
    if (checkpoint_every is not None or resume) and out is None:
        raise ConfigError("checkpoint_every= and resume=True write and read out/checkpoint; pass out=")
    if checkpoint_every is not None and (isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int)
                                         or checkpoint_every < 1):
        raise ConfigError(f"checkpoint_every={checkpoint_every!r} must be None or an integer >= 1")
    batch_size = min(batch_size, n)
    run = {"n_pairs": n, "batch_size": batch_size, "seed": seed}
    trainer = MGSAETrainer(sae, trainer_cfg, seed=seed, **trainer_fields)
    out = None if out is None else Path(out)
    if resume:
        _load_checkpoint(out / CHECKPOINT, trainer, run)
    last_good = out / CHECKPOINT if resume else None
    per_epoch = n // batch_size
    device = trainer.sae.W_dec.device
    order, order_epoch = None, -1
    with tqdm(total=steps, initial=trainer.n_steps, disable=not progress, desc="MGSAE") as bar:
        while trainer.n_steps < steps:
            epoch, j = divmod(trainer.n_steps, per_epoch)
            if epoch != order_epoch:
                order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
                order_epoch = epoch
            rows = order[j * batch_size:(j + 1) * batch_size]
            trainer.step(torch.stack([x_image[rows], x_text[rows]]).to(device))
            bar.update(1)
            if trainer.n_steps % trainer.sync_every == 0:
                m = trainer.history[-1]
                bar.set_postfix_str(f"fvu {m.fvu:.3f} l0 {m.l0:.1f} dead {m.dead_fraction:.2f} "
                                    f"(silent {metrics.token_count(m.dead_window)} tok)", refresh=False)
            if out is not None and (trainer.n_steps == steps or (checkpoint_every and
                                                                  trainer.n_steps % checkpoint_every == 0)):
                last_good = _save_checkpoint(out / CHECKPOINT, trainer, run, last_good)
    if out is not None:
        trainer.stored.save(out / SAE_FOLDER)
    return trainer


def _check_pairs(x_image: Tensor, x_text: Tensor, d_in: int) -> int:
    """The number of pairs; raises ConfigError for shapes that are not (n, d_in) twice, NonFiniteError for NaN/Inf."""
    if x_image.ndim != 2 or x_image.shape != x_text.shape or x_image.shape[1] != d_in or not len(x_image):
        raise ConfigError(f"x_image {tuple(x_image.shape)} and x_text {tuple(x_text.shape)} must both be "
                          f"(n, d_in={d_in}) with n >= 1, row i of each the two sides of pair i")
    bad = ~(torch.isfinite(x_image).all(1) & torch.isfinite(x_text).all(1))
    if bad.any():
        rows = bad.nonzero().view(-1)
        raise NonFiniteError(f"{len(rows)} pairs hold NaN or Inf (rows {rows[:8].tolist()}); drop them before "
                             "training (nothing was trained)")
    return len(x_image)


def _save_checkpoint(folder: Path, trainer: MGSAETrainer, run: dict, last_good: Path | None) -> Path:
    """Write the trainer's state to `folder` as one folder swap; never from NaN/Inf weights (NonFiniteError)."""
    if not all(torch.isfinite(p).all() for p in trainer.sae.parameters()):
        raise NonFiniteError(f"NaN or Inf in the MGSAE's weights by step {trainer.n_steps}; last good checkpoint: "
                             f"{last_good or 'none written yet'}. Lower the learning rate")
    tensors, meta = trainer.state_dict()

    def write(tmp: Path) -> None:
        save_file({name: t.detach().to("cpu").contiguous() for name, t in tensors.items()},
                  str(tmp / "trainer.safetensors"))
        (tmp / "trainer.json").write_text(json.dumps({**meta, "run": run}), encoding="utf-8")

    folder.parent.mkdir(parents=True, exist_ok=True)
    return write_folder_atomic(folder, write)


def _load_checkpoint(folder: Path, trainer: MGSAETrainer, run: dict) -> None:
    """Restore `trainer` from `folder`, after checking it was written for the same pairs, seed and batch size."""
    if not folder.is_dir():
        raise ConfigError(f"resume=True but {folder} does not exist; run without resume")
    damaged = f"delete {folder} and run without resume=True, or restore it from a copy"
    meta = read_json(folder / "trainer.json", damaged)
    tensors = read_tensors(folder / "trainer.safetensors", trainer.sae.W_dec.device, damaged)
    if not isinstance(meta, dict) or not isinstance(meta.get("run"), dict):
        raise SAEFileError(f"{folder / 'trainer.json'}: needs an object with a 'run' object; {damaged}")
    if meta["run"] != run:
        raise ConfigError(f"{folder} was written by a run with {meta['run']}, this one has {run}; resume with the "
                          "same pairs, seed and batch_size, or start a new run")
    try:
        trainer.load_state_dict(tensors, meta, str(folder))
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as err:
        raise SAEFileError(f"{folder}: the checkpoint does not hold what this vlmsae writes "
                           f"({type(err).__name__}: {str(err)[:200]}); {damaged}") from err
