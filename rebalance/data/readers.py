"""Readers of dataset shards: list the shards of a dataset and stream each one in bounded batches.

Layouts (``data.format``; ``auto`` picks the first that matches, in this order):

- ``embeddings``, clip-retrieval / LAION layout: ``data.path`` has ``img_emb/`` or ``text_emb/``
  (:mod:`rebalance.data.laion`);
- ``webdataset``: ``.tar`` files (:mod:`rebalance.data.webdataset`); Parquet files beside them (img2dataset
  writes one of metadata per tar) are ignored;
- ``parquet``: ``.parquet`` files in the img2dataset layout (binary image column, caption column, key,
  optional ``status``), or ``embeddings`` when the image/text columns hold float lists;
- ``folder``: image files with optional sidecar ``.txt`` captions (:mod:`rebalance.data.folder`).

``data.path`` may also be a single ``.parquet`` or ``.tar`` file, and a local path or a URI of any
``pyarrow.fs`` filesystem (``s3://bucket/prefix``, ``gs://...``; see :mod:`rebalance.data.fs`). Directories are searched recursively;
names and folders starting with ``.`` are skipped. A batch holds at most ``batch_size`` rows (kept and
rejected together), so memory is bounded by the batch size, not the shard. A shard that cannot be read
yields no rows and one rejected entry ``(<shard>, "shard:unreadable (...)")``; keys repeated within a shard
raise :class:`DuplicateKeyError` when the shard has been read, and :func:`check_unique_keys` finds keys
repeated across the parts of the embed stage. A remote shard whose store cannot be reached (a network
error, throttling) is not marked unreadable: :class:`~rebalance.data.fs.StorageError` fails the stage, and
a resumed run reads the shard again.
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
import zlib
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from rebalance.data import folder, fs, laion, webdataset
from rebalance.data.parts import part_path, read_part
from rebalance.data.rows import BatchBuilder, RowBatch, Shard
from rebalance.spec import DataSpec, SpecError

__all__ = [
    "Shard",
    "RowBatch",
    "DuplicateKeyError",
    "list_shards",
    "resolve_format",
    "read_shard",
    "columns_of",
    "dataset_fingerprint",
    "check_unique_keys",
    "key_hashes",
    "vector_matrix",
    "MAX_DUPLICATES_NAMED",
]

MAX_DUPLICATES_NAMED = 10
# Errors that mean a shard's bytes cannot be read as its format; anything else is a bug and propagates.
UNREADABLE = (OSError, EOFError, ValueError, tarfile.TarError, pa.ArrowException, zlib.error)


class DuplicateKeyError(ValueError):
    """Keys that occur more than once; ``duplicates`` maps each (up to MAX_DUPLICATES_NAMED of them) to
    where it occurs."""

    def __init__(self, duplicates: dict[str, list[str]], total: int, where: str):
        self.duplicates = duplicates
        self.total = total
        shown = "; ".join(f"{k!r} in {', '.join(v)}" for k, v in duplicates.items())
        more = f" (and {total - len(duplicates)} more)" if total > len(duplicates) else ""
        super().__init__(f"duplicate keys {where}: {total} key(s) occur more than once: {shown}{more}")


# ---------------------------------------------------------------------------------------------- listing


def _search(root: Path | fs.StoragePath) -> tuple[list, list]:
    """The visible .tar and .parquet files under ``root``, each list in sorted path order."""
    tars, parquets = [], []
    for rel in folder.walk_files(root):
        lower = rel.lower()
        if lower.endswith(".tar"):
            tars.append(root / rel)
        elif lower.endswith(".parquet"):
            parquets.append(root / rel)
    return sorted(tars), sorted(parquets)


def _file_shards(paths: list, root: Path | fs.StoragePath, kind: str) -> list[Shard]:
    return [Shard(i, str(p), kind=kind, rel=p.relative_to(root).as_posix()) for i, p in enumerate(paths)]


def list_shards(data: DataSpec) -> list[Shard]:
    """The dataset's shards in order (see the module docstring for how ``auto`` decides the layout).

    Part ``NNNNN`` of every per-row output comes from shard ``NNNNN``: Parquet and tar files sorted by
    path, LAION shards by their number, folder chunks in image-path order. Raises :class:`SpecError` when
    the path holds nothing of the requested format, or a LAION layout whose files do not line up.
    """
    root = fs.as_path(data.path)
    fs.check_location(root, "data.path")
    fmt = data.format
    if isinstance(root, fs.StoragePath) and not root.exists():
        raise SpecError("data.path", "nothing exists at this URI", data.path)
    if root.is_file():
        if fmt == "folder":
            raise SpecError("data.path", "format folder needs a directory", data.path)
        tar = root.suffix.lower() == ".tar" if fmt == "auto" else fmt == "webdataset"
        return [Shard(0, str(root), kind="tar" if tar else "parquet", rel=root.name)]
    if fmt == "folder":
        shards = folder.list_folder_shards(root)
        if not shards:
            raise SpecError(
                "data.path", f"no image files ({', '.join(folder.IMAGE_SUFFIXES)}) found", data.path
            )
        return shards
    if fmt in ("auto", "embeddings") and laion.is_laion(root):
        try:
            return laion.list_laion_shards(root)
        except laion.LaionLayoutError as err:
            raise SpecError("data.path", f"clip-retrieval layout: {err}", data.path) from None
    tars, parquets = _search(root)
    if fmt == "webdataset" or (fmt == "auto" and tars):
        if not tars:
            raise SpecError("data.path", "no .tar shards found", data.path)
        return _file_shards(tars, root, "tar")
    if parquets:
        return _file_shards(parquets, root, "parquet")
    if fmt == "auto":
        shards = folder.list_folder_shards(root)
        if shards:
            return shards
        raise SpecError(
            "data.path", "found no img_emb/ or text_emb/, .tar, .parquet or image files", data.path
        )
    raise SpecError("data.path", "no .parquet shards found", data.path)


def columns_of(shard: Shard) -> pa.Schema:
    """The schema of one Parquet shard, read from its footer."""
    return fs.read_schema(shard.path)


# ---------------------------------------------------------------------------------------------- format


def _no_columns(data: DataSpec, fmt: str) -> None:
    for name, value in (("data.image_column", data.image_column), ("data.text_column", data.text_column)):
        if value is not None:
            raise SpecError(name, f"is not used with format {fmt} (sides are found from the files)", value)


def _first_readable(shards: list[Shard], probe):
    """``probe(shard)`` of the first shard it does not fail on; SpecError naming the failures if none."""
    errors = []
    for shard in shards:
        try:
            return shard, probe(shard)
        except UNREADABLE as err:
            errors.append(f"{shard.label}: {type(err).__name__}: {err}")
            if len(errors) >= 20:
                break
    raise SpecError("data.path", f"no readable shard ({'; '.join(errors[:3])})")


def _probe_tar(shard: Shard) -> tuple[bool, bool, set[str]]:
    """Sides and json fields of one tar; a tar without samples tells nothing and counts as unreadable."""
    found = webdataset.probe_tar(shard.path)
    if not (found[0] or found[1]):
        raise ValueError("no image or caption members")
    return found


def resolve_format(data: DataSpec, shards: list[Shard]) -> tuple[str, str | None, str | None]:
    """(format, image column, text column) of the dataset; a column is None for an absent side.

    Parquet: ``auto`` picks ``embeddings`` when the image/text columns hold float lists and ``parquet``
    when they hold binary images / strings; the first readable shard's schema decides. A named column that
    is absent raises :class:`SpecError`; with default names, an absent column means that side is not in the
    dataset (image-only or text-only data). WebDataset: the sides are those found in the first readable
    tar (images; ``.txt`` members or json members with a caption). Folder: images, and captions when any
    image has a sidecar ``.txt``. LAION: the sides whose directory holds vectors. For these three formats
    the returned column names only mark a side as present, and ``data.image_column`` /
    ``data.text_column`` must be unset.
    """
    kind = shards[0].kind
    if kind == "tar":
        _no_columns(data, "webdataset")
        first, (has_image, has_text, fields) = _first_readable(shards, _probe_tar)
        missing = [c for c in data.carry if c not in fields]
        if missing:
            raise SpecError(
                "data.carry",
                f"not a field of the json members of {first.label} (fields: {sorted(fields)})",
                missing,
            )
        return "webdataset", "image" if has_image else None, "text" if has_text else None
    if kind == "folder":
        _no_columns(data, "folder")
        if data.carry:
            raise SpecError("data.carry", "format folder has no metadata columns to carry", list(data.carry))
        return "folder", "image", "text" if folder.has_captions(shards) else None
    if kind == "laion":
        _no_columns(data, "embeddings (clip-retrieval layout)")
        roles = laion.shard_files(shards[0])
        if data.carry:
            if "metadata" not in roles:
                raise SpecError("data.carry", "the dataset has no metadata/ files", list(data.carry))
            first, schema = _first_readable(shards, laion.metadata_schema)
            for name in data.carry:
                if name not in schema.names:
                    raise SpecError("data.carry", f"column not in metadata of shard {first.label}", name)
        return (
            "embeddings",
            "img_emb" if "img_emb" in roles else None,
            "text_emb" if "text_emb" in roles else None,
        )
    first, schema = _first_readable(shards, columns_of)
    fmt = data.format
    if fmt == "auto":
        probe = data.image_column or ("jpg" if "jpg" in schema.names else "image")
        probe_type = schema.field(probe).type if probe in schema.names else pa.null()
        is_vector = pa.types.is_list(probe_type) or pa.types.is_fixed_size_list(probe_type)
        fmt = "embeddings" if is_vector else "parquet"
    default_image, default_text = ("image", "text") if fmt == "embeddings" else ("jpg", "txt")
    columns = []
    for name, default, spec_field in (
        (data.image_column, default_image, "data.image_column"),
        (data.text_column, default_text, "data.text_column"),
    ):
        if name is not None and name not in schema.names:
            raise SpecError(spec_field, f"column not in {first.name} (columns: {schema.names})", name)
        columns.append(name or (default if default in schema.names else None))
    if columns == [None, None]:
        raise SpecError("data", f"no image or text column found in {first.name}: {schema.names}")
    for name in data.carry:
        if name not in schema.names:
            raise SpecError("data.carry", f"column not in {first.name} (columns: {schema.names})", name)
    return fmt, columns[0], columns[1]


# ---------------------------------------------------------------------------------------------- reading


def _read_parquet_shard(
    shard: Shard, data: DataSpec, fmt: str, image_column: str | None, text_column: str | None, batch_size: int
) -> Iterator[RowBatch]:
    """Keys come from ``data.key_column`` when the shard has it, else ``<shard>:<row>``. Rows whose
    img2dataset ``status`` is not ``success`` are rejected with reason ``status:<value>``."""
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
            keys = [str(k) if k is not None else fallback for k, fallback in zip(values, keys, strict=True)]
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


def _reader(
    shard: Shard, data: DataSpec, fmt: str, image_column: str | None, text_column: str | None, batch_size: int
) -> Iterator[RowBatch]:
    if shard.kind == "tar":
        has_image, has_text = image_column is not None, text_column is not None
        return webdataset.read_tar_shard(shard, has_image, has_text, data.carry, batch_size)
    if shard.kind == "folder":
        return folder.read_folder_shard(shard, data.path, text_column is not None, batch_size)
    if shard.kind == "laion":
        return laion.read_laion_shard(shard, data.key_column, data.carry, batch_size)
    return _read_parquet_shard(shard, data, fmt, image_column, text_column, batch_size)


def _empty_batch(
    shard: Shard, data: DataSpec, fmt: str, image_column: str | None, text_column: str | None
) -> RowBatch:
    """A batch with no rows whose sides, vector widths and carried types match the dataset's, taken from
    the first other shard that can be read (an unreadable shard tells nothing about them)."""
    has_image, has_text = image_column is not None, text_column is not None
    if shard.kind in ("tar", "folder"):
        return BatchBuilder(1, has_image, has_text, data.carry if shard.kind == "tar" else ()).empty()
    for other in list_shards(data)[:32]:
        if other.path == shard.path:
            continue
        try:
            for batch in _reader(other, data, fmt, image_column, text_column, 1):
                return batch.empty_like()
        except UNREADABLE:
            continue
    vectors = np.zeros((0, 0), np.float32) if fmt == "embeddings" else None
    return RowBatch(
        keys=[],
        images=[] if has_image and fmt != "embeddings" else None,
        texts=[] if has_text and fmt != "embeddings" else None,
        image_vectors=vectors if has_image else None,
        text_vectors=vectors if has_text else None,
        carried={c: pa.array([], pa.null()) for c in data.carry},
    )


def read_shard(
    shard: Shard, data: DataSpec, fmt: str, image_column: str | None, text_column: str | None, batch_size: int
) -> Iterator[RowBatch]:
    """Stream ``shard`` in batches of at most ``batch_size`` rows; at least one batch, possibly empty.

    When the shard cannot be read (not a Parquet/tar/npy file, truncated, unreadable), the rows read so
    far stand and a last, empty batch carries the rejected entry ``(<shard>, "shard:unreadable (...)")``
    (keyed by the shard's path relative to ``data.path``, or its number for LAION): the run goes on.
    Keys that repeat within the shard raise :class:`DuplicateKeyError` (naming them) once the shard has
    been read, before its part can be committed.
    """
    inner = _reader(shard, data, fmt, image_column, text_column, batch_size)
    hashes: list[np.ndarray] = []  # 8 bytes a row, not the keys
    last: RowBatch | None = None
    rows = 0
    while True:
        try:
            batch = next(inner)
        except StopIteration:
            break
        except laion.LaionLayoutError:
            raise
        except UNREADABLE as err:
            if fs.is_transient(err):  # the store, not the shard: fail, and let a resume read it again
                raise fs.StorageError(f"cannot read shard {shard.label}: {err}") from err
            where = f" after {rows} rows" if rows else ""
            detail = f"{type(err).__name__}: {err}"[:300]
            batch = (
                last.empty_like()
                if last is not None
                else _empty_batch(shard, data, fmt, image_column, text_column)
            )
            batch.rejected = [(shard.label, f"shard:unreadable ({detail}{where})")]
            yield batch
            last = batch
            break
        hashes.append(key_hashes(_batch_keys(batch)))
        rows += batch.size
        last = batch
        yield batch
    if last is None:
        yield _empty_batch(shard, data, fmt, image_column, text_column)
    repeated = _repeated(np.concatenate(hashes)) if hashes else np.zeros(0, np.uint64)
    if repeated.size:
        _raise_on_repeated_keys(shard, data, fmt, image_column, text_column, repeated)


def _batch_keys(batch: RowBatch) -> list[str]:
    return [*batch.keys, *(k for k, _ in batch.rejected)]


def _repeated(hashes: np.ndarray) -> np.ndarray:
    """The values that occur more than once in ``hashes``."""
    ordered = np.sort(hashes)
    return np.unique(ordered[1:][ordered[1:] == ordered[:-1]])


def _raise_on_repeated_keys(
    shard: Shard,
    data: DataSpec,
    fmt: str,
    image_column: str | None,
    text_column: str | None,
    repeated: np.ndarray,
) -> None:
    """Read the shard again for the keys behind ``repeated`` hashes; raise DuplicateKeyError when some
    key really occurs twice (equal hashes of different keys are no error)."""
    counts: dict[str, int] = {}
    try:
        for batch in _reader(shard, data, fmt, image_column, text_column, 1024):
            keys = _batch_keys(batch)
            for j in np.flatnonzero(np.isin(key_hashes(keys), repeated)):
                counts[keys[j]] = counts.get(keys[j], 0) + 1
    except UNREADABLE:  # a truncated shard: its readable rows were seen before the failure
        pass
    duplicates = {k: n for k, n in counts.items() if n > 1}
    if duplicates:
        named = {
            k: [f"shard {shard.label} ({n} times)"]
            for k, n in list(duplicates.items())[:MAX_DUPLICATES_NAMED]
        }
        raise DuplicateKeyError(named, len(duplicates), f"within shard {shard.label}")


# ---------------------------------------------------------------------------------------------- identity


def dataset_fingerprint(shards: list[Shard]) -> list[dict]:
    """Path, size and modification time (ns) of every shard: cheap change detection for resume.

    A shard of several files (LAION: its .npy and metadata files; folder: its images and captions) gets
    the sum of their sizes, the latest modification time, their number and a digest of every file's path,
    size and modification time.
    """
    out = []
    for shard in shards:
        files = shard.all_files
        if len(files) == 1:
            size, mtime = fs.stat(shard.path)
            out.append({"path": shard.path, "size": size, "mtime_ns": mtime})
            continue
        digest = hashlib.blake2b(digest_size=16)
        size = mtime = 0
        for path in files:
            file_size, file_mtime = fs.stat(path)
            size, mtime = size + file_size, max(mtime, file_mtime)
            digest.update(f"{path}\0{file_size}\0{file_mtime}\n".encode())
        out.append(
            {
                "path": shard.path,
                "size": size,
                "mtime_ns": mtime,
                "files": len(files),
                "digest": digest.hexdigest(),
            }
        )
    return out


def key_hashes(keys: Iterable[str]) -> np.ndarray:
    """A 64-bit hash of each key, (n,) uint64."""
    digest = b"".join(hashlib.blake2b(k.encode(), digest_size=8).digest() for k in keys)
    return np.frombuffer(digest, dtype="<u8")


def _part_keys(directory: Path | fs.StoragePath, index: int) -> list[str]:
    """Every key of an embeddings part: its rows and the rows it rejected (shard-level entries aside)."""
    keys = read_part(directory, index, columns=["key"]).column("key").to_pylist()
    summary = json.loads(part_path(directory, index, ".json").read_text())
    return keys + [k for k, reason in summary.get("rejected", []) if not reason.startswith("shard:")]


def check_unique_keys(directory: str | os.PathLike | fs.StoragePath, shards: Sequence[Shard]) -> int:
    """Check that no key occurs twice among the committed parts of an embed-stage ``directory`` (written
    and rejected rows); returns the number of keys. Raises :class:`DuplicateKeyError` naming up to
    MAX_DUPLICATES_NAMED repeated keys and the parts (and shards) they occur in.

    Streams part by part, keeping a 64-bit hash per key (8 bytes a row, never the keys themselves); parts
    holding a repeated hash are read a second time to confirm the repeat on the keys (hash collisions are
    not errors).
    """
    directory = fs.as_path(directory)
    hashes, owners = [], []
    for position, shard in enumerate(shards):
        h = key_hashes(_part_keys(directory, shard.index))
        hashes.append(h)
        owners.append(np.full(h.size, position, np.int32))
    if not hashes:
        return 0
    flat, owner = np.concatenate(hashes), np.concatenate(owners)
    del hashes, owners
    repeated = _repeated(flat)
    if not repeated.size:
        return int(flat.size)
    where: dict[str, list[str]] = {}
    for position in np.unique(owner[np.isin(flat, repeated)]).tolist():
        shard = shards[position]
        keys = _part_keys(directory, shard.index)
        for j in np.flatnonzero(np.isin(key_hashes(keys), repeated)):
            where.setdefault(keys[j], []).append(f"part-{shard.index:05d} ({shard.label})")
    duplicates = {k: v for k, v in where.items() if len(v) > 1}
    if duplicates:
        named = dict(list(duplicates.items())[:MAX_DUPLICATES_NAMED])
        raise DuplicateKeyError(named, len(duplicates), "across shards")
    return int(flat.size)
