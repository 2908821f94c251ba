"""What the identity-aware terms (``mlot.identity``) cost in training, against MultiLevelOT alone, in one process.

    python benchmarks/identity.py [--batches 20] [--batch 8] [--set KEY=VALUE ...]

On the quickstart job's rows and models (a SentencePiece teacher, a WordPiece student; ``--set`` changes
either), for the same batches:

* teacher side: one payload request of a ``TeacherActor`` (forward, compression, and for the identity terms
  both sides' character bounds and the identity payload), plain Python, no Ray;
* payload bytes per teacher answer token;
* student side: forward + backward of the loss on the student model's logits (method, then method + terms).

Each line is a median over the batches and a ratio to MultiLevelOT alone.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from common import QUICKSTART

import mlot
from orchestrator.cli import bundled_config
from orchestrator.configuration import apply_overrides, load_config
from workers.data.prepared import STUDENT, Rows, open_data, prepare
from workers.forward import answer_logits
from workers.models import build_model, load_tokenizer
from workers.teacher.actor import TeacherActor
from workers.vocab import teacher_map

SETTINGS = {"MultiLevelOT": [], "+ aligned chunks": ["loss.params.chunk_weight=1.0"],
            "+ chunks + exact match": ["loss.params.chunk_weight=1.0", "loss.params.shared_weight=1.0"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, default=20)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--set", action="append", default=[])
    args = ap.parse_args()
    torch.manual_seed(0)
    job = load_config(bundled_config(QUICKSTART), [f"output_dir={tempfile.mkdtemp(prefix='mlot-identity-')}",
                                                   "teachers.0.pretrain.steps=0", *args.set])
    data = prepare(job, job.data_cache)
    teacher = TeacherActor(job.teachers[0], job.data, job.loss, seed=0, student=job.student)
    tok = load_tokenizer(job.student.tokenizer_name)
    student = build_model(job.student.model, job.student.hf_config, "float32", False, tok, who="student")
    batches = [Rows(data, "train", tuple(range(i * args.batch, (i + 1) * args.batch))) for i in range(args.batches)]
    t0 = time.perf_counter()
    vmap = teacher_map(job.teachers[0], job.student)
    map_s = time.perf_counter() - t0

    rows = []
    for name, overrides in SETTINGS.items():
        loss = apply_overrides(job, overrides).loss
        ident = loss.spec.identity_config(loss.params)
        teach_s, student_s, bpt = [], [], []
        for r in batches:
            t0 = time.perf_counter()
            payload = mlot.TeacherPayload.from_numpy(teacher.payload(r, loss=loss)["payload"])
            teach_s.append(time.perf_counter() - t0)
            bpt.append(payload.bytes_per_token())
            batch = open_data(data).batch(r.split, r.indices, STUDENT, tok.pad_token_id)
            t0 = time.perf_counter()
            logits, labels = answer_logits(student, batch, len(tok))
            total = loss.spec(logits, labels, payload, loss.mode, loss.params).loss
            if ident.on:
                total = total + mlot.identity.identity_terms(logits, labels, payload.identity, vmap, ident).loss
            total.backward()
            student_s.append(time.perf_counter() - t0)
        rows.append((name, statistics.median(teach_s), statistics.median(bpt), statistics.median(student_s)))

    base = rows[0]
    print(f"\nteacher {job.teachers[0].tokenizer_name} -> student {job.student.tokenizer_name}, {args.batches} batches "
          f"of {args.batch}, CPU ({torch.get_num_threads()} threads); vocabulary map built in {map_s:.2f} s "
          f"(coverage {vmap.coverage})")
    print("| loss | teacher request (s) | ratio | payload bytes / token | ratio | student fwd+bwd (s) | ratio |")
    print("|---|---|---|---|---|---|---|")
    for name, t, b, s in rows:
        print(f"| {name} | {t:.4f} | {t / base[1]:.2f}x | {b:.0f} | {b / base[2]:.2f}x "
              f"| {s:.4f} | {s / base[3]:.2f}x |")


if __name__ == "__main__":
    main()
