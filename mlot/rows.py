"""A model's answer rows, read chunk by chunk: the one way the losses touch [B, L, V] logits.

Of each answer row (row p of a sample when its label p + 1 is not ignored; N rows in all) a loss needs a few
numbers, never the whole distribution:

* normalisers ``lse = logsumexp(z / tau)``, computed without a graph: over the vocabulary (every row, once) or
  over a subset of it (the exact-match term's shared vocabulary, the projection's word starts: the rows it reads);
* log-probabilities ``z[c] / tau - lse`` at a few columns c per row, differentiable: the label (CE, the
  aligned-chunk term), the k ranked columns (MultiLevelOT, ULD, KL), a shared class's members;
* for the rankings, no-grad statistics: per-sample column totals, per-row top-k.

Plain autograd would cast and log-softmax whole [N, V] blocks and keep them for backward: at V = 152k and
16 x 256 rows, 2.5 GB per fp32 copy, several per term. :class:`AnswerRows` computes the numbers over chunks
of rows (an fp32 block of ~4 MB on a CPU, ~256 MB on a GPU: ``mlot.softmax._chunk``), keeps only them (and
the caller's logits, by reference) and in backward recomputes each chunk's softmax, once for all reads
(``mlot.chunks``): CE, a method's terms and the identity terms of every teacher cost one [B, L, V] gradient in
the logits' dtype, not one each summed pairwise. Given the LM head instead of logits (``mlot.head.HeadLogits``)
no [B, L, V] tensor exists at all: each chunk's logits are computed from its hidden rows, and backward hands
autograd the gradients of the hidden states and of the head.

As in Liger-Kernel's chunked losses the reader does the chunking and the bookkeeping and each loss states only
its math; unlike there, the math runs after the chunk loop, on the few numbers read (a ranking, Sinkhorn or a
chunk sum couples a sample's rows, so a loss is not a sum of per-chunk losses).

The losses find the reader with :func:`answer_rows`; :class:`mlot.Objective` makes one per micro-batch and
shares it (:func:`sharing`), so every term of the objective reads through it.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from typing import Iterator, Sequence

import torch
from torch import Tensor

from .chunks import RowSource, lse_rows, scaled
from .head import HeadLogits
from .spans import IGNORE_INDEX, compute_dtype


class AnswerRows:
    """The answer rows of ``logits`` [B, L, V] (any float dtype; computed in fp32, fp64 for fp64 input), or of the
    logits an LM head would compute (:class:`mlot.head.HeadLogits`, never built).

    Attributes:
        logits, labels: as given; labels [B, L] hold -100 outside the answers.
        sample, pos: [N] sample and position of each answer row (row-major); gold: [N] the label each predicts;
        row: [N] ``sample * L + pos``, its row in ``logits.flatten(0, 1)`` (a view: no copy of the logits).
        dtype: the compute dtype; chunk: rows per chunk.
    """

    def __init__(self, logits: Tensor | HeadLogits, labels: Tensor) -> None:
        if logits.dim() != 3 or labels.shape != logits.shape[:2]:
            raise ValueError(f"logits must be [batch, seq_len, vocab] and labels [batch, seq_len], got shapes "
                             f"{tuple(logits.shape)} and {tuple(labels.shape)}")
        self.logits, self.labels = logits, labels
        self.dtype = compute_dtype(logits)
        self.sample, self.pos = (labels[:, 1:] != IGNORE_INDEX).nonzero(as_tuple=True)
        self.gold = labels[self.sample, self.pos + 1]
        self.row = self.sample * labels.shape[1] + self.pos
        self._flat = torch.full(labels.shape, -1, dtype=torch.long, device=labels.device)
        self._flat[self.sample, self.pos] = torch.arange(len(self.sample), device=labels.device)
        self.src = RowSource(logits, self.row)  # the chunked passes, and the one backward of every read
        self._lse: dict[float, Tensor] = {}
        self._gold: dict[bool, Tensor] = {}
        self._token: Tensor | None = None

    @property
    def n(self) -> int:
        return len(self.sample)

    @property
    def chunk(self) -> int:
        """Rows per chunk."""
        return self.src.chunk

    # ------------------------------------------------------------------------ rows of a [B, W] layout

    def ids(self, index: Tensor, mask: Tensor) -> Tensor:
        """[Q] the answer rows at the positions ``index`` [B, W] (logit rows) where ``mask`` [B, W]."""
        sample = torch.arange(index.shape[0], device=index.device)[:, None].expand_as(index)
        ids = self._flat[sample[mask], index[mask]]
        if bool((ids < 0).any()):
            raise ValueError("a loss read a logit row that predicts no label (its labels and the reader's differ)")
        return ids

    def weights(self, index: Tensor, mask: Tensor) -> Tensor:
        """[N] 1 on the rows at ``index`` where ``mask``, 0 on the others (which rows a column total sums)."""
        w = torch.zeros(self.n, dtype=self.dtype, device=self.logits.device)
        w[self.ids(index, mask)] = 1.0
        return w

    def at(self, index: Tensor, mask: Tensor, values: Tensor) -> Tensor:
        """Per-row ``values`` [N, ...] laid out at positions ``index`` where ``mask``: [B, W, ...], 0 elsewhere."""
        return spread(values[self.ids(index, mask)], mask)

    def lse_at(self, index: Tensor, mask: Tensor, tau: float = 1.0) -> Tensor:
        """[B, W] ``logsumexp(z / tau)`` of the rows at ``index`` where ``mask``, 0 elsewhere (no gradient)."""
        return self.at(index, mask, self.lse(tau))

    def log_softmax_at(self, index: Tensor, mask: Tensor, columns: Tensor, temperatures: Sequence[float] = (1.0,),
                       subset: Tensor | None = None) -> tuple[Tensor, ...]:
        """``log_softmax(z / tau)`` at ``columns`` of the rows at ``index`` [B, W] where ``mask``, 0 elsewhere.

        Args:
            columns: [B, W, k] per position, or [B, k] one order per sample (long).
            subset: [V] bool, or None: the softmax over the subset's columns only.
        Returns one [B, W, k] tensor per temperature, differentiable in the logits.
        """
        cols = columns[:, None].expand(-1, mask.shape[1], -1) if columns.dim() == 2 else columns
        outs = self.log_probs(self.ids(index, mask), cols[mask].long(), temperatures, subset)
        return tuple(spread(o, mask) for o in outs)

    def gold_at(self, index: Tensor, mask: Tensor) -> Tensor:
        """[B, W] the log-probability of each row's label at the positions ``index`` where ``mask``, 0 elsewhere."""
        return spread(self.gold_log_probs()[self.ids(index, mask)], mask)

    # ------------------------------------------------------------------------ flat rows

    def gold_log_probs(self) -> Tensor:
        """[N] each row's log-probability of its label (temperature 1): read once, shared by CE and the
        aligned-chunk term."""
        graph = torch.is_grad_enabled()
        if graph not in self._gold:
            rows = torch.arange(self.n, device=self.logits.device)
            self._gold[graph] = self.log_probs(rows, self.gold[:, None])[0][:, 0]
        return self._gold[graph]

    def lse(self, tau: float = 1.0) -> Tensor:
        """[N] ``logsumexp(z / tau)`` of every row; no gradient."""
        if float(tau) not in self._lse:
            self.scan([tau])
        return self._lse[float(tau)]

    @torch.no_grad()
    def _subset_lse(self, rows: Tensor, tau: float, subset: Tensor) -> Tensor:
        """[Q] ``logsumexp(z / tau)`` over the ``subset`` [V] bool of the answer rows ``rows`` [Q] only: a term on a
        subset reads a few rows (aligned word starts), so it pays a pass over those, not over all N."""
        out = torch.empty(len(rows), dtype=self.dtype, device=self.logits.device)
        for r0, r1, z in self.src.chunks(rows):
            out[r0:r1] = lse_rows(scaled(z, tau, subset))[0]
        return out

    @torch.no_grad()
    def scan(self, temperatures: Sequence[float], weights: Tensor | None = None, top_k: int | None = None
             ) -> tuple[Tensor | None, Tensor | None]:
        """One pass over the rows: the normaliser of each temperature (kept for :meth:`lse`) and, at the first,
        the column totals ``sum_n weights[n] * softmax(z_n / tau)`` per sample [B, V] (when ``weights`` [N] is
        given) and each row's ``top_k`` most probable columns [N, k] (when given)."""
        V = self.logits.shape[-1]
        device = self.logits.device
        lse = [torch.empty(self.n, dtype=self.dtype, device=device) for _ in temperatures]
        totals = None if weights is None else torch.zeros(self.logits.shape[0], V, dtype=self.dtype, device=device)
        top = None if top_k is None else torch.empty(self.n, top_k, dtype=torch.long, device=device)
        for r0, r1, z in self.src.chunks(None):
            for j, tau in enumerate(temperatures):
                row_lse, log_p = lse_rows(scaled(z, tau, None))
                lse[j][r0:r1] = row_lse
                if j == 0 and (totals is not None or top is not None):
                    p = log_p.exp_()
                    if totals is not None:
                        totals.index_add_(0, self.sample[r0:r1], p * weights[r0:r1, None])
                    if top is not None:
                        top[r0:r1] = p.topk(top_k, dim=-1).indices
        for tau, x in zip(temperatures, lse):
            self._lse[float(tau)] = x
        return totals, top

    def log_probs(self, rows: Tensor, columns: Tensor, temperatures: Sequence[float] = (1.0,),
                  subset: Tensor | None = None) -> tuple[Tensor, ...]:
        """``log_softmax(z / tau)[columns]`` of answer rows ``rows`` [Q] (ids, repeats allowed) at ``columns``
        [Q, k] (long): one [Q, k] tensor per temperature, differentiable in the logits."""
        lse = [self.lse(tau)[rows] if subset is None else self._subset_lse(rows, tau, subset) for tau in temperatures]
        if self._token is None and torch.is_grad_enabled() and self.src.requires_grad:
            self._token = self.src.sink()
        return self.src.read(self._token, rows, columns, tuple(float(t) for t in temperatures), subset, lse)


def spread(values: Tensor, mask: Tensor) -> Tensor:
    """``values`` [Q, ...] (one per True of ``mask`` [B, W], row-major) as [B, W, ...], 0 elsewhere."""
    out = values.new_zeros(*mask.shape, *values.shape[1:])
    out[mask] = values
    return out


def check_rows_finite(lse: Tensor, mask: Tensor, name: str) -> None:
    """NaN or +Inf anywhere in a row makes its logsumexp non-finite: name the samples. lse, mask [B, W]."""
    bad = (~torch.isfinite(lse) & mask).any(1).nonzero().flatten().tolist()
    if bad:
        raise ValueError(f"{name}: non-finite values (NaN/Inf) in the answer logits of sample(s) {bad}")


# ---------------------------------------------------------------------------- sharing one reader


_SHARED: ContextVar[AnswerRows | None] = ContextVar("mlot_answer_rows", default=None)


def answer_rows(logits: Tensor, labels: Tensor) -> AnswerRows:
    """The reader of ``logits``' answer rows: the one shared (:func:`sharing`) for these very tensors, else a new
    one."""
    shared = _SHARED.get()
    if shared is not None and shared.logits is logits and shared.labels is labels:
        return shared
    return AnswerRows(logits, labels)


@contextmanager
def sharing(rows: AnswerRows) -> Iterator[AnswerRows]:
    """Inside, every loss on ``rows.logits`` and ``rows.labels`` reads through ``rows``: each normaliser is
    computed once, the label's log-probabilities are read once, and all reads share one gradient buffer."""
    token = _SHARED.set(rows)
    try:
        yield rows
    finally:
        _SHARED.reset(token)
