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
    from mlot.identity import char_bounds, compress_identity, pad_bounds
    from mlot.vocab import vocab_map
    from workers.data.prepared import STUDENT, open_data, teacher_key
    from workers.forward import answer_logits
    from workers.models import load_tokenizer

    t = job.teachers[0]
    actor = TeacherActor(t, job.data, job.loss, seed=1, student=job.student)
    assert _payload(actor.payload(Rows(data, "train", (0, 1)))).identity is None  # the job's loss has none
    loss = apply_overrides(job, ["loss.params.shared_weight=0.5", "loss.params.chunk_weight=1.0",
                                 "loss.params.shared_top_k=5", "loss.params.projection_weight=0.5",
                                 "loss.params.projection_top_k=7"]).loss
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
                             vocab_map(t_tok, s_tok), top_k=5, projection_top_k=7)
    assert torch.equal(got.classes, want.classes) and torch.equal(got.bounds, want.bounds)
    assert torch.equal(got.targets, want.targets) and torch.equal(got.gold_target, want.gold_target)
    assert got.targets.shape[-1] == 7
    torch.testing.assert_close(got.probs, want.probs)
    torch.testing.assert_close(got.target_probs, want.target_probs)
    torch.testing.assert_close(got.token_logp, want.token_logp)
    assert torch.equal(got.student_bounds, pad_bounds([char_bounds(s_tok, a) for a in answers[STUDENT]]))
    # Both sides' spans cover the same answer text: their last bounds (characters + EOS) agree, row by row.
    s_len = torch.tensor([len(a) for a in answers[STUDENT]])
    assert torch.equal(got.bounds.gather(1, got.lengths[:, None]), got.student_bounds.gather(1, s_len[:, None]))
    with pytest.raises(ValueError, match="student"):
        TeacherActor(t, job.data, job.loss, seed=1).payload(Rows(data, "train", indices), loss=loss)


def test_batching_teacher_merges_concurrent_requests_and_answers_each_as_alone(job, data):
    """Six workers' requests at once (different rows, lengths, loss settings, one on-policy): the batching replica
    (an async actor: here its coroutines on one event loop, as Ray runs them) serves them in fewer forwards than
    requests, each with its own batch id and a payload equal to the plain replica's for that request alone (fp32:
    only the attention's sums over the longer padding round differently), within the token budget."""
    import asyncio

    from orchestrator.config import ServingConfig
    from workers.generation import Answer
    from workers.teacher.batching import BatchingTeacher

    job = apply_overrides(job, ["loss.params.chunk_weight=1.0"])  # identity payloads too (student bounds)
    other = apply_overrides(job, ["loss.params.top_k=7"]).loss
    t = job.teachers[0]
    plain = TeacherActor(t, job.data, job.loss, seed=1, student=job.student)
    batching = BatchingTeacher(t, job.data, job.loss, seed=1, student=job.student,
                               serving=ServingConfig(max_batch_tokens=2048, max_wait_ms=20))
    texts = [r["answer"] for r in data_rows(data, (9, 2))]
    requests = [dict(rows=Rows(data, "train", tuple(range(i * 4, i * 4 + 4))), batch_id=[i, 0]) for i in range(4)]
    requests += [dict(rows=Rows(data, "train", (40, 41)), batch_id=[4, 0], loss=other),
                 dict(rows=Rows(data, "train", (9, 2)), batch_id=[5, 0],
                      answers=[Answer(text=x + " indeed", ended=False, ids=(101,)) for x in texts])]

    async def all_at_once():
        return await asyncio.gather(*(batching.payload(**r) for r in requests))

    replies = asyncio.run(all_at_once())
    for request, reply in zip(requests, replies):
        alone = plain.payload(**request)
        assert reply["batch_id"] == request["batch_id"] and reply["answer_tokens"] == alone["answer_tokens"]
        got, want = _payload(reply), _payload(alone)
        assert torch.equal(got.columns, want.columns) and torch.equal(got.lengths, want.lengths)
        torch.testing.assert_close(got.probs, want.probs, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got.identity.token_logp, want.identity.token_logp, rtol=1e-5, atol=1e-6)
        assert torch.equal(got.identity.student_bounds, want.identity.student_bounds)
    info = batching.info()
    assert info["served_requests"] == 6 and 1 <= info["forwards"] < 6
    assert info["forward_rows"] == plain.info()["forward_rows"] == 4 * 4 + 2 + 2


def data_rows(data, indices):
    from workers.data.prepared import open_data
    return open_data(data).rows("train", indices)


def test_take_batch_keeps_the_oldest_and_the_token_budget():
    from types import SimpleNamespace

    from workers.teacher.batching import take_batch

    def q(rows, longest):
        return SimpleNamespace(examples=[None] * rows, longest=longest)

    queued = [q(4, 30), q(4, 90), q(4, 31), q(4, 29), q(20, 30)]
    first, far, near, nearer, big = queued
    # 4 x 30 first; then by closeness in length: 31 (8 x 31 = 248), 29 (12 x 31 = 372), 30 x 20 rows too many,
    # 90 (16 x 90 = 1440 > 400) too long.
    assert take_batch(queued, 400) == [first, near, nearer] and queued == [far, big]
    assert take_batch(queued, 10) == [far] and queued == [big]  # the oldest goes even when over the budget


def test_a_teacher_loaded_with_a_device_map_serves_the_same_payloads_and_caches(job, data, tmp_path):
    """A replica given several GPUs loads with accelerate's ``device_map="auto"``: accelerate dispatches the layers
    over them with hooks that move activations between devices (logits on the last one). This machine has no GPU:
    the same dispatch here maps each layer to the CPU with its hooks forced on (it stands in for the multi-GPU map).
    Its payloads equal the plain load's, fresh and from the hidden-state cache (logits recomputed on the head's
    device)."""
    from accelerate import dispatch_model

    from workers.models import build_model

    t = job.teachers[0]
    plain = TeacherActor(t, job.data, job.loss, seed=1)
    plain.save(str(tmp_path / "teacher"))
    spread = TeacherActor(t, job.data, job.loss, weights_dir=str(tmp_path / "teacher"), cache=True)
    model = build_model(str(tmp_path / "teacher"), None, "float32").eval()
    layers = {f"model.layers.{i}": "cpu" for i in range(model.config.num_hidden_layers)}
    spread.model = dispatch_model(model, {"model.embed_tokens": "cpu", **layers, "model.norm": "cpu",
                                          "model.rotary_emb": "cpu", "lm_head": "cpu"}, force_hooks=True)
    assert hasattr(spread.model.lm_head, "_hf_hook") and spread.model.hf_device_map
    rows = Rows(data, "train", (3, 5, 8, 13))
    for _ in range(2):  # the second request is a cache hit
        a, b = _payload(plain.payload(rows)), _payload(spread.payload(rows))
        torch.testing.assert_close(b.probs, a.probs, rtol=1e-5, atol=1e-6)
        assert torch.equal(a.columns, b.columns)
    assert spread.cache_stats()["hits"] == 1
