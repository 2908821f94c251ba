"""Identity-aware cross-tokenizer terms: carry *which* continuation the teacher prefers, not only its shape.

MultiLevelOT and ULD compare sorted probabilities: the loss is the same whichever token carries the mass.
The two terms here compare teacher and student where they speak about the same text:

* :func:`shared_vocab_kl` (exact match, TRL GOLD's hybrid idea): at *aligned* positions (both models start a
  token at the same character of the answer), KL between the two distributions restricted to the tokens
  whose normalised strings exist in both vocabularies (:func:`vocab_map`), each renormalised over that
  shared set.
* :func:`chunk_likelihood` (aligned chunks, as in ALM): the answer is cut at the characters that are token
  boundaries in both tokenizations; per chunk each model's log-probability of it (the sum over its own
  tokens) is compared by the binary KL between Bernoulli(p_teacher) and Bernoulli(p_student). A chunk is an
  event both models assign a probability to, so the pair (p, 1 − p) is a distribution on either side;
  unlike |Δ log p| it weighs a chunk by its mass: two tiny probabilities are close, whatever their ratio.

Character coordinates: :func:`char_bounds` gives, per answer token, the count of non-space characters
decoded before it (so "▁black|berries" and "black|##berries" agree); a special token (EOS) takes one
virtual character at the end. Both terms read only [B, T] tensors of these bounds: no Python loop per token.

Payload discipline: the teacher side (:func:`compress_identity`) keeps per answer position its top-k shared
classes with their probabilities, its log-probability of the gold token and its bounds: k + 3 numbers per
token, never the vocabulary (2 without the exact-match term).

In training both are optional terms of the OT-family methods, weighted by :class:`IdentityConfig`
(``loss.params.shared_weight`` / ``chunk_weight``) and computed by :func:`identity_terms`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Sequence

import torch
from torch import Tensor

from .result import DistillResult
from .rows import AnswerRows, answer_rows
from .spans import answer_spans, compute_dtype, gather_rows, row_index

# ---------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class IdentityConfig:
    """Weights of the identity-aware terms next to a method's own loss (0: off).

    Attributes:
        shared_weight: weight of :func:`shared_vocab_kl` (needs the teacher's shared-class payload).
        chunk_weight: weight of :func:`chunk_likelihood` (needs only gold log-probabilities and bounds).
        shared_top_k: shared classes the teacher keeps per answer position (None: all, exact).
    """

    shared_weight: float = 0.0
    chunk_weight: float = 0.0
    shared_top_k: int | None = 20

    def __post_init__(self) -> None:
        for name in ("shared_weight", "chunk_weight"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ValueError(f"{name} must be a number >= 0, got {value!r}")
        k = self.shared_top_k
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise ValueError(f"shared_top_k must be a positive integer or None (all classes), got {k!r}")

    @property
    def on(self) -> bool:
        return self.shared_weight > 0 or self.chunk_weight > 0

    @property
    def shared(self) -> bool:
        return self.shared_weight > 0


IDENTITY_FIELDS = tuple(f.name for f in fields(IdentityConfig))


# ---------------------------------------------------------------------------- the vocabulary map


@dataclass(frozen=True)
class VocabMap:
    """Tokens of two vocabularies grouped into shared classes (equal normalised strings).

    Attributes:
        teacher_class: [V_t] long, the class of each teacher token, -1 where its string has no match.
        student_members: [C, m] long, the student ids of each class (-1 padded; m is 1 unless the student
            has several spellings of one normalised string, e.g. cased ones).
        student_shared: [V_s] bool, the student tokens in some class.
        coverage: what share of each vocabulary is mapped, and the number of classes.
    """

    teacher_class: Tensor
    student_members: Tensor
    student_shared: Tensor
    coverage: dict[str, float]


def token_key(token: str, wordpiece: bool, lower: bool) -> tuple[bool, str] | None:
    """(starts a word, text) of a vocabulary entry: ``▁x`` / ``Ġx`` (SentencePiece, byte-level BPE) and a
    WordPiece ``x`` start a word, ``##x`` and a bare piece continue one. None for byte-fallback entries."""
    if token.startswith("<0x") and token.endswith(">"):
        return None
    if token.startswith("##"):
        start, text = False, token[2:]
    elif token[:1] in ("▁", "Ġ"):
        start, text = True, token[1:]
    else:
        start, text = wordpiece, token
    if not text:
        return None
    return start, text.lower() if lower else text


def _keys(tokenizer: Any, vocab: dict[str, int], lower: bool) -> dict[int, tuple[bool, str] | None]:
    wordpiece = sum(t.startswith("##") for t in vocab) > 0.05 * len(vocab)  # a few "##" tokens exist anywhere
    special = set(tokenizer.all_special_ids)
    return {i: None if i in special else token_key(t, wordpiece, lower) for t, i in vocab.items()}


def vocab_map(teacher_tokenizer: Any, student_tokenizer: Any) -> VocabMap:
    """Classes of tokens with equal normalised strings in both vocabularies (case-folded when either side is
    uncased); the two EOS tokens form a class. Identical vocabularies map every id to itself."""
    t_vocab, s_vocab = teacher_tokenizer.get_vocab(), student_tokenizer.get_vocab()
    v_t, v_s = _size(t_vocab), _size(s_vocab)
    if t_vocab == s_vocab:
        classes = torch.arange(v_t)
        return VocabMap(classes, classes[:, None], torch.ones(v_s, dtype=torch.bool),
                        {"teacher": 1.0, "student": 1.0, "classes": float(v_t)})
    lower = _uncased(teacher_tokenizer, t_vocab) or _uncased(student_tokenizer, s_vocab)
    t_keys, s_keys = _keys(teacher_tokenizer, t_vocab, lower), _keys(student_tokenizer, s_vocab, lower)
    t_keys[teacher_tokenizer.eos_token_id] = s_keys[student_tokenizer.eos_token_id] = (True, "</eos>")
    by_key: dict[tuple[bool, str], list[int]] = {}
    for i, key in s_keys.items():
        if key is not None:
            by_key.setdefault(key, []).append(i)
    shared = sorted({k for k in t_keys.values() if k is not None} & set(by_key))
    index = {k: c for c, k in enumerate(shared)}
    teacher_class = torch.full((v_t,), -1, dtype=torch.long)
    for i, key in t_keys.items():
        if key in index:
            teacher_class[i] = index[key]
    width = max((len(by_key[k]) for k in shared), default=1)
    members = torch.full((max(len(shared), 1), width), -1, dtype=torch.long)
    for c, k in enumerate(shared):
        members[c, :len(by_key[k])] = torch.tensor(by_key[k])
    student_shared = torch.zeros(v_s, dtype=torch.bool)
    student_shared[members[members >= 0]] = True
    coverage = {"teacher": float((teacher_class >= 0).float().mean()), "student": float(student_shared.float().mean()),
                "classes": float(len(shared))}
    return VocabMap(teacher_class, members, student_shared, coverage)


def _size(vocab: dict[str, int]) -> int:
    return max(vocab.values()) + 1


def _uncased(tokenizer: Any, vocab: dict[str, int]) -> bool:
    return bool(getattr(tokenizer, "do_lower_case", False)) or not any(
        t != t.lower() for t in list(vocab)[:20000] if t.isalpha())


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
    """

    classes: Tensor
    probs: Tensor
    token_logp: Tensor
    bounds: Tensor
    lengths: Tensor
    student_bounds: Tensor | None = None

    def tensors(self) -> dict[str, Tensor]:
        """Its tensors by field name (student_bounds only when set)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    def map(self, fn: Any) -> "IdentityPayload":
        """A copy with ``fn`` applied to every tensor."""
        return IdentityPayload(**{name: fn(t) for name, t in self.tensors().items()})


@torch.no_grad()
def compress_identity(teacher_logits: Tensor, teacher_labels: Tensor, bounds: Tensor, vmap: VocabMap | None,
                      top_k: int | None = 20, temperature: float = 1.0) -> IdentityPayload:
    """The teacher's payload for both terms.

    Args:
        teacher_logits: [B, L_t, V_t]; teacher_labels: [B, L_t] (-100 outside the answer).
        bounds: [B, >= T + 1] its answer tokens' character bounds (:func:`pad_bounds`).
        vmap: the (teacher, student) :func:`vocab_map`; None keeps no shared classes (k = 0: chunks only).
        top_k: shared classes kept per position (None: all of them, exact).
    """
    logp, mask, gold, length = _answer_rows(teacher_logits, teacher_labels, "teacher_labels", temperature)
    token_logp = _gold(logp, mask, gold)
    bounds = bounds[:, :logp.shape[1] + 1].to(logp.device)
    if vmap is None:
        none = torch.empty(*logp.shape[:2], 0, device=logp.device)
        return IdentityPayload(none.int(), none.to(logp.dtype), token_logp, bounds, length)
    cls = vmap.teacher_class.to(logp.device)
    n = int(vmap.student_members.shape[0])
    mass = torch.zeros(*logp.shape[:2], n + 1, dtype=logp.dtype, device=logp.device)
    mass.scatter_add_(-1, torch.where(cls >= 0, cls, n).expand_as(logp), logp.exp())
    shared = mass[..., :n]
    shared = shared / shared.sum(-1, keepdim=True).clamp(min=torch.finfo(shared.dtype).tiny)
    k = n if top_k is None else min(top_k, n)
    probs, classes = shared.topk(k, dim=-1)
    probs = probs / probs.sum(-1, keepdim=True).clamp(min=torch.finfo(probs.dtype).tiny)
    return IdentityPayload(classes.masked_fill(~mask[..., None], -1).int(), probs.masked_fill(~mask[..., None], 0.0),
                           token_logp, bounds, length)


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


# ---------------------------------------------------------------------------- both, as a method's extra terms


def identity_terms(student_logits: Tensor, student_labels: Tensor, payload: IdentityPayload, vmap: VocabMap | None,
                   config: IdentityConfig) -> DistillResult:
    """``shared_weight * shared_vocab_kl + chunk_weight * chunk_likelihood`` on one teacher's payload.

    Args:
        payload: with ``student_bounds`` set (the teacher side computes them in training).
        vmap: needed when ``shared_weight > 0``.
    Returns ``distill`` = the weighted sum (``alpha`` 1) and the unweighted terms ``shared_kl`` / ``aligned``
    and ``chunk_kl`` / ``chunks`` [B] of the terms that are on.
    """
    if not config.on:
        raise ValueError("no identity term is on (shared_weight and chunk_weight are 0)")
    if payload.student_bounds is None:
        raise ValueError("the identity payload has no student_bounds: compute them next to the teacher")
    if config.shared and (vmap is None or payload.classes.shape[-1] == 0):
        raise ValueError("shared_weight > 0 needs the vocabulary map and a payload with shared classes")
    parts, terms = [], {}
    if config.shared:
        r = shared_vocab_kl(student_logits, student_labels, payload.student_bounds, payload, vmap)
        parts.append(config.shared_weight * r.per_sample)
        terms.update(r.terms)
    if config.chunk_weight > 0:
        r = chunk_likelihood(student_logits, student_labels, payload.student_bounds, payload)
        parts.append(config.chunk_weight * r.per_sample)
        terms.update({k: r.terms[k] for k in ("chunk_kl", "chunks")})
    per_sample = torch.stack(parts).sum(0)
    return DistillResult(per_sample.mean(), 1.0, per_sample, terms)
