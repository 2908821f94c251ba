"""The identity-aware terms (``mlot.identity``) in training: the side that runs next to a teacher.

A teacher actor or a store reader computes, per request, the character bounds of both models' answer
tokens (from the prepared data: every model's ids of every row are there) and the teacher's identity
payload, so the student worker decodes nothing on its step. The vocabulary map of a (teacher, student)
tokenizer pair is built once per process (:func:`pair_map`); the student worker builds the same map for
its side of the exact-match term.

Cost, measured on the 2-core development CPU: about 1 ms of decoding per answer of ~50 tokens and per model
(:func:`mlot.identity.char_bounds`), 0.25 s (SentencePiece -> WordPiece) to 0.65 s (Tekken -> WordPiece)
per vocabulary map.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from mlot.identity import IdentityConfig, IdentityPayload, VocabMap, answer_bounds, compress_identity, vocab_map
from mlot.spans import IGNORE_INDEX
from workers.models import load_tokenizer
from workers.prepared import STUDENT, Rows, open_data


@functools.lru_cache(maxsize=8)
def pair_map(teacher_tokenizer: str, teacher_trust: bool, student_tokenizer: str, student_trust: bool) -> VocabMap:
    """The :func:`mlot.identity.vocab_map` of two tokenizer specs, built once per process."""
    return vocab_map(load_tokenizer(teacher_tokenizer, teacher_trust), load_tokenizer(student_tokenizer, student_trust))


def teacher_map(teacher: Any, student: Any) -> VocabMap:
    """The map of a job's teacher (``TeacherConfig``) to its student (``StudentConfig``)."""
    return pair_map(teacher.tokenizer_name, teacher.trust_remote_code, student.tokenizer_name,
                    student.trust_remote_code)


class IdentitySide:
    """The identity payload of one teacher for the job's student.

    Args:
        teacher: the ``TeacherConfig``; its key in the prepared data is ``key``.
        student: the job's ``StudentConfig`` (its tokenizer decodes the student's answers).
    """

    def __init__(self, teacher: Any, student: Any, key: str) -> None:
        self.teacher, self.student, self.key = teacher, student, key

    def bounds(self, rows: Rows) -> tuple[torch.Tensor, torch.Tensor]:
        """Character bounds [B, T + 1] of the teacher's and [B, T_s + 1] of the student's answer tokens of ``rows``."""
        data = open_data(rows.data)
        out = []
        for key, spec in ((self.key, self.teacher), (STUDENT, self.student)):
            answers = [[t for t in labels if t != IGNORE_INDEX] for _, labels in
                       data.examples(rows.split, rows.indices, key)]
            out.append(answer_bounds(load_tokenizer(spec.tokenizer_name, spec.trust_remote_code), answers))
        return out[0], out[1]

    def payload(self, logits: torch.Tensor, labels: torch.Tensor, rows: Rows,
                config: IdentityConfig) -> IdentityPayload:
        """From the teacher's answer logits [B, K, V_t] and labels [B, K] of ``rows``."""
        t_bounds, s_bounds = self.bounds(rows)
        vmap = teacher_map(self.teacher, self.student) if config.shared else None
        p = compress_identity(logits, labels, t_bounds, vmap, top_k=config.shared_top_k)
        p.student_bounds = s_bounds.to(p.bounds.device)
        return p

    def from_gold(self, token_logp: torch.Tensor, lengths: torch.Tensor, rows: Rows) -> IdentityPayload:
        """Chunk likelihoods only, from stored gold-token log-probabilities [B, T] (a payload store)."""
        t_bounds, s_bounds = self.bounds(rows)
        none = torch.empty(*token_logp.shape, 0)
        return IdentityPayload(none.int(), none, token_logp, t_bounds[:, :token_logp.shape[1] + 1], lengths, s_bounds)
