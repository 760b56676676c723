"""The interface every input format implements, after Ray Data's ``Datasource`` (one module per format).

An input format is one module of ``rebalance/data/`` holding one :class:`InputFormat` and one line in the
registry :data:`rebalance.data.readers.FORMATS`, whose order is the order ``data.format: auto`` tries them
in. Its ``name`` is a ``data.format`` value of the spec and the :attr:`~rebalance.data.rows.Shard.kind` of
the shards it lists; it answers five questions about a dataset:

- :meth:`~InputFormat.detect`: does ``data.path`` look like this format (for ``auto``)?
- :meth:`~InputFormat.list_shards`: its shards, in the order that numbers the parts of the run directory;
- :meth:`~InputFormat.resolve`: the dataset's format name and its image and text columns (None: no such side);
- :meth:`~InputFormat.read`: one shard, as :class:`~rebalance.data.rows.RowBatch` es of at most
  ``batch_size`` rows;
- :meth:`~InputFormat.empty_batch`: a batch with no rows and the dataset's sides and types, which stands for
  a shard that cannot be read.

What is common to every format (unreadable shards, keys repeated within a shard, fingerprints) is done
once, in :mod:`rebalance.data.readers`.
"""

from __future__ import annotations

import tarfile
import zlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from functools import cached_property
from pathlib import Path
from typing import NamedTuple, TypeVar

import numpy as np
import pyarrow as pa

from rebalance.data import fs
from rebalance.data.rows import RowBatch, Shard
from rebalance.spec import DataSpec, SpecError

__all__ = ["InputFormat", "Columns", "Location", "LayoutError", "UNREADABLE", "first_readable", "no_columns"]

# Errors that mean a shard's bytes cannot be read as its format; anything else is a bug and propagates.
UNREADABLE = (OSError, EOFError, ValueError, tarfile.TarError, pa.ArrowException, zlib.error)
# Shards :meth:`InputFormat.empty_batch` tries, by default, to learn the dataset's types from.
EMPTY_PROBES = 32

T = TypeVar("T")


class Columns(NamedTuple):
    """What :meth:`InputFormat.resolve` finds: the dataset's format name (a ``data.format`` value) and its
    image and text columns, None for a side the dataset lacks."""

    format: str
    image: str | None
    text: str | None


class LayoutError(ValueError):
    """The files of a dataset do not fit together (a LAION shard's files with different row counts, ...):
    the run fails naming them; it is never taken for one unreadable shard."""


class Location:
    """``data.path`` as the formats look at it: ``root`` (a local path or a :class:`~rebalance.data.fs.
    StoragePath`), whether it is a file, and the visible files under it, listed once on first use (so
    that trying several formats lists a remote store once)."""

    def __init__(self, path: str | Path | fs.StoragePath):
        self.path = str(path)
        self.root = fs.as_path(path)

    @cached_property
    def is_file(self) -> bool:
        return self.root.is_file()

    @cached_property
    def files(self) -> list[str]:
        """Relative POSIX paths of the visible files under a directory (names and folders starting with
        ``.`` skipped), in listing order."""
        return list(fs.walk_files(self.root))

    def has(self, suffix: str) -> bool:
        """Whether some visible file under the directory ends in ``suffix`` (any case)."""
        return any(rel.lower().endswith(suffix) for rel in self.files)

    def file_shards(self, suffix: str, kind: str) -> list[Shard]:
        """One shard per file: ``data.path`` itself when it is a file, else every visible file under it
        whose name ends in ``suffix`` (any case), sorted by path (component by component)."""
        if self.is_file:
            return [Shard(0, str(self.root), kind=kind, rel=self.root.name)]
        paths = sorted(self.root / rel for rel in self.files if rel.lower().endswith(suffix))
        return [
            Shard(i, str(p), kind=kind, rel=p.relative_to(self.root).as_posix()) for i, p in enumerate(paths)
        ]


class InputFormat(ABC):
    """One input format. ``name``: its ``data.format`` value and the ``Shard.kind`` of its shards;
    ``formats``: the ``data.format`` values it reads (``name``; Parquet also reads ``embeddings``);
    ``looks_for``: what it looks for under ``data.path``, for messages (``.tar shards``)."""

    name: str
    looks_for: str

    @property
    def formats(self) -> tuple[str, ...]:
        return (self.name,)

    @abstractmethod
    def detect(self, where: Location) -> bool:
        """Whether ``auto`` reads ``where`` as this format (asked in the registry's order)."""

    @abstractmethod
    def list_shards(self, where: Location) -> list[Shard]:
        """The shards in order, numbered from 0; empty when ``where`` holds none. Raises
        :class:`SpecError` when the files are there but do not make a dataset of this format."""

    @abstractmethod
    def resolve(self, data: DataSpec, shards: list[Shard]) -> Columns:
        """The dataset's format and columns; checks ``data``'s columns and ``carry`` against the files
        (:class:`SpecError` naming the field)."""

    @abstractmethod
    def read(self, shard: Shard, data: DataSpec, columns: Columns, batch_size: int) -> Iterator[RowBatch]:
        """The shard's rows in batches of at most ``batch_size`` (kept and rejected together), at least
        one; an error of :data:`UNREADABLE` means the shard (from there on) cannot be read."""

    def empty_batch(self, shard: Shard, data: DataSpec, columns: Columns) -> RowBatch:
        """A batch with no rows whose sides, vector widths and carried types match the dataset's.

        By default they are taken from the first of the dataset's other shards (at most EMPTY_PROBES) that
        can be read (an unreadable shard tells nothing about them); failing that, vectors are (0, 0) and
        carried columns null-typed.
        """
        for other in self.list_shards(Location(data.path))[:EMPTY_PROBES]:
            if other.path == shard.path:
                continue
            try:
                for batch in self.read(other, data, columns, 1):
                    return batch.empty_like()
            except UNREADABLE:
                continue
        fmt, has_image, has_text = columns.format, columns.image is not None, columns.text is not None
        vectors = np.zeros((0, 0), np.float32) if fmt == "embeddings" else None
        return RowBatch(
            keys=[],
            images=[] if has_image and fmt != "embeddings" else None,
            texts=[] if has_text and fmt != "embeddings" else None,
            image_vectors=vectors if has_image else None,
            text_vectors=vectors if has_text else None,
            carried={c: pa.array([], pa.null()) for c in data.carry},
        )


def no_columns(data: DataSpec, fmt: str) -> None:
    """Raise :class:`SpecError` when ``data`` names an image or text column: format ``fmt`` finds its
    sides from the files."""
    for name, value in (("data.image_column", data.image_column), ("data.text_column", data.text_column)):
        if value is not None:
            raise SpecError(name, f"is not used with format {fmt} (sides are found from the files)", value)


def first_readable(shards: list[Shard], probe: Callable[[Shard], T]) -> tuple[Shard, T]:
    """(shard, ``probe(shard)``) of the first shard the probe does not fail on (an :data:`UNREADABLE`
    error); :class:`SpecError` naming the failures if there is none among the first 20."""
    errors = []
    for shard in shards:
        try:
            return shard, probe(shard)
        except UNREADABLE as err:
            errors.append(f"{shard.label}: {type(err).__name__}: {err}")
            if len(errors) >= 20:
                break
    raise SpecError("data.path", f"no readable shard ({'; '.join(errors[:3])})")
