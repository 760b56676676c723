"""The key check (``check_unique_keys``) in one process: its wall time and the caller's peak traced memory.

Writes ``--parts`` embed-stage parts of ``--rows`` distinct keys to a temporary directory, then checks them
with ``--bucket-keys`` key hashes per bucket (the stage's default: ``rebalance.data.readers.BUCKET_KEYS``).
The peak is ``tracemalloc``'s (numpy and Python allocations; Arrow's buffers are not traced), and the wall
time includes tracemalloc's overhead. docs/scaling.md records the numbers.

    PYTHONPATH=. python benchmarks/key_check.py --parts 40 --rows 100000 --bucket-keys 1000000
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
import tracemalloc
from pathlib import Path

import pyarrow as pa

from rebalance.data import readers
from rebalance.data.parts import write_part
from rebalance.data.readers import Shard, check_unique_keys


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", type=int, default=10)
    parser.add_argument("--rows", type=int, default=100_000, help="keys per part")
    parser.add_argument("--bucket-keys", type=int, default=readers.BUCKET_KEYS)
    args = parser.parse_args()
    readers.BUCKET_KEYS = args.bucket_keys
    directory = Path(tempfile.mkdtemp(prefix="key-check-"))
    try:
        for p in range(args.parts):
            keys = pa.array([f"{p:05d}/{i:09d}" for i in range(args.rows)])
            write_part(directory, p, pa.table({"key": keys}), {"rejected": []})
        shards = [Shard(i, f"s{i}") for i in range(args.parts)]
        tracemalloc.start()
        start = time.perf_counter()
        n = check_unique_keys(directory, shards)
        wall = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    finally:
        shutil.rmtree(directory)
    print(
        f"parts={args.parts} rows/part={args.rows} N={n} bucket_keys={args.bucket_keys} wall={wall:.2f}s "
        f"keys/s={n / wall:,.0f} peak_traced_MiB={peak / 2**20:.1f}"
    )


if __name__ == "__main__":
    main()
