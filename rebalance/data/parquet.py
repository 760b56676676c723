"""Parquet files (``format: parquet``, and ``format: embeddings`` when the image/text columns hold vectors).

The img2dataset layout: a binary image column (default ``jpg``), a caption column (default ``txt``), a key
column and an optional ``status``; rows whose ``status`` is not ``success`` are rejected with reason
``status:<value>``. With float-list columns (default ``image`` and ``text``) the dataset has format
``embeddings`` and the vectors are used as they are. Shards are the visible ``.parquet`` files under
``data.path``, sorted by path, or ``data.path`` itself when it is a file (whatever its name: auto reads any
single file that is not a ``.tar`` as Parquet). Keys come from ``data.key_column`` when the shard has it,
else ``<shard>:<row>``.

Untrusted shards: an image cell over ``data.max_image_bytes`` is rejected (``image:too large``), and a row
group whose image column decompresses to more than ``max_image_bytes`` per row is rejected whole without
being decompressed (its rows get ``image:too large (row group ...)``). An image column that is not binary or
a caption column that is not a string is a :class:`SpecError` naming it in the shard that decides the
format, and makes any later shard unreadable (``shard:unreadable``, naming the column).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from rebalance.data import fs
from rebalance.data.input_format import Columns, InputFormat, Location, first_readable
from rebalance.data.rows import RowBatch, Shard
from rebalance.spec import DataSpec, SpecError

__all__ = ["FORMAT", "ParquetFormat", "columns_of", "vector_matrix"]


def columns_of(shard: Shard) -> pa.Schema:
    """The schema of one Parquet shard, read from its footer."""
    return fs.read_schema(shard.path)


_BINARY = (pa.types.is_binary, pa.types.is_large_binary, pa.types.is_null)
_TEXT = (pa.types.is_string, pa.types.is_large_string, *_BINARY)  # binary captions are decoded as UTF-8


def _type_problem(schema: pa.Schema, name: str | None, side: str, where: str) -> str | None:
    """Why a ``parquet``-format image column (``side="image"``: binary) or caption column (``"text"``:
    string or binary) cannot be read, naming it; None when it can (or is absent)."""
    if name is None:
        return None
    kind = schema.field(name).type
    wanted, tests = ("binary", _BINARY) if side == "image" else ("string", _TEXT)
    return (
        None
        if any(test(kind) for test in tests)
        else f"column {name!r} of {where} has type {kind}, not {wanted}"
    )


def _oversized_row_groups(parquet, image_column: str, max_bytes: int) -> set[int]:
    """Row groups whose image column chunk decompresses to more than ``max_bytes`` per row (footer metadata:
    nothing is decompressed)."""
    meta = parquet.metadata
    index = parquet.schema_arrow.get_field_index(image_column)
    oversized = set()
    for g in range(meta.num_row_groups):
        group = meta.row_group(g)
        leaf = next(
            (
                group.column(c)
                for c in range(group.num_columns)
                if group.column(c).path_in_schema == image_column
            ),
            None,
        )
        if (
            index >= 0
            and leaf is not None
            and leaf.total_uncompressed_size > max_bytes * max(group.num_rows, 1)
        ):
            oversized.add(g)
    return oversized


def vector_matrix(column: pa.Array) -> np.ndarray:
    """A list<float> column as an (n, d) float32 array; rows must all have the same length."""
    if pa.types.is_fixed_size_list(column.type):
        d = column.type.list_size
        return column.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(-1, d)
    lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
    if lengths.size and (lengths != lengths[0]).any():
        raise ValueError(f"embedding rows have different lengths: {sorted(set(lengths.tolist()))[:5]}")
    d = int(lengths[0]) if lengths.size else 0
    return column.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, d)


class ParquetFormat(InputFormat):
    name = "parquet"
    looks_for = ".parquet shards"
    formats = ("parquet", "embeddings")

    def detect(self, where: Location) -> bool:
        return where.is_file or where.has(".parquet")

    def list_shards(self, where: Location) -> list[Shard]:
        return where.file_shards(".parquet", self.name)

    def resolve(self, data: DataSpec, shards: list[Shard]) -> Columns:
        """``auto`` picks ``embeddings`` when the image/text columns hold float lists and ``parquet`` when
        they hold binary images / strings; the first readable shard's schema decides. A named column that
        is absent raises :class:`SpecError`; with default names, an absent column means that side is not
        in the dataset (image-only or text-only data)."""
        first, schema = first_readable(shards, columns_of)
        fmt = data.format
        if fmt == "auto":
            probe = data.image_column or ("jpg" if "jpg" in schema.names else "image")
            probe_type = schema.field(probe).type if probe in schema.names else pa.null()
            is_vector = pa.types.is_list(probe_type) or pa.types.is_fixed_size_list(probe_type)
            fmt = "embeddings" if is_vector else "parquet"
        default_image, default_text = ("image", "text") if fmt == "embeddings" else ("jpg", "txt")
        found = []
        for name, default, spec_field in (
            (data.image_column, default_image, "data.image_column"),
            (data.text_column, default_text, "data.text_column"),
        ):
            if name is not None and name not in schema.names:
                raise SpecError(spec_field, f"column not in {first.name} (columns: {schema.names})", name)
            found.append(name or (default if default in schema.names else None))
        if found == [None, None]:
            raise SpecError("data", f"no image or text column found in {first.name}: {schema.names}")
        for name in data.carry:
            if name not in schema.names:
                raise SpecError("data.carry", f"column not in {first.name} (columns: {schema.names})", name)
        for name, side in zip(found, ("image", "text"), strict=True):
            problem = _type_problem(schema, name, side, first.name) if fmt == "parquet" else None
            if problem:
                raise SpecError(f"data.{side}_column", problem, name)
        return Columns(fmt, found[0], found[1])

    def read(self, shard: Shard, data: DataSpec, columns: Columns, batch_size: int) -> Iterator[RowBatch]:
        fmt, image_column, text_column = columns
        parquet = fs.parquet_file(shard.path)
        names = parquet.schema_arrow.names
        has_key = data.key_column in names
        has_status = "status" in names and fmt == "parquet"
        wanted = [c for c in (image_column, text_column, *data.carry) if c is not None]
        wanted += [data.key_column] * has_key + ["status"] * has_status
        oversized: set[int] = set()
        if fmt == "parquet":
            for name, side in ((image_column, "image"), (text_column, "text")):
                problem = _type_problem(parquet.schema_arrow, name, side, shard.label)
                if problem:
                    raise ValueError(problem)
            if image_column is not None:
                oversized = _oversized_row_groups(parquet, image_column, data.max_image_bytes)
        row = 0
        for group in range(parquet.metadata.num_row_groups):
            if group in oversized:
                keys = _keys(
                    parquet.read_row_group(group, columns=[data.key_column] * has_key), row, shard, data
                )
                row += len(keys)
                reason = (
                    f"image:too large (row group {group} of {len(keys)} rows decompresses to more than "
                    f"data.max_image_bytes {data.max_image_bytes} a row)"
                )
                yield self._rejected_batch(keys, reason, data, columns, parquet.schema_arrow)
                continue
            for record_batch in parquet.iter_batches(
                batch_size=batch_size, row_groups=[group], columns=list(dict.fromkeys(wanted))
            ):
                yield self._batch(record_batch, row, shard, data, columns, has_status)
                row += record_batch.num_rows

    @staticmethod
    def _rejected_batch(
        keys: list[str], reason: str, data: DataSpec, columns: Columns, schema: pa.Schema
    ) -> RowBatch:
        """A batch whose rows are all rejected with ``reason`` (a ``parquet``-format shard)."""
        return RowBatch(
            keys=[],
            rejected=[(k, reason) for k in keys],
            images=[] if columns.image is not None else None,
            texts=[] if columns.text is not None else None,
            carried={c: pa.array([], schema.field(c).type) for c in data.carry},
        )

    @staticmethod
    def _batch(
        record_batch: pa.RecordBatch,
        row: int,
        shard: Shard,
        data: DataSpec,
        columns: Columns,
        has_status: bool,
    ) -> RowBatch:
        """The rows of ``record_batch`` (the shard's rows from ``row`` on), rejecting those whose ``status`` is
        not ``success`` and image cells over ``data.max_image_bytes``."""
        fmt, image_column, text_column = columns
        keys = _keys(record_batch, row, shard, data)
        rejected: list[tuple[str, str]] = []
        ok = np.ones(record_batch.num_rows, dtype=bool)
        if has_status:
            status = record_batch.column("status")
            good = pc.fill_null(pc.equal(status, "success"), False).to_numpy(zero_copy_only=False)
            rejected += [(keys[i], f"status:{status[i].as_py()}") for i in np.flatnonzero(~good)]
            ok &= good
        if fmt == "parquet" and image_column is not None:
            sizes = pc.fill_null(pc.binary_length(record_batch.column(image_column)), 0).to_numpy(
                zero_copy_only=False
            )
            big = ok & (sizes > data.max_image_bytes)
            rejected += [
                (keys[i], f"image:too large ({sizes[i]} bytes > data.max_image_bytes {data.max_image_bytes})")
                for i in np.flatnonzero(big)
            ]
            ok &= ~big
        if not ok.all():
            record_batch = record_batch.filter(pa.array(ok))
            keys = [k for k, keep in zip(keys, ok, strict=True) if keep]
        batch = RowBatch(keys=keys, rejected=rejected)
        batch.carried = {c: record_batch.column(c) for c in data.carry}
        if fmt == "embeddings":
            if image_column:
                batch.image_vectors = vector_matrix(record_batch.column(image_column))
            if text_column:
                batch.text_vectors = vector_matrix(record_batch.column(text_column))
        else:
            if image_column:
                batch.images = record_batch.column(image_column).to_pylist()
            if text_column:
                batch.texts = record_batch.column(text_column).to_pylist()
        return batch


def _keys(table: pa.RecordBatch | pa.Table, row: int, shard: Shard, data: DataSpec) -> list[str]:
    """Keys of ``table``'s rows (the shard's rows from ``row`` on): ``data.key_column`` where the shard has
    it and the value is not null, else ``<shard>:<row>``."""
    keys = [f"{shard.label}:{row + i}" for i in range(table.num_rows)]
    if data.key_column not in table.schema.names:
        return keys
    values = table.column(data.key_column).to_pylist()
    return [str(k) if k is not None else fallback for k, fallback in zip(values, keys, strict=True)]


FORMAT = ParquetFormat()
