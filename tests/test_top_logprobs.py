"""A teacher payload from top-K log-probabilities (``mlot.top_logprobs``, what a vLLM teacher serves) against the
payload of the full logits (``mlot.compress_teacher``): exact for token ranking, within the stated bound for
sequence ranking, exact again when K covers the vocabulary."""

import pytest
import torch
from helpers import make_batch

import mlot
from mlot.spans import answer_spans, gather_rows
from mlot.top_logprobs import TopLogprobs, compress_top_logprobs, sequence_ranking_error, top_logprobs_problems

V = 300


def _top(logits: torch.Tensor, labels: torch.Tensor, k: int) -> TopLogprobs:
    """What an engine returns: each answer row's top-k log-probabilities and its gold token's."""
    start, length = answer_spans(labels)
    rows, _ = gather_rows(logits.float(), start, length, int(length.max()))
    logp = rows.log_softmax(-1)
    top = logp.topk(k, dim=-1)
    gold = gather_rows(labels[..., None], start + 1, length, int(length.max()))[0][..., 0].clamp(min=0)
    g = logp.gather(-1, gold[..., None])[..., 0]
    return TopLogprobs.pad([(top.indices[b, :n].numpy(), top.values[b, :n].numpy(), g[b, :n].numpy())
                            for b, n in enumerate(length.tolist())], V)


def _batch(scale: float):
    return make_batch([7, 5, 9], [4, 6, 3], V, dtype=torch.float32, scale=scale, seed=3)


def test_token_ranking_and_gold_log_probs_are_exact():
    logits, labels = _batch(3.0)
    cfg = mlot.make_config(ranking="token", top_k=20, sd_temperature=1.0)
    want = mlot.compress_teacher(logits, labels, config=cfg)
    top = _top(logits, labels, 21)
    got = compress_top_logprobs(top, cfg)
    torch.testing.assert_close(got.probs, want.probs, rtol=0, atol=1e-6)
    assert torch.equal(got.columns, want.columns) and torch.equal(got.lengths, want.lengths)
    assert got.settings == want.settings and got.sd_log_shift is None and want.sd_log_shift is None
    torch.testing.assert_close(top.gold, mlot.identity.gold_log_probs(logits, labels), rtol=0, atol=1e-6)


@pytest.mark.parametrize("scale", [1.0, 10.0])
def test_sequence_ranking_stays_within_its_bound(scale):
    """Near-uniform (scale 1) and peaked (scale 10) teachers: settled ranks hold the exact columns, every rank's
    column error is within its bound, and so are the HAD and SL differences for a student."""
    logits, labels = _batch(scale)
    cfg = mlot.make_config(top_k=10, use_sd=False)
    want = mlot.compress_teacher(logits, labels, config=cfg)
    top = _top(logits, labels, 11)
    got = compress_top_logprobs(top, cfg)
    settled, error = sequence_ranking_error(top, 10)
    assert torch.equal(got.columns[settled], want.columns[settled])
    column_error = (got.probs - want.probs).abs().sum(1)  # [B, k]: over each rank's rows
    assert bool((column_error <= error + 1e-6).all()), (column_error, error)
    if scale > 1:  # a peaked teacher settles most ranks (those whose totals are no closer than sum_t u_t)
        assert float(settled.float().mean()) >= 0.8, settled

    s_logits, s_labels = make_batch([6, 5, 8], [3, 4, 2], 200, dtype=torch.float32, seed=4)
    exact = mlot.multilevel_ot(s_logits, s_labels, want, config=cfg)
    served = mlot.multilevel_ot(s_logits, s_labels, got, config=cfg)
    start, s_len = answer_spans(s_labels)
    rows, mask = gather_rows(s_logits, start, s_len, int(s_len.max()))
    log_s = rows.log_softmax(-1).gather(-1, exact.student_columns[:, None].expand(-1, rows.shape[1], -1))
    worst_log = (log_s.abs() * mask[..., None]).amax(1)  # [B, k]: max_t |log s_i(t)|
    n_pair = torch.minimum(s_len, got.lengths).float()
    assert bool(((served.terms["had"] - exact.terms["had"]).abs() <= error.sum(1) / n_pair + 1e-6).all())
    assert bool(((served.terms["sl"] - exact.terms["sl"]).abs() <= (error * worst_log).sum(1) / n_pair + 1e-6).all())


def test_sequence_ranking_is_exact_when_k_covers_the_vocabulary():
    logits, labels = _batch(3.0)
    cfg = mlot.make_config(top_k=10, use_sd=False)
    want = mlot.compress_teacher(logits, labels, config=cfg)
    top = _top(logits, labels, V)
    got = compress_top_logprobs(top, cfg)
    settled, error = sequence_ranking_error(top, 10)
    assert bool(settled.all()) and float(error.max()) < 1e-6
    assert torch.equal(got.columns, want.columns)
    torch.testing.assert_close(got.probs, want.probs, rtol=0, atol=1e-6)


def test_what_needs_full_logits_is_refused():
    assert [p[0] for p in top_logprobs_problems(mlot.make_config("reference"))] == ["mode"]
    names = [p[0] for p in top_logprobs_problems(mlot.make_config(top_k=None, teacher_temperature=2.0))]
    assert names == ["top_k", "teacher_temperature"]  # SD at tau 2 = the teacher's: no normaliser needed
    assert [p[0] for p in top_logprobs_problems(mlot.make_config())] == ["sd_temperature"]
    assert top_logprobs_problems(mlot.make_config(use_sd=False)) == []
    logits, labels = _batch(3.0)
    with pytest.raises(ValueError, match="sd_temperature=2.0"):
        compress_top_logprobs(_top(logits, labels, 11), mlot.make_config())
    with pytest.raises(ValueError, match="returned only 11"):
        compress_top_logprobs(_top(logits, labels, 11), mlot.make_config(ranking="token", top_k=20, use_sd=False))
