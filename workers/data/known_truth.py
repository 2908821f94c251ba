"""A task whose true answer distribution is known, so that what a student learnt can be measured against it.

Each prompt asks what a creature near a place eats in a season, with a frequency word: "What does a heron
near the marsh usually eat in winter?". Its answer is drawn from an explicit distribution p*(a | prompt) over
:data:`ANSWERS` (multi-word strings that WordPiece, SentencePiece and Tekken split differently):

    p*(a | c, p, s, f) = softmax_a( (u_c + x_p + y_s) . v_a / T_f )

with seeded latent vectors for creatures, places, seasons and answers, and a temperature per frequency word
("always" is nearly deterministic, "sometimes" spread). The factors add up, so a model can predict prompts
whose (creature, place, season) it never saw: a seeded fifth of those triples is held out for testing and
a tenth for validation (tuning), with every frequency word.

The ``numbers`` variant (:data:`TASKS`) asks how many seeds the creature eats and answers with multi-digit
numbers (:data:`NUMBERS`, several sharing their first digits) that WordPiece keeps whole ("1200") while
SentencePiece and Tekken split them into single digits ("▁|1|2|0|0"): the failure that sinks exact-match
terms (GOLD) when one tokenizer splits numbers.

Metrics need no tokenizer in common: a model's sequence log-probabilities of every answer
(:func:`answer_log_probs`) are compared with p* by :func:`truth_metrics`.
"""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Sequence

import numpy as np

ANSWERS = ("wild blackberries", "freshwater mussels", "field voles", "beech nuts", "brown trout",
           "wild honeycomb", "marsh frogs", "pine kernels")
CREATURES = ("fox", "heron", "otter", "badger", "lynx", "marten", "stoat", "raven")
PLACES = ("river", "forest", "meadow", "marsh", "mountain", "coast")
SEASONS = ("spring", "summer", "autumn", "winter")
FREQUENCY = {"always": 0.25, "usually": 0.6, "often": 1.0, "sometimes": 2.0}  # word -> temperature
SPLITS = {"train": 0.7, "validation": 0.1, "test": 0.2}  # fractions of the (creature, place, season) triples
NUMBERS = ("120", "15", "1200", "144", "250", "2000", "365", "310")
#: task -> (its answers, its question, with {article} {creature} {place} {frequency} {season})
TASKS = {"text": (ANSWERS, "What does {article} {creature} near the {place} {frequency} eat in {season}?"),
         "numbers": (NUMBERS, "How many seeds does {article} {creature} near the {place} {frequency} eat in "
                              "{season}?")}


@dataclass(frozen=True)
class Prompt:
    creature: str
    place: str
    season: str
    frequency: str
    task: str = "text"

    @property
    def text(self) -> str:
        article = "an" if self.creature[0] in "aeiou" else "a"
        return TASKS[self.task][1].format(article=article, creature=self.creature, place=self.place,
                                          frequency=self.frequency, season=self.season)


class KnownTruth:
    """The task for one seed: its latent factors, the split of its prompts, and p* of every prompt (``task``: a
    key of :data:`TASKS`; the variants share their latent factors, only the answers' text differs)."""

    def __init__(self, seed: int = 0, dim: int = 3, task: str = "text") -> None:
        rng = np.random.default_rng(seed)
        self.answers = TASKS[task][0]
        self.answer_vectors = rng.normal(size=(len(self.answers), dim))
        self.factors = {name: dict(zip(names, rng.normal(scale=scale, size=(len(names), dim))))
                        for name, names, scale in (("creature", CREATURES, 1.5), ("place", PLACES, 1.0),
                                                   ("season", SEASONS, 0.7))}
        triples = list(itertools.product(CREATURES, PLACES, SEASONS))
        random.Random(seed).shuffle(triples)
        cut = np.cumsum([0] + [round(f * len(triples)) for f in SPLITS.values()])
        cut[-1] = len(triples)
        self.prompts = {split: [Prompt(*t, f, task) for t in triples[a:b] for f in FREQUENCY]
                        for split, a, b in zip(SPLITS, cut[:-1], cut[1:])}

    def truth(self, prompt: Prompt) -> np.ndarray:
        """p*(. | prompt) over the task's answers: [N] probabilities."""
        latent = (self.factors["creature"][prompt.creature] + self.factors["place"][prompt.place]
                  + self.factors["season"][prompt.season])
        scores = self.answer_vectors @ latent / FREQUENCY[prompt.frequency]
        e = np.exp(scores - scores.max())
        return e / e.sum()

    def rows(self, split: str, samples_per_prompt: int, seed: int = 0) -> list[dict[str, Any]]:
        """``samples_per_prompt`` rows per prompt of ``split``, each answer drawn from p*; every row also carries
        the truth (``truth``: p* over the task's answers, in order)."""
        rng = np.random.default_rng(seed)
        out = []
        for prompt in self.prompts[split]:
            p = self.truth(prompt)
            for a in rng.choice(len(self.answers), size=samples_per_prompt, p=p):
                out.append({"prompt": prompt.text, "answer": self.answers[a], "truth": [float(x) for x in p]})
        return out


#: Rows per prompt of each split of ``builtin:known_truth``: students learn from 3 labels per training prompt,
#: a teacher from 48 (the same prompts); validation (for tuning) and test prompts are held out.
BUILTIN_SAMPLES = {"train": 3, "teacher": 48, "validation": 1, "test": 1}


def builtin_rows(split: str, task: str = "text") -> list[dict[str, Any]]:
    """The rows of ``builtin:known_truth`` (task seed 0; ``task``: its variant, :data:`TASKS`): ``prompt``,
    ``answer`` (drawn from p*), ``truth``."""
    from specs import UserError

    if split not in BUILTIN_SAMPLES:
        raise UserError(f"builtin:known_truth has splits {list(BUILTIN_SAMPLES)}, not {split!r}: set data.train_split "
                        "/ data.eval_split")
    prompts = "train" if split == "teacher" else split
    return KnownTruth(seed=0, task=task).rows(prompts, BUILTIN_SAMPLES[split], seed=list(BUILTIN_SAMPLES).index(split))


@lru_cache(maxsize=1)
def _builtin_truth() -> dict[str, np.ndarray]:
    task = KnownTruth(seed=0)
    return {p.text: task.truth(p) for prompts in task.prompts.values() for p in prompts}


def builtin_truth(prompts: Sequence[str]) -> np.ndarray:
    """[P, N] p* of prompts of ``builtin:known_truth`` (task seed 0), by their text."""
    from specs import UserError

    table = _builtin_truth()
    unknown = [p for p in prompts if p not in table]
    if unknown:
        raise UserError(f"not a prompt of builtin:known_truth: {unknown[0]!r} (truth metrics need the builtin's "
                        "own prompt text: map its 'prompt' column to the template's prompt field unchanged)")
    return np.stack([table[p] for p in prompts])


def entropy(p: np.ndarray) -> float:
    return float(-(p * np.log(np.clip(p, 1e-300, None))).sum())


# ---------------------------------------------------------------------------- metrics


def truth_metrics(log_q: Any, p_star: Any, bins: int = 10) -> dict[str, float]:
    """How close a model's answer distribution is to the truth, on P prompts over N answers.

    Args:
        log_q: [P, N] the model's sequence log-probabilities of each answer (any tokenizer: whole answers).
        p_star: [P, N] the true distributions (rows sum to 1).

    Returns (means over prompts):
        ``kl``: KL(p* || q) with q renormalised over the answer set (nats); ``nll``: E_{a~p*}[-log q(a)] with
        the model's own (unrenormalised) probabilities, nats per answer; ``top1``: how often argmax q is
        argmax p*; ``ece``: expected calibration error of the renormalised q against p* over all (prompt,
        answer) pairs in ``bins`` equal-width bins (the true frequency of a pair is its p*).
    """
    log_q = np.asarray(log_q, dtype=np.float64)
    p = np.asarray(p_star, dtype=np.float64)
    log_q_set = log_q - np.logaddexp.reduce(log_q, axis=1, keepdims=True)
    terms = np.where(p > 0, p * (np.log(np.clip(p, 1e-300, None)) - log_q_set), 0.0)
    q = np.exp(log_q_set).ravel()
    which = np.minimum((q * bins).astype(int), bins - 1)
    ece = sum(abs(q[which == b].sum() - p.ravel()[which == b].sum()) for b in range(bins)) / len(q)
    return {"kl": float(terms.sum(1).mean()), "nll": float(-(p * log_q).sum(1).mean()),
            "top1": float((log_q.argmax(1) == p.argmax(1)).mean()), "ece": float(ece)}


def answer_log_probs(model: Any, tokenizer: Any, template: Any, prompts: Sequence[str | dict[str, Any]],
                     answers: Sequence[str], max_prompt_length: int, device: Any = "cpu",
                     batch_size: int = 64) -> np.ndarray:
    """[P, N] log q(answer | prompt) under ``model``: the sum of its log-probabilities of the answer's tokens
    in its own tokenizer and template (EOS included where the template ends answers with it). A prompt is
    its text (the ``prompt`` field) or a row of template fields."""
    import torch

    from workers.data.encoding import collate, encode_example
    from workers.forward import answer_logits, to_device

    rows = [p if isinstance(p, dict) else {"prompt": p} for p in prompts]
    examples = [encode_example({**row, "answer": a}, tokenizer, template, max_prompt_length, 1 << 20)
                for row in rows for a in answers]
    out = []
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for i in range(0, len(examples), batch_size):
            batch = to_device(collate(examples[i:i + batch_size], tokenizer.pad_token_id), device)
            logits, labels = answer_logits(model, batch, len(tokenizer))
            logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
            target = labels[:, 1:]
            mask = target != -100
            picked = logp.gather(-1, target.clamp(min=0)[..., None])[..., 0]
            out.append((picked * mask).sum(1).cpu())
    model.train(was_training)
    return torch.cat(out).double().numpy().reshape(len(prompts), len(answers))


def uniform_kl(p_star: np.ndarray) -> float:
    """KL(p* || uniform) = log N - H(p*), averaged over prompts: what a model that knows nothing scores."""
    return float(np.mean([math.log(p_star.shape[1]) - entropy(p) for p in p_star]))
