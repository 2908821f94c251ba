"""Evaluation inside the training loop, safe under ZeRO-3.

Under ZeRO-3 every forward is a collective (each layer's parameters are gathered from all ranks), so
every rank must run the *same number* of forwards, however unevenly the eval rows divide. A rank with
fewer rows runs padding batches whose results do not count.
"""

from __future__ import annotations

import math
from typing import Any

import torch

import mlot
from workers.data import encode_batch
from workers.engine import sum_over_ranks
from workers.forward import answer_logits, to_device


def eval_batches(rows: list[dict[str, Any]], rank: int, world: int,
                 batch_size: int) -> list[tuple[list[dict[str, Any]], bool]]:
    """This rank's eval batches as (rows, counts): the same number on every rank.

    Rank r scores ``rows[r::world]``; ranks whose share runs out early score ``rows[:1]`` instead,
    with ``counts`` False so it is left out of the metric.
    """
    shard = rows[rank::world]
    n_batches = math.ceil(math.ceil(len(rows) / world) / batch_size)
    out = []
    for i in range(n_batches):
        chunk = shard[i * batch_size:(i + 1) * batch_size]
        out.append((chunk, True) if chunk else (rows[:1], False))
    return out


@torch.no_grad()
def evaluate_ce(engine: Any, rows: list[dict[str, Any]], tokenizer: Any, job: Any, rank: int, world: int,
                device: torch.device, vocab: int) -> float:
    """Mean answer-token CE of the student on the held-out rows, over all ranks."""
    engine.eval()
    total, count = 0.0, 0
    for chunk, counts in eval_batches(rows, rank, world, job.train.batch_size):
        batch, _ = encode_batch(chunk, tokenizer, job.student.template, job.data.max_prompt_length,
                                job.data.max_answer_length, on_bad_row="error")
        logits, labels = answer_logits(engine, to_device(batch, device), vocab)
        if counts:
            n = int((labels[:, 1:] != -100).sum())
            total += float(mlot.causal_lm_loss(logits, labels)) * n
            count += n
    engine.train()
    total, count = sum_over_ranks([total, count], device)
    return total / max(count, 1.0)


@torch.no_grad()
def eval_plan(engine: Any, tokenizer: Any, job: Any, rows: list[dict[str, Any]], teachers: dict[str, list[Any]],
              rank: int, device: torch.device, vocab: int) -> Any:
    """The sequence-level transport plan [T_t, T_s] between the first teacher and the student on eval row 0,
    on rank 0, for methods that compute one (None otherwise). Every rank runs the forward: under ZeRO-3
    it is a collective."""
    import ray

    if not teachers or not rows:
        return None
    rows = rows[:1]
    batch, _ = encode_batch(rows, tokenizer, job.student.template, job.data.max_prompt_length,
                            job.data.max_answer_length)
    engine.eval()
    logits, labels = answer_logits(engine, to_device(batch, device), vocab)
    engine.train()
    if rank != 0:
        return None
    replicas = next(iter(teachers.values()))
    reply = ray.get(replicas[0].payload.remote(rows, batch_id="plan", loss=job.loss))
    payload = mlot.TeacherPayload.from_numpy(reply["payload"])
    r = job.loss.spec(logits, labels, payload.to(device), job.loss.mode, job.loss.params)
    if r.plan is None or r.plan.dim() != 3:
        return None
    tn, sn = int(payload.lengths[0]), int((labels[0] != -100).sum())
    return r.plan[0, :tn, :sn].cpu().numpy()
