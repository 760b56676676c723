"""Untrusted inputs (issue 22): image formats and decoded sizes, Parquet cells and column types, checkpoint
files and WebDataset keys. Everything in memory or under tmp_path; no server, no Ray."""

from __future__ import annotations

import io
import pickle
import struct
import tarfile
import zlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import EpsImagePlugin, Image

from jobs.training import read_train_state, write_train_state
from rebalance.data.images import MAX_DECODED_BYTES, MAX_IMAGE_PIXELS, decode_image
from rebalance.data.readers import list_shards, read_shard, resolve_format
from rebalance.data.webdataset_writer import unsafe_key, write_webdataset_tar
from rebalance.serve.weigher import _pixels
from rebalance.spec import DataSpec, SpecError


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _jpeg(size: int = 8) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (size, size), (10, 20, 30)).save(out, "JPEG")
    return out.getvalue()


# ---------------------------------------------------------------------------------------------- decoding


def test_eps_named_jpg_never_reaches_its_plugin(monkeypatch, tmp_path):
    out = io.BytesIO()
    Image.new("RGB", (4, 4)).save(out, "EPS")
    eps = out.getvalue()
    (tmp_path / "photo.jpg").write_bytes(eps)
    calls = []
    original = EpsImagePlugin.EpsImageFile._open
    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", lambda self: calls.append(1) or original(self))
    Image.open(io.BytesIO(eps)).close()  # Pillow left to itself picks the EPS plugin from the content
    assert calls == [1]
    with pytest.raises(ValueError, match=r"^image:unsupported format"):
        decode_image((tmp_path / "photo.jpg").read_bytes())
    assert _pixels(eps) == 0  # the endpoint's header probe
    assert calls == [1]


def test_multi_frame_images_count_every_frame_before_decoding():
    # An APNG header: 6000 x 6000 RGB (36 Mpx, under the pixel limit) with 3 frames declared, no pixel data.
    ihdr = struct.pack(">IIBBBBB", 6000, 6000, 8, 2, 0, 0, 0)
    apng = (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", ihdr)
        + _chunk(b"acTL", struct.pack(">II", 3, 0))
        + _chunk(b"IDAT", zlib.compress(b""))
        + _chunk(b"IEND", b"")
    )
    assert MAX_IMAGE_PIXELS >= 6000 * 6000 and MAX_DECODED_BYTES < 6000 * 6000 * 4 * 3
    with pytest.raises(
        ValueError, match=r"^image:decompression bomb \(6000x6000 RGB x 4 frames"
    ):  # 3 + the default image
        decode_image(apng)


def test_16_bit_grayscale_is_scaled_in_blocks():
    values = np.arange(0, 65536, 7, dtype=np.uint16)[: 3 * 1500].reshape(1500, 3)  # > one row block
    out = io.BytesIO()
    Image.fromarray(values).save(out, "PNG")
    got = np.asarray(decode_image(out.getvalue()))[..., 0]
    np.testing.assert_array_equal(got, np.clip(np.rint(values / 257.0), 0, 255))


# ---------------------------------------------------------------------------------------------- parquet


def _read_all(path, **spec):
    data = DataSpec(path=str(path), **spec)
    shards = list_shards(data)
    columns = resolve_format(data, shards)
    batches = [b for shard in shards for b in read_shard(shard, data, *columns, 4)]
    return [k for b in batches for k in b.keys], [r for b in batches for r in b.rejected]


def test_parquet_image_cells_over_the_limit_are_rejected_per_row(tmp_path):
    jpeg = _jpeg()
    table = pa.table({"key": ["a", "b", "c"], "jpg": [jpeg, b"\0" * 5000, jpeg], "txt": ["x", "y", "z"]})
    pq.write_table(table, tmp_path / "s.parquet")
    kept, rejected = _read_all(tmp_path, max_image_bytes=4000)
    assert kept == ["a", "c"]
    assert rejected == [("b", "image:too large (5000 bytes > data.max_image_bytes 4000)")]
    # A row group that decompresses to far more than the limit a row is rejected without decompressing it.
    bomb = pa.table({"key": ["d", "e"], "jpg": [b"\0" * 3_000_000, jpeg], "txt": ["x", "y"]})
    pq.write_table(bomb, tmp_path / "s.parquet", compression="zstd")
    assert (tmp_path / "s.parquet").stat().st_size < 10_000
    kept, rejected = _read_all(tmp_path, max_image_bytes=1_000_000)
    assert kept == [] and [k for k, _ in rejected] == ["d", "e"]
    assert all(r.startswith("image:too large (row group 0 of 2 rows") for _, r in rejected)
    with pytest.raises(SpecError, match="max_image_bytes"):
        DataSpec(path=str(tmp_path), max_image_bytes=0)


def test_wrong_typed_parquet_columns_are_named(tmp_path):
    pq.write_table(pa.table({"key": ["a"], "jpg": [7], "txt": ["x"]}), tmp_path / "a.parquet")
    with pytest.raises(SpecError, match=r"data.image_column.*'jpg'.*int64, not binary"):
        _read_all(tmp_path)
    (tmp_path / "a.parquet").unlink()
    pq.write_table(pa.table({"key": ["a"], "jpg": [_jpeg()], "txt": ["x"]}), tmp_path / "a.parquet")
    pq.write_table(pa.table({"key": ["b"], "jpg": [_jpeg()], "txt": [["x", "y"]]}), tmp_path / "b.parquet")
    kept, rejected = _read_all(tmp_path)  # the deciding shard is fine; the later one is rejected, named
    assert kept == ["a"]
    ((shard, reason),) = rejected
    assert shard == "b.parquet" and reason.startswith("shard:unreadable (")
    assert "'txt' of b.parquet has type list<element: string>, not string" in reason


# ---------------------------------------------------------------------------------------------- checkpoints


class _Payload:
    def __reduce__(self):
        return (open, (_Payload.marker, "w"))


def test_train_state_round_trips_and_a_pickle_with_code_is_refused(tmp_path):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    state = {"epoch": 2, "step": 7, "metrics": {"loss": np.float32(0.5), "seconds": 1.25}, "files": ["h"]}
    write_train_state({**state, "objects": {"optimizer": optimizer.state_dict()}}, tmp_path / "ok.pt")
    loaded = read_train_state(tmp_path / "ok.pt")
    assert loaded["metrics"] == {"loss": 0.5, "seconds": 1.25} and loaded["epoch"] == 2
    fresh = torch.optim.AdamW(model.parameters(), lr=0.1)
    fresh.load_state_dict(loaded["objects"]["optimizer"])
    torch.testing.assert_close(
        fresh.state_dict()["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"]
    )
    _Payload.marker = str(tmp_path / "pwned")
    (tmp_path / "evil.pt").write_bytes(pickle.dumps({"epoch": 0, "x": _Payload()}, protocol=2))
    with pytest.raises(RuntimeError, match="refusing checkpoint"):
        read_train_state(tmp_path / "evil.pt")
    assert not (tmp_path / "pwned").exists()


# ---------------------------------------------------------------------------------------------- keys


@pytest.mark.parametrize(
    "key", ["../evil", "a/../../b", "/etc/passwd", "a\0b", "", "a//b", "./a", "a\\..\\b"]
)
def test_unsafe_keys_never_become_tar_members(tmp_path, key):
    assert unsafe_key(key)
    with pytest.raises(ValueError, match="refusing WebDataset key"):
        write_webdataset_tar(tmp_path / "out.tar", [{"__key__": key.encode(), "txt": b"x"}])
    assert list(tmp_path.iterdir()) == []  # nothing published, no temporary left


def test_keys_with_ordinary_directories_are_kept(tmp_path):
    assert unsafe_key("dir/000123") is None
    write_webdataset_tar(tmp_path / "out.tar", [{"__key__": b"dir/000123", "txt": b"x"}])
    with tarfile.open(tmp_path / "out.tar") as tar:
        assert tar.getnames() == ["dir/000123.txt"]
