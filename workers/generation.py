"""Generated answers, on both sides: a model's answers to its prompts (greedy or sampled: end-of-job scoring,
``mlot generate``, SeqKD targets), and :class:`Answer`, a student's generated answer as a teacher receives it on
an on-policy micro-batch, with :func:`encode_answers`, the teacher's encoding of it in its own tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from specs import Template
from workers.data.answer_cut import FIELD
from workers.data.encoding import ANSWER_CUT, collate, encode_example


def prompt_ids(row: dict[str, Any], tokenizer: Any, template: Template, max_prompt_length: int) -> list[int]:
    """The ids a model sees before its answer (the same templating as training, answer left out)."""
    fields = template.answer_fields() or ["answer"]
    ids, labels = encode_example({**row, **{f: "x" for f in fields}}, tokenizer, template, max_prompt_length, 1)
    return [i for i, lab in zip(ids, labels) if lab == -100]


@torch.no_grad()
def generate_answers(model: Any, tokenizer: Any, template: Template, rows: Sequence[dict[str, Any]],
                     max_prompt_length: int, max_new_tokens: int, device: torch.device | str = "cpu",
                     batch_size: int = 32, **sampling: Any) -> list[str]:
    """Decode an answer for each row's prompt; keep the first line, stripped. ``sampling``: options of
    ``model.generate`` (e.g. ``do_sample=True, top_k=0``); greedy by default."""
    was_training = model.training
    model.eval()
    out: list[str] = []
    pad = tokenizer.pad_token_id
    for i in range(0, len(rows), batch_size):
        chunk = [prompt_ids(r, tokenizer, template, max_prompt_length) for r in rows[i:i + batch_size]]
        batch = collate([(ids, ids) for ids in chunk], pad_id=pad, side="left")
        gen = model.generate(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                             max_new_tokens=max_new_tokens, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id,
                             **{"do_sample": False, **sampling})
        for seq in gen[:, batch["input_ids"].shape[1]:]:
            out.append(first_line(tokenizer.decode(seq, skip_special_tokens=True)))
    model.train(was_training)
    return out


def first_line(text: str) -> str:
    """A generated answer as it is kept: its first line, stripped."""
    return text.strip().split("\n")[0].strip()


def greedy_answers(model: Any, tokenizer: Any, template: Template, rows: Sequence[dict[str, Any]],
                   max_prompt_length: int, max_new_tokens: int, device: torch.device | str = "cpu",
                   batch_size: int = 32) -> list[str]:
    """Greedy-decode an answer for each row's prompt; keep the first line, stripped."""
    return generate_answers(model, tokenizer, template, rows, max_prompt_length, max_new_tokens, device, batch_size)


@dataclass(frozen=True)
class Answer:
    """One sample's answer on an on-policy micro-batch, as the teachers receive it.

    Attributes:
        text: the answer text the teachers encode (the decoded generation, stripped).
        ended: it ended with the student's EOS (the teachers then end theirs with their own EOS).
        ids: the student's answer tokens (its EOS included when ``ended``).
        sampled: False when the generation was unusable and this is the row's gold answer instead.
    """

    text: str
    ended: bool
    ids: tuple[int, ...]
    sampled: bool = True


def encode_answers(rows: Sequence[dict[str, Any]], answers: Sequence[Answer], tokenizer: Any, template: Any,
                   max_prompt_length: int) -> list[tuple[list[int], list[int]]]:
    """A teacher's (input_ids, labels) of each row's prompt with the student's answer text: its own template
    and tokens, its EOS only where the student's answer ended, never cut (the span is the whole text)."""
    return [encode_example({**row, FIELD: a.text, ANSWER_CUT: not a.ended}, tokenizer, template, max_prompt_length,
                           1 << 30) for row, a in zip(rows, answers)]
