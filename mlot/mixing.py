"""Mixing several teachers' losses: a fixed weighted sum, or per-sample weights from how well each teacher
knows the sample.

With J teachers and each teacher's per-sample loss ``L[b, j]`` (its ``alpha * per_sample``, plus any extra
terms), the objective is ``mean_b sum_j W[b, j] * L[b, j]`` where ``W`` is (``prior[j]``: the teachers'
configured weights):

* ``sum``: ``W[b, j] = prior[j]`` (the sum of weighted losses);
* ``mean``: ``prior[j] / sum(prior)`` (its normalised form);
* ``best``: 1 for the teacher with the lowest ``nll[b, j]``, 0 for the others (``prior`` is not used);
* ``confidence``: ``softmax_j(log prior[j] - nll[b, j] / temperature)``: the configured weights act as a
  prior, and a teacher that finds the sample's answer likelier gets more of it.

``nll[b, j]`` is teacher j's negative log-likelihood of sample b's gold answer per UTF-8 *byte* of the
answer text (:func:`nll_per_byte`): per byte, not per token, so that teachers with different tokenizers are
compared on the same text.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .identity import gold_log_probs
from .result import DistillResult

MIXES = ("sum", "mean", "best", "confidence")
PER_SAMPLE_MIXES = ("best", "confidence")  # need each teacher's nll per byte, and per-sample losses


@torch.no_grad()
def nll_per_byte(teacher_logits: Tensor, teacher_labels: Tensor, answer_bytes: Tensor) -> Tensor:
    """[B] the teacher's NLL of each gold answer (its own tokens, EOS included) per byte of the answer text.

    Args:
        teacher_logits: [B, L, V]; teacher_labels: [B, L] (-100 outside the answer).
        answer_bytes: [B] UTF-8 bytes of each answer's text (at least 1 is used).
    """
    nll = -gold_log_probs(teacher_logits, teacher_labels).sum(1)
    return nll / answer_bytes.to(nll).clamp(min=1)


def mix_weights(mix: str, prior: Tensor, nll: Tensor | None = None, temperature: float = 1.0) -> Tensor:
    """[B, J] weights of J teachers' per-sample losses (``[1, J]`` for ``sum`` / ``mean``, which need no nll).

    Args:
        prior: [J] the teachers' configured weights.
        nll: [B, J] each teacher's :func:`nll_per_byte` of each sample (for ``best`` and ``confidence``).
    """
    if mix not in MIXES:
        raise ValueError(f"teacher mix must be one of {MIXES}, got {mix!r}")
    if mix == "sum":
        return prior[None]
    if mix == "mean":
        return (prior / prior.sum())[None]
    if nll is None:
        raise ValueError(f"teacher mix {mix!r} needs each teacher's nll per byte")
    if mix == "best":
        return torch.nn.functional.one_hot(nll.argmin(1), nll.shape[1]).to(nll.dtype)
    return torch.softmax(prior.to(nll).log()[None] - nll / temperature, dim=1)


def mixed_loss(results: Sequence[Sequence[DistillResult]], mix: str, prior: Tensor, nll: Tensor | None = None,
               temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """The teachers' mixed distillation loss and the weights used.

    Args:
        results: per teacher, its results on the batch (the method's, and any extra terms'); teacher j's
            per-sample loss is the sum of their ``alpha * per_sample``.
        mix, prior, nll, temperature: as :func:`mix_weights`.
    Returns ``(loss, W)``: ``sum`` / ``mean`` weigh each teacher's ``loss`` (batch-coupled results too),
    ``best`` / ``confidence`` need per-sample results.
    """
    weights = mix_weights(mix, prior, nll, temperature)
    if mix in ("sum", "mean"):
        return sum(weights[0, j] * sum(r.loss for r in rs) for j, rs in enumerate(results)), weights
    per = torch.stack([sum(r.alpha * r.per_sample for r in rs) for rs in results], 1)  # [B, J]
    return (weights.to(per) * per).sum(1).mean(), weights
