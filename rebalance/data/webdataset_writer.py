"""Writing WebDataset tar shards: each sample's members ``{key}.{ext}`` one after the other, published
atomically (``rebalance.data.atomic``). Reproducible bytes: USTAR headers with mtime 0 and mode 0644."""

from __future__ import annotations

import io
import os
import tarfile
from collections.abc import Iterable, Mapping

from rebalance.data.atomic import atomic_open
from rebalance.data.fs import StoragePath

__all__ = ["unsafe_key", "write_webdataset_tar"]


def unsafe_key(key: str) -> str | None:
    """Why ``key`` cannot name tar members ``{key}.{ext}`` safely, or None: empty, a NUL or other control
    character, a backslash, an absolute path, or an empty, ``.`` or ``..`` path component (``a/../b``).
    Keys with ``/`` between ordinary components (``dir/000123``) are fine: WebDataset keys may hold them."""
    if not key:
        return "empty key"
    if any(ord(c) < 32 or ord(c) == 127 for c in key):
        return "control character (NUL, newline, ...) in key"
    if "\\" in key:
        return "backslash in key"
    if key.startswith("/"):
        return "absolute path"
    if any(part in ("", ".", "..") for part in key.split("/")):
        return "empty, '.' or '..' path component"
    return None


def write_webdataset_tar(
    path: str | os.PathLike | StoragePath, samples: Iterable[Mapping[str, bytes]]
) -> None:
    """Write ``samples`` as one tar at ``path``: a sample is ``{"__key__": key, ext: data, ...}`` (all bytes)
    and becomes the members ``key.ext`` in the sample's order; the file appears complete or not at all. A key
    that :func:`unsafe_key` refuses raises ValueError naming it, before the tar is published."""
    with atomic_open(path) as fh, tarfile.open(fileobj=fh, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for sample in samples:
            key = sample["__key__"].decode()
            why = unsafe_key(key)
            if why:
                raise ValueError(f"refusing WebDataset key {key!r} as a tar member name: {why}")
            for ext, data in sample.items():
                if ext != "__key__":
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    info.mtime = 0
                    info.mode = 0o644
                    tar.addfile(info, io.BytesIO(data))
