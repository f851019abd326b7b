"""Writing files and folders so that a crash never leaves a half-written one: write aside, then rename.

What is written is made durable (fsync of the files and their folder) before the rename that
publishes it, and gets the modes a plain ``open`` / ``mkdir`` would give it: files
``0o666 & ~umask``, folders ``0o777 & ~umask``. The umask is never read or changed (``os.umask``
would race with other threads): the kernel applies it when the temporary file or folder is
created, and what is written into it gets that folder's mode.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import stat
from collections.abc import Callable
from pathlib import Path


def write_atomic(target: str | os.PathLike, write: Callable[[str], object]) -> None:
    """Call ``write(tmp_path)`` on a new empty file beside ``target``, fsync it, then move it into place.

    Raises whatever ``write`` raises, or OSError; ``target`` is then as it was and the file is gone.
    """
    target = Path(target)
    tmp = _new_beside(target, ".tmp", lambda p: os.close(os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)))
    mode = stat.S_IMODE(tmp.stat().st_mode)  # 0o666 & ~umask, as open gave it
    try:
        write(str(tmp))
        os.chmod(tmp, mode)  # a writer that replaces the file (safetensors' save_file) leaves it 0o600
        _fsync(tmp)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync(target.parent)


def write_text_atomic(target: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``target`` atomically; raises OSError, leaving ``target`` as it was."""
    write_atomic(target, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def write_folder_atomic(target: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp)`` on a new empty folder beside ``target``, fsync it, then swap it in for ``target``.

    An existing ``target`` is renamed aside, the new folder renamed in, and only then the old one
    removed; on any failure the new folder is removed and ``target`` is back exactly as it was.
    (Between the two renames ``target`` is briefly absent: POSIX has no portable exchange.)
    A symlink ``target`` keeps pointing where it did: the folder it points to is replaced.
    Returns the folder written. Raises whatever ``write`` raises, or OSError.
    """
    target = Path(os.path.abspath(target))
    if target.is_symlink():
        target = target.resolve()
    tmp = _new_beside(target, ".tmp", lambda p: os.mkdir(p, 0o777))
    mode = stat.S_IMODE(tmp.stat().st_mode)  # 0o777 & ~umask, as mkdir gave it
    try:
        write(tmp)
        for path in sorted(tmp.rglob("*"), reverse=True):  # files before the folders that hold them
            # safetensors' save_file leaves its files 0o600; give them what open would
            os.chmod(path, mode if path.is_dir() else mode & 0o666)
            _fsync(path)
        _fsync(tmp)
        _swap_in(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _swap_in(new: Path, target: Path) -> None:
    """Rename ``new`` to ``target``; an existing ``target`` goes aside first and is removed only after."""
    if not target.exists():
        os.rename(new, target)
        _fsync(target.parent)
        return
    aside = _new_beside(target, ".old", lambda p: os.mkdir(p, 0o700))
    try:
        os.rename(target, aside / target.name)
        try:
            os.rename(new, target)
        except BaseException:
            os.rename(aside / target.name, target)
            raise
    except BaseException:
        with contextlib.suppress(OSError):  # empty unless putting target back failed: then keep it
            aside.rmdir()
        raise
    _fsync(target.parent)
    shutil.rmtree(aside, ignore_errors=True)


def _new_beside(target: Path, suffix: str, create: Callable[[Path], object]) -> Path:
    """A new hidden path ``.{name}.{random}{suffix}`` beside ``target``, created by ``create`` (which must
    fail with FileExistsError if the path exists)."""
    while True:
        path = target.parent / f".{target.name}.{secrets.token_hex(4)}{suffix}"
        try:
            create(path)
            return path
        except FileExistsError:
            continue


def _fsync(path: Path) -> None:
    """Flush a file's or a folder's contents to disk (folders: the names in it; not on Windows)."""
    if path.is_dir() and os.name == "nt":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
