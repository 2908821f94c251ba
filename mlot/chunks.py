"""The chunked passes under ``mlot.rows.AnswerRows``: a model's answer rows, a chunk of rows at a time, and the one
backward of every read.

:class:`RowSource` holds what a pass needs: the logits [B, L, V] (a chunk of consecutive rows is a view of them),
or the LM head they come from (``mlot.head.HeadLogits``: a chunk's logits are computed from its hidden rows). A
read (:class:`_Read`) returns ``z / tau - lse`` at a few columns per row; its backward only records the output
gradients. :class:`_Sink`, an input of every read, runs after all of them and turns every recorded gradient
into the source's in one pass over the rows, each chunk's softmax recomputed once per temperature and read:

    d/dz_v = sum_reads sum_tau (g_tau,v [v read] - p_tau,v * sum_c g_tau,c) / tau,   p = softmax of z / tau

The graph holds the source (not the reader), so nothing cycles back to the reader's caches: they go with it.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Iterator

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .head import HeadLogits
from .softmax import _chunk
from .spans import compute_dtype

#: fewest rows per chunk read from an LM head (a chunk of logits is then 155 MB in fp32 at V = 152k): fewer make
#: every chunk re-read and re-write the whole [V, H] weight gradient (1.3x the time at 64 rows on the CPU)
HEAD_CHUNK_ROWS = 256

#: what a read's backward records: its rows, columns, output gradients, temperatures and subset
Read = tuple[Tensor, Tensor, tuple[Tensor, ...], tuple[float, ...], "Tensor | None"]


class RowSource:
    """Rows ``row`` [N] of ``logits.flatten(0, 1)`` (the answer rows, in order), or of the logits an LM head would
    compute, read a chunk at a time in the compute dtype (fp32; fp64 for fp64 input)."""

    def __init__(self, logits: Tensor | HeadLogits, row: Tensor) -> None:
        self.logits, self.row, self.n = logits, row, len(row)
        self.head = logits if isinstance(logits, HeadLogits) else None
        self.dtype = compute_dtype(logits)
        self.chunk = _chunk(1, logits.shape[-1], logits.device)
        if self.head is not None:  # the head's matmuls run far below the machine's rate on a few rows at a time
            self.chunk = max(self.chunk, HEAD_CHUNK_ROWS)
        # the head's input on the answer rows: [N, H], small next to [N, V]; backward hands on its gradient
        self.hidden = None if self.head is None else self.head.hidden.detach().flatten(0, 1)[row]
        self.whole = nullcontext if self.head is None else self.head.whole
        self.reads: list[Read] = []

    @property
    def requires_grad(self) -> bool:
        return self.logits.requires_grad

    def spans(self, rows: Tensor | None) -> list[tuple[int, int, int | None]]:
        """Chunks (r0, r1, first) of the answer rows ``rows`` [Q] (ids; None: all N in order). Of logits, a run of
        consecutive rows is a view (``first``: its row in ``logits.flatten(0, 1)``, :func:`_segments`)."""
        if self.head is not None:
            q = self.n if rows is None else len(rows)
            return [(r0, min(q, r0 + self.chunk), None) for r0 in range(0, q, self.chunk)]
        return _segments(self.row if rows is None else self.row[rows], self.chunk)

    def block(self, rows: Tensor | None, r0: int, r1: int, first: int | None) -> Tensor:
        """z [r1 - r0, V]: the logits of ``rows[r0:r1]`` in the compute dtype (inside ``self.whole()``)."""
        ids = slice(r0, r1) if rows is None else rows[r0:r1]
        if self.head is not None:
            return self.head.rows(self.hidden[ids]).to(self.dtype)
        flat = self.logits.flatten(0, 1)
        z = flat[first:first + r1 - r0] if first is not None else flat.index_select(0, self.row[ids])
        return z.to(self.dtype)

    def chunks(self, rows: Tensor | None) -> Iterator[tuple[int, int, Tensor]]:
        """Yield (r0, r1, z) of every chunk of :meth:`spans`; the head's weight whole throughout."""
        with self.whole():
            for r0, r1, first in self.spans(rows):
                yield r0, r1, self.block(rows, r0, r1, first)

    def columns(self, rows: Tensor, columns: Tensor) -> Tensor:
        """[Q, k] the logits of answer rows ``rows`` [Q] at ``columns`` [Q, k], in the compute dtype."""
        if self.head is None:
            return self.logits.flatten(0, 1)[self.row[rows][:, None], columns].to(self.dtype)
        with self.whole():
            return self.head.columns(self.hidden[rows], columns, self.dtype)

    def sink(self) -> Tensor:
        """The token every read takes as an input (:class:`_Sink`)."""
        return _Sink.apply(self.logits if self.head is None else self.head.hidden, self)

    def read(self, token: Tensor | None, rows: Tensor, columns: Tensor, temperatures: tuple[float, ...],
             subset: Tensor | None, lse: list[Tensor]) -> tuple[Tensor, ...]:
        """``z / tau - lse`` of ``rows`` [Q] at ``columns`` [Q, k] per temperature, differentiable (``token``: the
        sink's, None without a graph)."""
        return _Read.apply(token, self, rows, columns, temperatures, subset, *lse)

    @torch.no_grad()
    def backward(self) -> Tensor:
        """The gradient of the source (the logits, or the head's hidden states; the head's weight and bias get
        theirs here) from every recorded read, a chunk of rows at a time."""
        reads, self.reads = self.reads, []
        spans = self.spans(None)
        starts = torch.tensor([r0 for r0, _, _ in spans] + [self.n], device=self.row.device)
        plans = [_Plan(read[0], starts, self.n) for read in reads]
        with self.whole():
            out = _Delivery(self)
            for i, (r0, r1, first) in enumerate(spans):
                if not any(plan.touches(i) for plan in plans):
                    continue
                z = self.block(None, r0, r1, first)
                d = torch.zeros_like(z)
                for (_, columns, grads, temperatures, subset), plan in zip(reads, plans):
                    entries, local = plan.at(i, r0, r1)
                    if entries is None:
                        continue
                    acc = _softmax_grad(z if local is None else z[local], columns[entries],
                                        [g[entries] for g in grads], temperatures, subset)
                    if local is None:
                        d.add_(acc)
                    else:  # a read's rows may repeat (the exact-match term's): index_add_ sums them
                        d.index_add_(0, local, acc)
                out.add(r0, r1, first, d)
            return out.finish()


class _Plan:
    """Which entries of one read fall in each chunk of rows: the read's rows [Q] sorted once, cut at the chunks'
    starts [S + 1] (one device sync). A read of every row in order (CE's, the rankings') takes chunks whole."""

    def __init__(self, rows: Tensor, starts: Tensor, n: int) -> None:
        self.full = len(rows) == n and bool((rows == torch.arange(n, device=rows.device)).all())
        self.order = rows.argsort(stable=True)
        self.sorted = rows[self.order]
        self.cut = torch.searchsorted(self.sorted, starts).tolist()

    def touches(self, i: int) -> bool:
        return self.cut[i + 1] > self.cut[i]

    def at(self, i: int, r0: int, r1: int) -> tuple[Any, Tensor | None]:
        """(entries, local rows) of chunk i: entries of the read's [Q] outputs, and the chunk row of each (None:
        all of the chunk's rows in order); (None, None) when the read has none there."""
        if self.full:
            return slice(r0, r1), None
        lo, hi = self.cut[i], self.cut[i + 1]
        if lo == hi:
            return None, None
        return self.order[lo:hi], self.sorted[lo:hi] - r0


class _Delivery:
    """Where backward's per-chunk gradients d [c, V] (compute dtype) go. Of logits: one [B, L, V] buffer in their
    dtype. Of a head: the hidden rows' d @ W (in the weight's dtype, as the head's own backward), and the weight's
    d.T @ h and the bias's sum(d), added up in the compute dtype and handed to autograd once, inside ``whole``
    (under ZeRO-3 the hooks that reduce a gradient run where the weight is gathered)."""

    def __init__(self, src: RowSource) -> None:
        self.src, head = src, src.head
        if head is None:
            logits = src.logits
            self.grad = torch.zeros(logits.shape, dtype=logits.dtype, device=logits.device).view(-1, logits.shape[-1])
            return
        self.w = head.weight[:head.vocab]
        self.grad = torch.zeros(src.n, head.hidden.shape[-1], dtype=src.dtype, device=head.device)
        self.g_w = torch.zeros(head.weight.shape, dtype=src.dtype, device=head.device) \
            if head.weight.requires_grad else None
        self.g_b = torch.zeros(head.bias.shape, dtype=src.dtype, device=head.device) \
            if head.bias is not None and head.bias.requires_grad else None

    def add(self, r0: int, r1: int, first: int | None, d: Tensor) -> None:
        src = self.src
        if src.head is None:
            if first is None:
                self.grad.index_add_(0, src.row[r0:r1], d.to(self.grad.dtype))
            else:
                self.grad[first:first + r1 - r0] += d.to(self.grad.dtype)
            return
        vocab = src.head.vocab
        self.grad[r0:r1] = torch.mm(d.to(self.w.dtype), self.w).to(self.grad.dtype)
        if self.g_w is not None:
            self.g_w[:vocab].addmm_(d.T, src.hidden[r0:r1].to(d.dtype))
        if self.g_b is not None:
            self.g_b[:vocab] += d.sum(0)

    def finish(self) -> Tensor:
        src, head = self.src, self.src.head
        if head is None:
            return self.grad.view(src.logits.shape)
        leaves = [(t, g.to(t.dtype)) for t, g in ((head.weight, self.g_w), (head.bias, self.g_b)) if g is not None]
        if leaves:
            torch.autograd.backward([t for t, _ in leaves], [g for _, g in leaves])
        hidden = head.hidden
        grad = torch.zeros(hidden.shape, dtype=hidden.dtype, device=hidden.device)
        grad.view(-1, hidden.shape[-1]).index_copy_(0, src.row, self.grad.to(hidden.dtype))
        return grad


def _softmax_grad(z: Tensor, columns: Tensor, grads: list[Tensor], temperatures: tuple[float, ...],
                  subset: Tensor | None) -> Tensor:
    """d [c, V] of rows z [c, V] from the gradients [c, k] of their ``log_softmax(z / tau)`` at ``columns``."""
    acc = None
    for g, tau in zip(grads, temperatures):
        p = torch.softmax(scaled(z, tau, subset), -1)
        d = p.mul_(-g.sum(-1, keepdim=True)).scatter_add_(-1, columns, g)
        d = d if tau == 1 else d.div_(tau)
        acc = d if acc is None else acc.add_(d)
    return acc


def _segments(row: Tensor, chunk: int) -> list[tuple[int, int, int | None]]:
    """Chunks (r0, r1, first) of ``row`` [Q] (rows of ``logits.flatten(0, 1)``), at most ``chunk`` rows each.
    Where rows r0..r1 are consecutive (an answer, left to right), ``first`` is the first: the chunk is a view of
    the logits, no copy; runs shorter than a quarter chunk are gathered together (``first`` None)."""
    rows = row.tolist()  # one device sync per pass
    runs = [0] + [i for i in range(1, len(rows)) if rows[i] != rows[i - 1] + 1] + [len(rows)]
    out: list[tuple[int, int, int | None]] = []
    gathered = 0  # start of the pending short runs

    def flush(upto: int) -> None:
        out.extend((r0, min(upto, r0 + chunk), None) for r0 in range(gathered, upto, chunk))

    for a, b in zip(runs[:-1], runs[1:]):
        if b - a >= max(1, chunk // 4):
            flush(a)
            out.extend((r0, min(b, r0 + chunk), rows[r0]) for r0 in range(a, b, chunk))
            gathered = b
    flush(len(rows))
    return out


def scaled(z: Tensor, tau: float, subset: Tensor | None) -> Tensor:
    """z / tau, -inf off the subset."""
    zt = z if tau == 1 else z / tau
    return zt if subset is None else zt.masked_fill(~subset, float("-inf"))


def lse_rows(zt: Tensor) -> tuple[Tensor, Tensor]:
    """Of rows zt [c, V]: their logsumexp [c] and log-softmax [c, V]. One fused log-softmax kernel, read at each
    row's max: log_softmax(zt)[argmax] = -log(sum exp(zt - max)) exactly, so lse = max - that."""
    log_p = torch.log_softmax(zt, -1)
    top, at = zt.max(-1, keepdim=True)
    return (top - log_p.gather(-1, at)).squeeze(-1), log_p


class _Sink(torch.autograd.Function):
    """The logits (or the head's hidden states) -> a scalar every read takes as an input. Autograd runs a node only
    after everything that reads its output, so this backward runs after every read's: one pass for all of them."""

    @staticmethod
    def forward(ctx, source: Tensor, src: RowSource) -> Tensor:  # type: ignore[override]
        ctx.src = src
        return source.new_zeros(())

    @staticmethod
    @once_differentiable
    def backward(ctx, _: Tensor):  # type: ignore[override]
        return ctx.src.backward(), None


class _Read(torch.autograd.Function):
    """Answer rows ``rows`` [Q] at ``columns`` [Q, k], per temperature ``z / tau - lse``. Backward only records the
    output gradients with the source; the sink's backward turns them all into the source's gradient at once."""

    @staticmethod
    def forward(ctx, token: Tensor | None, src: RowSource, rows: Tensor, columns: Tensor,
                temperatures: tuple[float, ...], subset: Tensor | None, *lse: Tensor
                ) -> tuple[Tensor, ...]:  # type: ignore[override]
        z = src.columns(rows, columns)
        ctx.save_for_backward(rows, columns, subset)
        ctx.src, ctx.temperatures = src, temperatures
        return tuple(z / tau - x[:, None] for tau, x in zip(temperatures, lse))

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads: Tensor):  # type: ignore[override]
        rows, columns, subset = ctx.saved_tensors
        ctx.src.reads.append((rows, columns, grads, ctx.temperatures, subset))
        return (None,) * (6 + len(ctx.temperatures))
