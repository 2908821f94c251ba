"""Callbacks into the student loop: an optional list, empty in normal use.

Tests fill it to inject faults (a worker that dies at a step, NaN student logits on chosen
micro-batches) without any test switch in production code. Each hook runs on every rank; a
callback must be picklable (it travels to the workers in the train-loop config).
"""

from __future__ import annotations

from typing import Any

import torch


class TrainCallback:
    """Hooks of the student loop; every default does nothing."""

    def on_logits(self, m: int, rank: int, logits: torch.Tensor) -> torch.Tensor:
        """Micro-batch ``m``'s answer-window logits [B, K, V] (a tensor, or ``mlot.HeadLogits`` when the loss reads
        the LM head), before the loss; return what the loss sees."""
        return logits

    def on_step_end(self, step: int, rank: int, engine: Any) -> None:
        """After optimizer step ``step`` (1-based) is done, logged, and checkpointed if due."""
