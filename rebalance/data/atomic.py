"""Atomic output writes: a reader never sees a half-written file, only the old one (or none) or the new one.

Local paths: write to a temporary name in the same directory, fsync, then ``os.replace``.

Object stores (any :class:`~rebalance.data.fs.StoragePath`) have no atomic rename, and pyarrow's upload
stream publishes whatever was written when it is closed, also when it is closed (or garbage-collected)
after an error. So the bytes go to a temporary object beside the target, and only after that upload has
completed is the target created, in one request, by a server-side copy (S3 CopyObject, GCS rewrite), which
is all-or-nothing; the temporary object is then deleted. A writer that fails leaves no target (and its
temporary object is deleted); a killed one leaves at most an incomplete multipart upload, which is never
visible as an object.

Temporary names start with ``.`` and hold ``.tmp-`` so that listings of a run directory skip them.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from rebalance.data.fs import StoragePath, as_path

__all__ = ["atomic_open", "atomic_write_bytes", "atomic_write_json", "atomic_write_table", "atomic_save_npy"]


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike | StoragePath) -> Iterator[BinaryIO]:
    """Open a temporary file beside ``path`` for binary writing; publish it at ``path`` on success only."""
    target = as_path(path)
    if isinstance(target, StoragePath):
        with _atomic_open_remote(target) as handle:
            yield handle
        return
    path = Path(target)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def _atomic_open_remote(target: StoragePath) -> Iterator[BinaryIO]:
    """Upload to a temporary object, then publish it at ``target`` by a server-side copy."""
    fs = target.fs
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    stream = target._call("write", fs.open_output_stream, tmp.fs_path)
    try:
        try:
            yield stream
        except BaseException:
            with contextlib.suppress(OSError, pa.ArrowException):
                stream.close()  # completes the temporary object with what was written: deleted below
            raise
        target._call("write", stream.close)
        target._call("write", fs.copy_file, tmp.fs_path, target.fs_path)
    finally:
        with contextlib.suppress(OSError, pa.ArrowException):
            fs.delete_file(tmp.fs_path)


def atomic_write_bytes(data: bytes, path: str | os.PathLike | StoragePath) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_open(path) as handle:
        handle.write(data)


def atomic_write_json(obj: Any, path: str | os.PathLike | StoragePath) -> None:
    """Write ``obj`` as indented, key-sorted JSON (with a trailing newline) to ``path`` atomically."""
    atomic_write_bytes((json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n").encode(), path)


def atomic_write_table(table: pa.Table, path: str | os.PathLike | StoragePath) -> None:
    """Write ``table`` as one Parquet file at ``path`` atomically."""
    with atomic_open(path) as handle:
        pq.write_table(table, handle)


def atomic_save_npy(array: np.ndarray, path: str | os.PathLike | StoragePath) -> None:
    """Save ``array`` in ``.npy`` format at ``path`` atomically."""
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    atomic_write_bytes(buffer.getvalue(), path)
