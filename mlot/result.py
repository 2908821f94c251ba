"""The common result type of every distillation loss in mlot."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor


@dataclass
class DistillResult:
    """What a distillation loss returns.

    Attributes:
        distill: [] the distillation loss without its weight (differentiable in the student logits).
        alpha: the weight the method puts on it; the training objective is ``CE + loss``.
        per_sample: [B] each sample's share (``distill == per_sample.mean()``), or None where the
            method couples the batch (reference mode).
        terms: the method's named terms, e.g. ``had`` [B], ``sl``, ``sd`` ([B] in paper mode, [] in
            reference mode); also readable as attributes (``result.had``).
        plan: [B, T_t, T_s] the sequence-level transport plan (detached), when one was computed.
        teacher_columns, student_columns: the vocabulary ids kept by the ranking, when there is one.
    """

    distill: Tensor
    alpha: float
    per_sample: Tensor | None = None
    terms: dict[str, Tensor] = field(default_factory=dict)
    plan: Tensor | None = None
    teacher_columns: Tensor | None = None
    student_columns: Tensor | None = None

    @property
    def loss(self) -> Tensor:
        """alpha * distill: add CE to get the training objective."""
        return self.alpha * self.distill

    def __getattr__(self, name: str) -> Tensor:
        terms = self.__dict__.get("terms", {})
        if name in terms:
            return terms[name]
        raise AttributeError(f"{type(self).__name__} has no term {name!r} (terms: {sorted(terms)})")
