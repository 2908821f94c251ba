"""A teacher payload from an inference engine's top-K log-probabilities (e.g. vLLM's prompt log-probabilities).

An engine that scores a text returns, per answer row, the log-probabilities of its K most probable tokens and of
the gold token, never the whole distribution. :func:`compress_top_logprobs` builds from them the
:class:`~mlot.TeacherPayload` that :func:`mlot.compress_teacher` builds from full logits (paper mode):

* token ranking (``ranking: token``; ULD, KL): exact for ``top_k <= K``. Each row keeps its own top k columns,
  which the engine returned, in its order.
* the gold tokens' log-probabilities (the aligned-chunk term, per-sample teacher mixing): exact.
* sequence ranking: approximate. The column totals ``sum_t p_t(c)`` that choose a sequence's k columns need
  ``p_t(c)`` where row t did not return c. With ``u_t`` the K-th returned probability of row t (no unreturned token
  has more) and ``m_t = 1 - sum of the returned ones`` (the row's missing mass), an unreturned entry is served as
  the tail's mean ``f_t = min(u_t, m_t / (V - K))``, so

  - a payload entry is exact where its row returned its column, else within ``max(f_t, u_t - f_t) <= u_t``;
  - a column's total is within ``sum of u_t over the rows that did not return it <= sum_t u_t`` of the exact one;
  - rank i holds the exact column when it is *settled* (the lower bound of its total exceeds the upper bound of
    every column ranked below it, and its upper bound is below the lower bound of every column ranked above);
  - so the L1 error over the rows of rank i's column, ``D_i = sum_t |t_i(t) - t~_i(t)|``, is at most the sum of
    ``max(f_t, u_t - f_t)`` over its unreturned rows when settled, else ``hi_(i) + est_(i)`` (the i-th largest
    upper bound of a total plus the total served), and per sample ``|HAD - HAD~| <= sum_i D_i / n_pair``,
    ``|SL - SL~| <= sum_i D_i * max_t |log s_i(t)| / n_pair`` (n_pair: the paired rows, s: the student's ranked
    probabilities). :func:`sequence_ranking_error` computes the ``D_i``.

  A peaked teacher settles its top ranks (their totals dwarf ``sum_t u_t``); the others hold little mass, which
  bounds their error. SD's cost entries move by at most the rows' L1 error; its Sinkhorn plan has no such bound.

What needs the whole distribution, or its normaliser at another temperature than 1, cannot be built from the top K
(:func:`top_logprobs_problems`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from .config import MultiLevelOTConfig
from .payload import TeacherPayload


@dataclass
class TopLogprobs:
    """What an engine returned for B answers of up to T rows.

    Attributes:
        ids: [B, T, K] long, each row's K most probable token ids, most probable first (0 past the answer).
        logp: [B, T, K] float32, their log-probabilities at temperature 1 (-inf past the answer).
        gold: [B, T] float32, the log-probability of each row's gold token (0 past the answer).
        lengths: [B] long, answer rows per sample.
        vocab_size: V, the size of the vocabulary the log-probabilities are normalised over.
    """

    ids: Tensor
    logp: Tensor
    gold: Tensor
    lengths: Tensor
    vocab_size: int

    @classmethod
    def pad(cls, rows: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]], vocab_size: int) -> "TopLogprobs":
        """From each sample's (ids [T_b, K], log-probs [T_b, K], gold log-probs [T_b])."""
        width, k = max(len(g) for _, _, g in rows), rows[0][0].shape[1]
        ids = torch.zeros(len(rows), width, k, dtype=torch.long)
        logp = torch.full((len(rows), width, k), float("-inf"))
        gold = torch.zeros(len(rows), width)
        for b, (i, lp, g) in enumerate(rows):
            ids[b, :len(g)], logp[b, :len(g)], gold[b, :len(g)] = (torch.from_numpy(np.array(x)) for x in (i, lp, g))
        return cls(ids, logp, gold, torch.tensor([len(g) for _, _, g in rows]), vocab_size)

    @property
    def k(self) -> int:
        return self.ids.shape[-1]

    @property
    def mask(self) -> Tensor:
        """[B, T] True on answer rows."""
        return torch.arange(self.ids.shape[1])[None, :] < self.lengths[:, None]


def top_logprobs_problems(cfg: MultiLevelOTConfig) -> list[tuple[str, Any, str]]:
    """What of ``cfg`` a top-K payload cannot serve: (setting, value, why) each; [] when it can."""
    if cfg.mode == "reference":
        return [("mode", cfg.mode, "reference mode divides every logit row by its standard deviation over the "
                 "whole vocabulary and ranks columns over the batch: it needs full logits")]
    out: list[tuple[str, Any, str]] = []
    if cfg.top_k is None:
        out.append(("top_k", None, "keeping every column needs the whole distribution; set top_k"))
    if cfg.teacher_temperature != 1:
        out.append(("teacher_temperature", cfg.teacher_temperature, "log-probabilities at another temperature than "
                    "1 need the normaliser over the whole vocabulary at it, which the top K do not give"))
    if cfg.use_sd and cfg.sd_temperature != cfg.teacher_temperature:
        out.append(("sd_temperature", cfg.sd_temperature, "SD at its own temperature needs the normaliser over the "
                    "whole vocabulary at it (the tail's mass dominates it at tau > 1); set it to the teacher "
                    "temperature, or use_sd: false"))
    return out


def compress_top_logprobs(top: TopLogprobs, cfg: MultiLevelOTConfig) -> TeacherPayload:
    """The paper-mode payload of ``top`` for ``cfg`` (see the module docstring for what is exact).

    Returns a :class:`TeacherPayload` of [B, T, k] probabilities, as :func:`mlot.compress_teacher` does.
    """
    problems = top_logprobs_problems(cfg)
    k = min(cfg.top_k or top.vocab_size, top.vocab_size)
    if k > top.k and cfg.ranking == "token":
        problems.append(("top_k", cfg.top_k, f"the engine returned only {top.k} log-probabilities per row"))
    if problems:
        raise ValueError("; ".join(f"{name}={value!r}: {why}" for name, value, why in problems))
    mask = top.mask[..., None]
    if cfg.ranking == "token":
        probs, columns = top.logp[..., :k].exp() * mask, top.ids[..., :k] * mask
    else:
        tail = _Tail(top)
        columns = tail.order()[1][:, :k]
        probs = tail.at(columns)[0] * mask
    return TeacherPayload("paper", probs, None, columns.int(), top.lengths.clone(), cfg.teacher_settings())


def sequence_ranking_error(top: TopLogprobs, k: int) -> tuple[Tensor, Tensor]:
    """How far the sequence-ranked payload of ``top`` can be from the exact one, per rank.

    Returns:
        settled: [B, k] bool, rank i provably holds the exact payload's column.
        error: [B, k], a bound on ``D_i = sum_t |t_i(t) - t~_i(t)|`` over the sample's rows (module docstring).
    """
    tail = _Tail(top)
    est, order = tail.order()
    B, V = est.shape
    p = tail.p * top.mask[..., None]
    lo = torch.zeros(B, V).scatter_add_(1, top.ids.flatten(1), p.flatten(1))
    seen_u = torch.zeros(B, V).scatter_add_(1, top.ids.flatten(1), tail.u[..., None].expand_as(p).flatten(1))
    hi = lo + tail.u.sum(1, keepdim=True) - seen_u
    lo_r, hi_r = lo.gather(1, order), hi.gather(1, order)
    below = torch.cat([hi_r.flip(1).cummax(1).values.flip(1)[:, 1:], torch.full((B, 1), -1.0)], 1)
    above = torch.cat([torch.full((B, 1), float("inf")), lo_r.cummin(1).values[:, :-1]], 1)
    settled = ((lo_r > below) & (hi_r < above))[:, :k]
    _, hit = tail.at(order[:, :k])
    slack = torch.maximum(tail.f, tail.u - tail.f) * top.mask
    exact = ((~hit) * slack[..., None]).sum(1)
    loose = hi.topk(k, dim=1).values + est.gather(1, order[:, :k])
    return settled, torch.where(settled, exact, loose)


class _Tail:
    """Per answer row of ``top``: returned probabilities p [B, T, K], the K-th one u [B, T] and the unreturned
    entries' fill f [B, T] (0 past the answers)."""

    def __init__(self, top: TopLogprobs) -> None:
        self.top = top
        self.p = top.logp.exp()
        mask = top.mask
        self.u = self.p[..., -1] * mask
        missing = (1 - self.p.sum(-1)).clamp(min=0)
        self.f = torch.minimum(self.u, missing / max(top.vocab_size - top.k, 1)) * mask

    def order(self) -> tuple[Tensor, Tensor]:
        """Served column totals est [B, V] and the columns by them, descending [B, V] (stable: ties by id)."""
        B, T, K = self.p.shape
        est = self.f.sum(1, keepdim=True).expand(B, self.top.vocab_size).clone()
        known = (self.p - self.f[..., None]) * self.top.mask[..., None]
        est.scatter_add_(1, self.top.ids.flatten(1), known.flatten(1))
        return est, est.sort(dim=1, descending=True, stable=True).indices

    def at(self, columns: Tensor) -> tuple[Tensor, Tensor]:
        """Served probabilities of ``columns`` [B, k] at every row, [B, T, k], and where the row returned them."""
        ids, where = self.top.ids.sort(-1)
        cols = columns[:, None, :].expand(-1, ids.shape[1], -1).contiguous()
        pos = torch.searchsorted(ids, cols).clamp(max=ids.shape[-1] - 1)
        hit = ids.gather(-1, pos) == cols
        return torch.where(hit, self.p.gather(-1, where).gather(-1, pos), self.f[..., None]), hit
