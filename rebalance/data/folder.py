"""A folder of image files with optional sidecar captions (``format: folder``).

Images are the files under ``data.path`` (searched recursively; names and folders starting with ``.`` are
skipped) whose suffix is ``.jpg``, ``.jpeg``, ``.png`` or ``.webp`` (any case). A caption is the sidecar
file with the same path and the suffix ``.txt`` (``cats/001.jpg`` -> ``cats/001.txt``). The key of a row is
the image's path relative to ``data.path`` without its suffix (``cats/001``), with ``/`` separators.

Shards are equal chunks of the image list sorted by relative path, whatever the sub-folders: the list is cut
into ``FOLDER_SHARDS`` chunks, of at least ``FOLDER_MIN_SHARD_SIZE`` and at most ``FOLDER_SHARD_SIZE``
images (so a folder of a few thousand images spreads over up to 64 actors, and a flat folder of a million
over a hundred). The split depends on the folder only, never on the machine, so a run resumes anywhere. Each shard
carries its file list, so workers never list the folder again. ``data.path`` may be a URI
(:mod:`rebalance.data.fs`); a remote folder is listed once, recursively.
"""

from __future__ import annotations

from collections.abc import Iterator

from rebalance.data import fs
from rebalance.data.input_format import Columns, InputFormat, Location, no_columns
from rebalance.data.rows import (
    MAX_ENCODED_BYTES,
    BatchBuilder,
    RowBatch,
    Shard,
    SourceRow,
    decode_caption,
)
from rebalance.spec import DataSpec, SpecError

__all__ = [
    "FORMAT",
    "FOLDER_MIN_SHARD_SIZE",
    "FOLDER_SHARDS",
    "FOLDER_SHARD_SIZE",
    "IMAGE_SUFFIXES",
    "folder_key",
    "has_captions",
    "list_folder_shards",
    "read_folder_shard",
]

FOLDER_SHARD_SIZE = 10_000
FOLDER_MIN_SHARD_SIZE = 64
FOLDER_SHARDS = 64
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


def folder_key(rel: str) -> str:
    """The key of the image at relative path ``rel``: the path without its suffix."""
    stem, dot, suffix = rel.rpartition(".")
    return stem if dot and "/" not in suffix else rel


def list_folder_shards(where: Location, shard_size: int | None = None) -> list[Shard]:
    """The folder's images in chunks of ``shard_size`` (default: the module docstring's rule), each image
    followed by its sidecar caption when it has one."""
    root = where.root
    images, texts = [], set()
    for rel in where.files:
        lower = rel.lower()
        if lower.endswith(IMAGE_SUFFIXES):
            images.append(rel)
        elif rel.endswith(".txt"):
            texts.add(rel)
    images.sort()
    if shard_size is None:
        even = -(-len(images) // FOLDER_SHARDS)
        shard_size = min(FOLDER_SHARD_SIZE, max(FOLDER_MIN_SHARD_SIZE, even))
    shards = []
    for index, start in enumerate(range(0, len(images), shard_size)):
        chunk = images[start : start + shard_size]
        files = []
        for rel in chunk:
            files.append(str(root / rel))
            sidecar = folder_key(rel) + ".txt"
            if sidecar in texts:
                files.append(str(root / sidecar))
        shards.append(Shard(index, files[0], kind=FORMAT.name, files=tuple(files), rel=chunk[0]))
    return shards


def has_captions(shards: list[Shard]) -> bool:
    """Whether any image of the folder has a sidecar caption (then the dataset has a text side)."""
    return any(_is_caption(f) for s in shards for f in s.files)


def _is_caption(path: str) -> bool:
    """Whether a shard file (a path or a URI, whose query follows the name) is a sidecar caption."""
    return fs.as_path(path).name.endswith(".txt")


def _read(path: str, side: str) -> tuple[bytes | None, str | None]:
    try:
        size = fs.stat(path)[0]
        if size > MAX_ENCODED_BYTES:
            return None, f"{side}:too large ({size} bytes)"
        with fs.open_input(path, stream=True) as handle:
            return handle.read(), None
    except OSError as err:
        if fs.is_transient(err):  # the store, not the file: fail, and let a resume read it again
            raise fs.StorageError(f"cannot read {path}: {err}") from err
        return None, f"{side}:unreadable ({type(err).__name__}: {err.strerror or err})"


def read_folder_shard(shard: Shard, root: str, has_text: bool, batch_size: int) -> Iterator[RowBatch]:
    """Stream one folder shard in batches of at most ``batch_size`` images.

    Rejected here: an image or caption file that cannot be read (``image:unreadable``,
    ``text:unreadable``) or is over MAX_ENCODED_BYTES (``...:too large``), and a caption that is not UTF-8
    (``text:not utf-8``). An image without a sidecar (when others have one) gets caption None, which the
    embed stage rejects as ``text:missing``.
    """
    return BatchBuilder(batch_size, True, has_text).batches(_folder_rows(shard.files, root, has_text))


def _folder_rows(files: list, root: str, has_text: bool) -> Iterator[SourceRow]:
    root_path = fs.as_path(root)
    i = 0
    while i < len(files):
        image_path = files[i]
        sidecar = None
        if i + 1 < len(files) and _is_caption(files[i + 1]):
            sidecar = files[i + 1]
        i += 2 if sidecar else 1
        key = folder_key(fs.as_path(image_path).relative_to(root_path).as_posix())
        image, reason = _read(image_path, "image")
        text = None
        if reason is None and has_text and sidecar is not None:
            raw, reason = _read(sidecar, "text")
            if reason is None:
                text, reason = decode_caption(raw)
        yield key, image, text, None, reason


class FolderFormat(InputFormat):
    name = "folder"
    looks_for = f"image files ({', '.join(IMAGE_SUFFIXES)})"

    def detect(self, where: Location) -> bool:
        return not where.is_file and any(rel.lower().endswith(IMAGE_SUFFIXES) for rel in where.files)

    def list_shards(self, where: Location) -> list[Shard]:
        if where.is_file:
            raise SpecError("data.path", "format folder needs a directory", where.path)
        return list_folder_shards(where)

    def resolve(self, data: DataSpec, shards: list[Shard]) -> Columns:
        """Images, and captions when any image has a sidecar ``.txt``; no carried columns. The column names
        returned only mark a side as present."""
        no_columns(data, self.name)
        if data.carry:
            raise SpecError("data.carry", "format folder has no metadata columns to carry", list(data.carry))
        return Columns(self.name, "image", "text" if has_captions(shards) else None)

    def read(self, shard: Shard, data: DataSpec, columns: Columns, batch_size: int) -> Iterator[RowBatch]:
        return read_folder_shard(shard, data.path, columns.text is not None, batch_size)

    def empty_batch(self, shard: Shard, data: DataSpec, columns: Columns) -> RowBatch:
        return BatchBuilder(1, columns.image is not None, columns.text is not None).empty()


FORMAT = FolderFormat()
