"""Small input files that reader tests build shards from."""

from __future__ import annotations

import io
import tarfile

from PIL import Image


def image_bytes(i: int, fmt: str = "PNG", size: int = 4) -> bytes:
    """An encoded ``size`` x ``size`` RGB image whose colour depends on ``i``."""
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (i % 256, (7 * i) % 256, (13 * i) % 256)).save(buffer, fmt)
    return buffer.getvalue()


def write_tar(path, members) -> None:
    """A tar file of ``members``: (name, bytes) pairs, in that order."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
