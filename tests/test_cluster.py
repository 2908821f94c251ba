"""Joining clusters (marker ``cluster``): an existing ``ray start --head`` cluster with token auth, a wrong token,
and a foreign Ray the local default must ignore. Placement by accelerator type on several nodes, and whole jobs
submitted to a multi-node cluster: tests/test_multinode.py.
"""

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from helpers import QUICKSTART

pytestmark = pytest.mark.cluster
MLOT = str(Path(sys.executable).parent / "mlot")
RAY = str(Path(sys.executable).parent / "ray")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _descendants(pid: int) -> list[int]:
    import psutil
    try:
        return [p.pid for p in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


@pytest.fixture(scope="module")
def ray_head():
    """A real existing cluster: ``ray start --head --block`` in a subprocess, token auth on (Ray's default),
    its own temp dir; stopped by its process ids (never ``ray stop``, which would stop every Ray here)."""
    import ray
    ray.shutdown()
    port, temp = _free_port(), tempfile.mkdtemp(prefix="mlot-head-", dir="/tmp")  # short: Ray's socket paths
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_ADDRESS")}
    proc = subprocess.Popen([RAY, "start", "--head", "--block", f"--port={port}", f"--temp-dir={temp}",
                             "--num-cpus=4", "--dashboard-host=127.0.0.1", f"--dashboard-port={_free_port()}",
                             "--disable-usage-stats"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 180
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                break
        except OSError:
            assert proc.poll() is None, "ray start --head exited before it listened"
            assert time.time() < deadline, f"ray start --head did not listen on port {port} within 180 s"
            time.sleep(0.5)
    yield f"127.0.0.1:{port}"
    pids = [proc.pid, *_descendants(proc.pid)]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        if sig == signal.SIGTERM:
            time.sleep(3)
    proc.wait(timeout=60)


def _sets(tmp_path: Path, name: str, *extra: str) -> list[str]:
    out = []
    for s in (f"name={name}", f"output_dir={tmp_path}", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
              "train.steps=2", "train.warmup_steps=0", "train.checkpoint_every=2", "train.eval_every=2",
              "teachers.0.pretrain.steps=0", "data.limit=200", "train.batch_size=8", *extra):
        out += ["--set", s]
    return out


_JOIN = """
import sys
import ray
from orchestrator.cluster import connect_ray
from orchestrator.configuration import load_config
connect_ray(load_config(sys.argv[1], ["cluster.address=" + sys.argv[2]]))
print(ray.get_runtime_context().gcs_address, ray.get(ray.remote(lambda: 40 + 2).remote()))
"""


def test_a_job_joins_an_existing_cluster_with_the_token_where_ray_keeps_it(ray_head):
    """No RAY_AUTH_MODE in the environment: mlot finds the token in ~/.ray/auth_token and sends it. (Whole jobs on
    an existing multi-node cluster, submitted through the job API: tests/test_multinode.py.)"""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_ADDRESS")}
    run = subprocess.run([sys.executable, "-c", _JOIN, str(QUICKSTART), ray_head], env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert run.stdout.split() == [ray_head, "42"]


def test_local_default_never_joins_a_foreign_ray(ray_head, monkeypatch):
    """With RAY_ADDRESS pointing at another cluster (and that cluster running on this machine),
    ``cluster.address: null`` still starts its own fresh Ray, with the job's own CPU count."""
    import ray

    from orchestrator.cluster import connect_ray
    from orchestrator.configuration import load_config
    monkeypatch.setenv("RAY_ADDRESS", ray_head)
    try:
        connect_ray(load_config(QUICKSTART, ["cluster.num_cpus=3"]))
        assert not ray.get_runtime_context().gcs_address.endswith(":" + ray_head.rsplit(":", 1)[1])
        assert ray.cluster_resources()["CPU"] == 3  # the foreign head declares 4
        assert ray.get(ray.remote(lambda: 1 + 1).remote()) == 2
    finally:
        ray.shutdown()


def test_a_wrong_token_is_a_clear_error(tmp_path, ray_head):
    """A wrong token: the CLI exits 2 and says how to get the right one (no traceback, no hang)."""
    bad = tmp_path / "token"
    bad.write_text("0" * 64)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_ADDRESS")}
    args = [MLOT, "distill", str(QUICKSTART), *_sets(tmp_path, "bad-token", f"cluster.address={ray_head}")]
    run = subprocess.run(args, cwd=tmp_path, env={**env, "RAY_AUTH_TOKEN_PATH": str(bad)}, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 2, run.stdout[-2000:] + run.stderr[-2000:]
    assert "ray get-auth-token" in run.stderr and "Traceback" not in run.stderr
