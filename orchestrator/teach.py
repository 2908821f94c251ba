"""``mlot teach``: run every teacher over the job's rows once and write a store per teacher (``workers.teacher.store``;
its format, meta and the check that lets a job read it instead of running the teacher: ``store_format``).

Teaching is batch inference on the teachers' own actors and resources: shards of ``shard_rows`` rows go to
the replicas round-robin, each replica runs its shard in length-sorted batches and writes it. A shard that
exists is finished, so an interrupted ``mlot teach`` continues where it stopped.
"""

from __future__ import annotations

import math
import time
from typing import Any

from orchestrator.cluster import connect_ray, with_replicas
from orchestrator.config import JobConfig
from orchestrator.driver import prepare_data, say, start_teachers, stop_teachers
from orchestrator.tracking import experiment_id
from specs import UserError, storage
from workers.teacher.store_format import HIDDEN, META, PAYLOAD, StoreMeta, check_format, shard_path, store_identity


def run_teach(job: JobConfig, out: str | None = None, fmt: str = "payload", compress: str | None = None,
              hidden_dtype: str = "bfloat16", batch_size: int = 64, shard_rows: int = 1024) -> dict[str, str]:
    """Write a store for every teacher of ``job`` (those without one) under ``out`` (default
    ``<run_path>/store``); returns {teacher name: store path}."""
    from mlflow import MlflowClient

    check_format(fmt, job.loss.mode)
    vllm = [f"teachers.{i}.engine" for i, t in enumerate(job.teachers) if t.engine == "vllm" and not t.store]
    if vllm:
        raise UserError(f"{', '.join(vllm)}: mlot teach writes stores with the hf engine (a store must serve any "
                        "later loss's payload, and vLLM returns top-K log-probabilities); set it to hf to teach")
    if all(t.store for t in job.teachers):
        raise UserError(f"job {job.name!r} has no teacher to teach (every teacher reads a store already)")
    out = out or storage.join(job.run_path, "store")
    data = prepare_data(job)
    connect_ray(job)
    job = with_replicas(job)  # replicas: auto, from the cluster's nodes
    live = [t for t in job.teachers if not t.store]
    uri = job.tracking.resolved_uri()
    client = MlflowClient(uri)
    run_id = client.create_run(experiment_id(client, job.tracking.experiment, uri), run_name=f"{job.name}-teach",
                               tags={"mlot.teach": job.name, **job.tracking.tags}).info.run_id
    teachers = start_teachers(job.model_copy(update={"teachers": live}), data)
    paths = {}
    try:
        for t in live:
            paths[t.name] = _teach_one(job, t, teachers[t.name], data, storage.join(out, t.name), client, run_id,
                                       {"format": fmt, "compress": compress, "hidden_dtype": hidden_dtype,
                                        "batch_size": batch_size, "shard_rows": shard_rows})
        client.set_terminated(run_id, "FINISHED")
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    finally:
        stop_teachers(teachers)
    return paths


def _teach_one(job: JobConfig, teacher: Any, replicas: list[Any], data: Any, path: str, client: Any, run_id: str,
               opts: dict[str, Any]) -> str:
    import ray

    from specs.progress import Progress
    from workers.data.prepared import Rows

    fmt = opts["format"]
    meta = StoreMeta(teacher.name, store_identity(job, teacher), fmt, ray.get(replicas[0].info.remote())["vocab_size"],
                     data.fingerprint, compress=opts["compress"] if fmt == PAYLOAD else None,
                     hidden_dtype=opts["hidden_dtype"] if fmt == HIDDEN else None,
                     payload_settings=job.loss.payload_config().teacher_settings() if fmt == PAYLOAD else None)
    if storage.exists(storage.join(path, META)) and not StoreMeta.read(path, "--out").same_recipe(meta):
        raise UserError(f"--out: {path} holds a store made with other settings or data; choose another --out "
                        "or remove it")
    meta.write(path)
    if fmt == HIDDEN:
        ray.get(replicas[0].write_head.remote(path, data))

    n = opts["shard_rows"]
    shards = [(split, i, Rows(data, split, tuple(range(i * n, min((i + 1) * n, size)))))
              for split, size in data.sizes.items() for i in range(math.ceil(size / n))]
    todo = [(split, i, rows) for split, i, rows in shards if not storage.exists(shard_path(path, split, i))]
    say(f"teach {teacher.name}: {len(shards)} shard(s) of <= {n} rows, {len(shards) - len(todo)} already done, "
        f"{len(replicas)} replica(s), format {opts['format']} -> {path}")
    t0, stats = time.perf_counter(), []
    pending: dict[Any, int] = {}
    progress = Progress(f"teach {teacher.name}: shard", len(todo))
    for j, (split, i, rows) in enumerate(todo):
        if len(pending) >= 2 * len(replicas):  # two shards queued per replica keeps every replica busy
            stats.append(_collect(pending, progress, len(stats) + 1))
        actor = replicas[j % len(replicas)]
        ref = actor.teach.remote(rows, shard_path(path, split, i), fmt, job.loss, opts["batch_size"],
                                 opts["compress"], opts["hidden_dtype"])
        pending[ref] = j
    while pending:
        stats.append(_collect(pending, progress, len(stats) + 1))
    wall = time.perf_counter() - t0
    meta.complete, meta.rows = True, sum(data.sizes.values())
    meta.write(path)
    _log_teach(client, run_id, teacher.name, stats, wall)
    return path


def _collect(pending: dict[Any, int], progress: Any, done: int) -> dict[str, Any]:
    """The next shard's stats, once written; a progress line for every 5% of the shards."""
    import ray

    [ready], _ = ray.wait(list(pending), num_returns=1)
    pending.pop(ready)
    if done == progress.total or done % max(1, progress.total // 20) == 0:
        say(progress.line(done))
    return ray.get(ready)


def _log_teach(client: Any, run_id: str, name: str, stats: list[dict[str, Any]], wall: float) -> None:
    from mlflow.entities import Metric

    rows, tokens, nbytes = (sum(s[k] for s in stats) for k in ("rows", "answer_tokens", "bytes"))
    values = {"rows": rows, "answer_tokens": tokens, "bytes": nbytes, "wall_s": wall,
              "rows_per_s": rows / wall if wall else 0.0, "tokens_per_s": tokens / wall if wall else 0.0,
              "bytes_per_token": nbytes / max(tokens, 1)}
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(f"teach/{name}/{k}", float(v), now, 0) for k, v in values.items()])
    if rows:
        say(f"teach {name}: {rows} rows, {tokens} answer tokens in {wall:.1f}s ({values['rows_per_s']:.0f} rows/s), "
            f"{nbytes / 2**20:.1f} MiB ({values['bytes_per_token']:.0f} bytes/token)")
