"""Every input format read back against the data the test wrote: keys, captions, image bytes, vectors,
carried columns, shard order and sides; bounded batches; fingerprints; duplicate keys."""

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from shards import image_bytes, write_tar

from rebalance.data import folder, readers
from rebalance.data.input_format import Columns, InputFormat, Location
from rebalance.data.parts import write_part
from rebalance.data.readers import (
    DuplicateKeyError,
    Shard,
    check_unique_keys,
    dataset_fingerprint,
    list_shards,
    read_shard,
    resolve_format,
)
from rebalance.data.webdataset import split_member
from rebalance.spec import DataSpec, SpecError


def read_all(data: DataSpec, batch_size: int = 1000):
    """(format, image column, text column, batches of every shard in order)."""
    shards = list_shards(data)
    fmt, image_column, text_column = resolve_format(data, shards)
    batches = [b for s in shards for b in read_shard(s, data, fmt, image_column, text_column, batch_size)]
    return fmt, image_column, text_column, batches


def rows_of(batches) -> dict:
    """key -> (image, text, {carried}) over all batches, in order."""
    out = {}
    for b in batches:
        carried = {c: v.to_pylist() for c, v in b.carried.items()}
        for i, key in enumerate(b.keys):
            out[key] = (
                b.images[i] if b.images is not None else None,
                b.texts[i] if b.texts is not None else None,
                {c: v[i] for c, v in carried.items()},
            )
    return out


# ---------------------------------------------------------------------------------------------- WebDataset


def test_split_member_follows_webdataset_rules():
    assert split_member("dir/000123.jpg") == ("dir/000123", "jpg")
    assert split_member("./a/x.seg.PNG") == ("a/x", "seg.png")
    assert split_member("a/.hidden.jpg") is None
    assert split_member("README") is None


def test_webdataset_keys_captions_images_and_json_fields(tmp_path):
    root = tmp_path / "wds"
    root.mkdir()
    img = {i: image_bytes(i, "PNG") for i in range(10)}
    jpeg = image_bytes(99, "JPEG", 8)
    write_tar(
        root / "shard-00000.tar",
        [
            ("a/000.jpg", jpeg),
            ("a/000.txt", b"first caption"),
            ("a/001.png", img[1]),
            ("a/001.json", json.dumps({"caption": "from json", "source": "web", "score": 0.5}).encode()),
            ("a/001.cls", b"3"),
            ("002.webp", img[2]),
            ("002.txt", "caf\u00e9 \u2603".encode()),
            ("002.json", json.dumps({"caption": "not this one", "source": "stock"}).encode()),
            ("003.png", img[3]),  # two images: jpg is preferred over png
            ("003.jpg", jpeg),
            ("003.txt", b"three"),
            ("./004.jpeg", img[4]),
            ("./004.txt", b"four"),
        ],
    )
    write_tar(
        root / "shard-00001.tar", [("100.png", img[5]), ("100.json", b'{"txt": "json txt", "source": 7}')]
    )
    # img2dataset writes a Parquet file of metadata beside each tar: auto still means webdataset.
    pq.write_table(pa.table({"key": ["x"]}), root / "shard-00000.parquet")
    data = DataSpec(path=str(root), carry=("source",))
    fmt, image_column, text_column, batches = read_all(data)
    assert (fmt, image_column is not None, text_column is not None) == ("webdataset", True, True)
    rows = rows_of(batches)
    assert list(rows) == ["a/000", "a/001", "002", "003", "004", "100"]
    assert rows["a/000"] == (jpeg, "first caption", {"source": None})
    assert rows["a/001"] == (img[1], "from json", {"source": "web"})
    assert rows["002"] == (img[2], "caf\u00e9 \u2603", {"source": "stock"})
    assert rows["003"][0] == jpeg and rows["004"] == (img[4], "four", {"source": None})
    assert rows["100"] == (img[5], "json txt", {"source": "7"})  # non-string json values as JSON text
    assert all(b.carried["source"].type == pa.string() for b in batches)
    # A single tar file is a dataset too.
    single = read_all(DataSpec(path=str(root / "shard-00001.tar")))[3]
    assert rows_of(single)["100"][1] == "json txt"


def test_webdataset_sides_and_spec_errors(tmp_path):
    write_tar(tmp_path / "images.tar", [("0.jpg", image_bytes(0, "JPEG")), ("1.jpg", image_bytes(1, "JPEG"))])
    write_tar(tmp_path / "texts.tar", [("0.txt", b"zero"), ("1.txt", b"one")])
    assert resolve_format(*_spec_and_shards(tmp_path / "images.tar"))[1:] == ("image", None)
    assert resolve_format(*_spec_and_shards(tmp_path / "texts.tar"))[1:] == (None, "text")
    with pytest.raises(SpecError, match="data.carry"):
        resolve_format(*_spec_and_shards(tmp_path / "images.tar", carry=("source",)))
    with pytest.raises(SpecError, match="data.image_column"):
        resolve_format(*_spec_and_shards(tmp_path / "images.tar", image_column="jpg"))


def _spec_and_shards(path, **fields):
    data = DataSpec(path=str(path), **fields)
    return data, list_shards(data)


# ---------------------------------------------------------------------------------------------- folder


def test_folder_keys_sidecars_and_fixed_size_shards(tmp_path, monkeypatch):
    root = tmp_path / "imgs"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    (root / ".cache").mkdir()
    files = {"a/1.jpg": image_bytes(1, "JPEG"), "a/3.JPEG": image_bytes(3, "JPEG"), "b/2.png": image_bytes(2)}
    files["c.webp"] = image_bytes(4, "WEBP")
    for rel, data in files.items():
        (root / rel).write_bytes(data)
    (root / "a/1.txt").write_text("one")
    (root / "b/2.txt").write_text("two")
    (root / "notes.md").write_text("not an image")
    (root / ".cache/x.jpg").write_bytes(image_bytes(9, "JPEG"))
    monkeypatch.setattr(folder, "FOLDER_SHARD_SIZE", 2)
    data = DataSpec(path=str(root), format="folder")
    shards = list_shards(data)
    assert [s.kind for s in shards] == ["folder", "folder"]
    assert [len(s.files) for s in shards] == [3, 3]  # a/1.jpg + a/1.txt, a/3.JPEG | b/2.png + b/2.txt, c.webp
    fmt, _, text_column, batches = read_all(data)
    assert fmt == "folder" and text_column is not None
    rows = rows_of(batches)
    assert list(rows) == ["a/1", "a/3", "b/2", "c"]
    assert rows["a/1"][:2] == (files["a/1.jpg"], "one")
    assert rows["a/3"][:2] == (files["a/3.JPEG"], None)  # no sidecar: rejected later as text:missing
    assert rows["c"][:2] == (files["c.webp"], None)
    # auto finds the folder too; without any sidecar the dataset is image-only.
    assert resolve_format(*_spec_and_shards(root))[0] == "folder"
    (root / "a/1.txt").unlink()
    (root / "b/2.txt").unlink()
    assert resolve_format(*_spec_and_shards(root, format="folder"))[1:] == ("image", None)


def test_fingerprint_covers_every_file_of_a_shard(tmp_path):
    root = tmp_path / "imgs"
    root.mkdir()
    (root / "x.png").write_bytes(image_bytes(1))
    (root / "x.txt").write_text("caption")
    data = DataSpec(path=str(root), format="folder")
    before = dataset_fingerprint(list_shards(data))
    assert before[0]["files"] == 2
    (root / "x.txt").write_text("a longer caption")
    assert dataset_fingerprint(list_shards(data)) != before


# ---------------------------------------------------------------------------------------------- LAION


def write_laion(root, sizes, d=6, metadata=True, sides=("img", "text"), seed=0, keys=None):
    """clip-retrieval layout with shards numbered by ``sizes`` (number -> rows); returns the vectors."""
    rng = np.random.default_rng(seed)
    written = {}
    for number, n in sizes.items():
        for side in sides:
            (root / f"{side}_emb").mkdir(parents=True, exist_ok=True)
            x = rng.normal(size=(n, d)).astype(np.float16 if side == "img" else np.float32)
            np.save(root / f"{side}_emb" / f"{side}_emb_{number}.npy", x)
            written[side, number] = x
        if metadata:
            (root / "metadata").mkdir(exist_ok=True)
            k = keys[number] if keys else [f"k{number}-{j}" for j in range(n)]
            table = pa.table(
                {"key": k, "caption": [f"c{j}" for j in range(n)], "source": ["web", "stock"] * (n // 2)}
            )
            pq.write_table(table, root / "metadata" / f"metadata_{number}.parquet")
    return written


def test_laion_layout_vectors_keys_and_metadata(tmp_path):
    root = tmp_path / "laion"
    vectors = write_laion(root, {"0": 6, "10": 4, "2": 8})
    data = DataSpec(path=str(root), carry=("source",))
    shards = list_shards(data)
    assert [s.rel for s in shards] == ["0", "2", "10"]  # by number, not by name
    assert [len(s.files) for s in shards] == [3, 3, 3]
    fmt, image_column, text_column = resolve_format(data, shards)
    assert fmt == "embeddings" and image_column and text_column
    batches = [b for s in shards for b in read_shard(s, data, fmt, image_column, text_column, 3)]
    assert max(b.size for b in batches) == 3
    keys = [k for b in batches for k in b.keys]
    assert keys == [f"k{i}-{j}" for i, n in (("0", 6), ("2", 8), ("10", 4)) for j in range(n)]
    image = np.concatenate([b.image_vectors for b in batches])
    text = np.concatenate([b.text_vectors for b in batches])
    assert image.dtype == np.float32
    np.testing.assert_array_equal(
        image, np.concatenate([vectors["img", i].astype(np.float32) for i in ["0", "2", "10"]])
    )
    np.testing.assert_array_equal(text, np.concatenate([vectors["text", i] for i in ["0", "2", "10"]]))
    assert [v for b in batches for v in b.carried["source"].to_pylist()][:4] == [
        "web",
        "stock",
        "web",
        "stock",
    ]
    # Every file of a shard is fingerprinted: rewriting the metadata changes it.
    before = dataset_fingerprint(shards)
    os.utime(root / "metadata" / "metadata_2.parquet", ns=(1, 1))
    after = dataset_fingerprint(list_shards(data))
    assert after[0] == before[0] and after[1] != before[1]


def test_laion_without_metadata_and_single_side(tmp_path):
    root = tmp_path / "laion"
    vectors = write_laion(root, {"0": 5, "1": 2}, metadata=False, sides=("text",))
    data = DataSpec(path=str(root))
    fmt, image_column, text_column, batches = read_all(data, batch_size=2)
    assert (fmt, image_column, text_column is not None) == ("embeddings", None, True)
    assert [k for b in batches for k in b.keys] == ["0:0", "0:1", "0:2", "0:3", "0:4", "1:0", "1:1"]
    assert all(b.image_vectors is None for b in batches)
    np.testing.assert_array_equal(np.concatenate([b.text_vectors for b in batches])[5:], vectors["text", "1"])
    with pytest.raises(SpecError, match="no metadata"):
        resolve_format(data.__class__(path=str(root), carry=("source",)), list_shards(data))


def test_laion_misaligned_files_are_an_error_naming_them(tmp_path):
    root = tmp_path / "laion"
    write_laion(root, {"0": 4, "1": 4})
    np.save(root / "text_emb" / "text_emb_1.npy", np.ones((3, 6), np.float32))
    with pytest.raises(
        SpecError, match=r"img_emb_1\.npy has 4.*text_emb_1\.npy has 3.*metadata_1\.parquet has 4"
    ):
        list_shards(DataSpec(path=str(root)))
    np.save(root / "text_emb" / "text_emb_1.npy", np.ones((4, 5), np.float32))
    with pytest.raises(SpecError, match=r"different widths.*text_emb_1\.npy has 5"):
        list_shards(DataSpec(path=str(root)))
    (root / "text_emb" / "text_emb_1.npy").unlink()
    with pytest.raises(SpecError, match=r"text_emb/text_emb_1\.npy"):
        list_shards(DataSpec(path=str(root)))


# ---------------------------------------------------------------------------------------------- Parquet


def test_parquet_status_rejections_and_nested_fallback_keys(tmp_path):
    nested = tmp_path / "data" / "sub"
    nested.mkdir(parents=True)
    status = ["success", "failed_to_download", None, "success"]
    jpgs = [image_bytes(i) for i in range(4)]
    pq.write_table(
        pa.table({"jpg": jpgs, "txt": ["a", "b", "c", "d"], "status": status}), nested / "x.parquet"
    )
    data = DataSpec(path=str(tmp_path / "data"))
    fmt, _, _, batches = read_all(data, batch_size=3)
    assert fmt == "parquet"
    rows = rows_of(batches)
    assert list(rows) == ["sub/x.parquet:0", "sub/x.parquet:3"]
    assert rows["sub/x.parquet:3"][:2] == (jpgs[3], "d")
    assert [r for b in batches for r in b.rejected] == [
        ("sub/x.parquet:1", "status:failed_to_download"),
        ("sub/x.parquet:2", "status:None"),
    ]


# ---------------------------------------------------------------------------------------------- a new format


class _JsonLines(InputFormat):
    """A caption-only format a user might add: ``.jsonl`` files of {"key": ..., "caption": ...} lines."""

    name = "jsonl"
    looks_for = ".jsonl shards"

    def detect(self, where):
        return not where.is_file and where.has(".jsonl")

    def list_shards(self, where):
        return where.file_shards(".jsonl", self.name)

    def resolve(self, data, shards):
        return Columns("jsonl", None, "caption")

    def read(self, shard, data, columns, batch_size):
        rows = [json.loads(line) for line in Path(shard.path).read_text().splitlines()]
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            yield readers.RowBatch(keys=[r["key"] for r in chunk], texts=[r.get("caption") for r in chunk])


def test_a_new_format_is_one_class_and_one_registry_entry(tmp_path, monkeypatch):
    # Listing, auto detection, reading, unreadable shards and duplicate keys all go through the registry.
    monkeypatch.setitem(readers.FORMATS, "jsonl", _JsonLines())
    root = tmp_path / "captions"
    (root / "b").mkdir(parents=True)
    (root / "a.jsonl").write_text(
        "".join(json.dumps({"key": f"a{i}", "caption": f"c{i}"}) + "\n" for i in range(3))
    )
    (root / "b" / "bad.jsonl").write_text("{not json\n")
    (root / "c.jsonl").write_text(json.dumps({"key": "d", "caption": "x"}) + "\n" + json.dumps({"key": "d"}))
    data = DataSpec(path=str(root))
    shards = list_shards(data)
    assert [(s.kind, s.label) for s in shards] == [
        ("jsonl", "a.jsonl"),
        ("jsonl", "b/bad.jsonl"),
        ("jsonl", "c.jsonl"),
    ]
    fmt, image_column, text_column = resolve_format(data, shards)
    assert (fmt, image_column, text_column) == ("jsonl", None, "caption")
    batches = list(read_shard(shards[0], data, fmt, image_column, text_column, 2))
    assert [b.keys for b in batches] == [["a0", "a1"], ["a2"]] and batches[1].texts == ["c2"]
    (bad,) = read_shard(shards[1], data, fmt, image_column, text_column, 2)
    assert bad.keys == [] and bad.texts == [] and bad.images is None  # the dataset's sides
    assert [(k, r.split(" (")[0]) for k, r in bad.rejected] == [("b/bad.jsonl", "shard:unreadable")]
    with pytest.raises(DuplicateKeyError, match="'d'"):
        list(read_shard(shards[2], data, fmt, image_column, text_column, 2))
    monkeypatch.delitem(readers.FORMATS, "jsonl")
    with pytest.raises(SpecError, match=r"found no .*\.parquet shards or image files"):
        list_shards(data)


# ---------------------------------------------------------------------------------------------- bounded batches


def test_large_shards_stream_in_batches_of_at_most_batch_size(tmp_path, monkeypatch):
    n, batch_size = 700, 64
    expected = [f"{i:05d}" for i in range(n)]
    tiny = image_bytes(1)
    write_tar(
        tmp_path / "big.tar",
        [(f"{k}.{e}", tiny if e == "png" else b"c") for k in expected for e in ("png", "txt")],
    )
    pq.write_table(
        pa.table(
            {"key": expected, "jpg": [tiny] * n, "txt": ["c"] * n, "status": ["success", "failed"] * (n // 2)}
        ),
        tmp_path / "big.parquet",
        row_group_size=100,
    )
    (tmp_path / "folder").mkdir()
    for k in expected:
        (tmp_path / "folder" / f"{k}.png").write_bytes(tiny)
    write_laion(tmp_path / "laion", {"0": n}, metadata=False)
    monkeypatch.setattr(folder, "FOLDER_MIN_SHARD_SIZE", n)  # the folder as one large shard
    for path, fmt in (("big.tar", "auto"), ("big.parquet", "auto"), ("folder", "folder"), ("laion", "auto")):
        data = DataSpec(path=str(tmp_path / path), format=fmt)
        shards = list_shards(data)
        assert len(shards) == 1, path
        columns = resolve_format(data, shards)
        sizes, keys = [], []
        for batch in read_shard(shards[0], data, *columns, batch_size):
            sizes.append(batch.size)
            keys += batch.keys + [k for k, _ in batch.rejected]
            for vectors in (batch.image_vectors, batch.text_vectors):
                assert vectors is None or len(vectors) == len(batch.keys)
        assert max(sizes) <= batch_size and sum(sizes) == n, path
        assert sorted(keys) == (expected if path != "laion" else sorted(f"0:{i}" for i in range(n))), path


# ---------------------------------------------------------------------------------------------- duplicate keys


def test_duplicate_keys_within_a_shard_are_named(tmp_path, monkeypatch):
    write_tar(
        tmp_path / "d.tar",
        [("s0.png", image_bytes(0)), ("s1.png", image_bytes(1)), ("s0.png", image_bytes(2)), ("s2.png", b"")],
    )
    data = DataSpec(path=str(tmp_path / "d.tar"))
    shards = list_shards(data)
    batches = []
    with pytest.raises(
        DuplicateKeyError, match=r"within shard d\.tar.*'s0' in shard d\.tar \(2 times\)"
    ) as info:
        batches.extend(read_shard(shards[0], data, *resolve_format(data, shards), 2))
    assert list(info.value.duplicates) == ["s0"]
    assert [k for b in batches for k in b.keys] == ["s0", "s1", "s0", "s2"]  # raised after the whole shard
    # Equal hashes of different keys are confirmed on the keys themselves: not an error.
    monkeypatch.setattr(readers, "key_hashes", lambda keys: np.zeros(len(list(keys)), np.uint64))
    write_tar(tmp_path / "ok.tar", [(f"s{i}.png", image_bytes(i)) for i in range(5)])
    data = DataSpec(path=str(tmp_path / "ok.tar"))
    assert len(list(read_shard(list_shards(data)[0], data, "webdataset", "image", None, 2))) == 3
    monkeypatch.undo()
    # A repeated key among rejected rows counts too.
    path = tmp_path / "p.parquet"
    pq.write_table(
        pa.table(
            {"key": ["a", "b", "a"], "txt": ["x", "y", "z"], "status": ["success", "success", "failed"]}
        ),
        path,
    )
    data = DataSpec(path=str(path))
    with pytest.raises(DuplicateKeyError, match="'a'"):
        list(read_shard(list_shards(data)[0], data, *resolve_format(data, list_shards(data)), 10))


def _fake_parts(directory, parts):
    """Write embed-stage parts: per part (kept keys, rejected (key, reason) pairs)."""
    for index, (keys, rejected) in enumerate(parts):
        write_part(directory, index, pa.table({"key": pa.array(keys, pa.string())}), {"rejected": rejected})
    return [Shard(i, f"/data/s{i}.tar", kind="webdataset", rel=f"s{i}.tar") for i in range(len(parts))]


@pytest.mark.parametrize("bucket_keys", [2**22, 2], ids=["one-bucket", "many-buckets"])
def test_check_unique_keys_across_parts(tmp_path, monkeypatch, bucket_keys):
    # many-buckets: 2 keys per bucket, so the duplicates are found by the hash partition's reducers
    monkeypatch.setattr(readers, "BUCKET_KEYS", bucket_keys)
    shards = _fake_parts(
        tmp_path / "ok",
        [
            (["a", "b"], [["c", "image:undecodable (x)"]]),
            (["d"], [["s0.tar", "shard:unreadable (y)"]]),
            ([], []),
        ],
    )
    assert check_unique_keys(tmp_path / "ok", shards) == 4  # the shard-level entry is not a row key
    shards = _fake_parts(
        tmp_path / "dup",
        [(["a", "b", "c"], [["x", "text:missing"]]), (["d", "a"], []), (["e"], [["x", "image:zero size"]])],
    )
    with pytest.raises(DuplicateKeyError) as info:
        check_unique_keys(tmp_path / "dup", shards)
    assert info.value.duplicates == {
        "a": ["part-00000 (s0.tar)", "part-00001 (s1.tar)"],
        "x": ["part-00000 (s0.tar)", "part-00002 (s2.tar)"],
    }
    assert "across shards: 2 key(s)" in str(info.value) and "'b'" not in str(info.value)
    # At most ten are named; the message says how many more there are.
    many = [str(i) for i in range(12)]
    shards = _fake_parts(tmp_path / "many", [(many, []), (many, [])])
    with pytest.raises(DuplicateKeyError, match=r"12 key\(s\).*and 2 more") as info:
        check_unique_keys(tmp_path / "many", shards)
    assert len(info.value.duplicates) == 10
    assert not (tmp_path / "many" / readers.KEY_CHECK).exists()  # the scratch files are gone
    # Equal hashes of different keys are confirmed on the keys themselves: not an error.
    monkeypatch.setattr(readers, "key_hashes", lambda keys: np.zeros(len(list(keys)), np.uint64))
    assert (
        check_unique_keys(tmp_path / "ok", _fake_parts(tmp_path / "ok", [(["a", "b"], []), (["c"], [])])) == 3
    )


def test_check_unique_keys_memory_does_not_grow_with_rows(tmp_path, monkeypatch):
    """The caller's peak traced memory with 10x the parts (and rows) stays within 1.5x: it holds one part
    or one bucket at a time, never every key hash. A duplicate in the last part is still named."""
    import tracemalloc

    monkeypatch.setattr(readers, "BUCKET_KEYS", 10_000)  # large: 10 chunks of 10 parts, 10 buckets
    rows = 1000

    def peak(n_parts: int, name: str) -> int:
        parts = [([f"k{p}-{i}" for i in range(rows)], []) for p in range(n_parts)]
        parts[-1][0][-1] = "k0-7"  # the same key as row 7 of the first part
        shards = _fake_parts(tmp_path / name, parts)
        tracemalloc.start()
        try:
            with pytest.raises(DuplicateKeyError) as info:
                check_unique_keys(tmp_path / name, shards)
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
            assert info.value.duplicates == {
                "k0-7": ["part-00000 (s0.tar)", f"part-{n_parts - 1:05d} (s{n_parts - 1}.tar)"]
            }

    small, large = peak(10, "small"), peak(100, "large")
    assert large < 1.5 * small, (small, large)


def test_a_small_folder_is_split_for_parallel_work(tmp_path):
    # 1000 images: ceil(1000 / FOLDER_SHARDS) = 16 < FOLDER_MIN_SHARD_SIZE, so 15 chunks of 64 and one of 40,
    # not one chunk of FOLDER_SHARD_SIZE that a single actor embeds while the other cores idle.
    for i in range(1000):
        (tmp_path / f"{i:04d}.jpg").write_bytes(b"")
    shards = folder.list_folder_shards(Location(tmp_path))
    assert [len(s.files) for s in shards] == [64] * 15 + [40]
    assert [s.index for s in shards] == list(range(16)) and shards[1].rel == "0064.jpg"
