"""Fault sweep (issue 11, item 5): the files vlmsae writes and reads.

Saving over an SAE folder or a checkpoint swaps whole folders (a failure leaves the old one exactly
as it was), written files and folders get the user's umask, a malformed cfg.json is an SAEFileError,
and resuming from a damaged or cluttered run is a typed error or ignores what is not a checkpoint.
"""

import copy
import functools
import importlib
import json
import os
import shutil
import stat
from dataclasses import fields
from pathlib import Path
from typing import get_args, get_origin, get_type_hints

import pytest
import torch
from safetensors.torch import load_file, save_file

from vlmsae.errors import ConfigError, SAEFileError
from vlmsae.files import write_atomic, write_text_atomic
from vlmsae.sae import ARCHITECTURES, SAE, SAEConfig
from vlmsae.train import latest_checkpoint, train
from vlmsae.zoo import tiny_inputs, tiny_model

LAYER = 1
RUN = dict(batch_size=64, buffer_size=256, checkpoint_every=8, progress=False)


def tree(folder: Path) -> dict:
    """Every path under ``folder``: mode, and a file's bytes and mtime (a folder's mtime moves when a
    temporary name is made and removed in it)."""
    return {str(p.relative_to(folder)): (p.stat().st_mode,) if p.is_dir() else (p.stat().st_mode, p.read_bytes(),
                                                                                p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*"))}


def make_sae(kind="topk") -> SAE:
    torch.manual_seed(0)
    return SAE(d_in=64, d_sae=128, k=8, architecture=kind)


@functools.cache
def _model():
    return tiny_model("llava", n_layers=2)


def data():
    return [tiny_inputs(_model(), 6, seed=s) for s in range(4)]


def resume(out: Path, steps: int = 24, **fields_) -> SAE:
    return train(_model(), LAYER, data(), make_sae(), out=out, resume=True, **dict(RUN, steps=steps, **fields_)).sae


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """A run folder whose only checkpoint is checkpoints/step-16."""
    out = tmp_path_factory.mktemp("run") / "run"
    train(_model(), LAYER, data(), make_sae(), out=out, **dict(RUN, steps=16))
    assert latest_checkpoint(out).name == "step-16"
    return out


@pytest.fixture
def run(trained_run, tmp_path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(trained_run, out)
    return out


# --- 1. a save replaces the folder as a whole ---------------------------------------------------

def failing_call(n: int, calls: list, real):
    """``real``, except that the ``n``-th call counted in ``calls`` raises OSError."""
    def wrapper(*args, **kwargs):
        calls.append(args)
        if len(calls) == n:
            raise OSError("disk full")
        return real(*args, **kwargs)
    return wrapper


@pytest.mark.parametrize("where", ["second file", "rename"])
def test_failed_save_over_an_sae_folder_leaves_it_byte_for_byte(tmp_path, monkeypatch, where):
    folder = tmp_path / "sae"
    make_sae("topk").save(folder)
    before = tree(tmp_path)
    calls = []
    if where == "second file":  # the weights are written, then cfg.json fails
        monkeypatch.setattr(Path, "write_text", failing_call(1, calls, Path.write_text))
    else:  # the second rename fails: the swap (a per-file save: cfg.json's)
        monkeypatch.setattr(os, "rename", failing_call(2, calls, os.rename))
        monkeypatch.setattr(os, "replace", failing_call(2, calls, os.replace))
    with pytest.raises(OSError, match="disk full"):
        make_sae("relu").save(folder)
    monkeypatch.undo()
    assert tree(tmp_path) == before  # the old SAE as it was, and no temporary folder beside it
    make_sae("relu").save(folder)
    assert sorted(os.listdir(tmp_path)) == ["sae"]
    assert sorted(os.listdir(folder)) == ["cfg.json", "sae_weights.safetensors"]
    assert SAE.load(folder).cfg.architecture == "relu"


def test_save_refuses_a_folder_holding_other_files(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    make_sae().save(tmp_path / "sae")
    (tmp_path / "sae" / "notes.txt").write_text("mine too")
    before = tree(tmp_path)
    with pytest.raises(SAEFileError, match=r"sae: holds \['notes.txt'\].*save to a new folder, or move them out"):
        make_sae("relu").save(tmp_path / "sae")
    with pytest.raises(SAEFileError, match=r"holds \['notes.txt', 'sae'\]"):
        make_sae("relu").save(tmp_path)
    assert tree(tmp_path) == before


def test_failed_checkpoint_write_keeps_the_last_checkpoint(run, monkeypatch):
    before = tree(run)
    checkpoints = importlib.import_module("vlmsae.checkpoints")
    monkeypatch.setattr(checkpoints, "save_file", failing_call(2, [], save_file))  # the buffer's file
    with pytest.raises(OSError, match="disk full"):
        resume(run)
    assert tree(run) == before  # step-16 as it was, no temporary folder left


@pytest.fixture
def disk_events(monkeypatch) -> list:
    """The fsync (by path), rename / replace and rmtree calls made, in order, with real paths."""
    if not Path("/proc/self/fd").is_dir():
        pytest.skip("names open files through /proc")
    events = []

    def log(kind, real, paths=lambda *a: a):
        def wrapper(*args, **kwargs):
            events.append((kind, *map(os.path.realpath, paths(*args))))
            return real(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(os, "fsync", log("fsync", os.fsync, lambda fd: [os.readlink(f"/proc/self/fd/{fd}")]))
    monkeypatch.setattr(os, "rename", log("rename", os.rename))
    monkeypatch.setattr(os, "replace", log("rename", os.replace))
    monkeypatch.setattr(shutil, "rmtree", log("rmtree", shutil.rmtree, lambda path, **_: [path]))
    return events


def assert_durable_swap(events: list, target: Path, is_old) -> None:
    """``target``'s files and the folder renamed to it were fsynced before that rename, the folder
    holding it after; the old version (``is_old(path)``) was removed only then."""
    target = os.path.realpath(target)
    appear = next(i for i, e in enumerate(events) if e[0] == "rename" and e[2] == target)
    tmp = events[appear][1]
    synced = {e[1] for e in events[:appear] if e[0] == "fsync"}
    assert {os.path.join(tmp, name) for name in os.listdir(target)} | {tmp} <= synced
    parent_synced = next(i for i, e in enumerate(events[appear:]) if e == ("fsync", os.path.dirname(target)))
    removed = next(i for i, e in enumerate(events[appear:]) if e[0] == "rmtree" and is_old(e[1]))
    assert removed > parent_synced


def test_a_save_over_an_sae_folder_is_on_disk_before_the_old_one_goes(tmp_path, disk_events):
    make_sae().save(tmp_path / "sae")
    disk_events.clear()
    make_sae("relu").save(tmp_path / "sae")
    assert_durable_swap(disk_events, tmp_path / "sae", lambda path: Path(path).name.startswith(".sae."))
    assert sorted(os.listdir(tmp_path)) == ["sae"]


def test_a_checkpoint_is_on_disk_before_it_replaces_the_last(run, disk_events):
    resume(run)
    ckpts = run / "checkpoints"
    assert_durable_swap(disk_events, ckpts / "step-24", lambda path: path == os.path.realpath(ckpts / "step-16"))
    assert sorted(os.listdir(ckpts)) == ["step-24"]


# --- 2. the user's umask ------------------------------------------------------------------------

@pytest.mark.parametrize("umask", [0o022, 0o027], ids=["022", "027"])
def test_written_files_and_folders_follow_the_umask(run, tmp_path, umask):
    old = os.umask(umask)
    try:
        make_sae().save(tmp_path / "sae")
        make_sae("relu").save(tmp_path / "sae")  # over an existing folder
        write_text_atomic(tmp_path / "report.html", "<html></html>")
        write_atomic(tmp_path / "x.safetensors", lambda tmp: save_file({"x": torch.zeros(2)}, tmp))
        resume(run)  # writes checkpoints/step-24 and the final SAE folder L1
    finally:
        os.umask(old)
    written = [tmp_path / "sae", tmp_path / "report.html", tmp_path / "x.safetensors",
               run / "checkpoints" / "step-24", run / f"L{LAYER}"]
    written += [p for folder in written if folder.is_dir() for p in folder.iterdir()]
    assert len(written) > 10
    for path in written:
        want = (0o777 if path.is_dir() else 0o666) & ~umask
        assert oct(stat.S_IMODE(path.stat().st_mode)) == oct(want), path


# --- 3. a malformed cfg.json --------------------------------------------------------------------

@pytest.mark.parametrize(
    "raw",
    [
        b"[" * 100_000 + b"]" * 100_000,                      # RecursionError in the parser
        b'{"a": ' * 100_000 + b"1" + b"}" * 100_000,
        b'{"d_in": ' + b"1" * 5000 + b"}",                   # longer than Python reads as an int
        b"\xff\xfe{\x00}\x00",                                  # not UTF-8
        b'{"d_in": 16,',                                        # cut off
        b"",
        b"[1, 2]",
        b'"cfg"',
        b"null",
        b"NaN",
    ],
    ids=["deep-list", "deep-object", "long-int", "utf16", "truncated", "empty", "list", "string", "null", "nan"],
)
def test_malformed_cfg_json_is_an_sae_file_error(tmp_path, raw):
    make_sae().save(tmp_path)
    (tmp_path / "cfg.json").write_bytes(raw)
    with pytest.raises(SAEFileError, match="restore the file or save the SAE again") as err:
        SAE.load(tmp_path)
    assert str(tmp_path / "cfg.json") in str(err.value)
    assert len(str(err.value)) < 600


@pytest.mark.parametrize("key", ["d_in", "d_sae"])
@pytest.mark.parametrize("value", ["16", 16.0, True, None, [16], {"n": 16}, 0, -16],
                         ids=["str", "float", "bool", "null", "list", "object", "zero", "negative"])
def test_wrong_d_in_or_d_sae_is_an_sae_file_error(tmp_path, key, value):
    make_sae().save(tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    cfg[key] = value
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(SAEFileError, match=rf"cfg.json: .*{key}.* (must be|config says)") as err:
        SAE.load(tmp_path)
    assert str(tmp_path) in str(err.value)


WRONG = [None, True, 0, -1, 1.5, float("inf"), "x", [], [1], {}, {"a": 1}, 10**30, 10**400]


def sparsify_folder(folder: Path) -> None:
    folder.mkdir()
    torch.manual_seed(0)
    save_file({"encoder.weight": torch.randn(32, 8), "encoder.bias": torch.randn(32), "W_dec": torch.randn(32, 8),
               "b_dec": torch.randn(8)}, folder / "sae.safetensors")
    (folder / "cfg.json").write_text(json.dumps({
        "activation": "topk", "expansion_factor": 4, "normalize_decoder": True, "num_latents": 32, "k": 4,
        "multi_topk": False, "skip_connection": False, "transcode": False, "signed": False, "d_in": 8}))


def key_paths(cfg: dict, prefix=()):
    for key, value in cfg.items():
        yield prefix + (key,)
        if isinstance(value, dict):
            yield from key_paths(value, prefix + (key,))


@pytest.mark.parametrize("layout", [*ARCHITECTURES, "sparsify"])
def test_any_wrong_value_in_cfg_json_is_an_sae_file_error(tmp_path, layout):
    """Every key, set to every JSON type (or deleted): the folder opens with well-typed config
    fields, or is an SAEFileError naming cfg.json; nothing else."""
    folder = tmp_path / "layers.3"
    if layout == "sparsify":
        sparsify_folder(folder)
    else:
        SAE(d_in=8, d_sae=32, k=4, architecture=layout).save(folder)
    good = json.loads((folder / "cfg.json").read_text())
    hints = get_type_hints(SAEConfig)
    for path in list(key_paths(good)):
        for value in [*WRONG, "delete"]:
            cfg = copy.deepcopy(good)
            parent = functools.reduce(dict.__getitem__, path[:-1], cfg)
            if value == "delete":
                del parent[path[-1]]
            else:
                parent[path[-1]] = value
            (folder / "cfg.json").write_text(json.dumps(cfg))
            try:
                sae = SAE.load(folder)
            except SAEFileError as err:
                assert str(folder / "cfg.json") in str(err) or str(folder) in str(err), (path, value, err)
                continue
            for f in fields(SAEConfig):  # it opened: every field has its declared type
                allowed = tuple(get_origin(t) or t for t in get_args(hints[f.name]) or (hints[f.name],))
                got = getattr(sae.cfg, f.name)
                if isinstance(got, tuple):  # matryoshka_widths: a tuple of ints
                    assert all(isinstance(v, int) and not isinstance(v, bool) for v in got), (path, value, got)
                assert isinstance(got, dict if f.name == "metadata" else allowed), (path, value, f.name, got)
                assert isinstance(got, bool) is (bool in allowed), (path, value, f.name, got)


# --- 4. resuming from a damaged or cluttered run --------------------------------------------------

def cut_in_half(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def drop_key(name: str, key: str):
    def damage(ckpt: Path) -> None:
        if name.endswith(".json"):
            meta = json.loads((ckpt / name).read_text())
            del meta[key]
            (ckpt / name).write_text(json.dumps(meta))
        else:
            tensors = load_file(ckpt / name)
            del tensors[key]
            save_file(tensors, ckpt / name)
    return damage


@pytest.mark.parametrize(
    "damage, error, fragment",
    [
        (lambda c: cut_in_half(c / "trainer-L1-0.safetensors"), SAEFileError,
         r"trainer-L1-0.safetensors: not a readable safetensors file .*; delete .*step-16 and run without resume=True"),
        (lambda c: cut_in_half(c / "buffer-L1.safetensors"), SAEFileError,
         r"buffer-L1.safetensors: not a readable safetensors file .*; delete .*step-16"),
        (lambda c: (c / "state.json").unlink(), SAEFileError, r"step-16/state.json: missing; delete .*step-16"),
        (lambda c: cut_in_half(c / "state.json"), SAEFileError, r"state.json: not readable JSON .*; delete"),
        (lambda c: (c / "state.json").write_text("[]"), SAEFileError, r"state.json: needs an integer 'step'"),
        (lambda c: cut_in_half(c / "trainer-L1-0.json"), SAEFileError, r"trainer-L1-0.json: not readable JSON"),
        (lambda c: (c / "trainer-L1-0.json").unlink(), SAEFileError, r"trainer-L1-0.json: missing; delete"),
        (drop_key("trainer-L1-0.json", "param_groups"), SAEFileError,
         r"step-16: the checkpoint does not hold what this vlmsae writes \(KeyError.*param_groups.*delete"),
        (drop_key("buffer-L1.safetensors", "generator"), SAEFileError,
         r"step-16: the checkpoint does not hold what this vlmsae writes \(KeyError.*generator.*delete"),
        (lambda c: (c / "trainer-L1-0.safetensors").rename(c / "trainer-L0-0.safetensors"), ConfigError,
         r"trainer-L1-0.safetensors: missing, so this checkpoint has no SAE 0 of layer 1; resume with the layers"),
        (lambda c: shutil.rmtree(c.parent) or c.parent.write_text("x"), SAEFileError,
         r"checkpoints: is not a folder, so it cannot hold checkpoints; move it away"),
    ],
    ids=["trainer-cut", "buffer-cut", "no-state", "state-cut", "state-list", "trainer-json-cut", "no-trainer-json",
         "trainer-json-key", "buffer-key", "other-layer", "checkpoints-a-file"],
)
def test_resuming_from_a_damaged_checkpoint_is_a_typed_error(run, damage, error, fragment):
    damage(run / "checkpoints" / "step-16")
    before = tree(run)
    with pytest.raises(error, match=fragment):
        resume(run)
    assert tree(run) == before


def test_what_is_not_a_checkpoint_is_ignored_and_kept(run, tmp_path):
    clean = tmp_path / "clean"
    shutil.copytree(run, clean)
    expected = resume(clean)
    ckpts = run / "checkpoints"
    strays = [run / "notes" / "todo.txt", ckpts / "notes" / "todo.txt", ckpts / "README",
              ckpts / "step-final" / "state.json", ckpts / "step-99", ckpts / "step-007" / "state.json",
              ckpts / ".step-24.1a2b3c4d.tmp" / "trainer-L1-0.safetensors"]  # a crashed write's leftover
    for path in strays:
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"{not a checkpoint")
    got = resume(run)
    for name, tensor in expected.state_dict().items():  # resumed from step-16, as the clean run did
        assert torch.equal(got.state_dict()[name], tensor), name
    assert latest_checkpoint(run) == ckpts / "step-24"
    assert all(path.read_bytes() == b"{not a checkpoint" for path in strays)
    assert not (ckpts / "step-16").exists()
