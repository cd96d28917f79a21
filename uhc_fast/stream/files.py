"""Durable file I/O: atomic JSON records, fsync of files and folders, ``.npy`` files written in place."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import numpy as np


def read_json(path: Path):
    """The JSON in ``path``, or None when it is missing or unreadable."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def write_json_atomic(path: Path, obj, durable: bool = True) -> None:
    """Write ``path`` so that a reader sees the old file or the whole new one, never a torn one.

    ``durable``: the content is on disk (fsync) before the file takes the name.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, default=_json_default)
        f.flush()
        if durable:
            os.fsync(f.fileno())
    os.replace(tmp, path)


def _json_default(x):
    if isinstance(x, (np.integer, np.floating)):
        return x.item()
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def fsync_dir(path: Path) -> None:
    """Make the names in folder ``path`` (creations, renames, removals) durable."""
    with contextlib.suppress(OSError):  # not possible on every platform/file system
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def create_npy(path: Path, dtype: np.dtype, shape: tuple[int, int]) -> None:
    """An all-zero ``.npy`` of ``shape`` (sparse where the file system allows)."""
    arr = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
    arr.flush()
    del arr


def npy_data_offset(path: Path, dtype: np.dtype, shape: tuple[int, int]) -> int:
    """Byte offset of the data in a C-ordered ``.npy`` of ``dtype`` and ``shape``.

    Raises ValueError when the file's header says otherwise or the file is shorter than its header.
    """
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        got_shape, fortran, got_dtype = reader(f)
        offset = f.tell()
    if tuple(got_shape) != tuple(shape) or got_dtype != dtype or fortran:
        raise ValueError(f"{path}: holds {got_dtype} {tuple(got_shape)}, expected {dtype} {tuple(shape)}")
    if path.stat().st_size < offset + int(np.prod(shape)) * dtype.itemsize:
        raise ValueError(f"{path}: shorter than its header says")
    return offset


def write_at(fd: int, offset: int, data) -> None:
    """Write all of ``data`` (a bytes-like object) at byte ``offset`` of the open file ``fd``."""
    view = memoryview(data).cast("B")
    written = 0
    while written < len(view):
        written += os.pwrite(fd, view[written:], offset + written)
