"""Writing WebDataset tar shards: each sample's members ``{key}.{ext}`` one after the other, published
atomically (``rebalance.data.atomic``). Reproducible bytes: USTAR headers with mtime 0 and mode 0644."""

from __future__ import annotations

import io
import os
import tarfile
from collections.abc import Iterable, Mapping

from rebalance.data.atomic import atomic_open
from rebalance.data.fs import StoragePath

__all__ = ["write_webdataset_tar"]


def write_webdataset_tar(
    path: str | os.PathLike | StoragePath, samples: Iterable[Mapping[str, bytes]]
) -> None:
    """Write ``samples`` as one tar at ``path``: a sample is ``{"__key__": key, ext: data, ...}`` (all bytes)
    and becomes the members ``key.ext`` in the sample's order; the file appears complete or not at all."""
    with atomic_open(path) as fh, tarfile.open(fileobj=fh, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for sample in samples:
            key = sample["__key__"].decode()
            for ext, data in sample.items():
                if ext != "__key__":
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    info.mtime = 0
                    info.mode = 0o644
                    tar.addfile(info, io.BytesIO(data))
