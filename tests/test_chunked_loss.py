"""The student's losses read its logits chunk by chunk (``mlot.rows.AnswerRows``): equal to the unchunked path
(every read a full-vocabulary log-softmax through plain autograd) in value and gradient, for any chunk size, and
no [rows, V] tensor is saved or made on the way, the one gradient buffer aside."""

import contextlib

import pytest
import torch
from helpers import make_batch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import mlot
import mlot.chunks
import mlot.softmax
from mlot.identity import IdentityConfig, compress_identity, pad_bounds
from mlot.rows import AnswerRows, sharing
from mlot.vocab import VocabMap

VS, VT = 300, 200
S_LEN, T_LEN = [7, 3, 12], [5, 9, 11]
N_ROWS = sum(S_LEN)  # 22: no chunk size below tried divides it


class DenseRows(AnswerRows):
    """The unchunked path: every normaliser and read is a full-vocabulary (log-)softmax of its rows, and the
    gradient is plain autograd's through it."""

    def _scaled(self, rows: torch.Tensor | None, tau: float, subset: torch.Tensor | None) -> torch.Tensor:
        z = self.logits[self.sample, self.pos] if rows is None else self.logits[self.sample[rows], self.pos[rows]]
        z = z.to(self.dtype) / tau
        return z if subset is None else z.masked_fill(~subset, float("-inf"))

    def lse(self, tau=1.0, subset=None):
        with torch.no_grad():
            return self._scaled(None, tau, subset).logsumexp(-1)

    @torch.no_grad()
    def scan(self, temperatures, weights=None, top_k=None, subset=None):
        p = torch.softmax(self._scaled(None, temperatures[0], subset), -1)
        totals = None if weights is None else torch.zeros(self.logits.shape[0], p.shape[-1], dtype=p.dtype).index_add_(
            0, self.sample, p * weights[:, None])
        return totals, None if top_k is None else p.topk(top_k, dim=-1).indices

    def log_probs(self, rows, columns, temperatures=(1.0,), subset=None):
        return tuple(torch.log_softmax(self._scaled(rows, t, subset), -1).gather(-1, columns) for t in temperatures)


def _vocab_map(seed: int, vs: int) -> VocabMap:
    """A random teacher -> student class map: 40 classes of 1-3 student spellings; a random projection of the
    student vocabulary onto teacher classes (some student ids projected nowhere), a class per 8 student ids
    (real maps hold 1-12 ids per class at the 99th percentile: tests/test_identity.py's pairs)."""
    g = torch.Generator().manual_seed(seed)
    members = torch.full((40, 3), -1, dtype=torch.long)
    for c in range(40):
        m = int(torch.randint(1, 4, (1,), generator=g))
        members[c, :m] = torch.randint(0, vs, (m,), generator=g)
    shared = torch.zeros(vs, dtype=torch.bool)
    shared[members[members >= 0]] = True
    n = vs // 8
    student_target = torch.randint(-1, n, (vs,), generator=g)
    width = int(torch.bincount(student_target[student_target >= 0], minlength=n).max())
    target_members = torch.full((n, width), -1, dtype=torch.long)
    for c in range(n):
        ids = (student_target == c).nonzero().flatten()
        target_members[c, :len(ids)] = ids
    return VocabMap(torch.randint(-1, 40, (VT,), generator=g), members, shared, {},
                    torch.randint(-1, n, (VT,), generator=g), target_members, student_target)


def _bounds(lengths: list[int], seed: int) -> torch.Tensor:
    """Character bounds of answers whose tokens are 1-3 characters long (both sides share some, not all)."""
    g = torch.Generator().manual_seed(seed)
    return pad_bounds([[0] + torch.randint(1, 4, (n,), generator=g).cumsum(0).tolist() for n in lengths])


def _setup(method: str, params: dict, ident: IdentityConfig, dtype=torch.float32, teachers: int = 1, vs: int = VS):
    """An Objective, student logits and labels, and the payloads and vocabulary maps of ``teachers`` teachers."""
    m = mlot.get_method(method)
    logits, labels = make_batch(S_LEN, [4, 6, 2], vs, seed=1, dtype=dtype)
    payloads, vmaps = {}, {}
    for j in range(teachers if m.needs_teacher else 0):
        vt = vs if m.same_vocabulary else VT
        t, lt = make_batch(T_LEN, [3, 2, 5], vt, seed=10 + j, dtype=dtype)
        payloads[f"t{j}"] = p = mlot.compress_teacher(t, lt, config=m.payload_config("paper", params))
        vmaps[f"t{j}"] = vmap = _vocab_map(20 + j, vs)
        if ident.on:
            p.identity = compress_identity(t, lt, _bounds(T_LEN, 3), vmap, top_k=4, shared=ident.shared,
                                           projection_top_k=4 if ident.projection else 0)
            p.identity.student_bounds = _bounds(S_LEN, 3)
    return mlot.Objective(m, "paper", params, 0.7, ident), logits, labels, payloads, vmaps


def _reader(rows, x, labels):
    """The reader the objective shares: ``rows(x, labels)`` when given, else the objective's own."""
    return contextlib.nullcontext() if rows is None else sharing(rows(x, labels))


def _run(objective, logits, labels, payloads, vmaps, rows=None):
    """(loss, parts, gradient in the logits) of one objective call; ``rows``: the reader to use (the
    objective's own when None)."""
    x = logits.clone().requires_grad_()
    with _reader(rows, x, labels):
        loss, parts = objective(x, labels, payloads, vmaps)
    loss.backward()
    return loss.detach(), parts, x.grad


def _chunk_rows(monkeypatch, rows: int | None, vocab: int = VS) -> None:
    """Make a chunk ``rows`` answer rows (None: the budget's own, which holds all rows of these batches)."""
    if rows is not None:
        monkeypatch.setattr(mlot.softmax, "_CHUNK_BYTES", 4 * vocab * rows)


IDENT = IdentityConfig(shared_weight=0.5, chunk_weight=2.0, projection_weight=0.25)
CASES = {
    "ce": ("sft", {}, IdentityConfig()),
    "multilevel_ot sequence + identity": ("multilevel_ot", {"top_k": 8}, IDENT),
    "multilevel_ot token + identity": ("multilevel_ot", {"top_k": 8, "ranking": "token"}, IDENT),
    "multilevel_ot assignment, 3 temperatures": ("multilevel_ot", {"top_k": 6, "student_ranking": "assignment",
                                                                   "student_temperature": 1.5, "sd_temperature": 3.0},
                                                 IdentityConfig()),
    "uld + chunk term": ("uld", {}, IdentityConfig(chunk_weight=1.0)),
    "aligned: chunks + projection": ("aligned", {}, IdentityConfig(chunk_weight=1.0, projection_weight=3.0)),
    "kl": ("kl", {"top_k": 20}, IdentityConfig()),
    "kl over the whole vocabulary": ("kl", {"top_k": None}, IdentityConfig()),
}


@pytest.mark.parametrize("rows", [3, 7, None])
@pytest.mark.parametrize("case", list(CASES))
def test_objective_equals_the_unchunked_path_in_value_and_gradient(monkeypatch, case, rows):
    """fp32: loss, every logged part and the gradient within 1e-6 (relative, or absolute near 0) of the
    unchunked path, two teachers sharing the reader, for chunks that do not divide the 22 rows."""
    _chunk_rows(monkeypatch, rows)
    objective, logits, labels, payloads, vmaps = _setup(*CASES[case], teachers=2)
    chunk = AnswerRows(logits, labels).chunk
    assert chunk == rows if rows else chunk >= N_ROWS
    loss, parts, grad = _run(objective, logits, labels, payloads, vmaps)
    want_loss, want_parts, want_grad = _run(objective, logits, labels, payloads, vmaps, rows=DenseRows)
    assert grad.dtype == torch.float32 and float(grad.abs().max()) > 1e-3
    torch.testing.assert_close(loss, want_loss, rtol=1e-6, atol=1e-6)
    assert set(parts) == set(want_parts)
    for name in parts:
        torch.testing.assert_close(parts[name], want_parts[name], rtol=1e-6, atol=1e-6, msg=name)
    torch.testing.assert_close(grad, want_grad, rtol=1e-6, atol=1e-6)


def test_float64_agrees_to_rounding_and_full_vocabulary_uld_too(monkeypatch):
    """In fp64 the two paths agree to 1e-12; ULD over the whole vocabularies (top_k None, its sorted full
    distributions) reads through the same rows."""
    _chunk_rows(monkeypatch, 3)
    for case in ("multilevel_ot sequence + identity", "multilevel_ot token + identity"):
        setup = _setup(*CASES[case], dtype=torch.float64)
        got, want = _run(*setup), _run(*setup, rows=DenseRows)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    s, ls = make_batch(S_LEN, [4, 6, 2], VS, seed=1)
    t, lt = make_batch(T_LEN, [3, 2, 5], VT, seed=2)
    grads = []
    for rows in (AnswerRows, DenseRows):
        x = s.clone().requires_grad_()
        with sharing(rows(x, ls)):
            r = mlot.uld(x, ls, t, lt)
        r.distill.backward()
        grads.append((r.distill.detach(), x.grad))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-12, atol=1e-12)


def test_ce_is_torch_cross_entropy_on_any_label_pattern():
    """CE reads the rows that predict a label wherever they are: gaps, a label at position 0 (no row predicts it),
    a sample without labels; the logits a view that drops padded vocabulary columns (as the trainer's are).
    Loss and gradient match F.cross_entropy within 1e-6 in fp32."""
    logits = torch.randn(3, 9, 56, generator=torch.Generator().manual_seed(0)) * 3
    labels = torch.full((3, 9), -100)
    labels[0, [0, 2, 3, 6]] = torch.tensor([4, 8, 15, 16])
    labels[1, 1:] = torch.arange(8)
    x1, x2 = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    got = mlot.causal_lm_loss(x1[..., :50], labels)
    want = torch.nn.functional.cross_entropy(x2[:, :-1, :50].flatten(0, 1), labels[:, 1:].flatten())
    got.backward()
    want.backward()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-6, atol=1e-6)


def test_bf16_logits_get_a_bf16_gradient_close_to_the_unchunked_path():
    """bf16 logits: the loss in fp32 as before; the gradient lands in one bf16 buffer (each term's share rounded
    once, as autograd's per-term bf16 gradients are)."""
    setup = _setup(*CASES["multilevel_ot sequence + identity"], dtype=torch.bfloat16)
    (loss, _, grad), (want_loss, _, want_grad) = _run(*setup), _run(*setup, rows=DenseRows)
    assert loss.dtype == torch.float32 and grad.dtype == torch.bfloat16
    torch.testing.assert_close(loss, want_loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad.float(), want_grad.float(), rtol=0, atol=2e-2 * float(want_grad.abs().max()))


class _NewTensors(TorchDispatchMode):
    """Names of the ops (forward and backward) whose result is a new tensor of at least ``numel`` elements
    (not a view of, or in-place on, an input)."""

    def __init__(self, numel: int) -> None:
        super().__init__()
        self.numel, self.ops = numel, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        self.ops += [func.overloadpacket.__name__ for t in tree_leaves(out) if isinstance(t, torch.Tensor)
                     and t.numel() >= self.numel and t.untyped_storage().data_ptr() not in inputs]
        return out


@pytest.mark.parametrize("case", ["multilevel_ot sequence + identity", "multilevel_ot token + identity",
                                  "uld + chunk term", "aligned: chunks + projection"])
def test_no_rows_by_vocabulary_tensor_is_saved_or_made(monkeypatch, case):
    """With two teachers and both identity terms, the largest tensor autograd saves (the caller's logits aside) is
    far below rows x V, and the one full-size tensor the loss makes, forward and backward, is the logits'
    gradient. The unchunked path (planted) fails both."""
    vs = 2000  # rows x V = 44,000 values; the largest read is rows x 100 (ULD's top-k)
    _chunk_rows(monkeypatch, 5, vs)
    objective, logits, labels, payloads, vmaps = _setup(*CASES[case], teachers=2, vs=vs)
    full = N_ROWS * vs

    def measure(rows):
        x = logits.clone().requires_grad_()
        saved = []

        def pack(t):
            if t.untyped_storage().data_ptr() != x.untyped_storage().data_ptr():
                saved.append(t.numel())
            return t

        with _NewTensors(full) as made:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), _reader(rows, x, labels):
                loss, _ = objective(x, labels, payloads, vmaps)
            loss.backward()
        return max(saved), made.ops

    largest, made = measure(None)
    assert largest <= full // 4, largest
    assert made == ["zeros"], made  # the gradient buffer, once for all terms and teachers
    dense_largest, dense_made = measure(DenseRows)
    assert dense_largest >= full and len(dense_made) > 5


def _head(logits: torch.Tensor, hidden: int = 16, pad: int = 24, seed: int = 5):
    """An LM head for the batch of ``logits`` [B, L, V]: hidden states [B, L, H], a weight [V + pad, H] (padded
    embedding rows, never read) and a bias. The logits are ``hidden @ W[:V].T + b[:V]``, scaled to a few units."""
    g = torch.Generator().manual_seed(seed)
    B, L, V = logits.shape
    return (torch.randn(B, L, hidden, generator=g, dtype=logits.dtype),
            torch.randn(V + pad, hidden, generator=g, dtype=logits.dtype) * 0.7,
            torch.randn(V + pad, generator=g, dtype=logits.dtype))


def _run_head(objective, head, labels, payloads, vmaps, fused: bool, tied: bool):
    """(loss, parts, gradients of hidden, weight, bias) with the logits built by autograd (``fused`` False) or read
    from the head (:class:`mlot.HeadLogits`). ``tied``: the weight is the input embedding too (the hidden states
    are computed from its rows), so its gradient has two sources, as a tied LM head's has."""
    h0, w0, b0 = head
    w, b = w0.clone().requires_grad_(), b0.clone().requires_grad_()
    h_in = h0.clone().requires_grad_()
    hidden = h_in + 0.5 * w[:h0.shape[1]] if tied else h_in  # position p adds embedding row p
    V = w.shape[0] - 24
    logits = mlot.HeadLogits(hidden, w, b, vocab=V) if fused else torch.nn.functional.linear(hidden, w[:V], b[:V])
    loss, parts = objective(logits, labels, payloads, vmaps)
    loss.backward()
    return loss.detach(), parts, h_in.grad, w.grad, b.grad


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("case", list(CASES))
def test_the_lm_head_read_in_chunks_equals_its_built_logits(monkeypatch, case, tied):
    """Given the LM head instead of its logits (``mlot.HeadLogits``: no [rows, V] tensor is built), the loss,
    every part and the gradients of the hidden states, the weight (padded rows: 0; tied to the input embedding:
    both shares) and the bias equal autograd's through the built logits, within 1e-5 in fp32."""
    _chunk_rows(monkeypatch, 3)
    monkeypatch.setattr(mlot.chunks, "HEAD_CHUNK_ROWS", 1)
    objective, logits, labels, payloads, vmaps = _setup(*CASES[case], teachers=2)
    head = _head(logits)
    assert AnswerRows(mlot.HeadLogits(*head[:2], vocab=VS), labels).chunk == 3  # 22 rows in 8 chunks
    got = _run_head(objective, head, labels, payloads, vmaps, fused=True, tied=tied)
    want = _run_head(objective, head, labels, payloads, vmaps, fused=False, tied=tied)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    assert set(got[1]) == set(want[1])
    for name in got[1]:
        torch.testing.assert_close(got[1][name], want[1][name], rtol=1e-5, atol=1e-5, msg=name)
    for a, b, name in zip(got[2:], want[2:], ("hidden", "weight", "bias")):
        assert float(b.abs().max()) > 1e-3, name
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)
    assert not got[3][-24:].any() and not got[4][-24:].any()


def test_the_lm_head_makes_no_rows_by_vocabulary_tensor(monkeypatch):
    """Read from the head, the objective (two teachers, both identity terms) makes no tensor of rows x V elements
    at all, forward or backward: not the logits, not their gradient. Building the logits makes both."""
    vs = 2000
    _chunk_rows(monkeypatch, 5, vs)
    monkeypatch.setattr(mlot.chunks, "HEAD_CHUNK_ROWS", 1)
    objective, logits, labels, payloads, vmaps = _setup(*CASES["multilevel_ot sequence + identity"], teachers=2,
                                                        vs=vs)
    head = _head(logits)
    for fused, want in ((True, 0), (False, 2)):
        with _NewTensors(N_ROWS * vs) as made:
            _run_head(objective, head, labels, payloads, vmaps, fused=fused, tied=False)
        assert len(made.ops) >= want if want else made.ops == [], (fused, made.ops)


@pytest.mark.parametrize("backward", [True, False])
def test_the_logits_are_freed_with_the_graph_without_the_garbage_collector(backward):
    """Nothing the reader makes keeps the logits alive in a reference cycle: with the cyclic collector off, they go
    as soon as the caller drops the loss, after backward or without one (a skipped micro-batch's)."""
    import gc
    import weakref

    objective, logits, labels, payloads, vmaps = _setup(*CASES["multilevel_ot sequence + identity"], teachers=2)
    gc.collect()
    gc.disable()
    try:
        x = logits.clone().requires_grad_()
        loss, parts = objective(x, labels, payloads, vmaps)
        if backward:
            loss.backward()
        ref = weakref.ref(x)
        del x, loss, parts
        assert ref() is None
    finally:
        gc.enable()
