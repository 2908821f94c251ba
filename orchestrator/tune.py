"""Ray Tune sweeps over OT settings, with teacher work shared across trials.

A search space is a YAML file of job-config paths -> distributions; each trial applies its sample as
overrides of the job config and runs ``run_distill`` (Ray Train inside a Tune trial: the Ray 2.60
"trainer in a function" pattern, metrics forwarded by ``TuneReportCallback``). The teacher actors
are started once for the sweep with a hidden-state cache, so N trials cost one teacher forward pass
per example, whatever temperature or k each trial uses.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from orchestrator.cluster import (
    actor_request,
    connect_ray,
    copies_that_fit,
    generator_requests,
    placement_nodes,
    with_replicas,
    worker_request,
)
from orchestrator.config import JobConfig
from orchestrator.configuration import ConfigError, apply_overrides, dump_config
from orchestrator.driver import prepare_data, run_distill, say, start_teachers, stop_teachers
from orchestrator.tracking import experiment_id, redact
from specs import UserError, storage
from workers.data.prepared import data_inputs

DISTRIBUTIONS = ("choice", "uniform", "loguniform", "randint", "grid")


class SpaceError(UserError, ValueError):
    """A search-space file that cannot be used; the message names the file and key."""


def load_space(path: str | Path, job: JobConfig) -> dict[str, Any]:
    """Read a space file into Ray Tune domains, checking every key against the job config.

    Each entry is ``config.path: {distribution: args}`` with distribution one of choice [values],
    uniform / loguniform [low, high], randint [low, high) or grid [values]. A key that is not a
    config path, or a value the config refuses, raises :class:`SpaceError` naming the key.
    """
    from ray import tune

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise SpaceError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(data, dict) or not data:
        raise SpaceError(f"{path}: expected a mapping of config paths to distributions, e.g. "
                         "`loss.params.top_k: {choice: [20, 50]}`")
    space: dict[str, Any] = {}
    for key, spec in data.items():
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
            raise SpaceError(f"{path}: {key}: expected one of {{{', '.join(DISTRIBUTIONS)}: ...}}, got {spec!r}")
        (dist, args), = spec.items()
        ranged = dist in ("uniform", "loguniform", "randint")
        if not isinstance(args, list) or not args or (ranged and (len(args) != 2 or not args[0] < args[1])):
            raise SpaceError(f"{path}: {key}: {dist} needs " + ("[low, high] with low < high" if ranged else
                             "a non-empty list of values") + f", got {args!r}")
        for value in (args if not ranged else args[:1]):
            try:
                trial = apply_overrides(job, [_override(key, value)])
            except ConfigError as e:
                raise SpaceError(f"{path}: {key}: value {value!r} is not accepted by the job config:\n{e}") from e
            if data_inputs(trial) != data_inputs(job):
                raise SpaceError(f"{path}: {key}: changes the prepared data (its rows, tokenizers or templates), "
                                 "which a sweep prepares once for all its trials; sweep it in separate sweeps "
                                 "(one job config each)")
        space[key] = {"choice": tune.choice, "grid": tune.grid_search}[dist](args) if not ranged else \
            {"uniform": tune.uniform, "loguniform": tune.loguniform, "randint": tune.randint}[dist](*args)
    return space


def _override(key: str, value: Any) -> str:
    return f"{key}={json.dumps(value)}"


def trial_job(base: JobConfig, sample: dict[str, Any], name: str) -> JobConfig:
    """The job config of one trial: the base job with the sampled values applied."""
    return apply_overrides(base, [_override(k, v) for k, v in sample.items()] + [f"name={name}"])


def _trial(sample: dict[str, Any], base: JobConfig, data: Any, teachers: dict[str, list[Any]] | None,
           parent_run_id: str, sweep: str) -> None:
    """One Tune trial: a whole distillation job (its own Ray Train run and MLflow child run) on the sweep's
    prepared data: a trial never opens ``data.source``, which may exist only where the sweep's driver runs."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    job = trial_job(base, sample, f"{sweep}-{tune.get_context().get_trial_id()}")
    run_distill(job, teachers=teachers, parent_run_id=parent_run_id, train_callbacks=[TuneReportCallback()],
                evaluate=False, data=data)


@dataclass
class TuneSummary:
    table: list[dict[str, Any]]
    best_config_path: str
    parent_run_id: str
    teacher_forward_rows: int | None
    wall_s: float
    tracking_uri: str


def run_tune(job: JobConfig, space_path: str, *, num_samples: int = 1, scheduler: str | None = None,
             search: str | None = None, metric: str = "eval/loss", mode: str = "min", resume: bool = False,
             share_teachers: bool = True, max_concurrent: int | None = None) -> TuneSummary:
    """Sweep ``space_path`` over ``job``; returns the results table (best first) and where the best config is."""
    import ray
    from mlflow import MlflowClient
    from ray import tune

    if not job.train.eval_every:
        raise ConfigError("train.eval_every: a sweep needs a periodic eval metric to compare and stop trials; set it")
    space = load_space(space_path, job)
    if search == "optuna" and any(isinstance(v, dict) and "grid_search" in v for v in space.values()):
        raise SpaceError(f"{space_path}: grid entries cannot be combined with --search optuna; use choice")
    sweep = f"{job.name}-sweep"
    run_path = job.run_path
    state_file = storage.join(run_path, "sweep.json")
    if resume and not storage.exists(state_file):
        raise UserError(f"--resume: no earlier sweep of job {job.name!r} under {run_path}")
    t0 = time.time()

    data = prepare_data(job)  # once: the trials read this copy (data.cache_dir: shared by every node, or a URI)
    connect_ray(job)
    job = with_replicas(job)  # replicas: auto, from the cluster's nodes
    client = MlflowClient(job.tracking.resolved_uri())
    if resume:
        parent = json.loads(storage.read_text(state_file))["parent_run_id"]
        client.update_run(parent, status="RUNNING")
    else:
        exp_id = experiment_id(client, job.tracking.experiment, job.tracking.resolved_uri())
        parent = client.create_run(exp_id, run_name=sweep, tags={
            "mlot.sweep": sweep, "mlot.driver_node": ray.get_runtime_context().get_node_id(), **job.tracking.tags,
        }).info.run_id
        client.log_text(parent, Path(space_path).read_text(), "space.yaml")
        client.log_text(parent, redact(dump_config(job)), "base_config.yaml")
        for k, v in {"space": Path(space_path).name, "num_samples": num_samples, "scheduler": scheduler,
                     "search": search, "metric": metric, "mode": mode, "share_teachers": share_teachers}.items():
            client.log_param(parent, k, v)
        storage.write_text(state_file, json.dumps({"parent_run_id": parent}))

    teachers = start_teachers(job, data, cache=True) if share_teachers and job.teachers else None
    try:
        trainable = tune.with_resources(
            tune.with_parameters(_trial, base=job, data=data, teachers=teachers, parent_run_id=parent, sweep=sweep),
            # The trial function only drives a TorchTrainer: a sliver of a CPU, so it never holds one the workers
            # need, and any node of any cluster can host it (Tune refuses a trial that asks for nothing).
            {"cpu": 0.01})
        tune_path = storage.join(run_path, "tune")
        if resume:
            tuner = tune.Tuner.restore(storage.join(tune_path, sweep), trainable=trainable, resume_unfinished=True,
                                       resume_errored=True)
        else:
            concurrent = max_concurrent or job.tune.max_concurrent or _fitting_trials(job, bool(teachers))
            tune_config = _tune_config(job, num_samples, scheduler, search, metric, mode, concurrent)
            tuner = tune.Tuner(trainable, param_space=space, tune_config=tune_config,
                               run_config=tune.RunConfig(name=sweep, storage_path=tune_path))
        say(f"sweep {sweep}: {Path(space_path).name}, {num_samples} sample(s), scheduler {scheduler or 'none'}, "
            f"teachers {'shared' if teachers else 'per trial'}")
        results = tuner.fit()

        table = results_table(results, metric, mode, _reports_per_trial(job))
        _close_children(client, parent, sweep, table)
        best = table[0] if table else None
        best_path = storage.join(run_path, "best.yaml")
        if best is not None:
            storage.write_text(best_path, dump_config(trial_job(job, best["config"], f"{job.name}-best")))
        forward_rows = sum(ray.get(a.info.remote())["forward_rows"] for hs in teachers.values() for a in hs) \
            if teachers else None
        _log_results(client, parent, table, metric, forward_rows, data.sizes["train"])
        if teachers:
            _log_cache(client, parent, {t.name: teachers[t.name] for t in job.teachers if not t.store})
        client.set_terminated(parent, "FINISHED")
        return TuneSummary(table, best_path, parent, forward_rows, time.time() - t0, job.tracking.resolved_uri())
    finally:  # the sweep's shared teachers end with it
        stop_teachers(teachers)


def _tune_config(job: JobConfig, num_samples: int, scheduler: str | None, search: str | None, metric: str,
                 mode: str, max_concurrent: int) -> Any:
    """A new sweep's ``tune.TuneConfig``: the scheduler (``asha``) and search algorithm (``optuna``) asked for."""
    from ray import tune

    sched = None
    if scheduler == "asha":
        from ray.tune.schedulers import ASHAScheduler
        # max_t one past the last report: ASHA must never stop a trial at its final report, which
        # would kill it while it exports the student and closes its MLflow run.
        sched = ASHAScheduler(time_attr="training_iteration", grace_period=1, reduction_factor=2,
                              max_t=_reports_per_trial(job) + 1)
    algo = None
    if search == "optuna":
        from ray.tune.search.optuna import OptunaSearch
        algo = OptunaSearch()
    return tune.TuneConfig(metric=metric, mode=mode, scheduler=sched, search_alg=algo, num_samples=num_samples,
                           max_concurrent_trials=max_concurrent)


def _reports_per_trial(job: JobConfig) -> int:
    """Tune iterations of a full trial: one report per eval and per checkpoint step."""
    steps = job.train.steps or 1
    marks = {s for s in range(1, steps + 1) if s % job.train.eval_every == 0 or s % job.train.checkpoint_every == 0}
    return len(marks | {steps})


def _fitting_trials(job: JobConfig, shared_teachers: bool) -> int:
    """How many trials' worker groups (and, unshared, their teachers) fit the cluster at once, node by node and
    counting every resource they ask for (CPUs, GPUs, accelerator types, custom), after the shared teachers'
    (>= 1). An autoscaling cluster counts its node types at full scale (``cluster.launcher_config``).

    A local Ray may declare more logical CPUs than the machine has (so actors and workers can share
    2 cores); concurrent trials there would only contend, so they are capped by the real cores.
    """
    import os

    if job.cluster.autoscaling and not job.cluster.launcher_config:
        raise UserError("cluster.autoscaling: a sweep sizes its concurrency from the cluster's node types: set "
                        "cluster.launcher_config to the cluster-launcher YAML (e.g. cluster.yaml), or set "
                        "tune.max_concurrent (or --max-concurrent)")
    nodes = placement_nodes(job)
    teachers = [actor_request(t.resources) for t in job.teachers if not t.store for _ in range(t.replicas)]
    workers = [worker_request(job.train)] * job.train.num_workers + generator_requests(job)  # each trial its own
    fit = copies_that_fit(nodes, teachers if shared_teachers else [], workers + ([] if shared_teachers else teachers))
    if job.cluster.address is None:
        fit = min(fit, (os.cpu_count() or 1) // (2 * int(max(1, worker_request(job.train)["CPU"]))))
    return max(1, fit)


def _log_cache(client: Any, parent: str, teachers: dict[str, list[Any]]) -> None:
    """Each shared teacher's hidden-state cache (summed over its replicas) on the sweep's parent run."""
    import ray

    for name, replicas in teachers.items():
        stats = [s for s in ray.get([a.cache_stats.remote() for a in replicas]) if s]
        for key in ("hits", "misses", "bytes", "evictions", "budget"):
            client.log_metric(parent, f"teacher_cache/{name}/{key}", sum(s[key] for s in stats))


def results_table(results: Any, metric: str, mode: str, full: int) -> list[dict[str, Any]]:
    """One row per trial, best first: its config, final metric, iterations run, early-stopped or not."""
    rows = []
    for r in results:
        if r.metrics is None or metric not in (r.metrics or {}):
            rows.append({"config": r.config, metric: None, "iterations": 0,
                         "status": "error" if r.error else "no metric",
                         "trial_id": (r.metrics or {}).get("trial_id")})
            continue
        it = r.metrics.get("training_iteration", 0)
        rows.append({"config": r.config, metric: r.metrics[metric], "iterations": it,
                     "trial_id": r.metrics.get("trial_id"),
                     "status": "error" if r.error else ("stopped early" if it < full else "completed")})
    sign = 1 if mode == "min" else -1
    return sorted(rows, key=lambda row: (row[metric] is None, sign * (row[metric] or 0)))


def _close_children(client: Any, parent: str, sweep: str, table: list[dict[str, Any]]) -> None:
    """Close the MLflow runs of trials that did not finish on their own: KILLED when the scheduler
    stopped them, FAILED when they errored (trials leave that to this driver; see run_distill)."""
    errored = {f"{sweep}-{row.get('trial_id')}" for row in table if row["status"] == "error"}
    run = client.get_run(parent)
    for child in client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{parent}'"):
        if child.info.status == "RUNNING":
            client.set_terminated(child.info.run_id, "FAILED" if child.info.run_name in errored else "KILLED")


def _log_results(client: Any, parent: str, table: list[dict[str, Any]], metric: str, forward_rows: int | None,
                 n_rows: int) -> None:
    """The results table (markdown) and metric-vs-parameter plots on the parent run; printed too."""
    import tempfile

    from workers.student.plots import metric_vs_params_png

    keys = sorted({k for row in table for k in row["config"]})  # trial_id stays out of the printed table
    lines = ["| " + " | ".join([*keys, metric, "iterations", "status"]) + " |",
             "|" + "---|" * (len(keys) + 3)]
    for row in table:
        cells = [_fmt(row["config"].get(k)) for k in keys] + [_fmt(row[metric]), str(row["iterations"]), row["status"]]
        lines.append("| " + " | ".join(cells) + " |")
    text = "\n".join(lines)
    print("\n" + text)
    client.log_text(parent, text + "\n", "results.md")
    if table and table[0][metric] is not None:
        client.log_metric(parent, f"best/{metric}", table[0][metric])
    if forward_rows is not None:
        client.log_metric(parent, "teacher_forward_rows", forward_rows)
        print(f"\nteacher forward passes: {forward_rows} rows for the whole sweep "
              f"({forward_rows / max(n_rows, 1):.2f} per training example)")
    with tempfile.TemporaryDirectory() as d:
        png = metric_vs_params_png(table, keys, metric, Path(d) / "metric_vs_params.png")
        if png:
            client.log_artifact(parent, png, "plots")


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, dict):
        return json.dumps(v, sort_keys=True).replace("|", "/")
    return str(v)
