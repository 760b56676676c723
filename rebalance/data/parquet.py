"""Parquet files (``format: parquet``, and ``format: embeddings`` when the image/text columns hold vectors).

The img2dataset layout: a binary image column (default ``jpg``), a caption column (default ``txt``), a key
column and an optional ``status``; rows whose ``status`` is not ``success`` are rejected with reason
``status:<value>``. With float-list columns (default ``image`` and ``text``) the dataset has format
``embeddings`` and the vectors are used as they are. Shards are the visible ``.parquet`` files under
``data.path``, sorted by path, or ``data.path`` itself when it is a file (whatever its name: auto reads any
single file that is not a ``.tar`` as Parquet). Keys come from ``data.key_column`` when the shard has it,
else ``<shard>:<row>``.
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
        return Columns(fmt, found[0], found[1])

    def read(self, shard: Shard, data: DataSpec, columns: Columns, batch_size: int) -> Iterator[RowBatch]:
        fmt, image_column, text_column = columns
        parquet = fs.parquet_file(shard.path)
        names = parquet.schema_arrow.names
        has_key = data.key_column in names
        has_status = "status" in names and fmt == "parquet"
        wanted = [c for c in (image_column, text_column, *data.carry) if c is not None]
        wanted += [data.key_column] * has_key + ["status"] * has_status
        row = 0
        for record_batch in parquet.iter_batches(batch_size=batch_size, columns=list(dict.fromkeys(wanted))):
            n = record_batch.num_rows
            keys = [f"{shard.label}:{row + i}" for i in range(n)]
            if has_key:
                values = record_batch.column(data.key_column).to_pylist()
                keys = [
                    str(k) if k is not None else fallback for k, fallback in zip(values, keys, strict=True)
                ]
            row += n
            rejected: list[tuple[str, str]] = []
            if has_status:
                status = record_batch.column("status")
                ok = pc.fill_null(pc.equal(status, "success"), False)
                bad = np.flatnonzero(~ok.to_numpy(zero_copy_only=False))
                rejected = [(keys[i], f"status:{status[i].as_py()}") for i in bad]
                if bad.size:
                    record_batch = record_batch.filter(ok)
                    keep = np.flatnonzero(ok.to_numpy(zero_copy_only=False))
                    keys = [keys[i] for i in keep]
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
            yield batch


FORMAT = ParquetFormat()
