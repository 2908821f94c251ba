"""Logits left unbuilt: the LM head's input and weight, for losses that read a few numbers per answer row.

A student's LM head turns hidden states ``h`` [B, L, H] into logits ``h @ W.T + b`` [B, L, V]: at V = 152k, 16 x 256
answer rows are 2.5 GB per fp32 copy, and autograd keeps the logits and their gradient (the model's dtype) on top
of what the loss itself needs. :class:`HeadLogits` stands for those logits without building them: the reader of
answer rows (``mlot.rows.AnswerRows``) computes each chunk of rows' logits from ``h`` and ``W`` when it needs them
(forward scans, backward recomputation) and in backward hands autograd the gradients of ``h``, ``W`` and ``b``
itself, chunk by chunk, as Liger-Kernel's fused linear cross-entropy does for CE alone, here for every term of the
objective at once. Losses take it where they take logits (``shape``, ``device``, ``dtype``; slicing of the batch
and position dims); only the reference mode's dense softmax needs the logits built.

``whole`` is the context inside which ``weight`` and ``bias`` hold their values: under DeepSpeed ZeRO-3 each rank
keeps a shard of them, and the trainer's context gathers them (``workers/student/model.py``); elsewhere there is
nothing to do.
"""

from __future__ import annotations

import dataclasses
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor

#: elements of one gathered [rows, k, H] block of head rows in a column read (64 MB in fp32)
_GATHER_BUDGET = 1 << 24


@dataclass(frozen=True, eq=False)
class HeadLogits:
    """The logits ``hidden @ weight[:vocab].T + bias[:vocab]`` [B, L, vocab], not built.

    Attributes:
        hidden: [B, L, H] the LM head's input (differentiable).
        weight: [V_model, H] its weight, V_model >= vocab (padded embedding rows are never read); bias: [V_model]
            or None.
        vocab: the logits' last dimension (0: all of ``weight``'s rows).
        whole: a no-argument context manager inside which ``weight`` and ``bias`` hold their values.
    """

    hidden: Tensor
    weight: Tensor
    bias: Tensor | None = None
    vocab: int = 0
    whole: Callable[[], AbstractContextManager[Any]] = nullcontext

    def __post_init__(self) -> None:
        if self.hidden.dim() != 3:
            raise ValueError(f"hidden must be [batch, seq_len, hidden], got shape {tuple(self.hidden.shape)}")
        if not self.vocab:
            with self.whole():
                object.__setattr__(self, "vocab", int(self.weight.shape[0]))

    # ------------------------------------------------------------------------ what a loss reads of a tensor

    @property
    def shape(self) -> torch.Size:
        return torch.Size((*self.hidden.shape[:2], self.vocab))

    @property
    def device(self) -> torch.device:
        return self.hidden.device

    @property
    def dtype(self) -> torch.dtype:
        return self.hidden.dtype

    @property
    def requires_grad(self) -> bool:
        return self.hidden.requires_grad

    def dim(self) -> int:
        return 3

    def new_zeros(self, *size: Any, **kwargs: Any) -> Tensor:
        return self.hidden.new_zeros(*size, **kwargs)

    def __getitem__(self, key: Any) -> HeadLogits:
        """Rows of the batch and position dims (``x[a:b]``, ``x[:, -k:]``): the same head on those hidden rows."""
        key = key if isinstance(key, tuple) else (key,)
        if len(key) > 2 or any(k is Ellipsis or k is None for k in key):
            raise IndexError(f"HeadLogits indexes the batch and position dims only, got {key!r}")
        return dataclasses.replace(self, hidden=self.hidden[key])

    # ------------------------------------------------------------------------ the head itself (inside ``whole``)

    def rows(self, h: Tensor) -> Tensor:
        """The logits [c, vocab] of hidden rows ``h`` [c, H], in the model's dtype (as the model computes them)."""
        bias = None if self.bias is None else self.bias[:self.vocab]
        return F.linear(h.to(self.weight.dtype), self.weight[:self.vocab], bias)

    def columns(self, h: Tensor, columns: Tensor, dtype: torch.dtype) -> Tensor:
        """The logits of hidden rows ``h`` [Q, H] at ``columns`` [Q, k] (long) in ``dtype``: [Q, k]. Each row's k
        head rows are gathered a block of rows at a time; a read of most columns computes the whole rows."""
        Q, k = columns.shape
        out = torch.empty(Q, k, dtype=dtype, device=h.device)
        if 4 * k >= self.vocab:
            step = max(1, _GATHER_BUDGET // self.vocab)
            for q0 in range(0, Q, step):
                out[q0:q0 + step] = self.rows(h[q0:q0 + step]).gather(1, columns[q0:q0 + step]).to(dtype)
            return out
        step = max(1, _GATHER_BUDGET // max(1, k * h.shape[-1]))
        for q0 in range(0, Q, step):
            cols = columns[q0:q0 + step]
            z = torch.einsum("qh,qkh->qk", h[q0:q0 + step].to(dtype), self.weight[cols].to(dtype))
            out[q0:q0 + step] = z if self.bias is None else z + self.bias[cols].to(dtype)
        return out


def graph_zero(logits: Tensor | HeadLogits) -> Tensor:
    """A 0 that keeps the autograd graph of ``logits`` (a loss of weight 0 that backward still runs through)."""
    return (logits.hidden if isinstance(logits, HeadLogits) else logits).sum() * 0.0
