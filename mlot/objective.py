"""The training objective of one micro-batch, stated once: the trainer (``workers/student/recipe.py``) and the
known-truth study (``benchmarks/known_truth.py``) both call :class:`Objective`.

    loss = ce_weight * CE + mix_j( alpha_j * distill_j + identity_j )

over the job's teachers j, where ``distill_j`` is the registered method's loss on teacher j's payload (none for
methods that train on labels alone), ``identity_j`` the optional identity-aware terms
(``mlot.identity.identity_terms``: aligned-chunk likelihood, exact match on the shared vocabulary) and ``mix``
the teacher mix of ``mlot.mixing`` (a weighted sum by default; per-sample weights from each teacher's NLL per
answer byte for ``best`` / ``confidence``).

Every term reads the student's logits through one ``mlot.rows.AnswerRows`` per call: chunks of answer rows in
fp32, no [rows, V] copy kept for backward, one gradient buffer for all terms and teachers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from torch import Tensor

from .baselines import causal_lm_loss
from .identity import IdentityConfig, identity_terms
from .methods import Method
from .mixing import PER_SAMPLE_MIXES, mixed_loss
from .payload import TeacherPayload
from .result import DistillResult
from .rows import answer_rows, sharing
from .vocab import VocabMap


@dataclass(frozen=True)
class Objective:
    """``ce_weight * CE + mix_j(alpha * distill_j + identity_j)``.

    Attributes:
        method: the registered loss (``mlot.get_method``); mode, params: its ``loss.mode`` and ``loss.params``.
        ce_weight: weight of the student's CE on the labels.
        identity: the identity-aware terms' weights (all 0: off); a teacher's payload then carries
            ``identity`` (``mlot.identity.compress_identity`` with the student's bounds set).
        mix, mix_temperature: ``loss.teacher_mix`` and its temperature (``mlot.mixing``); per-sample mixes need
            each payload's ``nll_per_byte``.
        weights: each teacher's configured weight (the mix's prior; 1 for a teacher not named).
    """

    method: Method
    mode: str = "paper"
    params: Mapping[str, Any] = field(default_factory=dict)
    ce_weight: float = 1.0
    identity: IdentityConfig = IdentityConfig()
    mix: str = "sum"
    mix_temperature: float = 1.0
    weights: Mapping[str, float] = field(default_factory=dict)

    def __call__(self, logits: Tensor, labels: Tensor, payloads: Mapping[str, TeacherPayload],
                 vmaps: Mapping[str, VocabMap] | None = None, ce: bool = True) -> tuple[Tensor, dict[str, Tensor]]:
        """The loss of one micro-batch and its named parts (detached, for logging).

        Args:
            logits: [B, L, V] the student's logits; labels: [B, L] (-100 outside the answer).
            payloads: teacher name -> its payload on this batch (on the student's device), in mix order.
            vmaps: teacher name -> its vocabulary map to the student's (the exact-match term).
            ce: False on a micro-batch whose answers are the student's own (on-policy): no CE on them.
        Returns ``(loss, parts)``: parts are ``ce``, ``loss``, per teacher ``<name>/distill``, each term of its
        results (``<name>/had``, ``<name>/chunk_kl``, ...) and, for per-sample mixes, ``<name>/mix_weight``,
        ``<name>/nll_per_byte`` and ``<name>/selected``.
        """
        with sharing(answer_rows(logits, labels)):  # one reader of the answer rows for every term (mlot.rows)
            ce_loss = causal_lm_loss(logits, labels)
            parts = {"ce": ce_loss.detach()}
            results = [self._teacher(name, logits, labels, payload, (vmaps or {}).get(name), parts)
                       for name, payload in payloads.items()]
        loss = (self.ce_weight if ce else 0.0) * ce_loss
        if results:
            loss = loss + self._mix(results, payloads, parts)
        parts["loss"] = loss.detach()
        return loss, parts

    def _teacher(self, name: str, logits: Tensor, labels: Tensor, payload: TeacherPayload, vmap: VocabMap | None,
                 parts: dict[str, Tensor]) -> list[DistillResult]:
        """One teacher's results on the batch: the method's, then the identity terms' (when on)."""
        mine = []
        if self.method.needs_teacher:
            mine.append(self.method(logits, labels, payload, self.mode, self.params))
            parts[f"{name}/distill"] = mine[0].distill.detach()
        if self.identity.on:
            if payload.identity is None:
                raise RuntimeError(f"teacher {name} sent no identity payload for loss.params "
                                   f"shared_weight/chunk_weight (a teacher started without the job's student?)")
            mine.append(identity_terms(logits, labels, payload.identity, vmap, self.identity))
        parts.update({f"{name}/{k}": v.detach().mean() for r in mine for k, v in r.terms.items()})
        return mine

    def _mix(self, results: list[list[DistillResult]], payloads: Mapping[str, TeacherPayload],
             parts: dict[str, Tensor]) -> Tensor:
        """The teachers' losses mixed as ``mix`` says; per-sample weights are logged."""
        names = list(payloads)
        device = results[0][0].distill.device
        prior = torch.tensor([float(self.weights.get(n, 1.0)) for n in names], device=device)
        nll = None
        if self.mix in PER_SAMPLE_MIXES:
            nll = torch.stack([payloads[n].nll_per_byte.to(device) for n in names], 1)  # [B, J]
        loss, weights = mixed_loss(results, self.mix, prior, nll, self.mix_temperature)
        if nll is not None:
            for j, name in enumerate(names):
                parts.update({f"{name}/mix_weight": weights[:, j].mean(), f"{name}/nll_per_byte": nll[:, j].mean(),
                              f"{name}/selected": (nll.argmin(1) == j).float().mean()})
        return loss
