"""Identity-aware cross-tokenizer terms (``mlot.identity``): the vocabulary map on real tokenizer pairs, the
identities that tie each term to a known quantity, and gradients by gradcheck in float64."""

import pytest
import torch

from mlot.baselines import kl_distill
from mlot.identity import (
    char_bounds,
    chunk_likelihood,
    compress_identity,
    pad_bounds,
    projection_kl,
    shared_vocab_kl,
)
from mlot.vocab import VocabMap, vocab_map
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
    # the projection: each student token to the teacher class that spells its beginning; a digit-splitting
    # teacher writes " 1984" as a bare space piece, then "1": the student's whole number goes to "1"
    target = lambda tok, t: int(m.teacher_target[tok.convert_tokens_to_ids(t)])  # noqa: E731
    sent = lambda w: {int(c) for c in (m.target_members == wp.convert_tokens_to_ids(w)).any(1).nonzero()}  # noqa: E731
    assert sent("freshwater") == {target(sp, "▁fresh")} == {target(sp, "▁Fresh")}
    assert sent("marsh") == {target(sp, "▁mar")}  # the teacher's own encoding of " marsh": "▁mar|sh"
    assert sent("wild") == {target(sp, "▁wild")} and sent("##berries") == {target(sp, "berries")}
    assert sent("1984") == sent("120") == {target(sp, "1")} and sent("365") == {target(sp, "3")}
    assert sent("[unused7]") == set()  # reserved entries have no string
    assert m.eos_target == target(sp, "</s>") == sent("[SEP]").pop() >= 0  # the end: the term skips it
    # coverage measured on these vocabularies (SentencePiece v1 32,000; BERT uncased 30,522; Tekken 131,072)
    assert m.coverage == pytest.approx({"teacher": 0.491, "student": 0.390, "classes": 11913, "projected": 0.956,
                                        "targets": 12415}, abs=1e-3)
    assert vocab_map(tk, wp).coverage == pytest.approx({"teacher": 0.210, "student": 0.651, "classes": 19861,
                                                        "projected": 0.938, "targets": 18922}, abs=1e-3)
    assert vocab_map(tk, sp).coverage == pytest.approx({"teacher": 0.187, "student": 0.767, "classes": 24535,
                                                        "projected": 0.867, "targets": 25680}, abs=1e-3)
    same = vocab_map(wp, wp)
    assert torch.equal(same.teacher_class, torch.arange(len(wp))) and bool(same.student_shared.all())
    assert torch.equal(same.teacher_target, torch.arange(len(wp)))


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
    # ... and the projection with every class kept: the same plain KL (each token is its own class, no rest)
    ids = torch.arange(V)
    pmap = VocabMap(ids, ids[:, None], torch.ones(V, dtype=torch.bool), {}, ids, ids[:, None], ids)
    payload = compress_identity(t_logits, labels, bounds, pmap, projection_top_k=V, shared=False)
    got = projection_kl(s_logits, labels, bounds, payload, pmap)
    assert float(got.distill) == pytest.approx(float(want.distill), abs=1e-12)
    assert got.projected.tolist() == [4, 3]


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
    0,1 -> student 0; teacher 2 -> student 1 and 2 (two spellings); teacher 3 -> student 3. Projection: student
    0 and 4 -> teacher 0, 1 (one class), student 1, 2 -> teacher 2, student 3 -> teacher 3, 5 (one class)."""
    t_logits, t_labels = _batch(6, [3, 2], seed=seeds[0])
    s_logits, s_labels = _batch(5, [3, 3], seed=seeds[1])
    vmap = VocabMap(torch.tensor([0, 0, 1, 2, -1, -1]), torch.tensor([[0, -1], [1, 2], [3, -1]]),
                    torch.tensor([True, True, True, True, False]), {}, torch.tensor([0, 0, 1, 2, -1, 2]),
                    torch.tensor([[0, 4], [1, 2], [3, -1]]), torch.tensor([0, 1, 1, 2, 0]))
    t_bounds, s_bounds = pad_bounds([[0, 2, 3, 4], [0, 1, 3]]), pad_bounds([[0, 1, 3, 4], [0, 1, 2, 3]])
    return t_logits, t_labels, s_logits, s_labels, vmap, t_bounds, s_bounds


def test_gradients_by_gradcheck_in_float64():
    t_logits, t_labels, s_logits, s_labels, vmap, t_bounds, s_bounds = _toy_pair(seeds=(7, 8))
    payload = compress_identity(t_logits, t_labels, t_bounds, vmap, top_k=2, projection_top_k=2)
    x = s_logits.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda z: shared_vocab_kl(z, s_labels, s_bounds, payload, vmap).distill, (x,))
    assert torch.autograd.gradcheck(lambda z: chunk_likelihood(z, s_labels, s_bounds, payload).distill, (x,))
    assert torch.autograd.gradcheck(lambda z: projection_kl(z, s_labels, s_bounds, payload, vmap).distill, (x,))


def test_identity_terms_are_the_weighted_sum_and_travel_with_the_payload():
    """``identity_terms`` = shared_weight * shared_vocab_kl + chunk_weight * chunk_likelihood (what training adds to
    a method's loss), and the identity payload survives the teacher payload's wire format and batch selection."""
    import mlot
    from mlot.identity import IdentityConfig, identity_terms
    t_logits, t_labels, s_logits, s_labels, vmap, t_bounds, s_bounds = _toy_pair(seeds=(9, 10))
    ident = compress_identity(t_logits, t_labels, t_bounds, vmap, top_k=2, projection_top_k=2)
    ident.student_bounds = s_bounds
    got = identity_terms(s_logits, s_labels, ident, vmap,
                         IdentityConfig(shared_weight=0.5, chunk_weight=2.0, projection_weight=0.25))
    shared = shared_vocab_kl(s_logits, s_labels, s_bounds, ident, vmap)
    chunks = chunk_likelihood(s_logits, s_labels, s_bounds, ident)
    projected = projection_kl(s_logits, s_labels, s_bounds, ident, vmap)
    assert float(got.loss) == pytest.approx(0.5 * float(shared.distill) + 2.0 * float(chunks.distill)
                                            + 0.25 * float(projected.distill), abs=1e-12)
    assert torch.equal(got.shared_kl, shared.shared_kl) and torch.equal(got.chunk_kl, chunks.chunk_kl)
    assert torch.equal(got.projection_kl, projected.projection_kl)
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


def test_projection_kl_is_the_kl_of_the_pushed_forward_distributions_on_a_worked_case():
    """One answer: the teacher writes a zero-width space piece, then two tokens ("|_|ab|cd|" with bounds
    0, 0, 2, 4), the student two ("|ab|cd|"). Student token 0 starts where teacher tokens 0 and 1 do: it is
    compared with token 1 (the space piece is not the teacher's choice of text); student 1 with teacher 2.
    Per position, the teacher's class probabilities (top k kept, the rest one event) against the student's
    pushed forward, Q_c = sum of q over the student tokens sent to c, by the textbook KL. At position 1 the
    student's gold token (1, statically sent to class 1) is counted in the teacher's gold class (2) instead,
    which leaves class 1 without members: it joins the rest."""
    V_t, V_s = 5, 6
    g = torch.Generator().manual_seed(11)
    t_logits, s_logits = torch.randn(1, 4, V_t, generator=g, dtype=torch.float64), torch.randn(
        1, 3, V_s, generator=g, dtype=torch.float64)
    t_labels, s_labels = torch.tensor([[-100, 4, 0, 3]]), torch.tensor([[-100, 3, 1]])
    # teacher ids 0, 1 one class, 2 and 3 their own, 4 none; student 0, 3 -> class 0, 1 -> 1, 2, 4 -> 2, 5 -> none
    vmap = VocabMap(torch.full((V_t,), -1), torch.zeros(1, 1, dtype=torch.long), torch.zeros(V_s, dtype=torch.bool),
                    {}, torch.tensor([0, 0, 1, 2, -1]), torch.tensor([[0, 3], [1, -1], [2, 4]]),
                    torch.tensor([0, 1, 2, 0, 2, -1]))
    t_bounds, s_bounds = pad_bounds([[0, 0, 2, 4]]), pad_bounds([[0, 2, 4]])
    t_p, s_q = torch.softmax(t_logits[0, :3], -1), torch.softmax(s_logits[0, :2], -1)
    teacher_groups = ([0, 1], [2], [3])
    student_groups = {0: ([0, 3], [1], [2, 4]), 1: ([0, 3], [], [2, 4, 1])}  # position 1: gold 1 moved to class 2
    for k in (3, 1):
        payload = compress_identity(t_logits, t_labels, t_bounds, vmap, projection_top_k=k, shared=False)
        want = [_textbook_kl(t_p[j], s_q[i], teacher_groups, student_groups[i], k) for i, j in ((0, 1), (1, 2))]
        r = projection_kl(s_logits, s_labels, s_bounds, payload, vmap)
        assert r.projected.tolist() == [2] and payload.gold_target.tolist() == [[-1, 0, 2]]
        assert float(r.distill) == pytest.approx(sum(want) / 2, rel=1e-10), k


def _textbook_kl(p: torch.Tensor, q: torch.Tensor, teacher_groups, student_groups, k: int) -> float:
    """KL over the teacher's k most probable classes + the rest, each class's mass summed over its members."""
    zero = torch.tensor(0.0, dtype=torch.float64)
    p = torch.stack([p[c].sum() for c in teacher_groups])
    q = torch.stack([q[c].sum() if c else zero for c in student_groups])
    keep = [c for c in p.argsort(descending=True)[:k].tolist() if student_groups[c]]
    p_k, q_k = p[keep], q[keep]
    p_k, q_k = torch.cat([p_k, 1 - p_k.sum(0, keepdim=True)]), torch.cat([q_k, 1 - q_k.sum(0, keepdim=True)])
    return float(torch.where(p_k > 0, p_k * (p_k / q_k).log(), zero).sum())


def test_projection_is_given_a_word_start_where_the_teachers_gold_token_starts_one():
    """The worked case above with word starts marked: teacher tokens 0, 1, 3 and the unmapped 4 start words
    (classes 0 and 2 are word starts), student tokens 0, 1, 3 and 5. Both gold tokens of the teacher start
    words, so at both positions the teacher's distribution is taken over its word-start tokens and the
    student's softmax over its own (a student member that does not start a word leaves its class). When the
    student's gold token at position 1 does not start a word, that position is not compared; nor is it when
    the teacher's gold token there is EOS."""
    V_t, V_s = 5, 6
    g = torch.Generator().manual_seed(11)
    t_logits, s_logits = torch.randn(1, 4, V_t, generator=g, dtype=torch.float64), torch.randn(
        1, 3, V_s, generator=g, dtype=torch.float64)
    t_labels, s_labels = torch.tensor([[-100, 4, 0, 3]]), torch.tensor([[-100, 3, 1]])
    t_start = torch.tensor([True, True, False, True, True])
    base = (torch.full((V_t,), -1), torch.zeros(1, 1, dtype=torch.long), torch.zeros(V_s, dtype=torch.bool), {},
            torch.tensor([0, 0, 1, 2, -1]), torch.tensor([[0, 3], [1, -1], [2, 4]]), torch.tensor([0, 1, 2, 0, 2, -1]),
            t_start, torch.tensor([True, False, True]))
    t_bounds, s_bounds = pad_bounds([[0, 0, 2, 4]]), pad_bounds([[0, 2, 4]])

    def given(logits, start):
        return torch.softmax(logits.masked_fill(~start, float("-inf")), -1)

    teacher_groups = ([0, 1], [2], [3])
    s_start, s_start_without_1 = torch.tensor([True, True, False, True, False, True]), torch.tensor(
        [True, False, False, True, False, True])
    for k in (3, 2):
        payload = compress_identity(t_logits, t_labels, t_bounds, VocabMap(*base, s_start), projection_top_k=k,
                                    shared=False)
        student_groups = {0: ([0, 3], [1], []), 1: ([0, 3], [], [1])}  # members that start words; gold 1 moved
        want = [_textbook_kl(given(t_logits[0, j], t_start), given(s_logits[0, i], s_start), teacher_groups,
                             student_groups[i], k) for i, j in ((0, 1), (1, 2))]
        r = projection_kl(s_logits, s_labels, s_bounds, payload, VocabMap(*base, s_start))
        assert r.projected.tolist() == [2]
        assert float(r.distill) == pytest.approx(sum(want) / 2, rel=1e-10), k
        # the teacher's gold token at position 1 (class 2) made EOS: the end is CE's, not compared
        end = projection_kl(s_logits, s_labels, s_bounds, payload, VocabMap(*base, s_start, eos_target=2))
        assert end.projected.tolist() == [1] and float(end.distill) == pytest.approx(want[0], rel=1e-10)
        skipped = projection_kl(s_logits, s_labels, s_bounds, payload, VocabMap(*base, s_start_without_1))
        assert skipped.projected.tolist() == [1]
        assert float(skipped.distill) == pytest.approx(_textbook_kl(
            given(t_logits[0, 1], t_start), given(s_logits[0, 0], s_start_without_1), teacher_groups,
            ([0, 3], [], []), k), rel=1e-10)


def test_relabelling_the_teachers_vocabulary_moves_the_projection_but_not_the_sorted_terms(toks):
    """MultiLevelOT's terms sort the teacher's probabilities, so handing the teacher's mass to other tokens
    (a permutation of its vocabulary) leaves them unchanged; the projection compares which text the mass is
    on, and moves."""
    import mlot
    from mlot.identity import answer_bounds

    wp, sp = toks["wordpiece"], toks["sentencepiece"]
    vmap = vocab_map(sp, wp)
    t_ids, s_ids = ids_of(sp, "freshwater mussels"), ids_of(wp, "freshwater mussels")
    t_labels, s_labels = torch.tensor([[-100] + t_ids]), torch.tensor([[-100] + s_ids])
    g = torch.Generator().manual_seed(13)
    # both models sure of the answer's tokens: a peak of +20 on each gold token over unit noise
    t_logits = torch.randn(1, len(t_ids) + 1, len(sp), generator=g, dtype=torch.float64)
    t_logits[0, torch.arange(len(t_ids)), torch.tensor(t_ids)] += 20
    s_logits = torch.randn(1, len(s_ids) + 1, len(wp), generator=g, dtype=torch.float64)
    s_logits[0, torch.arange(len(s_ids)), torch.tensor(s_ids)] += 20
    t_bounds, s_bounds = answer_bounds(sp, [t_ids]), answer_bounds(wp, [s_ids])

    def both(logits):
        ident = compress_identity(logits, t_labels, t_bounds, vmap, projection_top_k=20, shared=False)
        return (float(mlot.multilevel_ot(s_logits, s_labels, logits, t_labels).loss),
                float(projection_kl(s_logits, s_labels, s_bounds, ident, vmap).distill))

    perm = torch.randperm(len(sp), generator=g)
    (ot, proj), (ot_relabelled, proj_relabelled) = both(t_logits), both(t_logits[..., perm])
    assert ot_relabelled == pytest.approx(ot, rel=1e-9)
    assert proj < 0.01 and proj_relabelled > 5  # the same peaks, on other text: far apart
