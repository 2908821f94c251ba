"""Which Ray the job runs on, and whether what it asks for can ever be placed there.

* ``cluster.address: null`` always starts a fresh local Ray, whatever else runs on the machine (a
  ``ray start`` cluster, a stale address file, ``RAY_ADDRESS``): the local default never joins by accident.
* ``cluster.address: HOST:PORT | auto | ray://...`` joins that cluster. Ray 2.59+ clusters run with token
  authentication; a driver sends its token only when ``RAY_AUTH_MODE=token``, which is set here when a
  token is found in Ray's usual places, and a missing or wrong token is an error that says what to do.
* Every teacher replica and training worker is checked against the nodes before anything is started:
  a request no node can ever satisfy fails at once naming the resource, instead of a silent PENDING.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

from orchestrator import console
from specs import UserError

_TOKEN_FIX = ("copy the cluster's token (`ray get-auth-token` on the head node) to ~/.ray/auth_token on this "
              "machine, or export RAY_AUTH_TOKEN=<token> (or RAY_AUTH_TOKEN_PATH=<file>)")


def _check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """A host:port address that accepts no connection fails now, not after ray.init's minutes of retries."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return  # "auto" and other forms: Ray resolves them
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            pass
    except OSError as e:
        raise UserError(f"cluster.address {address!r}: nothing answers at {host}:{port} ({e}); start the "
                        "cluster (ray start --head / ray up cluster.yaml), fix the address, or set "
                        "cluster.address: null to start a local Ray") from e


def auth_token_found() -> bool:
    """Is there a Ray auth token where Ray looks (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token)?"""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return True
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    return Path(path).expanduser().is_file() if path else (Path.home() / ".ray" / "auth_token").is_file()


def _use_token_auth() -> None:
    """Send the token with every request to the cluster, as ``RAY_AUTH_MODE=token`` set before Ray starts
    would. Ray caches its config when imported, so refresh it (as Ray does for a local cluster it finds
    on its own; for an explicit address it waits to be told, which the user did by naming the address)."""
    from ray._raylet import Config

    os.environ["RAY_AUTH_MODE"] = "token"
    Config.initialize("")


def connect_ray(job: Any) -> None:
    """Start a fresh local Ray, or join ``cluster.address``; a bad address or token is a clear error."""
    import ray

    # Fail within a minute instead of hanging when the cluster cannot place a worker group; no usage reports.
    # Set here, not at import: only a process that starts jobs needs them.
    for key, value in (("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "60"), ("RAY_USAGE_STATS_ENABLED", "0")):
        os.environ.setdefault(key, value)
    if ray.is_initialized():
        return
    kwargs: dict[str, Any] = {"runtime_env": job.cluster.runtime_env or None, **console.ray_init_options()}
    if job.cluster.address:
        _check_reachable(job.cluster.address)
        if "RAY_AUTH_MODE" not in os.environ and auth_token_found():
            _use_token_auth()
        try:
            ray.init(address=job.cluster.address, **kwargs)
        except Exception as e:  # ConnectionError, TimeoutError, ValueError, auth errors, by address form
            text = f"{type(e).__name__}: {e}"
            hint = "check the address, or set cluster.address: null to start a local Ray"
            if os.environ.get("RAY_AUTH_MODE") == "token" or "auth" in text.lower():
                hint = f"if the address is right, the cluster's auth token is missing or wrong here: {_TOKEN_FIX}"
            elif not auth_token_found():
                hint += f"; a cluster with token authentication (Ray's default) needs its token: {_TOKEN_FIX}"
            raise UserError(f"cluster.address {job.cluster.address!r}: cannot connect to Ray ({text}); {hint}") from e
    else:
        # address="local": a new cluster even when another Ray is running or RAY_ADDRESS is set. The
        # dashboard (needed by the state API that cleans up after stopped trials) binds to loopback,
        # and token authentication stays on (both Ray 2.60 defaults).
        ray.init(address="local", num_cpus=job.cluster.num_cpus, dashboard_host="127.0.0.1", **kwargs)
    from ray.data import DataContext
    DataContext.get_current().enable_progress_bars = False


def reachable_from_workers(job: Any, uri: str) -> str:
    """A tracking URI the workers can use: on a joined cluster (``cluster.address``), a server on the
    driver's own loopback (``http://127.0.0.1:5000``, ``localhost``) is reached at the driver node's IP
    from the other nodes (the server must listen there: ``mlflow server --host 0.0.0.0``)."""
    import re

    import ray
    if not job.cluster.address or not re.match(r"https?://(127\.0\.0\.1|localhost)[:/]", uri):
        return uri
    return re.sub(r"(127\.0\.0\.1|localhost)", ray.util.get_node_ip_address(), uri, count=1)


def outside_pg() -> Any:
    """Actors started from inside a sweep trial must not land in (and fail to fit) the trial's placement group."""
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
    return PlacementGroupSchedulingStrategy(placement_group=None)


# ---------------------------------------------------------------------------- what is asked for


def _accelerator(kind: str | None) -> dict[str, float]:
    # How Ray itself expresses accelerator_type=...: a sliver of the node's "accelerator_type:X" resource.
    return {f"accelerator_type:{kind}": 0.001} if kind else {}


def actor_request(r: Any) -> dict[str, float]:
    """The Ray resources of one serving actor of ``ActorResources`` ``r`` (a teacher replica, the vLLM generator)."""
    return {"CPU": r.num_cpus, "GPU": r.num_gpus, **({"memory": float(r.memory)} if r.memory else {}),
            **_accelerator(r.accelerator_type), **r.custom}


def actor_options(r: Any) -> dict[str, Any]:
    """``ray.remote(...).options`` of a serving actor of ``ActorResources`` ``r``: its resources, restarts, and no
    placement group."""
    opts: dict[str, Any] = {"num_cpus": r.num_cpus, "num_gpus": r.num_gpus, "max_restarts": 2,
                            "max_task_retries": 2, "scheduling_strategy": outside_pg()}
    if r.accelerator_type:
        opts["accelerator_type"] = r.accelerator_type
    if r.memory:
        opts["memory"] = r.memory
    if r.custom:
        opts["resources"] = dict(r.custom)
    return opts


def launcher_nodes(path: str) -> list[dict[str, float]]:
    """The nodes of a cluster-launcher config at full scale (each worker node type ``max_workers`` times, the
    head node type once), as node resource dicts. A bad file is a clear error naming it."""
    import yaml

    try:
        cfg = yaml.safe_load(Path(path).read_text())
        types, head = cfg["available_node_types"], cfg["head_node_type"]
        return [{k: float(v) for k, v in (node.get("resources") or {}).items()}
                for name, node in types.items() for _ in range(1 if name == head else int(node.get("max_workers", 0)))]
    except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError, AttributeError) as e:
        raise UserError(f"cluster.launcher_config {path!r}: not a readable cluster-launcher YAML with "
                        f"available_node_types and head_node_type ({type(e).__name__}: {e})") from e


def copies_that_fit(nodes: list[dict[str, float]], fixed: list[dict[str, float]], copy: list[dict[str, float]],
                    limit: int = 64) -> int:
    """How many copies of the request list ``copy`` fit on ``nodes`` (each request on one node, first fit) after
    ``fixed`` is placed; 0 when ``fixed`` itself does not fit. A sweep's concurrency: ``fixed`` are the shared
    teachers' replicas, ``copy`` one trial's workers (and its own teachers when they are not shared)."""
    free = [dict(n) for n in nodes]

    def place(requests: list[dict[str, float]]) -> bool:
        for request in requests:
            node = next((n for n in free if all(n.get(k, 0.0) >= v - 1e-9 for k, v in request.items())), None)
            if node is None:
                return False
            for k, v in request.items():
                node[k] = node.get(k, 0.0) - v
        return True

    if not place(fixed):
        return 0
    count = 0
    while count < limit and place(copy):
        count += 1
    return count


def placement_nodes(job: Any) -> list[dict[str, float]]:
    """The nodes requests are counted against, as resource dicts: an autoscaling cluster's node types at full scale
    (``cluster.launcher_config``; the nodes that exist now say nothing), else the cluster's alive nodes."""
    if job.cluster.autoscaling and job.cluster.launcher_config:
        return launcher_nodes(job.cluster.launcher_config)
    import ray
    return [n["Resources"] for n in ray.nodes() if n.get("Alive")]


def with_replicas(job: Any) -> Any:
    """``job`` with every ``replicas: auto`` teacher given a number: as many replicas as the cluster's nodes hold
    after the training workers' and the earlier teachers' requests (node by node; an autoscaling cluster's node
    types at full scale), between 1 and ``max_replicas``."""
    live = [i for i, t in enumerate(job.teachers) if t.replicas == "auto" and not t.store]
    if not live:
        return job
    nodes = placement_nodes(job)
    placed = [worker_request(job.train)] * job.train.num_workers + generator_requests(job)
    teachers = []
    for i, t in enumerate(job.teachers):
        if i in live:
            t = t.model_copy(update={"replicas": max(1, copies_that_fit(nodes, placed, [actor_request(t.resources)],
                                                                         limit=t.max_replicas))})
        placed += [actor_request(t.resources)] * (t.replicas if t.replicas != "auto" else 1)
        teachers.append(t)
    return job.model_copy(update={"teachers": teachers})


def generator_requests(job: Any) -> list[dict[str, float]]:
    """The on-policy vLLM generator's resources, when the job runs one (``train.on_policy.engine: vllm``)."""
    return [actor_request(job.train.on_policy.resources)] if job.train.on_policy.generator else []


def worker_request(train: Any) -> dict[str, float]:
    """The Ray resources of one training worker (Ray Train's defaults: 1 CPU, and 1 GPU with use_gpu)."""
    request = {"CPU": 1.0, **({"GPU": 1.0} if train.use_gpu else {}), **_accelerator(train.accelerator_type)}
    return {**request, **train.resources_per_worker}


def _fits(node: dict[str, float], request: dict[str, float]) -> int:
    """How many copies of ``request`` a node's total resources hold."""
    counts = [int(node.get(k, 0.0) / v + 1e-9) for k, v in request.items() if v > 0]
    return min(counts) if counts else 1 << 30


def check_placeable(job: Any, *, teachers: bool = True, workers: bool = True) -> None:
    """Fail now, naming the resource, when some teacher replica (``teachers``) or training worker
    (``workers``) can never be placed on this cluster's nodes. An autoscaling cluster
    (``cluster.autoscaling: true``) is not checked: its nodes appear on demand."""
    if job.cluster.autoscaling:
        return
    nodes = placement_nodes(job)
    wants = [(f"teachers.{i}.resources ({t.name}, {t.replicas} replica(s))", actor_request(t.resources), t.replicas)
             for i, t in enumerate(job.teachers) if teachers and not t.store]
    if workers:
        wants.append(("train (one worker: train.use_gpu / accelerator_type / resources_per_worker)",
                      worker_request(job.train), job.train.num_workers))
        wants += [("train.on_policy.resources (the vLLM generator)", r, 1) for r in generator_requests(job)]
    for what, request, count in wants:
        have = sum(_fits(n, request) for n in nodes)
        if have >= count:
            continue
        short = {k: v for k, v in request.items() if v > 0 and max((n.get(k, 0.0) for n in nodes), default=0) < v}
        why = (f"no node offers {short}" if short else
               f"the nodes hold only {have} of the {count} requested together")
        raise UserError(f"{what}: asks for {request} each, but {why}. The cluster's nodes offer "
                        f"{[{k: v for k, v in n.items() if not k.startswith('node:')} for n in nodes]}. "
                        "Lower the request, add such nodes, or set cluster.autoscaling: true if the "
                        "cluster adds them on demand")
