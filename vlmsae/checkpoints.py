"""Checkpoints of an online training run: ``out/checkpoints/step-N``, one folder per step.

A checkpoint holds, per SAE, its trainer's tensors (weights, Adam moments, dead-latent counters)
and metadata (metric window, history, scheduler position), per layer its ring buffer, and
``state.json`` with the step, the data position and the run's config. It is written aside and
swapped in whole (:func:`vlmsae.files.write_folder_atomic`); older ones go only once it is on disk.
Reading checks every file before anything is restored and names the damaged one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .distributed import World
from .errors import ConfigError, SAEFileError
from .files import write_folder_atomic

STATE_FILE = "state.json"
CHECKPOINT_NAME = re.compile(r"step-(0|[1-9][0-9]*)")


def save_checkpoint(out: Path, step: int, position: dict, trainers, schedulers, buffers, cfg, trainer_cfg=None,
                    world: World | None = None, replicated: bool = True) -> Path:
    """Write ``out/checkpoints/step-N`` as one folder swap, durable before it appears; then drop older ones.

    Under N ranks (``world``) the folder is still one checkpoint: every rank writes its buffers and its
    data position (``buffer-L{L}.rank{r}.safetensors``, ``rank{r}.json``) into a hidden staging folder
    that rank 0 moves into the folder before the swap, and rank 0 writes ``state.json`` with
    ``world_size``. The SAEs, optimisers and schedulers are rank 0's when they are ``replicated``
    (data parallel: identical on every rank), else each rank stages its own (one owner per layer).
    Ranks agree on success after each phase, so a failed write raises on every rank instead of
    hanging the others. Raises OSError from the disk; the checkpoints already there are then as they were.
    """
    root = out / "checkpoints"
    if world is None or world.main:
        root.mkdir(parents=True, exist_ok=True)
    older = checkpoints(out) if world is None or world.main else {}
    rank_files: list[Path] = []
    if world is not None:
        world.barrier()  # root exists before any rank stages into it
        rank_files = _stage_rank(root, step, position, buffers, {} if replicated else trainers, schedulers, world)

    def write(folder: Path) -> None:
        if world is None or replicated:
            _write_trainers(folder, trainers, schedulers)
        if world is None:
            for L, b in buffers.items():
                save_file({k: v.contiguous() for k, v in b.state_dict().items()},
                          str(folder / f"buffer-L{L}.safetensors"))
        for staged in rank_files:
            os.replace(staged, folder / staged.name)
        state = {"step": step, "position": position, "config": asdict(cfg)}
        if trainer_cfg is not None:  # the optimiser's settings (lr, sync_every), for the record
            state["trainer_config"] = asdict(trainer_cfg)
        if world is not None:
            state["world_size"] = world.size
        (folder / STATE_FILE).write_text(json.dumps(state, indent=1), encoding="utf-8")

    final, failed = root / f"step-{step}", None
    if world is None or world.main:
        try:
            final = write_folder_atomic(final, write)
            for n, old in older.items():  # only now that the new one is on disk
                if n != step:
                    shutil.rmtree(old, ignore_errors=True)
        except OSError as err:
            failed = err
        finally:
            for staging in root.glob(f".step-{step}.rank*"):
                shutil.rmtree(staging, ignore_errors=True)
    if world is not None and world.any(failed is not None) and failed is None:
        raise OSError(f"rank 0 could not write the checkpoint {final}; see its error")
    if failed is not None:
        raise failed
    return final


def _write_trainers(folder: Path, trainers, schedulers) -> None:
    """Each trainer's tensors and metadata (with its scheduler's position) as ``trainer-L{L}-{i}.*`` in ``folder``."""
    for (L, i), t in trainers.items():
        tensors, meta = t.state_dict()
        save_file(tensors, str(folder / f"trainer-L{L}-{i}.safetensors"))
        meta["scheduler_last_epoch"] = schedulers[(L, i)].last_epoch
        (folder / f"trainer-L{L}-{i}.json").write_text(json.dumps(meta), encoding="utf-8")


def _stage_rank(root: Path, step: int, position: dict, buffers, trainers, schedulers, world: World) -> list[Path]:
    """Write this rank's buffers, data position and ``trainers`` into ``root/.step-N.rank{r}``; every rank agrees
    on success.

    Returns the staged files of every rank (rank 0 moves them in). Raises OSError on every rank if any failed.
    """
    folder = root / f".step-{step}.rank{world.rank}"
    error = None
    try:
        folder.mkdir(exist_ok=True)
        for L, b in buffers.items():
            save_file({k: v.contiguous() for k, v in b.state_dict().items()},
                      str(folder / f"buffer-L{L}.rank{world.rank}.safetensors"))
        _write_trainers(folder, trainers, schedulers)
        (folder / f"rank{world.rank}.json").write_text(json.dumps({"rank": world.rank, "position": position}),
                                                       encoding="utf-8")
    except OSError as err:
        error = err
    if world.any(error is not None):
        if folder.is_dir():
            shutil.rmtree(folder, ignore_errors=True)  # this rank's staging goes; the checkpoints there stay as they were
        raise error or OSError(f"another rank could not stage its part of checkpoint step-{step} under {root}")
    if not world.main:
        return []
    return sorted(path for r in range(world.size) for path in (root / f".step-{step}.rank{r}").iterdir())


def checkpoints(out: str | os.PathLike) -> dict[int, Path]:
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
    found = checkpoints(out)
    return found[max(found)] if found else None


def load_checkpoint(out: Path, trainers, schedulers, buffers, world: World | None = None,
                    parallel: str = "data") -> tuple[int, dict, Path]:
    """Restore trainers, schedulers and buffers from the newest checkpoint: (step, data position, folder).

    Under N ranks (``world``) each rank restores its trainers (all of them under data parallel, its own
    layers' under ``parallel="layers"``) and its own buffers and data position. Raises ConfigError if
    there is no checkpoint, it was written for other layers / SAE shapes, by another number of ranks or
    in another ``parallel`` mode (naming both), SAEFileError if a file in it is missing or damaged
    (nothing is restored from an unreadable one).
    """
    path = latest_checkpoint(out)
    if path is None:
        raise ConfigError(f"resume=True but {out / 'checkpoints'} holds no checkpoint; run without resume")
    damaged = f"delete {path} and run without resume=True, or restore the checkpoint from a copy"
    state = read_json(path / STATE_FILE, damaged)
    if not (isinstance(state, dict) and isinstance(state.get("step"), int) and isinstance(state.get("position"), dict)):
        raise SAEFileError(f"{path / STATE_FILE}: needs an integer 'step' and an object 'position'; {damaged}")
    size = 1 if world is None else world.size
    if state.get("world_size", 1) != size:
        raise ConfigError(f"{path} was written by {state.get('world_size', 1)} rank(s) but this run has {size}; "
                          f"each rank's buffers and data position are in it, so resume with "
                          f"{state.get('world_size', 1)} rank(s) (torchrun --nproc_per_node), or start a new run")
    written = (state.get("config") or {}).get("parallel", "data") if size > 1 else parallel
    if written != parallel:
        raise ConfigError(f"{path} was written with parallel={written!r} but this run has parallel={parallel!r} "
                          f"(the buffers are split differently); resume with parallel={written!r}, or start a new run")
    if world is not None:
        state["position"] = read_json(path / f"rank{world.rank}.json", damaged)["position"]
    saved = {}  # everything is read before anything is restored
    for (L, i), t in trainers.items():
        tensors_file, meta_file = path / f"trainer-L{L}-{i}.safetensors", path / f"trainer-L{L}-{i}.json"
        if not tensors_file.exists():
            raise ConfigError(f"{tensors_file}: missing, so this checkpoint has no SAE {i} of layer {L}; "
                              "resume with the layers and SAEs of the run that wrote it")
        saved[(L, i)] = (read_tensors(tensors_file, t.sae.W_dec.device, damaged), read_json(meta_file, damaged))
    suffix = "" if world is None else f".rank{world.rank}"
    buffer_states = {L: read_tensors(path / f"buffer-L{L}{suffix}.safetensors", b.device, damaged)
                     for L, b in buffers.items()}
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


def read_json(path: Path, fix: str):
    """The JSON value in ``path``; raises SAEFileError naming the file and ``fix``."""
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError as err:
        raise SAEFileError(f"{path}: missing; {fix}") from err
    except (OSError, ValueError, RecursionError) as err:
        raise SAEFileError(f"{path}: not readable JSON ({str(err)[:200]}); {fix}") from err


def read_tensors(path: Path, device, fix: str) -> dict[str, torch.Tensor]:
    """The tensors in the safetensors file ``path``; raises SAEFileError naming the file and ``fix``."""
    try:
        return load_file(str(path), device=str(device))
    except FileNotFoundError as err:
        raise SAEFileError(f"{path}: missing; {fix}") from err
    except (OSError, SafetensorError) as err:
        raise SAEFileError(f"{path}: not a readable safetensors file ({err}); {fix}") from err
