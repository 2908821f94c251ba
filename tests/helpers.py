"""Small builders for loss tests: random logits with answer spans at chosen places."""

from __future__ import annotations

import torch


def make_batch(lengths: list[int], prompt: list[int], vocab: int, *, seq_len: int | None = None, left_pad: bool = False,
               seed: int = 0, dtype: torch.dtype = torch.float64, scale: float = 3.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits [B, L, V] and labels [B, L] with answer i of length lengths[i] after prompt[i] tokens."""
    g = torch.Generator().manual_seed(seed)
    L = seq_len or max(p + n for p, n in zip(prompt, lengths)) + 2
    logits = (torch.randn(len(lengths), L, vocab, generator=g, dtype=torch.float64) * scale).to(dtype)
    labels = torch.full((len(lengths), L), -100, dtype=torch.long)
    for b, (n, p) in enumerate(zip(lengths, prompt)):
        first = (L - n) if left_pad else p
        labels[b, first:first + n] = torch.randint(0, vocab, (n,), generator=g)
    return logits, labels
