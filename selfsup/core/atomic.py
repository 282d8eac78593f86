"""Atomic file writes: the new content goes to a temporary file in the destination's folder (so that
the rename stays on one file system), is flushed and fsynced, renamed over the destination, and the
folder is fsynced (so that the rename itself survives a power cut). A reader, or a run resumed after
a kill, sees either the previous complete file or the new complete one, never a partial write."""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path


def write_atomic(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """`write(temporary_path)` writes the whole file (torch.save, safetensors' save_file, ...), which
    then replaces `path` atomically. Returns `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = _new_temporary(path)
    try:
        write(temporary)
        _fsync(temporary, os.O_RDONLY)  # the writer closed (and so flushed) its file; now to disk
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    fsync_folder(path.parent)
    return path


def _new_temporary(path: Path) -> Path:
    """An empty new file beside `path`, with the permissions that the umask gives any new file
    (tempfile.mkstemp would make it readable by its owner only)."""
    while True:
        temporary = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
        try:
            os.close(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return temporary
        except FileExistsError:
            continue


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    return write_atomic(path, lambda temporary: temporary.write_bytes(data))


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    return write_atomic(path, lambda temporary: temporary.write_text(text))


def fsync_folder(folder: str | os.PathLike) -> None:
    """Make the entries of `folder` (a rename into it) durable."""
    try:
        _fsync(Path(folder), os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # some file systems (and Windows) cannot fsync a folder; the rename is done anyway
        pass


def _fsync(path: Path, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
