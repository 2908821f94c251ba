"""Choosing and ordering vocabulary columns (the "ranking" and "top-k" steps of MultiLevelOT).

Teacher and student vocabularies differ, so columns are never matched by id: each side orders its
own columns by probability mass and the losses compare rank i with rank i.
"""

from __future__ import annotations

import torch
from torch import Tensor


def take_columns(x: Tensor, columns: Tensor) -> Tensor:
    """Gather columns of x [B, T, V]: ids [k] (batch), [B, k] (sequence) or [B, T, k] (token) -> [B, T, k]."""
    B, T, _ = x.shape
    columns = columns.long()
    if columns.dim() == 1:
        return x[..., columns]
    if columns.dim() == 2:
        return x.gather(-1, columns[:, None, :].expand(B, T, columns.shape[-1]))
    return x.gather(-1, columns)


def auction_assignment(cost: Tensor, eps: float | None = None, max_rounds: int = 100_000) -> Tensor:
    """Minimum-cost assignment of n rows to distinct columns among m >= n, batched (Bertsekas' auction).

    Every unassigned row bids for its best column at once (Jacobi auction); the optimum is reached to
    within ``n * eps`` of the exact linear assignment. No loop over the batch.

    Args:
        cost: [B, n, m], n <= m.
        eps: bid increment; default 1e-6 x the cost range / n (then the result is near-exact).

    Returns:
        assigned column per row, [B, n] (long).
    """
    B, n, m = cost.shape
    if n > m:
        raise ValueError(f"auction_assignment needs n <= m rows/columns, got n={n}, m={m}")
    value = -cost.detach().to(torch.float64)
    if eps is None:
        span = float((value.amax() - value.amin()).clamp(min=1e-12))
        eps = span * 1e-6 / n
    price = torch.zeros(B, m, dtype=value.dtype, device=value.device)
    owner = torch.full((B, m), -1, dtype=torch.long, device=value.device)
    assigned = torch.full((B, n), -1, dtype=torch.long, device=value.device)
    rows = torch.arange(n, device=value.device).expand(B, n)
    for _ in range(max_rounds):
        bidding = assigned < 0
        if not bool(bidding.any()):
            return assigned
        net = value - price[:, None, :]
        top = net.topk(2 if m > 1 else 1, dim=-1)
        best = top.indices[..., 0]
        second = top.values[..., 1] if m > 1 else top.values[..., 0] - 1.0
        bid = price.gather(1, best) + (top.values[..., 0] - second) + eps
        bid = torch.where(bidding, bid, torch.full_like(bid, -torch.inf))
        # Highest bid per column; ties go to the lowest row index.
        high = torch.full_like(price, -torch.inf).scatter_reduce(1, best, bid, reduce="amax")
        wins = bidding & (bid == high.gather(1, best))
        cand = torch.where(wins, rows, torch.full_like(rows, n))
        winner = torch.full_like(owner, n).scatter_reduce(1, best, cand, reduce="amin")
        won = winner < n
        # Previous owners of won columns lose them; winners take them at the new price.
        prev = torch.where(won, owner, torch.full_like(owner, -1))
        lost = torch.zeros(B, n + 1, dtype=torch.bool, device=value.device)
        lost.scatter_(1, torch.where(prev >= 0, prev, torch.full_like(prev, n)), True)
        assigned = torch.where(lost[:, :n], torch.full_like(assigned, -1), assigned)
        col_ids = torch.arange(m, device=value.device).expand(B, m)
        safe_winner = torch.where(won, winner, torch.full_like(winner, n))
        upd = torch.full((B, n + 1), -1, dtype=torch.long, device=value.device)
        upd.scatter_(1, safe_winner, torch.where(won, col_ids, torch.full_like(col_ids, -1)))
        assigned = torch.where(upd[:, :n] >= 0, upd[:, :n], assigned)
        owner = torch.where(won, winner, owner)
        price = torch.where(won, high, price)
    raise RuntimeError(f"auction_assignment did not converge in {max_rounds} rounds (eps={eps:g})")


def assignment_ranking(teacher_topk: Tensor, pool_probs: Tensor, pool: Tensor, pair_mask: Tensor) -> Tensor:
    """The paper's student order Q*: match the teacher's k ranked columns to student columns in L1.

    Each column is a T-vector (its probabilities over the paired answer positions). A linear
    assignment picks, for teacher rank i, the closest column of the student's candidate pool.

    Args:
        teacher_topk: [B, T, k] the teacher's ranked columns (padding rows zero).
        pool_probs: [B, T, C] the student's probabilities on its C >= k candidate columns.
        pool: [B, C] those candidates' vocabulary ids.
        pair_mask: [B, T] positions t < min(T_t, T_s) where both sides exist.

    Returns:
        student column ids [B, k], aligned with the teacher's ranks.
    """
    m = pair_mask[..., None].to(pool_probs.dtype)
    t_cols = (teacher_topk * m).transpose(1, 2)  # [B, k, T]
    s_cols = (pool_probs * m).transpose(1, 2)  # [B, C, T]
    cost = torch.cdist(t_cols.detach(), s_cols.detach(), p=1)  # [B, k, C]
    return pool.gather(1, auction_assignment(cost))
