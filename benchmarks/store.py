"""The teacher output store: teach throughput, bytes per answer token, and the student step reading from it.

    python benchmarks/store.py [--steps 30] [--rows 2000] [--repeats 3]

On the bundled quickstart job (SentencePiece teacher, WordPiece student), in one process on a local Ray:

* teach throughput (``mlot teach``: batches of 64 rows sorted by length, one replica) against live serving
  of the same rows (the teacher actor answering the students' micro-batches of ``train.batch_size``);
* store bytes per teacher answer token for each format, against bf16 full-vocabulary logits;
* the student's median step time with its teacher read from the store, against the same payloads computed
  beforehand and held in memory (a warmed ``PayloadCache`` in front of the live teacher).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from common import QUICKSTART
from mlflow import MlflowClient
from pipeline import metric

import mlot
from orchestrator.cli import bundled_config
from orchestrator.configuration import apply_overrides, load_config
from orchestrator.driver import connect_ray, prepare_data, run_distill, start_teachers
from orchestrator.teach import run_teach
from workers.data.prepared import Rows
from workers.student.payload_stream import BatchOrder

FORMATS = {"payload (fp32)": {}, "payload (fp16)": {"compress": "fp16"},
           "hidden (bf16)": {"fmt": "hidden"}, "hidden (fp32)": {"fmt": "hidden", "hidden_dtype": "float32"}}


def teach_metrics(job, name: str) -> dict[str, float]:
    client = MlflowClient(job.tracking.resolved_uri())
    exp = client.get_experiment_by_name(job.tracking.experiment).experiment_id
    [run] = client.search_runs([exp], f"tags.`mlot.teach` = '{job.name}'", order_by=["start_time DESC"],
                               max_results=1)
    return {k.split("/")[-1]: v for k, v in run.data.metrics.items() if k.startswith(f"teach/{name}/")}


def live_serving(job, data, teachers) -> dict[str, float]:
    """The live teacher over the same rows, one student micro-batch at a time (what training asks of it)."""
    import ray

    [actor] = next(iter(teachers.values()))
    n, b = data.sizes["train"], job.train.batch_size
    batches = [Rows(data, "train", tuple(range(i, min(i + b, n)))) for i in range(0, n, b)]
    t0 = time.perf_counter()
    replies = ray.get([actor.payload.remote(rows, loss=job.loss) for rows in batches])
    wall = time.perf_counter() - t0
    return {"rows_per_s": n / wall, "tokens_per_s": sum(r["answer_tokens"] for r in replies) / wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rows", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=3, help="alternated store / in-memory runs of each")
    args = ap.parse_args()
    import ray

    from workers.teacher.actor import PayloadCache

    out = Path(tempfile.mkdtemp(prefix="mlot-store-bench-"))
    base = [f"output_dir={out}", f"tracking.uri=sqlite:///{out}/mlflow.db", f"train.steps={args.steps}",
            "train.warmup_steps=0", f"train.checkpoint_every={args.steps}", "train.eval_every=null",
            "teachers.0.pretrain.steps=0", f"data.limit={args.rows}", "data.eval_fraction=0"]
    job = load_config(bundled_config(QUICKSTART), [*base, "name=bench"])
    teacher = job.teachers[0].name
    data = prepare_data(job)
    connect_ray(job)

    stores, sizes = {}, {}
    for label, opts in FORMATS.items():
        stores[label] = run_teach(job, out=str(out / label.replace(" ", "_")), **opts)[teacher]
        sizes[label] = teach_metrics(job, teacher)
    teachers = start_teachers(job, data)
    live = live_serving(job, data, teachers)

    # Precomputed payloads in memory: a cache in front of the live teacher, warmed with the workers' batches.
    cached = {name: [ray.remote(PayloadCache).options(num_cpus=0).remote(h) for h in hs]
              for name, hs in teachers.items()}
    order = BatchOrder(data.sizes["train"], 0, 1, job.train.batch_size, job.train.seed)
    warm = [hs[0].payload.remote(Rows(data, "train", tuple(order(m))), loss=job.loss)
            for m in range(args.steps * job.train.grad_accum + job.train.prefetch + 1) for hs in cached.values()]
    ray.wait(warm, num_returns=len(warm))
    # Alternated, so neither side always runs first on a machine whose speed drifts.
    steps: dict[str, list[float]] = {"memory": [], "store": []}
    for r in range(args.repeats):
        memory = run_distill(apply_overrides(job, [f"name=in-memory-{r}"]), teachers=cached, evaluate=False)
        steps["memory"].append(statistics.median(metric(memory, "train/step_s")))
        from_store = run_distill(apply_overrides(job, [f"name=from-store-{r}",
                                                       f"teachers.0.store={stores['payload (fp32)']}"]), evaluate=False)
        steps["store"].append(statistics.median(metric(from_store, "train/step_s")))

    t = sizes["payload (fp32)"]
    print(f"\nquickstart job, {args.rows} rows (no eval split), teacher vocab 32,000, 1 replica, CPU")
    print("| teacher over the rows | rows/s | answer tokens/s |\n|---|---|---|")
    print(f"| live, micro-batches of {job.train.batch_size} | {live['rows_per_s']:.0f} | {live['tokens_per_s']:.0f} |")
    print(f"| mlot teach (payload, batches of 64 by length) | {t['rows_per_s']:.0f} | {t['tokens_per_s']:.0f} |")
    print(f"teach / live: {t['rows_per_s'] / live['rows_per_s']:.2f}x")
    full = mlot.full_logits_bytes_per_token(32000)
    print(f"\n| format | bytes per answer token | vs bf16 logits ({full:,} B) |\n|---|---|---|")
    for label, m in sizes.items():
        print(f"| {label} | {m['bytes_per_token']:.0f} | {full / m['bytes_per_token']:.0f}x smaller |")
    a, b = statistics.median(steps["store"]), statistics.median(steps["memory"])
    print(f"\nstudent step (median s over {args.steps - 2} steps, median of {args.repeats} alternated runs each): "
          f"from the store {a:.4f}, in-memory payloads {b:.4f} -> {a / b:.2f}x  (runs: {steps})")


if __name__ == "__main__":
    main()
