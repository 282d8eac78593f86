"""Atomic file writes: the new content goes to a temporary file in the destination's folder (so that
the rename stays on one file system), is flushed and fsynced, renamed over the destination, and the
folder is fsynced (so that the rename itself survives a power cut). A reader, or a run resumed after
a kill, sees either the previous complete file or the new complete one, never a partial write.
A folder of files (`write_folder_atomic`) is filled beside its destination and renamed into place
the same way."""

from __future__ import annotations

import os
import secrets
import shutil
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


def write_folder_atomic(path: str | os.PathLike, fill: Callable[[Path], object], *, replace: bool = False) -> Path:
    """`fill(temporary_folder)` writes every file of a new folder (each with `write_atomic`, which
    syncs it), and the folder then takes the place of `path` with one rename. `path` may be missing or
    an empty folder; a folder with files in it is replaced only with `replace` (FileExistsError
    otherwise). An old folder is moved aside before the rename and deleted after it, so `path` is, for
    that moment, missing, but never partly written. Returns `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} is a file, not a folder")
    if path.is_dir() and any(path.iterdir()) and not replace:
        raise FileExistsError(f"{path} is a folder with files in it")
    temporary = _new_temporary_folder(path)
    aside = None
    try:
        fill(temporary)
        fsync_folder(temporary)
        if path.is_dir():
            aside = _new_temporary_folder(path, suffix=".old")
            os.replace(path, aside)  # onto the empty folder just made
        os.replace(temporary, path)
    except BaseException:
        if aside is not None and not path.exists():
            os.replace(aside, path)  # the old folder back where it was
        shutil.rmtree(temporary, ignore_errors=True)
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
        raise
    fsync_folder(path.parent)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)
    return path


def _new_temporary_folder(path: Path, suffix: str = ".tmp") -> Path:
    """An empty new folder beside `path`, hidden by its leading dot."""
    while True:
        temporary = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}{suffix}")
        try:
            temporary.mkdir()
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
