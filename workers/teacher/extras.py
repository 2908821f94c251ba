"""What a teacher ships beside its payload, when the job's loss asks for it: the identity-aware terms' payload
(``mlot.identity``) and each sample's NLL per answer byte (``mlot.mixing``, for per-sample teacher mixing).

Computed where the teacher's logits are (a teacher actor, or a store reader), per request. The character
bounds of both models' answer tokens come from token ids (the prepared data's, or the student's generated
ones on an on-policy micro-batch), so the student worker decodes nothing on its step. The vocabulary map of a
(teacher, student) tokenizer pair is built once per process (``workers.vocab``); the student worker builds
the same map for its side of the exact-match term.

Cost, measured on the 2-core development CPU: about 1 ms of decoding per answer of ~50 tokens and per model
(:func:`mlot.identity.char_bounds`), 0.25 s (SentencePiece -> WordPiece) to 0.65 s (Tekken -> WordPiece)
per vocabulary map (``benchmarks/identity.py``).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

import mlot
from mlot.identity import IdentityPayload, answer_bounds, compress_identity, projection_payload
from mlot.mixing import PER_SAMPLE_MIXES, nll_per_byte
from mlot.top_logprobs import TopLogprobs
from workers.data.encoding import answers_of
from workers.data.prepared import STUDENT, Rows, open_data
from workers.models import load_tokenizer
from workers.vocab import teacher_map


class Extras:
    """One teacher's extras for the job's student.

    Args:
        teacher: the ``TeacherConfig``; its key in the prepared data is ``key``.
        student: the job's ``StudentConfig`` (its tokenizer decodes the student's answers); None serves no
            identity terms.
    """

    def __init__(self, teacher: Any, student: Any, key: str) -> None:
        self.teacher, self.student, self.key = teacher, student, key

    def add(self, payload: mlot.TeacherPayload, loss: Any, rows: Rows, answers: Sequence[Any] | None = None,
            logits: torch.Tensor | None = None, labels: torch.Tensor | None = None,
            token_logp: torch.Tensor | None = None, top: TopLogprobs | None = None) -> mlot.TeacherPayload:
        """Set what ``loss`` (a ``LossConfig``) needs on ``payload``, from the teacher's answer logits [B, K, V]
        and labels [B, K], or (a payload store, a top-K engine) its gold tokens' log-probabilities [B, T], with
        ``labels`` where the text is not the prepared data's, and a top-K engine's ``top`` (the projection term).

        ``answers``: the student's generated answers (``workers.generation.Answer``) on an on-policy micro-batch.
        """
        identity = loss.spec.identity_config(loss.params)
        if identity.on:
            if self.student is None:
                raise ValueError(f"teacher {self.teacher.name}: the identity-aware terms need the job's student config")
            s_answers = [list(a.ids) for a in answers] if answers is not None else self._prepared(rows, STUDENT)
            s_bounds = answer_bounds(self._tokenizer(self.student), s_answers)
            if logits is not None:
                vmap = teacher_map(self.teacher, self.student) if identity.needs_distribution else None
                t_bounds = answer_bounds(self._tokenizer(self.teacher), answers_of(labels.tolist()))
                payload.identity = compress_identity(
                    logits, labels, t_bounds, vmap, top_k=identity.shared_top_k, shared=identity.shared,
                    projection_top_k=identity.projection_top_k if identity.projection else 0)
            else:
                # the teacher's tokens of the scored text: the prepared data's, or ``labels`` where it is not
                t_answers = answers_of(labels.tolist()) if labels is not None else self._prepared(rows, self.key)
                payload.identity = self._from_gold(token_logp, payload.lengths, t_answers)
                if identity.projection:  # an engine's top K (the vLLM engine): the projection from them
                    self._project(payload.identity, top, t_answers, identity.projection_top_k)
            payload.identity.student_bounds = s_bounds.to(payload.identity.bounds.device)
        if loss.teacher_mix in PER_SAMPLE_MIXES:
            texts = [a.text for a in answers] if answers is not None else [
                r["answer"] for r in open_data(rows.data).rows(rows.split, rows.indices)]
            n_bytes = torch.tensor([len(t.encode("utf-8")) for t in texts])
            if logits is not None:
                payload.nll_per_byte = nll_per_byte(logits, labels, n_bytes).float()
            else:
                payload.nll_per_byte = (-token_logp.sum(1) / n_bytes.clamp(min=1)).float()
        return payload

    def _from_gold(self, token_logp: torch.Tensor, lengths: torch.Tensor, answers: list[list[int]]
                   ) -> IdentityPayload:
        """Chunk likelihoods only (no shared or projection classes: they need the teacher's distribution), of the
        teacher's ``answers`` (token ids per row)."""
        t_bounds = answer_bounds(self._tokenizer(self.teacher), answers)
        none = torch.empty(*token_logp.shape, 0)
        return IdentityPayload(none.int(), none, token_logp, t_bounds[:, :token_logp.shape[1] + 1], lengths)

    def _project(self, identity: IdentityPayload, top: TopLogprobs | None, answers: list[list[int]], k: int) -> None:
        """Set the projection term's part of ``identity`` from an engine's top-K log-probabilities of the teacher's
        ``answers``."""
        if top is None:
            raise ValueError(f"teacher {self.teacher.name}: the projection term needs the teacher's distribution "
                             "(logits, or an engine's top K)")
        gold = torch.zeros(top.ids.shape[:2], dtype=torch.long)
        for b, a in enumerate(answers):
            gold[b, :len(a)] = torch.tensor(a)
        vmap = teacher_map(self.teacher, self.student)
        identity.targets, identity.target_probs, identity.gold_target = projection_payload(
            top.logp, top.ids, gold, top.mask, vmap, k)

    @staticmethod
    def _prepared(rows: Rows, key: str) -> list[list[int]]:
        return answers_of([labels for _, labels in open_data(rows.data).examples(rows.split, rows.indices, key)])

    @staticmethod
    def _tokenizer(spec: Any) -> Any:
        return load_tokenizer(spec.tokenizer_name, spec.trust_remote_code)
