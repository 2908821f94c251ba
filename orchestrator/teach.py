"""``mlot teach``: run every teacher over the job's rows once and write a store per teacher (``workers.store``),
and the checks that let a job read a teacher from its store (``teachers[i].store``) instead of running it.

Teaching is batch inference on the teachers' own actors and resources: shards of ``shard_rows`` rows go to
the replicas round-robin, each replica runs its shard in length-sorted batches and writes it. A shard that
exists is finished, so an interrupted ``mlot teach`` continues where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from typing import Any

from orchestrator.cluster import connect_ray
from orchestrator.config import JobConfig
from orchestrator.driver import prepare_data, say, start_teachers
from orchestrator.tracking import experiment_id
from specs import UserError, storage

STORE_FORMATS = ("payload", "hidden")


def identity(job: JobConfig, teacher: Any) -> dict[str, Any]:
    """What a store's outputs depend on, apart from the rows themselves (each row carries its tokens' hash):
    the teacher's model, weights recipe and dtype, its tokenizer (full serialisation) and template, and the
    data source and length limits. Not the student: any student can read the store."""
    from workers.models import load_tokenizer
    from workers.prepared import tokenizer_fingerprint

    model = teacher.model_dump(mode="json", include={"model", "hf_config", "dtype", "pretrain", "trust_remote_code"})
    if teacher.hf_config or teacher.pretrain.steps:  # random initial weights: the seed makes them
        model["seed"] = job.train.seed
    d = job.data
    return {"teacher": model,
            "tokenizer": tokenizer_fingerprint(load_tokenizer(teacher.tokenizer_name, teacher.trust_remote_code)),
            "template": teacher.template.model_dump(mode="json"),
            "data": d.model_dump(mode="json", include={"source", "name", "columns", "max_prompt_length",
                                                       "max_answer_length"})}


def check_store(job: JobConfig, teacher: Any) -> dict[str, Any]:
    """The store's metadata, after refusing a store this job cannot read, naming what differs."""
    from workers.store import META, STORE_VERSION, payload_mismatch, shared_needs_hidden

    path = storage.join(teacher.store, META)
    if not storage.exists(path):
        raise UserError(f"teachers[{teacher.name}].store: {teacher.store!r} is not a teacher store (no {META}); "
                        "make it with: mlot teach CONFIG --out DIR")
    meta = json.loads(storage.read_text(path))
    if meta.get("version") != STORE_VERSION:
        raise UserError(f"teachers[{teacher.name}].store: {teacher.store!r} has store format version "
                        f"{meta.get('version')!r}, this mlot reads {STORE_VERSION}; teach it again")
    if not meta.get("complete"):
        raise UserError(f"teachers[{teacher.name}].store: {teacher.store!r} is unfinished; run mlot teach again "
                        "with the same config and --out to finish it")
    want = identity(job, teacher)
    diff = [k for k in want if meta["identity"].get(k) != want[k]]
    if diff:
        detail = "; ".join(f"{k}: store {_short(meta['identity'].get(k))}, job {_short(want[k])}" for k in diff)
        raise UserError(f"teachers[{teacher.name}].store: {teacher.store!r} was made with another {', '.join(diff)} "
                        f"({detail}); teach this job's teacher again")
    if meta["format"] == "payload":
        if job.loss.mode == "reference":
            raise UserError(f"teachers[{teacher.name}].store: a payload store cannot serve loss.mode reference "
                            "(its columns are ranked per micro-batch); make the store with --format hidden")
        wanted = job.loss.payload_config().teacher_settings()
        if meta["payload_settings"] != wanted:
            raise UserError(payload_mismatch(teacher.name, meta["payload_settings"], wanted))
        if job.loss.spec.identity_config(job.loss.params).shared:
            raise UserError(f"teachers[{teacher.name}].store: {shared_needs_hidden(teacher.name)}")
    return meta


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= 80 else f"{text[:60]}... (sha {hashlib.sha256(text.encode()).hexdigest()[:8]})"


def run_teach(job: JobConfig, out: str | None = None, fmt: str = "payload", compress: str | None = None,
              hidden_dtype: str = "bfloat16", batch_size: int = 64, shard_rows: int = 1024) -> dict[str, str]:
    """Write a store for every teacher of ``job`` (those without one) under ``out`` (default
    ``<run_path>/store``); returns {teacher name: store path}."""
    from mlflow import MlflowClient

    if fmt not in STORE_FORMATS:
        raise UserError(f"--format {fmt!r}: one of {', '.join(STORE_FORMATS)}")
    if fmt == "payload" and job.loss.mode == "reference":
        raise UserError("--format payload cannot serve loss.mode reference (columns are ranked per micro-batch): "
                        "use --format hidden")
    live = [t for t in job.teachers if not t.store]
    if not live:
        raise UserError(f"job {job.name!r} has no teacher to teach (every teacher reads a store already)")
    out = out or storage.join(job.run_path, "store")
    data = prepare_data(job)
    connect_ray(job)
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
        import ray
        for replicas in teachers.values():
            for actor in replicas:
                ray.kill(actor)
    return paths


def _teach_one(job: JobConfig, teacher: Any, replicas: list[Any], data: Any, path: str, client: Any, run_id: str,
               opts: dict[str, Any]) -> str:
    import ray
    from tqdm import tqdm

    from workers.prepared import Rows
    from workers.store import META, STORE_VERSION, shard_path

    meta = {"version": STORE_VERSION, "teacher": teacher.name, "identity": identity(job, teacher),
            "format": opts["format"],
            "compress": opts["compress"] if opts["format"] == "payload" else None,
            "hidden_dtype": opts["hidden_dtype"] if opts["format"] == "hidden" else None,
            "payload_settings": job.loss.payload_config().teacher_settings() if opts["format"] == "payload" else None,
            "vocab_size": ray.get(replicas[0].info.remote())["vocab_size"], "data_fingerprint": data.fingerprint}
    meta_path = storage.join(path, META)
    if storage.exists(meta_path):
        old = json.loads(storage.read_text(meta_path))
        if {k: v for k, v in old.items() if k not in ("complete", "rows")} != meta:
            raise UserError(f"--out: {path} holds a store made with other settings or data; choose another --out "
                            "or remove it")
    storage.write_text(meta_path, json.dumps({**meta, "complete": False}, indent=1))
    if opts["format"] == "hidden":
        ray.get(replicas[0].write_head.remote(path, data))

    n = opts["shard_rows"]
    shards = [(split, i, Rows(data, split, tuple(range(i * n, min((i + 1) * n, size)))))
              for split, size in data.sizes.items() for i in range(math.ceil(size / n))]
    todo = [(split, i, rows) for split, i, rows in shards if not storage.exists(shard_path(path, split, i))]
    say(f"teach {teacher.name}: {len(shards)} shard(s) of <= {n} rows, {len(shards) - len(todo)} already done, "
        f"{len(replicas)} replica(s), format {opts['format']} -> {path}")
    t0, stats = time.perf_counter(), []
    pending: dict[Any, int] = {}
    with tqdm(total=len(todo), desc=f"teach {teacher.name}", unit="shard") as bar:
        for j, (split, i, rows) in enumerate(todo):
            if len(pending) >= 2 * len(replicas):  # two shards queued per replica keeps every replica busy
                stats.append(_collect(pending, bar))
            actor = replicas[j % len(replicas)]
            ref = actor.teach.remote(rows, shard_path(path, split, i), opts["format"], job.loss, opts["batch_size"],
                                     opts["compress"], opts["hidden_dtype"])
            pending[ref] = j
        while pending:
            stats.append(_collect(pending, bar))
    wall = time.perf_counter() - t0
    storage.write_text(meta_path, json.dumps({**meta, "complete": True, "rows": sum(data.sizes.values())}, indent=1))
    _log_teach(client, run_id, teacher.name, stats, wall)
    return path


def _collect(pending: dict[Any, int], bar: Any) -> dict[str, Any]:
    import ray

    [ready], _ = ray.wait(list(pending), num_returns=1)
    pending.pop(ready)
    bar.update(1)
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
