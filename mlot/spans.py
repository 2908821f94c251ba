"""Locating answer spans and gathering their logit rows.

Causal LMs predict token p+1 from position p, so the logit rows that score an answer start one
position before its first label: ``start = first_label_index - 1``, ``length = number of labels``.
Everything downstream works on these rows only, never on the prompt.
"""

from __future__ import annotations

import torch
from torch import Tensor

IGNORE_INDEX = -100


def answer_spans(
    labels: Tensor, *, ignore_index: int = IGNORE_INDEX, drop_last: bool = False, name: str = "labels"
) -> tuple[Tensor, Tensor]:
    """Find each sample's answer span in causal-shifted logit coordinates.

    Args:
        labels: [B, L] token ids inside the answer, ``ignore_index`` elsewhere (prompt, padding).
            Left- and right-padded batches both work; the answer must be one contiguous run.
        drop_last: drop the final answer row (the released code drops the student's final EOS).
        name: how error messages call this tensor.

    Returns:
        start [B] (long) and length [B] (long): logit rows ``start .. start+length-1`` predict the answer.
    """
    if labels.dim() != 2:
        raise ValueError(f"{name} must be [batch, seq_len], got shape {tuple(labels.shape)}")
    mask = labels != ignore_index
    length = mask.sum(1)
    L = labels.shape[1]
    first = mask.int().argmax(1)
    last = (L - 1) - mask.flip(1).int().argmax(1)
    empty = (length == 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(
            f"{name}: sample(s) {empty} have no answer token (every label is {ignore_index}); "
            "drop these rows or check the prompt/answer templates and max length"
        )
    gaps = (last - first + 1 != length).nonzero().flatten().tolist()
    if gaps:
        raise ValueError(f"{name}: sample(s) {gaps} have a non-contiguous answer; mlot expects one answer span per row")
    at_zero = (first == 0).nonzero().flatten().tolist()
    if at_zero:
        raise ValueError(
            f"{name}: sample(s) {at_zero} label position 0, which no logit row predicts; "
            "the answer must follow at least one prompt token (e.g. BOS)"
        )
    if drop_last:
        length = length - 1
    return first - 1, length


def gather_rows(logits: Tensor, start: Tensor, length: Tensor, width: int) -> tuple[Tensor, Tensor]:
    """Left-align each sample's answer rows into a fresh [B, width, V] tensor.

    Rows past a sample's length repeat its first answer row (always a real, checked row, so no
    garbage from padding positions can leak in); callers mask them with the returned mask, on small
    tensors, which is cheaper than zeroing [B, width, V].

    Args:
        logits: [B, L, V].
        start, length: [B] from :func:`answer_spans`.
        width: number of rows to return (>= max length).

    Returns:
        rows [B, width, V] (same dtype as ``logits``) and mask [B, width] (True on answer rows).
    """
    B, L, V = logits.shape
    index, mask = row_index(start, length, width, L)
    return logits.gather(1, index[..., None].expand(B, width, V)), mask


def row_index(start: Tensor, length: Tensor, width: int, seq_len: int) -> tuple[Tensor, Tensor]:
    """Logit row of each answer position: index [B, width] and mask [B, width] (True on answer rows).

    Positions past a sample's length point at its first answer row (a real, checked row).
    """
    pos = torch.arange(width, device=start.device)
    mask = pos[None, :] < length[:, None]
    index = torch.where(mask, start[:, None] + pos[None, :], start[:, None]).clamp(0, seq_len - 1)
    return index, mask


def compute_dtype(x: Tensor) -> torch.dtype:
    """fp64 stays fp64 (parity tests); everything else (bf16, fp16, fp32) is computed in fp32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def check_finite(rows: Tensor, mask: Tensor, name: str) -> None:
    """Raise a ValueError naming the samples whose answer rows hold NaN or Inf.  rows [B, T, V], mask [B, T]."""
    # A row sum is finite iff every entry is (logits are far from fp32's overflow): one read, no [B,T,V] mask.
    with torch.no_grad():
        bad_rows = ~torch.isfinite(
            rows.sum(-1, dtype=torch.float64 if rows.dtype == torch.float64 else torch.float32)) & mask
    bad = bad_rows.any(1).nonzero().flatten().tolist()
    if bad:
        raise ValueError(f"{name}: non-finite values (NaN/Inf) in the answer logits of sample(s) {bad}")
