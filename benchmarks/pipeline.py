"""The distillation pipeline on a real local Ray cluster: payload size, teacher wait, step time.

    python benchmarks/pipeline.py [--steps 40] [--workers 1] [--on-policy 0,0.5,1] [--set KEY=VALUE ...]
    python benchmarks/pipeline.py --engines per_layer,once,vllm [--steps 12 --workers 2 --set ...]

Runs the bundled quickstart job twice in one process with the same batches: once with live teacher
actors, once with every payload computed beforehand (a PayloadCache in front of the same teacher), and
prints the student step time of the two, the teacher-wait fraction, tokens/s and payload bytes per
answer token against full bf16 logits.

``--on-policy``: then the same job with live teachers for each ``train.on_policy.fraction`` given (the student
samples its answers on that share of micro-batches and the teachers score them): step time (ratio to the
first), generation's share of it, mean generated answer length and teacher wait.

``--engines``: only the on-policy step time of each way to sample (``per_layer`` and ``once``: the hf engine's
``train.on_policy.gather``; ``vllm``: ``train.on_policy.engine: vllm``, weights sent every step), every micro-batch
on-policy, against the same job off-policy, with the same live teachers.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from common import QUICKSTART
from mlflow import MlflowClient

import mlot
from orchestrator.cli import bundled_config
from orchestrator.configuration import load_config
from orchestrator.driver import connect_ray, prepare_data, run_distill, start_teachers
from workers.data.prepared import Rows
from workers.student.payload_stream import BatchOrder


def metric(summary, key: str, skip: int = 2) -> list[float]:
    hist = MlflowClient(summary.tracking_uri).get_metric_history(summary.run_id, key)
    return [m.value for m in sorted(hist, key=lambda m: m.step)][skip:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--on-policy", help="comma-separated train.on_policy.fraction values to compare, e.g. 0,0.5,1")
    ap.add_argument("--engines", help="comma-separated ways to sample on-policy answers: per_layer, once, vllm")
    args = ap.parse_args()
    import ray

    from workers.teacher.actor import PayloadCache

    out = Path(tempfile.mkdtemp(prefix="mlot-pipeline-"))
    base = [f"output_dir={out}", f"tracking.uri=sqlite:///{out}/mlflow.db", f"train.steps={args.steps}",
            "train.warmup_steps=0", f"train.checkpoint_every={args.steps}", "train.eval_every=null",
            "teachers.0.pretrain.steps=0", f"train.num_workers={args.workers}", *args.set]
    job = load_config(bundled_config(QUICKSTART), [*base, "name=live"])
    data = prepare_data(job)
    connect_ray(job)
    teachers = start_teachers(job, data)
    if args.engines:
        return on_policy_table(base, [0.0] + [1.0] * len(args.engines.split(",")), teachers,
                               [""] + args.engines.split(","))
    live = run_distill(job, teachers=teachers)

    # The same teacher behind a cache, warmed with exactly the batches the workers will ask for.
    cached = {name: [ray.remote(PayloadCache).options(num_cpus=0).remote(h) for h in hs]
              for name, hs in teachers.items()}
    world, ga = job.train.num_workers, job.train.grad_accum
    warm = []
    for rank in range(world):
        order = BatchOrder(data.sizes["train"], rank, world, job.train.batch_size, job.train.seed)
        for m in range(args.steps * ga + job.train.prefetch + 1):
            rows = Rows(data, "train", tuple(order(m)))
            for hs in cached.values():
                warm.append(hs[(m * world + rank) % len(hs)].payload.remote(rows, loss=job.loss))
    ray.wait(warm, num_returns=len(warm))
    job2 = load_config(bundled_config(QUICKSTART), [*base, "name=precomputed"])
    pre = run_distill(job2, teachers=cached)

    step_live, step_pre = (statistics.median(metric(live, "train/step_s")),
                           statistics.median(metric(pre, "train/step_s")))
    print(f"\nquickstart models, {args.workers} worker(s), {args.steps} steps, batch {job.train.batch_size}, CPU")
    print(f"{'':34s} {'live teachers':>14s} {'precomputed':>12s}")
    print(f"{'student step (median s)':34s} {step_live:14.4f} {step_pre:12.4f}   ratio {step_live / step_pre:.2f}x")
    for key, label in [("train/teacher_wait_frac", "teacher wait fraction (mean)"),
                       ("train/tokens_per_s", "tokens/s (median)")]:
        f = statistics.mean if "frac" in key else statistics.median
        print(f"{label:34s} {f(metric(live, key)):14.3f} {f(metric(pre, key)):12.3f}")
    bpt = statistics.mean(metric(live, f"train/{job.teachers[0].name}/payload_bytes_per_token"))
    full = mlot.full_logits_bytes_per_token(32000)
    print(f"payload bytes per teacher answer token (as shipped, padding included): {bpt:.0f}; full bf16 logits: {full} "
          f"-> {full / bpt:.0f}x smaller")
    print(f"cache: {[ray.get(h.stats.remote()) for hs in cached.values() for h in hs]}")
    if args.on_policy:
        on_policy_table(base, [float(f) for f in args.on_policy.split(",")], teachers)


ENGINES = {"": [], "per_layer": ["train.on_policy.gather=per_layer"], "once": ["train.on_policy.gather=once"],
           "vllm": ["train.on_policy.engine=vllm", "train.on_policy.sync_every=1"]}


def on_policy_table(base: list[str], fractions: list[float], teachers: dict, engines: list[str] | None = None) -> None:
    """The quickstart job for each on-policy fraction (and way to sample, ``ENGINES``), with the same live teachers."""
    rows = []
    for f, engine in zip(fractions, engines or [""] * len(fractions)):
        job = load_config(bundled_config(QUICKSTART), [*base, f"name=on-policy-{f}-{engine}",
                                                       f"train.on_policy.fraction={f}", *ENGINES[engine]])
        s = run_distill(job, teachers=teachers, evaluate=False)
        step, wait = metric(s, "train/step_s"), metric(s, "train/teacher_wait_s")
        gen = metric(s, "train/generation_s") if f > 0 else [0.0]
        sync = metric(s, "train/weight_sync_s", skip=0) if engine == "vllm" else []
        length = (metric(s, "train/generated_tokens", skip=0) or [0.0]) if f > 0 else [0.0]
        rows.append((f, engine, statistics.mean(step), sum(gen) / sum(step), statistics.mean(length),
                     sum(wait) / sum(step), statistics.mean(sync) if sync else 0.0))
    # Means, not medians: with 0 < fraction < 1 the step times are bimodal (generating or not).
    print("\n| on-policy fraction | sampled by | student step (mean s) | ratio | generation share | generated tokens "
          "| teacher wait share | weight sync (mean s) |")
    print("|---|---|---|---|---|---|---|---|")
    for f, engine, step, gen, length, wait, sync in rows:
        print(f"| {f} | {engine or '-'} | {step:.4f} | {step / rows[0][2]:.2f}x | {gen:.2f} | {length:.1f} "
              f"| {wait:.2f} | {sync:.3f} |")


if __name__ == "__main__":
    main()
