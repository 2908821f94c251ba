"""Tokenisation of (prompt, answer) rows with each model's own tokenizer and template.

Teacher and student see the same *text* but their own *tokens*: each side encodes a row with its
tokenizer and :class:`Template`, giving ``input_ids`` and ``labels`` (``-100`` everywhere but the
answer). Batches are left-padded by default, so every answer ends at the right edge and a model can
compute logits only for the last K positions (``logits_to_keep``) instead of the whole sequence.
"""

from __future__ import annotations

import logging
from typing import Any, Literal, Sequence

import torch

from mlot.spans import IGNORE_INDEX
from specs import Template, UserError

logger = logging.getLogger(__name__)

#: Marks a row whose answer was cut to fit every model (``workers.data.answer_cut``): no EOS is appended to it.
ANSWER_CUT = "__answer_cut__"

class BadRowError(UserError, ValueError):
    """A row that cannot be encoded: names the row index and the field.

    Attributes:
        index: the row's index (None when encoding a lone example without one).
        field: the template field at fault (``prompt``, ``answer``, ...).
        reason: what is wrong, in words.
    """

    def __init__(self, index: int | None, field: str, reason: str) -> None:
        self.index = index
        self.field = field
        self.reason = reason
        where = f"row {index}" if index is not None else "row"
        super().__init__(f"{where}, field {field!r}: {reason}")

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        # Crosses process boundaries (Ray tasks, process pools) with its attributes, not only its message.
        return type(self), (self.index, self.field, self.reason)


def _check_text(value: Any, index: int | None, field: str) -> str:
    """A field must be a str of valid Unicode that encodes to UTF-8 and holds no U+FFFD.

    U+FFFD is what a decoder leaves where input bytes were not valid UTF-8; lone surrogates are
    what Python's ``surrogateescape`` leaves. Either means the text was already damaged, and
    teacher and student tokenizers would mangle it differently.
    """
    if not isinstance(value, str):
        raise BadRowError(index, field, f"expected a string, got {type(value).__name__} ({value!r:.60})")
    if "\ufffd" in value:
        raise BadRowError(index, field, "contains U+FFFD (text that was not valid UTF-8 when decoded)")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise BadRowError(index, field, f"not valid UTF-8 ({err.reason} at position {err.start})") from None
    return value


def _format(fmt: str, row: dict[str, Any], fields: list[str], index: int | None, what: str) -> str:
    for field in fields:
        if field not in row:
            raise BadRowError(index, field, f"missing (the {what} template uses it); row has {sorted(row)}")
        _check_text(row[field], index, field)
    try:
        return fmt.format(**row)
    except (IndexError, KeyError, AttributeError, ValueError) as err:
        raise BadRowError(index, fields[0] if fields else what, f"cannot format the {what} template: {err}") from None


def _ids(tokenizer: Any, text: str, add_special_tokens: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


def _find(haystack: list[int], needle: list[int]) -> int:
    """First index where ``needle`` occurs in ``haystack`` as a contiguous run; -1 if none."""
    n = len(needle)
    for i in range(len(haystack) - n + 1):
        if haystack[i : i + n] == needle:
            return i
    return -1


def _special_prefix(tokenizer: Any, text: str, plain: list[int]) -> list[int]:
    """The special tokens the tokenizer puts *before* ``text`` (BOS, [CLS]); never those after.

    Compares the encodings with and without special tokens: BERT gives ``[CLS] x [SEP]`` and we
    keep only ``[CLS]`` (a [SEP] after the prompt would sit between prompt and answer). If the
    plain ids do not occur inside (a tokenizer whose special tokens change the neighbouring
    pieces), fall back to the leading run of special ids.
    """
    full = _ids(tokenizer, text, True)
    at = _find(full, plain) if plain else -1
    if at >= 0:
        return full[:at]
    special = set(tokenizer.all_special_ids)
    prefix: list[int] = []
    for tid in full:
        if tid not in special:
            break
        prefix.append(tid)
    return prefix


def _truncate_prompt(prefix: list[int], body: list[int], max_prompt_length: int) -> list[int]:
    """Left-truncate the prompt to ``max_prompt_length`` ids but keep its leading BOS/[CLS].

    The end of the prompt (next to the answer) matters most, so the left is cut; the BOS is kept
    because models are trained with it at position 0 and behave poorly without it.
    """
    if len(prefix) + len(body) <= max_prompt_length:
        return prefix + body
    keep = max_prompt_length - len(prefix)
    if keep <= 0:
        return (prefix + body)[-max_prompt_length:]
    return prefix + body[-keep:]


def encode_example(
    row: dict[str, Any],
    tokenizer: Any,
    template: Template,
    max_prompt_length: int,
    max_answer_length: int,
    index: int | None = None,
) -> tuple[list[int], list[int]]:
    """Encode one row as ``(input_ids, labels)``.

    ``input_ids = prompt_ids + answer_ids (+ eos)`` and ``labels`` equals ``input_ids`` on the
    answer (eos included) and ``-100`` on the prompt.

    * Prompt ids start with the tokenizer's BOS/[CLS] when it adds one, and carry no trailing
      special token (BERT's [SEP] is dropped). Too long: cut from the left, keeping the BOS.
    * Answer ids are the answer text encoded without special tokens, then eos if
      ``template.eos`` (not for a row whose answer was cut to fit every model, marked ``ANSWER_CUT``:
      ``workers.data.answer_cut``). Still too long: cut from the right to ``max_answer_length`` (so the eos goes).
    * ``template.chat``: the conversation ``[user: prompt, assistant: answer]`` is rendered with the
      tokenizer's chat template; the answer is the suffix beyond the rendering of
      ``[user: prompt]`` with the generation prompt (that rendering must be a prefix).

    Args:
        row: field name -> value (the *mapped* names of :func:`workers.data.tasks.load_rows`).
        tokenizer: a tokenizer with an eos (see :func:`workers.models.load_tokenizer`).
        index: the row's index, used only in error messages.

    Raises:
        BadRowError: a used field is missing or not a string, holds U+FFFD or invalid UTF-8; the
            answer is empty/whitespace-only; the prompt is empty after templating.
        ValueError: ``template.chat`` with a tokenizer that has no chat template; bad lengths.
    """
    if max_prompt_length < 1 or max_answer_length < 1:
        raise ValueError(
            f"max_prompt_length and max_answer_length must be >= 1, got {max_prompt_length}, {max_answer_length}"
        )
    a_fields = template.answer_fields()
    for field in a_fields:
        value = _check_text(row.get(field), index, field) if field in row else None
        if value is not None and not value.strip():
            raise BadRowError(index, field, "empty or whitespace-only answer")
    prompt_text = _format(template.prompt, row, template.prompt_fields(), index, "prompt")
    answer_text = _format(template.answer, row, a_fields, index, "answer")
    if not answer_text.strip():
        raise BadRowError(index, a_fields[0] if a_fields else "answer", "empty or whitespace-only answer")
    if not prompt_text.strip():
        raise BadRowError(index, (template.prompt_fields() or ["prompt"])[0], "empty prompt after templating")

    eos_id = tokenizer.eos_token_id
    if template.eos and eos_id is None:
        raise ValueError("template.eos is set but the tokenizer has no eos token (use workers.models.load_tokenizer)")
    eos = template.eos and not row.get(ANSWER_CUT)  # a cut answer does not end where it stops

    if template.chat:
        prefix, body, answer_ids = _encode_chat(tokenizer, prompt_text, answer_text.strip(), eos, eos_id)
    else:
        body = _ids(tokenizer, prompt_text, False)
        prefix = _special_prefix(tokenizer, prompt_text, body)
        answer_ids = _ids(tokenizer, answer_text, False)
        if eos:
            answer_ids = answer_ids + [eos_id]
    if not body:
        raise BadRowError(index, (template.prompt_fields() or ["prompt"])[0], "prompt has no tokens after tokenisation")
    if not answer_ids or (eos and answer_ids == [eos_id]):
        raise BadRowError(index, a_fields[0] if a_fields else "answer", "answer has no tokens after tokenisation")

    prompt_ids = _truncate_prompt(prefix, body, max_prompt_length)
    answer_ids = answer_ids[:max_answer_length]
    return prompt_ids + answer_ids, [IGNORE_INDEX] * len(prompt_ids) + answer_ids


def _encode_chat(
    tokenizer: Any, prompt_text: str, answer_text: str, eos: bool, eos_id: int | None
) -> tuple[list[int], list[int], list[int]]:
    """(prompt prefix specials, prompt body, answer ids) for a chat-templated row."""
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(
            f"template.chat is set but tokenizer {type(tokenizer).__name__} "
            f"({getattr(tokenizer, 'name_or_path', '?')}) has no chat template; set chat: false or "
            "use a tokenizer that ships one"
        )
    user = [{"role": "user", "content": prompt_text}]
    convo = user + [{"role": "assistant", "content": answer_text}]
    # Render to text, then tokenise without adding specials: the template already writes its BOS.
    p_text = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    f_text = tokenizer.apply_chat_template(convo, tokenize=False)
    p_ids = _ids(tokenizer, p_text, False)
    f_ids = _ids(tokenizer, f_text, False)
    if f_ids[: len(p_ids)] != p_ids:
        raise UserError(
            "the chat template's rendering of [user] + generation prompt is not a token prefix of "
            "[user, assistant]; cannot locate the answer tokens (use chat: false with a prompt template)"
        )
    answer_ids = f_ids[len(p_ids) :]
    if eos_id is not None and eos_id in answer_ids:
        last = len(answer_ids) - 1 - answer_ids[::-1].index(eos_id)
        # Keep through the template's end-of-turn eos (drop any trailing newline after it: generation
        # stops at eos anyway); without template.eos, cut at the first eos.
        answer_ids = answer_ids[: last + 1] if eos else answer_ids[: answer_ids.index(eos_id)]
    elif eos and eos_id is not None:
        answer_ids = answer_ids + [eos_id]
    # The leading BOS is kept through left truncation like in the plain path.
    specials = {tokenizer.bos_token_id, getattr(tokenizer, "cls_token_id", None)} - {None}
    prefix = p_ids[:1] if p_ids and p_ids[0] in specials else []
    return prefix, p_ids[len(prefix) :], answer_ids


def answers_of(labels: Sequence[Sequence[int]]) -> list[list[int]]:
    """The answer tokens of each row of labels (-100 elsewhere)."""
    return [[int(t) for t in row if t != IGNORE_INDEX] for row in labels]


def collate(
    examples: Sequence[tuple[list[int], list[int]]], pad_id: int, side: Literal["left", "right"] = "left"
) -> dict[str, torch.Tensor]:
    """Pad ``(input_ids, labels)`` pairs into a batch.

    Args:
        examples: B pairs of equal-length id lists (from :func:`encode_example`).
        pad_id: id written into padding (masked out; its value never matters).
        side: ``left`` (default: every answer ends at column L-1, so a model can return logits for
            the last K positions only) or ``right``.

    Returns:
        ``input_ids`` [B, L] long, ``attention_mask`` [B, L] long (1 on tokens), ``labels`` [B, L]
        long (-100 on prompt and padding), ``position_ids`` [B, L] long: ``cumsum(mask) - 1``
        clipped at 0, so each sequence's first real token is position 0 even when left-padded
        (HF Llama otherwise counts positions from the padding).
    """
    if not examples:
        raise ValueError("collate needs at least one example")
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    length = max(len(ids) for ids, _ in examples)
    batch = len(examples)
    input_ids = torch.full((batch, length), pad_id, dtype=torch.long)
    labels = torch.full((batch, length), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((batch, length), dtype=torch.long)
    for i, (ids, labs) in enumerate(examples):
        if len(ids) != len(labs):
            raise ValueError(f"example {i}: {len(ids)} input ids but {len(labs)} labels")
        n = len(ids)
        cols = slice(length - n, length) if side == "left" else slice(0, n)
        input_ids[i, cols] = torch.tensor(ids, dtype=torch.long)
        labels[i, cols] = torch.tensor(labs, dtype=torch.long)
        mask[i, cols] = 1
    position_ids = (mask.cumsum(dim=1) - 1).clamp(min=0)
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels, "position_ids": position_ids}


def encode_batch(
    rows: Sequence[dict[str, Any]],
    tokenizer: Any,
    template: Template,
    max_prompt_length: int,
    max_answer_length: int,
    on_bad_row: Literal["error", "skip"] = "error",
    side: Literal["left", "right"] = "left",
    first_index: int = 0,
) -> tuple[dict[str, torch.Tensor], list[int]]:
    """Encode and collate rows.

    Args:
        rows: N rows with the template's fields.
        on_bad_row: ``error`` raises the first :class:`BadRowError`; ``skip`` leaves bad rows out,
            logs a warning per row and returns their indices (a skipped row is never silent).
        first_index: index of ``rows[0]`` in the dataset, so errors and skipped indices name
            dataset rows rather than batch positions.

    Returns:
        ``(batch, skipped)``: ``batch`` as :func:`collate` ([B, L] tensors, B = N - len(skipped))
        and the indices (``first_index + position``) of the skipped rows.

    Raises:
        BadRowError: a bad row in ``error`` mode, or every row bad in ``skip`` mode.
    """
    if on_bad_row not in ("error", "skip"):
        raise ValueError(f"on_bad_row must be 'error' or 'skip', got {on_bad_row!r}")
    if not rows:
        raise ValueError("encode_batch needs at least one row")
    examples: list[tuple[list[int], list[int]]] = []
    skipped: list[int] = []
    first_error: BadRowError | None = None
    for pos, row in enumerate(rows):
        index = first_index + pos
        try:
            examples.append(encode_example(row, tokenizer, template, max_prompt_length, max_answer_length, index=index))
        except BadRowError as err:
            if on_bad_row == "error":
                raise
            logger.warning("skipping bad row: %s", err)
            skipped.append(index)
            first_error = first_error or err
    if not examples:
        assert first_error is not None
        raise BadRowError(
            first_error.index, first_error.field, f"all {len(rows)} rows are bad; first: {first_error.reason}"
        )
    return collate(examples, tokenizer.pad_token_id, side=side), skipped
