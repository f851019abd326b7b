"""Writing files so that a crash never leaves a half-written one: a temporary file, then a rename."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def write_atomic(target: str | os.PathLike, write: Callable[[str], object]) -> None:
    """Call ``write(tmp_path)`` on a temporary file beside ``target``, then move it into place."""
    target = Path(target)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(target: str | os.PathLike, text: str) -> None:
    write_atomic(target, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
