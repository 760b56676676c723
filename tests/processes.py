"""Helpers for tests that run servers (a Ray head, the weighting endpoint, an S3 server) as processes."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import requests


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_ok(url: str, headers: dict[str, str] | None = None) -> Callable[[], bool]:
    """A readiness probe: GET ``url`` answers 200."""

    def probe() -> bool:
        with contextlib.suppress(requests.RequestException):
            return requests.get(url, headers=headers, timeout=5).status_code == 200
        return False

    return probe


@contextlib.contextmanager
def server_process(
    cmd: list[str], log: Path, env: dict[str, str], ready: Callable[[], bool], timeout: float, what: str
) -> Iterator[subprocess.Popen]:
    """Run ``cmd`` in a process group of its own (output to ``log``) until ``ready()``; on exit SIGTERM it,
    then SIGKILL whatever of its group is left (e.g. the Ray processes a server started)."""
    with log.open("w") as handle:
        proc = subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while not ready():
            assert proc.poll() is None, f"{what} exited {proc.returncode}:\n{log.read_text()[-4000:]}"
            assert time.monotonic() < deadline, f"{what} not up in {timeout} s:\n{log.read_text()[-4000:]}"
            time.sleep(0.5)
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=60)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=30)
