"""Readers of dataset shards: list the shards of a dataset and stream each one in bounded batches.

Every input format is one module behind :class:`~rebalance.data.input_format.InputFormat` (its docstring
describes the layout) and one entry of :data:`FORMATS`, in the order ``data.format: auto`` tries them: the
first whose ``detect`` answers yes reads the dataset. A named ``data.format`` is read by the formats that
answer to it (``embeddings``: the clip-retrieval layout when ``data.path`` has one, else Parquet).

``data.path`` may be a directory (searched recursively; names and folders starting with ``.`` are
skipped) or a single ``.parquet`` or ``.tar`` file, local or a URI of any ``pyarrow.fs`` filesystem
(``s3://bucket/prefix``, ``gs://...``; see :mod:`rebalance.data.fs`). A batch holds at most ``batch_size``
rows (kept and rejected together), so memory is bounded by the batch size, not the shard. A shard that
cannot be read yields no rows and one rejected entry ``(<shard>, "shard:unreadable (...)")``; keys repeated
within a shard raise :class:`DuplicateKeyError` when the shard has been read, and :func:`check_unique_keys`
finds keys repeated across the parts of the embed stage. A remote shard whose store cannot be reached (a
network error, throttling) is not marked unreadable: :class:`~rebalance.data.fs.StorageError` fails the
stage, and a resumed run reads the shard again.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rebalance.data import embeddings, folder, fs, parquet, webdataset
from rebalance.data.atomic import atomic_save_npy
from rebalance.data.input_format import UNREADABLE, Columns, InputFormat, LayoutError, Location
from rebalance.data.parquet import columns_of, vector_matrix
from rebalance.data.parts import part_path, read_part
from rebalance.data.rows import RowBatch, Shard
from rebalance.spec import DataSpec, SpecError

__all__ = [
    "FORMATS",
    "Shard",
    "RowBatch",
    "DuplicateKeyError",
    "list_shards",
    "resolve_format",
    "read_shard",
    "columns_of",
    "dataset_fingerprint",
    "check_unique_keys",
    "in_process",
    "key_counts",
    "key_hashes",
    "vector_matrix",
    "MAX_DUPLICATES_NAMED",
]

MAX_DUPLICATES_NAMED = 10
Mapper = Callable[[Callable[..., Any], list[tuple]], list[Any]]
"""Runs ``fn(*args)`` for every args tuple and returns the results in order: in this process
(:func:`in_process`) or on a pool of actors (the embed stage's)."""

KEY_CHECK = ".key-check"  # scratch directory of check_unique_keys, under the embeddings directory
BUCKET_KEYS = 2**22  # key hashes per bucket of check_unique_keys (32 MiB of uint64: what one reduce holds)
MAX_CONFIRMED = 1000  # repeated hashes whose keys check_unique_keys reads back (a bound on what it names)

FORMATS: dict[str, InputFormat] = {
    f.name: f for f in (embeddings.FORMAT, webdataset.FORMAT, parquet.FORMAT, folder.FORMAT)
}
"""The input formats by name (``data.format`` values, ``Shard.kind``), in the order ``auto`` tries them."""


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


def list_shards(data: DataSpec) -> list[Shard]:
    """The dataset's shards in order (see the module docstring for how the format is chosen).

    Part ``NNNNN`` of every per-row output comes from shard ``NNNNN``: Parquet and tar files sorted by
    path, LAION shards by their number, folder chunks in image-path order. Raises :class:`SpecError` when
    the path holds nothing of the requested format, or a LAION layout whose files do not line up.
    """
    where = Location(data.path)
    fs.check_location(where.root, "data.path")
    if isinstance(where.root, fs.StoragePath) and not where.root.exists():
        raise SpecError("data.path", "nothing exists at this URI", data.path)
    if data.format == "auto":
        chosen = next((f for f in FORMATS.values() if f.detect(where)), None)
        if chosen is None:
            *most, last = [f.looks_for for f in FORMATS.values()]
            raise SpecError("data.path", f"found no {', '.join(most)} or {last}", data.path)
    else:
        candidates = [f for f in FORMATS.values() if data.format in f.formats]
        # The first that detects the path; else the last (embeddings: Parquet) says what is missing.
        chosen = next((f for f in candidates if f.detect(where)), candidates[-1])
    shards = chosen.list_shards(where)
    if not shards:
        raise SpecError("data.path", f"no {chosen.looks_for} found", data.path)
    return shards


def resolve_format(data: DataSpec, shards: list[Shard]) -> Columns:
    """(format, image column, text column) of the dataset; a column is None for an absent side.

    The format of the shards decides (:meth:`~rebalance.data.input_format.InputFormat.resolve`): Parquet
    reads the columns of the first readable shard (``auto`` picks ``embeddings`` when they hold float
    lists); WebDataset, folder and the LAION layout find the sides from the files, their returned column
    names only mark a side as present, and ``data.image_column`` / ``data.text_column`` must be unset.
    """
    return FORMATS[shards[0].kind].resolve(data, shards)


# ---------------------------------------------------------------------------------------------- reading


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
    source, columns = FORMATS[shard.kind], Columns(fmt, image_column, text_column)
    inner = source.read(shard, data, columns, batch_size)
    hashes: list[np.ndarray] = []  # 8 bytes a row, not the keys
    last: RowBatch | None = None
    rows = 0
    while True:
        try:
            batch = next(inner)
        except StopIteration:
            break
        except LayoutError:
            raise
        except UNREADABLE as err:
            if fs.is_transient(err):  # the store, not the shard: fail, and let a resume read it again
                raise fs.StorageError(f"cannot read shard {shard.label}: {err}") from err
            where = f" after {rows} rows" if rows else ""
            detail = f"{type(err).__name__}: {err}"[:300]
            batch = last.empty_like() if last is not None else source.empty_batch(shard, data, columns)
            batch.rejected = [(shard.label, f"shard:unreadable ({detail}{where})")]
            yield batch
            last = batch
            break
        hashes.append(key_hashes(_batch_keys(batch)))
        rows += batch.size
        last = batch
        yield batch
    if last is None:
        yield source.empty_batch(shard, data, columns)
    repeated = _repeated(np.concatenate(hashes)) if hashes else np.zeros(0, np.uint64)
    if repeated.size:
        _raise_on_repeated_keys(shard, data, columns, repeated)


def _batch_keys(batch: RowBatch) -> list[str]:
    return [*batch.keys, *(k for k, _ in batch.rejected)]


def _repeated(hashes: np.ndarray) -> np.ndarray:
    """The values that occur more than once in ``hashes``."""
    ordered = np.sort(hashes)
    return np.unique(ordered[1:][ordered[1:] == ordered[:-1]])


def _raise_on_repeated_keys(shard: Shard, data: DataSpec, columns: Columns, repeated: np.ndarray) -> None:
    """Read the shard again for the keys behind ``repeated`` hashes; raise DuplicateKeyError when some
    key really occurs twice (equal hashes of different keys are no error)."""
    counts: dict[str, int] = {}
    try:
        for batch in FORMATS[shard.kind].read(shard, data, columns, 1024):
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


def in_process(fn: Callable[..., Any], args: list[tuple]) -> list[Any]:
    """A :data:`Mapper` that calls ``fn`` on every args tuple in this process, one after the other."""
    return [fn(*a) for a in args]


def key_counts(directory: str | os.PathLike | fs.StoragePath, shards: Sequence[Shard]) -> list[int]:
    """Keys of each committed part of an embed-stage ``directory`` (written and rejected rows, shard-level
    entries aside), from the part summaries alone."""
    directory = fs.as_path(directory)
    counts = []
    for shard in shards:
        summary = json.loads(part_path(directory, shard.index, ".json").read_text())
        rejected = summary.get("rejected", [])
        counts.append(summary["rows"] + sum(not reason.startswith("shard:") for _, reason in rejected))
    return counts


HASHED = np.dtype([("hash", "<u8"), ("part", "<i8")])  # a key hash and the part it comes from


def _bucket_edges(n_buckets: int) -> np.ndarray:
    """The n_buckets - 1 uint64 boundaries that cut the hash space into equal ranges."""
    return np.array([(b << 64) // n_buckets for b in range(1, n_buckets)], dtype=np.uint64)


def hash_part_keys(directory: str, chunk: int, indices: list[int], n_buckets: int) -> int:
    """Map call of :func:`check_unique_keys`: the 64-bit hashes of the keys of parts ``indices`` (one chunk
    of parts) with their part, sorted by hash and cut into ``n_buckets`` ranges of hash values; range b is
    written to ``<directory>/.key-check/bBBBBB/cCCCCC.npy`` (nothing for an empty range). Returns the
    number of keys."""
    root = fs.as_path(directory)
    tables = [np.empty(0, HASHED)]
    for index in indices:
        hashes = key_hashes(_part_keys(root, index))
        tables.append(np.rec.fromarrays([hashes, np.full(hashes.size, index)], dtype=HASHED))
    hashed = np.concatenate(tables)
    del tables
    hashed = hashed[np.argsort(hashed["hash"], kind="stable")]
    cuts = [0, *np.searchsorted(hashed["hash"], _bucket_edges(n_buckets)).tolist(), hashed.size]
    for b, (lo, hi) in enumerate(zip(cuts[:-1], cuts[1:], strict=True)):
        if hi > lo:
            atomic_save_npy(hashed[lo:hi], root / KEY_CHECK / f"b{b:05d}" / f"c{chunk:05d}.npy")
    return int(hashed.size)


def repeated_in_bucket(directory: str, bucket: int, limit: int) -> tuple[int, dict[int, list[int]]]:
    """Reduce call of :func:`check_unique_keys`: the hashes that occur more than once in bucket ``bucket``
    over all chunks: (how many, {hash: the parts holding it} for the ``limit`` smallest of them)."""
    files = sorted((fs.as_path(directory) / KEY_CHECK / f"b{bucket:05d}").glob("c*.npy"))
    hashed = np.concatenate([np.empty(0, HASHED), *(fs.read_npy(f) for f in files)])
    hashed = hashed[np.argsort(hashed["hash"], kind="stable")]
    hashes = hashed["hash"]
    repeated = _repeated(hashes)
    named: dict[int, list[int]] = {}
    for value in repeated[:limit]:
        lo, hi = np.searchsorted(hashes, value, side="left"), np.searchsorted(hashes, value, side="right")
        named[int(value)] = sorted(set(hashed["part"][lo:hi].tolist()))
    return int(repeated.size), named


def _chunks(indices: list[int], counts: list[int], size: int) -> list[list[int]]:
    """Consecutive groups of ``indices`` of at most ``size`` keys each (``counts`` per index), at least one
    index per group."""
    chunks: list[list[int]] = []
    held = size
    for index, count in zip(indices, counts, strict=True):
        if held + count > size:
            chunks.append([])
            held = 0
        chunks[-1].append(index)
        held += count
    return chunks


def keys_with_hashes(directory: str, index: int, hashes: list[int]) -> dict[str, int]:
    """Confirm call of :func:`check_unique_keys`: the keys of part ``index`` whose hash is among
    ``hashes``, with their number of occurrences in the part."""
    keys = _part_keys(fs.as_path(directory), index)
    found = np.flatnonzero(np.isin(key_hashes(keys), np.asarray(hashes, np.uint64)))
    counts: dict[str, int] = {}
    for j in found.tolist():
        counts[keys[j]] = counts.get(keys[j], 0) + 1
    return counts


def check_unique_keys(
    directory: str | os.PathLike | fs.StoragePath,
    shards: Sequence[Shard],
    mapper: Mapper = in_process,
    tasks: int = 1,
    counts: list[int] | None = None,
) -> int:
    """Check that no key occurs twice among the committed parts of an embed-stage ``directory`` (written
    and rejected rows); returns the number of keys. Raises :class:`DuplicateKeyError` naming up to
    MAX_DUPLICATES_NAMED repeated keys and the parts (and shards) they occur in.

    A hash partition, so that no process holds more than BUCKET_KEYS key hashes or one part, whatever the
    number of rows N: the parts are cut into consecutive chunks of at most BUCKET_KEYS keys (and at least
    ``tasks`` chunks), each chunk's sorted 64-bit key hashes (with their part) are cut into
    B = max(tasks, ceil(N / BUCKET_KEYS)) ranges of hash values and written to a scratch directory (map, one
    call per chunk: chunks x B small files); each range is merged over the chunks and its repeated hashes
    found (reduce, one call per range); the parts holding the first MAX_CONFIRMED repeated hashes read
    their keys again to confirm them (hash collisions are not errors). The caller holds the parts' key
    counts, B results and at most MAX_CONFIRMED hashes. ``mapper`` runs the calls (:func:`in_process`, or
    on actors); ``counts`` are the parts' key counts when the caller has them (:func:`key_counts`). The
    scratch directory is removed before and after.
    """
    directory = fs.as_path(directory)
    if not shards:
        return 0
    scratch = directory / KEY_CHECK
    fs.remove(scratch)  # a crashed attempt's files
    counts = key_counts(directory, shards) if counts is None else counts
    n_keys = sum(counts)
    n_buckets = max(1, min(tasks, n_keys), math.ceil(n_keys / BUCKET_KEYS))
    chunks = _chunks([s.index for s in shards], counts, min(BUCKET_KEYS, math.ceil(n_keys / max(1, tasks))))
    root = str(directory)
    try:
        total = sum(mapper(hash_part_keys, [(root, c, idx, n_buckets) for c, idx in enumerate(chunks)]))
        found = mapper(repeated_in_bucket, [(root, b, MAX_CONFIRMED) for b in range(n_buckets)])
    finally:
        fs.remove(scratch)
    repeated = sum(count for count, _ in found)
    if not repeated:
        return total
    confirm: dict[int, list[int]] = {}  # part index -> hashes to read back
    for value, parts in sorted((v, p) for _, named in found for v, p in named.items())[:MAX_CONFIRMED]:
        for index in parts:
            confirm.setdefault(index, []).append(value)
    label = {s.index: s.label for s in shards}
    where: dict[str, list[str]] = {}
    indices = sorted(confirm)
    for index, counts in zip(indices, mapper(keys_with_hashes, [(root, i, confirm[i]) for i in indices]),
                             strict=True):  # fmt: skip
        for key, count in counts.items():
            where.setdefault(key, []).extend([f"part-{index:05d} ({label[index]})"] * count)
    duplicates = {k: v for k, v in where.items() if len(v) > 1}
    if duplicates:
        named = dict(list(duplicates.items())[:MAX_DUPLICATES_NAMED])
        raise DuplicateKeyError(named, len(duplicates) + max(0, repeated - MAX_CONFIRMED), "across shards")
    return total
