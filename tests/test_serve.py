"""The online weighting endpoint: offline equality, authentication, limits, malformed requests, schemathesis.

One real server (`rebalance serve`, Ray Serve on a local Ray, bound to 127.0.0.1) runs for the module on a
copy of the demo run re-balanced over image_cluster x text_cluster x source with weight clipping, so
metadata marginals and the clip formula are checked against the offline run too.
"""

import base64
import contextlib
import io
import ipaddress
import json
import os
import re
import secrets
import shutil
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import requests
import yaml
from processes import free_port, http_ok, server_process

from rebalance.data.parts import read_parts

ROOT = Path(__file__).resolve().parents[1]
MAX_BODY = 4_000_000  # the test server's body limit (the default is 32 MiB)
MAX_BATCH = 256
_ENV = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0"}


def _vectors(table, column: str) -> np.ndarray:
    return np.stack(table.column(column).to_numpy(zero_copy_only=False)).astype(np.float32)


@pytest.fixture(scope="module")
def rebalanced_run(demo_run, tmp_path_factory):
    """The demo run, re-balanced offline with a metadata marginal (source) and max_weight (clipping): only
    the balance stage reruns (`rebalance balance`, on a fresh local Ray of its own)."""
    out = tmp_path_factory.mktemp("serve") / "run"
    shutil.copytree(demo_run, out)
    spec = yaml.safe_load((demo_run / "spec.yaml").read_text())
    # image x text clusters cannot both be uniform on this data (docs/downstream.md): relaxed, as the
    # spec's default does (exact, their factors diverge and a new row's weight can underflow to 0)
    spec["balance"].update(
        marginals=["image_cluster", "text_cluster", "source"], max_weight=6.0, relax="auto"
    )
    (out / "spec.yaml").write_text(yaml.safe_dump(spec))
    proc = subprocess.run(
        [sys.executable, "-m", "rebalance.cli", "-q", "balance", str(out / "spec.yaml"), "--out", str(out)],
        capture_output=True, text=True, timeout=300, env={**_ENV, "RAY_ADDRESS": "local"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    scaling = json.loads((out / "balance.json").read_text())["scaling"]
    assert scaling["clip"]["max_weight"] == 6.0 and scaling["clip"]["scale"] > 1
    return out


@pytest.fixture(scope="module")
def server(rebalanced_run, tmp_path_factory):
    """`rebalance serve` on 127.0.0.1 with a token file; stopped by SIGTERM (then its process group)."""
    token = secrets.token_hex(32)
    token_file = tmp_path_factory.mktemp("token") / "token"
    token_file.write_text(token)
    token_file.chmod(0o600)
    port = free_port()
    log = tmp_path_factory.mktemp("serve-log") / "serve.log"
    cmd = [
        sys.executable, "-m", "rebalance.cli", "serve", str(rebalanced_run), "--port", str(port),
        "--token-file", str(token_file), "--max-body-bytes", str(MAX_BODY), "--max-batch", str(MAX_BATCH),
        "--num-cpus", "1",
    ]  # fmt: skip
    # a Ray of its own, whatever else runs on this machine, with its Ray auth token file in a fresh place
    ray_token = tmp_path_factory.mktemp("ray-token") / "auth_token"
    env = {**_ENV, "RAY_ADDRESS": "local", "RAY_AUTH_TOKEN_PATH": str(ray_token)}
    env.pop("RAY_AUTH_TOKEN", None), env.pop("RAY_AUTH_MODE", None), env.pop("REBALANCE_SERVE_TOKEN", None)
    url = f"http://127.0.0.1:{port}"
    with server_process(cmd, log, env, http_ok(f"{url}/healthz"), 240, "server") as proc:
        yield {
            "url": url, "port": port, "token": token, "auth": {"Authorization": f"Bearer {token}"}, "log": log,
            "pgid": proc.pid, "ray_token": ray_token,
        }  # fmt: skip


def _weigh(server, body, headers=None, **kwargs) -> requests.Response:
    data = body if isinstance(body, bytes | str) or hasattr(body, "__next__") else json.dumps(body)
    headers = {"Content-Type": "application/json", **server["auth"], **(headers or {})}
    return requests.post(f"{server['url']}/v1/weigh", data=data, headers=headers, timeout=120, **kwargs)


# -- equality with the offline run ---------------------------------------------------------------------------


def test_weigher_reproduces_the_demo_runs_weights_in_process(demo_run):
    """All 3000 demo rows, embeddings in: clusters = assignments/, weights = weights/ (1e-12 relative)."""
    from rebalance.serve.weigher import Sample, Weigher

    weigher = Weigher(demo_run, load_model=False)
    emb, assigned, offline = (read_parts(demo_run / d) for d in ("embeddings", "assignments", "weights"))
    image, text = _vectors(emb, "image"), _vectors(emb, "text")
    samples = [
        Sample(key=k, image_embedding=a.tolist(), text_embedding=b.tolist())
        for k, a, b in zip(emb.column("key").to_pylist(), image, text, strict=True)
    ]
    results = [r for s in range(0, len(samples), 500) for r in weigher.weigh(samples[s : s + 500])]
    assert [r["key"] for r in results] == offline.column("key").to_pylist()
    for side in ("image", "text"):
        got = np.array([r["clusters"][f"{side}_cluster"] for r in results])
        np.testing.assert_array_equal(got, assigned.column(f"{side}_cluster").to_numpy())
        dist = np.array([r["distances"][side] for r in results])
        np.testing.assert_allclose(dist, assigned.column(f"{side}_distance").to_numpy(), atol=1e-5)
    weights = np.array([r["weight"] for r in results])
    np.testing.assert_allclose(weights, offline.column("weight").to_numpy(), rtol=1e-12, atol=0)


def test_embeddings_in_equal_offline_weights_with_metadata_and_clipping(server, rebalanced_run):
    """Every row of the re-balanced run over HTTP, in batches of 256: clusters, labels and clipped weights."""
    emb, assigned, offline = (
        read_parts(rebalanced_run / d) for d in ("embeddings", "assignments", "weights")
    )
    image, text = _vectors(emb, "image"), _vectors(emb, "text")
    keys, sources = emb.column("key").to_pylist(), emb.column("source").to_pylist()
    results = []
    for start in range(0, len(keys), MAX_BATCH):
        samples = [
            {
                "key": keys[i],
                "image_embedding": image[i].tolist(),
                "text_embedding": text[i].tolist(),
                "metadata": {"source": sources[i], "label": "ignored: not a marginal"},
            }
            for i in range(start, min(start + MAX_BATCH, len(keys)))
        ]
        response = _weigh(server, {"samples": samples})
        assert response.status_code == 200, response.text
        results += response.json()["results"]
    assert [r["key"] for r in results] == offline.column("key").to_pylist()
    for side in ("image", "text"):
        got = [r["clusters"][f"{side}_cluster"] for r in results]
        assert got == assigned.column(f"{side}_cluster").to_pylist()
    assert [r["labels"]["source"] for r in results] == offline.column("source").to_pylist()
    weights = np.array([r["weight"] for r in results])
    expected = offline.column("weight").to_numpy()
    np.testing.assert_allclose(weights, expected, rtol=1e-12, atol=0)
    assert (expected == 6.0).any(), "the clip must bind for some rows of this run"


def test_images_and_captions_in_equal_offline(server, rebalanced_run):
    """Raw inputs (base64 JPEG bytes, captions), embedded by the server with the run's model."""
    spec = yaml.safe_load((rebalanced_run / "spec.yaml").read_text())
    shard = sorted(Path(spec["data"]["path"]).glob("*.parquet"))[1]
    rows = pq.read_table(shard).slice(0, 64).to_pylist()
    samples = [
        {
            "key": r["key"],
            "image": base64.b64encode(r["jpg"]).decode(),
            "caption": r["txt"],
            "metadata": {"source": r["source"]},
        }
        for r in rows
    ]
    response = _weigh(server, {"samples": samples})
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assigned, offline = (read_parts(rebalanced_run / d) for d in ("assignments", "weights"))
    position = {k: i for i, k in enumerate(offline.column("key").to_pylist())}
    index = [position[r["key"]] for r in rows]
    for side in ("image", "text"):
        got = [r["clusters"][f"{side}_cluster"] for r in results]
        assert got == assigned.column(f"{side}_cluster").take(index).to_pylist()
        dist = np.array([r["distances"][side] for r in results])
        np.testing.assert_allclose(
            dist, assigned.column(f"{side}_distance").take(index).to_numpy(), rtol=1e-4, atol=1e-5
        )
    np.testing.assert_allclose(
        [r["weight"] for r in results], offline.column("weight").take(index).to_numpy(), rtol=1e-12, atol=0
    )


# -- authentication ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong-token"},
        {"Authorization": "Basic dXNlcjpwYXNz"},
        {"Authorization": "Bearer"},
    ],
    ids=["none", "wrong", "basic", "empty"],
)
def test_requests_without_the_right_token_get_401(server, headers):
    for method, path in (("post", "/v1/weigh"), ("get", "/v1/info"), ("get", "/nowhere")):
        response = requests.request(
            method, server["url"] + path, headers=headers, data=b'{"samples": []}', timeout=30
        )
        assert response.status_code == 401, (path, response.text)
        assert response.headers["WWW-Authenticate"] == "Bearer"
        assert "token" in response.json()["detail"] or "Authorization" in response.json()["detail"]
    # the token with another case or a prefix of it is wrong too
    for wrong in (server["token"].upper(), server["token"][:-1]):
        response = requests.get(
            f"{server['url']}/v1/info", headers={"Authorization": f"Bearer {wrong}"}, timeout=30
        )
        assert response.status_code == 401


def test_public_and_authorised_routes(server, rebalanced_run):
    assert requests.get(f"{server['url']}/healthz", timeout=30).json() == {"status": "ok"}
    doc = requests.get(f"{server['url']}/openapi.json", timeout=30).json()
    assert set(doc["paths"]) == {"/healthz", "/v1/info", "/v1/weigh"}
    assert doc["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    info = requests.get(f"{server['url']}/v1/info", headers=server["auth"], timeout=30).json()
    scaling = json.loads((rebalanced_run / "balance.json").read_text())["scaling"]
    assert info["marginals"] == ["image_cluster", "text_cluster", "source"]
    assert info["values"] == scaling["values"] and info["metadata_fields"] == ["source"]
    assert info["dim"] == 64 and info["accepts_raw_inputs"] is True
    assert info["limits"] == {
        "max_body_bytes": MAX_BODY, "max_batch": MAX_BATCH, "max_header_bytes": 16384, "max_headers": 64,
        "body_timeout_s": 30.0, "max_requests_per_client": 16,
    }  # fmt: skip


# -- limits and malformed requests ---------------------------------------------------------------------------


def _sample(**fields):
    base = {"image_embedding": [1.0] + [0.0] * 63, "text_embedding": [0.0, 1.0] + [0.0] * 62}
    base["metadata"] = {"source": "web"}
    base.update(fields)
    return {k: v for k, v in base.items() if v is not _DROP}


_DROP = object()


def test_oversized_bodies_get_413(server):
    big = b'{"samples": [' + b" " * (MAX_BODY + 10) + b"]}"
    response = _weigh(server, big)
    assert response.status_code == 413
    assert f"limit of {MAX_BODY} bytes" in response.json()["detail"]

    def chunks():  # no Content-Length: counted while reading
        yield b'{"samples": ['
        for _ in range(MAX_BODY // 65536 + 2):
            yield b" " * 65536
        yield b"]}"

    response = _weigh(server, chunks())
    assert response.status_code == 413
    assert "exceeds the limit" in response.json()["detail"]


def test_batch_limit(server):
    response = _weigh(server, {"samples": [_sample() for _ in range(MAX_BATCH + 1)]})
    assert response.status_code == 422
    assert f"at most {MAX_BATCH} items" in response.json()["detail"]
    assert _weigh(server, {"samples": [_sample() for _ in range(MAX_BATCH)]}).status_code == 200


def _png(size=(8, 8)) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 10, 10)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _eps() -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buffer, format="EPS")
    return base64.b64encode(buffer.getvalue()).decode()


def _png_header(width: int, height: int) -> str:
    """A tiny PNG that declares a huge image (a decompression-bomb shape): signature, IHDR, IEND."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return base64.b64encode(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")).decode()


MALFORMED = [
    ("not json", b"{bad json", 400, "not valid JSON"),
    ("empty body", b"", 4, ""),
    ("json array", b"[1, 2]", 422, "valid dictionary"),
    ("deeply nested", b"[" * 100_000 + b"]" * 100_000, 4, ""),
    ("not utf-8", b'{"samples": ["\xff\xfe"]}', 4, ""),
    ("no samples", {"samples": []}, 422, "at least 1 item"),
    ("unknown field", {"samples": [_sample(imagee=[1.0])]}, 422, "Extra inputs are not permitted"),
    ("wrong width", {"samples": [_sample(image_embedding=[1.0, 2.0])]}, 422, "at least 64 items"),
    ("string component", {"samples": [_sample(image_embedding=["x"] * 64)]}, 422, "valid number"),
    ("NaN component", b'{"samples": [{"image_embedding": [NaN' + b", 0" * 63 + b"]}]}", 422, "finite number"),
    ("zero vector", {"samples": [_sample(image_embedding=[0.0] * 64)]}, 422, "vector is zero"),
    ("overflowing vector", {"samples": [_sample(image_embedding=[1e300] * 64)]}, 422, "overflows"),
    ("embedding and image", {"samples": [_sample(image=_png())]}, 422, "not both"),
    (
        "bad base64",
        {"samples": [_sample(image_embedding=_DROP, image="@@not base64@@")]},
        422,
        "not valid base64",
    ),
    (
        "not an image",
        {"samples": [_sample(image_embedding=_DROP, image="aGVsbG8=")]},
        422,
        "image:unsupported format",
    ),
    (
        "EPS sent as an image",
        {"samples": [_sample(image_embedding=_DROP, image=_eps())]},
        422,
        "image:unsupported format",
    ),
    ("empty caption", {"samples": [_sample(text_embedding=_DROP, caption="  ")]}, 422, "empty caption"),
    ("missing side", {"samples": [_sample(text_embedding=_DROP)]}, 422, "need a caption or text_embedding"),
    ("missing metadata", {"samples": [_sample(metadata={})]}, 422, "missing field 'source'"),
    (
        "unseen source",
        {"samples": [_sample(metadata={"source": "tv"})]},
        422,
        "source value 'tv' was never seen",
    ),
    ("float metadata", {"samples": [_sample(metadata={"source": 1.5})]}, 422, "metadata.source"),
    (
        "huge image",
        {"samples": [_sample(image_embedding=_DROP, image=_png_header(5000, 5000))]},
        422,
        "too large",
    ),
    (
        "caption too long",
        {"samples": [_sample(text_embedding=_DROP, caption="x" * 9000)]},
        422,
        "at most 8192",
    ),
]


@pytest.mark.parametrize("body,status,reason", [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED])
def test_malformed_requests_get_4xx_with_a_reason(server, body, status, reason):
    response = _weigh(server, body)
    if status == 4:
        assert 400 <= response.status_code < 500, response.text
    else:
        assert response.status_code == status, response.text
    detail = response.json()["detail"]
    assert isinstance(detail, str) and detail
    assert reason in detail


def test_wrong_content_type_and_method(server):
    response = requests.post(
        f"{server['url']}/v1/weigh",
        data="samples",
        headers={**server["auth"], "Content-Type": "text/plain"},
        timeout=30,
    )
    assert 400 <= response.status_code < 500 and response.json()["detail"]
    response = requests.get(f"{server['url']}/v1/weigh", headers=server["auth"], timeout=30)
    assert response.status_code == 405


def test_a_valid_png_and_a_caption_are_weighed(server):
    sample = _sample(
        image_embedding=_DROP, text_embedding=_DROP, image=_png((40, 20)), caption="a red square"
    )
    response = _weigh(server, {"samples": [sample]})
    assert response.status_code == 200, response.text
    (result,) = response.json()["results"]
    assert set(result["clusters"]) == {"image_cluster", "text_cluster"} and result["weight"] > 0


# -- schemathesis --------------------------------------------------------------------------------------------


def test_schemathesis_finds_no_server_error(server):
    """Positive and negative cases of every operation (bounded), with the response conformance checks."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from schemathesis import GenerationMode
    from schemathesis.checks import (
        content_type_conformance,
        ignored_auth,
        negative_data_rejection,
        not_a_server_error,
        response_schema_conformance,
        status_code_conformance,
    )

    schema = schemathesis.openapi.from_url(f"{server['url']}/openapi.json", timeout=30)
    checks = [
        not_a_server_error,
        status_code_conformance,
        content_type_conformance,
        response_schema_conformance,
        negative_data_rejection,
        ignored_auth,
    ]
    calls = {"n": 0}
    started = time.monotonic()
    session = requests.Session()
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

        @given(case=schema.as_strategy(mode))
        @settings(
            max_examples=40,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
            derandomize=True,
        )
        def run(case):
            assert time.monotonic() - started < 120, "schemathesis run over its time bound"
            calls["n"] += 1
            case.call_and_validate(session=session, headers=server["auth"], checks=checks, timeout=30)

        run()
    assert calls["n"] >= 40
    errors = [line for line in server["log"].read_text().splitlines() if " 500 " in line and "POST /" in line]
    assert not errors, errors[:5]


# -- in-process: the scaling formula's edge cases, and refusing to start ------------------------------------


def _edit_scaling(run: Path, edit) -> None:
    balance = json.loads((run / "balance.json").read_text())
    edit(balance["scaling"])
    (run / "balance.json").write_text(json.dumps(balance))


def test_zero_target_labels_weigh_zero_and_unfitted_labels_are_refused(demo_copy):
    from rebalance.serve.weigher import RequestError, Sample, Weigher

    emb, assigned = read_parts(demo_copy / "embeddings"), read_parts(demo_copy / "assignments")
    rows = [0, 1, 2, 3]
    samples = [
        Sample(
            image_embedding=_vectors(emb, "image")[i].tolist(),
            text_embedding=_vectors(emb, "text")[i].tolist(),
        )
        for i in rows
    ]
    first = str(assigned.column("image_cluster")[0].as_py())
    before = [r["weight"] for r in Weigher(demo_copy, load_model=False).weigh(samples)]

    def zero_target(scaling):  # a label whose target is 0 has a null log factor
        scaling["log_factors"]["image_cluster"][scaling["values"]["image_cluster"].index(first)] = None

    _edit_scaling(demo_copy, zero_target)
    after = [r["weight"] for r in Weigher(demo_copy, load_model=False).weigh(samples)]
    for i, row in enumerate(rows):
        same = str(assigned.column("image_cluster")[row].as_py()) == first
        assert after[i] == (0.0 if same else before[i])

    def unfitted(scaling):  # a cluster the fitted balance never saw
        m = scaling["values"]["image_cluster"].index(first)
        del scaling["values"]["image_cluster"][m], scaling["log_factors"]["image_cluster"][m]

    _edit_scaling(demo_copy, unfitted)
    with pytest.raises(RequestError, match=f"image_cluster value '{first}' was never seen") as err:
        Weigher(demo_copy, load_model=False).weigh(samples)
    assert err.value.status == 422

    _edit_scaling(demo_copy, lambda scaling: scaling.clear())
    with pytest.raises(RuntimeError, match="no 'scaling'"):
        Weigher(demo_copy, load_model=False)


def test_serve_refuses_to_start_without_a_token_or_on_a_bad_run(demo_run, tmp_path, monkeypatch, capsys):
    from rebalance.cli import main

    monkeypatch.delenv("REBALANCE_SERVE_TOKEN", raising=False)
    assert main(["serve", str(demo_run)]) == 2
    assert "refusing to start without a token" in capsys.readouterr().err
    assert main(["serve", str(demo_run), "--no-auth", "--host", "0.0.0.0"]) == 2
    assert "loopback host only" in capsys.readouterr().err
    token_file = tmp_path / "token"
    token_file.write_text("short")
    token_file.chmod(0o600)
    assert main(["serve", str(demo_run), "--token-file", str(token_file)]) == 2
    assert "at least 16 characters" in capsys.readouterr().err
    token_file.write_text(secrets.token_hex(16))
    token_file.chmod(0o644)  # others may read it: refused, not warned
    assert main(["serve", str(demo_run), "--token-file", str(token_file)]) == 2
    assert "readable by others (mode 644): chmod 600" in capsys.readouterr().err
    token_file.chmod(0o600)
    monkeypatch.setenv("REBALANCE_SERVE_TOKEN", secrets.token_hex(16))  # never read, never passed on
    assert main(["serve", str(demo_run), "--token-file", str(token_file)]) == 2
    assert "REBALANCE_SERVE_TOKEN is not read" in capsys.readouterr().err
    monkeypatch.delenv("REBALANCE_SERVE_TOKEN")
    assert (
        main(["serve", str(tmp_path), "--token-file", str(token_file)]) == 1
    )  # checked before any Ray starts
    assert "not a run directory" in capsys.readouterr().err


# -- hardening: limits in the proxy, the token, the local Ray ------------------------------------------------


def _raw(server, head: bytes, body: bytes = b"", timeout: float = 30) -> tuple[int, bytes]:
    """Send one raw HTTP/1.1 request; (status, rest of the answer)."""
    with socket.create_connection(("127.0.0.1", server["port"]), timeout=timeout) as sock:
        sock.sendall(head + b"\r\n" + body)
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
        # the body may come in later packets than the head: read it to its Content-Length
        head_part, _, rest = answer.partition(b"\r\n\r\n")
        length = re.search(rb"(?im)^content-length:\s*(\d+)", head_part)
        while length is not None and len(rest) < int(length.group(1)):
            chunk = sock.recv(65536)
            if not chunk:
                break
            rest += chunk
            answer += chunk
    return int(answer.split(b" ")[1]), answer


def test_large_headers_and_a_repeated_authorization_are_refused_in_the_proxy(server):
    auth = f"Authorization: Bearer {server['token']}\r\n".encode()
    big = b"X-Filler: " + b"a" * 200_000 + b"\r\n"
    t0 = time.monotonic()
    status, answer = _raw(server, b"GET /v1/info HTTP/1.1\r\nHost: x\r\n" + auth + big)
    assert status == 431 and b"exceed the limit of 16384 bytes" in answer
    many = b"".join(f"X-H{i}: v\r\n".encode() for i in range(70))
    status, answer = _raw(server, b"GET /v1/info HTTP/1.1\r\nHost: x\r\n" + auth + many)
    assert status == 431 and b"72 header lines exceed the limit of 64" in answer  # with Host, Authorization
    status, answer = _raw(server, b"GET /v1/info HTTP/1.1\r\nHost: x\r\n" + auth + auth)
    assert status == 400 and b"more than one Authorization header" in answer
    wrong = b"Authorization: Bearer " + b"0" * 64 + b"\r\n"
    assert _raw(server, b"GET /v1/info HTTP/1.1\r\nHost: x\r\n" + wrong + auth)[0] == 400
    assert time.monotonic() - t0 < 60
    # the connection-level refusals leave the server serving
    assert requests.get(f"{server['url']}/v1/info", headers=server["auth"], timeout=30).status_code == 200


def test_slow_senders_do_not_starve_normal_requests(server):
    """10 authenticated connections sending a body one byte at a time hold no replica slot
    (max_ongoing_requests=8): 3 normal requests are answered meanwhile."""
    head = (
        f"POST /v1/weigh HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {server['token']}\r\n"
        "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
    ).encode()
    slow = [socket.create_connection(("127.0.0.1", server["port"]), timeout=30) for _ in range(10)]
    try:
        for sock in slow:
            sock.sendall(head + b"{")
        time.sleep(1.0)
        for sock in slow:
            sock.sendall(b" ")
        for _ in range(3):
            response = _weigh(server, {"samples": [_sample()]})
            assert response.status_code == 200, response.text
    finally:
        for sock in slow:
            sock.close()


def _server_processes(server):
    import psutil

    procs = []
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if os.getpgid(proc.pid) == server["pgid"]:
                procs.append(proc)
    return procs


def test_the_token_is_in_no_process_environment_and_ray_listens_on_loopback_only(server):
    import psutil

    procs = _server_processes(server)
    assert len(procs) >= 5, procs  # the CLI, GCS, raylet, agents, the proxy, the replica, ...
    listening = set()
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            environ = Path(f"/proc/{proc.pid}/environ").read_bytes()
            assert server["token"].encode() not in environ, proc.name()
            assert b"REBALANCE_SERVE_TOKEN" not in environ, proc.name()
            for conn in proc.net_connections(kind="inet"):
                if conn.status == psutil.CONN_LISTEN:
                    listening.add((proc.name(), conn.laddr.ip, conn.laddr.port))
    assert len(listening) >= 4, listening
    public = [entry for entry in listening if not ipaddress.ip_address(entry[1]).is_loopback]
    public = [e for e in public if not e[1].startswith("::ffff:127.")]
    assert public == [], public
    assert stat.S_IMODE(server["ray_token"].stat().st_mode) == 0o600  # created by serve, owner only
