"""Distillation quality on real data: the paper's QED comparison, scaled down to tiny models on a CPU.

    python benchmarks/quality.py [--seeds 3] [--steps 80] [--teacher-steps 400] [--heldout 200]

The job is ``orchestrator/configs/qed_small.yaml`` (tiny Llama teacher with the SentencePiece
tokenizer, tiny Llama student with the WordPiece tokenizer) on the 1,355 QED examples of
``../shared/data/qed`` (skipped with a message when absent). A fixed held-out split (shuffled with seed
0) is never trained on. The teacher is pretrained once on the training split and then serves every
run; each student method gets the same budget (steps, batch, lr) and runs with every seed:

* SFT: cross-entropy on the gold answers, no teacher;
* ULD: CE + ULD on the teacher's payloads (gold answers);
* MultiLevelOT: CE + MultiLevelOT (paper mode) on the teacher's payloads (gold answers);
* MultiLevelOT, unlabeled: this tiny teacher first answers every training prompt with
  ``orchestrator.generate.run_generate`` (greedy, first line); the student then trains on those
  answers as targets (CE + MultiLevelOT), never seeing a gold answer. The shared ``teacher_answer``
  column (Llama-3-8B-Instruct) is *not* used for training: its distributions would not be the ones
  distilled; its held-out score is printed as a reference point only.

Printed: held-out F1 / exact match (SQuAD-style, max over gold answers, greedy first line) as
mean ± std over seeds, the held-out answer cross-entropy (nats per student token: a finer signal
than F1 for models this small), and the final training loss terms (mean of the last 10 steps).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

SHARED = Path(os.environ.get("MLOT_SHARED", Path(__file__).resolve().parents[2] / "shared")).resolve()
QED = SHARED / "data" / "qed" / "validation.jsonl"
COLUMNS = {"context": "context", "question": "question", "answer": "answers"}
TEACHER = "teacher-sp"
PSEUDO_FIELD = "tiny_teacher_answer"
#: method label -> (loss.method, trains on the teacher's generated answers)
METHODS: dict[str, tuple[str, bool]] = {
    "SFT": ("sft", False),
    "ULD": ("uld", False),
    "MultiLevelOT": ("multilevel_ot", False),
    "MultiLevelOT (unlabeled)": ("multilevel_ot", True),
}
TERMS = ("ce", "distill", "had", "sl", "sd")


def split_qed(out: Path, heldout: int) -> tuple[Path, Path]:
    """Shuffle QED with seed 0 and write ``train.jsonl`` and ``heldout.jsonl`` (first ``heldout`` rows)."""
    lines = QED.read_text(encoding="utf-8").splitlines()
    random.Random(0).shuffle(lines)
    test, train = out / "heldout.jsonl", out / "train.jsonl"
    test.write_text("\n".join(lines[:heldout]) + "\n", encoding="utf-8")
    train.write_text("\n".join(lines[heldout:]) + "\n", encoding="utf-8")
    return train, test


@torch.inference_mode()
def heldout_ce(model_dir: str, template: Any, rows: list[dict[str, Any]], max_prompt: int, max_answer: int) -> float:
    """Cross-entropy of the first gold answer (+ eos), nats per token of the model's own tokenizer."""
    from transformers import AutoModelForCausalLM

    import mlot
    from workers.data.encoding import encode_batch
    from workers.forward import answer_logits
    from workers.models import load_tokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tok = load_tokenizer(model_dir)
    total, tokens = 0.0, 0
    for i in range(0, len(rows), 32):
        batch, _ = encode_batch(rows[i:i + 32], tok, template, max_prompt, max_answer)
        logits, labels = answer_logits(model, batch, len(tok))
        n = int((labels[:, 1:] != -100).sum())
        total += float(mlot.causal_lm_loss(logits, labels)) * n
        tokens += n
    return total / tokens


def final_terms(summary: Any, last: int = 10) -> dict[str, float]:
    """Mean of the last ``last`` logged steps of CE and of each distillation term of the teacher."""
    from mlflow import MlflowClient

    client = MlflowClient(summary.tracking_uri)
    out = {}
    for term in TERMS:
        key = "train/ce" if term == "ce" else f"train/{TEACHER}/{term}"
        hist = sorted(client.get_metric_history(summary.run_id, key), key=lambda m: m.step)
        if hist:
            out[term] = statistics.fmean(m.value for m in hist[-last:])
    return out


def mean_std(values: list[float]) -> str:
    """``mean ± std`` (sample std; ± 0 for a single value)."""
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.2f} ± {std:.2f}"


def table(results: dict[str, list[dict[str, float]]], teacher: dict[str, float], reference: dict[str, float]) -> str:
    """A markdown table: one row per method (mean ± std over seeds), teacher and reference rows first."""
    head = ["method", "QED F1", "QED EM", "held-out CE"] + [f"final {t}" for t in TERMS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines.append(f"| Llama-3-8B-Instruct answers (shared column, reference) | {reference['f1']:.2f} | "
                 f"{reference['exact_match']:.2f} | — |" + " — |" * len(TERMS))
    lines.append(f"| teacher (tiny, pretrained) | {teacher['f1']:.2f} | {teacher['exact_match']:.2f} | — |"
                 + " — |" * len(TERMS))
    for label, runs in results.items():
        cells = [mean_std([r["f1"] for r in runs]), mean_std([r["exact_match"] for r in runs]),
                 mean_std([r["heldout_ce"] for r in runs])]
        for term in TERMS:
            vals = [r[term] for r in runs if term in r]
            cells.append(mean_std(vals) if vals else "—")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=3, help="student seeds per method (default 3)")
    ap.add_argument("--steps", type=int, default=80, help="student optimizer steps, every method (default 80)")
    ap.add_argument("--teacher-steps", type=int, default=400, help="teacher pretraining steps (default 400)")
    ap.add_argument("--heldout", type=int, default=200, help="held-out QED rows (default 200)")
    ap.add_argument("--out", help="working folder (default: a new temporary folder); a folder of an earlier run "
                    "keeps its pretrained teacher, whatever --teacher-steps says")
    args = ap.parse_args()
    if args.teacher_steps < 1:
        ap.error("--teacher-steps must be >= 1: a random teacher has nothing to distil")
    if not QED.is_file():
        print(f"benchmarks/quality.py: skipped: QED data not found at {QED} (set MLOT_SHARED to the shared/ folder)")
        return 0

    from orchestrator.cli import bundled_config
    from orchestrator.configuration import load_config
    from orchestrator.driver import connect_ray, prepare_data, run_distill, start_teachers
    from orchestrator.evaluation import run_eval
    from orchestrator.generate import run_generate
    from specs import storage
    from workers.data.metrics import gold_answers, score_predictions
    from workers.data.tasks import load_rows

    t_start = time.time()
    out = Path(args.out or tempfile.mkdtemp(prefix="mlot-quality-")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    # MLflow stores a new experiment's artifacts (every student) under ./mlruns: keep them in the folder.
    os.chdir(out)
    train_file, test_file = split_qed(out, args.heldout)
    base = [f"output_dir={out}", f"tracking.uri=sqlite:///{out}/mlflow.db", f"data.source={train_file}",
            "data.eval_fraction=0", "train.eval_every=null", f"train.steps={args.steps}",
            f"train.warmup_steps={args.steps // 10}",
            f"train.checkpoint_every={args.steps}", f"teachers.0.pretrain.steps={args.teacher_steps}"]
    teacher_job = load_config(bundled_config("qed_small.yaml"), [*base, "name=teacher"])
    d = teacher_job.data
    test_rows = load_rows(str(test_file), None, "validation", COLUMNS)

    def evaluate(model_dir: str, spec: Any) -> dict[str, float]:
        return run_eval(model_dir, str(test_file), COLUMNS, template=spec.template,
                        max_prompt_length=d.max_prompt_length, max_new_tokens=d.max_answer_length, metric="qa")

    data = prepare_data(teacher_job)
    print(f"[quality] QED: {data.sizes['train']} train / {len(test_rows)} held-out rows; working folder {out}",
          flush=True)
    connect_ray(teacher_job)
    teachers = start_teachers(teacher_job, data)
    teacher_scores = evaluate(storage.join(teacher_job.run_path, "teachers", TEACHER), teacher_job.teachers[0])
    llama = load_rows(str(test_file), None, "validation", {"answer": "teacher_answer"})
    reference = score_predictions([r["answer"] for r in llama], [gold_answers(r) for r in test_rows], "qa")
    t0 = time.time()
    pseudo = run_generate(teacher_job, str(out / "pseudo_labels.jsonl"), field=PSEUDO_FIELD, teachers=teachers)
    print(f"[quality] teacher F1 {teacher_scores['f1']:.2f}; pseudo-labels in {time.time() - t0:.0f}s", flush=True)

    results: dict[str, list[dict[str, float]]] = {label: [] for label in METHODS}
    for seed in range(args.seeds):
        for label, (method, unlabeled) in METHODS.items():
            name = f"{method}{'-unlabeled' if unlabeled else ''}-s{seed}"
            overrides = [*base, f"name={name}", f"loss.method={method}", f"train.seed={seed}"]
            if unlabeled:
                overrides += [f"data.source={pseudo}", f"data.columns.answer={PSEUDO_FIELD}"]
            job = load_config(bundled_config("qed_small.yaml"), overrides)
            if method == "sft":
                job = job.model_copy(update={"teachers": []})
            t0 = time.time()
            summary = run_distill(job, teachers=teachers if job.teachers else {})
            scores = evaluate(summary.export_dir, job.student)
            ce = heldout_ce(summary.export_dir, job.student.template, test_rows, d.max_prompt_length,
                            d.max_answer_length)
            results[label].append({**scores, "heldout_ce": ce, **final_terms(summary)})
            print(f"[quality] {name}: F1 {scores['f1']:.2f} EM {scores['exact_match']:.2f} held-out CE {ce:.3f} "
                  f"({time.time() - t0:.0f}s)", flush=True)

    (out / "results.json").write_text(json.dumps({"teacher": teacher_scores, "reference": reference,
                                                  "runs": results, "args": vars(args)}, indent=1))
    print(f"\nQED held-out ({len(test_rows)} rows), {args.seeds} seeds, {args.steps} student steps, teacher "
          f"pretrained {args.teacher_steps} steps; {torch.get_num_threads()} CPU threads, "
          f"{'CUDA' if torch.cuda.is_available() else 'no GPU'}; {(time.time() - t_start) / 60:.1f} min\n")
    print(table(results, teacher_scores, reference))
    print(f"\nraw numbers: {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
