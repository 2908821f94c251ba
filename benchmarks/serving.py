"""Teacher serving: one replica per request (today's default) against the batching replica, 1-4 student workers.

    python benchmarks/serving.py [--workers 1,2,4] [--steps 12] [--max-batch-tokens 4096] [--set KEY=VALUE ...]

The quickstart job with a teacher of ~58M parameters (Llama, hidden 512 x 8 layers, the SentencePiece
vocabulary) so that the teacher dominates as it does on a cluster, one replica, the same rows and steps for
both kinds of serving. Per configuration: teacher forwards per 100 worker micro-batches, rows per forward, the
teacher's busy fraction (seconds serving / the training's wall time), the students' teacher-wait fraction, the
median step time, and the largest per-step loss difference against per-request serving (the same batches: the
payloads agree up to fp32 rounding of the longer padding, ``workers.teacher.actor.TeacherActor.serve_merged``).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from common import QUICKSTART
from mlflow import MlflowClient

from orchestrator.cli import bundled_config
from orchestrator.configuration import load_config
from orchestrator.driver import connect_ray, prepare_data, run_distill, start_teachers

TEACHER = ["teachers.0.hf_config.hidden_size=512", "teachers.0.hf_config.num_hidden_layers=8",
           "teachers.0.hf_config.intermediate_size=1408", "teachers.0.hf_config.num_attention_heads=8",
           "teachers.0.hf_config.num_key_value_heads=8"]


def history(summary, key: str) -> dict[int, float]:
    return {m.step: m.value for m in MlflowClient(summary.tracking_uri).get_metric_history(summary.run_id, key)}


def one(base: list[str], workers: int, batching: int | None) -> dict[str, float | dict[int, float]]:
    import ray

    name = f"w{workers}-{'batched' if batching else 'alone'}"
    sets = [*base, f"name={name}", f"train.num_workers={workers}",
            f"teachers.0.serving.max_batch_tokens={batching if batching else 'null'}"]
    job = load_config(bundled_config(QUICKSTART), sets)
    data = prepare_data(job)
    teachers = start_teachers(job, data)
    t0 = time.perf_counter()
    s = run_distill(job, teachers=teachers, evaluate=False)
    wall = time.perf_counter() - t0
    [info] = ray.get([h.info.remote() for h in teachers["teacher-sp"]])
    for h in teachers["teacher-sp"]:
        ray.kill(h)
    steps = history(s, "train/step_s")
    micro = len(steps) * workers * job.train.grad_accum
    wait = statistics.mean(history(s, "train/teacher_wait_frac").values())
    return {"forwards_per_100": 100 * info["forwards"] / micro, "busy": info["busy_s"] / sum(steps.values()),
            "rows_per_forward": info["forward_rows"] / info["forwards"], "wait": wait,
            "step_s": statistics.median(steps.values()), "wall_s": wall, "loss": history(s, "train/loss")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", default="1,2,4")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--max-batch-tokens", type=int, default=4096)
    ap.add_argument("--set", action="append", default=[])
    args = ap.parse_args()

    out = Path(tempfile.mkdtemp(prefix="mlot-serving-"))
    base = [f"output_dir={out}", f"tracking.uri=sqlite:///{out}/mlflow.db", f"train.steps={args.steps}",
            "train.warmup_steps=0", f"train.checkpoint_every={args.steps}", "train.eval_every=null",
            "teachers.0.pretrain.steps=0", "cluster.num_cpus=8", "data.limit=800", *TEACHER, *args.set]
    connect_ray(load_config(bundled_config(QUICKSTART), base))
    rows = []
    for w in (int(x) for x in args.workers.split(",")):
        alone, batched = one(base, w, None), one(base, w, args.max_batch_tokens)
        diff = max(abs(batched["loss"][k] - alone["loss"][k]) for k in alone["loss"])
        rows += [(w, "per request", alone, None), (w, f"batched ({args.max_batch_tokens} tokens)", batched, diff)]
    print(f"\nteacher ~58M parameters, 1 replica, quickstart student, {args.steps} steps, CPU")
    print("| workers | serving | forwards / 100 micro-batches | rows / forward | teacher busy | student teacher "
          "wait | median step (s) | max loss diff vs per request |")
    print("|---|---|---|---|---|---|---|---|")
    for w, label, r, diff in rows:
        print(f"| {w} | {label} | {r['forwards_per_100']:.0f} | {r['rows_per_forward']:.1f} | {r['busy']:.2f} | "
              f"{r['wait']:.2f} | {r['step_s']:.3f} | {'-' if diff is None else f'{diff:.1e}'} |")


if __name__ == "__main__":
    main()
