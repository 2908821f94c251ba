"""Shared test setup: offline HF, quiet Ray, one local Ray for the in-process jobs, locations of ../shared material."""

import os
import time
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "30")
# Ray Train's controller polls its workers every 2 s by default: a finished or failed worker group is noticed up to
# that late, once per job. The tests' jobs last seconds; poll them more often (every Ray the tests start inherits it).
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
# Ray Train starts a preemption watcher (one more actor process, ~3 s of CPU) with every worker group: it watches for
# a cloud node's drain notice, which a machine running the tests never gets.
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MLOT_SHARED", REPO.parent / "shared"))
VECTORS = SHARED / "vectors" / "reference"
QED = SHARED / "data" / "qed" / "validation.jsonl"
S3_SECRET = "mlot-test-secret-do-not-log"  # what the S3 server's key is: tests check it is never logged


@pytest.fixture(scope="session")
def vector_files() -> list[Path]:
    files = sorted(VECTORS.glob("*.npz"))
    if not files:
        pytest.skip(f"reference vectors not found under {VECTORS} (set MLOT_SHARED to the shared/ folder)")
    return files


@pytest.fixture(scope="session")
def s3():
    """A real S3 HTTP server on loopback (moto's server mode) with one bucket, ``mlot``: the standard AWS
    variables point this process (and every Ray started after it, which inherits them) at it. Stopped by its id.
    Returns those variables."""
    import subprocess
    import sys

    import boto3
    from helpers import free_ports, stop, wait_listening

    [port] = free_ports(1)
    proc = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    wait_listening(port, proc, "moto_server", timeout=60)
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "mlot-test-key",
           "AWS_SECRET_ACCESS_KEY": S3_SECRET, "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    boto3.client("s3").create_bucket(Bucket="mlot")
    yield env
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    stop([proc])


def pytest_collection_modifyitems(config, items):
    """Modules that start clusters of their own (marker ``cluster``: an existing head, several nodes) run last, so
    that every other module's in-process jobs share one local Ray (``local_ray``), started once for the suite."""
    items.sort(key=lambda item: item.get_closest_marker("cluster") is not None)


def _alive_actors() -> dict[str, str]:
    """Alive actors by id (class names): Ray's own (``_``-prefixed: Ray Data's coordinator lives as long as Ray)
    are not a module's."""
    from ray.util.state import list_actors
    alive = list_actors(filters=[("state", "=", "ALIVE")], limit=10_000)
    return {a.actor_id: a.class_name for a in alive if not a.class_name.startswith("_")}


@pytest.fixture(scope="session")
def _suite_ray(s3):
    """The address of the suite's local Ray, once started (after the S3 server: its workers inherit the AWS
    variables). Shut down at the end of the session."""
    state = {"gcs": None}
    yield state
    import ray
    ray.shutdown()


@pytest.fixture(scope="module")
def local_ray(_suite_ray):
    """The suite's local Ray, started as ``mlot distill`` starts one (``connect_ray``), for a module's in-process
    jobs; started again when a module before this one shut it down. Actors a module leaves alive would hold
    the CPUs the next module's jobs ask for: the module's tests stop what they start, and when something is
    still alive at the end (named here) this Ray is shut down, as each module's own Ray was before."""
    import ray
    from helpers import QUICKSTART

    from orchestrator.cluster import connect_ray
    from orchestrator.configuration import load_config

    if not (ray.is_initialized() and ray.get_runtime_context().gcs_address == _suite_ray["gcs"]):
        ray.shutdown()
        connect_ray(load_config(QUICKSTART))
        _suite_ray["gcs"] = ray.get_runtime_context().gcs_address
    before = _alive_actors()
    yield
    if ray.is_initialized() and ray.get_runtime_context().gcs_address == _suite_ray["gcs"]:
        deadline = time.monotonic() + 10  # ray.kill returns before the actor is gone
        while (left := {k: v for k, v in _alive_actors().items() if k not in before}) and time.monotonic() < deadline:
            time.sleep(0.5)
        if left:
            print(f"\nlocal_ray: actors left alive, Ray restarted for the next module: {sorted(left.values())}")
            ray.shutdown()
