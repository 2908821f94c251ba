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

from .identity import IdentityPayload

PAYLOAD_VERSION = 2  # 2: the optional identity payload and nll per byte


@dataclass
class TeacherPayload:
    """Ranked top-k teacher probabilities for a batch of answers.

    Attributes:
        mode: ``"paper"`` or ``"reference"`` (what ``settings`` mean).
        probs: [B, T, k] the teacher's kept columns at the teacher temperature, in rank order;
            rows past ``lengths[b]`` are zero.
        sd_log_shift: [B, T] or None. The same columns at the SD temperature are
            ``exp(r * log(probs) + sd_log_shift)`` with ``r = teacher_temperature / sd_temperature``
            (exact: softmax at another temperature is a power of the probabilities, renormalised by a
            per-token constant), so SD costs 4 bytes per token instead of 4k. None where SD is off or
            uses the same temperature, and in reference mode (the loss re-softmaxes ``probs``).
        columns: teacher vocabulary ids (int32) of the kept columns: [k] (reference: one order per
            batch), [B, k] (sequence ranking) or [B, T, k] (token ranking).
        lengths: [B] answer lengths (rows) of each sample.
        settings: the loss settings the payload was computed with; the loss refuses a payload whose
            settings disagree with its own.
        identity: the teacher side of the identity-aware terms (``mlot.identity``), when the loss uses them.
        nll_per_byte: [B] the teacher's NLL of each answer per byte of its text (``mlot.mixing``), when the
            job mixes teachers per sample.
    """

    mode: str
    probs: Tensor
    sd_log_shift: Tensor | None
    columns: Tensor
    lengths: Tensor
    settings: dict[str, Any] = field(default_factory=dict)
    version: int = PAYLOAD_VERSION
    identity: IdentityPayload | None = None
    nll_per_byte: Tensor | None = None

    @property
    def batch_size(self) -> int:
        return self.probs.shape[0]

    def nbytes(self) -> int:
        """Bytes of tensor data (probabilities, ids, lengths, the identity payload) as held."""
        held = [*self._tensors().values(), *(self.identity.tensors().values() if self.identity else ())]
        return sum(t.numel() * t.element_size() for t in held)

    def _tensors(self) -> dict[str, Tensor]:
        out = {"probs": self.probs, "columns": self.columns, "lengths": self.lengths}
        for name in ("sd_log_shift", "nll_per_byte"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        return out

    def bytes_per_token(self) -> float:
        """Payload bytes per answer token, counting answer rows only (a ragged wire format drops padding)."""
        tokens = int(self.lengths.sum().clamp(min=1))
        k = self.probs.shape[-1]
        per_row = k * self.probs.element_size()
        if self.sd_log_shift is not None:
            per_row += self.sd_log_shift.element_size()
        ids = (tokens * k if self.columns.dim() == 3 else self.columns.numel()) * self.columns.element_size()
        if self.identity is not None:  # per answer token: its k classes and probabilities, gold log-p, bounds
            i = self.identity
            per_row += (i.classes.shape[-1] * (i.classes.element_size() + i.probs.element_size())
                        + i.token_logp.element_size() + i.bounds.element_size()
                        + (0 if i.student_bounds is None else i.student_bounds.element_size())
                        + (0 if i.targets is None else
                           i.targets.shape[-1] * (i.targets.element_size() + i.target_probs.element_size())))
        return (tokens * per_row + ids + self.lengths.numel() * self.lengths.element_size()) / tokens

    def sd_probs(self, sd_temperature: float, teacher_temperature: float) -> Tensor:
        """[B, T, k] the kept columns' probabilities at the SD temperature (see ``sd_log_shift``)."""
        if self.sd_log_shift is None:
            return self.probs
        r = teacher_temperature / sd_temperature
        return torch.exp(r * torch.log(self.probs) + self.sd_log_shift[..., None])

    def to(self, device: torch.device | str) -> "TeacherPayload":
        return self._map(lambda t: t.to(device))

    def index_select(self, index: Tensor) -> "TeacherPayload":
        """The payload of a subset / reordering of the batch (paper mode only: reference couples the batch)."""
        if self.mode == "reference":
            raise ValueError("a reference-mode payload belongs to one whole batch (its ranking is per batch); "
                             "it cannot be split")
        return self._map(lambda t: t.index_select(0, index.to(t.device)))

    def _map(self, fn: Any) -> "TeacherPayload":
        """A copy with ``fn`` applied to every tensor."""
        return TeacherPayload(self.mode, fn(self.probs), None if self.sd_log_shift is None else fn(self.sd_log_shift),
                              fn(self.columns), fn(self.lengths), dict(self.settings), self.version,
                              None if self.identity is None else self.identity.map(fn),
                              None if self.nll_per_byte is None else fn(self.nll_per_byte))

    def to_numpy(self) -> dict[str, Any]:
        """A plain dict of numpy arrays and settings (msgpack/npz/Ray-friendly, no pickled classes)."""
        out: dict[str, Any] = {"version": self.version, "mode": self.mode, "settings": dict(self.settings)}
        out.update({name: t.detach().cpu().numpy() for name, t in self._tensors().items()})
        if self.identity is not None:
            out["identity"] = {name: t.detach().cpu().numpy() for name, t in self.identity.tensors().items()}
        return out

    @classmethod
    def from_numpy(cls, d: dict[str, Any]) -> "TeacherPayload":
        if d.get("version") != PAYLOAD_VERSION:
            raise ValueError(f"teacher payload version {d.get('version')!r} is not {PAYLOAD_VERSION}; "
                             "teacher and student must run the same mlot release")
        # np.array(...) copies: arrays from Ray's object store are read-only views.
        t = lambda a: torch.from_numpy(np.array(a))  # noqa: E731
        identity = IdentityPayload(**{k: t(a) for k, a in d["identity"].items()}) if "identity" in d else None
        return cls(d["mode"], t(d["probs"]), t(d["sd_log_shift"]) if "sd_log_shift" in d else None,
                   t(d["columns"]), t(d["lengths"]), dict(d["settings"]), d["version"], identity,
                   t(d["nll_per_byte"]) if "nll_per_byte" in d else None)


def full_logits_bytes_per_token(vocab_size: int, bytes_per_value: int = 2) -> int:
    """What shipping full logits would cost per answer token (bf16 by default)."""
    return vocab_size * bytes_per_value
