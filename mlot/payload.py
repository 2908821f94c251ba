"""The teacher payload: everything the loss needs from a teacher, and nothing more.

A teacher computes it next to its own model (``mlot.compress_teacher``) and ships it to the student
workers instead of full-vocabulary logits: O(T*k) numbers per sequence instead of O(T*V_t).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

PAYLOAD_VERSION = 1


@dataclass
class TeacherPayload:
    """Ranked top-k teacher probabilities for a batch of answers.

    Attributes:
        mode: ``"paper"`` or ``"reference"`` (what ``settings`` mean).
        probs: [B, T, k] the teacher's kept columns at the teacher temperature, in rank order;
            rows past ``lengths[b]`` are zero.
        sd_probs: [B, T, k] the same columns at the SD temperature, or None where the loss derives
            them from ``probs`` (reference mode) or they equal ``probs`` (same temperature) or SD is off.
        columns: teacher vocabulary ids of the kept columns: [k] (reference: one order per batch),
            [B, k] (sequence ranking) or [B, T, k] (token ranking).
        lengths: [B] answer lengths (rows) of each sample.
        settings: the loss settings the payload was computed with; the loss refuses a payload whose
            settings disagree with its own.
    """

    mode: str
    probs: Tensor
    sd_probs: Tensor | None
    columns: Tensor
    lengths: Tensor
    settings: dict[str, Any] = field(default_factory=dict)
    version: int = PAYLOAD_VERSION

    @property
    def batch_size(self) -> int:
        return self.probs.shape[0]

    def nbytes(self) -> int:
        """Bytes of tensor data (probabilities, ids, lengths) as held."""
        tensors = [self.probs, self.columns, self.lengths] + ([self.sd_probs] if self.sd_probs is not None else [])
        return sum(t.numel() * t.element_size() for t in tensors)

    def bytes_per_token(self) -> float:
        """Payload bytes per answer token (padding rows excluded from the probability arrays)."""
        tokens = int(self.lengths.sum().clamp(min=1))
        k = self.probs.shape[-1]
        per_row = k * self.probs.element_size() * (2 if self.sd_probs is not None else 1)
        ids = self.columns.numel() * self.columns.element_size()
        if self.columns.dim() == 3:  # token ranking ships ids per row
            ids = tokens * k * self.columns.element_size()
        return (tokens * per_row + ids + self.lengths.numel() * self.lengths.element_size()) / tokens

    def to(self, device: torch.device | str) -> "TeacherPayload":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return TeacherPayload(self.mode, move(self.probs), move(self.sd_probs), move(self.columns),
                              move(self.lengths), dict(self.settings), self.version)

    def index_select(self, index: Tensor) -> "TeacherPayload":
        """The payload of a subset / reordering of the batch (paper mode only: reference couples the batch)."""
        if self.mode == "reference":
            raise ValueError("a reference-mode payload belongs to one whole batch (its ranking is per batch); it cannot be split")
        pick = lambda t: None if t is None else t.index_select(0, index)  # noqa: E731
        return TeacherPayload(self.mode, pick(self.probs), pick(self.sd_probs), pick(self.columns),
                              pick(self.lengths), dict(self.settings), self.version)

    def to_numpy(self) -> dict[str, Any]:
        """A plain dict of numpy arrays and settings (msgpack/npz/Ray-friendly, no pickled classes)."""
        out: dict[str, Any] = {
            "version": self.version, "mode": self.mode, "settings": dict(self.settings),
            "probs": self.probs.detach().cpu().numpy(), "columns": self.columns.cpu().numpy(),
            "lengths": self.lengths.cpu().numpy(),
        }
        if self.sd_probs is not None:
            out["sd_probs"] = self.sd_probs.detach().cpu().numpy()
        return out

    @classmethod
    def from_numpy(cls, d: dict[str, Any]) -> "TeacherPayload":
        if d.get("version") != PAYLOAD_VERSION:
            raise ValueError(f"teacher payload version {d.get('version')!r} is not {PAYLOAD_VERSION}; "
                             "teacher and student must run the same mlot release")
        # np.array(...) copies: arrays from Ray's object store are read-only views.
        t = lambda a: torch.from_numpy(np.array(a))  # noqa: E731
        return cls(d["mode"], t(d["probs"]), t(d["sd_probs"]) if "sd_probs" in d else None,
                   t(d["columns"]), t(d["lengths"]), dict(d["settings"]), d["version"])


def full_logits_bytes_per_token(vocab_size: int, bytes_per_value: int = 2) -> int:
    """What shipping full logits would cost per answer token (bf16 by default)."""
    return vocab_size * bytes_per_value
