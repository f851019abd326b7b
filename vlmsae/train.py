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

import json
import os
import re
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .adapters import Kind, layers as adapter_info
from .buffer import RingBuffer
from .errors import ConfigError, NonFiniteError, SAEFileError
from .files import write_folder_atomic
from .hooks import execution_device, check_sites
from .record import record
from .sae import SAE
from .shards import Shards
from .trainer import SAETrainer, TrainerConfig


@dataclass
class TrainConfig:
    """How online training runs; the SAE's own recipe lives in SAEConfig, the optimiser's in TrainerConfig."""

    steps: int = 1000
    """Optimiser steps per SAE."""
    batch_size: int = 4096
    """Tokens per SAE step."""
    buffer_size: int = 65536
    """Rows of each layer's ring buffer; half of it is refilled between read phases."""
    kinds: tuple[str, ...] = ("image", "text", "generated")
    """Token kinds that enter the buffer (special tokens and padding never do)."""
    quota: dict[str, float] | None = None
    """Share of each batch per kind, e.g. {"image": 0.5, "text": 0.5}; None keeps the data's own mix."""
    outlier_factor: float | None = 10.0
    """Tokens whose norm exceeds this multiple of the forward's median norm are left out."""
    buffer_dtype: str = "float32"
    """dtype of the buffer rows (bfloat16 halves its memory on GPU)."""
    site: str = "resid_post"
    """Hook site of every trained layer."""
    lr: float | None = None
    """Peak learning rate; None lets SAETrainer choose by d_sae."""
    warmup_steps: int = 50
    """Linear warmup from 0 to the peak learning rate."""
    decay_fraction: float = 0.2
    """Final fraction of the steps over which the learning rate decays linearly to 0."""
    k_start: int | None = 64
    """TopK kinds: start at this k and anneal linearly to the SAE's k (None: no annealing)."""
    k_anneal_fraction: float = 0.25
    """Fraction of the steps over which k anneals."""
    sync_every: int = 25
    """Steps between metric readouts (one host synchronisation each)."""
    checkpoint_every: int | None = None
    """Write a checkpoint after at least this many steps (at the end of a read phase); None: never."""
    seed: int = 0
    """Seeds the buffers' shuffling."""
    device: str | None = None
    """Where buffers and SAEs live; None: the model's device (CPU when training from shards)."""
    wandb: str | None = None
    """A wandb project name to log to (wandb must be installed); None: no logging."""
    progress: bool = True
    """Show a tqdm progress bar with live metrics."""

    def __post_init__(self):
        for name in ("steps", "batch_size", "buffer_size", "sync_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name}={value!r} must be an integer >= 1")
        if self.buffer_size < 2 * self.batch_size:
            raise ConfigError(f"buffer_size={self.buffer_size} must be at least 2 x batch_size={self.batch_size} "
                              "(half the buffer is read between refills)")
        if self.checkpoint_every is not None and (not isinstance(self.checkpoint_every, int)
                                                  or self.checkpoint_every < 1):
            raise ConfigError(f"checkpoint_every={self.checkpoint_every!r} must be None or an integer >= 1")
        if not 0 <= self.decay_fraction <= 1 or not 0 <= self.k_anneal_fraction <= 1:
            raise ConfigError(f"decay_fraction={self.decay_fraction} and k_anneal_fraction="
                              f"{self.k_anneal_fraction} must be in [0, 1]")
        if self.buffer_dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError(f"buffer_dtype={self.buffer_dtype!r} must be float32, bfloat16 or float16")


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Learning-rate multiplier at ``step``: linear warmup, constant, linear decay to 0."""
    warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
    decay_steps = int(cfg.decay_fraction * cfg.steps)
    left = cfg.steps - step
    return warm * (min(1.0, left / decay_steps) if decay_steps else 1.0)


def k_at(step: int, target: int, cfg: TrainConfig, d_sae: int) -> int:
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


class _Live:
    """Fills buffers by running the model over data batches (re-iterated for more epochs)."""

    def __init__(self, info, data: Iterable[dict], layers: list[int], site: str, used: int = 0):
        self.info, self.data, self.layers, self.site, self.used = info, data, layers, site, 0
        self.it = iter(data)
        for _ in range(used):
            self._next()

    def _next(self):
        try:
            batch = next(self.it)
        except StopIteration:
            self.it = iter(self.data)  # next epoch
            try:
                batch = next(self.it)
            except StopIteration:
                raise ConfigError(f"the data ran out after {self.used} batches and cannot be iterated again; "
                                  "pass a re-iterable source (a list, a folder source) or fewer steps") from None
        self.used += 1
        return batch

    def fill(self, buffers: dict[int, RingBuffer]) -> None:
        sinks = {L: b.sink() for L, b in buffers.items()}
        while any(b.free_rows() for b in buffers.values()):  # one sync per forward
            batch = self._next()
            self._check(batch)
            with torch.no_grad(), record(self.info.model, self.layers, site=self.site, stop=True,
                                         sink=lambda L, resid, fwd: sinks[L](L, resid, fwd)):
                self.info.model(**batch)

    def _check(self, batch: dict) -> None:
        """A batch with images but no image placeholders would fail deep in the model: say why here."""
        info, ids = self.info, batch.get(self.info.ids_key)
        if info.has_image_tokens and "pixel_values" in batch and ids is not None \
                and not bool((ids == info.image_token_id).any()):
            raise ConfigError(f"data batch {self.used} has pixel_values but no image token (id {info.image_token_id}) "
                              f"in {info.ids_key}; a {info.family} model needs one placeholder per image patch: "
                              "build inputs with the model's processor")

    def state(self) -> dict:
        return {"data_batches_used": self.used}


class _FromShards:
    """Fills buffers from harvested shards, each layer from its own stream."""

    def __init__(self, shards: Shards, layers: list[int], rows_used: dict | None = None):
        self.rows_used = {L: int((rows_used or {}).get(str(L), 0)) for L in layers}
        self.streams = {L: shards.stream(L, skip_rows=self.rows_used[L]) for L in layers}

    def fill(self, buffers: dict[int, RingBuffer]) -> None:
        for L, buffer in buffers.items():
            while buffer.free_rows():
                chunk = next(self.streams[L])
                buffer.write_rows(chunk)
                self.rows_used[L] += chunk.acts.shape[0]

    def state(self) -> dict:
        return {"shard_rows_used": {str(L): n for L, n in self.rows_used.items()}}


def train(model, layer: int | Iterable[int], data: Iterable[dict], sae=None, *, cfg: TrainConfig | None = None,
          trainer_cfg: TrainerConfig | None = None, out: str | os.PathLike | None = None, resume: bool = False,
          history: list | None = None, **fields):
    """Train SAEs on the residual of ``layer`` (one or many) from ``data`` (batches of model inputs).

    ``sae``: an SAE, a list of SAEs (one layer), a dict ``{layer: SAE or [SAE]}``, or None (TopK, 8x,
    k=32 per layer). ``fields`` set TrainConfig fields (``steps=``, ``batch_size=``, ...). ``trainer_cfg``
    sets the optimiser (its ``sync_every`` is taken from TrainConfig's). With ``out``
    the final SAEs are written to ``out/L{layer}[-{i}]`` and checkpoints to ``out/checkpoints``.
    ``history``, a list, receives one dict per SAE at every metric readout (``layer``, ``sae``, and
    the fields of TrainMetrics: step, tokens, loss, mse, fvu, l0, aux_loss, dead and dense fractions).
    Returns the SAE, or ``{layer: SAE}`` / ``{layer: [SAE, ...]}`` in the shape ``sae`` was given.
    """
    if cfg is None:
        cfg = TrainConfig(**fields)
    elif fields:
        raise ConfigError(f"pass either cfg= or TrainConfig fields, not both (got {sorted(fields)})")
    shards = data if isinstance(data, Shards) else None
    if shards is not None:
        if shards.site != cfg.site:
            raise ConfigError(f"the shards hold site {shards.site!r} but site={cfg.site!r}; pass site={shards.site!r}")
        width = shards.d_model
        device_of = lambda L: torch.device(cfg.device or "cpu")  # noqa: E731
        meta = {"model_class_name": shards.manifest.get("model_class_name", ""),
                "model_name": shards.manifest.get("family", "")}
        hook_names = {int(L): name for L, name in shards.manifest.get("hook_names", {}).items()}
        layer_paths = {}
    else:
        info = adapter_info(model)
        width = info.d_model
        # each layer's buffer and SAEs live where that layer runs (several devices under accelerate)
        device_of = lambda L: torch.device(cfg.device) if cfg.device else (  # noqa: E731
            execution_device(info.layers[L]) or torch.device("cpu"))
        meta = {"model_class_name": type(info.model).__name__,
                "model_name": getattr(info.model.config, "_name_or_path", "") or info.family}
        hook_names = {L: info.hook_name(L, cfg.site) for L in range(info.n_layers)}
        layer_paths = {L: f"{info.layer_path}.{L}" for L in range(info.n_layers)}
    saes = _saes_by_layer(width, layer, sae)
    if shards is None:
        check_sites(info, [(L, cfg.site) for L in saes])
    out = Path(out) if out is not None else None
    if resume and out is None:
        raise ConfigError("resume=True needs out= (the folder holding the checkpoints)")
    for L, group in saes.items():
        for s in group:
            s.to(device_of(L))
            s.cfg.metadata.setdefault("hook_name", hook_names.get(L, f"blocks.{L}.hook_{cfg.site}"))
            for key, value in meta.items():
                s.cfg.metadata.setdefault(key, value)
            if L in layer_paths:
                s.cfg.metadata.setdefault("hf_layer_path", layer_paths[L])
            s.cfg.metadata.setdefault("token_kinds", list(cfg.kinds) if cfg.quota is None else sorted(cfg.quota))
    targets = {(L, i): s.cfg.k for L, group in saes.items() for i, s in enumerate(group)}
    # One readout cadence: the input NaN check runs just before the trainers' readout steps.
    trainer_cfg = replace(trainer_cfg or TrainerConfig(lr=cfg.lr), sync_every=cfg.sync_every)
    trainers = {(L, i): SAETrainer(s, trainer_cfg) for L, group in saes.items() for i, s in enumerate(group)}
    schedulers = {key: torch.optim.lr_scheduler.LambdaLR(t.optimizer, lambda step: lr_factor(step, cfg))
                  for key, t in trainers.items()}
    buffers = {L: RingBuffer(cfg.buffer_size, width, device=device_of(L), dtype=getattr(torch, cfg.buffer_dtype),
                             kinds=cfg.kinds, quota=cfg.quota, outlier_factor=cfg.outlier_factor, seed=cfg.seed + L)
               for L in saes}
    step, position, last_checkpoint = 0, {}, None
    if resume:
        step, position, last_checkpoint = _load_checkpoint(out, trainers, schedulers, buffers)
    source = (_FromShards(shards, sorted(saes), position.get("shard_rows_used")) if shards is not None
              else _Live(info, data, sorted(saes), cfg.site, position.get("data_batches_used", 0)))
    # per layer, the first step whose batch held NaN/Inf (-1: none), kept on the device until a readout
    first_bad = {L: torch.full((), -1, dtype=torch.long, device=device_of(L)) for L in saes}
    run = _wandb(cfg)
    bar = tqdm(total=cfg.steps, initial=step, desc="train", disable=not cfg.progress, dynamic_ncols=True)
    since_checkpoint = 0
    try:
        while step < cfg.steps:
            source.fill(buffers)
            for L, b in buffers.items():  # NaN/Inf the buffer saw while filling, before any filter could drop it
                first_bad[L] = torch.where((first_bad[L] < 0) & (b.nonfinite > 0), step, first_bad[L])
            phase = zip(*(buffers[L].read(cfg.batch_size) for L in saes))
            for rows in phase:
                if step >= cfg.steps:
                    break
                for L, r in zip(saes, rows):
                    finite = torch.isfinite(r.acts).all()
                    first_bad[L] = torch.where((first_bad[L] < 0) & ~finite, step, first_bad[L])
                if (step + 1) % cfg.sync_every == 0:  # the trainers read out at this step: check inputs first
                    _check_finite(first_bad, step, saes, last_checkpoint)
                for L, r in zip(saes, rows):
                    for i, s in enumerate(saes[L]):
                        if s.cfg.kind in ("topk", "batchtopk"):
                            s.cfg.k = k_at(step, targets[(L, i)], cfg, s.cfg.d_sae)
                        try:
                            trainers[(L, i)].step(r.acts)
                        except NonFiniteError as err:
                            raise NonFiniteError(f"layer {L}: {err}; last good checkpoint: "
                                                 f"{last_checkpoint or 'none written yet'}") from err
                        schedulers[(L, i)].step()
                step += 1
                since_checkpoint += 1
                bar.update(1)
                if step % cfg.sync_every == 0 or step == cfg.steps:
                    _check_finite(first_bad, step, saes, last_checkpoint)
                    bar.set_postfix_str(_postfix(trainers, saes, rows), refresh=False)
                    if history is not None:
                        history.extend({"layer": L, "sae": i, **asdict(t.history[-1])}
                                       for (L, i), t in trainers.items() if t.history and t.history[-1].step == step)
                    if run is not None:
                        run.log(_log_row(trainers), step=step)
            if out is not None and cfg.checkpoint_every and (since_checkpoint >= cfg.checkpoint_every
                                                             or step >= cfg.steps):
                _check_finite(first_bad, step, saes, last_checkpoint)
                last_checkpoint = _save_checkpoint(out, step, source.state(), trainers, schedulers, buffers, cfg)
                since_checkpoint = 0
    finally:
        bar.close()
        for (L, i), s in zip(targets, (s for group in saes.values() for s in group)):
            s.cfg.k = targets[(L, i)]
        if run is not None:
            run.finish()
    _check_finite(first_bad, step, saes, last_checkpoint)
    for s in (s for group in saes.values() for s in group):
        s.eval()
    if out is not None:
        for L, group in saes.items():
            for i, s in enumerate(group):
                s.save(out / (f"L{L}" if len(group) == 1 else f"L{L}-{i}"))
    if sae is None or isinstance(sae, Mapping) or not isinstance(layer, int):
        return {L: group[0] if len(group) == 1 else group for L, group in saes.items()}
    return saes[layer][0] if isinstance(sae, SAE) else saes[layer]


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


def _postfix(trainers, saes, rows) -> str:
    """Live metrics of the last readout, and FVU / L0 per token kind on the current batch."""
    parts = []
    for (L, i), t in trainers.items():
        if not t.history:
            continue
        m = t.history[-1]
        tag = f"L{L}" + (f"#{i}" if len(saes[L]) > 1 else "")
        parts.append(f"{tag} fvu {m.fvu:.3f} l0 {m.l0:.1f} dead {m.dead_fraction:.2f}")
        r = rows[list(saes).index(L)]
        with torch.no_grad():
            out = t.sae(r.acts)
            err = (out.recon.float() - r.acts.float()).pow(2).sum(-1)
        for kind in (Kind.IMAGE, Kind.TEXT):
            sel = r.kind == kind
            n = int(sel.sum())
            if n > 1:
                x = r.acts[sel].float()
                fvu = err[sel].sum() / (x - x.mean(0)).pow(2).sum()
                l0 = (out.latents[sel] != 0).sum(-1).float().mean()
                parts.append(f"{kind.name.lower()} {fvu:.3f}/{l0:.0f}")
    return " | ".join(parts)


def _log_row(trainers) -> dict:
    row = {}
    for (L, i), t in trainers.items():
        if t.history:
            row |= {f"L{L}.{i}/{k}": v for k, v in asdict(t.history[-1]).items()}
    return row


def _wandb(cfg: TrainConfig):
    if cfg.wandb is None:
        return None
    try:
        import wandb
    except ImportError as err:
        raise ConfigError("wandb= asks for wandb logging but wandb is not installed; pip install wandb") from err
    return wandb.init(project=cfg.wandb, config=asdict(cfg))


# --- checkpoints -------------------------------------------------------------------------------

STATE_FILE = "state.json"
CHECKPOINT_NAME = re.compile(r"step-(0|[1-9][0-9]*)")


def _save_checkpoint(out: Path, step: int, position: dict, trainers, schedulers, buffers, cfg) -> Path:
    """Write ``out/checkpoints/step-N`` as one folder swap, durable before it appears; then drop older ones.

    Raises OSError from the disk; the checkpoints already there are then as they were.
    """
    root = out / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    older = _checkpoints(out)

    def write(folder: Path) -> None:
        for (L, i), t in trainers.items():
            tensors, meta = t.state_dict()
            save_file(tensors, str(folder / f"trainer-L{L}-{i}.safetensors"))
            meta["scheduler_last_epoch"] = schedulers[(L, i)].last_epoch
            (folder / f"trainer-L{L}-{i}.json").write_text(json.dumps(meta), encoding="utf-8")
        for L, b in buffers.items():
            save_file({k: v.contiguous() for k, v in b.state_dict().items()}, str(folder / f"buffer-L{L}.safetensors"))
        state = {"step": step, "position": position, "config": asdict(cfg)}
        (folder / STATE_FILE).write_text(json.dumps(state, indent=1), encoding="utf-8")

    final = write_folder_atomic(root / f"step-{step}", write)
    for n, old in older.items():  # only now that the new one is on disk
        if n != step:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _checkpoints(out: str | os.PathLike) -> dict[int, Path]:
    """The checkpoint folders ``out/checkpoints/step-N`` by step. Anything else (a user's notes, files,
    the hidden temporary folders of an interrupted write) is not a checkpoint and is left alone.

    Raises SAEFileError if ``out/checkpoints`` is not a folder.
    """
    root = Path(out) / "checkpoints"
    if root.exists() and not root.is_dir():
        raise SAEFileError(f"{root}: is not a folder, so it cannot hold checkpoints; move it away")
    found = {}
    for path in root.iterdir() if root.exists() else ():
        match = CHECKPOINT_NAME.fullmatch(path.name)
        if match and path.is_dir():
            found[int(match.group(1))] = path
    return found


def latest_checkpoint(out: str | os.PathLike) -> Path | None:
    """The newest checkpoint folder ``out/checkpoints/step-N`` (or None); other names there are ignored.

    Raises SAEFileError if ``out/checkpoints`` is not a folder.
    """
    found = _checkpoints(out)
    return found[max(found)] if found else None


def _load_checkpoint(out: Path, trainers, schedulers, buffers) -> tuple[int, dict, Path]:
    """Restore trainers, schedulers and buffers from the newest checkpoint: (step, data position, folder).

    Raises ConfigError if there is no checkpoint or it was written for other layers / SAE shapes,
    SAEFileError if a file in it is missing or damaged (nothing is restored from an unreadable one).
    """
    path = latest_checkpoint(out)
    if path is None:
        raise ConfigError(f"resume=True but {out / 'checkpoints'} holds no checkpoint; run without resume")
    damaged = f"delete {path} and run without resume=True, or restore the checkpoint from a copy"
    state = _read_json(path / STATE_FILE, damaged)
    if not (isinstance(state, dict) and isinstance(state.get("step"), int) and isinstance(state.get("position"), dict)):
        raise SAEFileError(f"{path / STATE_FILE}: needs an integer 'step' and an object 'position'; {damaged}")
    saved = {}  # everything is read before anything is restored
    for (L, i), t in trainers.items():
        tensors_file, meta_file = path / f"trainer-L{L}-{i}.safetensors", path / f"trainer-L{L}-{i}.json"
        if not tensors_file.exists():
            raise ConfigError(f"{tensors_file}: missing, so this checkpoint has no SAE {i} of layer {L}; "
                              "resume with the layers and SAEs of the run that wrote it")
        saved[(L, i)] = (_read_tensors(tensors_file, t.sae.W_dec.device, damaged), _read_json(meta_file, damaged))
    buffer_states = {L: _read_tensors(path / f"buffer-L{L}.safetensors", b.device, damaged) for L, b in buffers.items()}
    try:
        for (L, i), t in trainers.items():
            tensors, meta = saved[(L, i)]
            t.load_state_dict(tensors, meta, path)
            schedulers[(L, i)].last_epoch = meta["scheduler_last_epoch"]
            schedulers[(L, i)]._last_lr = [group["lr"] for group in t.optimizer.param_groups]
        for L, b in buffers.items():
            b.load_state_dict(buffer_states[L])
    except ConfigError:
        raise
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as err:  # a key or shape the code expects
        raise SAEFileError(f"{path}: the checkpoint does not hold what this vlmsae writes "
                           f"({type(err).__name__}: {str(err)[:200]}); {damaged}") from err
    return state["step"], state["position"], path


def _read_json(path: Path, fix: str):
    """The JSON value in ``path``; raises SAEFileError naming the file and ``fix``."""
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError as err:
        raise SAEFileError(f"{path}: missing; {fix}") from err
    except (OSError, ValueError, RecursionError) as err:
        raise SAEFileError(f"{path}: not readable JSON ({str(err)[:200]}); {fix}") from err


def _read_tensors(path: Path, device, fix: str) -> dict[str, torch.Tensor]:
    """The tensors in the safetensors file ``path``; raises SAEFileError naming the file and ``fix``."""
    try:
        return load_file(str(path), device=str(device))
    except FileNotFoundError as err:
        raise SAEFileError(f"{path}: missing; {fix}") from err
    except (OSError, SafetensorError) as err:
        raise SAEFileError(f"{path}: not a readable safetensors file ({err}); {fix}") from err
