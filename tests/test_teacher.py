"""The teacher actor class as plain Python (no Ray): payloads, the hidden-state cache, sweeps' settings."""

import pytest
import torch

import mlot
from orchestrator.config import apply_overrides, load_config
from workers.prepared import Rows, prepare
from workers.teacher import TeacherActor

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
