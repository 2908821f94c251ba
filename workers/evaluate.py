"""Greedy answers and SQuAD-style scores (normalised exact match and token F1)."""

from __future__ import annotations

import collections
import re
import string
from typing import Any, Sequence

import torch

from specs import Template
from workers.data import collate, encode_example


def normalize(text: str) -> str:
    """SQuAD normalisation: lower case, no punctuation, no articles (a/an/the), single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, golds: Sequence[str]) -> float:
    """1.0 if the normalised prediction equals any normalised gold answer."""
    return float(any(normalize(prediction) == normalize(g) for g in golds))


def token_f1(prediction: str, golds: Sequence[str]) -> float:
    """Max over gold answers of the token-overlap F1 of the normalised strings (SQuAD v1.1)."""
    def f1(pred: str, gold: str) -> float:
        p, g = normalize(pred).split(), normalize(gold).split()
        if not p or not g:
            return float(p == g)
        common = sum((collections.Counter(p) & collections.Counter(g)).values())
        if common == 0:
            return 0.0
        precision, recall = common / len(p), common / len(g)
        return 2 * precision * recall / (precision + recall)
    return max((f1(prediction, g) for g in golds), default=0.0)


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
            text = tokenizer.decode(seq, skip_special_tokens=True)
            out.append(text.strip().split("\n")[0].strip())
    model.train(was_training)
    return out


def greedy_answers(model: Any, tokenizer: Any, template: Template, rows: Sequence[dict[str, Any]],
                   max_prompt_length: int, max_new_tokens: int, device: torch.device | str = "cpu",
                   batch_size: int = 32) -> list[str]:
    """Greedy-decode an answer for each row's prompt; keep the first line, stripped."""
    return generate_answers(model, tokenizer, template, rows, max_prompt_length, max_new_tokens, device, batch_size)


def score(predictions: Sequence[str], golds: Sequence[Sequence[str]]) -> dict[str, float]:
    """Mean exact match and F1 (in percent) over paired predictions and gold-answer lists."""
    n = max(len(predictions), 1)
    return {"exact_match": 100 * sum(exact_match(p, g) for p, g in zip(predictions, golds)) / n,
            "f1": 100 * sum(token_f1(p, g) for p, g in zip(predictions, golds)) / n}


def gold_answers(row: dict[str, Any], field: str = "answer") -> list[str]:
    """All gold answers of a row: ``<field>_all`` when the dataset had a list, else the one answer."""
    golds = row.get(f"{field}_all") or [row[field]]
    return [g for g in golds if isinstance(g, str)]
