"""How a job's tokenizers meet on a sample of its training rows (``mlot inspect``), before any GPU hour is spent.

Everything is computed with the job's own code: rows as :func:`workers.data.tasks.load_rows` gives them, the
answer cut once for every model and each model's tokens from :func:`workers.data.answer_cut.encode_for_all` (so
exactly what training sees), character bounds from :func:`mlot.identity.char_bounds` and the vocabulary map from
:func:`workers.vocab.teacher_map`. The result is plain dataclasses; ``orchestrator.inspect`` prints and renders it.

Findings come in two levels: a ``warning`` is a known *silent* failure (training runs, on data that is not what
was meant); a ``note`` is something mlot handles, said for the record. Each names the config field that fixes
(or would change) it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Sequence

from mlot.config import MultiLevelOTConfig
from mlot.identity import IdentityConfig, char_bounds
from mlot.methods import METHODS
from mlot.spans import IGNORE_INDEX
from specs import UserError
from workers.data.answer_cut import encode_for_all
from workers.data.encoding import BadRowError, encode_example
from workers.data.inspect_findings import (
    WARNING,
    Finding,
    bos_findings,
    digit_findings,
    length_findings,
    pad_findings,
    special_findings,
    token_text,
)
from workers.data.tasks import RECORD, check_columns, load_records, map_columns
from workers.models import load_tokenizer
from workers.vocab import teacher_map

_HUGE = 1 << 30  # a length limit nothing reaches: encodes a row whole


# ---------------------------------------------------------------------------- the result


@dataclass(frozen=True)
class ModelInfo:
    """One model of the job as its tokenizer sees it.

    Attributes:
        field: its config path, ``student`` or ``teachers.<i>`` (findings name fields below it).
        name: ``student`` or the teacher's name.
        tokenizer: the tokenizer spec; vocab: ``len(tokenizer)``.
        bos, eos, pad, unk: those tokens' text (None where the tokenizer has none).
        chat: whether its template renders the tokenizer's chat template.
    """

    field: str
    name: str
    tokenizer: str
    vocab: int
    bos: str | None
    eos: str | None
    pad: str | None
    unk: str | None
    chat: bool


@dataclass(frozen=True)
class Encoded:
    """One model's tokens of one row. ``prompt`` / ``answer``: decoded pieces (:func:`pieces`) of ``prompt_ids``
    / ``answer_ids`` (the labelled span, EOS included); ``bounds``: [len(answer) + 1] :func:`mlot.identity.char_bounds`;
    ``prompt_full`` / ``answer_full``: token counts before truncation and before the answer cut."""

    prompt: list[str]
    answer: list[str]
    prompt_ids: list[int]
    answer_ids: list[int]
    bounds: list[int]
    prompt_full: int
    answer_full: int


@dataclass(frozen=True)
class Chunk:
    """A piece of the answer between two character bounds both tokenizations share (non-space characters
    ``[start, end)``), with the pieces of each model's tokens that start in it."""

    start: int
    end: int
    teacher: tuple[str, ...]
    student: tuple[str, ...]


@dataclass(frozen=True)
class RowView:
    """One sampled row: ``fields`` its template fields (the answer after the cut), ``cut`` whether the answer was
    cut to fit every model, ``encoded`` each model's tokens by model field, ``chunks`` the aligned chunks of each
    teacher (by field) with the student."""

    record: int
    fields: dict[str, str]
    cut: bool
    encoded: dict[str, Encoded]
    chunks: dict[str, list[Chunk]]


@dataclass(frozen=True)
class PayloadCost:
    """What a loss method's teacher payload costs per answer token for one teacher (None: it cannot serve this
    teacher), and which settings that is for (``this job``, ``defaults``, or why not)."""

    method: str
    bytes_per_token: float | None
    settings: str


@dataclass(frozen=True)
class TeacherView:
    """One teacher against the student over the sample.

    Attributes:
        coverage: the vocabulary map's shares of each vocabulary and its number of classes (as logged in
            training under ``identity.<teacher>.shared_*``).
        shared_answer: share of the teacher's answer tokens whose string has a student class.
        aligned: share of the teacher's answer tokens that start where a student token starts (the positions the
            exact-match term compares).
        chunks_per_answer: mean number of aligned chunks per answer (what the chunk-likelihood term compares).
        payload: each method's payload cost; full_logits: bf16 logits per answer token, for scale.
    """

    field: str
    name: str
    coverage: dict[str, float]
    shared_answer: float
    aligned: float
    chunks_per_answer: float
    payload: list[PayloadCost]
    full_logits: int


@dataclass
class Inspection:
    """The whole inspection of a job: its models, the sampled rows, each teacher, counts and findings."""

    job: str
    source: str
    seed: int
    models: list[ModelInfo]
    rows: list[RowView]
    teachers: list[TeacherView]
    counts: dict[str, int]
    findings: list[Finding] = field(default_factory=list)

    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.level == WARNING]


# ---------------------------------------------------------------------------- tokens as text


@dataclass(frozen=True)
class _Side:
    """A model of the job with its loaded tokenizer."""

    field: str
    name: str
    spec: Any  # its StudentConfig / TeacherConfig
    tokenizer: Any

    @property
    def template(self) -> Any:
        return self.spec.template


def pieces(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    """Each token's text as it reads in its context: ``decode(ids[:i + 1])`` past ``decode(ids[:i])`` (so
    SentencePiece's ``▁the`` reads `` the`` and WordPiece's ``##s`` reads ``s``); a token whose context does not
    simply extend (a partial UTF-8 byte, a clean-up of spaces) reads as its own decode."""
    out, before = [], ""
    for i in range(len(ids)):
        now = tokenizer.decode(list(ids[:i + 1]))
        out.append(now[len(before):] if now.startswith(before) else tokenizer.decode([ids[i]]))
        before = now
    return out


def aligned_chunks(t_bounds: Sequence[int], t_pieces: Sequence[str], s_bounds: Sequence[int],
                   s_pieces: Sequence[str]) -> list[Chunk]:
    """The chunks :func:`mlot.identity.chunk_likelihood` compares: the answer cut at the teacher's bounds that are
    also student bounds; a token belongs to the chunk its start falls in (one starting past the last shared
    bound belongs to none, as in the loss)."""
    common = sorted(set(t_bounds) & set(s_bounds))

    def members(bounds: Sequence[int], ps: Sequence[str], lo: int, hi: int) -> tuple[str, ...]:
        return tuple(p for p, start in zip(ps, bounds[:-1]) if lo <= start < hi)

    return [Chunk(lo, hi, members(t_bounds, t_pieces, lo, hi), members(s_bounds, s_pieces, lo, hi))
            for lo, hi in zip(common, common[1:])]


# ---------------------------------------------------------------------------- the payload's size


def payload_bytes_per_token(cfg: MultiLevelOTConfig, identity: IdentityConfig, vocab: int, classes: int,
                            targets: int, lengths: Sequence[int]) -> float:
    """Bytes per answer token of a teacher payload for answers of ``lengths`` teacher tokens sent as one batch,
    exactly what ``mlot.TeacherPayload.bytes_per_token`` reports for it (training logs it as
    ``train/<teacher>/payload_bytes_per_token``).

    With N = sum(lengths) answer tokens, B = len(lengths) answers, k = min(top_k, V_t) (V_t = ``vocab`` when
    top_k is None) and, when the exact-match term is on, k_s = min(shared_top_k, C) of the C = ``classes``
    shared classes (C when shared_top_k is None, else 0), and when the projection term is on,
    k_p = min(projection_top_k, P) of the P = ``targets`` projection classes (else 0)::

        bytes/token = 4k                                  probabilities, float32 [B, T, k]
                    + 4 [paper mode, use_sd, sd_temperature != teacher_temperature]   SD log-shift [B, T]
                    + [identity on] (8 k_s + 8 k_p + 12)  classes int32 + probs float32 [B, T, k_s] and
                                                          [B, T, k_p], gold log-p, teacher and student bounds
                                                          (int32) per token
                    + (ids + 8B) / N                      column ids int32, lengths int64 [B]

    where ids = 4kN (token ranking: [B, T, k]), 4kB (sequence ranking: [B, k]) or 4k (reference mode: one
    order per batch). A teacher NLL per byte (per-sample teacher mixing) is not counted, as in training.
    """
    n, b = max(sum(lengths), 1), len(lengths)
    k = vocab if cfg.top_k is None else min(cfg.top_k, vocab)
    per_token = 4 * k
    if cfg.mode == "paper" and cfg.use_sd and cfg.sd_temperature != cfg.teacher_temperature:
        per_token += 4
    if identity.on:
        k_s = (classes if identity.shared_top_k is None else min(identity.shared_top_k, classes)) \
            if identity.shared else 0
        k_p = min(identity.projection_top_k, targets) if identity.projection else 0
        per_token += 8 * k_s + 8 * k_p + 12
    if cfg.mode == "reference":
        ids = 4 * k
    else:
        ids = 4 * k * (n if cfg.ranking == "token" else b)
    return per_token + (ids + 8 * b) / n


def payload_costs(loss: Any, vocab: int, classes: int, targets: int, lengths: Sequence[int], same_tokenizer: bool
                  ) -> list[PayloadCost]:
    """Each distributed method's payload cost for one teacher: the job's method with ``loss`` (a ``LossConfig``:
    its mode, params and identity terms), every other one with its defaults."""
    out = []
    for name, method in METHODS.items():
        if method.payload is None or not method.distributed:
            continue
        if method.same_vocabulary and not same_tokenizer:
            out.append(PayloadCost(name, None, "needs the student's tokenizer"))
            continue
        mine = name == loss.method
        params = loss.params if mine else {}
        cfg = method.payload_config(loss.mode if mine else "paper", params)
        identity = method.identity_config(params) if method.identity else IdentityConfig()
        out.append(PayloadCost(name, payload_bytes_per_token(cfg, identity, vocab, classes, targets, lengths),
                               "this job" if mine else "defaults"))
    return out


# ---------------------------------------------------------------------------- rows


def sample_rows(job: Any, n: int) -> list[dict[str, Any]]:
    """``n`` rows of the job's training split (``data.train_split``, after ``data.limit``), drawn with
    ``train.seed``, in source order, with the template's field names (only the drawn records are mapped)."""
    d = job.data
    columns = dict(d.columns)
    records, available, label = load_records(d.source, d.name, d.train_split, d.limit)
    check_columns(columns, available, label)
    picks = sorted(random.Random(job.train.seed).sample(range(len(records)), min(n, len(records))))
    return [map_columns(records[i], columns, i) for i in picks]


def view_row(row: dict[str, Any], sides: Sequence[_Side], max_prompt: int, max_answer: int) -> RowView:
    """Every model's tokens of one row, as training encodes it (the answer cut once for all), and the aligned
    chunks of each teacher with the student (``sides[0]``).

    Raises:
        BadRowError: the row cannot be encoded by some model.
    """
    index = row.get(RECORD)
    models = [(s.tokenizer, s.template) for s in sides]
    whole = [encode_example(row, tok, tpl, _HUGE, _HUGE, index=index) for tok, tpl in models]
    cut_row, cut, encoded = encode_for_all(row, models, max_prompt, max_answer, index=index)
    views = {}
    for side, (ids, labels), (_, whole_labels) in zip(sides, encoded, whole):
        n_prompt = sum(label == IGNORE_INDEX for label in labels)
        prompt_ids, answer_ids = ids[:n_prompt], ids[n_prompt:]
        views[side.field] = Encoded(
            pieces(side.tokenizer, prompt_ids), pieces(side.tokenizer, answer_ids), prompt_ids, answer_ids,
            char_bounds(side.tokenizer, answer_ids), sum(label == IGNORE_INDEX for label in whole_labels),
            sum(label != IGNORE_INDEX for label in whole_labels))
    s = views[sides[0].field]
    chunks = {t.field: aligned_chunks(views[t.field].bounds, views[t.field].answer, s.bounds, s.answer)
              for t in sides[1:]}
    fields = {k: v for k, v in cut_row.items() if isinstance(v, str)}
    return RowView(int(index) if index is not None else -1, fields, cut, views, chunks)


# ---------------------------------------------------------------------------- the whole job


def _teacher_view(job: Any, t: _Side, student: _Side, rows: Sequence[RowView]) -> TeacherView:
    vmap = teacher_map(t.spec, student.spec)
    answers = [r.encoded[t.field] for r in rows]
    tokens = [i for a in answers for i in a.answer_ids]
    classes = vmap.teacher_class
    shared = sum(int(classes[i]) >= 0 for i in tokens if i < len(classes)) / max(len(tokens), 1)
    starts = [(set(r.encoded[student.field].bounds[:-1]), r.encoded[t.field].bounds[:-1]) for r in rows]
    aligned = sum(b in s_starts for s_starts, t_starts in starts for b in t_starts) / max(len(tokens), 1)
    chunks = sum(len(r.chunks[t.field]) for r in rows) / max(len(rows), 1)
    vocab = len(t.tokenizer)
    costs = payload_costs(job.loss, vocab, int(vmap.coverage["classes"]), int(vmap.coverage["targets"]),
                          [len(a.answer_ids) for a in answers], t.spec.tokenizer_name == student.spec.tokenizer_name)
    return TeacherView(t.field, t.name, dict(vmap.coverage), shared, aligned, chunks, costs, 2 * vocab)


def job_sides(job: Any) -> list[_Side]:
    """The student, then every teacher, with its tokenizer (:func:`workers.models.load_tokenizer`)."""
    specs = [("student", "student", job.student)] + [(f"teachers.{i}", t.name, t) for i, t in enumerate(job.teachers)]
    return [_Side(f, name, spec, load_tokenizer(spec.tokenizer_name, spec.trust_remote_code))
            for f, name, spec in specs]


def _info(s: _Side) -> ModelInfo:
    tok = s.tokenizer
    return ModelInfo(s.field, s.name, s.spec.tokenizer_name, len(tok), token_text(tok, "bos") or token_text(tok, "cls"),
                     token_text(tok, "eos"), token_text(tok, "pad"), token_text(tok, "unk"), s.template.chat)


def inspect_job(job: Any, n_rows: int = 8) -> Inspection:
    """Inspect ``n_rows`` training rows of ``job`` (a ``JobConfig``) drawn with ``train.seed``.

    A row no model can encode is left out and reported (a ``bad_row`` warning: the job stops at it unless
    ``data.on_bad_row: skip``).

    Raises:
        UserError: the data cannot be read, or no sampled row can be encoded.
    """
    d = job.data
    sides = job_sides(job)
    views, bad = [], []
    for row in sample_rows(job, n_rows):
        try:
            views.append(view_row(row, sides, d.max_prompt_length, d.max_answer_length))
        except BadRowError as e:
            bad.append(e)
    if not views and not bad:
        raise UserError(f"data.source {d.source!r}: no rows in split {d.train_split!r} to inspect")
    if not views:
        raise BadRowError(bad[0].index, bad[0].field, f"none of the {len(bad)} sampled rows can be encoded; first: "
                          f"{bad[0].reason}")
    findings = [Finding("bad_row", WARNING, "data.on_bad_row", f"{e} (the job stops at such a row unless "
                        "data.on_bad_row: skip)", (e.index,) if e.index is not None else ()) for e in bad]
    identity = job.loss.spec.identity_config(job.loss.params) if job.loss.spec.identity else IdentityConfig()
    findings += (bos_findings(views, sides) + special_findings(views, sides)
                 + digit_findings(views, sides, identity.chunk_weight, identity.projection_weight) + pad_findings(sides)
                 + length_findings(views, sides, d.max_prompt_length, d.max_answer_length))
    counts = {"rows": len(views), "bad_rows": len(bad), "answers_cut": sum(r.cut for r in views),
              **{f"prompts_truncated.{s.field}": sum(r.encoded[s.field].prompt_full > d.max_prompt_length
                                                     for r in views) for s in sides}}
    teachers = [_teacher_view(job, t, sides[0], views) for t in sides[1:]]
    return Inspection(job.name, d.source, job.train.seed, [_info(s) for s in sides], views, teachers, counts, findings)
