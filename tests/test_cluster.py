"""Clusters without a cluster (marker ``cluster``): an existing ``ray start --head`` cluster with token
auth, a foreign Ray the local default must ignore, and placement on a multi-node cluster whose nodes
declare logical GPUs and accelerator types (``ray.cluster_utils.Cluster``). Compute falls back to the
CPU there (no GPU exists on this machine); what is tested is where things land and that nothing hangs.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from helpers import QUICKSTART, RecordNode, metric_history, quickstart_job

from specs import UserError

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


def _cli(args: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_ADDRESS")}
    return subprocess.run([MLOT, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _sets(tmp_path: Path, name: str, *extra: str) -> list[str]:
    out = []
    for s in (f"name={name}", f"output_dir={tmp_path}", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
              "train.steps=2", "train.warmup_steps=0", "train.checkpoint_every=2", "train.eval_every=2",
              "teachers.0.pretrain.steps=0", "data.limit=200", "train.batch_size=8", *extra):
        out += ["--set", s]
    return out


def test_distill_and_tune_join_an_existing_cluster_with_token_auth(tmp_path, ray_head):
    """No RAY_AUTH_MODE in the environment: mlot finds the token in ~/.ray/auth_token and sends it. The distill
    run is on-policy (ZeRO-2: each rank generates on its own): the student's samples, scored by the teacher."""
    from mlflow import MlflowClient

    addr = f"cluster.address={ray_head}"
    distill = _cli(["distill", str(QUICKSTART), *_sets(tmp_path, "joined", addr, "train.on_policy.fraction=1.0",
                                                        "train.on_policy.max_new_tokens=8")], tmp_path)
    assert distill.returncode == 0, distill.stdout[-3000:] + distill.stderr[-3000:]
    assert "student model" in distill.stdout
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    [run] = [r for r in client.search_runs([e.experiment_id for e in client.search_experiments()])
             if r.info.run_name == "joined"]
    history = lambda key: [m.value for m in client.get_metric_history(run.info.run_id, key)]  # noqa: E731
    assert history("train/on_policy_frac") == [1.0, 1.0] and all(0 < v <= 8 for v in history("train/generated_tokens"))

    space = tmp_path / "space.yaml"
    space.write_text("loss.params.top_k: {choice: [5, 20]}\nloss.params.sinkhorn_reg: {loguniform: [0.01, 1.0]}\n")
    tune = _cli(["tune", str(QUICKSTART), "--space", str(space), "--search", "optuna", "--num-samples", "2",
                 *_sets(tmp_path, "joined-sweep", addr)], tmp_path)
    assert tune.returncode == 0, tune.stdout[-3000:] + tune.stderr[-3000:]
    table = [line for line in tune.stdout.splitlines() if line.startswith("| ") and "completed" in line]
    assert len(table) == 2, tune.stdout[-3000:]
    from orchestrator.configuration import load_config
    best = load_config(tmp_path / "joined-sweep" / "best.yaml")  # an optuna sample, within the space
    assert best.loss.params["top_k"] in (5, 20) and 0.01 <= best.loss.params["sinkhorn_reg"] <= 1.0


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


# ---------------------------------------------------------------------------- heterogeneous placement


@pytest.fixture()
def hetero_cluster():
    """Three nodes in one process: a CPU head, a teacher node with 2 logical A100s, a student node with
    2 logical H100s (custom accelerator_type resources, as Ray declares real GPUs)."""
    import ray
    from ray.cluster_utils import Cluster
    ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    teacher = cluster.add_node(num_cpus=2, num_gpus=2, resources={"accelerator_type:A100": 1})
    student = cluster.add_node(num_cpus=3, num_gpus=2, resources={"accelerator_type:H100": 1})
    cluster.wait_for_nodes()
    yield cluster.address, teacher.node_id, student.node_id
    ray.shutdown()
    cluster.shutdown()


def test_teachers_and_students_land_on_their_accelerator_types(tmp_path, hetero_cluster):
    import ray

    from orchestrator.configuration import apply_overrides
    from orchestrator.driver import prepare_data, run_distill, start_teachers
    address, teacher_node, student_node = hetero_cluster
    job = quickstart_job(tmp_path, "hetero", f"cluster.address={address}", "teachers.0.replicas=2",
                         "teachers.0.resources.num_gpus=1", "teachers.0.resources.accelerator_type=A100",
                         "train.use_gpu=true", "train.accelerator_type=H100", "train.backend=gloo",
                         "train.num_workers=2", "student.dtype=bfloat16", "train.steps=2", "train.eval_every=null")
    data = prepare_data(job)
    from orchestrator.cluster import connect_ray
    connect_ray(job)
    teachers = start_teachers(job, data)
    infos = ray.get([a.info.remote() for a in teachers["teacher-sp"]])
    assert [i["node_id"] for i in infos] == [teacher_node, teacher_node]
    assert {i["dtype"] for i in infos} == {"float32"}  # no CUDA here: a teacher defaults to fp32 on the CPU

    nodes = tmp_path / "nodes.jsonl"
    s = run_distill(job, teachers=teachers, evaluate=False, callbacks=[RecordNode(str(nodes))])
    placed = [json.loads(line) for line in nodes.read_text().splitlines()]
    assert sorted({p["rank"] for p in placed}) == [0, 1] and {p["node"] for p in placed} == {student_node}
    assert all(v == v for _, v in metric_history(s, "train/loss"))  # bf16 (DeepSpeed mixed precision) trains

    # A request no node can ever satisfy fails at once, naming the resource, instead of a silent PENDING.
    t0 = time.time()
    with pytest.raises(UserError, match="accelerator_type:B200"):
        start_teachers(apply_overrides(job, ["teachers.0.resources.accelerator_type=B200"]), data)
    with pytest.raises(UserError, match=r"train .*'GPU': 1\.0"):
        run_distill(apply_overrides(job, ["train.num_workers=3"]), teachers=teachers, evaluate=False)
    assert time.time() - t0 < 60

    # A sweep on this cluster: its shared teachers take the A100s, its trial's workers the H100s.
    from orchestrator.tune import run_tune
    for actor in teachers["teacher-sp"]:
        ray.kill(actor)  # free the A100s for the sweep's own shared teachers
    space = tmp_path / "space.yaml"
    space.write_text("loss.params.top_k: {grid: [5]}\n")
    sweep = run_tune(apply_overrides(job, ["name=hetero-sweep", "train.eval_every=2"]), str(space))
    assert [row["status"] for row in sweep.table] == ["completed"]
