"""Answer metrics in percent: SQuAD-style exact match and token F1 (max over the gold answers) for QA, and
ROUGE-Lsum F-measure (Google's ``rouge-score``, which HF ``evaluate`` wraps; max over the references) for
summaries. The task-independent metrics against a known answer distribution are ``workers.data.known_truth``'s.
"""

from __future__ import annotations

import collections
import functools
import re
import string
from typing import Any, Sequence

from specs import UserError

METRICS = ("qa", "rouge", "all")


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


def score(predictions: Sequence[str], golds: Sequence[Sequence[str]]) -> dict[str, float]:
    """Mean exact match and F1 (in percent) over paired predictions and gold-answer lists."""
    n = max(len(predictions), 1)
    return {"exact_match": 100 * sum(exact_match(p, g) for p, g in zip(predictions, golds)) / n,
            "f1": 100 * sum(token_f1(p, g) for p, g in zip(predictions, golds)) / n}


def gold_answers(row: dict[str, Any], field: str = "answer") -> list[str]:
    """All gold answers of a row: ``<field>_all`` when the dataset had a list, else the one answer."""
    golds = row.get(f"{field}_all") or [row[field]]
    return [g for g in golds if isinstance(g, str)]


@functools.lru_cache(maxsize=1)
def _rouge_scorer() -> Any:
    from rouge_score import rouge_scorer

    # No stemming: the benchmark scripts behind the paper's numbers (ULD's, which MultiLevelOT reuses) call
    # HF evaluate's "rouge" with its defaults, i.e. this scorer with use_stemmer=False.
    return rouge_scorer.RougeScorer(["rougeLsum"], use_stemmer=False)


def rouge_lsum(prediction: str, references: Sequence[str]) -> float:
    """Summary-level ROUGE-L F-measure in [0, 1], max over ``references``.

    Sentences are the lines of each text (ROUGE-Lsum's union-LCS runs over newline-separated
    sentences); tokens are lower-cased ASCII alphanumeric runs (rouge-score's tokenizer drops other
    characters), not stemmed.
    """
    scorer = _rouge_scorer()
    return max((scorer.score(ref, prediction)["rougeLsum"].fmeasure for ref in references), default=0.0)


def score_predictions(predictions: Sequence[str], golds: Sequence[Sequence[str]],
                      metric: str = "all") -> dict[str, float]:
    """Mean scores in percent: ``exact_match`` and ``f1`` for ``qa``, ``rougeLsum`` for ``rouge``,
    all three for ``all``."""
    if metric not in METRICS:
        raise UserError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")
    out: dict[str, float] = {}
    if metric in ("qa", "all"):
        out.update(score(predictions, golds))
    if metric in ("rouge", "all"):
        n = max(len(predictions), 1)
        out["rougeLsum"] = 100 * sum(rouge_lsum(p, g) for p, g in zip(predictions, golds)) / n
    return out
