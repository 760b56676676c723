"""What every shard reader produces: :class:`Shard` (one unit of input), :class:`RowBatch` (up to
``batch_size`` rows of it) and :class:`BatchBuilder`, which assembles batches row by row for the readers of
formats that are not columnar (WebDataset tars, image folders)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from rebalance.data.fs import as_path

__all__ = ["Shard", "RowBatch", "BatchBuilder", "SourceRow", "MAX_ENCODED_BYTES", "decode_caption"]

# An image or caption file / tar member larger than this is rejected without being read into memory, so a
# batch holds at most batch_size * MAX_ENCODED_BYTES bytes of encoded data.
MAX_ENCODED_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class Shard:
    """One unit of input: its position in the sorted shard list and the files it reads.

    ``kind`` names the input format that listed the shard and reads it (a key of
    :data:`rebalance.data.readers.FORMATS`: ``parquet``, ``webdataset``, ...). ``files`` are the files of a
    shard of several (a folder chunk's images and sidecar captions; a LAION shard's ``.npy`` and metadata
    files), empty for a shard of one file. ``path`` is the shard's first file (a local path or a URI: a
    string, so that it travels to Ray actors on any node). ``rel`` is how keys and messages name the shard:
    the path relative to ``data.path`` (the file name when ``data.path`` is a file), or the number ``i`` of
    a LAION shard.
    """

    index: int
    path: str
    kind: str = "parquet"
    files: tuple[str, ...] = ()
    rel: str = ""

    @property
    def name(self) -> str:
        return as_path(self.path).name

    @property
    def label(self) -> str:
        """The shard's name in keys and messages."""
        return self.rel or self.name

    @property
    def all_files(self) -> tuple[str, ...]:
        """Every file the shard reads (``path`` first for single-file shards)."""
        return self.files or (self.path,)


@dataclass
class RowBatch:
    """Up to batch_size rows of one shard.

    keys: (n,) row keys. images: n encoded images (bytes, None for a row without one) or None when the
    dataset has no image side; texts: n captions (str, or None / bytes still to be decoded) or None when it
    has no text side. image_vectors / text_vectors: for ``format: embeddings``, (n, d) float32 (None for an
    absent side). carried: the carried metadata columns (n rows each). rejected: (key, reason) of rows of
    this batch that the reader already rejected (they are not among ``keys``).
    """

    keys: list[str]
    images: list[bytes | None] | None = None
    texts: list[str | bytes | None] | None = None
    image_vectors: np.ndarray | None = None
    text_vectors: np.ndarray | None = None
    carried: dict[str, pa.Array] = field(default_factory=dict)
    rejected: list[tuple[str, str]] = field(default_factory=list)

    @property
    def size(self) -> int:
        """Rows of the input this batch covers: kept plus rejected."""
        return len(self.keys) + len(self.rejected)

    def empty_like(self) -> RowBatch:
        """A batch with no rows and the same sides, vector widths and carried column types."""
        return RowBatch(
            keys=[],
            images=None if self.images is None else [],
            texts=None if self.texts is None else [],
            image_vectors=None if self.image_vectors is None else self.image_vectors[:0],
            text_vectors=None if self.text_vectors is None else self.text_vectors[:0],
            carried={name: column.slice(0, 0) for name, column in self.carried.items()},
        )


def decode_caption(raw: bytes) -> tuple[str | None, str | None]:
    """(caption, None) for UTF-8 bytes, else (None, ``text:not utf-8``). A leading BOM is dropped."""
    try:
        return raw.decode("utf-8-sig"), None
    except UnicodeDecodeError:
        return None, "text:not utf-8"


SourceRow = tuple[str, bytes | None, str | None, dict[str, str | None] | None, str | None]
"""One row as a reader finds it: key, image bytes, caption, carried values, rejection reason (or None)."""


class BatchBuilder:
    """Collects rows one by one and hands out a :class:`RowBatch` whenever ``batch_size`` rows (kept and
    rejected together) have arrived. Carried values are strings (or None)."""

    def __init__(self, batch_size: int, has_image: bool, has_text: bool, carry: tuple[str, ...] = ()):
        self.batch_size, self.has_image, self.has_text, self.carry = batch_size, has_image, has_text, carry
        self._reset()

    def _reset(self) -> None:
        self.keys: list[str] = []
        self.images: list[bytes | None] = []
        self.texts: list[str | None] = []
        self.carried: dict[str, list[str | None]] = {c: [] for c in self.carry}
        self.rejected: list[tuple[str, str]] = []

    @property
    def full(self) -> bool:
        return len(self.keys) + len(self.rejected) >= self.batch_size

    def add(
        self,
        key: str,
        image: bytes | None = None,
        text: str | None = None,
        carried: dict[str, str | None] | None = None,
    ) -> None:
        self.keys.append(key)
        self.images.append(image)
        self.texts.append(text)
        for name in self.carry:
            self.carried[name].append((carried or {}).get(name))

    def reject(self, key: str, reason: str) -> None:
        self.rejected.append((key, reason))

    def flush(self) -> RowBatch | None:
        """The rows collected so far as a batch (None when there are none), and start a new one."""
        if not self.keys and not self.rejected:
            return None
        batch = RowBatch(
            keys=self.keys,
            images=self.images if self.has_image else None,
            texts=self.texts if self.has_text else None,
            carried={c: pa.array(v, pa.string()) for c, v in self.carried.items()},
            rejected=self.rejected,
        )
        self._reset()
        return batch

    def batches(self, rows: Iterable[SourceRow]) -> Iterator[RowBatch]:
        """Batch a shard's rows: (key, image, text, carried, reason), rejected when ``reason`` is not None;
        always at least one batch (an empty one for a shard without rows)."""
        yielded = False
        for key, image, text, carried, reason in rows:
            if reason is not None:
                self.reject(key, reason)
            else:
                self.add(key, image, text, carried)
            if self.full:
                yield self.flush()
                yielded = True
        last = self.flush()
        if last is not None or not yielded:
            yield last if last is not None else self.empty()

    def empty(self) -> RowBatch:
        """A batch with no rows and this builder's sides and carried columns."""
        return RowBatch(
            keys=[],
            images=[] if self.has_image else None,
            texts=[] if self.has_text else None,
            carried={c: pa.array([], pa.string()) for c in self.carry},
        )
