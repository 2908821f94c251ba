"""One answer text for every model of a job: cut once, where every tokenizer can hold it.

Each model encodes a row with its own tokenizer and template. Cutting a long answer in each model's
own tokens would end the spans in different places ("...encyclopaedia brit" for one tokenizer,
"...Britannica," for another), and the sequence-level OT would then compare two different texts. So
the answer *field* is cut once, before any model encodes it: at the longest word boundary (or, for a
single over-long word, character) whose answer every model encodes within ``max_answer_length``
tokens. A cut answer does not end there, so no model appends its EOS to it; the original answer is
kept as a gold answer (``answer_all``) for scoring.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from mlot.spans import IGNORE_INDEX
from workers.data.encoding import ANSWER_CUT, BadRowError, encode_example

FIELD = "answer"  # data.columns must map it (the config checks): the field that is distilled


def answer_tokens(row: dict[str, Any], tokenizer: Any, template: Any, index: int | None = None) -> int:
    """How many answer tokens (EOS included when the template adds one) ``row`` has in this model."""
    _, labels = encode_example(row, tokenizer, template, 1, 1 << 30, index=index)
    return _answer_length(labels)


def _answer_length(labels: list[int]) -> int:
    return sum(label != IGNORE_INDEX for label in labels)


def encode_for_all(row: dict[str, Any], models: Sequence[tuple[Any, Any]], max_prompt_length: int,
                   max_answer_length: int, index: int | None = None
                   ) -> tuple[dict[str, Any], bool, list[tuple[list[int], list[int]]]]:
    """``(row, cut, [(input_ids, labels) per model])``: the row encoded by every model, its answer cut once
    for all of them when some model's answer is longer than ``max_answer_length`` (:func:`cut_answer`).

    The common case (every answer fits) encodes each model once.

    Raises:
        BadRowError: as :func:`cut_answer`.
    """
    encoded = [encode_example(row, tok, tpl, max_prompt_length, 1 << 30, index=index) for tok, tpl in models]
    if all(_answer_length(labels) <= max_answer_length for _, labels in encoded):
        return row, False, encoded
    row, _ = cut_answer(row, models, max_answer_length, index=index)
    encoded = [encode_example(row, tok, tpl, max_prompt_length, max_answer_length, index=index)
               for tok, tpl in models]
    return row, True, encoded


def cut_answer(row: dict[str, Any], models: Sequence[tuple[Any, Any]], max_answer_length: int,
               index: int | None = None) -> tuple[dict[str, Any], bool]:
    """``(row, False)`` when every model's answer fits ``max_answer_length`` tokens, else (a copy of the row
    with its answer cut for all of them, True).

    Args:
        models: (tokenizer, template) of the student and of every teacher.

    Raises:
        BadRowError: the row cannot be encoded by some model, or not even its first character fits.
    """
    if all(answer_tokens(row, tok, tpl, index) <= max_answer_length for tok, tpl in models):
        return row, False
    text = row[FIELD]
    marked = {**row, ANSWER_CUT: True, f"{FIELD}_all": row.get(f"{FIELD}_all") or [text]}

    def fits(n: int) -> bool:
        cut = {**marked, FIELD: text[:n].rstrip()}
        return bool(cut[FIELD].strip()) and all(
            answer_tokens(cut, tok, tpl, index) <= max_answer_length for tok, tpl in models)

    # Word ends first (a cut inside a word is a piece no tokenizer would make of running text), then
    # characters of the first word when even one word is too long. Token counts grow with the prefix.
    for ends in ([m.start() for m in re.finditer(r"\s+", text.strip())], list(range(1, len(text) + 1))):
        best = _last_true(ends, fits)
        if best is not None:
            return {**marked, FIELD: text[:best].rstrip()}, True
    raise BadRowError(index, FIELD, f"not even the answer's first character fits data.max_answer_length="
                      f"{max_answer_length} tokens in every model; raise it")


def _last_true(candidates: list[int], ok) -> int | None:
    """The largest candidate for which ``ok`` holds, by bisection (``ok`` is monotone: True, then False)."""
    lo, hi, best = 0, len(candidates) - 1, None
    while lo <= hi:
        mid = (lo + hi) // 2
        if ok(candidates[mid]):
            best, lo = candidates[mid], mid + 1
        else:
            hi = mid - 1
    return best
