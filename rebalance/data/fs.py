"""Where data lives: local paths, or any ``pyarrow.fs`` filesystem URI (``s3://``, ``gs://``, ...).

:func:`as_path` turns a path or URI into a :class:`pathlib.Path` (local paths and ``file://`` URIs) or a
:class:`StoragePath` (everything else), which offers the part of the ``pathlib.Path`` interface the run
directory and the readers use (``/``, ``name``, ``exists``, ``read_bytes``, ``glob``, ...), so the same code
handles both. ``str(StoragePath)`` is its URI again, query included: pass that string to Ray actors, which
resolve it themselves (they may run on other nodes, so they never get local staging paths).

S3 URIs (``s3://bucket/key``) take these query options, e.g.
``s3://bucket/run1?endpoint_override=127.0.0.1:9000&scheme=http&region=us-east-1``:
``region``, ``endpoint_override``, ``scheme`` (``http`` / ``https``), ``tls_ca_file_path``,
``allow_bucket_creation``, ``anonymous`` (``true``: unsigned requests, for public buckets),
``connect_timeout`` and ``request_timeout`` (seconds). Without ``endpoint_override``, pyarrow honours
``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``. Credentials never go in a URI (it is recorded in
``manifest.json`` and in logs): they come from the standard chain (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_PROFILE`` / ``~/.aws``, an instance profile). GCS
(``gs://``) uses Google's application-default credentials (``GOOGLE_APPLICATION_CREDENTIALS``, or the VM's
service account); other schemes go to ``pyarrow.fs.FileSystem.from_uri`` unchanged.

Errors that say where the store is wrong (unknown scheme, unreachable endpoint, missing bucket,
credentials in the URI) are :class:`StorageError` with a message naming the URI (never credentials).
"""

from __future__ import annotations

import fnmatch
import functools
import io
import os
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

__all__ = [
    "StorageError",
    "StoragePath",
    "AnyPath",
    "as_path",
    "is_remote",
    "filesystem",
    "join",
    "check_location",
    "is_transient",
    "read_table",
    "read_schema",
    "parquet_file",
    "read_npy",
    "open_input",
    "stat",
    "walk_files",
    "remove",
]

# Query options of an s3:// URI that pyarrow's own URI parser understands, and those handled here.
S3_URI_OPTIONS = ("region", "scheme", "endpoint_override", "allow_bucket_creation", "tls_ca_file_path")
S3_EXTRA_OPTIONS = ("anonymous", "connect_timeout", "request_timeout")
CREDENTIAL_OPTIONS = ("access_key", "secret_key", "session_token", "role_arn", "external_id", "credentials")
# Parts of pyarrow error messages that mean the store could not be reached or refused service for a while
# (never that the data is bad): such errors fail the stage instead of marking a shard unreadable.
TRANSIENT_MARKERS = (
    "NETWORK_CONNECTION",
    "curlCode",
    "SERVICE_UNAVAILABLE",
    "SLOW_DOWN",
    "THROTTLING",
    "REQUEST_TIMEOUT",
    "INTERNAL_FAILURE",
    "UNAVAILABLE",
    "DEADLINE_EXCEEDED",
)
# Where the bucket is the first component of a filesystem path (as opposed to hdfs://host/path).
BUCKET_SCHEMES = ("s3", "gs", "gcs")


class StorageError(RuntimeError):
    """A storage location that cannot be used: unsupported scheme, unreachable endpoint, missing bucket,
    credentials in a URI, or a transient failure of the store while reading."""


def is_remote(path: Any) -> bool:
    """Whether ``path`` names something outside the local filesystem (a URI other than ``file://``)."""
    if isinstance(path, StoragePath):
        return True
    if isinstance(path, Path):
        return False
    text = os.fspath(path)
    scheme, sep, _ = text.partition("://")
    return bool(sep) and scheme.lower() != "file" and scheme.isidentifier()


def as_path(path: str | os.PathLike | StoragePath) -> Path | StoragePath:
    """A :class:`pathlib.Path` for a local path or ``file://`` URI, else a :class:`StoragePath`."""
    if isinstance(path, Path | StoragePath):
        return path
    text = os.fspath(path)
    if is_remote(text):
        return StoragePath.from_uri(text)
    if text.lower().startswith("file://"):
        return Path(unquote(urlsplit(text).path))
    return Path(text)


def join(base: str | os.PathLike | StoragePath, *parts: str) -> str:
    """``base`` joined with ``parts`` as a string (a URI keeps its query at the end)."""
    return str(as_path(base).joinpath(*parts))


def _env_key() -> tuple[str | None, ...]:
    """Environment that changes how a filesystem is built (cache key only; never logged)."""
    names = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE")
    return tuple(os.environ.get(n) for n in (*names, "AWS_ACCESS_KEY_ID"))


def _bool(name: str, value: str, uri: str) -> bool:
    if value.lower() in ("1", "true", "yes"):
        return True
    if value.lower() in ("0", "false", "no"):
        return False
    raise StorageError(f"{uri}: option {name}={value!r} is not a boolean (true/false)")


@functools.lru_cache(maxsize=64)
def _filesystem(scheme: str, netloc: str, query: str, env: tuple) -> pafs.FileSystem:
    uri = f"{scheme}://{netloc}/" + (f"?{query}" if query else "")
    options = dict(parse_qsl(query, keep_blank_values=True))
    if scheme == "s3":
        native = {k: v for k, v in options.items() if k in S3_URI_OPTIONS}
        extra = {k: v for k, v in options.items() if k in S3_EXTRA_OPTIONS}
        unknown = sorted(set(options) - set(native) - set(extra))
        if unknown:
            raise StorageError(
                f"{uri}: unknown option(s) {unknown}; s3:// URIs take {[*S3_URI_OPTIONS, *S3_EXTRA_OPTIONS]}"
            )
        try:
            fs, _ = pafs.FileSystem.from_uri(f"s3://{netloc}/" + (f"?{urlencode(native)}" if native else ""))
        except (OSError, pa.ArrowException) as err:
            raise StorageError(f"cannot use {uri}: {_short(err)}") from None
        if extra:
            kwargs = fs.__reduce__()[1][0]  # the options pyarrow resolved (region, endpoint, ...)
            if "anonymous" in extra:
                kwargs["anonymous"] = _bool("anonymous", extra["anonymous"], uri)
            for name in ("connect_timeout", "request_timeout"):
                if name in extra:
                    try:
                        kwargs[name] = float(extra[name])
                    except ValueError:
                        raise StorageError(f"{uri}: option {name}={extra[name]!r} is not a number") from None
            fs = pafs.S3FileSystem(**kwargs)
        return fs
    try:
        fs, _ = pafs.FileSystem.from_uri(uri)
    except pa.ArrowInvalid as err:
        raise StorageError(
            f"unsupported storage URI {scheme}://{netloc}/...: {_short(err)} (use a local path, file://, "
            "s3://, gs:// or another scheme pyarrow.fs supports)"
        ) from None
    except (OSError, pa.ArrowException) as err:
        raise StorageError(f"cannot use {scheme}://{netloc}/: {_short(err)}") from None
    return fs


def _short(err: BaseException, limit: int = 400) -> str:
    text = " ".join(str(err).split())
    return text if len(text) <= limit else text[:limit] + " ..."


class StoragePath:
    """A file or directory of a remote filesystem, named by its URI.

    It has the subset of :class:`pathlib.Path` that rebalance uses. Object stores have no directories: a
    "directory" exists when some object lies under it, and :meth:`mkdir` does nothing.
    """

    __slots__ = ("scheme", "netloc", "key", "query", "_type")

    def __init__(self, scheme: str, netloc: str, key: str = "", query: str = "", _type: Any = None):
        self.scheme, self.netloc, self.key, self.query = scheme, netloc, key.strip("/"), query
        self._type = _type  # pafs.FileType from the listing that produced this path, if any

    @classmethod
    def from_uri(cls, uri: str) -> StoragePath:
        """Parse ``scheme://netloc/key?query``; rejects credentials in the URI."""
        parts = urlsplit(uri)
        scheme = parts.scheme.lower()
        if "@" in parts.netloc:
            raise StorageError(
                f"{scheme}://...@{parts.netloc.rpartition('@')[2]}: credentials in a URI are not accepted "
                "(the URI is recorded in manifest.json and in logs); use the environment "
                "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_PROFILE, GOOGLE_APPLICATION_CREDENTIALS)"
            )
        options = parse_qsl(parts.query, keep_blank_values=True)
        secret = sorted({k for k, _ in options if k.lower() in CREDENTIAL_OPTIONS})
        # an endpoint may carry user:password@ too (endpoint_override=user:pass@host:9000); file paths may not
        secret += sorted(
            {k for k, v in options if k.lower() not in (*CREDENTIAL_OPTIONS, "tls_ca_file_path") and "@" in v}
        )
        if secret:
            raise StorageError(
                f"{scheme}://{parts.netloc}{parts.path}: credentials in a URI are not accepted ({secret}; the "
                "URI is recorded in manifest.json and in logs); use the environment (AWS_ACCESS_KEY_ID / "
                "AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN, AWS_PROFILE) or an instance profile"
            )
        for name, value in options:
            if name != "tls_ca_file_path" and "/" in value.partition("://")[2 if "://" in value else 0]:
                raise StorageError(
                    f"{scheme}://{parts.netloc}{parts.path}: option {name}={value!r} holds a '/': was a path "
                    "appended after the query string? Join paths with rebalance.data.fs.join"
                )
        if not parts.netloc:
            raise StorageError(f"{uri!r}: no bucket or host after {scheme}://")
        return cls(scheme, parts.netloc, unquote(parts.path), parts.query)

    # -- naming -----------------------------------------------------------------------------------------

    def __str__(self) -> str:
        key = f"/{self.key}" if self.key else ""
        return f"{self.scheme}://{self.netloc}{key}" + (f"?{self.query}" if self.query else "")

    def __repr__(self) -> str:
        return f"StoragePath({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, StoragePath) and str(self) == str(other)

    def __hash__(self) -> int:
        return hash(str(self))

    def __lt__(self, other: StoragePath) -> bool:
        # Component by component, as pathlib sorts ("a/b" before "a-b"), so shards sort as they do locally.
        return (self.scheme, self.netloc, self.key.split("/")) < (
            other.scheme,
            other.netloc,
            other.key.split("/"),
        )

    def __truediv__(self, name: str | os.PathLike) -> StoragePath:
        return self.joinpath(name)

    def joinpath(self, *parts: str | os.PathLike) -> StoragePath:
        """This path with ``parts`` appended (each may hold ``/``)."""
        pieces = [self.key] if self.key else []
        pieces += [str(p).strip("/") for p in parts if str(p).strip("/")]
        return StoragePath(self.scheme, self.netloc, "/".join(pieces), self.query)

    @property
    def name(self) -> str:
        return self.key.rpartition("/")[2]

    @property
    def suffix(self) -> str:
        return PurePosixPath(self.name).suffix

    @property
    def stem(self) -> str:
        return PurePosixPath(self.name).stem

    @property
    def parent(self) -> StoragePath:
        return StoragePath(self.scheme, self.netloc, self.key.rpartition("/")[0], self.query)

    def with_name(self, name: str) -> StoragePath:
        return self.parent / name

    def with_suffix(self, suffix: str) -> StoragePath:
        return self.with_name(str(PurePosixPath(self.name).with_suffix(suffix)))

    def relative_to(self, other: StoragePath) -> PurePosixPath:
        """The path of this one below ``other`` (same scheme and bucket)."""
        prefix = f"{other.key}/" if other.key else ""
        if (self.scheme, self.netloc) != (other.scheme, other.netloc) or not self.key.startswith(prefix):
            raise ValueError(f"{self} is not below {other}")
        return PurePosixPath(self.key[len(prefix) :])

    # -- filesystem -------------------------------------------------------------------------------------

    @property
    def fs(self) -> pafs.FileSystem:
        """The pyarrow filesystem this path lives in (cached per scheme, bucket and options)."""
        return _filesystem(self.scheme, self.netloc, self.query, _env_key())

    @property
    def fs_path(self) -> str:
        """The path as ``fs`` names it: ``bucket/key`` for object stores, ``/key`` otherwise."""
        if self.scheme in BUCKET_SCHEMES:
            return f"{self.netloc}/{self.key}" if self.key else self.netloc
        return f"/{self.key}"

    def _call(self, what: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except FileNotFoundError:
            raise
        except (OSError, pa.ArrowException) as err:
            if is_transient(err):
                raise StorageError(f"cannot {what} {self}: {_short(err)}") from err
            raise

    def info(self) -> pafs.FileInfo:
        return self._call("read", self.fs.get_file_info, self.fs_path)

    def _kind(self) -> pafs.FileType:
        return self._type if self._type is not None else self.info().type

    def exists(self) -> bool:
        return self._kind() != pafs.FileType.NotFound

    def is_file(self) -> bool:
        return self._kind() == pafs.FileType.File

    def is_dir(self) -> bool:
        return self._kind() == pafs.FileType.Directory

    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        """Nothing to do: object stores create "directories" with the first object below them."""

    def read_bytes(self) -> bytes:
        def read() -> bytes:
            with self.fs.open_input_stream(self.fs_path) as handle:
                return handle.read()

        return self._call("read", read)

    def read_text(self, encoding: str = "utf-8") -> str:
        return self.read_bytes().decode(encoding)

    def open_input(self, stream: bool = False) -> pa.NativeFile:
        """A random-access file, or a sequential buffered stream with ``stream=True``."""
        if stream:
            return self._call("open", self.fs.open_input_stream, self.fs_path, buffer_size=1 << 20)
        return self._call("open", self.fs.open_input_file, self.fs_path)

    def unlink(self, missing_ok: bool = False) -> None:
        try:
            self._call("delete", self.fs.delete_file, self.fs_path)
        except FileNotFoundError:
            if not missing_ok:
                raise

    def rmtree(self) -> None:
        """Delete this directory and everything below it."""
        self._call("delete", self.fs.delete_dir, self.fs_path)

    def _list(self, recursive: bool) -> list[pafs.FileInfo]:
        selector = pafs.FileSelector(self.fs_path, allow_not_found=True, recursive=recursive)
        return self._call("list", self.fs.get_file_info, selector)

    def iterdir(self) -> Iterator[StoragePath]:
        """The entries directly below this directory (types known from the listing)."""
        for info in self._list(recursive=False):
            yield StoragePath(self.scheme, self.netloc, self._key_of(info.path), self.query, info.type)

    def glob(self, pattern: str) -> Iterator[StoragePath]:
        """Entries directly below this directory whose name matches ``pattern`` (no ``/``, no ``**``)."""
        if "/" in pattern:
            raise ValueError(f"StoragePath.glob takes a name pattern, got {pattern!r}")
        for path in self.iterdir():
            if fnmatch.fnmatchcase(path.name, pattern):
                yield path

    def walk_files(self) -> Iterator[tuple[str, pafs.FileInfo]]:
        """(relative path, info) of every file below this directory, in listing order."""
        prefix = self.fs_path.rstrip("/") + "/"
        for info in self._list(recursive=True):
            if info.type == pafs.FileType.File and info.path.startswith(prefix):
                yield info.path[len(prefix) :], info

    def _key_of(self, fs_path: str) -> str:
        if self.scheme in BUCKET_SCHEMES:
            return fs_path.partition("/")[2]
        return fs_path.lstrip("/")


AnyPath = Path | StoragePath


def filesystem(path: str | os.PathLike | StoragePath) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path within it) for a local path or any URI."""
    target = as_path(path)
    if isinstance(target, StoragePath):
        return target.fs, target.fs_path
    return pafs.LocalFileSystem(), str(target.absolute())


def check_location(path: str | os.PathLike | StoragePath, what: str) -> None:
    """Fail early, with a clear :class:`StorageError`, when the store of ``path`` cannot be reached or its
    bucket does not exist; nothing to check for local paths. ``what`` names the path in messages."""
    target = as_path(path)
    if not isinstance(target, StoragePath):
        return
    root = StoragePath(target.scheme, target.netloc, "", target.query)
    try:
        kind = root.fs.get_file_info(root.fs_path).type
    except StorageError:
        raise
    except (OSError, pa.ArrowException) as err:
        raise StorageError(f"{what} {target}: cannot reach the store: {_short(err)}") from None
    if target.scheme in BUCKET_SCHEMES and kind == pafs.FileType.NotFound:
        raise StorageError(f"{what} {target}: bucket {target.netloc!r} does not exist (create it first)")


def is_transient(err: BaseException) -> bool:
    """Whether a pyarrow error says the store was unreachable or busy (not that the data is bad)."""
    if isinstance(err, StorageError):
        return True
    if not isinstance(err, OSError | pa.ArrowException) or isinstance(err, FileNotFoundError):
        return False
    text = str(err)
    return any(marker in text for marker in TRANSIENT_MARKERS)


# -------------------------------------------------------------------------------------- reading helpers


def read_table(path: str | os.PathLike | StoragePath, columns: list[str] | None = None) -> pa.Table:
    """``pyarrow.parquet.read_table`` of one local or remote Parquet file."""
    target = as_path(path)
    if isinstance(target, StoragePath):
        return target._call("read", pq.read_table, target.fs_path, columns=columns, filesystem=target.fs)
    return pq.read_table(target, columns=columns)


def read_schema(path: str | os.PathLike | StoragePath) -> pa.Schema:
    """The Arrow schema of one local or remote Parquet file (from its footer)."""
    target = as_path(path)
    if isinstance(target, StoragePath):
        return target._call("read", pq.read_schema, target.fs_path, filesystem=target.fs)
    return pq.read_schema(target)


def read_npy(path: str | os.PathLike | StoragePath) -> np.ndarray:
    """A local or remote ``.npy`` array (never a pickle)."""
    return np.load(io.BytesIO(as_path(path).read_bytes()), allow_pickle=False)


def parquet_file(path: str | os.PathLike | StoragePath) -> pq.ParquetFile:
    """A :class:`pyarrow.parquet.ParquetFile` of one local or remote file."""
    target = as_path(path)
    if isinstance(target, StoragePath):
        return target._call("open", pq.ParquetFile, target.fs_path, filesystem=target.fs)
    return pq.ParquetFile(target)


def open_input(path: str | os.PathLike | StoragePath, stream: bool = False):
    """A binary file object for reading: random access, or sequential (cheaper remotely) with ``stream``."""
    target = as_path(path)
    if isinstance(target, StoragePath):
        return target.open_input(stream=stream)
    return open(target, "rb")


def stat(path: str | os.PathLike | StoragePath) -> tuple[int, int]:
    """(size in bytes, modification time in ns) of a file; FileNotFoundError when it does not exist."""
    target = as_path(path)
    if isinstance(target, StoragePath):
        info = target.info()
        if info.type != pafs.FileType.File:
            raise FileNotFoundError(f"no such file: {target}")
        return int(info.size or 0), int(info.mtime_ns or 0)
    st = os.stat(target)
    return st.st_size, st.st_mtime_ns


def walk_files(root: str | os.PathLike | StoragePath) -> Iterator[str]:
    """Relative POSIX paths of the visible files under ``root`` (no component starting with ``.``)."""
    target = as_path(root)
    if isinstance(target, StoragePath):
        for rel, _ in target.walk_files():
            if not any(part.startswith(".") for part in rel.split("/")):
                yield rel
        return
    for directory, dirs, files in os.walk(target):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        rel_dir = Path(directory).relative_to(target).as_posix()
        for name in files:
            if not name.startswith("."):
                yield name if rel_dir == "." else f"{rel_dir}/{name}"


def remove(path: str | os.PathLike | StoragePath) -> None:
    """Delete a file or a whole directory; nothing when it does not exist."""
    import shutil

    target = as_path(path)
    if target.is_dir():
        if isinstance(target, StoragePath):
            target.rmtree()
        else:
            shutil.rmtree(target)
    elif target.exists():
        target.unlink()
