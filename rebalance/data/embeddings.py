"""The clip-retrieval / LAION precomputed-embedding layout (``format: embeddings`` on a directory with
``img_emb/`` or ``text_emb/``)::

    data.path/img_emb/img_emb_{i}.npy          (n_i, d) image vectors (float16 or float32)
    data.path/text_emb/text_emb_{i}.npy        (n_i, d) caption vectors
    data.path/metadata/metadata_{i}.parquet    n_i rows: key, caption, url, ... (optional)

Row j of the three files of shard i describe the same pair. A dataset may have only ``img_emb`` or only
``text_emb`` (the other side is then absent). Shards are ordered by the number ``i``. Vectors are read
through a read-only memory map, ``batch_size`` rows at a time. The key of a row is the metadata's
``data.key_column`` (default ``key``) when the metadata has it, else ``<i>:<j>``; carried columns come from
the metadata. Files of one shard with different row counts, a shard missing one of the files the others
have, or vectors of different widths are a :class:`~rebalance.data.input_format.LayoutError` that names
the files (a :class:`SpecError` when the shards are listed).

``data.path`` may be a URI (:mod:`rebalance.data.fs`): remote ``.npy`` files are not memory-mapped but read
``batch_size`` rows at a time by ranged reads after their header.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa

from rebalance.data import fs
from rebalance.data.input_format import (
    Columns,
    InputFormat,
    LayoutError,
    Location,
    first_readable,
    no_columns,
)
from rebalance.data.rows import RowBatch, Shard
from rebalance.spec import DataSpec, SpecError

__all__ = ["FORMAT", "is_laion", "list_laion_shards", "read_laion_shard", "shard_files"]

ROLES = {
    "img_emb": ("img_emb", ".npy"),
    "text_emb": ("text_emb", ".npy"),
    "metadata": ("metadata", ".parquet"),
}


def is_laion(root: str | Path | fs.StoragePath) -> bool:
    """Whether ``root`` is a directory with ``img_emb/`` or ``text_emb/``."""
    root = fs.as_path(root)
    return root.is_dir() and ((root / "img_emb").is_dir() or (root / "text_emb").is_dir())


def _numbered(directory: Path | fs.StoragePath, prefix: str, suffix: str) -> dict[str, Path | fs.StoragePath]:
    pattern = re.compile(rf"^{prefix}_(\d+){re.escape(suffix)}$")
    if not directory.is_dir():
        return {}
    return {m.group(1): p for p in directory.iterdir() if (m := pattern.match(p.name)) and p.is_file()}


class RemoteNpy:
    """The rows of a remote ``.npy`` file, read on demand: ``shape``, ``ndim``, ``dtype`` and row slices
    ``[start:stop]`` (ranged reads after the header; C order only)."""

    def __init__(self, path: str | fs.StoragePath):
        self.handle = fs.open_input(path)
        version = np.lib.format.read_magic(self.handle)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(self.handle)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(self.handle)
        if dtype.hasobject:
            raise ValueError(f"{path}: object arrays are not vectors")
        if fortran and len(shape) > 1:
            raise ValueError(f"{path}: Fortran-ordered arrays are not supported remotely")
        self.shape, self.dtype, self.ndim = tuple(shape), dtype, len(shape)
        self.offset = self.handle.tell()
        self.row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize

    def __getitem__(self, rows: slice) -> np.ndarray:
        start, stop, step = rows.indices(self.shape[0] if self.ndim else 0)
        if step != 1:
            raise ValueError("only contiguous row slices")
        n = max(0, stop - start)
        data = self.handle.read_at(n * self.row_bytes, self.offset + start * self.row_bytes)
        if len(data) != n * self.row_bytes:
            raise EOFError(f"truncated .npy file: rows {start}:{stop} are not all there")
        return np.frombuffer(data, dtype=self.dtype).reshape(n, *self.shape[1:])


def open_npy(path: str | fs.StoragePath) -> np.ndarray | RemoteNpy:
    """A local ``.npy`` file memory-mapped read-only, or a :class:`RemoteNpy` for a URI."""
    if fs.is_remote(path):
        return RemoteNpy(path)
    return np.load(path, mmap_mode="r", allow_pickle=False)


def shard_files(shard: Shard) -> dict[str, str]:
    """role (``img_emb``, ``text_emb``, ``metadata``) -> path of one LAION shard."""
    out = {}
    for path in shard.all_files:
        for role in ROLES:
            if fs.as_path(path).name.startswith(role + "_"):
                out[role] = path
    return out


def _rows_and_width(path: str) -> tuple[int, int | None] | None:
    """(rows, width) of an .npy file or (rows, None) of a Parquet file; None when it cannot be read."""
    try:
        if fs.as_path(path).suffix == ".npy":
            array = open_npy(path)
            return int(array.shape[0]) if array.ndim else 0, int(array.shape[1]) if array.ndim == 2 else -1
        return fs.parquet_file(path).metadata.num_rows, None
    except (OSError, ValueError, pa.ArrowException) as err:
        if fs.is_transient(err):
            raise fs.StorageError(f"cannot read {path}: {err}") from err
        return None


def check_shard(
    files: dict[str, str], rel: str, widths: dict[str, tuple[int, str]] | None = None
) -> int | None:
    """The shard's row count after checking that its readable files agree (rows; 2-D vectors; the same
    width as ``widths`` records per side, which it updates). None when no file could be read."""
    shapes = {role: _rows_and_width(path) for role, path in files.items()}
    for role, shape in shapes.items():
        if shape is not None and shape[1] == -1:
            raise LayoutError(f"{files[role]}: expected a 2-D array of vectors")
        if shape is not None and widths is not None and shape[1] is not None:
            first = widths.setdefault(role, (shape[1], files[role]))
            if first[0] != shape[1]:
                raise LayoutError(
                    f"vectors of different widths: {first[1]} has {first[0]} columns, {files[role]} has "
                    f"{shape[1]}"
                )
    rows = {role: s[0] for role, s in shapes.items() if s is not None}
    if len(set(rows.values())) > 1:
        detail = ", ".join(f"{files[role]} has {n}" for role, n in rows.items())
        raise LayoutError(f"shard {rel}: misaligned row counts: {detail}")
    return next(iter(rows.values()), None)


def list_laion_shards(root: str | Path | fs.StoragePath) -> list[Shard]:
    """The shards of a clip-retrieval layout in order of their number, after checking that every shard has
    the same kinds of file and that their row counts and widths agree."""
    root = fs.as_path(root)
    found = {role: _numbered(root / role, prefix, suffix) for role, (prefix, suffix) in ROLES.items()}
    vector_roles = [r for r in ("img_emb", "text_emb") if found[r]]
    if not vector_roles:
        raise LayoutError(f"{root}: no img_emb/img_emb_<i>.npy or text_emb/text_emb_<i>.npy files")
    roles = vector_roles + ["metadata"] * bool(found["metadata"])
    numbers = set().union(*(found[r] for r in roles))
    for role in roles:
        missing = sorted(numbers - set(found[role]), key=int)
        if missing:
            prefix, suffix = ROLES[role]
            names = [f"{role}/{prefix}_{i}{suffix}" for i in missing[:10]]
            raise LayoutError(
                f"{root}: shards {missing[:10]} lack {', '.join(names)} (every shard needs the same files)"
            )
    shards = []
    widths: dict[str, tuple[int, str]] = {}
    for index, number in enumerate(sorted(numbers, key=lambda s: (int(s), s))):
        files = tuple(str(found[role][number]) for role in roles)
        check_shard(dict(zip(roles, files, strict=True)), number, widths)
        shards.append(Shard(index, files[0], kind=FORMAT.name, files=files, rel=number))
    return shards


def metadata_schema(shard: Shard) -> pa.Schema | None:
    """The schema of the shard's metadata file, or None when it has none."""
    path = shard_files(shard).get("metadata")
    return fs.read_schema(path) if path else None


def read_laion_shard(
    shard: Shard, key_column: str, carry: tuple[str, ...], batch_size: int
) -> Iterator[RowBatch]:
    """Stream one shard in batches of at most ``batch_size`` aligned rows (vectors as float32)."""
    files = shard_files(shard)
    rows = check_shard(files, shard.rel)
    arrays = {}
    for role, side in (("img_emb", "image"), ("text_emb", "text")):
        if role in files:
            arrays[side] = open_npy(files[role])
    if rows is None:
        raise OSError(f"no readable file in shard {shard.rel}")
    meta = fs.parquet_file(files["metadata"]) if "metadata" in files else None
    names = meta.schema_arrow.names if meta is not None else []
    has_key = key_column in names
    columns = list(dict.fromkeys([key_column] * has_key + list(carry)))
    if meta is not None and columns:
        chunks = (
            (batch, batch.num_rows) for batch in meta.iter_batches(batch_size=batch_size, columns=columns)
        )
    else:
        chunks = ((None, min(batch_size, rows - lo)) for lo in range(0, rows, batch_size))
    start = 0
    yielded = False
    for record_batch, n in chunks:
        keys = [f"{shard.rel}:{start + j}" for j in range(n)]
        if has_key:
            values = record_batch.column(key_column).to_pylist()
            keys = [str(k) if k is not None else fallback for k, fallback in zip(values, keys, strict=True)]
        batch = RowBatch(keys=keys)
        for side, array in arrays.items():
            setattr(batch, f"{side}_vectors", np.asarray(array[start : start + n], dtype=np.float32))
        batch.carried = {c: record_batch.column(c) for c in carry} if carry else {}
        start += n
        yielded = True
        yield batch
    if start != rows:
        raise LayoutError(f"shard {shard.rel}: metadata yielded {start} rows, the vectors have {rows}")
    if not yielded:
        schema = meta.schema_arrow if meta is not None else pa.schema([])
        batch = RowBatch(keys=[], carried={c: pa.array([], schema.field(c).type) for c in carry})
        for side, array in arrays.items():
            setattr(batch, f"{side}_vectors", np.zeros((0, array.shape[1]), np.float32))
        yield batch


class EmbeddingsFormat(InputFormat):
    """The clip-retrieval layout; Parquet files with vector columns are read by
    :mod:`rebalance.data.parquet`, which also answers ``format: embeddings``."""

    name = "embeddings"
    looks_for = "img_emb/ or text_emb/"

    def detect(self, where: Location) -> bool:
        return not where.is_file and is_laion(where.root)

    def list_shards(self, where: Location) -> list[Shard]:
        try:
            return list_laion_shards(where.root)
        except LayoutError as err:
            raise SpecError("data.path", f"clip-retrieval layout: {err}", where.path) from None

    def resolve(self, data: DataSpec, shards: list[Shard]) -> Columns:
        """The sides whose directory holds vectors; ``data.carry`` must name columns of the metadata. The
        column names returned only mark a side as present."""
        no_columns(data, "embeddings (clip-retrieval layout)")
        roles = shard_files(shards[0])
        if data.carry:
            if "metadata" not in roles:
                raise SpecError("data.carry", "the dataset has no metadata/ files", list(data.carry))
            first, schema = first_readable(shards, metadata_schema)
            for name in data.carry:
                if name not in schema.names:
                    raise SpecError("data.carry", f"column not in metadata of shard {first.label}", name)
        return Columns(
            self.name,
            "img_emb" if "img_emb" in roles else None,
            "text_emb" if "text_emb" in roles else None,
        )

    def read(self, shard: Shard, data: DataSpec, columns: Columns, batch_size: int) -> Iterator[RowBatch]:
        return read_laion_shard(shard, data.key_column, data.carry, batch_size)


FORMAT = EmbeddingsFormat()
