"""The one forward pass both sides share: logits for the answer rows only.

Batches are left-padded (``workers.data.encoding.collate``), so every answer ends at the right edge and the
rows a loss needs are the last K = longest answer + 1 positions (the +1 is the causal shift: the row
before the first answer token predicts it). HF models compute their LM head only there
(``logits_to_keep``), which cuts the head's cost and the [B, L, V] logits to [B, K, V]; the student can skip
the head altogether (:func:`answer_head`) and have its losses read the logits from it chunk by chunk.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any, Callable

import torch
from torch import Tensor

from mlot.head import HeadLogits
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
    k = _window(batch, "answer_logits")
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                position_ids=batch["position_ids"], logits_to_keep=k, use_cache=False)
    logits = out.logits
    if vocab_size is not None and logits.shape[-1] > vocab_size:
        logits = logits[..., :vocab_size]
    return logits, labels[:, -k:]


def answer_head(model: Any, batch: dict[str, Tensor], vocab_size: int | None = None,
                whole: Callable[[], AbstractContextManager[Any]] = nullcontext) -> tuple[HeadLogits, Tensor]:
    """As :func:`answer_logits`, the logits left unbuilt: the LM head's input on the answer window and its weight.

    The model still runs its own forward (under DeepSpeed that is what registers the backward hooks), with its
    head on no rows (``logits_to_keep`` an empty index); its last hidden state is what the head would read (HF
    causal LMs return it after the final norm). ``whole``: the context inside which the head's parameters hold
    their values (ZeRO-3 gathers them: ``workers.student.model.HeadWhole``).

    Returns:
        logits :class:`mlot.HeadLogits` standing for [B, K, V] and labels [B, K].
    """
    labels = batch["labels"]
    k = _window(batch, "answer_head")
    none = torch.empty(0, dtype=torch.long, device=labels.device)
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                position_ids=batch["position_ids"], logits_to_keep=none, output_hidden_states=True, use_cache=False)
    head = _unwrapped(model).get_output_embeddings()
    logits = HeadLogits(out.hidden_states[-1][:, -k:], head.weight, getattr(head, "bias", None), vocab_size or 0,
                        whole)
    return logits, labels[:, -k:]


def _window(batch: dict[str, Tensor], name: str) -> int:
    if bool((batch["attention_mask"][:, -1] == 0).any()):
        raise ValueError(f"{name} needs a left-padded batch (collate(..., side='left'))")
    return answer_window(batch["labels"])


def _unwrapped(model: Any) -> Any:
    """The HF model inside a DeepSpeed engine (or the model itself)."""
    return getattr(model, "module", model)


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
