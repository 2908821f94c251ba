"""The silent failures ``mlot inspect`` looks for (``workers.data.inspect``), each a :class:`Finding` naming the
config field that fixes it: a BOS on one side only, special tokens inside the answer span, numbers split into
digits by one tokenizer only, a pad token equal to EOS, prompts and answers cut to their length limits.

A ``warning`` is a known silent failure (training runs, on data that is not what was meant); a ``note`` is
something mlot handles, said for the record.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Sequence

WARNING, NOTE = "warning", "note"


def token_text(tokenizer: Any, name: str) -> str | None:
    """The tokenizer's ``<name>_token`` (bos, eos, pad, unk, cls), or None."""
    return getattr(tokenizer, f"{name}_token", None)


@dataclass(frozen=True)
class Finding:
    """``kind`` (bos, special_in_answer, unk_in_answer, digits, pad, prompt_truncated, answer_cut, bad_row),
    ``level`` (warning / note), the config ``field`` that fixes it, the ``message``, and the sampled records it
    was seen on (empty: a property of a tokenizer, not of rows)."""

    kind: str
    level: str
    field: str
    message: str
    records: tuple[int, ...] = ()



def bos_findings(rows: Sequence[Any], sides: Sequence[Any]) -> list[Finding]:
    """(a) Prompts that start with the model's BOS / [CLS] on some sides and without one on others."""
    def starts(side: Any) -> bool:
        first = {side.tokenizer.bos_token_id, getattr(side.tokenizer, "cls_token_id", None)} - {None}
        return all(r.encoded[side.field].prompt_ids[:1] and r.encoded[side.field].prompt_ids[0] in first
                   for r in rows)

    with_bos = [s for s in sides if starts(s)]
    if not rows or not with_bos or len(with_bos) == len(sides):
        return []
    others = ", ".join(f"{s.name} ({s.tokenizer.convert_ids_to_tokens(rows[0].encoded[s.field].prompt_ids[0])})"
                       for s in with_bos)
    out = []
    for s in sides:
        if s in with_bos:
            continue
        bos = token_text(s.tokenizer, "bos")
        fix = (f"if its model was trained with {bos!r} first, start {s.field}.template.prompt with it "
               f"(e.g. '{bos}{s.template.prompt}') or use a tokenizer that adds it ({s.field}.tokenizer)"
               if bos else f"its tokenizer defines no BOS: if its model expects one, use a tokenizer that adds it "
               f"({s.field}.tokenizer) or write it into {s.field}.template.prompt")
        out.append(Finding("bos", WARNING, f"{s.field}.template.prompt",
                           f"{s.name}'s prompts start without a BOS token while {others} start with one: a model "
                           f"trained with a BOS at position 0 reads every prompt off-distribution; {fix}",
                           tuple(r.record for r in rows)))
    return out


def special_findings(rows: Sequence[Any], sides: Sequence[Any]) -> list[Finding]:
    """(b) Special tokens inside the labelled answer (other than the EOS that ends it): chat-template turn markers
    the student would be trained to write, or the unknown token (text the tokenizer cannot spell)."""
    out = []
    for s in sides:
        tok = s.tokenizer
        special = set(tok.all_special_ids) - {tok.unk_token_id}
        marks: dict[int, None] = {}  # the special ids seen, in order
        where, unk_where = [], []
        for r in rows:
            ids = r.encoded[s.field].answer_ids
            ends_with_eos = s.template.eos and not r.cut and ids[-1:] == [tok.eos_token_id]
            inside = ids[:-1] if ends_with_eos else ids
            bad = [i for i in inside if i in special]
            if bad:
                where.append(r.record)
                marks.update(dict.fromkeys(bad))
            if tok.unk_token_id is not None and tok.unk_token_id in inside:
                unk_where.append(r.record)
        if marks:
            names = ", ".join(tok.convert_ids_to_tokens(list(marks)))
            how = (f"its chat template writes {names} into the assistant turn (its EOS is {tok.eos_token!r}): set "
                   f"{s.field}.template.chat: false and write the turn markers into {s.field}.template.prompt, or "
                   "use a tokenizer whose EOS is the end-of-turn token"
                   if s.template.chat else f"the answer text holds {names}: clean data.columns.answer's column, or "
                   f"set {s.field}.template.chat if they are turn markers")
            out.append(Finding("special_in_answer", WARNING, f"{s.field}.template.chat",
                               f"{s.name}: special token(s) {names} inside the labelled answer of {len(where)} "
                               f"sampled row(s): they are distilled and scored as answer text; {how}", tuple(where)))
        if unk_where:
            out.append(Finding("unk_in_answer", WARNING, f"{s.field}.tokenizer",
                               f"{s.name}: {tok.unk_token!r} inside the answer of {len(unk_where)} sampled row(s): "
                               "its tokenizer cannot spell that text, so the character bounds (and every aligned "
                               f"term) lose their place; use a tokenizer that covers it ({s.field}.tokenizer)",
                               tuple(unk_where)))
    return out


_NUMBER = re.compile(r"\d{2,}")


def digit_findings(rows: Sequence[Any], sides: Sequence[Any], chunk_weight: float,
                   projection_weight: float = 0.0) -> list[Finding]:
    """(c) Multi-digit numbers in the answers that one tokenizer splits into single digits while another keeps
    them whole or in multi-digit chunks: token positions stop lining up after every number."""
    numbered = [r for r in rows if _NUMBER.search(r.fields.get("answer", ""))]
    if not numbered:
        return []
    widest = {s.field: max(sum(c.isdigit() for c in p) for r in numbered for p in r.encoded[s.field].answer)
              for s in sides}
    single = [s for s in sides if widest[s.field] == 1]
    whole = [s for s in sides if widest[s.field] > 1]
    if not single or not whole:
        return []
    first = numbered[0]
    shown = "; ".join(f"{s.name} " + "|".join(p for p in first.encoded[s.field].answer if any(map(str.isdigit, p)))
                      for s in sides)
    told = (f"{', '.join(s.name for s in single)} split(s) multi-digit numbers into single digits, "
            f"{', '.join(s.name for s in whole)} keep(s) them whole or in multi-digit chunks (e.g. "
            f"{_NUMBER.search(first.fields['answer']).group()!r}: {shown}): the token-level terms pair positions "
            "that hold different digits from the first number on")
    if projection_weight > 0:  # measured: docs/quality.md, the known-truth study's numbers variant (10 seeds)
        study = ("the projection term sends each whole number to its first digit; on the known-truth study's "
                 "numbers variant (docs/quality.md) it beat SFT at weight 1 (-0.051 nats) and lost at 3 (+0.067)")
        if projection_weight > 1:
            return [Finding("digits", WARNING, "loss.params.projection_weight",
                            f"{told}; {study}: set projection_weight to 1 or below for such answers",
                            tuple(r.record for r in numbered))]
        return [Finding("digits", NOTE, "loss.params.projection_weight",
                        f"{told}; {study}: projection_weight={projection_weight} is within what helped there",
                        tuple(r.record for r in numbered))]
    if chunk_weight > 0:
        return [Finding("digits", NOTE, f"{single[0].field}.tokenizer",
                        f"{told}; the chunk-likelihood term (loss.params.chunk_weight={chunk_weight}) compares whole "
                        f"aligned chunks, so numbers are compared there; a tokenizer that splits digits like the "
                        "others would align the token-level terms too", tuple(r.record for r in numbered))]
    return [Finding("digits", WARNING, "loss.params.chunk_weight",
                    f"{told}; set loss.params.chunk_weight (e.g. 0.1) to compare whole aligned chunks, or give every "
                    "model a tokenizer that splits digits alike", tuple(r.record for r in numbered))]


def pad_findings(sides: Sequence[Any]) -> list[Finding]:
    """(d) A pad token that is the EOS, or the unknown token standing in for a missing pad (notes: mlot masks padding
    by explicit lengths, :func:`workers.data.encoding.collate`, never by comparing ids with pad)."""
    out = []
    for s in sides:
        tok = s.tokenizer
        if tok.pad_token_id == tok.eos_token_id:
            out.append(Finding("pad", NOTE, f"{s.field}.tokenizer",
                               f"{s.name} pads with its EOS {tok.eos_token!r} (id {tok.eos_token_id}): its own pad, "
                               "or what workers.models.load_tokenizer uses when a tokenizer has neither a pad nor an "
                               "unk token (adding one would outgrow the model's embedding). mlot masks padding by "
                               "length, so EOS labels are kept; code that masks labels where input_ids == "
                               f"pad_token_id would drop every EOS label: give {s.field}.tokenizer a pad token there"))
        elif tok.unk_token_id is not None and tok.pad_token_id == tok.unk_token_id:
            out.append(Finding("pad", NOTE, f"{s.field}.tokenizer",
                               f"{s.name} has no pad token of its own: workers.models.load_tokenizer pads with its "
                               f"unknown token {tok.unk_token!r} (id {tok.pad_token_id}), which real text never holds; "
                               "padding is masked by length, so its value never matters"))
    return out


def length_findings(rows: Sequence[Any], sides: Sequence[Any], max_prompt: int, max_answer: int
                    ) -> list[Finding]:
    """(e) Answers cut to fit ``data.max_answer_length`` in every model, and prompts cut from the left to
    ``data.max_prompt_length``."""
    out = []
    cut = [r for r in rows if r.cut]
    if cut:
        longest, side = max((r.encoded[s.field].answer_full, s.name) for r in cut for s in sides)
        out.append(Finding("answer_cut", WARNING, "data.max_answer_length",
                           f"{len(cut)} of {len(rows)} sampled answers were cut to fit data.max_answer_length="
                           f"{max_answer} tokens in every model (the longest is {longest} tokens in {side}): a cut "
                           "answer is trained without its end and without an EOS, and scored against the whole "
                           f"answer; raise data.max_answer_length (to {longest} to keep these whole)",
                           tuple(r.record for r in cut)))
    for s in sides:
        long = [r for r in rows if r.encoded[s.field].prompt_full > max_prompt]
        if long:
            longest = max(r.encoded[s.field].prompt_full for r in long)
            out.append(Finding("prompt_truncated", WARNING, "data.max_prompt_length",
                               f"{s.name}: {len(long)} of {len(rows)} sampled prompts are longer than "
                               f"data.max_prompt_length={max_prompt} tokens (up to {longest}) and lose their "
                               "beginning (the BOS is kept); raise data.max_prompt_length",
                               tuple(r.record for r in long)))
    return out
