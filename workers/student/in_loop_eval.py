"""Evaluation inside the training loop, safe under ZeRO-3.

Under ZeRO-3 every forward is a collective (each layer's parameters are gathered from all ranks), so
every rank must run the *same number* of forwards, however unevenly the eval rows divide. A rank with
fewer rows runs padding batches whose results do not count.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any

import torch

import mlot
from workers.data.encoding import answers_of
from workers.data.inspect import pieces
from workers.data.prepared import STUDENT, DataRef, PreparedData, Rows, open_data, teacher_key
from workers.forward import answer_logits, to_device
from workers.models import load_tokenizer
from workers.student.engine import sum_over_ranks


def eval_rows(n_rows: int, limit: int | None, seed: int) -> list[int]:
    """The eval rows the loop scores: all ``n_rows``, or a fixed seeded sample of ``limit`` of them (sorted), the
    same on every rank and at every eval, so the curve compares like with like at a bounded cost."""
    if limit is None or limit >= n_rows:
        return list(range(n_rows))
    return sorted(random.Random(seed).sample(range(n_rows), limit))


def eval_batches(rows: list[int], rank: int, world: int, batch_size: int) -> list[tuple[list[int], bool]]:
    """This rank's eval batches as (row indices, counts): the same number on every rank.

    Rank r scores ``rows[r], rows[r + world], ...``; ranks whose share runs out early score ``rows[0]``
    instead, with ``counts`` False so it is left out of the metric.
    """
    shard = rows[rank::world]
    n_batches = math.ceil(math.ceil(len(rows) / world) / batch_size)
    out = []
    for i in range(n_batches):
        chunk = shard[i * batch_size:(i + 1) * batch_size]
        out.append((chunk, True) if chunk else (rows[:1], False))
    return out


@torch.no_grad()
def evaluate_ce(engine: Any, data: PreparedData, tokenizer: Any, job: Any, rank: int, world: int,
                device: torch.device, vocab: int) -> float:
    """Mean answer-token CE of the student on the held-out rows (at most ``train.eval_rows``), over all ranks."""
    engine.eval()
    total, count = 0.0, 0
    rows = eval_rows(data.size("eval"), job.train.eval_rows, job.train.seed)
    for chunk, counts in eval_batches(rows, rank, world, job.train.batch_size):
        batch = data.batch("eval", chunk, STUDENT, tokenizer.pad_token_id)
        logits, labels = answer_logits(engine, to_device(batch, device), vocab)
        if counts:
            n = int((labels[:, 1:] != -100).sum())
            total += float(mlot.causal_lm_loss(logits, labels)) * n
            count += n
    engine.train()
    total, count = sum_over_ranks([total, count], device)
    return total / max(count, 1.0)


@torch.no_grad()
def evaluate_truth(engine: Any, data: PreparedData, tokenizer: Any, job: Any, device: torch.device) -> dict[str, float]:
    """``builtin:known_truth`` jobs: the student's answer distribution on the eval split's prompts against the
    true one (``workers.data.known_truth``: KL, NLL per answer, top-1, ECE as ``eval/truth_*``): a sweep can pick
    the configuration that learns the truth best, not the one that fits one sampled label per prompt.
    Every rank scores every prompt (the same forwards on every rank, as ZeRO-3 needs)."""
    from workers.data.known_truth import ANSWERS, answer_log_probs, builtin_truth, truth_metrics

    field = next(f for f, column in job.data.columns.items() if column == "prompt")
    rows = {r[field]: r for r in data.rows("eval", range(data.size("eval")))}  # one per distinct prompt
    log_q = answer_log_probs(engine, tokenizer, job.student.template, list(rows.values()), ANSWERS,
                             job.data.max_prompt_length, device, job.train.batch_size)
    return {f"eval/truth_{k}": v for k, v in truth_metrics(log_q, builtin_truth(list(rows))).items()}


@dataclass(frozen=True)
class PlanSample:
    """The transport plan [T_t, T_s] of one eval answer, with both answers' decoded pieces ([T_t], [T_s])."""

    plan: Any
    teacher: list[str]
    student: list[str]


@torch.no_grad()
def eval_plan(engine: Any, data: DataRef, tokenizer: Any, job: Any, teachers: dict[str, list[Any]],
              rank: int, device: torch.device, vocab: int) -> PlanSample | None:
    """The sequence-level transport plan between the first teacher and the student on eval row 0 with its
    answers' pieces, on rank 0, for methods that compute one (None otherwise). Every rank runs the forward: under
    ZeRO-3 it is a collective."""
    import ray

    if not teachers or not data.sizes.get("eval"):
        return None
    batch = open_data(data).batch("eval", [0], STUDENT, tokenizer.pad_token_id)
    engine.eval()
    logits, labels = answer_logits(engine, to_device(batch, device), vocab)
    engine.train()
    if rank != 0:
        return None
    name, replicas = next(iter(teachers.items()))
    reply = ray.get(replicas[0].payload.remote(Rows(data, "eval", (0,)), batch_id="plan", loss=job.loss))
    payload = mlot.TeacherPayload.from_numpy(reply["payload"])
    r = job.loss.spec(logits, labels, payload.to(device), job.loss.mode, job.loss.params)
    if r.plan is None or r.plan.dim() != 3:
        return None
    tn, sn = int(payload.lengths[0]), int((labels[0] != -100).sum())
    spec = next(t for t in job.teachers if t.name == name)
    [t_answer] = answers_of([lab for _, lab in open_data(data).examples("eval", [0], teacher_key(name))])
    [s_answer] = answers_of(batch["labels"].tolist())
    plan = r.plan[0, :tn, :sn].cpu().numpy()
    t_tokenizer = load_tokenizer(spec.tokenizer_name, spec.trust_remote_code)
    return PlanSample(plan, pieces(t_tokenizer, t_answer)[:plan.shape[0]], pieces(tokenizer, s_answer)[:plan.shape[1]])
