"""Identity-aware cross-tokenizer terms (``mlot.identity``): the vocabulary map on real tokenizer pairs, the
identities that tie each term to a known quantity, and gradients by gradcheck in float64."""

import pytest
import torch

from mlot.baselines import kl_distill
from mlot.identity import (
    VocabMap,
    char_bounds,
    chunk_likelihood,
    compress_identity,
    pad_bounds,
    shared_vocab_kl,
    vocab_map,
)
from workers.models import load_tokenizer


@pytest.fixture(scope="module")
def toks():
    return {n: load_tokenizer(f"builtin:{n}") for n in ("wordpiece", "sentencepiece", "tekken")}


def ids_of(tok, text):
    return tok(" " + text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]


def test_vocab_map_on_real_pairs_matches_equal_strings_and_reports_coverage(toks):
    wp, sp, tk = toks["wordpiece"], toks["sentencepiece"], toks["tekken"]
    m = vocab_map(sp, wp)
    cls = lambda tok, t: int(m.teacher_class[tok.convert_tokens_to_ids(t)])  # noqa: E731
    members = lambda c: set(m.student_members[c].tolist()) - {-1}  # noqa: E731
    # a word start matches a word start, a continuation a continuation; case folds (BERT is uncased)
    assert members(cls(sp, "▁wild")) == {wp.convert_tokens_to_ids("wild")}
    assert members(cls(sp, "berries")) == {wp.convert_tokens_to_ids("##berries")}
    assert cls(sp, "▁Wild") == cls(sp, "▁wild")
    assert members(cls(sp, "</s>")) == {wp.eos_token_id}
    assert cls(sp, "<0x41>") == -1  # byte fallback has no string
    # coverage measured on these vocabularies (SentencePiece v1 32,000; BERT uncased 30,522; Tekken 131,072)
    assert m.coverage == pytest.approx({"teacher": 0.491, "student": 0.390, "classes": 11913}, abs=1e-3)
    assert vocab_map(tk, wp).coverage == pytest.approx({"teacher": 0.210, "student": 0.651, "classes": 19861},
                                                       abs=1e-3)
    assert vocab_map(tk, sp).coverage == pytest.approx({"teacher": 0.187, "student": 0.767, "classes": 24535},
                                                       abs=1e-3)
    same = vocab_map(wp, wp)
    assert torch.equal(same.teacher_class, torch.arange(len(wp))) and bool(same.student_shared.all())


def test_char_bounds_agree_across_tokenizers_at_shared_boundaries(toks):
    got = {n: char_bounds(t, ids_of(t, "wild blackberries")) for n, t in toks.items()}
    assert got["wordpiece"] == got["sentencepiece"] == got["tekken"] == [0, 4, 9, 16, 17]  # EOS: one virtual char
    assert char_bounds(toks["sentencepiece"], ids_of(toks["sentencepiece"], "beech nuts")) == [0, 2, 5, 9, 10]
    assert pad_bounds([[0, 2, 5], [0, 4]]).tolist() == [[0, 2, 5], [0, 4, 4]]


def _batch(V, lengths, prompt=2, seed=0, dtype=torch.float64):
    """Random logits [B, L, V] and labels with answers of the given lengths, left-padded."""
    g = torch.Generator().manual_seed(seed)
    L = prompt + max(lengths)
    logits = torch.randn(len(lengths), L, V, generator=g, dtype=dtype) * 2
    labels = torch.full((len(lengths), L), -100)
    for b, n in enumerate(lengths):
        labels[b, L - n:] = torch.randint(0, V, (n,), generator=g)
    return logits, labels


def test_identical_tokenizers_make_the_exact_match_term_the_plain_kl():
    V = 11
    s_logits, labels = _batch(V, [4, 3], seed=1)
    t_logits, _ = _batch(V, [4, 3], seed=2)
    vmap = VocabMap(torch.arange(V), torch.arange(V)[:, None], torch.ones(V, dtype=torch.bool), {})
    bounds = pad_bounds([[0, 1, 3, 4, 6], [0, 2, 3, 5]])
    payload = compress_identity(t_logits, labels, bounds, vmap, top_k=None)
    got = shared_vocab_kl(s_logits, labels, bounds, payload, vmap)
    want = kl_distill(s_logits, labels, t_logits, labels)
    assert float(got.distill) == pytest.approx(float(want.distill), abs=1e-12)
    assert got.aligned.tolist() == [4, 3]


def test_a_one_chunk_answer_compares_the_two_sequence_log_probabilities():
    """Teacher and student split "abcdefg" at no common inner character: one chunk, whose log-probabilities
    are each model's sequence log-probability, compared by the binary KL."""
    Vt, Vs = 7, 5
    t_logits, t_labels = _batch(Vt, [3], seed=3)
    s_logits, s_labels = _batch(Vs, [2], seed=4)
    vmap = VocabMap(torch.full((Vt,), -1), torch.zeros(1, 1, dtype=torch.long), torch.zeros(Vs, dtype=torch.bool), {})
    payload = compress_identity(t_logits, t_labels, pad_bounds([[0, 3, 5, 7]]), vmap)
    r = chunk_likelihood(s_logits, s_labels, pad_bounds([[0, 4, 7]]), payload)

    def seq_logp(logits, labels):
        logp = torch.log_softmax(logits[0, :-1], -1)
        return sum(float(logp[i, t]) for i, t in enumerate(labels[0, 1:].tolist()) if t != -100)

    lt, ls = seq_logp(t_logits, t_labels), seq_logp(s_logits, s_labels)
    assert r.chunks.tolist() == [1]
    assert float(r.teacher_chunk_logp[0, 0]) == pytest.approx(lt, abs=1e-12)
    assert float(r.student_chunk_logp[0, 0]) == pytest.approx(ls, abs=1e-12)
    p, q = torch.tensor(lt, dtype=torch.float64).exp(), torch.tensor(ls, dtype=torch.float64).exp()
    want = p * (p / q).log() + (1 - p) * ((1 - p) / (1 - q)).log()
    assert float(r.distill) == pytest.approx(float(want), rel=1e-9)


def test_chunks_split_where_both_tokenizations_have_a_boundary():
    Vt, Vs = 6, 6
    t_logits, t_labels = _batch(Vt, [4], seed=5)
    s_logits, s_labels = _batch(Vs, [3], seed=6)
    vmap = VocabMap(torch.full((Vt,), -1), torch.zeros(1, 1, dtype=torch.long), torch.zeros(Vs, dtype=torch.bool), {})
    # teacher |ab|c|de|<eos>|, student |abc|de|<eos>|: common 0, 3, 5, 6 -> chunks "abc", "de", eos
    payload = compress_identity(t_logits, t_labels, pad_bounds([[0, 2, 3, 5, 6]]), vmap)
    r = chunk_likelihood(s_logits, s_labels, pad_bounds([[0, 3, 5, 6]]), payload)
    t_tok = payload.token_logp[0]
    assert r.chunks.tolist() == [3]
    assert r.teacher_chunk_logp[0, :3].tolist() == pytest.approx(
        [float(t_tok[0] + t_tok[1]), float(t_tok[2]), float(t_tok[3])], abs=1e-12)


def _toy_pair(seeds):
    """A 6-token teacher and a 5-token student vocabulary, two answers each, with their bounds. Classes: teacher
    0,1 -> student 0; teacher 2 -> student 1 and 2 (two spellings); teacher 3 -> student 3."""
    t_logits, t_labels = _batch(6, [3, 2], seed=seeds[0])
    s_logits, s_labels = _batch(5, [3, 3], seed=seeds[1])
    vmap = VocabMap(torch.tensor([0, 0, 1, 2, -1, -1]), torch.tensor([[0, -1], [1, 2], [3, -1]]),
                    torch.tensor([True, True, True, True, False]), {})
    t_bounds, s_bounds = pad_bounds([[0, 2, 3, 4], [0, 1, 3]]), pad_bounds([[0, 1, 3, 4], [0, 1, 2, 3]])
    return t_logits, t_labels, s_logits, s_labels, vmap, t_bounds, s_bounds


def test_gradients_by_gradcheck_in_float64():
    t_logits, t_labels, s_logits, s_labels, vmap, t_bounds, s_bounds = _toy_pair(seeds=(7, 8))
    payload = compress_identity(t_logits, t_labels, t_bounds, vmap, top_k=2)
    x = s_logits.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda z: shared_vocab_kl(z, s_labels, s_bounds, payload, vmap).distill, (x,))
    assert torch.autograd.gradcheck(lambda z: chunk_likelihood(z, s_labels, s_bounds, payload).distill, (x,))


def test_identity_terms_are_the_weighted_sum_and_travel_with_the_payload():
    """``identity_terms`` = shared_weight * shared_vocab_kl + chunk_weight * chunk_likelihood (what training adds to
    a method's loss), and the identity payload survives the teacher payload's wire format and batch selection."""
    import mlot
    from mlot.identity import IdentityConfig, identity_terms
    t_logits, t_labels, s_logits, s_labels, vmap, t_bounds, s_bounds = _toy_pair(seeds=(9, 10))
    ident = compress_identity(t_logits, t_labels, t_bounds, vmap, top_k=2)
    ident.student_bounds = s_bounds
    got = identity_terms(s_logits, s_labels, ident, vmap, IdentityConfig(shared_weight=0.5, chunk_weight=2.0))
    shared = shared_vocab_kl(s_logits, s_labels, s_bounds, ident, vmap)
    chunks = chunk_likelihood(s_logits, s_labels, s_bounds, ident)
    assert float(got.loss) == pytest.approx(0.5 * float(shared.distill) + 2.0 * float(chunks.distill), abs=1e-12)
    assert torch.equal(got.shared_kl, shared.shared_kl) and torch.equal(got.chunk_kl, chunks.chunk_kl)
    only_chunks = identity_terms(s_logits, s_labels, ident, None, IdentityConfig(chunk_weight=1.0))
    assert set(only_chunks.terms) == {"chunk_kl", "chunks"}
    with pytest.raises(ValueError, match="student_bounds"):
        identity_terms(s_logits, s_labels, compress_identity(t_logits, t_labels, t_bounds, None), None,
                       IdentityConfig(chunk_weight=1.0))

    payload = mlot.compress_teacher(t_logits, t_labels)
    payload.identity = ident
    back = mlot.TeacherPayload.from_numpy(payload.to_numpy()).index_select(torch.tensor([1]))
    for name, t in ident.tensors().items():
        assert torch.equal(back.identity.tensors()[name], t[1:]), name
    assert payload.nbytes() > mlot.compress_teacher(t_logits, t_labels).nbytes()
