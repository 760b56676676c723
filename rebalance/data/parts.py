"""Per-shard part files of a run directory: ``part-NNNNN.parquet`` plus its summary ``_part-NNNNN.json``.

The summary's name starts with ``_``, which dataset readers skip (Arrow's dataset discovery ignores ``_``
and ``.`` names; globs of ``*.parquet`` never match it), so the directory reads as one table with
``pandas.read_parquet(dir)``, ``pyarrow.dataset.dataset(dir)``, ``ray.data.read_parquet(dir)``,
``polars.read_parquet(dir/*.parquet)`` or duckdb's ``'dir/*.parquet'``.

The summary is written after the Parquet file, so it is the commit point of a part: a part whose summary
exists is complete (resume skips it); a Parquet file without a summary is redone. This holds on object
stores too, where each file is published whole (:mod:`rebalance.data.atomic`) and readers list only the
parts that have a summary. ``directory`` may be a local path or a URI (:mod:`rebalance.data.fs`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pyarrow as pa

from rebalance.data.atomic import atomic_write_json, atomic_write_table
from rebalance.data.fs import StoragePath, as_path, read_table

__all__ = ["part_path", "write_part", "part_summary", "read_parts", "read_part", "list_parts"]


def part_path(
    directory: str | os.PathLike | StoragePath, index: int, suffix: str = ".parquet"
) -> Path | StoragePath:
    """Path of part ``index`` in ``directory``: ``part-NNNNN.parquet``, or its summary ``_part-NNNNN.json``
    for ``suffix=".json"``."""
    prefix = "_" if suffix == ".json" else ""
    return as_path(directory) / f"{prefix}part-{index:05d}{suffix}"


def write_part(
    directory: str | os.PathLike | StoragePath, index: int, table: pa.Table, summary: dict[str, Any]
) -> None:
    """Write the table, then its summary (the commit point), both atomically."""
    atomic_write_table(table, part_path(directory, index))
    atomic_write_json({"rows": table.num_rows, **summary}, part_path(directory, index, ".json"))


def part_summary(directory: str | os.PathLike | StoragePath, index: int) -> dict[str, Any] | None:
    """The summary of a committed part, or None when the part is not complete."""
    path = part_path(directory, index, ".json")
    if not path.is_file() or not part_path(directory, index).is_file():
        return None
    return json.loads(path.read_text())


def list_parts(directory: str | os.PathLike | StoragePath) -> list[Path | StoragePath]:
    """The committed Parquet parts of ``directory`` in index order."""
    summaries = as_path(directory).glob("_part-*.json")
    return sorted(p.with_name(p.name.removeprefix("_")).with_suffix(".parquet") for p in summaries)


def read_part(
    directory: str | os.PathLike | StoragePath, index: int, columns: list[str] | None = None
) -> pa.Table:
    """The Parquet table of part ``index`` of ``directory`` (``columns`` only, when given)."""
    return read_table(part_path(directory, index), columns=columns)


def read_parts(directory: str | os.PathLike | StoragePath, columns: list[str] | None = None) -> pa.Table:
    """All committed parts of ``directory`` concatenated in part order."""
    tables = [read_table(p, columns=columns) for p in list_parts(directory)]
    if not tables:
        raise FileNotFoundError(f"no committed parts in {directory}")
    return pa.concat_tables(tables)
