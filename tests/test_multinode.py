"""The example cluster job's shape, end to end on a real multi-node Ray cluster and real S3-compatible storage
(marker ``cluster``).

Three raylets started as separate processes, like ``cluster.yaml``'s nodes: a head with ``CPU: 0`` (the
driver of a submitted job runs there, nothing else fits), a "teacher" node with 2 logical A100s and a "student"
node with 2 logical H100s. Storage is a real S3 HTTP endpoint on loopback (moto's server mode), reached through
the standard ``AWS_ENDPOINT_URL`` / ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` variables. Jobs go through
``ray job submit``. Compute falls back to the CPU (no GPU exists here: the GPUs are logical, the placement is
real). Every process is stopped by its id.

The data source is a relative path that resolves only in the submitted driver's working directory (a file only
the head has): a sweep trial or a resumed job that opened it would fail.
"""

import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import S3_SECRET
from helpers import free_ports, stop, wait_listening

from orchestrator.configuration import dump_config, load_config

pytestmark = pytest.mark.cluster
REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
BUCKET = "mlot"  # made by conftest's s3 fixture
SECRET = S3_SECRET


@pytest.fixture(scope="module")
def cluster(s3):
    """``ray start --head`` (CPU 0) and two ``ray start --address`` nodes, token authentication on."""
    import ray
    ray.shutdown()
    temp = tempfile.mkdtemp(prefix="mlot-mn-", dir="/tmp")  # short: Ray's socket paths
    port, dashboard = free_ports(2)
    node_ports = free_ports(2 * 6, low=24000 + os.getpid() % 4000)  # the nodes' worker ports: 20000-23999
    # Token authentication with this cluster's own token: every raylet, job driver and CLI call sends it.
    token = Path(temp, "auth_token")
    token.write_text(secrets.token_hex(32))
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH") and k != "RAY_ADDRESS"}, **s3,
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
    common = ["--block", "--disable-usage-stats"]
    head = subprocess.Popen([str(BIN / "ray"), "start", "--head", *common, f"--port={port}", f"--temp-dir={temp}",
                             "--num-cpus=0", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}"],
                            env=env, cwd=temp, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    procs = [head]
    c = {"address": f"127.0.0.1:{port}", "dashboard": f"http://127.0.0.1:{dashboard}", "env": env}
    try:
        wait_listening(port, head, "ray start --head")
        for i, (gpus, kind, cpus) in enumerate(((2, "A100", 1), (2, "H100", 3))):
            # Two raylets on one host: each its own ports (Ray's fixed defaults would collide), one after the other.
            ports = [f"--{name}-port={node_ports[6 * i + j]}" for j, name in enumerate((
                "node-manager", "object-manager", "metrics-export", "dashboard-agent-listen",
                "dashboard-agent-grpc", "runtime-env-agent"))]
            workers = [f"--min-worker-port={20000 + 2000 * i}", f"--max-worker-port={21999 + 2000 * i}"]
            procs.append(subprocess.Popen(
                [str(BIN / "ray"), "start", *common, f"--address=127.0.0.1:{port}", f"--num-cpus={cpus}",
                 f"--num-gpus={gpus}", "--resources", json.dumps({f"accelerator_type:{kind}": 1}), *ports, *workers],
                env=env, cwd=temp, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True))
            wait_listening(dashboard, head, "the head's dashboard")
            deadline = time.time() + 120
            while len(nodes := _nodes(c)) < 2 + i:
                assert procs[-1].poll() is None, f"the {kind} node's ray start exited"
                assert time.time() < deadline, f"the {kind} node did not join: {nodes}"
                time.sleep(1)
        yield c
    finally:
        stop(procs)


def _ray_cli(c: dict, *args: str, timeout: int = 120) -> str:
    run = subprocess.run([str(BIN / "ray"), *args], env=c["env"], capture_output=True, text=True, timeout=timeout)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return run.stdout


_STATE = """
import dataclasses, json, sys
from ray.util import state
rows = getattr(state, "list_" + sys.argv[2])(address=sys.argv[1], limit=1000, detail=True,
                                            raise_on_missing_output=False)
print(json.dumps([dataclasses.asdict(r) for r in rows], default=str))
"""


def _state(c: dict, kind: str) -> list[dict]:
    """Ray's state API (``nodes``, ``actors``) of the cluster, asked from a separate process with its token."""
    run = subprocess.run([sys.executable, "-c", _STATE, c["dashboard"], kind], env=c["env"], capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def _nodes(c: dict) -> dict[str, str]:
    """node id -> role (head / A100 / H100) of the alive nodes."""
    roles = {}
    for n in _state(c, "nodes"):
        if n["state"] == "ALIVE":
            kinds = [k.split(":")[1] for k in n["resources_total"] if k.startswith("accelerator_type:")]
            roles[n["node_id"]] = kinds[0] if kinds else "head"
    return roles


def _submit(c: dict, workdir: Path, *mlot_args: str) -> str:
    """``ray job submit`` of an ``mlot`` command whose driver runs on the head, in ``workdir``; returns its id."""
    sid = f"mlot-{mlot_args[0]}-{time.time_ns()}"
    cmd = f"cd {workdir} && {sys.executable} -m orchestrator.cli " + " ".join(mlot_args)
    _ray_cli(c, "job", "submit", f"--address={c['dashboard']}", f"--submission-id={sid}", "--no-wait",
             "--", "bash", "-c", cmd)
    return sid


def _job(c: dict, sid: str, what: str = "") -> dict:
    """The job API (what ``ray job status`` / ``ray job logs`` ask), with the cluster's token."""
    import requests

    token = Path(c["env"]["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
    reply = requests.get(f"{c['dashboard']}/api/jobs/{sid}{what}", headers={"Authorization": f"Bearer {token}"},
                         timeout=30)
    reply.raise_for_status()
    return reply.json()


def _wait_job(c: dict, sid: str, timeout: float = 600) -> str:
    """The job's final status (or ``TIMEOUT``; ``timeout=0``: its status now, ``TIMEOUT`` while it runs)."""
    deadline = time.time() + timeout
    while True:
        status = _job(c, sid)["status"]
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            return status
        if time.time() >= deadline:
            return "TIMEOUT"
        time.sleep(1)


def _logs(c: dict, sid: str) -> str:
    return _job(c, sid, "/logs")["logs"]


@pytest.fixture(scope="module")
def job_dir(tmp_path_factory):
    """The driver's working directory: the job config and the data source (relative: only the driver sees it)."""
    from workers.data.tasks import load_rows

    d = tmp_path_factory.mktemp("head")
    rows = load_rows("builtin:quickstart", None, "train", {"prompt": "prompt", "answer": "answer"}, 300)
    (d / "train.jsonl").write_text("".join(json.dumps({"prompt": r["prompt"], "answer": r["answer"]}) + "\n"
                                           for r in rows))
    return d


def _config(job_dir: Path, name: str, *extra: str) -> Path:
    job = load_config(REPO / "orchestrator" / "configs" / "quickstart.yaml", [
        f"name={name}", f"output_dir=s3://{BUCKET}/runs", f"tracking.uri=sqlite:///{job_dir}/mlflow.db",
        "data.source=train.jsonl", "data.train_split=train", "teachers.0.pretrain.steps=0",
        "teachers.0.resources.num_gpus=1", "teachers.0.resources.accelerator_type=A100",
        "teachers.0.resources.num_cpus=0.5", "train.use_gpu=true", "train.accelerator_type=H100",
        "train.backend=gloo", "train.num_workers=2", "train.batch_size=8", "train.warmup_steps=0",
        "train.checkpoint_every=2", "train.eval_every=2", "eval.max_rows=0", "cluster.address=auto",
        f"cluster.runtime_env.env_vars.AWS_SECRET_ACCESS_KEY={SECRET}", *extra])
    path = job_dir / f"{name}.yaml"
    path.write_text(dump_config(job))
    return path


def _runs(job_dir: Path) -> list:
    from mlflow import MlflowClient
    client = MlflowClient(f"sqlite:///{job_dir}/mlflow.db")
    return client, client.search_runs([e.experiment_id for e in client.search_experiments()])


def test_a_sweep_runs_its_trials_on_worker_nodes_from_data_prepared_once(cluster, job_dir):
    """``mlot tune`` submitted to the head: the data is prepared there once (on S3), the shared teacher lands on
    the A100 node, both trials and their workers on the H100 node, and no trial opens the source."""
    space = job_dir / "space.yaml"
    space.write_text("loss.params.top_k: {choice: [5, 20]}\n")
    cfg = _config(job_dir, "mn-sweep", "train.steps=2", "train.num_workers=1")  # both trials fit the H100 node at once
    sid = _submit(cluster, job_dir, "tune", str(cfg), "--space", str(space), "--num-samples", "2",
                  "--search", "optuna")
    assert _wait_job(cluster, sid) == "SUCCEEDED", _logs(cluster, sid)[-4000:]
    logs = _logs(cluster, sid)
    assert len([line for line in logs.splitlines() if line.startswith("| ") and "completed" in line]) == 2, logs

    roles = _nodes(cluster)
    client, runs = _runs(job_dir)
    [parent] = [r for r in runs if r.data.tags.get("mlot.sweep") == "mn-sweep-sweep"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert roles[parent.data.tags["mlot.driver_node"]] == "head" and len(children) == 2
    assert "head" not in {roles[r.data.tags["mlot.driver_node"]] for r in children}  # not the driver's node
    actors = _state(cluster, "actors")
    placed = {(a["class_name"], roles.get(a["node_id"])) for a in actors}
    assert ("TeacherActor", "A100") in placed and ("RayTrainWorker", "H100") in placed
    assert not {role for cls, role in placed if cls == "RayTrainWorker"} - {"H100"}
    # the shared teacher's cache, and credentials hidden wherever the config is logged
    assert client.get_metric_history(parent.info.run_id, "teacher_cache/teacher-sp/hits")[-1].value > 0
    child = children[0]
    assert child.data.params["cluster.runtime_env.env_vars.AWS_SECRET_ACCESS_KEY"] == "***"
    config_text = Path(client.download_artifacts(child.info.run_id, "config.yaml", str(job_dir))).read_text()
    assert SECRET not in config_text and SECRET not in json.dumps(child.data.params)


def test_a_killed_driver_resumes_from_s3_logs_each_step_once_and_exports_a_loadable_student(cluster, job_dir):
    """``mlot distill`` submitted to the head, its driver SIGKILLed once step 3 is logged (checkpoints every 2
    steps), then ``--resume`` with the source moved away: the same MLflow run, every step once, replayed steps
    equal to their first losses, and the student exported to S3 loads with ``from_pretrained``."""
    import psutil

    from specs import storage

    # bf16 (fp32 master weights); a batching teacher replica that takes both of the A100 node's (logical) GPUs.
    cfg = _config(job_dir, "mn-distill", "train.steps=6", "student.dtype=bfloat16", "teachers.0.resources.num_gpus=2",
                  "teachers.0.serving.max_batch_tokens=2048")
    sid = _submit(cluster, job_dir, "distill", str(cfg))
    client, _ = _runs(job_dir)
    deadline = time.time() + 400
    while True:
        runs = [r for r in _runs(job_dir)[1] if r.info.run_name == "mn-distill"]
        if runs and len(client.get_metric_history(runs[0].info.run_id, "train/loss")) >= 3:
            break
        assert time.time() < deadline and _wait_job(cluster, sid, timeout=0) == "TIMEOUT", _logs(cluster, sid)[-3000:]
        time.sleep(0.5)
    [driver] = [p for p in psutil.process_iter(["cmdline"])
                if "orchestrator.cli" in (p.info["cmdline"] or []) and str(cfg) in (p.info["cmdline"] or [])]
    driver.send_signal(signal.SIGKILL)
    assert _wait_job(cluster, sid) in ("FAILED", "STOPPED")

    (job_dir / "train.jsonl").rename(job_dir / "moved.jsonl")  # a resumed job reads the run's prepared rows
    try:
        sid = _submit(cluster, job_dir, "distill", str(cfg), "--resume")
        assert _wait_job(cluster, sid) == "SUCCEEDED", _logs(cluster, sid)[-4000:]
    finally:
        (job_dir / "moved.jsonl").rename(job_dir / "train.jsonl")
    [run] = [r for r in _runs(job_dir)[1] if r.info.run_name == "mn-distill"]
    assert run.info.status == "FINISHED"
    for key in ("train/loss", "train/step_s"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == list(range(1, 7)), key
    rewound_to = int(run.data.tags["mlot.rewinds"])  # the checkpoint it resumed from
    assert rewound_to in (2, 4, 6)
    replays = client.get_metric_history(run.info.run_id, "train/replay_loss_diff")
    assert all(m.step > rewound_to and m.value <= 1e-5 for m in replays), replays

    from transformers import AutoModelForCausalLM
    export = f"s3://{BUCKET}/runs/mn-distill/final"
    with storage.local_copy(export) as local:
        model = AutoModelForCausalLM.from_pretrained(local)
    assert sum(p.numel() for p in model.parameters()) == int(run.data.params["student.params"])
    assert storage.exists(f"s3://{BUCKET}/runs/mn-distill/ray")  # the checkpoints went to S3 too
    roles = _nodes(cluster)
    teachers = [a for a in _state(cluster, "actors") if a["class_name"] == "BatchingTeacher"]
    assert teachers and {roles.get(a["node_id"]) for a in teachers} == {"A100"}
    assert {a["required_resources"].get("GPU") for a in teachers} == {2.0}


def test_a_request_no_node_can_hold_fails_at_once_naming_the_resource(cluster, job_dir):
    """Joining this cluster from outside (its address, its token): a teacher that asks for an accelerator no node
    has, and more workers than the student node holds, are refused before anything starts (exit 2, no hang)."""
    cfg = _config(job_dir, "mn-refused", "train.steps=2", f"cluster.address={cluster['address']}")
    for override, named in (("teachers.0.resources.accelerator_type=B200", "accelerator_type:B200"),
                            ("train.num_workers=3", "train (one worker")):
        run = subprocess.run([str(BIN / "mlot"), "distill", str(cfg), "--set", override], cwd=job_dir,
                             env=cluster["env"], capture_output=True, text=True, timeout=300)
        assert run.returncode == 2 and named in run.stderr, run.stdout[-2000:] + run.stderr[-2000:]
