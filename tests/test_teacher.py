"""The teacher actor class as plain Python (no Ray): payloads, the hidden-state cache, sweeps' settings."""

import pytest
import torch

import mlot
from orchestrator.configuration import apply_overrides, load_config
from workers.data.prepared import Rows, prepare
from workers.teacher.actor import TeacherActor

QUICKSTART = "orchestrator/configs/quickstart.yaml"


@pytest.fixture(scope="module")
def job():
    from pathlib import Path
    return load_config(Path(__file__).resolve().parents[1] / QUICKSTART)


@pytest.fixture(scope="module")
def data(job, tmp_path_factory):
    """The quickstart rows tokenised for the student and the teacher (no Ray: the teacher is plain Python)."""
    return prepare(job, str(tmp_path_factory.mktemp("data")))


def _payload(reply) -> mlot.TeacherPayload:
    return mlot.TeacherPayload.from_numpy(reply["payload"])


def test_cached_hidden_states_give_identical_payloads_for_any_settings(job, data):
    rows = Rows(data, "train", tuple(range(8)))
    t = job.teachers[0]
    plain = TeacherActor(t, job.data, job.loss, seed=1)
    cached = TeacherActor(t, job.data, job.loss, seed=1, cache=True)
    other = apply_overrides(job, ["loss.params.top_k=7", "loss.params.teacher_temperature=1.7",
                                  "loss.params.sd_temperature=3.0"]).loss
    for loss in (None, other, None, other):
        a, b = _payload(plain.payload(rows, loss=loss)), _payload(cached.payload(rows, loss=loss))
        torch.testing.assert_close(b.probs, a.probs, rtol=1e-5, atol=1e-6)
        assert torch.equal(a.columns, b.columns) and torch.equal(a.lengths, b.lengths)
    assert _payload(cached.payload(rows, loss=other)).probs.shape[-1] == 7
    # Four requests, one forward pass per row: the other three came from the cache.
    assert cached.info()["forward_rows"] == 8 and plain.info()["forward_rows"] == 32
    assert cached.info()["cached_batches"] == 1


def test_a_small_cache_budget_evicts_the_least_recently_used_batch_and_stays_exact(job, data):
    """A byte budget that holds two of three batches: the oldest unused one goes, a re-asked one is a miss
    again (a new forward), and every payload still equals the plain forward's."""
    plain = TeacherActor(job.teachers[0], job.data, job.loss, seed=1)
    batches = [Rows(data, "train", tuple(range(i, i + 4))) for i in (0, 4, 8)]
    probe = TeacherActor(job.teachers[0], job.data, job.loss, seed=1, cache=True)
    sizes = []
    for rows in batches:
        before = probe.cache_stats()["bytes"]
        probe.payload(rows)
        sizes.append(probe.cache_stats()["bytes"] - before)
    budget = max(sizes[i] + sizes[j] for i, j in ((0, 1), (0, 2), (1, 2)))  # any two batches fit, never three
    small = TeacherActor(job.teachers[0], job.data, job.loss, seed=1, cache=True, cache_bytes=budget)
    for rows in (batches[0], batches[1], batches[0], batches[2], batches[1], batches[0]):
        a, b = _payload(plain.payload(rows)), _payload(small.payload(rows))
        torch.testing.assert_close(b.probs, a.probs, rtol=1e-5, atol=1e-6)
    stats = small.cache_stats()
    # hits: the 3rd request (batch 0); batch 2 evicts batch 1 (least recently used), so batch 1 misses again and
    # evicts batch 0, which misses again too
    assert (stats["hits"], stats["misses"], stats["evictions"]) == (1, 5, 3)
    assert stats["entries"] == 2 and stats["bytes"] <= stats["budget"]
    assert small.info()["forward_rows"] == 5 * 4


def test_payload_echoes_batch_id_and_matches_in_process_loss(job, data):
    rows = Rows(data, "eval", (3, 1, 4, 0))
    t = TeacherActor(job.teachers[0], job.data, job.loss, seed=0)
    reply = t.payload(rows, batch_id=[0, 7])
    assert reply["batch_id"] == [0, 7] and reply["answer_tokens"] > 0
    assert _payload(reply).settings == job.loss.payload_config().teacher_settings()


def test_pretraining_clears_the_cache(job, data):
    rows = Rows(data, "train", (5, 6, 7, 8))
    t = TeacherActor(job.teachers[0], job.data, job.loss, seed=0, cache=True)
    before = _payload(t.payload(rows))
    out = t.pretrain(data, steps=3, lr=1e-2, batch_size=8, seed=0)
    assert len(out["losses"]) == 3 and t.info()["cached_batches"] == 0
    after = _payload(t.payload(rows))
    assert not torch.allclose(before.probs, after.probs)


def test_identity_payload_is_the_in_process_one_with_both_sides_bounds(job, data):
    """The identity-aware terms' payload (``mlot.identity``) through the wire format equals the in-process one:
    the teacher's logits of the rows, each side's character bounds of its own answer tokens, the pair's map."""
    from mlot.identity import char_bounds, compress_identity, pad_bounds, vocab_map
    from workers.data.prepared import STUDENT, open_data, teacher_key
    from workers.forward import answer_logits
    from workers.models import load_tokenizer

    t = job.teachers[0]
    actor = TeacherActor(t, job.data, job.loss, seed=1, student=job.student)
    assert _payload(actor.payload(Rows(data, "train", (0, 1)))).identity is None  # the job's loss has none
    loss = apply_overrides(job, ["loss.params.shared_weight=0.5", "loss.params.chunk_weight=1.0",
                                 "loss.params.shared_top_k=5"]).loss
    indices = (0, 3, 5, 8)
    got = _payload(actor.payload(Rows(data, "train", indices), loss=loss)).identity

    t_tok, s_tok = load_tokenizer(t.tokenizer_name), load_tokenizer(job.student.tokenizer_name)
    opened = open_data(data)
    answers = {key: [[i for i in lab if i != -100] for _, lab in opened.examples("train", indices, key)]
               for key in (teacher_key(t.name), STUDENT)}
    with torch.inference_mode():
        logits, labels = answer_logits(actor.model, opened.batch("train", indices, teacher_key(t.name),
                                                                 t_tok.pad_token_id), actor.vocab_size)
    want = compress_identity(logits, labels, pad_bounds([char_bounds(t_tok, a) for a in answers[teacher_key(t.name)]]),
                             vocab_map(t_tok, s_tok), top_k=5)
    assert torch.equal(got.classes, want.classes) and torch.equal(got.bounds, want.bounds)
    torch.testing.assert_close(got.probs, want.probs)
    torch.testing.assert_close(got.token_logp, want.token_logp)
    assert torch.equal(got.student_bounds, pad_bounds([char_bounds(s_tok, a) for a in answers[STUDENT]]))
    # Both sides' spans cover the same answer text: their last bounds (characters + EOS) agree, row by row.
    s_len = torch.tensor([len(a) for a in answers[STUDENT]])
    assert torch.equal(got.bounds.gather(1, got.lengths[:, None]), got.student_bounds.gather(1, s_len[:, None]))
    with pytest.raises(ValueError, match="student"):
        TeacherActor(t, job.data, job.loss, seed=1).payload(Rows(data, "train", indices), loss=loss)
