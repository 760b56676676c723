"""Remote storage against a real S3-compatible server (moto's server mode on loopback, no mocks of pyarrow):
atomic writes, every input format read from S3, the whole pipeline with data and run directory on S3
(compared with the same run on local disk), load_result / ``rebalance report`` on S3, resume after a
crash, and clear errors for bad locations."""

import io
import json
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import yaml
from processes import free_port
from shards import image_bytes, write_tar

import rebalance
from rebalance.cli import demo_spec
from rebalance.data import fs
from rebalance.data.atomic import atomic_open, atomic_write_bytes, atomic_write_table
from rebalance.data.parts import read_parts
from rebalance.data.readers import Shard, dataset_fingerprint, list_shards, read_shard, resolve_format
from rebalance.data.synthetic import generate_dataset
from rebalance.runtime.manifest import RunDir, check_run_dir
from rebalance.spec import DataSpec

ROOT = Path(__file__).resolve().parents[1]
REGION = "us-east-1"
# Fake credentials for the local test server, given to pyarrow the standard way (environment).
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing-secret"}
CLEARED = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_PROFILE",
    "AWS_SESSION_TOKEN",
    "AWS_DEFAULT_REGION",
)


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in CLEARED}
    return {**env, **CREDENTIALS, "AWS_EC2_METADATA_DISABLED": "true", "PYTHONPATH": str(ROOT), **extra}


@pytest.fixture(scope="module")
def aws_env():
    """Fake credentials for the test server, given the standard way (environment), and no other AWS
    settings of the machine (this fixture is module-scoped so that module-scoped fixtures have it too)."""
    with pytest.MonkeyPatch.context() as patch:
        for name in CLEARED:
            patch.delenv(name, raising=False)
        for name, value in {**CREDENTIALS, "AWS_EC2_METADATA_DISABLED": "true"}.items():
            patch.setenv(name, value)
        yield


@pytest.fixture(scope="module")
def s3_endpoint(aws_env):
    """A moto S3 server on a free loopback port, for this module."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError("moto server did not start") from None
            time.sleep(0.2)
    yield f"127.0.0.1:{port}"
    proc.terminate()
    proc.wait(timeout=20)


class Bucket:
    """A fresh bucket on the test server; ``uri(key)`` names an object or prefix with the endpoint options,
    ``s3`` is a plain pyarrow filesystem for looking at what is really stored."""

    def __init__(self, endpoint: str, name: str | None = None):
        self.endpoint = endpoint
        self.name = name or f"rb-{uuid.uuid4().hex[:12]}"
        self.query = f"endpoint_override={endpoint}&scheme=http&region={REGION}"
        # explicit keys: this filesystem is also pickled to Ray workers, whose environment (the Ray of an
        # earlier test may have started them) need not hold the test credentials
        self.s3 = pafs.S3FileSystem(
            access_key=CREDENTIALS["AWS_ACCESS_KEY_ID"],
            secret_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
            endpoint_override=endpoint,
            scheme="http",
            region=REGION,
            allow_bucket_creation=True,
        )
        self.s3.create_dir(self.name)

    def uri(self, key: str = "") -> str:
        return f"s3://{self.name}/{key}?{self.query}"

    def keys(self, prefix: str = "") -> list[str]:
        selector = pafs.FileSelector(
            f"{self.name}/{prefix}".rstrip("/"), recursive=True, allow_not_found=True
        )
        infos = self.s3.get_file_info(selector)
        return sorted(i.path.split("/", 1)[1] for i in infos if i.type == pafs.FileType.File)

    def read(self, key: str) -> bytes:
        with self.s3.open_input_stream(f"{self.name}/{key}") as handle:
            return handle.read()

    def write(self, key: str, data: bytes) -> None:
        with self.s3.open_output_stream(f"{self.name}/{key}") as handle:
            handle.write(data)

    def upload(self, local: Path, prefix: str) -> None:
        pafs.copy_files(
            str(local),
            f"{self.name}/{prefix}",
            source_filesystem=pafs.LocalFileSystem(),
            destination_filesystem=self.s3,
        )

    def mtime(self, key: str) -> int:
        return self.s3.get_file_info(f"{self.name}/{key}").mtime_ns


@pytest.fixture
def bucket(s3_endpoint) -> Bucket:
    return Bucket(s3_endpoint)


# ------------------------------------------------------------------------------------------ atomic writes


def test_failed_writes_leave_no_object(bucket):
    target = bucket.uri("run/part-00000.parquet")
    with pytest.raises(RuntimeError, match="writer died"), atomic_open(target) as handle:
        handle.write(b"PAR1 half a file")
        raise RuntimeError("writer died")
    # 20 MiB: pyarrow uploads it in several parts, and its stream would complete them on close.
    with pytest.raises(RuntimeError, match="writer died"), atomic_open(target) as handle:
        for _ in range(5):
            handle.write(os.urandom(4 << 20))
        raise RuntimeError("writer died")
    assert bucket.keys() == [], "a failed writer left an object (final or temporary)"
    # A failed overwrite keeps the old object whole; a successful write replaces it and leaves nothing else.
    atomic_write_bytes(b"old", bucket.uri("run/balance.json"))
    with pytest.raises(RuntimeError), atomic_open(bucket.uri("run/balance.json")) as handle:
        handle.write(b"new but incomplete")
        raise RuntimeError("writer died")
    assert bucket.read("run/balance.json") == b"old"
    table = pa.table({"key": [f"k{i}" for i in range(1000)], "weight": np.linspace(0.5, 1.5, 1000)})
    atomic_write_table(table, target)
    assert bucket.keys() == ["run/balance.json", "run/part-00000.parquet"]
    assert pq.read_table(io.BytesIO(bucket.read("run/part-00000.parquet"))).equals(table)


# ------------------------------------------------------------------------------------------ input formats


def _write_inputs(root: Path) -> None:
    """One small dataset of every input format under ``root``."""
    (root / "parquet" / "sub").mkdir(parents=True)
    # "sub/..." sorts before "sub-a..." by path components (as locally), after it as a plain string.
    for shard, name in enumerate(("00000.parquet", "sub/00001.parquet", "sub-a.parquet")):
        n = 5 + shard
        pq.write_table(
            pa.table(
                {
                    "key": [f"p{shard}-{j}" for j in range(n)],
                    "jpg": [image_bytes(j) for j in range(n)],
                    "txt": [f"caption {shard} {j}" for j in range(n)],
                    "status": ["success"] * (n - 1) + ["failed_to_download"],
                    "source": ["web"] * n,
                }
            ),
            root / "parquet" / name,
        )
    (root / "wds").mkdir()
    for shard in range(2):
        members = [
            (f"d/{shard}{j:03d}.{ext}", data)
            for j in range(4)
            for ext, data in (
                ("jpg", image_bytes(j)),
                ("txt", f"tar caption {j}".encode()),
                ("json", json.dumps({"source": f"s{j}"}).encode()),
            )
        ]
        write_tar(root / "wds" / f"{shard:05d}.tar", members)
    (root / "folder" / "cats").mkdir(parents=True)
    for j in range(3):
        (root / "folder" / "cats" / f"{j}.png").write_bytes(image_bytes(j))
        (root / "folder" / "cats" / f"{j}.txt").write_text(f"cat {j}")
    (root / "folder" / ".hidden.png").write_bytes(image_bytes(9))
    rng = np.random.default_rng(0)
    for side in ("img", "text"):
        (root / "laion" / f"{side}_emb").mkdir(parents=True)
        for number, n in ((0, 4), (1, 3)):
            np.save(root / "laion" / f"{side}_emb" / f"{side}_emb_{number}.npy", rng.normal(size=(n, 6)))
    (root / "laion" / "metadata").mkdir()
    for number, n in ((0, 4), (1, 3)):
        pq.write_table(
            pa.table({"key": [f"l{number}-{j}" for j in range(n)], "source": ["a"] * n}),
            root / "laion" / "metadata" / f"metadata_{number}.parquet",
        )


def _read_everything(path: str, carry: tuple[str, ...]):
    data = DataSpec(path=path, carry=carry)
    shards = list_shards(data)
    fmt, image_column, text_column = resolve_format(data, shards)
    rows = {}
    for shard in shards:
        for batch in read_shard(shard, data, fmt, image_column, text_column, 2):
            vectors = {s: getattr(batch, f"{s}_vectors") for s in ("image", "text")}
            for i, key in enumerate(batch.keys):
                rows[key] = (
                    batch.images[i] if batch.images is not None else None,
                    batch.texts[i] if batch.texts is not None else None,
                    {s: v[i].tolist() for s, v in vectors.items() if v is not None},
                    {c: batch.carried[c][i].as_py() for c in carry},
                )
            rows.update({k: r for k, r in batch.rejected})
    sizes = [f["size"] for f in dataset_fingerprint(shards)]
    return fmt, [(s.index, s.kind, s.label) for s in shards], rows, sizes


@pytest.mark.parametrize(
    ("name", "carry"),
    [("parquet", ("source",)), ("wds", ("source",)), ("folder", ()), ("laion", ("source",))],
)
def test_every_input_format_reads_the_same_from_s3(bucket, tmp_path, name, carry):
    _write_inputs(tmp_path)
    bucket.upload(tmp_path / name, f"data/{name}")
    local = _read_everything(str(tmp_path / name), carry)
    remote = _read_everything(bucket.uri(f"data/{name}"), carry)
    assert local[0] == remote[0]  # format
    assert local[1] == remote[1]  # shard order, kinds and labels (so keys and part numbers agree)
    assert local[2] == remote[2] and len(local[2]) >= 3  # every row: image bytes, caption, vectors, carried
    assert local[3] == remote[3]  # fingerprinted sizes


# ------------------------------------------------------------------------------------------ the pipeline


def _tiny_spec(data_path: str) -> dict:
    spec = demo_spec(data_path)
    spec["embed"]["batch_size"] = 128
    spec["cluster"] = {"image": {"k": 4}, "text": {"k": 4}, "niter": 10, "seed": 0}
    spec["ray"] = {"address": "local", "num_cpus": 2}
    return spec


def _cli(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "rebalance.cli", "-q", *args],
        capture_output=True,
        text=True,
        timeout=400,
        cwd=ROOT,
        env=_env(**env),
    )


def _weights_by_key(table: pa.Table) -> dict[str, float]:
    keys = table.column("key").to_pylist()
    assert len(keys) == len(set(keys)), "a key occurs twice"
    return dict(zip(keys, table.column("weight").to_pylist(), strict=True))


@pytest.fixture(scope="module")
def runs(s3_endpoint, tmp_path_factory, ray_local):
    """The tiny pipeline run twice: on local disk (in-process), and with data.path and --out on S3 (through
    the CLI, credentials from the environment)."""
    work = tmp_path_factory.mktemp("storage")
    info = generate_dataset(work / "dataset", n_rows=600, n_shards=3, seed=0)
    bucket = Bucket(s3_endpoint)
    bucket.upload(work / "dataset", "dataset")
    local_out = work / "run"
    rebalance.run(_tiny_spec(str(work / "dataset")), local_out)
    spec_path = work / "spec_s3.yaml"
    spec_path.write_text(yaml.safe_dump(_tiny_spec(bucket.uri("dataset"))))
    proc = _cli("run", str(spec_path), "--out", bucket.uri("run"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {
        "bucket": bucket,
        "local": local_out,
        "spec": spec_path,
        "rows": info["rows"],
        "stdout": proc.stdout,
    }


def test_pipeline_on_s3_matches_local_run(runs):
    bucket, local = runs["bucket"], runs["local"]
    assert f"run directory:          {bucket.uri('run')}" in runs["stdout"]
    keys = bucket.keys("run")
    for name in (
        "run/manifest.json",
        "run/clusters/image_centroids.npy",
        "run/clusters/clusters.json",
        "run/balance.json",
        "run/report/report.json",
        "run/report/report.html",
        "run/report/weights.png",
    ):
        assert name in keys, name
    for stage in ("embeddings", "assignments", "weights"):
        assert [k for k in keys if k.startswith(f"run/{stage}/")] == [
            f"run/{stage}/{name}-{i:05d}{s}"
            for name, s in (("_part", ".json"), ("part", ".parquet"))
            for i in range(3)
        ]
    assert not [k for k in keys if ".tmp-" in k], "temporary objects left behind"
    assert not (ROOT / "s3:").exists(), "a URI was used as a local path"
    manifest = json.loads(bucket.read("run/manifest.json"))
    assert [manifest["stages"][s]["status"] for s in ("embed", "cluster", "balance", "report")] == [
        "complete"
    ] * 4
    assert all(i["path"].startswith(f"s3://{bucket.name}/dataset/") for i in manifest["inputs"])
    assert "testing-secret" not in bucket.read("run/manifest.json").decode()
    remote = _weights_by_key(read_parts(bucket.uri("run/weights")))
    reference = _weights_by_key(read_parts(local / "weights"))
    assert len(remote) == runs["rows"] and remote.keys() == reference.keys()
    np.testing.assert_allclose([remote[k] for k in reference], list(reference.values()), rtol=1e-9)
    # Concept cards: thumbnails and captions were read back from the shards on S3, the same as locally.
    remote_concepts = json.loads(bucket.read("run/report/report.json"))["concepts"]
    local_concepts = json.loads((local / "report" / "report.json").read_text())["concepts"]
    assert remote_concepts["note"] is None and remote_concepts["columns"] == local_concepts["columns"]
    assert all(r["words"] for c in remote_concepts["columns"].values() for r in c["concepts"])
    assert bucket.read("run/report/report.html").count(b"data:image/webp") >= 4 * 4 * 8
    remote_emb = read_parts(bucket.uri("run/embeddings"))
    assert remote_emb.column("key").to_pylist() == read_parts(local / "embeddings").column("key").to_pylist()


def test_weighting_endpoint_and_samplers_read_a_run_on_s3(runs):
    from rebalance.samplers import load_run_weights
    from rebalance.serve.weigher import Sample, Weigher

    bucket, local = runs["bucket"], runs["local"]
    emb = read_parts(local / "embeddings")
    samples = [
        Sample(key=k, image_embedding=a, text_embedding=b)
        for k, a, b in zip(
            emb.column("key").to_pylist()[:50],
            emb.column("image").to_pylist()[:50],
            emb.column("text").to_pylist()[:50],
            strict=True,
        )
    ]
    remote = Weigher(bucket.uri("run"), load_model=False).weigh(samples)
    offline = _weights_by_key(read_parts(bucket.uri("run/weights")))
    assert [r["weight"] for r in remote] == pytest.approx([offline[s.key] for s in samples], rel=1e-9)
    here = Weigher(local, load_model=False).weigh(samples)
    assert [r["weight"] for r in remote] == pytest.approx([r["weight"] for r in here], rel=1e-9)
    # what training jobs read: the run's keys and weights (rebalance.samplers)
    keys, weights = load_run_weights(bucket.uri("run"))
    assert dict(zip(keys.tolist(), weights.tolist(), strict=True)) == pytest.approx(offline, rel=0)


def test_load_result_and_report_command_on_s3(runs):
    bucket, local = runs["bucket"], runs["local"]
    result = rebalance.load_result(bucket.uri("run"))
    reference = rebalance.load_result(local)
    assert isinstance(result.out, fs.StoragePath)
    assert {k: v for k, v in result.summary().items() if k != "run_dir"} == {
        k: v for k, v in reference.summary().items() if k != "run_dir"
    }
    assert _weights_by_key(result.weights) == pytest.approx(_weights_by_key(reference.weights), rel=1e-9)
    # `rebalance report` rebuilds report/ on S3; here the endpoint comes from AWS_ENDPOINT_URL, not the URI.
    bucket.s3.delete_dir_contents(f"{bucket.name}/run/report")
    proc = _cli(
        "report",
        f"s3://{bucket.name}/run",
        AWS_ENDPOINT_URL=f"http://{bucket.endpoint}",
        AWS_DEFAULT_REGION=REGION,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "effective sample size:" in proc.stdout
    keys = bucket.keys("run/report")
    assert {"run/report/report.json", "run/report/report.html", "run/report/weights.png"} <= set(keys)
    assert bucket.read("run/report/weights.png").startswith(b"\x89PNG")
    assert b"rebalance report" in bucket.read("run/report/report.html")
    rebuilt = json.loads(bucket.read("run/report/report.json"))
    assert rebuilt["balance"]["ess"] == pytest.approx(reference.report["balance"]["ess"], rel=1e-9)


def test_resume_on_s3_after_a_crash_mid_embed(runs):
    bucket = runs["bucket"]
    for key in bucket.keys("run"):
        bucket.s3.copy_file(f"{bucket.name}/{key}", f"{bucket.name}/resume/{key[len('run/') :]}")
    # The state a driver killed during the embed stage leaves: embed running, nothing after it, part 1's
    # Parquet object written but not its summary (the commit point), and a temporary object of a writer.
    manifest = json.loads(bucket.read("resume/manifest.json"))
    manifest["stages"]["embed"]["status"] = "running"
    for stage in ("cluster", "balance", "report"):
        manifest["stages"].pop(stage)
    bucket.write("resume/manifest.json", json.dumps(manifest).encode())
    bucket.s3.delete_file(f"{bucket.name}/resume/embeddings/_part-00001.json")
    bucket.write("resume/embeddings/part-00001.parquet", b"PAR1 torn")
    bucket.write("resume/embeddings/.part-00001.parquet.tmp-1-0123abcd", b"PAR1 torn")
    bucket.write("resume/.balance.json.tmp-1-0123abcd", b"{")
    kept = {i: bucket.mtime(f"resume/embeddings/part-{i:05d}.parquet") for i in (0, 2)}
    time.sleep(1.1)  # S3 modification times have 1 s resolution
    proc = _cli("run", str(runs["spec"]), "--out", bucket.uri("resume"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = rebalance.load_result(bucket.uri("resume"))
    assert result.manifest["stages"]["embed"]["resumed"] is True
    # the temporary objects of the killed writers are gone (docs/run-directory.md)
    assert not [k for k in bucket.keys("resume") if ".tmp-" in k]
    assert {i: bucket.mtime(f"resume/embeddings/part-{i:05d}.parquet") for i in (0, 2)} == kept
    assert bucket.read("resume/embeddings/part-00001.parquet").startswith(b"PAR1") and len(
        bucket.read("resume/embeddings/part-00001.parquet")
    ) > len(b"PAR1 torn")
    for stage in ("embeddings", "assignments"):
        keys = read_parts(bucket.uri(f"resume/{stage}"), columns=["key"]).column("key").to_pylist()
        assert len(keys) == len(set(keys)) == runs["rows"]
    weights = _weights_by_key(result.weights)
    reference = _weights_by_key(read_parts(runs["local"] / "weights"))
    assert weights.keys() == reference.keys()
    np.testing.assert_allclose([weights[k] for k in reference], list(reference.values()), rtol=1e-9)


def test_run_directory_checks_and_temporaries_on_s3(bucket):
    """A foreign prefix is refused as a run directory; when a stage starts, every temporary object of its
    outputs (and of the manifest) is deleted, nothing else (no Ray: the stage is not run)."""
    bucket.write("foreign/report/index.html", b"<html>")
    with pytest.raises(RuntimeError, match="holds no manifest.json"):
        check_run_dir(bucket.uri("foreign"))
    run = RunDir(bucket.uri("run"))
    run.begin("embed", "fp")
    temporaries = ["run/embeddings/.part-00001.parquet.tmp-1-0123abcd", "run/.manifest.json.tmp-7-89abcdef"]
    others = [
        "run/embeddings/part-00000.parquet",
        "run/embeddings/.notes.tmp-x",
        "run/.weights.tmp-1-0123abcd",
    ]
    for key in temporaries + others:
        bucket.write(key, b"x")
    run.fail("embed", "killed")
    RunDir(bucket.uri("run")).begin("embed", "fp")  # resumes
    assert [k for k in temporaries + others if k in bucket.keys("run")] == others
    check_run_dir(bucket.uri("run"))


# ------------------------------------------------------------------------------------------ errors


@pytest.mark.slow
def test_unsupported_scheme_missing_bucket_and_unreachable_endpoint_are_clear_errors(bucket, tmp_path):
    spec = _tiny_spec(str(tmp_path))
    with pytest.raises(fs.StorageError, match=r"unsupported storage URI ftp://host/"):
        rebalance.run(spec, "ftp://host/run")
    missing_uri = f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/run?{bucket.query}"
    with pytest.raises(
        fs.StorageError, match=r"run directory s3://no-such-bucket-\w+/run.*bucket .* does not exist"
    ):
        rebalance.load_result(missing_uri)
    with pytest.raises(fs.StorageError, match=r"data.path .* does not exist"):
        list_shards(DataSpec(path=missing_uri.replace("/run", "/data")))
    closed = f"s3://{bucket.name}/run?endpoint_override=127.0.0.1:{free_port()}&scheme=http&region={REGION}"
    start = time.monotonic()
    with pytest.raises(fs.StorageError, match=r"cannot reach the store: .*NETWORK_CONNECTION"):
        rebalance.run(spec, closed)
    assert time.monotonic() - start < 30
    with pytest.raises(fs.StorageError, match="unknown option"):
        fs.as_path(f"s3://{bucket.name}/run?endpont_override=x").exists()


def test_credentials_in_a_uri_are_refused_without_echoing_them(bucket):
    for uri in (
        f"s3://AKIAEXAMPLE:hunter2secret@{bucket.name}/run?{bucket.query}",
        f"s3://{bucket.name}/run?{bucket.query}&access_key=AKIAEXAMPLE&secret_key=hunter2secret",
    ):
        with pytest.raises(fs.StorageError, match="credentials in a URI are not accepted") as err:
            rebalance.load_result(uri)
        assert "hunter2secret" not in str(err.value) and "AKIAEXAMPLE" not in str(err.value)


def test_credentials_in_an_endpoint_override_are_refused_without_echoing_them():
    """The check covers user:password@ inside endpoint_override, raw or percent-encoded (parsed only)."""
    for endpoint in ("AKIAEXAMPLE:hunter2secret@127.0.0.1:9", "AKIAEXAMPLE%3Ahunter2secret%40127.0.0.1%3A9"):
        with pytest.raises(
            fs.StorageError, match=r"credentials in a URI are not accepted \(\['endpoint_override'\]"
        ):
            fs.as_path(f"s3://bucket/run?endpoint_override={endpoint}&scheme=http")
        with pytest.raises(fs.StorageError) as err:
            fs.as_path(f"s3://bucket/run?endpoint_override={endpoint}")
        assert "hunter2secret" not in str(err.value) and "AKIAEXAMPLE" not in str(err.value)
    # an endpoint without credentials parses
    assert fs.as_path("s3://bucket/run?endpoint_override=127.0.0.1:9&scheme=http").key == "run"


@pytest.mark.slow
def test_cli_reports_a_missing_bucket_without_a_traceback(bucket, tmp_path):
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(_tiny_spec(str(tmp_path))))
    proc = _cli("run", str(spec_path), "--out", f"s3://no-such-bucket-cli/run?{bucket.query}")
    assert proc.returncode == 1
    assert "rebalance: error: run directory s3://no-such-bucket-cli/run" in proc.stderr
    assert "does not exist" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_a_store_failure_while_reading_fails_instead_of_marking_the_shard_unreadable(bucket):
    port = free_port()  # nothing listens there
    path = f"s3://{bucket.name}/data/00000.parquet?endpoint_override=127.0.0.1:{port}&scheme=http&region={REGION}"
    data = DataSpec(path=path)
    with pytest.raises(fs.StorageError, match="NETWORK_CONNECTION"):
        list(read_shard(Shard(0, path), data, "parquet", "jpg", "txt", 16))


def test_per_row_directories_on_s3_read_as_one_table(bucket, ray_local):
    # The part summaries (_part-NNNNN.json) sit beside the Parquet parts on the store too, and Arrow-based
    # readers skip them: pyarrow.dataset, pandas and Ray Data read the prefix as one table.
    import pandas as pd
    import pyarrow.dataset as pads
    import ray

    from rebalance.data.parts import write_part

    tables = [
        pa.table({"key": [f"k{i}{j}" for j in range(n)], "weight": np.arange(n, dtype=np.float64)})
        for i, n in enumerate((3, 2))
    ]
    for index, table in enumerate(tables):
        write_part(bucket.uri("run/weights"), index, table, {})
    assert bucket.keys("run/weights") == [
        "run/weights/_part-00000.json", "run/weights/_part-00001.json",
        "run/weights/part-00000.parquet", "run/weights/part-00001.parquet",
    ]  # fmt: skip
    expected = pa.concat_tables(tables)
    path = f"{bucket.name}/run/weights"
    assert pads.dataset(path, filesystem=bucket.s3, format="parquet").to_table().equals(expected)
    frame = pd.read_parquet(path, filesystem=bucket.s3)
    assert frame["key"].tolist() == expected.column("key").to_pylist()
    refs = ray.data.read_parquet(path, filesystem=bucket.s3).to_arrow_refs()
    got = pa.concat_tables(ray.get(refs)).select(["key", "weight"]).sort_by("key")
    assert got.equals(expected.sort_by("key"))
    assert read_parts(bucket.uri("run/weights")).equals(expected)
