"""Sinkhorn: marginals, agreement with exact OT, the released form, and the auction assignment."""

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment, linprog

from mlot.ot import sinkhorn_log, sinkhorn_plain, uniform_log_marginal
from mlot.ranking import auction_assignment


def _uniform(n: int, m: int, B: int = 1):
    return (torch.full((B, n), -np.log(n), dtype=torch.float64), torch.full((B, m), -np.log(m), dtype=torch.float64))


def test_marginals_converge():
    torch.manual_seed(0)
    C = torch.rand(3, 6, 9, dtype=torch.float64)
    la, lb = _uniform(6, 9, 3)
    P = sinkhorn_log(C, la, lb, reg=0.05, n_iters=500)
    torch.testing.assert_close(P.sum(2), la.exp(), atol=1e-10, rtol=0)
    torch.testing.assert_close(P.sum(1), lb.exp(), atol=1e-10, rtol=0)
    assert float(P.sum()) == pytest.approx(3.0)


def test_small_reg_agrees_with_linear_program():
    """lambda -> 0: <P, C> approaches the exact OT cost of a 4x5 problem solved as a linear program."""
    rng = np.random.default_rng(3)
    C = rng.random((4, 5))
    a, b = np.full(4, 1 / 4), np.full(5, 1 / 5)
    A_eq = np.vstack([np.kron(np.eye(4), np.ones(5)), np.kron(np.ones(4), np.eye(5))])
    exact = linprog(C.ravel(), A_eq=A_eq, b_eq=np.concatenate([a, b]), bounds=(0, None)).fun
    la, lb = _uniform(4, 5)
    P = sinkhorn_log(torch.tensor(C)[None], la, lb, reg=1e-3, n_iters=5000)
    approx = float((P * torch.tensor(C)).sum())
    assert approx == pytest.approx(exact, abs=5e-3)
    assert approx >= exact - 1e-9  # the entropic plan is feasible, so it cannot beat the optimum


def test_tiny_reg_has_no_nan_where_plain_underflows():
    C = torch.rand(1, 7, 5, dtype=torch.float64) * 2
    la, lb = _uniform(7, 5)
    P = sinkhorn_log(C.float(), la.float(), lb.float(), reg=0.01, n_iters=20)
    assert torch.isfinite(P).all()
    assert torch.isnan(sinkhorn_plain(C.float() * 100, reg=0.01, n_iters=3)).any()  # why log domain is the default


def test_log_domain_equals_released_iteration_on_square_problems():
    """Same iterations, same plan: plain (rows, then columns, to mass 1 each) is n x the uniform-marginal plan."""
    torch.manual_seed(1)
    C = torch.rand(2, 6, 6, dtype=torch.float64)
    la, lb = _uniform(6, 6, 2)
    for iters in (1, 3, 10):
        torch.testing.assert_close(sinkhorn_plain(C, 0.1, iters) / 6, sinkhorn_log(C, la, lb, 0.1, iters))


def test_absent_points_get_no_mass_and_no_nan_gradient():
    C = torch.rand(2, 4, 5, dtype=torch.float64, requires_grad=True)
    rows = torch.tensor([[True, True, True, False], [True, False, False, False]])
    cols = torch.tensor([[True, True, False, False, False], [True, True, True, True, True]])
    P = sinkhorn_log(C, uniform_log_marginal(rows, C.dtype), uniform_log_marginal(cols, C.dtype), 0.1, 50)
    assert float(P[0, 3].detach().abs().sum()) == 0 and float(P[0, :, 2:].detach().abs().sum()) == 0
    torch.testing.assert_close(P.sum((1, 2)), torch.ones(2, dtype=torch.float64))
    (P * C).sum().backward()
    assert torch.isfinite(C.grad).all()


def test_tolerance_stops_early():
    C = torch.rand(1, 5, 5, dtype=torch.float64)
    la, lb = _uniform(5, 5)
    loose = sinkhorn_log(C, la, lb, 1.0, 1000, tol=1e-3)
    tight = sinkhorn_log(C, la, lb, 1.0, 1000)
    assert (loose.sum(2) - la.exp()).abs().sum() < 1e-3
    assert not torch.equal(loose, tight)


@pytest.mark.parametrize("n,m", [(4, 4), (5, 9), (12, 30)])
def test_auction_matches_hungarian(n, m):
    torch.manual_seed(n * m)
    cost = torch.rand(4, n, m, dtype=torch.float64)
    got = auction_assignment(cost)
    for b in range(4):
        assert len(set(got[b].tolist())) == n  # distinct columns
        r, c = linear_sum_assignment(cost[b].numpy())
        best = cost[b].numpy()[r, c].sum()
        assert float(cost[b].gather(1, got[b][:, None]).sum()) == pytest.approx(best, abs=1e-4)


def test_auction_with_ties_terminates():
    cost = torch.zeros(2, 5, 7, dtype=torch.float64)
    got = auction_assignment(cost)
    assert all(len(set(row.tolist())) == 5 for row in got)
