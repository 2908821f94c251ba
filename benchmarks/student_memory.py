"""The ``memory`` section of ``benchmarks/students.py``: what a training rank holds for larger students.

    python benchmarks/students.py --what memory [--sizes tiny 100m 300m] [--paths old new] [--out DIR]

The per-rank peak RSS of each phase of a ZeRO-3 distillation job (the quickstart's, 2 training workers on the CPU,
2 steps, micro-batch 2, gradient checkpointing, through the export) for the quickstart's tiny student and students
of ~100M and ~300M parameters. Phases: build (model, DeepSpeed engine, checkpoint restore), train (2 steps and the
final checkpoint), export; each phase's peak is the resident high-water mark (VmHWM, reset through
/proc/self/clear_refs as the phase starts). ZeRO-3 settings: ``default`` (the generated config: DeepSpeed keeps
up to 1e9 gathered parameters live, i.e. these students whole, while training; buffers sized by the hidden size,
``specs.deepspeed``), ``release`` (every gathered parameter freed after use, as a model too big to keep whole needs:
the settings of the ZeRO-3 integration test, with DeepSpeed's reduce buckets of 5e8 elements), ``release_auto``
(``release`` with reduce buckets of ``"auto"`` size) and ``release_auto_sub`` (that, the optimizer stepped in
sub-groups of 1e7 elements as the generated config does). Two code paths:

* ``new``: the student built partitioned (``workers.student.model.build_student``) and exported one submodule at a
  time (``workers.student.checkpoint.consolidated_state_dict``);
* ``old``: the path before them: every rank builds the whole fp32 student, and the export gathers every parameter
  at once on every rank (rank 0 clones them). This benchmark's own monkeypatch, put into each Ray worker process
  by a ``worker_process_setup_hook``; there is no production switch for it.

Each job runs in a fresh process with its own local Ray (``python benchmarks/student_memory.py ZERO3 SIZE PATH OUT``);
every rank writes its numbers beside the run. The report gives bytes per parameter added over the tiny student,
per rank, next to ZeRO-3's floor for fp32 AdamW (16 bytes per parameter over the ranks, 8 per rank at 2 workers:
fp32 weights, gradients and Adam's two moments), and checks that both paths log the same loss at every step.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WORLD = 2
PYTHONPATH = f"{ROOT}{os.pathsep}{HERE}"  # the workers import this module (their setup hook) by its name

#: student.model_config changes over the quickstart's tiny Llama (hidden 64, 2 layers, WordPiece's 30,522 rows).
SIZES = {
    "tiny": {},
    "100m": {"hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 12, "num_attention_heads": 12,
             "num_key_value_heads": 12},
    "300m": {"hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 20, "num_attention_heads": 16,
             "num_key_value_heads": 16},
}


#: student.deepspeed of each ZeRO-3 setting: generated, or a JSON config written beside the run.
RELEASE = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0, "stage3_max_live_parameters": 0,
                                 "stage3_max_reuse_distance": 0, "stage3_prefetch_bucket_size": 0,
                                 "stage3_gather_16bit_weights_on_model_save": True}}
JSONS = {"release": RELEASE,  # DeepSpeed's own reduce buckets (5e8 elements)
         "release_auto": {"zero_optimization": {**RELEASE["zero_optimization"], "reduce_bucket_size": "auto"}},
         "release_auto_sub": {"zero_optimization": {**RELEASE["zero_optimization"], "reduce_bucket_size": "auto",
                                                    "sub_group_size": 10_000_000}}}


def add_memory_options(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--zero3", nargs="+", choices=["default", *JSONS], default=["default", "release"],
                    help="memory: ZeRO-3 settings")
    ap.add_argument("--sizes", nargs="+", choices=list(SIZES), default=list(SIZES), help="memory: student sizes")
    ap.add_argument("--paths", nargs="+", choices=["old", "new"], default=["old", "new"], help="memory: code paths")
    ap.add_argument("--out", help="memory: where the jobs run (default: a new temporary folder)")


# ---------------------------------------------------------------------------- inside each Ray worker process


def _status_mb(key: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith(key))  # kB


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS


def _record_phases() -> None:
    """Wrap the training worker's setup, train and export: note each one's RSS at the start, peak RSS and time, and
    after the export write them to ``<output_dir>/memory/rank<r>.json``."""
    from workers.student import checkpoint, recipe

    Recipe = recipe.StudentRecipe
    setup, train, export = Recipe.setup, Recipe.train, checkpoint.export_student
    seen: dict = {}

    def timed(phase, fn, *args, **kwargs):
        _reset_peak()
        t0, start = time.perf_counter(), _status_mb("VmRSS")
        out = fn(*args, **kwargs)
        seen[phase] = {"start_mb": start, "peak_mb": _status_mb("VmHWM"), "s": time.perf_counter() - t0}
        return out

    def setup_recorded(self):
        timed("build", setup, self)
        seen["params"], seen["rank"], seen["out"] = self.n_params, self.rank, self.job.output_dir

    def export_recorded(engine, tokenizer, export_dir, rank, *args, **kwargs):
        timed("export", export, engine, tokenizer, export_dir, rank, *args, **kwargs)
        folder = Path(seen["out"], "memory")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"rank{rank}.json").write_text(json.dumps(seen))

    Recipe.setup = setup_recorded
    Recipe.train = lambda self: timed("train", train, self)
    checkpoint.export_student = export_recorded


def _gather_at_once(module, rank, dtype=None):
    """The export's gather before layer-wise consolidation: every parameter at once, on every rank."""
    import deepspeed
    with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
        return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()} if rank == 0 else None


def _whole_fp32(job, tokenizer):
    """The build before ZeRO-3-aware construction: the whole student in fp32 on every rank."""
    from workers.models import build_model
    s = job.student
    return build_model(s.model, s.hf_config, "float32", s.trust_remote_code, tokenizer, who="student")


def worker_setup_new() -> None:
    """``worker_process_setup_hook`` of the ``new`` path: record only."""
    _record_phases()


def worker_setup_old() -> None:
    """``worker_process_setup_hook`` of the ``old`` path: the old build and export, recorded."""
    from workers.student import checkpoint, recipe
    recipe.build_student = _whole_fp32
    checkpoint.consolidated_state_dict = _gather_at_once
    _record_phases()


# ---------------------------------------------------------------------------- one job (a child process)


def child(zero3: str, size: str, path: str, out: Path) -> dict:
    """One job of ``size`` on code ``path`` under ZeRO-3 setting ``zero3``, this process its driver; the ranks'
    records and the logged losses."""
    import yaml
    from mlflow import MlflowClient

    from orchestrator.configuration import config_from_dict
    from orchestrator.driver import run_distill

    data = yaml.safe_load((ROOT / "orchestrator" / "configs" / "quickstart.yaml").read_text())
    data["student"]["model_config"].update(SIZES[size])
    data["cluster"]["runtime_env"] = {"worker_process_setup_hook": f"student_memory.worker_setup_{path}",
                                      "env_vars": {"PYTHONPATH": PYTHONPATH, "TQDM_DISABLE": "1"}}
    if zero3 in JSONS:
        out.mkdir(parents=True, exist_ok=True)
        (out / "zero3.json").write_text(json.dumps(JSONS[zero3]))
        data["student"]["deepspeed"] = {"config_path": str(out / "zero3.json")}
    job = config_from_dict(data, [
        f"name=students-{size}-{path}", f"output_dir={out}", f"tracking.uri=sqlite:///{out}/mlflow.db",
        f"train.num_workers={WORLD}", "student.deepspeed.stage=3", "student.gradient_checkpointing=true",
        "train.steps=2", "train.batch_size=2", "train.warmup_steps=0", "train.checkpoint_every=2",
        "train.eval_every=null", "teachers.0.pretrain.steps=0", "data.limit=200"])
    s = run_distill(job, evaluate=False)
    losses = [m.value for m in sorted(MlflowClient(s.tracking_uri).get_metric_history(s.run_id, "train/loss"),
                                      key=lambda m: m.step)]
    ranks = [json.loads((out / "memory" / f"rank{r}.json").read_text()) for r in range(WORLD)]
    return {"zero3": zero3, "size": size, "path": path, "ranks": ranks, "losses": losses}


def run_child(zero3: str, size: str, path: str, out: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": PYTHONPATH, "TQDM_DISABLE": "1"}
    proc = subprocess.run([sys.executable, __file__, zero3, size, path, str(out)], env=env, cwd=ROOT,
                          capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"child {zero3} {size} {path} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------- the section and its report


def memory_section(args: argparse.Namespace) -> None:
    out = Path(args.out or tempfile.mkdtemp(prefix="mlot-students-bench-")).resolve()
    results = []
    for zero3 in args.zero3:
        for size in args.sizes:
            for path in args.paths:
                r = run_child(zero3, size, path, out / f"{zero3}-{size}-{path}")
                results.append(r)
                print(f"[students] {zero3} {size} {path}: {json.dumps(r)}", flush=True)
    for zero3 in args.zero3:
        report(zero3, [r for r in results if r["zero3"] == zero3])


def report(zero3: str, results: list[dict]) -> None:
    phases = ("build", "train", "export")
    print(f"\nZeRO-3 ({zero3}), {WORLD} workers on the CPU, 2 steps, micro-batch 2, gradient checkpointing: peak RSS "
          "(MB) of each rank in each phase (RSS at its start in brackets)")
    print("| student | params | path | rank | " + " | ".join(phases) + " | export s |")
    print("|---|---|---|---|" + "---|" * len(phases) + "---|")
    for r in results:
        for k in r["ranks"]:
            cells = " | ".join(f"{k[p]['peak_mb']:.0f} ({k[p]['start_mb']:.0f})" for p in phases)
            print(f"| {r['size']} | {k['params'] / 1e6:.1f}M | {r['path']} | {k['rank']} | {cells} "
                  f"| {k['export']['s']:.1f} |")
    tiny = {r["path"]: r for r in results if r["size"] == "tiny"}
    print(f"\nbytes per parameter added over the tiny student, per rank and phase (peak RSS); ZeRO-3's floor with "
          f"fp32 AdamW: 16 over the ranks, {16 / WORLD:.0f} per rank")
    print("| student | path | added params | " + " | ".join(f"{p} r{i}" for p in phases for i in range(WORLD)) + " |")
    print("|---|---|---|" + "---|" * (len(phases) * WORLD))
    for r in results:
        base = tiny.get(r["path"])
        if r["size"] == "tiny" or base is None:
            continue
        added = r["ranks"][0]["params"] - base["ranks"][0]["params"]
        cells = [(k[p]["peak_mb"] - b[p]["peak_mb"]) * 2**20 / added
                 for p in phases for k, b in zip(r["ranks"], base["ranks"])]
        print(f"| {r['size']} | {r['path']} | {added / 1e6:.1f}M | " + " | ".join(f"{v:.1f}" for v in cells) + " |")
    by = {(r["size"], r["path"]): r["losses"] for r in results}
    for size in dict.fromkeys(r["size"] for r in results):
        if (size, "old") in by and (size, "new") in by:
            old, new = by[(size, "old")], by[(size, "new")]
            diff = max(abs(a - b) for a, b in zip(old, new)) if len(old) == len(new) else float("nan")
            print(f"{size}: train/loss per step old {old} new {new}: max |difference| {diff:.2e}")


if __name__ == "__main__":
    print(json.dumps(child(sys.argv[1], sys.argv[2], sys.argv[3], Path(sys.argv[4]))))
