"""``vlmsae.train``: online SAE training while the model runs.

    data batches ──► model forward (record, stopped after the deepest layer)
                         │ one sink per layer
                         ▼
                    RingBuffer per layer ──► shuffled batches ──► SAETrainer.step, per SAE

The loop alternates two phases: *fill* (forwards until every buffer's free slots are written)
and *read* (half of each buffer, one optimiser step per batch for every SAE). One forward feeds
every layer and every SAE. Checkpoints are written at the end of a read phase, once at least
``checkpoint_every`` steps have passed since the last one; ``resume=True`` continues from the
latest so that the final weights equal an uninterrupted run (bitwise on CPU).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable, Mapping
from dataclasses import asdict, astuple, dataclass, field, fields as dataclass_fields, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import distributed, metrics
from .adapters import Kind
from .buffer import Admission, RingBuffer
from .checkpoints import latest_checkpoint, load_checkpoint, save_checkpoint
from .data import LiveSource
from .deprecation import renamed_attributes, warn_renamed
from .errors import ConfigError, NonFiniteError, SiteError
from .layer_owners import LayerOwners
from .overlap import StepStreams
from .sae import SAE
from .shards import ShardSource, Shards
from .sites import parse_site
from .trainer import SAETrainer, SAETrainerConfig, TrainMetrics

__all__ = ["OnlineRunConfig", "OnlineRun", "TrainResult", "train", "lr_factor", "k_at", "latest_checkpoint",
           "RUN_SYNC_EVERY"]

RUN_SYNC_EVERY = 25
"""Readout cadence of ``vlmsae.train`` when SAETrainerConfig leaves ``sync_every`` unset (a lone trainer: 100)."""
RANK_SEED_STRIDE = 1_000_003
"""Under N ranks, rank r shuffles its buffers with seed + layer + r * this (rank 0 as one process does)."""
TRAINER_FIELDS = frozenset(f.name for f in dataclass_fields(SAETrainerConfig))
MOVED_TO_TRAINER = ("lr", "sync_every")  # OnlineRunConfig fields whose owner is now SAETrainerConfig


@dataclass
class OnlineRunConfig:
    """How an online training run goes (steps, buffer, schedules, checkpoints, logging).

    The SAE's own recipe lives in SAEConfig; the optimiser and the readout cadence (``lr``,
    ``sync_every``) in SAETrainerConfig. Raises ``ConfigError`` for a bad value.
    """

    steps: int = 1000
    """Optimiser steps per SAE."""
    batch_size: int = 4096
    """Tokens per SAE step, global: under N ranks each rank reads batch_size / N of them."""
    buffer_size: int = 65536
    """Rows of each layer's ring buffer, global: under N ranks each rank holds buffer_size / N; half of
    it is refilled between read phases."""
    kinds: tuple[str, ...] = ("image", "text", "generated")
    """Token kinds that enter the buffer (special tokens and padding never do)."""
    special_ids: tuple[int, ...] = ()
    """Token ids counted as SPECIAL besides the model config's, e.g. a chat template's control tokens
    (``vlmsae.special_token_ids(model, processor)``): kept out of the buffer like every special token. Any iterable
    of ints, or None; kept sorted, as a tuple (so that checkpoints can write it)."""
    quota: dict[str, float] | str | None = None
    """Share of each batch per kind, e.g. {"image": 0.5, "text": 0.5}; "balanced": equal shares of image and text
    (text alone for a model without image tokens); None keeps the data's own mix (at real size a LLaVA-1.5 forward
    brings 576 image rows to about 24 text rows: 96% image). The run prints the mix its buffers start with."""
    outlier_factor: float | None = 10.0
    """Tokens whose norm exceeds this multiple of the forward's median norm are left out."""
    buffer_dtype: str = "float32"
    """dtype of the buffer rows (bfloat16 halves its memory on GPU)."""
    site: str = "resid_post"
    """Hook site of every trained layer: any site of the model (``vlmsae.layers(model).sites``), e.g.
    ``"vision.resid_post"``; ``vlmsae.train`` also reads it from hook names given as ``layer``."""
    lr: float | None = None
    """Deprecated (one release): set ``lr`` on SAETrainerConfig, or pass ``lr=`` to ``vlmsae.train``."""
    warmup_steps: int = 50
    """Linear warmup from 0 to the peak learning rate."""
    decay_fraction: float = 0.2
    """Final fraction of the steps over which the learning rate decays linearly to 0."""
    k_start: int | None = 64
    """TopK kinds: start at this k and anneal linearly to the SAE's k (None: no annealing)."""
    k_anneal_fraction: float = 0.25
    """Fraction of the steps over which k anneals."""
    sync_every: int | None = None
    """Deprecated (one release): set ``sync_every`` on SAETrainerConfig, or pass ``sync_every=`` to ``vlmsae.train``."""
    checkpoint_every: int | None = None
    """Write a checkpoint after at least this many steps (at the end of a read phase); None: never."""
    seed: int = 0
    """Seeds the buffers' shuffling."""
    device: str | None = None
    """Where buffers and SAEs live; None: the model's device (CPU when training from shards)."""
    parallel: str = "data"
    """Under N ranks: "data" (every rank trains every SAE on its share of each batch, gradients all-reduced)
    or "layers" (each rank trains only its layers' SAEs, on rows every rank sends it; :mod:`vlmsae.layer_owners`).
    One process ignores it."""
    wandb: str | None = None
    """A wandb project name to log to (wandb must be installed); None: no logging."""
    progress: bool = True
    """Show a tqdm progress bar with live metrics."""
    overlap: bool = True
    """On CUDA, run the SAE steps on their own stream so that they overlap the next fill's forwards
    (:mod:`vlmsae.overlap`; holds a read phase's rows twice while they run). No effect on the CPU; the trained
    SAEs are those of the plain alternation either way."""

    def __post_init__(self):
        self.special_ids = tuple(sorted(int(i) for i in self.special_ids or ()))
        for name in ("steps", "batch_size", "buffer_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name}={value!r} must be an integer >= 1")
        moved = [name for name in MOVED_TO_TRAINER if getattr(self, name) is not None]
        if moved:
            warn_renamed(f"OnlineRunConfig({', '.join(f'{n}=' for n in moved)}...)",
                         "SAETrainerConfig's fields of the same names (pass them to vlmsae.train as before, or in "
                         "trainer_cfg=)", stacklevel=4)
            SAETrainerConfig(**{name: getattr(self, name) for name in moved})  # the same checks as there
        if self.buffer_size < 2 * self.batch_size:
            raise ConfigError(f"buffer_size={self.buffer_size} must be at least 2 x batch_size={self.batch_size} "
                              "(half the buffer is read between refills)")
        if self.checkpoint_every is not None and (not isinstance(self.checkpoint_every, int)
                                                  or self.checkpoint_every < 1):
            raise ConfigError(f"checkpoint_every={self.checkpoint_every!r} must be None or an integer >= 1")
        if not 0 <= self.decay_fraction <= 1 or not 0 <= self.k_anneal_fraction <= 1:
            raise ConfigError(f"decay_fraction={self.decay_fraction} and k_anneal_fraction="
                              f"{self.k_anneal_fraction} must be in [0, 1]")
        if self.parallel not in ("data", "layers"):
            raise ConfigError(f"parallel={self.parallel!r} must be 'data' (replicated SAEs, gradients all-reduced) "
                              "or 'layers' (one owner per layer)")
        if isinstance(self.quota, str) and self.quota != "balanced":
            raise ConfigError(f"quota={self.quota!r} must be a dict of shares, 'balanced' or None")
        if not isinstance(self.overlap, bool):
            raise ConfigError(f"overlap={self.overlap!r} must be True or False")
        if self.buffer_dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError(f"buffer_dtype={self.buffer_dtype!r} must be float32, bfloat16 or float16")


def lr_factor(step: int, cfg: OnlineRunConfig) -> float:
    """Learning-rate multiplier at ``step``: linear warmup, constant, linear decay to 0."""
    warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
    decay_steps = int(cfg.decay_fraction * cfg.steps)
    left = cfg.steps - step
    return warm * (min(1.0, left / decay_steps) if decay_steps else 1.0)


def k_at(step: int, target: int, cfg: OnlineRunConfig, d_sae: int) -> int:
    """k at ``step``: linear from ``k_start`` down (or up) to the SAE's own k over the anneal fraction."""
    if cfg.k_start is None:
        return target
    start = min(cfg.k_start, d_sae)
    span = cfg.k_anneal_fraction * cfg.steps
    if span <= 0 or step >= span:
        return target
    return round(start + (target - start) * step / span)


def _saes_by_layer(d_model: int, layer, sae) -> dict[int, list[SAE]]:
    wanted = [layer] if isinstance(layer, int) else list(layer)
    if isinstance(sae, Mapping):
        given = {int(k): (list(v) if isinstance(v, (list, tuple)) else [v]) for k, v in sae.items()}
        if sorted(given) != sorted(wanted):
            raise ConfigError(f"sae= names layers {sorted(given)} but layer= is {wanted}; give one entry per layer")
    elif sae is None:
        given = {L: [SAE(d_in=d_model, d_sae=8 * d_model, k=min(32, d_model))] for L in wanted}
    else:
        if len(wanted) != 1:
            raise ConfigError(f"one sae= for layers {wanted}: pass a dict {{layer: SAE}} or sae=None")
        given = {wanted[0]: list(sae) if isinstance(sae, (list, tuple)) else [sae]}
    for L, saes in given.items():
        for s in saes:
            if not isinstance(s, SAE):
                raise ConfigError(f"sae for layer {L} is a {type(s).__name__}, not a vlmsae.SAE")
            if s.cfg.d_in != d_model:
                raise ConfigError(f"the SAE for layer {L} has d_in={s.cfg.d_in} but the activations have d_model="
                                  f"{d_model}; build it with d_in={d_model}")
    return given


def trainer_config(cfg: OnlineRunConfig, trainer_cfg: SAETrainerConfig | None, fields: dict) -> SAETrainerConfig:
    """The one SAETrainerConfig of a run, from ``trainer_cfg``, SAETrainerConfig ``fields`` given to
    ``vlmsae.train`` and the deprecated ``lr`` / ``sync_every`` of OnlineRunConfig; ``sync_every`` left
    unset becomes ``RUN_SYNC_EVERY``. Raises ``ConfigError`` naming both values when two of them disagree.
    """
    if trainer_cfg is None:
        trainer_cfg = SAETrainerConfig(**fields)
    for name, value in fields.items():
        if getattr(trainer_cfg, name) != value:
            raise ConfigError(f"{name}={value!r} disagrees with trainer_cfg's {name}={getattr(trainer_cfg, name)!r}; "
                              f"set {name} once")
    for name in MOVED_TO_TRAINER:
        old, new = getattr(cfg, name), getattr(trainer_cfg, name)
        if old is not None and new is not None and old != new:
            raise ConfigError(f"OnlineRunConfig {name}={old!r} disagrees with SAETrainerConfig {name}={new!r}; "
                              f"set {name} once, on SAETrainerConfig (the OnlineRunConfig field is deprecated)")
        if old is not None:
            trainer_cfg = replace(trainer_cfg, **{name: old})
    if trainer_cfg.sync_every is None:
        trainer_cfg = replace(trainer_cfg, sync_every=RUN_SYNC_EVERY)
    return trainer_cfg


@dataclass
class TrainResult:
    """What ``vlmsae.train`` returns, whatever the shape of its ``sae=`` argument.

    The SAEs are the objects that were passed in (or built, for ``sae=None``), trained in place and
    in eval mode. For one release the result also behaves as the old return value (the SAE, a list of
    SAEs, or a dict by layer, in the shape ``sae=`` was given): indexing it, iterating it, calling it or
    reading an SAE attribute from it still works, with a DeprecationWarning.
    """

    saes: dict[int, list[SAE]]
    """Every trained SAE: ``{layer: [SAE, ...]}``, in the order they were given."""
    history: list[dict]
    """One dict per SAE at every metric readout: ``layer``, ``sae`` (its index) and the TrainMetrics fields."""
    checkpoint: Path | None
    """The last checkpoint written (None without ``out=`` and ``checkpoint_every=``)."""
    legacy: object = field(repr=False, compare=False)
    """The old return value (deprecated; removed in 0.3 with the forwarding below)."""

    @property
    def sae(self) -> SAE:
        """The only SAE of the run; raises ``ConfigError`` when it trained several (use ``saes``)."""
        every = [s for group in self.saes.values() for s in group]
        if len(every) != 1:
            raise ConfigError(f"this run trained {len(every)} SAEs (layers {sorted(self.saes)}); "
                              "read them from .saes[layer][i]")
        return every[0]

    def _old(self):
        warn_renamed("using the result of vlmsae.train as an SAE, a list or a dict",
                     ".sae (one SAE) or .saes ({layer: [SAE, ...]}) of the TrainResult", stacklevel=4)
        return self.legacy

    def __getattr__(self, name: str):
        if name.startswith("__") or name == "legacy":
            raise AttributeError(name)
        return getattr(self._old(), name)

    def __getitem__(self, key):
        return self._old()[key]

    def __iter__(self):
        return iter(self._old())

    def __len__(self) -> int:
        return len(self._old())

    def __contains__(self, key) -> bool:
        return key in self._old()

    def __call__(self, *args, **kwargs):
        return self._old()(*args, **kwargs)

    def __bool__(self) -> bool:
        return True


def train(model, layer: int | Iterable[int], data: Iterable[dict], sae=None, *, cfg: OnlineRunConfig | None = None,
          trainer_cfg: SAETrainerConfig | None = None, out: str | os.PathLike | None = None, resume: bool = False,
          history: list | None = None, **fields) -> TrainResult:
    """Train SAEs on the residual of ``layer`` (one or many) from ``data`` (batches of model inputs).

    ``layer`` is a layer index (at ``site=``, default the decoder's ``resid_post``) or a hook name of any site
    of the model (``"vision.blocks.3.hook_resid_post"``, ``"vision.hook_proj_out"``, ``"hook_image_embeds"``);
    the saved SAEs' ``hook_name`` metadata names the site.

    ``sae``: an SAE, a list of SAEs (one layer), a dict ``{layer: SAE or [SAE]}``, or None (TopK, 8x,
    k=32 per layer). ``fields`` set OnlineRunConfig fields (``steps=``, ``batch_size=``, ...) and
    SAETrainerConfig fields (``lr=``, ``sync_every=``, ...); ``cfg`` and ``trainer_cfg`` pass whole
    configs instead. ``sync_every`` (default 25 here) is the one readout cadence of the run and of its
    trainers. With ``out`` the final SAEs are written to ``out/L{layer}[-{i}]`` and checkpoints to
    ``out/checkpoints``. ``history``, a list, receives the records of ``TrainResult.history`` as they come.
    ``data`` may also be :class:`vlmsae.Shards` (then ``model`` is None).
    Returns a :class:`TrainResult` (``.sae``, ``.saes``, ``.history``, ``.checkpoint``).

    Raises ``ConfigError`` for a bad setting or two that disagree, ``NonFiniteError`` on NaN/Inf in
    activations or weights (naming the step, the layer and the last good checkpoint),
    ``SAEFileError`` for a damaged checkpoint when resuming.
    """
    run_fields = {k: v for k, v in fields.items() if k not in TRAINER_FIELDS}
    if cfg is None:
        cfg = OnlineRunConfig(**run_fields)
    elif run_fields:
        raise ConfigError(f"pass either cfg= or OnlineRunConfig fields, not both (got {sorted(run_fields)})")
    trainer_cfg = trainer_config(cfg, trainer_cfg, {k: v for k, v in fields.items() if k in TRAINER_FIELDS})
    if resume and out is None:
        raise ConfigError("resume=True needs out= (the folder holding the checkpoints)")
    layer, cfg = _named_layers(layer, cfg)
    run = OnlineRun(model, layer, data, sae, cfg, trainer_cfg, out, history)
    if resume:
        run.resume()
    run.run()
    if sae is None or isinstance(sae, Mapping) or not isinstance(layer, int):
        legacy = {L: group[0] if len(group) == 1 else group for L, group in run.saes.items()}
    else:
        legacy = run.saes[layer][0] if isinstance(sae, SAE) else run.saes[layer]
    return TrainResult(run.saes, run.history, run.last_checkpoint, legacy)


def _named_layers(layer, cfg: OnlineRunConfig) -> tuple[int | list[int], OnlineRunConfig]:
    """``layer`` as layer indices and ``cfg`` with the site its hook names give (``"vision.blocks.3.hook_resid_post"``).

    Raises ``SiteError`` for hook names of several sites, or one that disagrees with ``cfg.site``."""
    names = [layer] if isinstance(layer, (int, str)) else list(layer)
    if not any(isinstance(name, str) for name in names):
        return layer, cfg
    parsed = [parse_site(name, cfg.site) for name in names]
    sites = {site for _, site in parsed}
    if len(sites) > 1:
        raise SiteError(f"layer={layer!r} names sites {sorted(sites)}; train one site per run")
    indices = [index for index, _ in parsed]
    return (indices[0] if isinstance(layer, (int, str)) else indices), replace(cfg, site=sites.pop())


class OnlineRun:
    """One online training run: the SAEs, their trainers and schedulers, a ring buffer per layer, a source.

    The source (:class:`vlmsae.data.LiveSource` over a model, :class:`vlmsae.shards.ShardSource` over
    shards) says how wide the rows are and where each layer's buffer and SAEs live. :meth:`run` reads
    top to bottom: fill the buffers, then for each batch of the read phase a :meth:`step` of every SAE,
    a :meth:`readout` every ``sync_every`` steps, and at the end of the phase
    :meth:`checkpoint_if_needed`. Host synchronisations happen in :meth:`guard_finite` (one per
    readout), in the source's fill (one per forward) and in the trainers' readouts. Everything that
    leaves the run's process at a readout passes :meth:`readout_metrics`.

    Under ``torchrun`` / ``accelerate launch`` (``WORLD_SIZE`` > 1; see :mod:`vlmsae.distributed`)
    ``world`` is this rank's place: the data is dealt out batch by batch (:class:`RankShard`), each
    rank holds ``buffer_size / N`` rows per layer and reads ``batch_size / N`` per step, the SAEs
    start as rank 0's, and the trainers make every step's gradients and counts global. The points
    where ranks meet are named: :meth:`sync_saes` (start), the trainers' step (gradients, token
    counts, dead latents, FVU variance, initial ``b_dec``), :meth:`agree_filled` (the stop
    condition: a rank whose data fails stops every rank), :meth:`guard_finite`,
    :meth:`readout_metrics` and the checkpoints. Progress, logging and the saved SAEs are rank 0's
    (every figure is global; the per-kind ones are of the readout step's global batch).
    With ``parallel="layers"`` each rank instead trains only the layers it owns (``owners``,
    :class:`vlmsae.layer_owners.LayerOwners`), on whole global batches in a whole global buffer fed by
    every rank's forwards; ``trained`` lists this rank's layers (every layer otherwise).
    """

    def __init__(self, model, layer, data, sae, cfg: OnlineRunConfig, trainer_cfg: SAETrainerConfig | None,
                 out: str | os.PathLike | None, history: list | None):
        trainer_cfg = trainer_config(cfg, trainer_cfg, {})  # one readout cadence for the run and its trainers
        self.cfg, self.trainer_cfg = cfg, trainer_cfg
        self.history = history if history is not None else []
        self.out = Path(out) if out is not None else None
        self.world = distributed.init_from_env()
        by_layer = self.world is not None and cfg.parallel == "layers"  # each rank owns whole buffers and SAEs
        self.rank_batch = cfg.batch_size if by_layer else distributed.per_rank(cfg.batch_size, self.world, "batch_size")
        self.rank_buffer = cfg.buffer_size if by_layer else distributed.per_rank(cfg.buffer_size, self.world,
                                                                                 "buffer_size")
        if self.world is not None:
            if isinstance(data, Shards):
                raise ConfigError(f"training from Shards under {self.world.size} ranks is not supported yet; "
                                  "train from shards in one process, or from live data under torchrun")
            data = distributed.RankShard(data, self.world.rank, self.world.size)
        self.source = ShardSource(data, cfg.site) if isinstance(data, Shards) else \
            LiveSource(model, data, cfg.site, special_ids=cfg.special_ids)
        self.saes = _saes_by_layer(self.source.d_model, layer, sae)
        self.source.check(sorted(self.saes))
        if cfg.quota == "balanced":  # equal shares of the kinds the source brings
            self.cfg = cfg = replace(cfg, quota={"image": 0.5, "text": 0.5} if self.source.has_image_tokens
                                     else {"text": 1.0})
        self.devices = {L: self.source.device_of(L, cfg.device) for L in self.saes}
        for L, group in self.saes.items():
            for s in group:
                s.to(self.devices[L])
                self.describe(s, L)
        self.sync_saes()
        # parallel="layers": this rank trains its own layers, each on whole global batches (no gradient exchange)
        self.owners = LayerOwners(list(self.saes), self.world) if by_layer else None
        self.trained = [L for L in self.saes if self.owners is None or L in self.owners.mine]
        self.targets = {(L, i): s.cfg.k for L, group in self.saes.items() for i, s in enumerate(group)}
        self.trainers = {(L, i): SAETrainer(s, trainer_cfg, world=None if by_layer else self.world)
                         for L in self.trained for i, s in enumerate(self.saes[L])}
        self.schedulers = {key: torch.optim.lr_scheduler.LambdaLR(t.optimizer, lambda step: lr_factor(step, cfg))
                           for key, t in self.trainers.items()}
        self.buffers = {L: self.make_buffer(L) for L in self.trained}
        # one process on CUDA: the steps on their own stream, overlapping the next fill (DDP: the plain alternation)
        self.streams = StepStreams([self.devices[L] for L in self.trained], enabled=cfg.overlap and self.world is None)
        self.screens = {L: Admission(cfg.kinds, cfg.quota, cfg.outlier_factor, self.devices[L])
                        for L in self.saes} if by_layer else {}
        self.step_count, self.since_checkpoint, self.last_checkpoint = 0, 0, None
        self.told_mix = False  # the token-kind mix of the buffers is printed once, after the first fill
        self.started = False  # the source is positioned by resume() or at the start of run()
        # per layer, the first step whose rows held NaN/Inf (-1: none), kept on the device until a readout
        self.first_bad = {L: torch.full((), -1, dtype=torch.long, device=self.devices[L]) for L in self.saes}

    def make_buffer(self, layer: int) -> RingBuffer:
        """The ring buffer of one layer (this rank's share of it), on that layer's device, admitting what the
        config says; each rank shuffles with its own seed (an owner of whole layers as one process does)."""
        cfg = self.cfg
        rank = 0 if self.world is None or self.owners is not None else self.world.rank
        return RingBuffer(self.rank_buffer, self.source.d_model, device=self.devices[layer],
                          dtype=getattr(torch, cfg.buffer_dtype), kinds=cfg.kinds, quota=cfg.quota,
                          outlier_factor=cfg.outlier_factor, seed=cfg.seed + layer + RANK_SEED_STRIDE * rank)

    def sync_saes(self) -> None:
        """Under N ranks: every SAE starts as rank 0's (weights and buffers), so the replicas start identical."""
        if self.world is None:
            return
        for s in self._all_saes():
            for tensor in s.state_dict().values():
                self.world.broadcast_(tensor)

    def describe(self, sae: SAE, layer: int) -> None:
        """Fill in where the SAE belongs (hook_name, model, layer path, token kinds) unless already set."""
        self.source.describe(sae.cfg.metadata, layer)
        cfg = self.cfg
        sae.cfg.metadata.setdefault("token_kinds", list(cfg.kinds) if cfg.quota is None else sorted(cfg.quota))

    def start(self, position: dict) -> None:
        """Position the source: at the data's start, or where a checkpoint left it."""
        self.source.start(sorted(self.saes), position)
        self.started = True

    def resume(self) -> None:
        """Continue from the newest checkpoint in ``out`` (bitwise the uninterrupted run on CPU)."""
        self.step_count, position, self.last_checkpoint = load_checkpoint(
            self.out, self.trainers, self.schedulers, self.buffers, self.world, self.cfg.parallel)
        self.start(position)

    def run(self) -> None:
        """Fill, read, step, read out, checkpoint until ``cfg.steps``; then the SAEs in eval mode, saved to ``out``."""
        cfg = self.cfg
        if not self.started:
            self.start({})
        main = self.world is None or self.world.main
        logger = _wandb(cfg, self.trainer_cfg) if main else None
        bar = tqdm(total=cfg.steps, initial=self.step_count, desc="train", disable=not (cfg.progress and main),
                   dynamic_ncols=True)
        try:
            while self.step_count < cfg.steps:
                self.fill()  # on CUDA the forwards overlap the steps launched just before (self.streams)
                if not self.told_mix and cfg.progress and main:
                    bar.write(self.mix())
                self.told_mix = True
                # the rows of this read phase, no more than the run has steps left (the rest stay unread)
                reads = zip(*(self.buffers[L].read(self.rank_batch) for L in self.trained))
                phase = self.streams.gathered(itertools.islice(reads, cfg.steps - self.step_count))
                with self.streams.steps():
                    for rows in phase:
                        self.step(rows)
                        bar.update(1)
                        if self.step_count % self.trainer_cfg.sync_every == 0 or self.step_count == cfg.steps:
                            self.readout(rows, bar, logger)
                phase = rows = None  # a gathered phase is not held while the next one is gathered
                self.checkpoint_if_needed()
        finally:
            self.streams.join()
            bar.close()
            if logger is not None:
                logger.finish()
        if self.owners is not None:
            self.owners.share(self.saes)  # every rank returns every trained SAE
        self.guard_finite()
        for s in self._all_saes():
            s.eval()
        if self.out is not None and main:
            for L, group in self.saes.items():
                for i, s in enumerate(group):
                    s.save(self.out / (f"L{L}" if len(group) == 1 else f"L{L}-{i}"))
        if self.world is not None:
            self.world.barrier()  # the saved SAEs are on disk before any rank returns

    def mix(self) -> str:
        """The token kinds of this rank's full buffers, in words (one host sync per buffer), and how to change them."""
        cfg, parts = self.cfg, []
        for L, b in self.buffers.items():
            counts = torch.bincount(b.kind[:b.capacity].long(), minlength=len(Kind)).tolist()
            shares = ", ".join(f"{k.name.lower()} {counts[k] / b.capacity:.0%}" for k in Kind if counts[k])
            parts.append(f"layer {L}: {shares}")
        how = ("quota=None keeps the data's own mix; quota='balanced' trains on equal shares of image and text"
               if cfg.quota is None else f"quota={cfg.quota}")
        said = f"buffer rows by token kind ({'; '.join(parts)}): {how}"
        if self.source.epochs:
            said += (f"\nthe buffers' first fill read the data {self.source.epochs + 1} times over, so the same rows "
                     "repeat in them; pass more data or a smaller buffer_size")
        return said

    def fill(self) -> None:
        """Refill every buffer's free half; note NaN/Inf the buffers saw, before any filter could drop it."""
        if self.owners is not None:
            self.owners.fill(self.source, self.buffers, self.screens)
        elif self.world is None:
            self.source.fill(self.buffers)
        else:
            self.agree_filled()
        self.streams.join()  # the steps wrote first_bad
        for L, b in self.buffers.items():
            self.first_bad[L].masked_fill_((self.first_bad[L] < 0) & (b.nonfinite > 0), self.step_count)

    def agree_filled(self) -> None:
        """Under N ranks, the stop condition: fill this rank's buffers, then agree with every rank that all did.

        A rank whose data ran out or failed raises its own error; every other rank raises a ``ConfigError``
        naming the step, so that all stop on the same step and none waits in a collective for it.
        """
        error = None
        try:
            self.source.fill(self.buffers)
        except Exception as err:  # noqa: BLE001 - re-raised below, after the other ranks have heard of it
            error = err
        if self.world.any(error is not None):
            if error is not None:
                raise error
            raise ConfigError(f"another rank could not fill its buffers at step {self.step_count} (its data ran "
                              "out or failed; its own error says why); every rank stops here")

    def step(self, rows) -> None:
        """One optimiser step of every SAE on its layer's rows, at this step's learning rate and k."""
        step, cfg = self.step_count, self.cfg
        for L, r in zip(self.trained, rows):
            finite = torch.isfinite(r.acts).all()
            self.first_bad[L].masked_fill_((self.first_bad[L] < 0) & ~finite, step)  # in place: see vlmsae.overlap
        if (step + 1) % self.trainer_cfg.sync_every == 0:  # the trainers read out at this step: check inputs first
            self.guard_finite()
        for L, r in zip(self.trained, rows):
            for i, s in enumerate(self.saes[L]):
                k = k_at(step, self.targets[(L, i)], cfg, s.cfg.d_sae) if s.cfg.architecture in ("topk", "batchtopk") \
                    else None
                try:
                    self.trainers[(L, i)].step(r.acts, k=k, kinds=r.kind)
                except NonFiniteError as err:
                    raise NonFiniteError(f"layer {L}: {err}; last good checkpoint: "
                                         f"{self.last_checkpoint or 'none written yet'}") from err
                self.schedulers[(L, i)].step()
        self.step_count += 1
        self.since_checkpoint += 1

    def readout(self, rows, bar, logger) -> None:
        """After the trainers' readout: stop on NaN/Inf, show and hand out the metrics (with per-kind ones)."""
        self.guard_finite()
        by_kind = self.kind_metrics(dict(zip(self.trained, rows)))
        latest = {key: {**asdict(m), **by_kind.get(key, {})} for key, m in self.readout_metrics().items()}
        bar.set_postfix_str(_postfix(latest, self.saes), refresh=False)
        self.history.extend({"layer": L, "sae": i, **m} for (L, i), m in latest.items())
        if logger is not None:
            logger.log({f"L{L}.{i}/{k}": v for (L, i), m in latest.items() for k, v in m.items()}, step=self.step_count)

    @torch.no_grad()
    def kind_metrics(self, rows: dict) -> dict[tuple[int, int], dict[str, float]]:
        """FVU, L0 and dead fraction of each SAE on the image rows and on the text rows of this step's batch
        (``rows``: by layer): ``{(layer, i): {"fvu_image": ..., "l0_image": ..., "dead_image": ..., "tokens_image":
        ..., ...text}}``. ``dead_*``: latents that fired on none of those tokens (the window is ``tokens_*``).
        Global under data parallel (the batch's sums are all-reduced), the owner's whole batch under
        ``parallel="layers"``; one host sync per SAE, at readouts only. In the model's units (per-kind FVU is the
        same in an SAE's normalised units: each kind has one scale)."""
        kinds = (Kind.IMAGE, Kind.TEXT)
        out = {}
        for (L, i), t in self.trainers.items():
            r, sae = rows[L], t.sae
            x = r.acts.to(sae.W_dec.dtype)
            recon, rows_, cols = t.reconstruct(x, r.kind)  # an SAE with normalize_per_kind needs the kinds
            err = (recon.float() - x.float()).pow(2).sum(-1)
            entry_kind = r.kind[rows_]
            parts = []
            for kind in kinds:
                sel, mine = r.kind == kind, entry_kind == kind
                xs = x[sel].double()
                fired = torch.zeros(sae.cfg.d_sae, dtype=torch.double, device=x.device).index_fill_(0, cols[mine], 1)
                parts.append(torch.cat([torch.stack([sel.sum().double(), err[sel].double().sum(), xs.pow(2).sum(),
                                                     mine.sum().double()]), xs.sum(0), fired]))
            sums = torch.stack(parts)
            if self.world is not None and self.owners is None:
                sums = self.world.sum_(sums)
            d_in = sae.cfg.d_in
            metrics_ = {}
            for kind, row in zip(kinds, sums.cpu()):
                n, sq_err, sq_x, nonzero = row[:4].tolist()
                if n < 2:
                    continue
                variance = sq_x - float(row[4:4 + d_in].pow(2).sum()) / n
                name = kind.name.lower()
                metrics_ |= {f"fvu_{name}": sq_err / variance if variance > 0 else None,
                             f"l0_{name}": nonzero / n, f"dead_{name}": float((row[4 + d_in:] == 0).double().mean()),
                             f"tokens_{name}": int(n)}
            out[(L, i)] = metrics_
        if self.owners is not None:
            out = self.owners.gather(out)
        return out

    def readout_metrics(self) -> dict[tuple[int, int], TrainMetrics]:
        """The metrics each trainer read out at this step, by (layer, SAE index).

        On one process they are final. Under N ranks they are already global: the trainers reduce the
        token count and every metric sum at each step (the dead-latent counters and the FVU variance
        define the objective, so they cannot wait for a readout). Here the ranks check that they report
        the same numbers from the same weights; raises ``RuntimeError`` naming the step if the
        replicas have drifted apart (a collective or a kernel that is not deterministic).
        """
        latest = {key: t.history[-1] for key, t in self.trainers.items()
                  if t.history and t.history[-1].step == self.step_count}
        if self.owners is not None:  # each rank read out its own layers: every rank gets all, in the run's order
            every = self.owners.gather(latest)
            return {(L, i): every[(L, i)] for L, group in self.saes.items() for i in range(len(group))
                    if (L, i) in every}
        if self.world is not None:
            digest = torch.tensor([v for m in latest.values() for v in astuple(m)]
                                  + [float(p.detach().double().sum()) for s in self._all_saes() for p in s.parameters()],
                                  dtype=torch.float64)
            spread = self.world.max_(digest.clone()) + self.world.max_(-digest.clone())
            if spread.abs().max() > 0:
                raise RuntimeError(f"the {self.world.size} ranks' SAEs or metrics differ at step {self.step_count} "
                                   "(replicas out of sync: a statistic reduced on one rank only, or a kernel that is not "
                                   "deterministic; run with torch.use_deterministic_algorithms(True))")
        return latest

    def checkpoint_if_needed(self) -> None:
        """At the end of a read phase: a checkpoint once ``checkpoint_every`` steps have passed, and at the end."""
        cfg = self.cfg
        if self.out is None or not cfg.checkpoint_every:
            return
        if self.since_checkpoint >= cfg.checkpoint_every or self.step_count >= cfg.steps:
            self.streams.join()
            self.guard_finite()  # a bad state never becomes the last good checkpoint
            self.last_checkpoint = save_checkpoint(self.out, self.step_count, self.source.state(), self.trainers,
                                                   self.schedulers, self.buffers, cfg, self.trainer_cfg, self.world,
                                                   replicated=self.owners is None)
            self.since_checkpoint = 0

    def guard_finite(self) -> None:
        """Stop on NaN/Inf in activations or weights (one sync), naming the step, layer and last good checkpoint.

        Under N ranks the first bad step of each layer is the earliest over the ranks, so all stop together.
        """
        first_bad = self.first_bad
        if self.world is not None:  # -1 (none) as a large step, so that the max of the negation is the min
            never = torch.iinfo(torch.long).max
            ranks = {L: -self.world.max_(-torch.where(b < 0, never, b)) for L, b in first_bad.items()}
            first_bad = {L: torch.where(b == never, -1, b) for L, b in ranks.items()}
        _check_finite(first_bad, self.step_count, self.saes, self.last_checkpoint)

    def _all_saes(self):
        return (s for group in self.saes.values() for s in group)


def _check_finite(first_bad, step, saes, last_checkpoint) -> None:
    """Stop on NaN/Inf in activations or weights (one sync), naming the step, layer and last good checkpoint."""
    where = f"last good checkpoint: {last_checkpoint}" if last_checkpoint else "no checkpoint was written yet"
    for L, bad in first_bad.items():
        if int(bad) >= 0:
            raise NonFiniteError(f"NaN or Inf in the activations of layer {L} at step {int(bad) + 1}; {where}. "
                                 "Check the model's dtype (fp16 overflows) or the inputs")
    for L, group in saes.items():
        for i, s in enumerate(group):
            if not all(torch.isfinite(p).all() for p in s.parameters()):
                raise NonFiniteError(f"NaN or Inf in the weights of the SAE for layer {L} (#{i}) by step {step}; "
                                     f"{where}. Lower the learning rate or check the activations")


def _postfix(latest: dict, saes) -> str:
    """The bar's text: each SAE's readout, and its FVU / L0 on the batch's image and text rows."""
    parts = []
    for (L, i), m in latest.items():
        tag = f"L{L}" + (f"#{i}" if len(saes[L]) > 1 else "")
        parts.append(f"{tag} fvu {m['fvu']:.3f} l0 {m['l0']:.1f} dead {m['dead_fraction']:.2f} "
                     f"(silent {metrics.token_count(m['dead_window'])} tok)")
        parts += [f"{kind} {m[f'fvu_{kind}']:.3f}/{m[f'l0_{kind}']:.0f}" for kind in ("image", "text")
                  if m.get(f"fvu_{kind}") is not None]
    return " | ".join(parts)


def _wandb(cfg: OnlineRunConfig, trainer_cfg: SAETrainerConfig):
    if cfg.wandb is None:
        return None
    try:
        import wandb
    except ImportError as err:
        raise ConfigError("wandb= asks for wandb logging but wandb is not installed; pip install wandb") from err
    return wandb.init(project=cfg.wandb, config={**asdict(cfg), **asdict(trainer_cfg)})


__getattr__ = renamed_attributes(__name__, {"TrainConfig": "OnlineRunConfig"}, globals())
