"""Softmax over a large vocabulary on answer rows, read at a few columns, without [B, T, V] temporaries.

The losses need ``log_softmax(z / tau)`` at k of V columns (k=50, V=50k) on the answer rows of a
[B, L, V] logits tensor, plus per-sequence column totals for the ranking. Plain autograd would build
the gathered rows, a dense softmax, a zero-filled gather gradient and a dense softmax backward, each
a fresh [B, T, V] buffer. Here everything dense runs over chunks of answer positions (a few MB, so
temporaries stay in cache and are recycled by the allocator; on a GPU, a few hundred MB, where one-row
chunks would mean thousands of kernel launches), and the backward writes straight into the one
gradient buffer the caller needs anyway:

    d/dz_v = sum_tau (g_tau,v [v kept] - p_tau,v * sum_i g_tau,i) / tau
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


@dataclass
class RowStats:
    """What one pass over the answer rows yields (no gradient).

    lse: per temperature, logsumexp(z / tau) [B, W]; non-finite where the row holds NaN/+Inf.
    totals: [B, V] sum over each sequence's answer rows of softmax(z / tau_0), or None.
    token_columns: [B, W, k] each row's k most probable ids at tau_0, or None.
    """

    lse: list[Tensor]
    totals: Tensor | None
    token_columns: Tensor | None


@torch.no_grad()
def answer_row_stats(logits: Tensor, index: Tensor, mask: Tensor, temperatures: list[float], dtype: torch.dtype,
                     totals: bool = False, token_k: int | None = None) -> RowStats:
    """Log-normalisers (and optionally ranking statistics) of the answer rows, chunk by chunk.

    Args:
        logits: [B, L, V]. index: [B, W] row of each answer position. mask: [B, W] real positions.
        temperatures: taus; ``totals`` and ``token_k`` use the first.
    """
    B, W = index.shape
    V = logits.shape[-1]
    lse = [torch.empty(B, W, dtype=dtype, device=logits.device) for _ in temperatures]
    tot = torch.zeros(B, V, dtype=dtype, device=logits.device) if totals else None
    tok = torch.empty(B, W, token_k, dtype=torch.long, device=logits.device) if token_k else None
    for t0, t1, z in _row_chunks(logits, index, dtype):
        for j, tau in enumerate(temperatures):
            zt = z if tau == 1 else z / tau
            top = zt.amax(-1, keepdim=True)
            e = (zt - top).exp_()
            s = e.sum(-1, keepdim=True)
            lse[j][:, t0:t1] = (top + s.log()).squeeze(-1)
            if j == 0 and (tot is not None or tok is not None):
                p = e.div_(s).mul_(mask[:, t0:t1, None])
                if tot is not None:
                    tot += p.sum(1)
                if tok is not None:
                    tok[:, t0:t1] = p.topk(token_k, dim=-1).indices
    return RowStats(lse, tot, tok)


def take_logits(logits: Tensor, index: Tensor, columns: Tensor, dtype: torch.dtype) -> Tensor:
    """logits[b, index[b, t], columns[b, t, i]] -> [B, W, k] (no [B, W, V] intermediate)."""
    b = torch.arange(logits.shape[0], device=logits.device)[:, None, None]
    return logits[b, index[:, :, None], columns].to(dtype)


class _AnswerLogSoftmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: Tensor, index: Tensor, mask: Tensor, columns: Tensor, temperatures: tuple[float, ...],
                lse: tuple[Tensor, ...], dtype: torch.dtype) -> tuple[Tensor, ...]:  # type: ignore[override]
        z_k = take_logits(logits, index, columns, dtype)
        ctx.save_for_backward(logits, index, mask, columns, *lse)
        ctx.temperatures, ctx.dtype = temperatures, dtype
        return tuple(z_k / tau - lse_t[..., None] for tau, lse_t in zip(temperatures, lse))

    @staticmethod
    def backward(ctx, *grads: Tensor):  # type: ignore[override]
        logits, index, mask, columns, *lse = ctx.saved_tensors
        grad = torch.zeros_like(logits)
        for t0, t1, z in _row_chunks(logits, index, ctx.dtype):
            acc = None
            for g, tau, lse_t in zip(grads, ctx.temperatures, lse):
                if g is None:
                    continue
                g = g[:, t0:t1] / tau
                e = (z / tau if tau != 1 else z) - lse_t[:, t0:t1, None]
                e = e.exp_().mul_(-g.sum(-1, keepdim=True))
                e.scatter_add_(-1, columns[:, t0:t1], g)
                acc = e if acc is None else acc.add_(e)
            if acc is None:
                continue
            acc.mul_(mask[:, t0:t1, None])  # padding positions repeat a real row: they must add nothing
            _add_rows(grad, index, t0, t1, acc)
        return grad, None, None, None, None, None, None


def answer_log_softmax(logits: Tensor, index: Tensor, mask: Tensor, columns: Tensor, temperatures: list[float],
                       lse: list[Tensor], dtype: torch.dtype) -> tuple[Tensor, ...]:
    """``log_softmax(logits[b, index[b, t]] / tau)[columns[b, t]]`` for each tau, differentiable in logits.

    Args:
        logits: [B, L, V]. index, mask: [B, W]. columns: [B, W, k] (long).
        lse: per tau, [B, W] from :func:`answer_row_stats`.

    Returns:
        one [B, W, k] tensor of log-probabilities per temperature.
    """
    return _AnswerLogSoftmax.apply(logits, index, mask, columns, tuple(temperatures), tuple(lse), dtype)


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
