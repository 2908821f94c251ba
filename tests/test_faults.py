"""Faults a cluster job must survive, on a real local Ray cluster (marker ``faults``).

Each test asserts that no optimizer step is lost: the run ends at its last step, and its loss curve
matches an undisturbed run where the fault could change it. A training worker's death (the group restarts
from its checkpoint and replays the same losses) is tested under ZeRO-3 in tests/test_distill_integration.py,
a killed driver's ``--resume`` in tests/test_multinode.py, the first Ctrl-C (a checkpoint, then ``--resume``) in
tests/test_generate_eval.py's newcomer test.
"""

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers import PoisonLogits, metric_history, quickstart_job

pytestmark = pytest.mark.faults
REPO = Path(__file__).resolve().parents[1]


def test_consecutive_nonfinite_micro_batches_stop_the_run(tmp_path, local_ray):
    """NaN student logits in more than ``train.max_nonfinite_steps`` micro-batches in a row stop the run
    with a clear error (one such micro-batch is a counted skip: see the ZeRO-3 integration test)."""
    from orchestrator.driver import run_distill
    common = ("train.steps=4", "train.checkpoint_every=4", "train.eval_every=null", "train.max_nonfinite_steps=1",
              "loss.method=sft", "train.max_failures=0")  # the skip is the loop's, whatever the loss; no restart
    poison = PoisonLogits({2, 3})  # the micro-batches of steps 3 and 4
    with pytest.raises(Exception, match=r"2 consecutive non-finite micro-batches \(train.max_nonfinite_steps=1\)"):
        run_distill(quickstart_job(tmp_path, "nan-stop", *common), callbacks=[poison])


def test_a_teacher_replica_death_costs_one_retry_not_its_restart(tmp_path, local_ray):
    """One of two replicas is killed mid-run (a crash: Ray restarts it). Its requests go to the other one at once:
    every step trains on its own batch's payload, and no step waits as long as the dead replica takes to come
    back (measured here: the time until it answers again)."""
    import ray

    from orchestrator.driver import prepare_data, run_distill, start_teachers, stop_teachers
    job = quickstart_job(tmp_path, "teacher-dies", "train.steps=20", "train.checkpoint_every=20",
                         "train.eval_every=null", "teachers.0.replicas=2")
    data = prepare_data(job)
    teachers = start_teachers(job, data)
    victim, survivor = teachers["teacher-sp"]
    restart: dict[str, float] = {}

    def kill_when_busy() -> None:
        while ray.get(victim.info.remote())["forward_rows"] < 16 * 4:
            time.sleep(0.2)
        before = ray.get(victim.info.remote())["forward_rows"]
        t0 = time.monotonic()
        ray.kill(victim, no_restart=False)  # a crash: Ray restarts the actor (max_restarts)
        while True:  # until the replacement (which counts from 0) answers
            try:
                if ray.get(victim.info.remote(), timeout=120)["forward_rows"] < before:
                    break
            except ray.exceptions.RayActorError:
                time.sleep(0.1)
        restart["s"] = time.monotonic() - t0
    killer = threading.Thread(target=kill_when_busy, daemon=True)
    killer.start()
    try:
        s = run_distill(job, teachers=teachers, evaluate=False)
        killer.join(timeout=120)
        victim_rows, survivor_rows = (ray.get(a.info.remote())["forward_rows"] for a in (victim, survivor))
    finally:  # replicas a test starts, the test stops (run_distill stops only those it started)
        stop_teachers(teachers)
    # Every step trained, each on the payload of its own batch (the worker checks every batch id).
    assert [st for st, _ in metric_history(s, "train/loss")] == list(range(1, 21))
    waits = [v for _, v in metric_history(s, "train/teacher_wait_s")]
    assert restart["s"] > max(waits), (restart, max(waits))
    # The replacement started from scratch; the survivor took the dead one's share.
    assert victim_rows < survivor_rows


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _mlflow_server(db: Path, port: int, ready_s: float = 180.0) -> subprocess.Popen:
    """A real ``mlflow server`` on loopback, returned once it accepts connections (a generous bound:
    on a loaded 2-core machine its start-up alone can take a minute)."""
    proc = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri",
                             f"sqlite:///{db}", "--artifacts-destination", str(db.parent / "artifacts"),
                             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                            cwd=db.parent, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + ready_s
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return proc
        except OSError:
            time.sleep(0.5)
    _stop(proc)
    raise RuntimeError(f"mlflow server on port {port} did not accept connections within {ready_s:.0f}s")


def _stop(proc: subprocess.Popen) -> None:
    """Kill the server's process group; a server that is already gone is fine."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=60)


def test_tracking_server_outage_loses_no_metrics(tmp_path, local_ray):
    from mlflow import MlflowClient

    from orchestrator.driver import run_distill
    port, db = _free_port(), tmp_path / "server.db"
    servers = [_mlflow_server(db, port)]
    uri = f"http://127.0.0.1:{port}"
    job = quickstart_job(tmp_path, "outage", "train.steps=80", "train.checkpoint_every=80",
                         "train.eval_every=null", f"tracking.uri={uri}")
    phase = {"now": "waiting for 10 logged steps"}

    def outage() -> None:
        client = MlflowClient(uri)
        deadline = time.time() + 600
        while time.time() < deadline:  # wait until training metrics flow, then take the server away
            runs = (client.search_runs(client.search_experiments()[0].experiment_id)
                    if client.search_experiments() else [])
            if runs and len(client.get_metric_history(runs[0].info.run_id, "train/loss")) >= 10:
                break
            time.sleep(0.3)
        else:
            return
        phase["now"] = "server down"
        _stop(servers[0])
        time.sleep(4)
        phase["now"] = "restarting the server"
        servers.append(_mlflow_server(db, port))
        phase["now"] = "server back"
    t = threading.Thread(target=outage, daemon=True)
    t.start()
    try:
        s = run_distill(job, evaluate=False)
        t.join(timeout=300)
        assert phase["now"] == "server back", f"the outage thread did not finish; last phase: {phase['now']}"
        steps = [st for st, _ in metric_history(s, "train/loss")]
        assert sorted(steps) == list(range(1, 81))  # metrics logged during the outage arrived afterwards
        assert metric_history(s, "tracking/gap_steps")[0][1] > 0  # and the gap is reported
    finally:
        for proc in servers:
            _stop(proc)

