"""Sweep wall time and teacher forward passes with shared (cached) teachers vs teachers per trial.

    python benchmarks/tune_sharing.py [--trials 3] [--steps 8]

Runs the same small sweep twice in one process on a local Ray cluster (the quickstart job, a grid over
the teacher temperature and top-k, i.e. settings that change every payload): once with one set of
teacher actors for the whole sweep (hidden states cached, LM head recomputed per trial), once with
each trial starting its own teachers.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from common import QUICKSTART

from orchestrator.cli import bundled_config
from orchestrator.configuration import load_config
from orchestrator.tune import run_tune


def teacher_rows(s) -> int:
    """Teacher forward rows as the trials logged them: cumulative for shared teachers (take the largest),
    per trial for per-trial teachers (add them up)."""
    from mlflow import MlflowClient

    client = MlflowClient(s.tracking_uri)
    parent = client.get_run(s.parent_run_id)
    runs = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{s.parent_run_id}'")
    vals = [v for r in runs for k, v in r.data.metrics.items()
            if k.startswith("teacher/") and k.endswith("forward_rows")]
    return int(max(vals)) if s.teacher_forward_rows is not None else int(sum(vals))


def sweep(out: Path, name: str, trials: int, steps: int, share: bool):
    import ray

    space = out / "space.yaml"
    temps = [1.0, 1.5, 2.0, 2.5, 3.0][:trials]
    space.write_text(f"loss.params.teacher_temperature: {{grid: {temps}}}\n")
    job = load_config(bundled_config(QUICKSTART), [
        f"name={name}", f"output_dir={out}", f"tracking.uri=sqlite:///{out}/mlflow.db", f"train.steps={steps}",
        "train.warmup_steps=0", f"train.eval_every={steps}", f"train.checkpoint_every={steps}",
        "teachers.0.pretrain.steps=0"])
    t0 = time.time()
    try:
        s = run_tune(job, str(space), max_concurrent=1, share_teachers=share)
    finally:
        ray.shutdown()
    return time.time() - t0, s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--steps", type=int, default=8)
    args = ap.parse_args()
    out = Path(tempfile.mkdtemp(prefix="mlot-tune-bench-"))
    sweep(out, "warm-up", 1, 2, True)  # first-use costs (imports, MLflow schema, tokenizer files) land here
    shared_s, shared = sweep(out, "shared", args.trials, args.steps, True)
    own_s, own = sweep(out, "per-trial", args.trials, args.steps, False)
    shared_rows, own_rows = teacher_rows(shared), teacher_rows(own)
    batch = load_config(bundled_config(QUICKSTART)).train.batch_size
    print(f"\n{args.trials} trials x {args.steps} steps (batch {batch}), quickstart models, CPU, one trial at a time")
    print(f"{'':28s} {'wall s':>8s} {'teacher forward rows':>22s}")
    print(f"{'shared teachers (cached)':28s} {shared_s:8.1f} {shared_rows:22d}")
    print(f"{'teachers per trial':28s} {own_s:8.1f} {own_rows:22d}")
    print(f"ratio (per-trial / shared): {own_s / shared_s:.2f}x wall time, {own_rows / max(shared_rows, 1):.2f}x "
          "teacher forward passes")


if __name__ == "__main__":
    main()
