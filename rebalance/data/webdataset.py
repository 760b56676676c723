"""WebDataset tar shards: samples of consecutive members sharing a key, streamed member by member.

A member ``dir/000123.jpg`` belongs to the sample with key ``dir/000123`` (WebDataset's rule: the member
name up to the first ``.`` of its base name; the rest, lower-cased, is the extension). A sample's image is
its first ``jpg``, ``jpeg``, ``png`` or ``webp`` member in that order of preference; its caption is its
``txt`` member, else the ``caption`` (or ``txt``) field of its ``json`` member, whose fields are also the
columns ``data.carry`` can name (as strings: JSON strings as they are, other values as JSON text). Other
members (``.cls``, ``.npy``, ...) and names starting with ``.`` are skipped without being read.

Shards (``format: webdataset``) are the visible ``.tar`` files under ``data.path``, sorted by path (Parquet
files beside them, img2dataset's per-tar metadata, are ignored), or ``data.path`` itself when it is a file.
The dataset's sides and json fields are those of the first readable tar.
"""

from __future__ import annotations

import contextlib
import json
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field

from rebalance.data.fs import is_remote, open_input
from rebalance.data.input_format import Columns, InputFormat, Location, first_readable, no_columns
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
    "IMAGE_EXTENSIONS",
    "TarSample",
    "iter_samples",
    "probe_tar",
    "read_tar_shard",
    "split_member",
]

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
TEXT_EXTENSIONS = ("txt", "json")
CAPTION_FIELDS = ("caption", "txt")
PROBE_MEMBERS = 10_000  # members of the first tar inspected to find the dataset's sides and json fields
PROBE_JSON = 64  # json members parsed while probing


@dataclass
class TarSample:
    """The wanted members of one sample: extension -> bytes, or -> an int (its size) when it was larger
    than MAX_ENCODED_BYTES and was not read."""

    key: str
    members: dict[str, bytes | int] = field(default_factory=dict)


def split_member(name: str) -> tuple[str, str] | None:
    """(key, extension) of a member name, or None for names that belong to no sample."""
    while name.startswith("./"):
        name = name[2:]
    directory, _, base = name.rpartition("/")
    if not base or base.startswith(".") or "." not in base:
        return None
    stem, _, ext = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), ext.lower()


def iter_samples(path: str, wanted: tuple[str, ...]) -> Iterator[TarSample]:
    """The samples of the tar at ``path`` in member order; only members with an extension in ``wanted``
    are read. Streams: memory is one sample, whatever the size of the tar (``path`` may be a URI)."""
    current: TarSample | None = None
    with open_input(path, stream=True) as raw, tarfile.open(fileobj=raw, mode="r|") as tar:
        for member in tar:
            tar.members = []  # tarfile keeps every member header it has seen; a stream needs none of them
            if not member.isfile():
                continue
            parts = split_member(member.name)
            if parts is None:
                continue
            key, ext = parts
            if current is None or key != current.key:
                if current is not None:
                    yield current
                current = TarSample(key)
            if ext not in wanted or ext in current.members:
                continue
            if member.size > MAX_ENCODED_BYTES:
                current.members[ext] = member.size
                continue
            handle = tar.extractfile(member)
            current.members[ext] = handle.read() if handle is not None else b""
    if current is not None:
        yield current


def probe_tar(path: str) -> tuple[bool, bool, set[str]]:
    """(has images, has captions, json field names) from the first PROBE_MEMBERS members of a tar. A
    remote tar is read as a stream (one request, not one per member header)."""
    has_image = has_text = False
    fields: set[str] = set()
    parsed = 0
    with contextlib.ExitStack() as stack:
        if is_remote(path):
            raw = stack.enter_context(open_input(path, stream=True))
            tar = stack.enter_context(tarfile.open(fileobj=raw, mode="r|"))
        else:
            tar = stack.enter_context(tarfile.open(path, mode="r:"))
        for n, member in enumerate(tar):
            if n >= PROBE_MEMBERS:
                break
            parts = split_member(member.name) if member.isfile() else None
            if parts is None:
                continue
            ext = parts[1]
            has_image |= ext in IMAGE_EXTENSIONS
            has_text |= ext == "txt"
            if ext == "json" and parsed < PROBE_JSON and member.size <= MAX_ENCODED_BYTES:
                parsed += 1
                handle = tar.extractfile(member)
                try:
                    meta = json.loads(handle.read()) if handle is not None else None
                except ValueError:
                    continue
                if isinstance(meta, dict):
                    fields |= set(meta)
                    has_text |= any(f in meta for f in CAPTION_FIELDS)
    return has_image, has_text, fields


def _carried_value(value: object) -> str | None:
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value, sort_keys=True)


def read_tar_shard(
    shard: Shard, has_image: bool, has_text: bool, carry: tuple[str, ...], batch_size: int
) -> Iterator[RowBatch]:
    """Stream one tar shard in batches of at most ``batch_size`` samples (kept and rejected together).

    Rejected here: a member over MAX_ENCODED_BYTES (``image:too large``, ``text:too large``), a caption
    that is not UTF-8 (``text:not utf-8``) and, when the caption must come from it, a json member that does
    not parse (``text:bad json``). A sample without an image or caption is passed on with None, which the
    embed stage rejects as ``image:missing`` / ``text:missing``.
    """
    need_json = bool(carry) or has_text
    wanted = (IMAGE_EXTENSIONS if has_image else ()) + ("txt",) * has_text + ("json",) * need_json
    rows = _tar_rows(shard.path, wanted, has_image, has_text, carry)
    return BatchBuilder(batch_size, has_image, has_text, carry).batches(rows)


def _tar_rows(
    path: str, wanted: tuple[str, ...], has_image: bool, has_text: bool, carry: tuple[str, ...]
) -> Iterator[SourceRow]:
    for sample in iter_samples(path, wanted):
        members = sample.members
        reason = None
        meta: dict = {}
        json_error = None
        raw_json = members.get("json")
        if isinstance(raw_json, int):
            json_error = f"json too large ({raw_json} bytes)"
        elif raw_json is not None:
            try:
                parsed = json.loads(raw_json)
                meta = parsed if isinstance(parsed, dict) else {}
            except ValueError as err:  # includes UnicodeDecodeError
                json_error = f"{type(err).__name__}: {err}"[:200]
        image = None
        if has_image:
            ext = next((e for e in IMAGE_EXTENSIONS if e in members), None)
            image = members[ext] if ext is not None else None
            if isinstance(image, int):
                reason = f"image:too large ({image} bytes)"
        text = None
        if has_text and reason is None:
            raw_text = members.get("txt")
            if isinstance(raw_text, int):
                reason = f"text:too large ({raw_text} bytes)"
            elif raw_text is not None:
                text, reason = decode_caption(raw_text)
            elif json_error is not None:
                reason = f"text:bad json ({json_error})"
            else:
                value = next((meta[f] for f in CAPTION_FIELDS if meta.get(f) is not None), None)
                text = value if value is None or isinstance(value, str) else str(value)
        yield sample.key, image, text, {c: _carried_value(meta.get(c)) for c in carry}, reason


def _probe_sides(shard: Shard) -> tuple[bool, bool, set[str]]:
    """Sides and json fields of one tar; a tar without samples tells nothing and counts as unreadable."""
    found = probe_tar(shard.path)
    if not (found[0] or found[1]):
        raise ValueError("no image or caption members")
    return found


class WebDatasetFormat(InputFormat):
    name = "webdataset"
    looks_for = ".tar shards"

    def detect(self, where: Location) -> bool:
        return where.root.suffix.lower() == ".tar" if where.is_file else where.has(".tar")

    def list_shards(self, where: Location) -> list[Shard]:
        return where.file_shards(".tar", self.name)

    def resolve(self, data: DataSpec, shards: list[Shard]) -> Columns:
        """The sides found in the first readable tar (images; ``.txt`` members or json members with a
        caption); ``data.carry`` must name fields of its json members. The column names returned only mark
        a side as present."""
        no_columns(data, self.name)
        first, (has_image, has_text, fields) = first_readable(shards, _probe_sides)
        missing = [c for c in data.carry if c not in fields]
        if missing:
            raise SpecError(
                "data.carry",
                f"not a field of the json members of {first.label} (fields: {sorted(fields)})",
                missing,
            )
        return Columns(self.name, "image" if has_image else None, "text" if has_text else None)

    def read(self, shard: Shard, data: DataSpec, columns: Columns, batch_size: int) -> Iterator[RowBatch]:
        return read_tar_shard(
            shard, columns.image is not None, columns.text is not None, data.carry, batch_size
        )

    def empty_batch(self, shard: Shard, data: DataSpec, columns: Columns) -> RowBatch:
        return BatchBuilder(1, columns.image is not None, columns.text is not None, data.carry).empty()


FORMAT = WebDatasetFormat()
