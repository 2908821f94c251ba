"""Joining clusters (marker ``cluster``): an existing ``ray start --head`` cluster with token auth, a wrong token,
and a foreign Ray the local default must ignore. Placement by accelerator type on several nodes, and whole jobs
submitted to a multi-node cluster: tests/test_multinode.py.
"""

import os
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from helpers import QUICKSTART, free_ports, stop, wait_listening

pytestmark = pytest.mark.cluster
MLOT = str(Path(sys.executable).parent / "mlot")
RAY = str(Path(sys.executable).parent / "ray")


@pytest.fixture(scope="module")
def ray_head():
    """A real existing cluster: ``ray start --head --block`` in a subprocess with token auth on and its own token
    (in a file that RAY_AUTH_TOKEN_PATH names: whether ~/.ray/auth_token exists on this machine does not matter),
    its own temp dir; stopped by its process ids (never ``ray stop``, which would stop every Ray here). Yields the
    address and the token file."""
    import ray
    ray.shutdown()
    port, dashboard = free_ports(2)
    temp = tempfile.mkdtemp(prefix="mlot-head-", dir="/tmp")  # short: Ray's socket paths
    token = Path(temp, "auth_token")
    token.write_text(secrets.token_hex(32))
    env = {**_without_ray_settings(), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
    proc = subprocess.Popen([RAY, "start", "--head", "--block", f"--port={port}", f"--temp-dir={temp}",
                             "--num-cpus=4", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
                             "--disable-usage-stats"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_listening(port, proc, "ray start --head")
        yield f"127.0.0.1:{port}", token
    finally:
        stop([proc])


def _without_ray_settings() -> dict[str, str]:
    """This process's environment without Ray's address and auth settings (a user's shell, say)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH") and k != "RAY_ADDRESS"}


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
    """No RAY_AUTH_MODE in the environment: mlot finds the token where Ray looks (here RAY_AUTH_TOKEN_PATH) and
    sends it. (Whole jobs on an existing multi-node cluster, through the job API: tests/test_multinode.py.)"""
    address, token = ray_head
    env = {**_without_ray_settings(), "RAY_AUTH_TOKEN_PATH": str(token)}
    run = subprocess.run([sys.executable, "-c", _JOIN, str(QUICKSTART), address], env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    gcs, answer = run.stdout.split()[-2:]
    assert gcs.endswith(":" + address.rsplit(":", 1)[1]) and answer == "42"  # the head's GCS, a task ran there


def test_an_unreachable_address_fails_fast(tmp_path):
    """Nothing listens at ``cluster.address``: the CLI exits 2 at once (in this process, with no Ray of its own)."""
    import ray

    from orchestrator.cli import main
    ray.shutdown()  # an initialised Ray would be used as it is, whatever the address
    [port] = free_ports(1)
    t0 = time.time()
    code = main(["distill", str(QUICKSTART), "--set", f"output_dir={tmp_path}", "--set",
                 f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", "--set", f"cluster.address=127.0.0.1:{port}"])
    assert code == 2 and time.time() - t0 < 60


def test_local_default_never_joins_a_foreign_ray(ray_head, monkeypatch):
    """With RAY_ADDRESS pointing at another cluster (and that cluster running on this machine),
    ``cluster.address: null`` still starts its own fresh Ray, with the job's own CPU count."""
    import ray

    from orchestrator.cluster import connect_ray
    from orchestrator.configuration import load_config
    address, _ = ray_head
    monkeypatch.setenv("RAY_ADDRESS", address)
    try:
        connect_ray(load_config(QUICKSTART, ["cluster.num_cpus=3"]))
        assert not ray.get_runtime_context().gcs_address.endswith(":" + address.rsplit(":", 1)[1])
        assert ray.cluster_resources()["CPU"] == 3  # the foreign head declares 4
        assert ray.get(ray.remote(lambda: 1 + 1).remote()) == 2
    finally:
        ray.shutdown()


def test_a_wrong_token_is_a_clear_error(tmp_path, ray_head):
    """A wrong token: the CLI exits 2 and says how to get the right one (no traceback, no hang)."""
    bad = tmp_path / "token"
    bad.write_text("0" * 64)
    args = [MLOT, "distill", str(QUICKSTART), *_sets(tmp_path, "bad-token", f"cluster.address={ray_head[0]}")]
    run = subprocess.run(args, cwd=tmp_path, env={**_without_ray_settings(), "RAY_AUTH_TOKEN_PATH": str(bad)},
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 2, run.stdout[-2000:] + run.stderr[-2000:]
    assert "ray get-auth-token" in run.stderr and "Traceback" not in run.stderr
