"""Latency and throughput of `rebalance serve` on loopback: embeddings-in and images-in, batches of 1 and 64.

    .venv/bin/python benchmarks/serve.py --run runs/demo              # `make demo` makes runs/demo

Starts the endpoint (Ray Serve on a local Ray, 127.0.0.1, a fresh token), then for each scenario sends a
bounded loop of requests (at most --requests, and at most --seconds per scenario) from --concurrency
clients, and prints requests/s, samples/s and the p50/p99 latency. Every answer must be 200. The server is
stopped at the end, also on errors.

    .venv/bin/python benchmarks/serve.py --run runs/demo --under-attack --batches 1 --kinds embeddings

With --under-attack, every scenario runs twice in the same server: quiet, then while --slow-senders
connections each send an authenticated request body one byte every 2 s (the server's --body-timeout-s cuts
them off: 408) and --large-header-clients send requests with a 1 MB header in a loop (refused: 431). The
normal requests must still all be answered 200; their p50/p99 are printed for both runs, and what the
attackers got is counted.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import secrets
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import requests

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(
    run_dir: Path, port: int, token_file: Path, num_cpus: float, log: Path, body_timeout_s: float
) -> subprocess.Popen:
    cmd = [
        sys.executable, "-m", "rebalance.cli", "serve", str(run_dir), "--port", str(port),
        "--token-file", str(token_file), "--num-cpus", str(num_cpus), "--body-timeout-s", str(body_timeout_s),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    with log.open("w") as handle:
        proc = subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        with contextlib.suppress(requests.RequestException):
            if requests.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 200:
                return proc
        time.sleep(0.5)
    _stop(proc)
    raise RuntimeError("server did not come up in 300 s")


def _stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=60)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # the local Ray the server started is in its process group


def _payloads(run_dir: Path, info: dict, batch: int, kind: str) -> list[bytes]:
    """Request bodies of ``batch`` samples each, cycling through the run's rows."""
    manifest = json.loads((run_dir / "manifest.json").read_text())
    metadata_fields = info["metadata_fields"]
    if kind == "embeddings":
        table = pq.read_table(sorted((run_dir / "embeddings").glob("part-*.parquet"))[0])
        rows = []
        for i in range(table.num_rows):
            sample = {"key": table.column("key")[i].as_py()}
            for side in info["sides"]:
                sample[f"{side}_embedding"] = np.asarray(
                    table.column(side)[i].as_py(), dtype=np.float32
                ).tolist()
            sample["metadata"] = {m: table.column(m)[i].as_py() for m in metadata_fields}
            rows.append(sample)
    else:
        shard = sorted(Path(manifest["spec"]["data"]["path"]).glob("**/*.parquet"))[0]
        table = pq.read_table(shard).slice(0, 512)
        rows = [
            {
                "key": r["key"],
                "image": base64.b64encode(r["jpg"]).decode(),
                "caption": r["txt"],
                "metadata": {m: r.get(m) for m in metadata_fields},
            }
            for r in table.to_pylist()
        ]
    bodies = []
    for start in range(0, 16 * batch, batch):
        chunk = [rows[(start + j) % len(rows)] for j in range(batch)]
        bodies.append(json.dumps({"samples": chunk}).encode())
    return bodies


def _scenario(
    url: str, headers: dict, bodies: list[bytes], requests_max: int, seconds: float, concurrency: int
):
    latencies: list[float] = []
    lock = threading.Lock()
    count = {"sent": 0}
    failures: list[str] = []
    stop_at = time.monotonic() + seconds

    def client():
        session = requests.Session()
        while True:
            with lock:
                if count["sent"] >= requests_max or time.monotonic() >= stop_at or failures:
                    return
                i = count["sent"]
                count["sent"] += 1
            t0 = time.perf_counter()
            response = session.post(
                f"{url}/v1/weigh", data=bodies[i % len(bodies)], headers=headers, timeout=60
            )
            elapsed = time.perf_counter() - t0
            with lock:
                if response.status_code != 200:
                    failures.append(f"{response.status_code}: {response.text[:300]}")
                latencies.append(elapsed)

    session = requests.Session()
    for body in bodies[:3]:  # warm-up
        response = session.post(f"{url}/v1/weigh", data=body, headers=headers, timeout=120)
        if response.status_code != 200:
            raise RuntimeError(f"warm-up request failed {response.status_code}: {response.text[:300]}")
    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    if failures:
        raise RuntimeError(f"{len(failures)} failed requests, first: {failures[0]}")
    lat = np.array(latencies) * 1000
    return {
        "requests": len(lat),
        "wall_s": wall,
        "p50_ms": np.percentile(lat, 50),
        "p99_ms": np.percentile(lat, 99),
    }


def _status(sock: socket.socket) -> str:
    """The status code of the answer on ``sock`` (or why there is none)."""
    try:
        head = sock.recv(64)
    except OSError as err:
        return type(err).__name__
    return head.split(b" ")[1].decode() if head.startswith(b"HTTP/1.1 ") else "closed"


class _Attack:
    """Slow senders and large-header clients against 127.0.0.1:``port``, until :meth:`stop`; bounded: each
    slow sender sends at most 1000 bytes, each large-header client at most 10,000 requests."""

    def __init__(self, port: int, token: str, slow: int, large: int):
        self.port, self.token, self.done = port, token, threading.Event()
        self.outcomes: dict[str, dict[str, int]] = {"slow sender": {}, "1 MB header": {}}
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._slow) for _ in range(slow)]
        self.threads += [threading.Thread(target=self._large) for _ in range(large)]

    def _count(self, kind: str, outcome: str) -> None:
        with self.lock:
            self.outcomes[kind][outcome] = self.outcomes[kind].get(outcome, 0) + 1

    def _slow(self) -> None:
        while not self.done.is_set():
            with socket.create_connection(("127.0.0.1", self.port), timeout=60) as sock:
                head = (
                    f"POST /v1/weigh HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {self.token}\r\n"
                    "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
                )
                with contextlib.suppress(OSError):
                    sock.sendall(head.encode())
                    for _ in range(1000):  # one byte every 2 s, until the server answers or we stop
                        if self.done.wait(2.0):
                            return
                        if select.select([sock], [], [], 0)[0]:
                            break
                        sock.sendall(b" ")
                self._count("slow sender", _status(sock))

    def _large(self) -> None:
        header = b"X-Filler: " + b"a" * (1 << 20) + b"\r\n"
        for _ in range(10_000):
            if self.done.is_set():
                return
            with socket.create_connection(("127.0.0.1", self.port), timeout=60) as sock:
                with contextlib.suppress(OSError):
                    sock.sendall(b"GET /v1/info HTTP/1.1\r\nHost: x\r\n" + header + b"\r\n")
                self._count("1 MB header", _status(sock))

    def __enter__(self) -> _Attack:
        for t in self.threads:
            t.start()
        time.sleep(3.0)  # the slow senders are mid-body when the measured requests start
        return self

    def __exit__(self, *exc) -> None:
        self.done.set()
        for t in self.threads:
            t.join()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run", default=str(ROOT / "runs" / "demo"), help="a finished run directory")
    parser.add_argument("--requests", type=int, default=300, help="requests per scenario at most")
    parser.add_argument("--seconds", type=float, default=20.0, help="seconds per scenario at most")
    parser.add_argument("--concurrency", type=int, default=1, help="clients sending at once")
    parser.add_argument("--num-cpus", type=float, default=1.0, help="CPUs of the server's replica")
    parser.add_argument("--batches", default="1,64")
    parser.add_argument("--kinds", default="embeddings,images", help="inputs: embeddings, images or both")
    parser.add_argument("--under-attack", action="store_true", help="also measure under slow senders etc.")
    parser.add_argument("--slow-senders", type=int, default=10, help="with --under-attack")
    parser.add_argument("--large-header-clients", type=int, default=2, help="with --under-attack")
    parser.add_argument("--body-timeout-s", type=float, default=10.0, help="the server's --body-timeout-s")
    args = parser.parse_args(argv)
    run_dir = Path(args.run).resolve()
    if not (run_dir / "balance.json").is_file():
        parser.error(f"{run_dir} is not a finished run (make demo creates runs/demo)")
    with tempfile.TemporaryDirectory(prefix="rb-serve-bench-") as tmp:
        token_file = Path(tmp) / "token"
        token = secrets.token_hex(32)
        token_file.write_text(token)
        token_file.chmod(0o600)
        port = _free_port()
        t0 = time.perf_counter()
        proc = _start(run_dir, port, token_file, args.num_cpus, Path(tmp) / "serve.log", args.body_timeout_s)
        print(f"server up in {time.perf_counter() - t0:.1f} s (Ray Serve, 1 replica, {args.num_cpus:g} CPU)")
        try:
            url = f"http://127.0.0.1:{port}"
            headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
            info = requests.get(f"{url}/v1/info", headers=headers, timeout=30).json()
            print(
                f"run {run_dir.name}: d={info['dim']}, k={info['k']}, marginals={info['marginals']}, "
                f"model={info['model']}; concurrency {args.concurrency}, at most {args.requests} requests or "
                f"{args.seconds:g} s per scenario"
            )
            print(
                f"{'input':<12}{'batch':>6}{'load':>8}{'requests':>10}{'req/s':>9}{'samples/s':>11}"
                f"{'p50 ms':>9}{'p99 ms':>9}"
            )
            for kind in args.kinds.split(","):
                for batch in (int(b) for b in args.batches.split(",")):
                    bodies = _payloads(run_dir, info, batch, kind)
                    loads = ("quiet", "attack") if args.under_attack else ("quiet",)
                    for load in loads:
                        attack = _Attack(port, token, args.slow_senders, args.large_header_clients)
                        with attack if load == "attack" else contextlib.nullcontext():
                            r = _scenario(url, headers, bodies, args.requests, args.seconds, args.concurrency)
                        rate = r["requests"] / r["wall_s"]
                        print(
                            f"{kind:<12}{batch:>6}{load:>8}{r['requests']:>10}{rate:>9.1f}{rate * batch:>11.0f}"
                            f"{r['p50_ms']:>9.1f}{r['p99_ms']:>9.1f}",
                            flush=True,
                        )
                        if load == "attack":
                            print(f"{'':<18}attackers got: {attack.outcomes}", flush=True)
        finally:
            _stop(proc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
