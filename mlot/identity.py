"""Identity-aware cross-tokenizer terms: carry *which* continuation the teacher prefers, not only its shape.

MultiLevelOT and ULD compare sorted probabilities: the loss is the same whichever token carries the mass.
The terms here compare teacher and student where they speak about the same text:

* :func:`shared_vocab_kl` (exact match, TRL GOLD's hybrid idea): at *aligned* positions (both models start a
  token at the same character of the answer), KL between the two distributions restricted to the tokens
  whose normalised strings exist in both vocabularies (:func:`mlot.vocab.vocab_map`), each renormalised over that
  shared set.
* :func:`chunk_likelihood` (aligned chunks, as in ALM): the answer is cut at the characters that are token
  boundaries in both tokenizations; per chunk each model's log-probability of it (the sum over its own
  tokens) is compared by the binary KL between Bernoulli(p_teacher) and Bernoulli(p_student). A chunk is an
  event both models assign a probability to, so the pair (p, 1 − p) is a distribution on either side;
  unlike |Δ log p| it weighs a chunk by its mass: two tiny probabilities are close, whatever their ratio.
* :func:`projection_kl` (after X-Token's P-KL): at aligned positions, the student's distribution pushed onto
  the teacher's classes through the projection of :mod:`mlot.vocab` (each student token to the teacher token
  that spells its beginning), and KL(teacher || pushed student) over the teacher's top classes + the rest.

Character coordinates: :func:`char_bounds` gives, per answer token, the count of non-space characters
decoded before it (so "▁black|berries" and "black|##berries" agree); a special token (EOS) takes one
virtual character at the end. The terms read only [B, T] tensors of these bounds: no Python loop per token.

Payload discipline: the teacher side (:func:`compress_identity`) keeps per answer position its top-k shared
classes with their probabilities, its top-k_p projection classes with theirs, its log-probability of the gold
token and its bounds: 2k + 2k_p + 2 numbers per token, never the vocabulary (2 with the chunk term alone).

In training they are optional terms of the OT-family methods, weighted by :class:`IdentityConfig`
(``loss.params.shared_weight`` / ``chunk_weight`` / ``projection_weight``) and computed by :func:`identity_terms`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Sequence

import torch
from torch import Tensor

from .result import DistillResult
from .rows import AnswerRows, answer_rows
from .spans import answer_spans, compute_dtype, gather_rows, row_index
from .vocab import VocabMap

# ---------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class IdentityConfig:
    """Weights of the identity-aware terms next to a method's own loss (0: off).

    Attributes:
        shared_weight: weight of :func:`shared_vocab_kl` (needs the teacher's shared-class payload).
        chunk_weight: weight of :func:`chunk_likelihood` (needs only gold log-probabilities and bounds).
        projection_weight: weight of :func:`projection_kl` (needs the teacher's projected-class payload).
        shared_top_k: shared classes the teacher keeps per answer position (None: all, exact).
        projection_top_k: projection classes the teacher keeps per answer position (the rest is one event).
    """

    shared_weight: float = 0.0
    chunk_weight: float = 0.0
    projection_weight: float = 0.0
    shared_top_k: int | None = 20
    projection_top_k: int = 20

    def __post_init__(self) -> None:
        for name in ("shared_weight", "chunk_weight", "projection_weight"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ValueError(f"{name} must be a number >= 0, got {value!r}")
        for name, k, none in (("shared_top_k", self.shared_top_k, " or None (all classes)"),
                              ("projection_top_k", self.projection_top_k, "")):
            if (k is not None or not none) and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
                raise ValueError(f"{name} must be a positive integer{none}, got {k!r}")

    @property
    def on(self) -> bool:
        return self.shared_weight > 0 or self.chunk_weight > 0 or self.projection_weight > 0

    @property
    def shared(self) -> bool:
        return self.shared_weight > 0

    @property
    def projection(self) -> bool:
        return self.projection_weight > 0

    @property
    def needs_distribution(self) -> bool:
        """Does the teacher side need its whole distribution (not only gold log-probabilities)?"""
        return self.shared or self.projection


IDENTITY_FIELDS = tuple(f.name for f in fields(IdentityConfig))


# ---------------------------------------------------------------------------- character coordinates


def char_bounds(tokenizer: Any, answer_ids: Sequence[int]) -> list[int]:
    """[n + 1] boundaries of ``n`` answer tokens in non-space characters of the decoded answer (0 first);
    a special token (EOS) spans one virtual character after the text."""
    special = set(tokenizer.all_special_ids)
    out, text_ids, extra = [0], [], 0
    for token in answer_ids:
        if token in special:
            extra += 1
            out.append(out[-1] + 1)
        else:  # decode the whole prefix: a token's own text depends on its neighbours (spaces, ##)
            text_ids.append(token)
            out.append(sum(not c.isspace() for c in tokenizer.decode(text_ids)) + extra)
    return out


def answer_bounds(tokenizer: Any, answers: Sequence[Sequence[int]]) -> Tensor:
    """[B, T + 1] int32: :func:`char_bounds` of B answers (token ids), padded (:func:`pad_bounds`)."""
    return pad_bounds([char_bounds(tokenizer, a) for a in answers])


def pad_bounds(bounds: Sequence[Sequence[int]]) -> Tensor:
    """[B, T + 1] int32 (half the bytes on the wire): each row's bounds, padded by repeating its last one (a
    zero-width tail)."""
    out = torch.empty(len(bounds), max(len(b) for b in bounds), dtype=torch.int32)
    for r, b in enumerate(bounds):
        out[r, :len(b)] = torch.tensor(b)
        out[r, len(b):] = b[-1]
    return out


# ---------------------------------------------------------------------------- the teacher's payload


@dataclass
class IdentityPayload:
    """The teacher side of both terms, for B answers of up to T teacher tokens.

    Attributes:
        classes: [B, T, k] int32, the k most probable shared classes per answer position (-1: none);
            k = 0 when the payload serves only :func:`chunk_likelihood`.
        probs: [B, T, k] their probabilities, renormalised over the shared classes.
        token_logp: [B, T] the teacher's log-probability of its own gold answer token.
        bounds: [B, T + 1] int32, character bounds of its answer tokens (:func:`char_bounds`).
        lengths: [B] long, answer tokens per sample.
        student_bounds: [B, T_s + 1] int32 or None: the student's bounds of the same answers, when the
            teacher side computes them (in training it does, so the student decodes nothing on its step).
        targets: [B, T, k_p] int32 or None: the k_p most probable projection classes per answer position
            (``VocabMap.teacher_target``; -1: none), for :func:`projection_kl`.
        target_probs: [B, T, k_p] their probabilities (not renormalised: the rest is one more event).
        gold_target: [B, T] int32 or None: the projection class of each gold answer token (-1: none).
    """

    classes: Tensor
    probs: Tensor
    token_logp: Tensor
    bounds: Tensor
    lengths: Tensor
    student_bounds: Tensor | None = None
    targets: Tensor | None = None
    target_probs: Tensor | None = None
    gold_target: Tensor | None = None

    def tensors(self) -> dict[str, Tensor]:
        """Its tensors by field name (student_bounds only when set)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    def map(self, fn: Any) -> "IdentityPayload":
        """A copy with ``fn`` applied to every tensor."""
        return IdentityPayload(**{name: fn(t) for name, t in self.tensors().items()})


@torch.no_grad()
def compress_identity(teacher_logits: Tensor, teacher_labels: Tensor, bounds: Tensor, vmap: VocabMap | None,
                      top_k: int | None = 20, temperature: float = 1.0, projection_top_k: int = 0,
                      shared: bool = True) -> IdentityPayload:
    """The teacher's payload for the identity terms.

    Args:
        teacher_logits: [B, L_t, V_t]; teacher_labels: [B, L_t] (-100 outside the answer).
        bounds: [B, >= T + 1] its answer tokens' character bounds (:func:`pad_bounds`).
        vmap: the (teacher, student) :func:`mlot.vocab.vocab_map`; None keeps no classes (chunks only).
        top_k: shared classes kept per position (None: all of them, exact); ``shared`` False keeps none.
        projection_top_k: projection classes kept per position (0: none, the projection term is off).
    """
    logp, mask, gold, length = _answer_rows(teacher_logits, teacher_labels, "teacher_labels", temperature)
    token_logp = _gold(logp, mask, gold)
    bounds = bounds[:, :logp.shape[1] + 1].to(logp.device)
    none = torch.empty(*logp.shape[:2], 0, device=logp.device)
    classes, probs = none.int(), none.to(logp.dtype)
    if vmap is not None and shared:
        mass = _class_mass(logp, vmap.teacher_class, int(vmap.student_members.shape[0]))
        mass = mass / mass.sum(-1, keepdim=True).clamp(min=torch.finfo(mass.dtype).tiny)
        probs, classes = _top(mass, top_k, mask, renormalise=True)
    out = IdentityPayload(classes, probs, token_logp, bounds, length)
    if projection_top_k:
        if vmap is None or vmap.teacher_target is None:
            raise ValueError("projection_top_k > 0 needs a vocabulary map with the projection (mlot.vocab.vocab_map)")
        out.targets, out.target_probs, out.gold_target = projection_payload(logp, None, gold, mask, vmap,
                                                                            projection_top_k)
    return out


@torch.no_grad()
def projection_payload(logp: Tensor, ids: Tensor | None, gold: Tensor, mask: Tensor, vmap: VocabMap, k: int
                       ) -> tuple[Tensor, Tensor, Tensor]:
    """The projection term's teacher side: (targets [B, T, k] int32, their probabilities, gold_target [B, T]).

    Args:
        logp: [B, T, V] the teacher's log-probabilities per answer row, or with ``ids`` [B, T, K] the K an engine
            returned (its top K, ``mlot.top_logprobs``): each class's probability is then the mass of its
            returned members, low by at most the row's unreturned mass (it joins the "rest" event of
            :func:`projection_kl`), exact when every member of the kept classes was returned.
        gold: [B, T] the gold token ids; mask: [B, T] the answer rows.

    Where the gold token starts a word (:func:`word_start`), the probabilities are given that a word starts
    there: over the teacher's word-start tokens only (``VocabMap.teacher_start``), renormalised. From a top K
    the normaliser counts the unreturned mass U as if it all started words: a class stays low, by at most
    U / (S + U) (S: the returned word-start mass).
    """
    target = vmap.teacher_target.to(logp.device)
    gold_target = target[gold].masked_fill(~mask, -1)
    if vmap.teacher_start is not None:
        start = vmap.teacher_start.to(logp.device)
        given = word_start(gold_target, vmap)[..., None]
        starts = logp.masked_fill(given & ~(start if ids is None else start[ids]), float("-inf"))
        norm = starts.logsumexp(-1, keepdim=True)
        if ids is not None:  # + the unreturned mass
            norm = norm.exp().add((1 - logp.exp().sum(-1, keepdim=True)).clamp(min=0)).log()
        logp = torch.where(given, starts - norm.clamp(min=torch.finfo(logp.dtype).min), logp)
    mass = _class_mass(logp, target if ids is None else target[ids], int(vmap.target_members.shape[0]))
    probs, classes = _top(mass, k, mask, renormalise=False)
    return classes, probs, gold_target.int()


def word_start(gold_target: Tensor, vmap: VocabMap) -> Tensor:
    """[B, T] bool: the teacher's gold token is a word start (EOS included) in a map that conditions on it
    (:mod:`mlot.vocab`): there the projection term compares the two models given that a word starts."""
    if vmap.teacher_start is None:
        return torch.zeros_like(gold_target, dtype=torch.bool)
    start = vmap.target_start.to(gold_target.device)
    return (gold_target >= 0) & start[gold_target.long().clamp(min=0)]


def _class_mass(logp: Tensor, cls: Tensor, n: int) -> Tensor:
    """[B, T, n] the probability of each class: ``exp(logp)`` [B, T, V] summed by ``cls`` [V], or [B, T, V] per
    row (an engine's top K), -1: no class. Rows past an answer are the caller's to mask."""
    cls = cls.to(logp.device)
    mass = torch.zeros(*logp.shape[:2], n + 1, dtype=logp.dtype, device=logp.device)
    mass.scatter_add_(-1, torch.where(cls >= 0, cls, n).expand_as(logp), logp.exp())
    return mass[..., :n]


def _top(mass: Tensor, k: int | None, mask: Tensor, renormalise: bool) -> tuple[Tensor, Tensor]:
    """The k largest of ``mass`` [B, T, n] per position (all when k is None): probabilities and int32 classes,
    0 and -1 outside the answers."""
    n = mass.shape[-1]
    probs, classes = mass.topk(n if k is None else min(k, n), dim=-1)
    if renormalise:
        probs = probs / probs.sum(-1, keepdim=True).clamp(min=torch.finfo(probs.dtype).tiny)
    return probs.masked_fill(~mask[..., None], 0.0), classes.masked_fill(~mask[..., None], -1).int()


# ---------------------------------------------------------------------------- the student's terms


def _answer_rows(logits: Tensor, labels: Tensor, name: str, temperature: float = 1.0
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Answer rows' log-probabilities [B, T, V], their mask, gold ids [B, T] and lengths [B]."""
    start, length = answer_spans(labels, name=name)
    width = int(length.max())
    rows, mask = gather_rows(logits, start, length, width)
    gold = gather_rows(labels[..., None], start + 1, length, width)[0][..., 0].clamp(min=0)
    return torch.log_softmax(rows.to(compute_dtype(rows)) / temperature, -1), mask, gold, length


@torch.no_grad()
def gold_log_probs(teacher_logits: Tensor, teacher_labels: Tensor) -> Tensor:
    """[B, T] the teacher's log-probability of each gold answer token (0 past a sample's answer): what
    :func:`chunk_likelihood` needs of it, kept by a payload teacher store."""
    return _gold(*_answer_rows(teacher_logits, teacher_labels, "teacher_labels")[:3])


def _gold(logp: Tensor, mask: Tensor, gold: Tensor) -> Tensor:
    """[B, T] ``logp`` [B, T, V] at the gold ids, 0 outside the answers."""
    return logp.gather(-1, gold[..., None])[..., 0].masked_fill(~mask, 0.0)


def _student_rows(logits: Tensor, labels: Tensor) -> tuple[AnswerRows, Tensor, Tensor, Tensor]:
    """The student's reader (``mlot.rows``), its answer rows' index and mask [B, T_s] and lengths [B]."""
    start, length = answer_spans(labels, name="student_labels")
    index, mask = row_index(start, length, int(length.max()), logits.shape[1])
    return answer_rows(logits, labels), index, mask, length


def _starts_match(t_bounds: Tensor, t_len: Tensor, s_bounds: Tensor, s_len: Tensor) -> Tensor:
    """[B, T_t, T_s] True where teacher token j and student token i start at the same character."""
    t_pos = torch.arange(t_bounds.shape[1] - 1, device=t_bounds.device)
    s_pos = torch.arange(s_bounds.shape[1] - 1, device=s_bounds.device)
    t_ok, s_ok = t_pos[None] < t_len[:, None], s_pos[None] < s_len[:, None]
    same = t_bounds[:, :-1, None] == s_bounds[:, None, :-1]
    return same & t_ok[:, :, None] & s_ok[:, None, :]


def shared_vocab_kl(student_logits: Tensor, student_labels: Tensor, student_bounds: Tensor,
                    payload: IdentityPayload, vmap: VocabMap, alpha: float = 1.0) -> DistillResult:
    """KL(teacher || student) over the shared classes at aligned answer positions, mean per sample.

    Args:
        student_logits: [B, L_s, V_s]; student_labels: [B, L_s]; student_bounds: [B, >= T_s + 1].
        payload: :func:`compress_identity` of the same B answers.
    Returns ``distill`` = mean over samples of the mean over aligned positions (a sample with none adds 0);
    terms ``shared_kl`` [B] and ``aligned`` [B] (aligned positions per sample).
    """
    rows, index, _, s_len = _student_rows(student_logits, student_labels)
    device = index.device
    s_bounds = student_bounds[:, :index.shape[1] + 1].to(device).long()
    match = _starts_match(payload.bounds.to(device).long(), payload.lengths, s_bounds, s_len)  # [B, T_t, T_s]
    t_has = match.any(-1)                                                              # [B, T_t]
    s_at = match.float().argmax(-1)                                                    # [B, T_t]
    members = vmap.student_members.to(device)[payload.classes.long().clamp(min=0)]  # [B, T_t, k, m]
    # log softmax over the shared vocabulary, read at the members: z_c - logsumexp_shared(z), [B, T_t, k * m]
    picked = rows.log_softmax_at(index.gather(1, s_at), t_has, members.clamp(min=0).flatten(2),
                                 subset=vmap.student_shared.to(device))[0]
    log_s = picked.view(members.shape).masked_fill(members < 0, float("-inf")).logsumexp(-1)  # [B, T_t, k]
    p = payload.probs.to(rows.dtype)
    xlogx = torch.where(p > 0, p * p.clamp(min=torch.finfo(p.dtype).tiny).log(), 0.0)
    per_pos = (xlogx - torch.where(p > 0, p * log_s, 0.0)).sum(-1)                     # [B, T_t]
    count = t_has.sum(1)
    per_sample = (per_pos * t_has).sum(1) / count.clamp(min=1)
    return DistillResult(per_sample.mean(), alpha, per_sample, {"shared_kl": per_sample, "aligned": count.to(p.dtype)})


def _chunk_sums(bounds: Tensor, length: Tensor, common: Tensor, token_logp: Tensor) -> Tensor:
    """[B, K] sum of ``token_logp`` [B, T] over the tokens that start in each chunk of ``common`` [B, K + 1]."""
    starts = bounds[:, :-1].contiguous()
    chunk = torch.searchsorted(common.contiguous(), starts, right=True) - 1
    valid = torch.arange(starts.shape[1], device=starts.device)[None] < length[:, None]
    out = torch.zeros(common.shape[0], common.shape[1], dtype=token_logp.dtype, device=token_logp.device)
    out.scatter_add_(1, torch.where(valid, chunk, common.shape[1] - 1), token_logp * valid)
    return out[:, :-1]


def chunk_likelihood(student_logits: Tensor, student_labels: Tensor, student_bounds: Tensor,
                     payload: IdentityPayload, alpha: float = 1.0) -> DistillResult:
    """Binary KL between the teacher's and the student's probability of each aligned chunk, mean per sample.

    Chunks end at the character bounds both tokenizations share (0 and the end always are). Returns
    ``distill`` (mean over samples of the mean over chunks) and terms ``chunk_kl`` [B], ``chunks`` [B],
    ``student_chunk_logp`` [B, K] and ``teacher_chunk_logp`` [B, K] (0 past a sample's chunks).
    """
    rows, index, mask, s_len = _student_rows(student_logits, student_labels)
    s_token = rows.gold_at(index, mask)                                                # [B, T_s]
    device, dtype = index.device, rows.dtype
    s_bounds = student_bounds[:, :index.shape[1] + 1].to(device).long()
    t_bounds, t_len = payload.bounds.to(device).long(), payload.lengths.to(device)
    t_end = t_bounds.gather(1, t_len[:, None])
    in_s = (t_bounds[:, :, None] == s_bounds[:, None, :]).any(-1)
    t_pos = torch.arange(t_bounds.shape[1], device=device)[None]
    big = torch.iinfo(torch.long).max // 2
    common = torch.where(in_s & (t_pos <= t_len[:, None]), t_bounds, big).sort(-1).values  # [B, T_t + 1]
    n_chunks = (common < big).sum(1) - 1
    common = torch.where(common < big, common, t_end + 1)  # past the end: empty chunks
    s_chunk = _chunk_sums(s_bounds, s_len, common, s_token)
    t_chunk = _chunk_sums(t_bounds, t_len, common, payload.token_logp.to(dtype))
    live = torch.arange(s_chunk.shape[1], device=device)[None] < n_chunks[:, None]
    kl = _binary_kl(t_chunk, s_chunk).masked_fill(~live, 0.0)
    per_sample = kl.sum(1) / n_chunks.clamp(min=1)
    return DistillResult(per_sample.mean(), alpha, per_sample,
                         {"chunk_kl": per_sample, "chunks": n_chunks.to(dtype),
                          "student_chunk_logp": s_chunk * live, "teacher_chunk_logp": t_chunk * live})


def _binary_kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(Bernoulli(p) || Bernoulli(q)) from log p, log q (elementwise), stable as p or q -> 1."""
    eps = torch.finfo(log_p.dtype).eps
    log_p, log_q = log_p.clamp(max=-eps), log_q.clamp(max=-eps)
    log1m_p, log1m_q = torch.log(-torch.expm1(log_p)), torch.log(-torch.expm1(log_q))
    return log_p.exp() * (log_p - log_q) + (-torch.expm1(log_p)) * (log1m_p - log1m_q)


def _last_teacher_at(match: Tensor) -> Tensor:
    """[B, T_s] for each student token, the last teacher token starting at its character (a bare space piece
    starts where the next token does: the one after it is the teacher's real choice there), -1 when none."""
    pos = torch.arange(match.shape[1], device=match.device)[None, :, None]
    return torch.where(match, pos, -1).amax(1)


def projection_kl(student_logits: Tensor, student_labels: Tensor, student_bounds: Tensor,
                  payload: IdentityPayload, vmap: VocabMap, alpha: float = 1.0) -> DistillResult:
    """KL(teacher || student pushed forward onto the teacher's classes) at aligned answer positions.

    At each student answer token i that starts at a character where a teacher token j starts, the student's
    distribution is pushed through the projection ``f`` (:mod:`mlot.vocab`: each student token to the teacher
    class that spells its beginning), Q_c = sum_{s: f(s) = c} q_i(s), and compared with the teacher's p_j on
    its k kept classes plus one event for everything else (a coarsening, so it is a lower bound of the KL
    over all classes and exact when the kept classes carry all the mass):

        KL_i = sum_c p_c log(p_c / Q_c) + p_rest log(p_rest / Q_rest),   p_rest = 1 - sum_c p_c, Q_rest likewise.

    ``f`` ignores context; at aligned gold tokens the context is known, so the student's gold token is sent to
    the class of the teacher's gold token there (the teacher writes " kernels" as "▁k|ern|els": the student's
    "kernel" begins with "▁k" here, though ``f`` sends it to "▁kernel").

    Where the teacher's gold token starts a word both sides are given that a word starts there
    (:func:`projection_payload`; the student's softmax over its word-start tokens, ``VocabMap.student_start``):
    their mass on continuing the previous word is not comparable. After "field" a teacher that writes
    "▁field|s" puts the mass of "fields" on "s"; a WordPiece student wrote "fields" as one token a step earlier
    and never writes "field" + "##s". A position where only the teacher's token starts a word is skipped.

    The end of the answer (the teacher's gold EOS, ``VocabMap.eos_target``) is skipped too: CE scores it from
    the labels, and there the term only re-weights a near-certain token. Measured (docs/quality.md), it slowed
    learning as much as weighting CE on the EOS token 4x does.

    Args:
        student_logits: [B, L_s, V_s]; student_labels: [B, L_s]; student_bounds: [B, >= T_s + 1].
        payload: :func:`compress_identity` with ``projection_top_k`` > 0, of the same B answers.
    Returns ``distill`` = mean over samples of the mean over aligned student positions (none: 0); terms
    ``projection_kl`` [B] and ``projected`` [B] (aligned positions per sample).
    """
    if payload.targets is None:
        raise ValueError("the identity payload has no projection classes: compress it with projection_top_k > 0")
    rows, index, _, s_len = _student_rows(student_logits, student_labels)
    device, dtype = index.device, rows.dtype
    s_bounds = student_bounds[:, :index.shape[1] + 1].to(device).long()
    match = _starts_match(payload.bounds.to(device).long(), payload.lengths.to(device), s_bounds, s_len)
    at = _last_teacher_at(match)                                                        # [B, T_s]
    k = payload.targets.shape[-1]
    pick = lambda t, n: t.to(device).gather(1, at.clamp(min=0)[..., None].expand(-1, -1, n))  # noqa: E731
    classes, p = pick(payload.targets, k).long(), pick(payload.target_probs, k).to(dtype)   # [B, T_s, k]
    t_gold = pick(payload.gold_target[..., None], 1).long()                             # [B, T_s, 1]
    has = (at >= 0) & ((t_gold[..., 0] != vmap.eos_target) | (vmap.eos_target < 0))      # the end is CE's
    s_gold = rows.at(index, has, rows.gold)
    members = _members_in_context(vmap.target_members.to(device)[classes.clamp(min=0)], classes, s_gold, t_gold)
    given = word_start(t_gold[..., 0], vmap) & has          # the teacher's probabilities are given a word start
    s_start = None if vmap.student_start is None else vmap.student_start.to(device)
    if s_start is not None:
        has = has & ~(given & ~s_start[s_gold])              # a word starts on the teacher's side only: skipped
        given = given & has
        members = members.masked_fill(given[..., None, None] & ~s_start[members.clamp(min=0)], -1)
    empty = (classes < 0) | (members < 0).all(-1)                                      # [B, T_s, k]
    p = p.masked_fill(empty, 0.0)
    columns = members.clamp(min=0).flatten(2)
    logq = rows.log_softmax_at(index, has & ~given, columns)[0]
    if s_start is not None:  # given a word start: the softmax over the student's word-start tokens
        logq = torch.where(given[..., None], rows.log_softmax_at(index, given, columns, subset=s_start)[0], logq)
    logq = logq.view(members.shape).masked_fill(members < 0, float("-inf"))
    logq[..., 0] = logq[..., 0].masked_fill(empty, 0.0)  # a finite stand-in (its p is 0): no NaN gradient
    log_big_q = logq.logsumexp(-1).masked_fill(empty, 0.0)                              # [B, T_s, k]
    tiny = torch.finfo(dtype).tiny
    p_rest = (1 - p.sum(-1)).clamp(min=0)
    q_rest = (1 - (log_big_q.exp() * ~empty).sum(-1)).clamp(min=tiny)
    kl = torch.where(p > 0, p * (p.clamp(min=tiny).log() - log_big_q), 0.0).sum(-1)
    kl = kl + torch.where(p_rest > 0, p_rest * (p_rest.clamp(min=tiny).log() - q_rest.log()), 0.0)
    count = has.sum(1)
    per_sample = (kl * has).sum(1) / count.clamp(min=1)
    return DistillResult(per_sample.mean(), alpha, per_sample, {"projection_kl": per_sample,
                                                                "projected": count.to(dtype)})


def _members_in_context(members: Tensor, classes: Tensor, s_gold: Tensor, t_gold: Tensor) -> Tensor:
    """[B, T_s, k, m + 1] the student ids summed into each kept class: ``members`` [B, T_s, k, m] of the static
    map, with the student's gold token ``s_gold`` [B, T_s] moved into the teacher's gold class ``t_gold``
    [B, T_s, 1] (out of every other class; into none when that class is not kept: it is then in the rest)."""
    is_gold = members == s_gold[..., None, None]
    home = classes == t_gold                                                            # [B, T_s, k]
    members = members.masked_fill(is_gold & ~home[..., None], -1)
    extra = torch.where(home & ~is_gold.any(-1), s_gold[..., None], -1)
    return torch.cat([members, extra[..., None]], -1)


# ---------------------------------------------------------------------------- both, as a method's extra terms


def identity_terms(student_logits: Tensor, student_labels: Tensor, payload: IdentityPayload, vmap: VocabMap | None,
                   config: IdentityConfig) -> DistillResult:
    """``shared_weight * shared_vocab_kl + chunk_weight * chunk_likelihood + projection_weight * projection_kl``
    on one teacher's payload.

    Args:
        payload: with ``student_bounds`` set (the teacher side computes them in training).
        vmap: needed when ``shared_weight`` or ``projection_weight`` > 0.
    Returns ``distill`` = the weighted sum (``alpha`` 1) and the unweighted terms ``shared_kl`` / ``aligned``,
    ``chunk_kl`` / ``chunks`` and ``projection_kl`` / ``projected`` [B] of the terms that are on.
    """
    if not config.on:
        raise ValueError("no identity term is on (shared_weight, chunk_weight and projection_weight are 0)")
    if payload.student_bounds is None:
        raise ValueError("the identity payload has no student_bounds: compute them next to the teacher")
    if config.shared and (vmap is None or payload.classes.shape[-1] == 0):
        raise ValueError("shared_weight > 0 needs the vocabulary map and a payload with shared classes")
    if config.projection and (vmap is None or vmap.target_members is None or payload.targets is None):
        raise ValueError("projection_weight > 0 needs the vocabulary map and a payload with projection classes")
    parts, terms = [], {}
    if config.shared:
        r = shared_vocab_kl(student_logits, student_labels, payload.student_bounds, payload, vmap)
        parts.append(config.shared_weight * r.per_sample)
        terms.update(r.terms)
    if config.chunk_weight > 0:
        r = chunk_likelihood(student_logits, student_labels, payload.student_bounds, payload)
        parts.append(config.chunk_weight * r.per_sample)
        terms.update({k: r.terms[k] for k in ("chunk_kl", "chunks")})
    if config.projection:
        r = projection_kl(student_logits, student_labels, payload.student_bounds, payload, vmap)
        parts.append(config.projection_weight * r.per_sample)
        terms.update(r.terms)
    per_sample = torch.stack(parts).sum(0)
    return DistillResult(per_sample.mean(), 1.0, per_sample, terms)
