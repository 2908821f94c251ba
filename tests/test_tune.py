"""Ray Tune sweeps on a real local Ray cluster: ASHA, MLflow parent/child runs, shared teacher work."""

import json
import time
from pathlib import Path

import pytest

from orchestrator.configuration import load_config
from orchestrator.tune import SpaceError, load_space

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "orchestrator" / "configs" / "quickstart.yaml"


@pytest.fixture(scope="module")
def job():
    return load_config(QUICKSTART)


@pytest.mark.parametrize("name", ["ot_temperature_topk", "sinkhorn", "loss_weights", "ablation", "multilevel_ot",
                                  "identity", "on_policy"])
def test_bundled_spaces_load(job, name):
    space = load_space(REPO / "tune_spaces" / f"{name}.yaml", job)
    assert space


@pytest.mark.parametrize("text,needle", [
    ("loss.params.topk: {choice: [5]}", "loss.params.topk"),               # not a config path
    ("loss.params.top_k: {normal: [1, 2]}", "loss.params.top_k"),          # unknown distribution
    ("loss.params.sinkhorn_reg: {uniform: [1.0, 0.1]}", "low < high"),     # empty range
    ("train.lr: {choice: [fast]}", "train.lr"),                            # a value the config refuses
    ("- just a list", "mapping"),
])
def test_bad_space_files_name_the_key(tmp_path, job, text, needle):
    p = tmp_path / "space.yaml"
    p.write_text(text)
    with pytest.raises(SpaceError, match=needle):
        load_space(p, job)


def _sweep(tmp_path, name: str, space_text: str, *, steps: int, eval_every: int, limit: int, batch: int,
           extra: tuple[str, ...] = (), **kwargs):
    """Write a space file, build a small quickstart job, run the sweep on the Ray already started; (job, summary)."""
    from orchestrator.tune import run_tune

    space = tmp_path / "space.yaml"
    space.write_text(space_text)
    job = load_config(QUICKSTART, [f"name={name}", f"output_dir={tmp_path}", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
                                   f"train.steps={steps}", "train.warmup_steps=0", f"train.eval_every={eval_every}",
                                   f"train.checkpoint_every={steps}", "teachers.0.pretrain.steps=0",
                                   f"data.limit={limit}", f"train.batch_size={batch}", *extra])
    return job, run_tune(job, str(space), **kwargs)


# One good learning rate and a hopeless one: ASHA must stop the hopeless trial early. The aligned-chunk and
# projection terms (mlot.identity) are swept parameters like any other.
ASHA_SPACE = ("train.lr: {grid: [3.0e-3, 1.0e-9]}\nloss.params.teacher_temperature: {choice: [1.0, 1.5]}\n"
              "loss.params.chunk_weight: {choice: [0.5, 1.0]}\nloss.params.projection_weight: {choice: [0.5, 1.0]}\n")


@pytest.mark.integration
def test_small_asha_sweep_shares_teacher_work_and_logs_runs(tmp_path, local_ray):
    from mlflow import MlflowClient

    from orchestrator.configuration import load_config as load

    # On the known-truth task, ranked by what each trial learnt of p* (its workers' eval/truth_kl).
    small = {"steps": 6, "eval_every": 2, "limit": 300, "batch": 8, "num_samples": 1, "scheduler": "asha",
             "extra": ("data.source=builtin:known_truth",), "metric": "eval/truth_kl"}
    job, s = _sweep(tmp_path, "sw", ASHA_SPACE, **small)  # 2 cores: one trial at a time
    assert len(s.table) == 2
    assert s.table[0]["config"]["train.lr"] == 3.0e-3 and s.table[0]["status"] == "completed"
    assert any(row["status"] == "stopped early" for row in s.table)
    # Shared teachers: every trial asked for the same 6 batches (+ prefetch), one forward pass each.
    rows_per_trial = 8 * (6 + job.train.prefetch + 1) + 1  # + the eval-plan row
    assert s.teacher_forward_rows <= rows_per_trial
    client = MlflowClient(job.tracking.resolved_uri())
    parent = client.get_run(s.parent_run_id)
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{s.parent_run_id}'")
    assert len(children) == 2 and all(c.info.status in ("FINISHED", "KILLED") for c in children)
    # the completed trial's metric in the table is the truth KL its workers logged last, and a real one
    logged = [h[-1].value for c in children if (h := client.get_metric_history(c.info.run_id, "eval/truth_kl"))]
    assert s.table[0]["eval/truth_kl"] == pytest.approx(min(logged)) and 0 < s.table[0]["eval/truth_kl"] < 20
    assert all(client.get_metric_history(c.info.run_id, f"train/teacher-sp/{term}") for c in children
               for term in ("chunk_kl", "projection_kl"))
    assert {a.path for a in client.list_artifacts(s.parent_run_id)} >= {"results.md", "space.yaml", "plots"}
    assert json.loads((tmp_path / "sw" / "sweep.json").read_text())["parent_run_id"] == s.parent_run_id
    # The sweep's shared teachers ended with it: none holds its CPUs on this Ray for the next job.
    from ray.util.state import list_actors
    for _ in range(40):  # ray.kill returns before the actor is gone
        alive = list_actors(filters=[("class_name", "=", "TeacherActor"), ("state", "=", "ALIVE")])
        if not alive:
            break
        time.sleep(0.25)
    assert not alive, alive

    # Resuming the (finished) sweep restores its trials instead of re-running them, under the same parent.
    _, again = _sweep(tmp_path, "sw", ASHA_SPACE, **small, resume=True)
    assert again.parent_run_id == s.parent_run_id
    assert [(r["config"], r["status"]) for r in again.table] == [(r["config"], r["status"]) for r in s.table]
    assert len(client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{s.parent_run_id}'")) == 2

    # The best config is a complete job config (every section resolved): `mlot validate` accepts it as it is.
    from orchestrator.cli import main
    best = load(s.best_config_path)
    assert best.train.lr == 3.0e-3 and best.name == "sw-best"
    assert main(["validate", s.best_config_path]) == 0


# Optuna search runs on a multi-node cluster in tests/test_multinode.py (one sweep serves both checks).
