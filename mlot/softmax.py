"""Log-softmax over a large vocabulary, read only at a few columns, with a one-pass backward.

The losses need ``log_softmax(z / tau)`` at k of V columns per row (k=50, V=50k). Through plain
autograd that costs a [B, T, V] log-softmax output, a [B, T, V] zero-filled gather gradient and a
log-softmax backward. Here the forward keeps only the row log-normaliser, and the backward writes
the dense gradient in one go:  d/dz_v = (g_v [v kept] - p_v * sum_i g_i) / tau.
"""

from __future__ import annotations

import torch
from torch import Tensor


# On CPU, a fresh [B, T, V] buffer costs as much as the arithmetic on it (page faults), so these
# helpers allocate as few as they can and otherwise work in place.


def softmax_and_normaliser(z: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """softmax(z / tau) (a fresh tensor) and its row log-normaliser, without a gradient.

    z [B, T, V] -> probabilities [B, T, V] and logsumexp(z / tau) [B, T]. The normaliser comes for
    free: the largest probability is exactly exp(max - lse).
    """
    with torch.no_grad():
        p = torch.softmax(z if temperature == 1 else z / temperature, -1)
        lse = z.amax(-1) / temperature - torch.log(p.amax(-1))
        return p, lse


def row_log_normaliser(z: Tensor, temperature: float, scratch: Tensor | None = None) -> Tensor:
    """logsumexp(z / tau) over the last dim, without a gradient: z [B, T, V] -> [B, T].

    ``scratch`` (a [B, T, V] tensor whose values are no longer needed) is reused instead of allocating.
    """
    with torch.no_grad():
        buf = z.clone() if scratch is None else scratch.copy_(z)
        if temperature != 1:
            buf.div_(temperature)
        top = buf.amax(-1, keepdim=True)
        return (top + buf.sub_(top).exp_().sum(-1, keepdim=True).log_()).squeeze(-1)


def softmax_from_normaliser(z: Tensor, temperature: float, lse: Tensor) -> Tensor:
    """exp(z / tau - lse) as a fresh tensor (no gradient): [B, T, V]."""
    with torch.no_grad():
        scaled = z / temperature if temperature != 1 else z.clone()
        return scaled.sub_(lse[..., None]).exp_()


class _GatheredLogSoftmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z: Tensor, columns: Tensor, temperature: float, lse: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(z, columns, lse)
        ctx.temperature = temperature
        return z.gather(-1, columns) / temperature - lse[..., None]

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        z, columns, lse = ctx.saved_tensors
        tau = ctx.temperature
        dz = softmax_from_normaliser(z, tau, lse)
        dz.mul_(grad.sum(-1, keepdim=True).neg_().div_(tau))
        dz.scatter_add_(-1, columns, grad / tau)
        return dz, None, None, None


def gathered_log_softmax(z: Tensor, columns: Tensor, temperature: float, lse: Tensor | None = None) -> Tensor:
    """``log_softmax(z / tau).gather(-1, columns)``, differentiable in z, without a dense intermediate.

    Args:
        z: [B, T, V] logits.
        columns: [B, T, k] (long) vocabulary ids to read.
        lse: [B, T] from :func:`row_log_normaliser` if already computed.

    Returns:
        [B, T, k] log-probabilities.
    """
    if lse is None:
        lse = row_log_normaliser(z, temperature)
    return _GatheredLogSoftmax.apply(z, columns, temperature, lse)
