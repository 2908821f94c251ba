"""On-policy micro-batches (GKD-style): the student answers its own prompts, the teachers score that text.

Student side: :func:`on_policy_examples`: :func:`sample_answers` generates from the batch's prompts (the
student's own template and tokens, as in training), :func:`to_answers` turns the generated ids into
:class:`Answer`s, and :func:`student_examples` makes the training examples (prompt + generated ids, labels
on the answer).
Teacher side: ``workers.generation.encode_answers`` encodes each row's prompt with the answer *text*, in the
teacher's own tokenizer and template, so both sides' answer spans cover the same text.

A generation that is empty, EOS-only, or not valid text (a byte-level tokenizer can stop inside a UTF-8
character) cannot be encoded by a teacher: that sample falls back to the row's gold answer, and is counted.

Which micro-batches are on-policy (:func:`chosen`, :func:`kind`) depends on (seed, micro-batch) only, not on
the rank: under ZeRO-3 every forward is a collective, so all ranks must generate on the same micro-batches. A
resumed run makes the same choices and, with the same sampling seed per (seed, rank, micro-batch), the same
samples. A chosen micro-batch trains on the student's answers *instead of* its labels (``mode: replace``,
GKD's mix) or on both (``mode: add``: the label loss plus the on-policy loss on the same prompts), and none is
chosen before ``start_step`` (a warm start: the student learns to answer from the labels before it samples).
"""

from __future__ import annotations

import hashlib
from typing import Any, Callable, Sequence

import torch

from mlot.spans import IGNORE_INDEX
from workers.data.answer_cut import FIELD
from workers.data.encoding import ANSWER_CUT, answers_of, collate
from workers.generation import Answer


def _unit(*parts: int) -> float:
    """A uniform number in [0, 1) that depends only on ``parts``."""
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0 ** 64


def chosen(seed: int, m: int, fraction: float) -> bool:
    """Is micro-batch ``m`` on-policy? The same answer on every rank, and in a resumed run."""
    return fraction >= 1 or (fraction > 0 and _unit(seed, m) < fraction)


#: What a micro-batch trains on: its labels, the student's own answers to its prompts, or both.
LABELS, OWN, BOTH = "labels", "own", "both"


def kind(seed: int, m: int, settings: Any, first: int = 0) -> str:
    """:data:`LABELS`, :data:`OWN` or :data:`BOTH` for micro-batch ``m`` (the same on every rank and on resumption).

    Args:
        settings: ``train.on_policy`` (``fraction``, ``mode``).
        first: the first micro-batch that may be on-policy (``start_step`` optimizer steps of micro-batches in).
    """
    if m < first or not chosen(seed, m, settings.fraction):
        return LABELS
    return BOTH if settings.mode == "add" else OWN


def sampling_seed(seed: int, rank: int, m: int) -> int:
    return int(_unit(seed, rank, m, 1) * 2 ** 62)


@torch.no_grad()
def sample_answers(model: Any, tokenizer: Any, prompts: Sequence[Sequence[int]], settings: Any, seed: int,
                   device: torch.device, synced: bool = False) -> list[list[int]]:
    """Sample an answer to each prompt (token ids); returns each one's tokens up to and including its first EOS.

    Args:
        settings: ``train.on_policy`` (``max_new_tokens``, ``temperature``, ``top_p``): sampled from the
            full distribution otherwise (no top-k); special tokens other than EOS are never sampled, so the
            answer's tokens are exactly its text (+ EOS).
        synced: every rank keeps stepping until all are done (ZeRO-3, where each forward is a collective).
    """
    batch = collate([(list(p), list(p)) for p in prompts], tokenizer.pad_token_id, side="left")
    eos = tokenizer.eos_token_id
    suppress = sorted(i for i in tokenizer.all_special_ids if i != eos)
    was_training = model.training
    model.eval()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)  # the same samples when a resumed run replays this micro-batch
        out = model.generate(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                             do_sample=True, temperature=settings.temperature, top_p=settings.top_p, top_k=0,
                             max_new_tokens=settings.max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=eos, suppress_tokens=suppress or None, synced_gpus=synced)
    model.train(was_training)
    answers = []
    for row in out[:, batch["input_ids"].shape[1]:].tolist():
        answers.append(row[:row.index(eos) + 1] if eos in row else row)
    return answers


def to_answers(tokenizer: Any, generated: Sequence[Sequence[int]], rows: Sequence[dict[str, Any]],
               gold: Sequence[Sequence[int]]) -> list[Answer]:
    """:class:`Answer`s of the generated ids; an unusable generation becomes the row's gold answer (its text,
    and the student's ``gold`` answer tokens)."""
    eos = tokenizer.eos_token_id
    out = []
    for ids, row, gold_ids in zip(generated, rows, gold):
        text = tokenizer.decode(ids, skip_special_tokens=True).strip()
        if text and "\ufffd" not in text:
            out.append(Answer(text, bool(ids) and ids[-1] == eos, tuple(ids)))
        else:
            out.append(Answer(row[FIELD], not row.get(ANSWER_CUT, False), tuple(gold_ids), sampled=False))
    return out


def student_examples(prompts: Sequence[Sequence[int]], answers: Sequence[Answer]) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) of prompt + answer tokens, labels on the answer."""
    return [(list(p) + list(a.ids), [IGNORE_INDEX] * len(p) + list(a.ids)) for p, a in zip(prompts, answers)]


def on_policy_examples(sample: Callable[[list[list[int]]], list[list[int]]], tokenizer: Any,
                       examples: Sequence[tuple[list[int], list[int]]], rows: Sequence[dict[str, Any]]
                       ) -> tuple[list[tuple[list[int], list[int]]], list[Answer]]:
    """The student's training examples on its own answers to the prompts of ``examples`` (its tokens of the rows,
    with their gold answers) and ``rows`` (their text fields), and the answers the teachers will score.
    ``sample``: prompts (token ids) -> each one's answer tokens (:func:`sample_answers` on the student's module,
    or the vLLM generator's ``sample``)."""
    gold = answers_of([labels for _, labels in examples])
    prompts = [ids[:len(ids) - len(answer)] for (ids, _), answer in zip(examples, gold)]
    generated = sample(prompts)
    answers = to_answers(tokenizer, generated, rows, gold)
    return student_examples(prompts, answers), answers
