"""The one forward pass both sides share: logits for the answer rows only.

Batches are left-padded (``workers.data.encoding.collate``), so every answer ends at the right edge and the
rows a loss needs are the last K = longest answer + 1 positions (the +1 is the causal shift: the row
before the first answer token predicts it). HF models compute their LM head only there
(``logits_to_keep``), which cuts the head's cost and the [B, L, V] logits to [B, K, V].
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from mlot.spans import IGNORE_INDEX


def answer_window(labels: Tensor) -> int:
    """K: rows needed from the right edge of a left-padded batch. labels [B, L] -> int."""
    n = (labels != IGNORE_INDEX).sum(1).max()
    return min(int(n) + 1, labels.shape[1])


def answer_logits(model: Any, batch: dict[str, Tensor], vocab_size: int | None = None) -> tuple[Tensor, Tensor]:
    """Run the model and return logits and labels for the answer window only.

    Args:
        batch: ``input_ids``, ``attention_mask``, ``position_ids``, ``labels`` [B, L] (left-padded).
        vocab_size: the tokenizer's vocabulary; logit columns beyond it (padded embedding rows,
            e.g. 152,064 vs 151,936) are dropped so no loss ever ranks a token that cannot exist.

    Returns:
        logits [B, K, V] and labels [B, K].
    """
    labels = batch["labels"]
    if bool((batch["attention_mask"][:, -1] == 0).any()):
        raise ValueError("answer_logits needs a left-padded batch (collate(..., side='left'))")
    k = answer_window(labels)
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                position_ids=batch["position_ids"], logits_to_keep=k, use_cache=False)
    logits = out.logits
    if vocab_size is not None and logits.shape[-1] > vocab_size:
        logits = logits[..., :vocab_size]
    return logits, labels[:, -k:]


def to_device(batch: dict[str, Tensor], device: torch.device | str) -> dict[str, Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def answer_hidden(model: Any, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """The final hidden states of the answer window (what the LM head reads), and its labels.

    Logits are ``head(hidden)`` for heads that are a plain projection, so a teacher can keep these
    ([B, K, H], independent of any loss setting) and recompute logits for each new temperature / k.

    Returns:
        hidden [B, K, H] and labels [B, K].
    """
    labels = batch["labels"]
    k = answer_window(labels)
    out = model.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           position_ids=batch["position_ids"], use_cache=False)
    return out.last_hidden_state[:, -k:], labels[:, -k:]
