"""One `splitserve serve deploy/local.yaml` per test module, on loopback, as a user runs it:
a subprocess with its own local Ray, torn down with SIGINT like Ctrl-C."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
SPLITSERVE = str(Path(sys.executable).parent / "splitserve")
HOST = "127.0.0.1"
START_TIMEOUT_S = 240.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


@dataclass
class Server:
    port: int
    log: Path
    metrics_port: int | None = None   # Ray's Prometheus exporter

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def request(self, method: str, path: str, body: Any = None, raw: bytes | None = None,
                timeout: float = 60.0) -> tuple[int, dict[str, str], Any]:
        """(status, headers, JSON body or text) of one request on a fresh connection."""
        conn = http.client.HTTPConnection(HOST, self.port, timeout=timeout)
        try:
            data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
            conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            text = resp.read().decode()
            try:
                payload: Any = json.loads(text)
            except ValueError:
                payload = text
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, payload
        finally:
            conn.close()

    def get(self, path: str) -> Any:
        status, _, body = self.request("GET", path)
        assert status == 200, (path, status, body)
        return body

    def wait_idle(self, timeout_s: float = 60.0) -> dict[str, dict[str, Any]]:
        """Instance stats once nothing is held (or the last stats seen when time runs out)."""
        deadline = time.monotonic() + timeout_s
        stats: dict[str, dict[str, Any]] = {}
        while time.monotonic() < deadline:
            stats = self.get("/instances")
            if self.get("/metrics")["inflight"] == 0 and all(is_idle(s) for s in stats.values()):
                break
            time.sleep(0.25)
        return stats


def is_idle(s: dict[str, Any]) -> bool:
    return (s["free_blocks"] == s["num_blocks"] and s.get("handoffs", 0) == 0 and s.get("reserved_blocks", 0) == 0
            and s["waiting"] == 0 and s["running"] == 0)


def start_server(config: str, log: Path, *extra: str) -> tuple[subprocess.Popen[bytes], Server]:
    port, metrics_port = free_port(), free_port()
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    with open(log, "wb") as out:
        proc = subprocess.Popen([SPLITSERVE, "serve", config, "--host", HOST, "--port", str(port),
                                 "--metrics-export-port", str(metrics_port), *extra],
                                cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env)
    server = Server(port, log, metrics_port)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"splitserve serve exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            if server.request("GET", "/health", timeout=5)[0] == 200:
                return proc, server
        except OSError:
            pass
        time.sleep(1.0)
    stop_server(proc)
    raise RuntimeError(f"splitserve serve not healthy after {START_TIMEOUT_S:.0f} s:\n{log.read_text()[-4000:]}")


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    """deploy/local.yaml behind `splitserve serve`, admitting 4 requests at once."""
    pytest.importorskip("ray.serve")
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    proc, srv = start_server("deploy/local.yaml", log, "--max-inflight", "4", "--retry-after", "1")
    yield srv
    stop_server(proc)
