"""The data path at scale: start-up to the first optimizer step, driver and worker memory, tokenising speed.

    python benchmarks/data.py [--sizes 10000 100000] [--baseline REV] [--out DIR]
    python benchmarks/data.py --whole-job [--sizes 10000 100000]

Writes QED-like JSON lines (the shared QED validation rows, repeated with distinct ids) of each size and runs
the bundled ``qed_small.yaml`` job (teacher not pretrained, one training step, no evaluation) in a fresh
process per measurement:

* ``first``: an empty tokenisation cache; ``cached``: the same job again (the cache is hit);
* ``--baseline REV``: the same job with the code of git revision REV (checked out in a worktree), the data
  path before the cached pass, for a ratio in the same run;
* tokenising only (``workers.data.prepared.prepare``) at the smallest size with 1 and 2 processes, and the
  projection to 1M rows.

``--whole-job`` measures instead the wall time of a whole 2-step job (in-loop eval at step 2 over
``train.eval_rows``, checkpoint, export, end-of-job scoring over ``eval.max_rows``), the second of two runs of
each size (the first fills the tokenisation cache), from ``run_distill``'s call to its return.

Start-up is from the process's start to the MLflow timestamp of step 1's metrics; the worker's peak RSS is
``train/peak_mem_mb`` of step 1 (CPU: the process's peak RSS); the driver's is its own ``ru_maxrss``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QED = ROOT.parent / "shared" / "data" / "qed" / "validation.jsonl"
T0 = time.time()


def write_rows(path: Path, n: int) -> None:
    base = [json.loads(line) for line in QED.read_text().splitlines() if line.strip()]
    with path.open("w") as f:
        for i in range(n):
            f.write(json.dumps({**base[i % len(base)], "id": f"row-{i}"}) + "\n")


def overrides(rows_file: Path, out: Path) -> list[str]:
    return [f"output_dir={out}", f"tracking.uri=sqlite:///{out}/mlflow.db", f"data.source={rows_file}",
            "train.steps=1", "train.warmup_steps=0", "train.checkpoint_every=1", "train.eval_every=null",
            "teachers.0.pretrain.steps=0"]


def child_startup(rows_file: Path, out: Path, name: str) -> dict[str, float]:
    """One job to its first optimizer step (this process is its driver)."""
    from mlflow import MlflowClient

    from orchestrator.cli import bundled_config
    from orchestrator.configuration import load_config
    from orchestrator.driver import run_distill

    job = load_config(bundled_config("qed_small.yaml"), [*overrides(rows_file, out), f"name={name}"])
    s = run_distill(job, evaluate=False)
    client = MlflowClient(s.tracking_uri)
    first = min(client.get_metric_history(s.run_id, "train/loss"), key=lambda m: m.step)
    worker = client.get_metric_history(s.run_id, "train/peak_mem_mb")[0].value
    prepare = client.get_run(s.run_id).data.tags.get("mlot.data_prepare_s")
    return {"startup_s": first.timestamp / 1000 - T0, "worker_rss_mb": worker,
            "driver_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "prepare_s": float(prepare) if prepare else float("nan")}


def child_job(rows_file: Path, out: Path, name: str) -> dict[str, float]:
    """A whole 2-step job with its evaluations (this process is its driver); its wall time."""
    from orchestrator.cli import bundled_config
    from orchestrator.configuration import load_config
    from orchestrator.driver import run_distill

    job = load_config(bundled_config("qed_small.yaml"), [*overrides(rows_file, out), f"name={name}", "train.steps=2",
                                                         "train.checkpoint_every=2", "train.eval_every=2"])
    t0 = time.time()
    s = run_distill(job)
    return {"job_s": time.time() - t0, "scored_rows": s.eval.get("n", 0)}


def child_tokenise(rows_file: Path, out: Path, num_proc: int) -> dict[str, float]:
    from orchestrator.cli import bundled_config
    from orchestrator.configuration import load_config
    from workers.data.prepared import prepare

    job = load_config(bundled_config("qed_small.yaml"), overrides(rows_file, out))
    data = prepare(job, str(out / f"cache-{num_proc}"), num_proc=num_proc, say=lambda msg: None)
    n = data.sizes["train"] + data.sizes["eval"] + data.counts["skipped"]
    return {"rows_per_s": n / data.seconds, "seconds": data.seconds}


def run_child(args: list[str], pythonpath: Path = ROOT) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(pythonpath), "TQDM_DISABLE": "1"}
    proc = subprocess.run([sys.executable, __file__, *args], env=env, cwd=pythonpath, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"child {args} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--baseline", help="a git revision whose data path to measure alongside (e.g. 893445b)")
    ap.add_argument("--out")
    ap.add_argument("--whole-job", action="store_true", help="the wall time of a whole 2-step job instead")
    ap.add_argument("--child", nargs=4, metavar=("KIND", "ROWS_FILE", "OUT", "ARG"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        kind, rows_file, out, arg = args.child
        fn = {"startup": child_startup, "job": child_job}.get(kind, lambda f, o, a: child_tokenise(f, o, int(a)))
        print(json.dumps(fn(Path(rows_file), Path(out), arg)))
        return

    out = Path(args.out or tempfile.mkdtemp(prefix="mlot-data-bench-")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.whole_job:
        return whole_job(args.sizes, out)
    baseline = None
    if args.baseline:
        baseline = out / "baseline"
        if not baseline.exists():
            subprocess.run(["git", "worktree", "add", "--detach", str(baseline), args.baseline], cwd=ROOT, check=True)
    table = []
    try:
        for n in args.sizes:
            rows = out / f"rows-{n}.jsonl"
            write_rows(rows, n)
            runs = {"first": run_child(["--child", "startup", str(rows), str(out / f"run-{n}"), "first"]),
                    "cached": run_child(["--child", "startup", str(rows), str(out / f"run-{n}"), "cached"])}
            if baseline:
                runs["baseline"] = run_child(["--child", "startup", str(rows), str(out / f"base-{n}"), "base"],
                                             pythonpath=baseline)
            table.append((n, runs))
            print(f"[data] {n} rows: {json.dumps(runs)}", flush=True)
        smallest = out / f"rows-{min(args.sizes)}.jsonl"
        speed = {p: run_child(["--child", "tokenise", str(smallest), str(out / "tok"), str(p)]) for p in (1, 2)}
    finally:
        if baseline:
            subprocess.run(["git", "worktree", "remove", "--force", str(baseline)], cwd=ROOT)
    report(table, speed, min(args.sizes))


def whole_job(sizes: list[int], out: Path) -> None:
    times = {}
    for n in sizes:
        rows = out / f"rows-{n}.jsonl"
        write_rows(rows, n)
        run_child(["--child", "job", str(rows), str(out / f"job-{n}"), "fill"])  # fills the tokenisation cache
        times[n] = run_child(["--child", "job", str(rows), str(out / f"job-{n}"), "cached"])
        print(f"[data] whole job, {n} rows: {json.dumps(times[n])}", flush=True)
    print("\nqed_small.yaml, 2 steps with in-loop eval, checkpoint, export and scoring, cached run, "
          f"{os.cpu_count()} CPUs")
    print("| rows | whole job (s) | scored rows |\n|---|---|---|")
    for n, t in times.items():
        print(f"| {n:,} | {t['job_s']:.1f} | {t['scored_rows']:.0f} |")
    if len(times) > 1:
        (n0, a), (n1, b) = min(times.items()), max(times.items())
        print(f"\nwhole job {n1:,} vs {n0:,} rows: {b['job_s'] / a['job_s']:.2f}x")


def report(table: list, speed: dict, n_speed: int) -> None:
    print(f"\nqed_small.yaml (2 tokenizers), 1 step, {os.cpu_count()} CPUs")
    print("| rows | run | start-up to step 1 (s) | data pass (s) | driver peak RSS (MB) | worker peak RSS (MB) |")
    print("|---|---|---|---|---|---|")
    for n, runs in table:
        for kind, r in runs.items():
            print(f"| {n:,} | {kind} | {r['startup_s']:.1f} | {r['prepare_s']:.1f} | {r['driver_rss_mb']:.0f} "
                  f"| {r['worker_rss_mb']:.0f} |")
    if len(table) > 1:
        (n0, a), (n1, b) = table[0], table[-1]
        print(f"\ncached start-up {n1:,} vs {n0:,} rows: {b['cached']['startup_s'] / a['cached']['startup_s']:.2f}x")
    print(f"\ntokenising {n_speed:,} rows for 2 models: " + ", ".join(
        f"{p} process(es) {r['rows_per_s']:.0f} rows/s" for p, r in speed.items())
          + f"; 2 vs 1: {speed[2]['rows_per_s'] / speed[1]['rows_per_s']:.2f}x")
    efficiency = speed[2]["rows_per_s"] / (2 * speed[1]["rows_per_s"])
    print(f"projected first pass for 1M rows: {1e6 / speed[2]['rows_per_s'] / 60:.0f} min with 2 processes, "
          f"{1e6 / (8 * efficiency * speed[1]['rows_per_s']) / 60:.0f} min with 8 (8 cores, the 2-process "
          f"efficiency {efficiency:.2f})")


if __name__ == "__main__":
    main()
