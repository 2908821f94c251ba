"""The driver: config -> Ray -> teacher actors + a TorchTrainer of student workers -> MLflow.

It only wires things together. Text rows and actor handles go to the workers; payloads go from
teacher actors to workers through the object store and never come back here.
"""

from __future__ import annotations

import hashlib
import json
import random
import signal
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from orchestrator.cluster import (
    actor_options,
    check_placeable,
    connect_ray,
    outside_pg,
    reachable_from_workers,
    with_replicas,
)
from orchestrator.config import JobConfig
from orchestrator.configuration import apply_overrides
from orchestrator.engines import start_generator, start_replicas, vllm_python
from orchestrator.tracking import start_tracking
from specs import UserError, storage


def say(msg: str) -> None:
    print(f"[mlot] {msg}", flush=True)


# ---------------------------------------------------------------------------- data


def prepare_data(job: JobConfig) -> Any:
    """The job's rows, tokenised for the student and every teacher in one cached pass (``workers.data.prepared``);
    returns its ``DataRef`` (where it is, rows per split, skipped/truncated counts, whether it was a cache hit)."""
    from workers.data.prepared import prepare

    data = prepare(job, job.data_cache, job.data.num_proc, say=say)
    say(f"data: {data.sizes['train']} train / {data.sizes.get('eval', 0)} eval rows"
        + "".join(f", {n} {what}" for what, n in data.counts.items() if n)
        + (" (tokenisation cache hit" if data.cache_hit else " (tokenised") + f" in {data.seconds:.1f}s)")
    return data


def fingerprint(job: JobConfig) -> str:
    """What a checkpoint must agree on to be resumed: models, tokenizers, data, loss, batch shape, seed.

    Steps, schedule length, tracking, cluster, the export dtype and ``loss.fused_head`` (the same loss, read from
    the LM head or from built logits) may change between a run and its resumption.
    """
    keep = {
        "student": job.student.model_dump(mode="json", exclude={"deepspeed", "export_dtype"}),
        "teachers": [t.model_dump(mode="json", include={"name", "model", "hf_config", "tokenizer", "template"})
                     for t in job.teachers],
        "data": job.data.model_dump(mode="json", exclude={"num_proc", "cache_dir"}),
        "loss": job.loss.model_dump(mode="json", exclude={"fused_head"}),
        "train": job.train.model_dump(mode="json", include={"batch_size", "grad_accum", "seed", "num_workers"}),
    }
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------- Ray, teachers, tracking


def pretrain_data(job: JobConfig, teacher: Any, data: Any) -> Any:
    """The prepared rows ``teacher`` pre-trains on: the job's (``data``), or its ``pretrain.split`` of the same
    source, prepared (and cached) like the job's own."""
    from workers.data.prepared import prepare

    split = teacher.pretrain.split
    if split is None or split == job.data.train_split:
        return data
    rows = {"train_split": split, "eval_split": None, "eval_fraction": 0.0}  # every row of the split
    other = job.model_copy(update={"data": job.data.model_copy(update=rows)})
    return prepare(other, job.data_cache, job.data.num_proc, say=say)


def start_teachers(job: JobConfig, data: Any, cache: bool = False) -> dict[str, list[Any]]:
    """Start every teacher's replicas on its own resources; pretrain tiny teachers first (on ``data``'s training
    rows, a ``workers.data.prepared.DataRef``) if asked.

    ``cache``: keep hidden states so later requests for a batch (a sweep's other trials) skip the forward, up to
    ``tune.teacher_cache_bytes`` per replica.
    """
    import ray

    from workers.teacher.actor import TeacherActor

    check_placeable(job, workers=False)
    for i, t in enumerate(job.teachers):  # a missing vLLM runtime fails before any teacher pretrains
        if t.engine == "vllm" and not t.store:
            vllm_python(t.vllm, f"teachers.{i}.vllm")
    teachers: dict[str, list[Any]] = {}
    for i, t in enumerate(job.teachers):
        if t.store:
            teachers[t.name] = start_store_teacher(job, t)
            continue
        saved = storage.join(job.run_path, "teachers", t.name)
        if t.pretrain.steps and not storage.exists(storage.join(saved, "config.json")):
            say(f"teacher {t.name}: pretraining {t.pretrain.steps} steps on the task")
            t0 = time.time()
            trainer = ray.remote(TeacherActor).options(**actor_options(t.resources)).remote(t, job.data, job.loss,
                                                                                    job.train.seed)
            ray.get(trainer.pretrain.remote(pretrain_data(job, t, data), t.pretrain.steps, t.pretrain.lr,
                                            t.pretrain.batch_size, job.train.seed))
            ray.get(trainer.save.remote(saved))
            ray.kill(trainer)
            say(f"teacher {t.name}: pretrained in {time.time() - t0:.0f}s, saved to {saved}")
        # Replicas load saved weights through their constructor, so a replica that Ray restarts after
        # a crash comes back as the same teacher (the run directory must be on storage all nodes see).
        weights = saved if t.pretrain.steps else None
        teachers[t.name] = start_replicas(job, t, i, weights, cache)
    # Every teacher's replicas load at once (the actors start as they are created); wait for them all here, so a
    # teacher that cannot load fails before training starts.
    for t in job.teachers:
        if t.store:
            continue
        infos = ray.get([a.info.remote() for a in teachers[t.name]])
        say(f"teacher {t.name}: {len(infos)} replica(s) on {infos[0]['device']} ({infos[0]['dtype']}), "
            f"vocab {infos[0]['vocab_size']}"
            + (f" ({infos[0]['padded_rows']} padded logit rows ignored)" if infos[0]["padded_rows"] else ""))
    return teachers


def stop_teachers(teachers: dict[str, list[Any]] | None) -> None:
    """Stop the replicas ``start_teachers`` started: alive, they hold their CPUs and GPUs for as long as the Ray
    they run on (a notebook's, a joined cluster's driver session)."""
    import ray

    for replicas in (teachers or {}).values():
        for actor in replicas:
            ray.kill(actor)


def start_store_teacher(job: JobConfig, teacher: Any) -> list[Any]:
    """Readers of a teacher's store (``mlot teach``), after checking that it matches the job: they serve payloads
    like the teacher's actors would, with no model and no GPU."""
    import ray

    from workers.teacher.store import StoreTeacher
    from workers.teacher.store_format import check_store

    meta = check_store(job, teacher)
    readers = [ray.remote(StoreTeacher).options(num_cpus=0, max_restarts=2, max_task_retries=2,
                                                scheduling_strategy=outside_pg()).remote(teacher, job.loss,
                                                                                         job.student)
               for _ in range(teacher.replicas)]
    ray.get([r.info.remote() for r in readers])
    say(f"teacher {teacher.name}: served from its store {teacher.store} ({meta.format}, {meta.rows} rows), "
        f"{len(readers)} reader(s)")
    return readers


# ---------------------------------------------------------------------------- the job


@dataclass
class DistillSummary:
    """What a finished ``mlot distill`` produced."""

    job: str
    export_dir: str
    run_id: str
    tracking_uri: str
    metrics: dict[str, Any] = field(default_factory=dict)
    eval: dict[str, float] = field(default_factory=dict)
    stopped_at: int | None = None  # set when Ctrl-C stopped the run (a checkpoint was written there)


def run_distill(job: JobConfig, *, resume: bool = False, teachers: dict[str, list[Any]] | None = None,
                parent_run_id: str | None = None, train_callbacks: list[Any] | None = None,
                evaluate: bool = True, callbacks: list[Any] | None = None, data: Any = None) -> DistillSummary:
    """Run one distillation job end to end (or continue it with ``resume``).

    Args:
        teachers: {name: [actor handles]} of teacher actors that outlive this job (sweeps, benchmarks);
            by default the job starts its own.
        parent_run_id: MLflow parent run (a sweep). train_callbacks: Ray Train RunConfig callbacks
            (a sweep's TuneReportCallback). evaluate: score the exported student by generation.
        callbacks: ``workers.student.callbacks.TrainCallback``s run inside every training worker (fault tests).
        data: the job's prepared data (a ``DataRef``) when the caller prepared it (a sweep's driver: its trials
            never open ``data.source``); a resumed job reuses the copy its run prepared.
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from workers.student import checkpoint
    from workers.student.console import Console, StopSignal
    from workers.student.engine import deepspeed_config
    from workers.student.recipe import train_loop_per_worker

    run_path = job.run_path
    state_file = storage.join(run_path, "run.json")
    previous = json.loads(storage.read_text(state_file)) if storage.exists(state_file) else None
    if resume and previous is None:
        raise UserError(f"--resume: no earlier run of job {job.name!r} under {run_path}")
    if resume and previous["fingerprint"] != fingerprint(job):
        raise UserError(f"--resume: {run_path} was trained with other model/data/loss settings; "
                        "resume with the config it was started with (steps may change)")

    connect_ray(job)  # a wrong address or token, or a cluster that cannot hold the job, fails before tokenising
    job = with_replicas(job)  # replicas: auto, from the cluster's nodes
    check_placeable(job, teachers=teachers is None and job.loss.spec.needs_teacher)
    if job.train.on_policy.generator:  # a missing vLLM runtime fails before tokenising
        vllm_python(job.train.on_policy.vllm, "train.on_policy.vllm")
    data = data or (_prepared_before(previous) if resume else None) or prepare_data(job)
    uri, run_id = start_tracking(job, previous["run_id"] if resume else None, parent_run_id)
    ray_name = previous["ray_name"] if resume else f"{job.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    state = {"run_id": run_id, "ray_name": ray_name, "fingerprint": fingerprint(job), "data": asdict(data)}
    storage.write_text(state_file, json.dumps(state))
    from mlflow import MlflowClient
    client = MlflowClient(uri)
    _log_data(client, run_id, data, new_run=not resume)
    client.set_tag(run_id, "mlot.driver_node", ray.get_runtime_context().get_node_id())  # where this run was driven
    started: list[Any] = []  # the actors this call starts (not a caller's teachers): they end with it
    try:
        generator = start_generator(job)  # train.on_policy.engine: vllm; it loads while the teachers do
        started += [generator] if generator is not None else []
        if teachers is None:
            teachers = start_teachers(job, data) if job.loss.spec.needs_teacher else {}
            started += [actor for replicas in teachers.values() for actor in replicas]
        if generator is not None:  # an engine that cannot start fails here, not in a worker's first request
            ray.get(generator.info.remote())
        export_dir = storage.join(run_path, "final")
        stop_signal = ray.remote(StopSignal).options(num_cpus=0, scheduling_strategy=outside_pg()).remote()
        # Only a driver in its main thread drains a console (a sweep's trials run in threads of Tune's actors).
        console = ray.remote(Console).options(num_cpus=0, scheduling_strategy=outside_pg()).remote() \
            if threading.current_thread() is threading.main_thread() else None
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={
                "job": job, "data": data, "teachers": teachers,
                "run_id": run_id, "tracking_uri": reachable_from_workers(job, uri), "export_dir": export_dir,
                "export_recipe": export_recipe(job),
                "fingerprint": fingerprint(job),
                "resume_from": checkpoint.newest(storage.join(run_path, "ray", ray_name), job.train.num_workers)
                if resume else None,
                "stop_signal": stop_signal, "console": console, "callbacks": callbacks or [], "generator": generator,
            },
            scaling_config=ScalingConfig(num_workers=job.train.num_workers, use_gpu=job.train.use_gpu,
                                         resources_per_worker=job.train.resources_per_worker or None,
                                         accelerator_type=job.train.accelerator_type),
            torch_config=TorchConfig(backend=job.train.backend),
            run_config=RunConfig(name=ray_name, storage_path=storage.join(run_path, "ray"), callbacks=train_callbacks,
                                 checkpoint_config=CheckpointConfig(num_to_keep=2),
                                 failure_config=FailureConfig(max_failures=job.train.max_failures)),
        )
        zero = deepspeed_config(job)["zero_optimization"].get("stage", 0)
        say(f"training: {job.train.num_workers} worker(s), ZeRO-{zero}, "
            f"loss {job.loss.method} ({job.loss.mode})" + (" - resuming" if resume else ""))
        result = _fit_stoppable(trainer, stop_signal, console)
        if result.error:
            raise result.error
        stopped = (result.metrics or {}).get("train/stopped_at_step")
        if stopped:
            say(f"stopped at step {stopped}; continue with: mlot distill <config> --resume")
            client.set_terminated(run_id, "KILLED")
            return DistillSummary(job.name, export_dir, run_id, uri, dict(result.metrics), {}, int(stopped))
        scores = evaluate_export(job, export_dir, data) if evaluate else {}
        if scores:
            from mlflow.entities import Metric, Param
            now = int(time.time() * 1000)
            client.log_batch(run_id, metrics=[Metric(f"final/{k}", v, now, 0) for k, v in scores.items() if k != "n"],
                             params=[Param("final.scored_rows", str(int(scores["n"])))])
        client.set_terminated(run_id, "FINISHED")
    except BaseException:
        # Inside a sweep the trial may be stopped by the scheduler (which surfaces here as an error):
        # the sweep driver, which knows why a trial ended, closes its run instead.
        if parent_run_id is None:
            client.set_terminated(run_id, "FAILED")
        raise
    finally:
        for actor in started:
            ray.kill(actor)
    return DistillSummary(job.name, export_dir, run_id, uri, dict(result.metrics or {}), scores)


def _prepared_before(state: dict[str, Any]) -> Any:
    """The prepared data a run recorded, when it is still there (then a resumption never opens the source)."""
    from workers.data.prepared import META, DataRef

    ref = state.get("data")
    if not ref or not storage.exists(storage.join(ref["path"], META)):
        return None
    say(f"data: the run's prepared rows at {ref['path']}")
    return DataRef(**{**ref, "cache_hit": True, "seconds": 0.0})


def _log_data(client: Any, run_id: str, data: Any, new_run: bool) -> None:
    """What the data pass produced: the row counts as params (once: they are the run's, and a one-point metric
    would be a chart of its own on the run page), this pass's cache hit and seconds as tags (a resumption's own)."""
    from mlflow.entities import Param, RunTag

    counts = {"data.prepared.train_rows": data.sizes["train"], "data.prepared.eval_rows": data.sizes.get("eval", 0),
              "data.prepared.skipped_rows": data.counts["skipped"],
              "data.prepared.truncated_answers": data.counts["truncated"]}
    client.log_batch(run_id, params=[Param(k, str(v)) for k, v in counts.items()] if new_run else [],
                     tags=[RunTag("mlot.data_fingerprint", data.fingerprint),
                           RunTag("mlot.data_cache_hit", str(data.cache_hit).lower()),
                           RunTag("mlot.data_prepare_s", f"{data.seconds:.2f}")])


def _fit_stoppable(trainer: Any, stop_signal: Any, console: Any) -> Any:
    """``trainer.fit()``, where the first Ctrl-C asks the workers to checkpoint and stop (fit then
    returns normally) and a second one aborts; meanwhile the workers' lines in ``console`` are printed.

    fit runs in a helper thread: in the main thread Ray Train would install its own Ctrl-C handler,
    which aborts the run without a final checkpoint.
    """
    if console is None:  # not the main thread: no signal handler either
        return trainer.fit()
    box: dict[str, Any] = {}

    def fit() -> None:
        try:
            box["result"] = trainer.fit()
        except BaseException as e:  # handed to the main thread
            box["error"] = e

    def handler(signum: int, frame: Any) -> None:
        say("interrupt: the workers checkpoint and stop at the next step (Ctrl-C again to abort)")
        stop_signal.set.remote()
        signal.signal(signal.SIGINT, previous)

    previous = signal.signal(signal.SIGINT, handler)
    worker = threading.Thread(target=fit, name="mlot-fit", daemon=True)
    worker.start()
    try:
        while worker.is_alive():
            worker.join(0.5)  # short waits: the main thread must stay free to run the handler
            _print_lines(console)
        _print_lines(console)
    finally:
        signal.signal(signal.SIGINT, previous)
    if "error" in box:
        raise box["error"]
    return box["result"]


def _print_lines(console: Any) -> None:
    import ray

    for line in ray.get(console.drain.remote()):
        print(line, flush=True)


def export_recipe(job: JobConfig) -> Any:
    """How the exported student is prompted (``specs.recipe.Recipe``, saved beside its weights)."""
    from specs.recipe import Recipe

    return Recipe(job=job.name, template=job.student.template, columns=dict(job.data.columns),
                  max_prompt_length=job.data.max_prompt_length, max_new_tokens=job.data.max_answer_length,
                  metric=job.eval.metric)


def evaluate_export(job: JobConfig, export_dir: str, data: Any) -> dict[str, float]:
    """The exported student's greedy answers scored as ``eval.metric`` says (exact match / F1, ROUGE-Lsum) on a
    seeded sample of at most ``eval.max_rows`` rows of ``data``'s eval split, split over ``eval.num_tasks`` Ray
    tasks (each reads its rows itself); ``n`` is the number of rows scored."""
    import ray

    from specs.progress import Progress
    from workers.data.metrics import gold_answers, score_predictions
    from workers.data.prepared import open_data

    n_eval = data.sizes.get("eval", 0)
    if not n_eval or job.eval.max_rows == 0:
        return {}
    picks = list(range(n_eval))
    if job.eval.max_rows is not None and n_eval > job.eval.max_rows:
        picks = random.Random(job.train.seed).sample(picks, job.eval.max_rows)
    n_tasks = min(job.eval.num_tasks, len(picks))
    chunks = [picks[i::n_tasks] for i in range(n_tasks)]

    @ray.remote(num_cpus=0.5, num_gpus=1 if job.train.use_gpu else 0, scheduling_strategy=outside_pg())
    def _answers(path: str, chunk: list[int]) -> tuple[list[str], list[list[str]]]:
        import torch
        from transformers import AutoModelForCausalLM

        from workers.generation import greedy_answers
        from workers.models import load_tokenizer

        device = "cuda" if torch.cuda.is_available() else "cpu"
        rows = open_data(data).rows("eval", chunk)
        with storage.local_copy(path) as local:
            model = AutoModelForCausalLM.from_pretrained(local).to(device)
            tok = load_tokenizer(local)
        answers = greedy_answers(model, tok, job.student.template, rows, job.data.max_prompt_length,
                                 job.data.max_answer_length, device)
        return answers, [gold_answers(r) for r in rows]

    refs = [_answers.remote(export_dir, chunk) for chunk in chunks]
    progress, pending = Progress("scored", len(picks)), list(refs)
    while pending:
        _, pending = ray.wait(pending, num_returns=1)
        say(progress.line(sum(len(c) for r, c in zip(refs, chunks) if r not in pending)))
    replies = ray.get(refs)
    predictions = [a for answers, _ in replies for a in answers]
    golds = [g for _, chunk_golds in replies for g in chunk_golds]
    return {**score_predictions(predictions, golds, job.eval.metric), "n": float(len(picks))}


def run_with_baseline(job: JobConfig, baseline: str = "sft") -> tuple[DistillSummary, DistillSummary]:
    """The job, then the same budget with ``loss.method=baseline`` (without teachers for methods that need
    none, e.g. sft), for comparison."""
    from mlot.methods import get_method

    # The baseline's config is validated first: a typo must not cost the main run.
    base_job = apply_overrides(job, [f"name={job.name}-{baseline}", f"loss.method={baseline}"])
    if not get_method(baseline).needs_teacher:
        base_job = base_job.model_copy(update={"teachers": []})
    return run_distill(job), run_distill(base_job)
