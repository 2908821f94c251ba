"""Softmax over a large vocabulary on answer rows without [B, T, V] temporaries: the chunk budget, and the
released code's arithmetic (reference mode).

Paper mode and every other loss read rows through ``mlot.rows.AnswerRows``, which chunks with :func:`_chunk`.
Reference mode keeps its own passes here: a per-row temperature (the std of the row) makes its softmax
backward differ from the plain one. Everything dense runs over chunks of answer positions (a few MB, so
temporaries stay in cache and are recycled by the allocator; on a GPU, a few hundred MB, where one-row
chunks would mean thousands of kernel launches), and the backward writes straight into the one gradient
buffer the caller needs anyway.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

_CHUNK_BYTES = 4 << 20          # CPU: a block that stays in cache
_CHUNK_BYTES_GPU = 256 << 20    # GPU: few, large kernels; still a small fraction of the device's memory


def _chunk(batch: int, vocab: int, device: torch.device) -> int:
    """Answer positions per chunk so that one [B, c, V] fp32 block is about 4 MB (CPU) or 256 MB (GPU)."""
    budget = _CHUNK_BYTES_GPU if device.type == "cuda" else _CHUNK_BYTES
    return max(1, budget // (4 * batch * vocab))


def _row_chunks(logits: Tensor, index: Tensor, dtype: torch.dtype):
    """Yield (t0, t1, rows [B, t1-t0, V]): the answer rows of logits [B, L, V], a chunk of positions at a time,
    in the compute dtype. A loop over positions, never over the batch."""
    B, W = index.shape
    c = _chunk(B, logits.shape[-1], logits.device)
    for t0 in range(0, W, c):
        t1 = min(W, t0 + c)
        yield t0, t1, logits.gather(1, index[:, t0:t1, None].expand(-1, -1, logits.shape[-1])).to(dtype)


def _add_rows(grad: Tensor, index: Tensor, t0: int, t1: int, values: Tensor) -> None:
    """grad [B, L, V] += values [B, t1-t0, V] at the answer rows of positions t0..t1."""
    grad.scatter_add_(1, index[:, t0:t1, None].expand(-1, -1, grad.shape[-1]), values.to(grad.dtype))


def take_logits(logits: Tensor, index: Tensor, columns: Tensor, dtype: torch.dtype) -> Tensor:
    """logits[b, index[b, t], columns[b, t, i]] -> [B, W, k] (no [B, W, V] intermediate)."""
    b = torch.arange(logits.shape[0], device=logits.device)[:, None, None]
    return logits[b, index[:, :, None], columns].to(dtype)


# ---------------------------------------------------------------------------- reference mode


@dataclass
class ReferenceStats:
    """Per answer row of the released arithmetic (no gradient): mean, sigma = std + 1e-4, and
    lse = logsumexp(z / sigma), each [B, W]; totals [V]: softmax(z / sigma) summed over the batch's rows."""

    mean: Tensor
    sigma: Tensor
    lse: Tensor
    totals: Tensor


@torch.no_grad()
def reference_row_stats(logits: Tensor, index: Tensor, mask: Tensor, dtype: torch.dtype) -> ReferenceStats:
    """The released per-row temperature (unbiased std over the vocabulary, no centring, + 1e-4), chunked."""
    B, W = index.shape
    V = logits.shape[-1]
    mean, sigma, lse = (torch.empty(B, W, dtype=dtype, device=logits.device) for _ in range(3))
    totals = torch.zeros(V, dtype=dtype, device=logits.device)
    for t0, t1, z in _row_chunks(logits, index, dtype):
        mean[:, t0:t1] = z.mean(-1)
        s = z.std(-1, keepdim=True) + 1e-4
        sigma[:, t0:t1] = s.squeeze(-1)
        y = z / s
        top = y.amax(-1, keepdim=True)
        e = y.sub_(top).exp_()
        total = e.sum(-1, keepdim=True)
        lse[:, t0:t1] = (top + total.log()).squeeze(-1)
        totals += e.div_(total).mul_(mask[:, t0:t1, None]).sum((0, 1))
    return ReferenceStats(mean, sigma, lse, totals)


class _ReferenceProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: Tensor, index: Tensor, mask: Tensor, columns: Tensor, stats: ReferenceStats,
                dtype: torch.dtype) -> Tensor:  # type: ignore[override]
        cols = columns.expand(index.shape[0], index.shape[1], -1)
        z_k = take_logits(logits, index, cols, dtype)
        ctx.save_for_backward(logits, index, mask, columns, stats.mean, stats.sigma, stats.lse)
        ctx.dtype = dtype
        return torch.exp(z_k / stats.sigma[..., None] - stats.lse[..., None]) * mask[..., None]

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        # p = softmax(y), y = z / sigma, sigma = std(z) + 1e-4. With G the output gradient scattered
        # onto the kept columns:  dL/dy = p * (G - <G, p>),  dL/dsigma = -<dL/dy, z> / sigma^2,
        # dL/dz = dL/dy / sigma + dL/dsigma * (z - mean) / ((V - 1) std).
        logits, index, mask, columns, mean, sigma, lse = ctx.saved_tensors
        B, V = index.shape[0], logits.shape[-1]
        grad = torch.zeros_like(logits)
        for t0, t1, z in _row_chunks(logits, index, ctx.dtype):
            sg = sigma[:, t0:t1, None]
            p = (z / sg).sub_(lse[:, t0:t1, None]).exp_()
            cols = columns.expand(B, t1 - t0, -1)
            gp = grad_out[:, t0:t1] * mask[:, t0:t1, None] * p.gather(-1, cols)
            dy = p.mul_(-gp.sum(-1, keepdim=True)).scatter_add_(-1, cols, gp)
            d_sigma = -(dy * z).sum(-1, keepdim=True) / sg.square()
            std = (sg - 1e-4).clamp_min(torch.finfo(z.dtype).tiny)
            dz = dy.div_(sg).add_(z.sub_(mean[:, t0:t1, None]).mul_(d_sigma / ((V - 1) * std)))
            _add_rows(grad, index, t0, t1, dz.mul_(mask[:, t0:t1, None]))
        return grad, None, None, None, None, None


def reference_probs(logits: Tensor, index: Tensor, mask: Tensor, columns: Tensor, stats: ReferenceStats,
                    dtype: torch.dtype) -> Tensor:
    """softmax(z / (std(z) + 1e-4)) of the answer rows at the batch's kept ``columns`` [k]: [B, W, k],
    zero on padding rows; differentiable in ``logits`` (chunked backward, no [B, W, V] graph)."""
    return _ReferenceProbs.apply(logits, index, mask, columns, stats, dtype)
