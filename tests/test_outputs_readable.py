"""The per-row directories of a run (embeddings/, assignments/, weights/) read as one table with the data
tools users reach for first: the part summaries (``_part-NNNNN.json``) never get in their way."""

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pytest

from rebalance.data.parts import list_parts, read_parts, write_part

DIRECTORIES = ("embeddings", "assignments", "weights")


def _expected(run_dir, name: str) -> pa.Table:
    return read_parts(run_dir / name)


def _sorted(table: pa.Table) -> pa.Table:
    return table.sort_by("key").select(sorted(table.schema.names))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run directory's three per-row directories as the stages write them: 3 parts each (one empty, as for
    an unreadable shard), with a fixed-size vector column, int32 labels and float64 weights."""
    out = tmp_path_factory.mktemp("readable")
    rng = np.random.default_rng(0)
    sizes = [5, 0, 4]
    start = 0
    for index, n in enumerate(sizes):
        keys = pa.array([f"k{start + i:03d}" for i in range(n)], pa.string())
        vectors = rng.standard_normal((n, 4)).astype(np.float32)
        image = pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), 4)
        write_part(out / "embeddings", index, pa.table({"key": keys, "image": image}), {"rejected": []})
        labels = pa.array(rng.integers(0, 3, n), pa.int32())
        write_part(out / "assignments", index, pa.table({"key": keys, "image_cluster": labels}), {})
        weights = pa.array(rng.random(n) + 0.5, pa.float64())
        write_part(
            out / "weights", index, pa.table({"key": keys, "weight": weights, "image_cluster": labels}), {}
        )
        start += n
    for name in DIRECTORIES:
        names = sorted(p.name for p in (out / name).iterdir())
        assert names == [f"_part-0000{i}.json" for i in range(3)] + [
            f"part-0000{i}.parquet" for i in range(3)
        ]
        assert [p.name for p in list_parts(out / name)] == [f"part-0000{i}.parquet" for i in range(3)]
    return out


@pytest.mark.parametrize("name", DIRECTORIES)
def test_pandas_reads_a_directory(run_dir, name):
    pd = pytest.importorskip("pandas")
    frame = pd.read_parquet(run_dir / name)
    assert _sorted(
        pa.Table.from_pandas(frame, preserve_index=False).cast(_expected(run_dir, name).schema)
    ).equals(_sorted(_expected(run_dir, name)))


@pytest.mark.parametrize("name", DIRECTORIES)
def test_pyarrow_dataset_reads_a_directory(run_dir, name):
    table = pads.dataset(run_dir / name, format="parquet").to_table()
    assert _sorted(table).equals(_sorted(_expected(run_dir, name)))


@pytest.mark.parametrize("name", DIRECTORIES)
def test_polars_reads_a_directory(run_dir, name):
    pl = pytest.importorskip("polars")
    frame = pl.read_parquet(str(run_dir / name / "*.parquet"))
    assert _sorted(frame.to_arrow().cast(_expected(run_dir, name).schema)).equals(
        _sorted(_expected(run_dir, name))
    )


@pytest.mark.parametrize("name", DIRECTORIES)
def test_duckdb_reads_a_directory(run_dir, name):
    duckdb = pytest.importorskip("duckdb")
    table = duckdb.sql(f"select * from '{run_dir / name}/*.parquet'").arrow()
    if isinstance(table, pa.RecordBatchReader):
        table = table.read_all()
    expected = _expected(run_dir, name)
    got = pa.table(
        {
            c: table.column(c).combine_chunks().cast(expected.schema.field(c).type)
            for c in expected.schema.names
        }
    )
    assert _sorted(got).equals(_sorted(expected))


def test_ray_data_reads_every_directory(run_dir, ray_local):
    import ray

    for name in DIRECTORIES:
        table = pa.concat_tables(ray.get(ray.data.read_parquet(str(run_dir / name)).to_arrow_refs()))
        expected = _expected(run_dir, name)
        assert _sorted(table.select(expected.schema.names).cast(expected.schema)).equals(_sorted(expected))


def test_a_real_run_reads_with_pandas(demo_run):
    pd = pytest.importorskip("pandas")
    for name in DIRECTORIES:
        frame = pd.read_parquet(demo_run / name)
        assert frame["key"].tolist() == read_parts(demo_run / name, columns=["key"]).column("key").to_pylist()
