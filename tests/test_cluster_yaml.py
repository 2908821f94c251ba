"""cluster.yaml is a valid Ray cluster-launcher config (checked with Ray's own schema and validator)
and provides the node types the example job asks for: every custom resource the job uses exists,
and each teacher replica and training worker fits on one node of some type."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from orchestrator.cluster import actor_request, worker_request
from orchestrator.config import JobConfig
from orchestrator.configuration import load_config

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster.yaml"
EXAMPLE = ROOT / "orchestrator" / "configs" / "example_cluster.yaml"

jsonschema = pytest.importorskip("jsonschema")
autoscaler_util = pytest.importorskip("ray.autoscaler._private.util")


def cluster() -> dict[str, Any]:
    return yaml.safe_load(CLUSTER.read_text())


def ray_schema() -> dict[str, Any]:
    import json

    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def node_types() -> dict[str, dict[str, Any]]:
    return cluster()["available_node_types"]


def test_valid_for_ray() -> None:
    raw = cluster()
    jsonschema.validate(raw, ray_schema())  # the file as written
    # What `ray up` does: fill in the provider's defaults, then validate (the validator needs the
    # filled-in fields, e.g. cluster_synced_files).
    prepared = autoscaler_util.prepare_config(copy.deepcopy(raw))
    autoscaler_util.validate_config(prepared)
    assert prepared["head_node_type"] == "head"


@pytest.mark.parametrize("mutate", [
    lambda c: c["available_node_types"]["teacher_gpu"]["resources"].update(teacher_node=0.5),
    lambda c: c.update(not_a_ray_key=1),
    lambda c: c["available_node_types"]["student_gpu"].pop("node_config"),
])
def test_validator_catches_mistakes(mutate: Any) -> None:
    # A negative control: the checks above would fail on a broken file.
    broken = cluster()
    mutate(broken)
    with pytest.raises(jsonschema.ValidationError):
        autoscaler_util.validate_config(autoscaler_util.prepare_config(broken))


def test_node_types() -> None:
    types = node_types()
    assert {"teacher_gpu", "student_gpu"} <= set(types)
    assert types["teacher_gpu"]["resources"]["teacher_node"] >= 1
    assert types["student_gpu"]["resources"]["student_node"] >= 1
    assert types["teacher_gpu"]["resources"]["GPU"] >= 1 and types["student_gpu"]["resources"]["GPU"] >= 1


def test_setup_installs_the_project() -> None:
    cfg = cluster()
    commands = " ; ".join(cfg["setup_commands"])
    assert "pip install" in commands and "-e" in commands and "constraints.txt" in commands
    assert "." in cfg["file_mounts"].values()  # the repo is copied to the nodes


def _job() -> JobConfig:
    return load_config(EXAMPLE)


def _teacher_demand(job: JobConfig) -> list[tuple[str, dict[str, float]]]:
    return [(t.name, {k: v for k, v in actor_request(t.resources).items() if v}) for t in job.teachers]


def _worker_demand(job: JobConfig) -> dict[str, float]:
    return worker_request(job.train)


def _fits(need: dict[str, float], have: dict[str, float]) -> bool:
    return all(have.get(k, 0) >= v for k, v in need.items())


def test_custom_resources_of_the_example_job_exist() -> None:
    job = _job()
    used = set(job.train.resources_per_worker) - {"CPU", "GPU"}
    for t in job.teachers:
        used |= set(t.resources.custom)
        if t.resources.accelerator_type:
            used.add(f"accelerator_type:{t.resources.accelerator_type}")
    assert used >= {"teacher_node", "student_node", "accelerator_type:H100"}
    provided = {r for spec in node_types().values() for r in spec["resources"]}
    assert used <= provided, f"missing in cluster.yaml: {used - provided}"


def test_each_replica_and_worker_fits_a_node_type_with_enough_capacity() -> None:
    job, types = _job(), node_types()

    def capacity(need: dict[str, float]) -> int:
        """How many such demands the cluster can place at its largest (per-node packing)."""
        total = 0
        for spec in types.values():
            have = spec["resources"]
            if _fits(need, have):
                # accelerator_type:* is a node label (asked for as 0.001): it never limits packing.
                per_node = min(int(have[k] // v) for k, v in need.items() if not k.startswith("accelerator_type:"))
                total += per_node * spec.get("max_workers", 0)
        return total

    for name, need in _teacher_demand(job):
        replicas = next(t.max_replicas if t.replicas == "auto" else t.replicas for t in job.teachers if t.name == name)
        assert capacity(need) >= replicas, f"teacher {name} ({need}) does not fit cluster.yaml"
    need = _worker_demand(job)
    assert capacity(need) >= job.train.num_workers, f"training workers ({need}) do not fit cluster.yaml"
    # And they land on the intended node types.
    assert _fits(_teacher_demand(job)[0][1], types["teacher_gpu"]["resources"])
    assert not _fits(_teacher_demand(job)[0][1], types["student_gpu"]["resources"])
    assert _fits(need, types["student_gpu"]["resources"]) and not _fits(need, types["teacher_gpu"]["resources"])


def test_an_autoscaling_sweep_sizes_its_concurrency_from_the_node_types_at_full_scale():
    """cluster.yaml scales from 0 nodes: the example job's sweep counts its node types at max_workers (4 student
    nodes of 4 L40S: one 4-worker trial each, the 8 shared teacher replicas on a teacher node), node by node."""
    from orchestrator.cluster import copies_that_fit, launcher_nodes, with_replicas
    from orchestrator.configuration import apply_overrides
    from orchestrator.tune import _fitting_trials
    from specs import UserError

    nodes = launcher_nodes(str(CLUSTER))
    assert len(nodes) == 1 + 2 + 4 and sum(n.get("GPU", 0) for n in nodes) == 2 * 8 + 4 * 4
    job = with_replicas(apply_overrides(load_config(EXAMPLE), [f"cluster.launcher_config={CLUSTER}"]))
    assert job.teachers[0].replicas == 8 and _fitting_trials(job, shared_teachers=True) == 4
    # teachers per trial (not shared): each trial also needs its 8 replicas; the 2 teacher nodes hold 2 such sets
    assert _fitting_trials(job, shared_teachers=False) == 2
    # packing is per node: 3 workers of 2 GPUs do not fit two nodes of 3 GPUs each, though 6 GPUs are there
    assert copies_that_fit([{"GPU": 3}, {"GPU": 3}], [], [{"GPU": 2}] * 3) == 0
    with pytest.raises(UserError, match="set cluster.launcher_config to the cluster-launcher YAML"):
        _fitting_trials(apply_overrides(job, ["cluster.launcher_config=null"]), shared_teachers=True)
    with pytest.raises(UserError, match="not a readable cluster-launcher YAML"):
        _fitting_trials(apply_overrides(job, ["cluster.launcher_config=/nowhere.yaml"]), shared_teachers=True)


def test_replicas_auto_fills_the_teacher_nodes_after_the_workers_up_to_max_replicas():
    """The example job with ``replicas: auto`` on cluster.yaml at full scale: one replica per H100 of the 2
    teacher nodes (16), bounded by max_replicas; a teacher asking for any GPU leaves the workers theirs."""
    from orchestrator.cluster import with_replicas
    from orchestrator.configuration import apply_overrides

    job = apply_overrides(load_config(EXAMPLE), [f"cluster.launcher_config={CLUSTER}", "teachers.0.max_replicas=8"])
    assert with_replicas(job).teachers[0].replicas == 8  # max_replicas
    assert with_replicas(apply_overrides(job, ["teachers.0.max_replicas=64"])).teachers[0].replicas == 16
    # no accelerator type nor custom resource: any GPU, after the 4 workers' L40S GPUs: 16 H100 + 12 L40S
    anywhere = ["teachers.0.max_replicas=64", "teachers.0.resources.accelerator_type=null",
                "teachers.0.resources.custom={}"]
    assert with_replicas(apply_overrides(job, anywhere)).teachers[0].replicas == 16 + 12
    assert with_replicas(apply_overrides(job, ["teachers.0.replicas=2"])).teachers[0].replicas == 2  # a number stays
