"""The job-submission path of docs/deploy.md, for real: `ray start --head` on loopback ports,
`ray job submit --working-dir . -- splitserve generate deploy/local.yaml ...`, then the head is
stopped through the `ray start --block` process this test started (never `ray stop`, which
would stop every Ray on the machine)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).parent / "ray")
HOST = "127.0.0.1"


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind((HOST, 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@pytest.fixture(scope="module")
def ray_head():
    """(dashboard address, env) of a 4-CPU Ray head on this machine."""
    if not Path(RAY).exists():
        pytest.skip("the ray CLI is not installed")
    gcs, dash, node_mgr, obj_mgr, client, agent, agent_grpc, runtime_env = _free_ports(8)
    temp_dir = tempfile.mkdtemp(prefix="rayjob", dir="/tmp")   # short: Ray's socket paths must fit 107 bytes
    # Ray >= 2.5x enables token auth on `ray start`; the CLI client must then send the token too.
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token",
           # jobs run with the head's PATH: it must find this environment's `splitserve`
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    log = open(Path(temp_dir) / "ray-start.log", "wb")
    head = subprocess.Popen(
        [RAY, "start", "--head", "--block", "--num-cpus", "4", "--node-ip-address", HOST, "--port", str(gcs),
         "--include-dashboard", "true", "--dashboard-host", HOST, "--dashboard-port", str(dash),
         "--node-manager-port", str(node_mgr), "--object-manager-port", str(obj_mgr),
         "--ray-client-server-port", str(client), "--dashboard-agent-listen-port", str(agent),
         "--dashboard-agent-grpc-port", str(agent_grpc), "--runtime-env-agent-port", str(runtime_env),
         "--temp-dir", temp_dir], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    address = f"http://{HOST}:{dash}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if head.poll() is not None:
                pytest.fail(f"ray start exited {head.returncode}: {(Path(temp_dir) / 'ray-start.log').read_text()[-3000:]}")
            try:
                urllib.request.urlopen(f"{address}/api/version", timeout=2)
                break
            except urllib.error.HTTPError:   # it answers (401 without the token): it is up
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail("the Ray dashboard (job API) did not come up in 120 s")
                time.sleep(1)
        yield address, env
    finally:
        head.send_signal(signal.SIGTERM)   # `ray start --block` stops the processes it started
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
            head.wait(timeout=30)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_job_submit_runs_splitserve_on_a_ray_cluster(ray_head):
    address, env = ray_head
    cmd = [RAY, "job", "submit", "--address", address, "--working-dir", ".", "--",
           "splitserve", "generate", "deploy/local.yaml", "--prompt", "hi", "--max-tokens", "4"]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-4000:]
    assert "succeeded" in out and "Connected to Ray cluster" in out, out[-4000:]
    # the job's output: the completion `splitserve generate` printed (4 tokens of text)
    lines = out.splitlines()
    entry = next(i for i, line in enumerate(lines) if "Running entrypoint for job" in line)
    printed = [line for line in lines[entry + 1:] if line.strip() and not line.lstrip().startswith(("20", "(", "\x1b"))
               and "INFO" not in line and "Job '" not in line]
    assert printed and len(printed[0].split()) >= 1, lines[entry:]
