"""Entropic optimal transport, batched.

``sinkhorn_log`` is the method's Sinkhorn (log domain, any regularisation); ``sinkhorn_plain`` is
the released code's multiplicative form, kept only for the ``reference`` mode's exact arithmetic.
Both are differentiated by unrolling their iterations, as the released code is.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Stand-in for log(0) on absent points: finite, so no -inf - -inf = NaN can reach the gradients,
# and still so negative that exp() of it is exactly 0 in fp32 and fp64.
_LOG_ZERO = -1.0e5


def sinkhorn_log(
    cost: Tensor,
    log_a: Tensor,
    log_b: Tensor,
    reg: float,
    n_iters: int,
    tol: float | None = None,
) -> Tensor:
    """Entropic OT plan between two discrete measures, computed in the log domain.

    Solves ``min_P <P, C> - reg * H(P)`` s.t. ``P 1 = a``, ``P^T 1 = b`` with ``n_iters`` alternating
    row/column scalings (each a logsumexp), so small ``reg`` (0.01) neither under- nor overflows.

    Args:
        cost: [B, n, m] cost matrices.
        log_a: [B, n] log row marginals; ``-inf`` marks an absent point (a padding row).
        log_b: [B, m] log column marginals; ``-inf`` marks an absent point.
        reg: entropic regularisation lambda > 0.
        n_iters: maximum number of (row, column) scaling pairs.
        tol: if set, stop early once every row marginal is within ``tol`` (L1 per sample) of ``a``.

    Returns:
        plan P [B, n, m]; rows/columns of absent points are exactly zero.
    """
    if reg <= 0:
        raise ValueError(f"sinkhorn reg (lambda) must be > 0, got {reg}")
    row_ok = torch.isfinite(log_a)
    col_ok = torch.isfinite(log_b)
    pair_ok = row_ok[:, :, None] & col_ok[:, None, :]
    log_k = torch.where(pair_ok, -cost / reg, torch.full_like(cost, _LOG_ZERO))
    log_a = torch.where(row_ok, log_a, torch.full_like(log_a, _LOG_ZERO))
    log_b = torch.where(col_ok, log_b, torch.full_like(log_b, _LOG_ZERO))
    u = torch.zeros_like(log_a)
    v = torch.zeros_like(log_b)
    for _ in range(n_iters):
        u = log_a - torch.logsumexp(log_k + v[:, None, :], dim=2)
        v = log_b - torch.logsumexp(log_k + u[:, :, None], dim=1)
        if tol is not None:
            # After the column step the column marginals are exact; the rows tell convergence.
            row_err = (torch.logsumexp(log_k + u[:, :, None] + v[:, None, :], dim=2).exp() - log_a.exp()).abs().sum(1)
            if bool((row_err < tol).all()):
                break
    return torch.exp(log_k + u[:, :, None] + v[:, None, :])


def uniform_log_marginal(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """log(1/n) on the n valid points of each row of ``mask`` [B, n], -inf elsewhere. Returns [B, n]."""
    n = mask.sum(1, keepdim=True).clamp(min=1).to(dtype)
    return torch.where(mask, -torch.log(n), torch.full(mask.shape, -torch.inf, dtype=dtype, device=mask.device))


def sinkhorn_plain(cost: Tensor, reg: float, n_iters: int) -> Tensor:
    """The released code's Sinkhorn: ``P = exp(-C/reg)``, then ``n_iters`` x (row-normalise, column-normalise).

    No log domain and no epsilon, exactly as released (it underflows for small ``reg``; use
    :func:`sinkhorn_log` for anything but parity). cost [B, n, m] -> plan [B, n, m] of mass m.
    """
    plan = torch.exp(-cost / reg)
    for _ in range(n_iters):
        plan = plan / plan.sum(-1, keepdim=True)
        plan = plan / plan.sum(-2, keepdim=True)
    return plan
