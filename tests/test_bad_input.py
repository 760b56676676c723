"""Bad input never crashes a run: each kind of bad image, caption and shard gets its reason; convertible
images are converted; whole pipelines on WebDataset, image folders and the LAION layout finish with every
good row embedded exactly once and every bad one listed in the manifest; duplicate keys are named."""

import io
import json
import struct
import zlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from shards import write_tar

import rebalance
from rebalance.data import folder, readers
from rebalance.data.images import MAX_IMAGE_PIXELS, decode_image
from rebalance.data.parts import read_parts
from rebalance.data.readers import (
    DuplicateKeyError,
    check_unique_keys,
    list_shards,
    read_shard,
    resolve_format,
)
from rebalance.data.synthetic import CAPTION_TEMPLATES, CONCEPTS, render_image
from rebalance.spec import DataSpec


def encode(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` RGB pixels and holds (almost) none."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    )


def good_image(i: int) -> bytes:
    colour, shape = CONCEPTS[i % len(CONCEPTS)]
    return encode(Image.fromarray(render_image(colour, shape, np.random.default_rng(i))), "JPEG")


def good_caption(i: int) -> str:
    colour, shape = CONCEPTS[i % len(CONCEPTS)]
    return CAPTION_TEMPLATES[i % len(CAPTION_TEMPLATES)].format(colour=colour, shape=shape)


def pixels(data: bytes) -> np.ndarray:
    image = decode_image(data)
    assert image.mode == "RGB"
    return np.asarray(image)


# ---------------------------------------------------------------------------------------------- images

JPEG = good_image(0)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (None, "image:missing"),
        (b"", "image:zero size"),
        (png_header_only(0, 5), "image:zero size"),
        (b"this is not an image at all", "image:unsupported format"),
        (JPEG[: len(JPEG) // 2], "image:undecodable"),  # truncated
        (JPEG[:2] + bytes(200) + JPEG[202:], "image:undecodable"),  # corrupt header
        (png_header_only(20_000, 20_000), "image:decompression bomb"),  # beyond Pillow's own limit
        (png_header_only(9_000, 9_000), "image:decompression bomb"),  # beyond ours, within Pillow's
    ],
    ids=["none", "0-bytes", "0x5", "not-an-image", "truncated", "corrupt", "bomb-pillow", "bomb-ours"],
)
def test_unusable_images_get_their_reason(data, reason):
    with pytest.raises(ValueError) as info:
        decode_image(data)
    assert str(info.value).split(" (")[0] == reason
    assert MAX_IMAGE_PIXELS < 9_000 * 9_000


def test_convertible_images_become_rgb_with_alpha_on_white():
    np.testing.assert_array_equal(pixels(encode(Image.new("L", (3, 2), 100))), np.full((2, 3, 3), 100))
    np.testing.assert_array_equal(pixels(encode(Image.new("1", (2, 2), 1))), np.full((2, 2, 3), 255))
    sixteen = Image.fromarray(np.array([[0, 257 * 100, 65535]], dtype=np.uint16))
    np.testing.assert_array_equal(pixels(encode(sixteen))[0, :, 0], [0, 100, 255])
    cmyk = pixels(encode(Image.new("CMYK", (4, 4), (0, 255, 255, 0)), "JPEG"))  # pure red in ink
    assert (cmyk[..., 0] > 230).all() and (cmyk[..., 1:] < 30).all()
    palette = Image.new("P", (2, 1))
    palette.putpalette([10, 200, 30, 250, 0, 5] + [0] * 762)
    palette.putdata([0, 1])
    np.testing.assert_array_equal(pixels(encode(palette))[0], [[10, 200, 30], [250, 0, 5]])
    palette.info["transparency"] = 0
    np.testing.assert_array_equal(pixels(encode(palette))[0], [[255, 255, 255], [250, 0, 5]])
    rgba = Image.new("RGBA", (3, 1))
    rgba.putdata([(255, 0, 0, 0), (0, 0, 255, 255), (0, 0, 0, 128)])
    got = pixels(encode(rgba))[0].astype(int)
    np.testing.assert_array_equal(got[:2], [[255, 255, 255], [0, 0, 255]])
    np.testing.assert_allclose(got[2], 255 * (1 - 128 / 255), atol=1)  # black at half alpha over white
    la = Image.new("LA", (2, 1))
    la.putdata([(0, 0), (0, 255)])
    np.testing.assert_array_equal(pixels(encode(la))[0], [[255, 255, 255], [0, 0, 0]])
    np.testing.assert_array_equal(
        pixels(encode(Image.new("RGB", (2, 2), (1, 2, 3)), "WEBP", lossless=True))[0, 0], [1, 2, 3]
    )


# ---------------------------------------------------------------------------------------------- shards


def test_unreadable_and_truncated_shards_are_rejected_not_fatal(tmp_path):
    root = tmp_path / "pq"
    root.mkdir()
    (root / "a-garbage.parquet").write_bytes(b"PAR1 this is not a parquet file")
    table = pa.table({"key": ["k0", "k1"], "jpg": [JPEG, JPEG], "txt": ["a", "b"], "source": ["web", "x"]})
    pq.write_table(table, root / "b-good.parquet")
    data = DataSpec(path=str(root), carry=("source",))
    shards = list_shards(data)
    columns = resolve_format(data, shards)  # the first shard cannot be read: the next one decides
    assert columns == ("parquet", "jpg", "txt")
    (batch,) = read_shard(shards[0], data, *columns, 16)
    assert batch.keys == [] and batch.images == [] and batch.texts == []
    assert batch.carried["source"].type == pa.string()  # same part schema as the readable shards
    ((key, reason),) = batch.rejected
    assert key == "a-garbage.parquet" and reason.startswith("shard:unreadable (")
    # A tar cut short: the samples before the cut stand, the rest of the shard is one rejected entry.
    write_tar(
        tmp_path / "t.tar", [(f"{i}.jpg", JPEG) for i in range(6)] + [(f"{i}.txt", b"c") for i in range(6)]
    )
    raw = (tmp_path / "t.tar").read_bytes()
    (tmp_path / "cut.tar").write_bytes(raw[: len(raw) // 3])
    data = DataSpec(path=str(tmp_path / "cut.tar"))
    batches = list(read_shard(list_shards(data)[0], data, "webdataset", "image", None, 2))
    kept = [k for b in batches for k in b.keys]
    assert kept and kept == [str(i) for i in range(len(kept))]
    assert batches[-1].rejected[0][0] == "cut.tar"
    assert batches[-1].rejected[0][1].startswith("shard:unreadable (ReadError")
    assert f"after {len(kept)} rows" in batches[-1].rejected[0][1]
    # A LAION shard whose .npy is garbage: no rows, vectors as wide as the other shards', the run goes on.
    laion = tmp_path / "laion"
    write_laion(laion, (4, 4), [["a0", "a1", "a2", "a3"], ["b0", "b1", "b2", "b3"]])
    (laion / "img_emb" / "img_emb_0.npy").write_bytes(b"\x93NUMPY garbage")
    data = DataSpec(path=str(laion), carry=("source",))
    shards = list_shards(data)
    columns = resolve_format(data, shards)
    (batch,) = read_shard(shards[0], data, *columns, 16)
    assert batch.image_vectors.shape == (0, 8) and batch.text_vectors.shape == (0, 8)
    assert batch.carried["source"].type == pa.string()
    assert batch.rejected[0][0] == "0" and batch.rejected[0][1].startswith("shard:unreadable (")
    assert [b.keys for b in read_shard(shards[1], data, *columns, 16)] == [["b0", "b1", "b2", "b3"]]


def test_bad_captions_in_tars_and_sidecars(tmp_path):
    write_tar(
        tmp_path / "c.tar",
        [
            ("0.jpg", JPEG),
            ("0.txt", b"caf\xe9"),  # latin-1, not UTF-8
            ("1.jpg", JPEG),
            ("1.json", b'{"caption": "unterminated'),
            ("2.jpg", JPEG),
            ("2.json", b'{"caption": "fine \\u00e9"}'),
        ],
    )
    data = DataSpec(path=str(tmp_path / "c.tar"))
    batches = list(read_shard(list_shards(data)[0], data, *resolve_format(data, list_shards(data)), 8))
    rejected = dict(r for b in batches for r in b.rejected)
    assert rejected["0"] == "text:not utf-8"
    assert rejected["1"].startswith("text:bad json (")
    assert [t for b in batches for t in b.texts] == ["fine \u00e9"]
    root = tmp_path / "imgs"
    root.mkdir()
    for name in ("a", "b"):
        (root / f"{name}.jpg").write_bytes(JPEG)
    (root / "a.txt").write_bytes(b"\xff\xfe\x00 not utf-8")
    (root / "b.txt").write_bytes("\ufeffwith a BOM".encode())
    data = DataSpec(path=str(root), format="folder")
    batches = list(read_shard(list_shards(data)[0], data, *resolve_format(data, list_shards(data)), 8))
    assert [r for b in batches for r in b.rejected] == [("a", "text:not utf-8")]
    assert [t for b in batches for t in b.texts] == ["with a BOM"]


# ---------------------------------------------------------------------------------------------- pipelines


def run_spec(path, marginals=("image_cluster",), k=3, **data):
    return {
        "data": {"path": str(path), **data},
        "embed": {"model": "rebalance-tiny", "pretrained": None, "batch_size": 16},
        "cluster": {"image": {"k": k}, "text": {"k": k}, "niter": 10},
        "balance": {"marginals": list(marginals), "relax": "exact"},  # the checks below are of exact weights
        "report": {"html": False},
    }


def test_webdataset_with_bad_members_end_to_end(tmp_path, ray_local):
    root = tmp_path / "wds"
    root.mkdir()
    rgba = Image.new("RGBA", (16, 16), (200, 10, 10, 90))
    palette = Image.new("P", (16, 16), 3)
    palette.putpalette([v for i in range(256) for v in (i, 255 - i, 40)])
    palette.info["transparency"] = 3
    bad = {  # key -> (members, the reason it is rejected with)
        "bad-corrupt": ([("jpg", b"\xff\xd8\xff garbage")], "image:undecodable"),
        "bad-truncated": ([("jpg", JPEG[:300])], "image:undecodable"),
        "bad-zero": ([("jpg", b"")], "image:zero size"),
        "bad-bomb": ([("png", png_header_only(30_000, 30_000))], "image:decompression bomb"),
        "bad-noimage": ([], "image:missing"),
        "bad-latin1": ([("jpg", JPEG), ("txt", b"\xe9t\xe9")], "text:not utf-8"),
        "bad-empty": ([("jpg", JPEG), ("txt", b"  \n")], "text:empty"),
        "bad-nocaption": ([("jpg", JPEG)], "text:missing"),
        "bad-json": ([("jpg", JPEG), ("json", b"{not json")], "text:bad json"),
    }
    convertible = {
        "conv-gray": encode(Image.new("L", (16, 16), 90)),
        "conv-cmyk": encode(Image.new("CMYK", (16, 16), (0, 200, 0, 30)), "JPEG"),
        "conv-palette": encode(Image.new("P", (16, 16), 7)),
        "conv-palette-alpha": encode(palette),
        "conv-rgba": encode(rgba),
        "conv-la": encode(Image.new("LA", (16, 16), (40, 128))),
    }
    good = [f"good-{i:03d}" for i in range(40)]
    members_0, members_1 = [], []
    for i, key in enumerate(good[:20]):
        members_0 += [(f"{key}.jpg", good_image(i)), (f"{key}.txt", good_caption(i).encode())]
    for key, (parts, _) in bad.items():
        members_0 += [(f"{key}.{ext}", data) for ext, data in parts] + [(f"{key}.txt", b"caption")] * (
            key in ("bad-corrupt", "bad-truncated", "bad-zero", "bad-bomb", "bad-noimage")
        )
    for i, (key, data) in enumerate(convertible.items()):
        members_1 += [
            (f"{key}.png", data),
            (f"{key}.json", json.dumps({"caption": good_caption(i)}).encode()),
        ]
    for i, key in enumerate(good[20:], start=20):
        members_1 += [(f"{key}.jpg", good_image(i)), (f"{key}.txt", good_caption(i).encode())]
    write_tar(root / "00000.tar", members_0)
    write_tar(root / "00001.tar", members_1)
    (root / "00002.tar").write_bytes(b"this is not a tar file" * 50)
    result = rebalance.run(run_spec(root), tmp_path / "out")

    embedded = read_parts(tmp_path / "out" / "embeddings")
    expected = good[:20] + list(convertible) + good[20:]
    assert embedded.column("key").to_pylist() == expected  # every good row once, in input order
    assert sorted(result.weights.column("key").to_pylist()) == sorted(expected)
    for side in ("image", "text"):
        vectors = embedded.column(side).combine_chunks().flatten().to_numpy().reshape(len(expected), -1)
        np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    rejected = result.manifest["stages"]["embed"]["rejected"]
    got = {r["key"]: r["reason"] for r in rejected["rows"]}
    assert {k: r.split(" (")[0] for k, r in got.items()} == {
        **{k: reason for k, (_, reason) in bad.items()},
        "00002.tar": "shard:unreadable",
    }
    assert rejected["count"] == len(bad) + 1
    assert rejected["by_reason"]["image:undecodable"] == 2 and rejected["by_reason"]["shard:unreadable"] == 1
    assert result.report["rejected_rows"] == len(bad) + 1
    shards = list_shards(DataSpec(path=str(root)))
    assert check_unique_keys(tmp_path / "out" / "embeddings", shards) == len(expected) + len(bad)


def test_image_only_folder_end_to_end(tmp_path, ray_local, monkeypatch):
    root = tmp_path / "imgs"
    for i in range(36):
        (root / f"c{i % 3}").mkdir(parents=True, exist_ok=True)
        (root / f"c{i % 3}" / f"{i:03d}.jpg").write_bytes(good_image(i))
    (root / "c0" / "zz-rgba.png").write_bytes(encode(Image.new("RGBA", (8, 8), (0, 0, 0, 0))))
    (root / "c1" / "zz-broken.jpg").write_bytes(b"\xff\xd8 broken")
    monkeypatch.setattr(folder, "FOLDER_SHARD_SIZE", 16)  # listed in this process: 38 images -> 3 shards
    result = rebalance.run(run_spec(root, format="folder"), tmp_path / "out")
    assert result.manifest["stages"]["embed"]["sides"] == ["image"]
    assert result.manifest["stages"]["embed"]["shards"] == 3
    embedded = read_parts(tmp_path / "out" / "embeddings")
    assert "text" not in embedded.schema.names  # absent, not zero-filled
    keys = [f"c{i % 3}/{i:03d}" for i in range(36)] + ["c0/zz-rgba"]
    assert embedded.column("key").to_pylist() == sorted(keys)
    assert "text_cluster" not in read_parts(tmp_path / "out" / "assignments").schema.names
    assert set(result.report["clusters"]) == {"image"}
    w = result.weights
    labels, weights = w.column("image_cluster").to_numpy(), w.column("weight").to_numpy()
    np.testing.assert_allclose(np.bincount(labels, weights=weights) / len(weights), 1 / 3, atol=1e-6)
    rows = result.manifest["stages"]["embed"]["rejected"]["rows"]
    assert [(r["key"], r["reason"].split(" (")[0]) for r in rows] == [("c1/zz-broken", "image:undecodable")]


def write_laion(root, sizes, keys, d=8, seed=0):
    rng = np.random.default_rng(seed)
    vectors = {}
    for side in ("img", "text"):
        (root / f"{side}_emb").mkdir(parents=True, exist_ok=True)
    (root / "metadata").mkdir(exist_ok=True)
    for i, n in enumerate(sizes):
        centres = rng.normal(size=(3, d))
        for side in ("img", "text"):
            x = centres[np.arange(n) % 3] + 0.1 * rng.normal(size=(n, d))
            x = (3 * x).astype(np.float16 if side == "img" else np.float32)  # not unit length
            np.save(root / f"{side}_emb" / f"{side}_emb_{i}.npy", x)
            vectors[side, i] = x
        table = pa.table({"key": keys[i], "source": [["web", "stock"][j % 2] for j in range(n)]})
        pq.write_table(table, root / "metadata" / f"metadata_{i}.parquet")
    return vectors


def test_laion_layout_end_to_end(tmp_path, ray_local, monkeypatch):
    # precomputed vectors need no model: a tag whose weights this offline machine lacks is not refused
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    root = tmp_path / "laion"
    keys = [[f"a{j}" for j in range(30)], [f"b{j}" for j in range(24)]]
    vectors = write_laion(root, (30, 24), keys)
    bad = np.load(root / "img_emb" / "img_emb_1.npy")
    bad[5] = 0  # a zero vector cannot be normalised
    np.save(root / "img_emb" / "img_emb_1.npy", bad)
    spec = run_spec(root, marginals=("image_cluster", "source"), carry=["source"])
    spec["balance"]["allow_partial"] = True
    spec["embed"] = {**spec.get("embed", {}), "model": "ViT-B-32", "pretrained": "openai"}
    result = rebalance.run(spec, tmp_path / "out")
    assert result.manifest["stages"]["embed"]["format"] == "embeddings"
    embedded = read_parts(tmp_path / "out" / "embeddings")
    kept = keys[0] + keys[1][:5] + keys[1][6:]
    assert embedded.column("key").to_pylist() == kept
    assert embedded.column("source").to_pylist()[:3] == ["web", "stock", "web"]
    for side in ("img", "text"):
        x = np.concatenate([vectors[side, 0], np.delete(bad if side == "img" else vectors[side, 1], 5, 0)])
        x = x.astype(np.float64)
        got = embedded.column("image" if side == "img" else "text").combine_chunks().flatten().to_numpy()
        np.testing.assert_allclose(
            got.reshape(len(kept), -1), x / np.linalg.norm(x, axis=1, keepdims=True), atol=1e-6
        )
    assert result.manifest["stages"]["embed"]["rejected"]["rows"] == [
        {"key": "b5", "reason": "image:non-finite or zero vector"}
    ]
    assert result.weights.num_rows == len(kept)


def test_duplicate_keys_are_an_error_that_names_them(tmp_path, ray_local, monkeypatch):
    within = tmp_path / "within"
    write_laion(within, (6,), [["x0", "x1", "dup", "x3", "dup", "x5"]])
    with pytest.raises(Exception, match=r"duplicate keys within shard 0.*'dup'"):
        rebalance.run(run_spec(within), tmp_path / "out-within", until="embed")
    across = tmp_path / "across"
    write_laion(across, (5, 5), [["p", "q", "r", "s", "t"], ["u", "q", "v", "t", "w"]])
    # 4 keys per bucket: more keys than one bucket, so the stage checks them on its actor pool
    monkeypatch.setattr(readers, "BUCKET_KEYS", 4)
    with pytest.raises(DuplicateKeyError) as info:
        rebalance.run(run_spec(across), tmp_path / "out-across", until="embed")
    assert info.value.duplicates == {
        "q": ["part-00000 (0)", "part-00001 (1)"],
        "t": ["part-00000 (0)", "part-00001 (1)"],
    }
    assert not (tmp_path / "out-across" / "embeddings" / readers.KEY_CHECK).exists()
