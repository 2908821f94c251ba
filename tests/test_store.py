"""The teacher output store (``mlot teach``): served payloads equal the live teacher's, also for a student with
another tokenizer; a store that does not match the job is refused, naming what differs; an interrupted teach
resumes without recomputing finished shards. (Live vs store per-step losses under Ray Train: the ZeRO-2 test.)"""

import json
from pathlib import Path

import pytest
import torch
from helpers import quickstart_job

import mlot
from orchestrator.configuration import apply_overrides
from specs import UserError

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def taught(tmp_path_factory, local_ray):
    """A quickstart job (200 rows) and its teacher's payload store, made by run_teach on the suite's local Ray
    (started after the S3 server, so its actors reach it)."""
    from orchestrator.teach import run_teach
    tmp = tmp_path_factory.mktemp("store")
    job = quickstart_job(tmp, "st", "data.limit=200")
    paths = run_teach(job, out=str(tmp / "stores"), shard_rows=64, batch_size=32)
    return job, paths["teacher-sp"], tmp


def _payload(reply) -> mlot.TeacherPayload:
    return mlot.TeacherPayload.from_numpy(reply["payload"])


def _same(a: mlot.TeacherPayload, b: mlot.TeacherPayload) -> None:
    assert torch.equal(a.lengths, b.lengths) and torch.equal(a.columns, b.columns) and a.settings == b.settings
    torch.testing.assert_close(a.probs, b.probs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a.sd_log_shift, b.sd_log_shift, rtol=1e-5, atol=1e-6)
    assert (a.identity is None) == (b.identity is None)
    if a.identity is not None:
        x, y = a.identity.tensors(), b.identity.tensors()
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in ("classes", "bounds", "student_bounds"))
        torch.testing.assert_close(x["probs"], y["probs"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(x["token_logp"], y["token_logp"], rtol=1e-5, atol=1e-6)


def _live_and_store(job, store):
    from workers.teacher.actor import TeacherActor
    from workers.teacher.store import StoreTeacher
    teacher = job.teachers[0]
    live = TeacherActor(teacher, job.data, job.loss, seed=job.train.seed, student=job.student)
    return live, StoreTeacher(teacher.model_copy(update={"store": store}), job.loss, job.student)


def test_store_payloads_equal_the_live_teacher_for_any_student_tokenizer(taught):
    """Payloads served from the store equal the live teacher's, for the job's student and for a student with another
    tokenizer (what a distributed run reads: a store-fed ZeRO-2 job trains to the live teacher's losses in
    tests/test_distill_integration.py)."""
    from workers.data.prepared import Rows, prepare
    job, store, tmp = taught
    meta = json.loads(Path(store, "meta.json").read_text())
    assert meta["complete"] and meta["rows"] == 200 and meta["format"] == "payload"
    assert len(list(Path(store).glob("*/shard-*.arrow"))) == 4  # train 180 rows: 3 shards of <= 64; eval 20: 1
    live, served = _live_and_store(job, store)
    data = prepare(job, job.data_cache)
    for split, indices in [("train", (5, 150, 3, 77, 64, 63, 0, 179)), ("eval", (19, 2))]:
        _same(_payload(served.payload(Rows(data, split, indices))), _payload(live.payload(Rows(data, split, indices))))
    # The aligned-chunk term from a payload store: its stored gold log-probabilities and both sides' bounds.
    chunks = apply_overrides(job, ["loss.params.chunk_weight=1.0"]).loss
    rows = Rows(data, "train", (5, 150, 3))
    got = _payload(served.payload(rows, loss=chunks))
    _same(got, _payload(live.payload(rows, loss=chunks)))
    assert got.identity.classes.shape[-1] == 0 and got.identity.token_logp.abs().sum() > 0
    # Another student, another tokenizer (Tekken byte-BPE instead of WordPiece): other prepared data, same store.
    other = apply_overrides(job, ["name=st-tekken", "student.tokenizer=builtin:tekken",
                                  "student.model_config.vocab_size=131072"])
    data2 = prepare(other, other.data_cache)
    assert data2.fingerprint != data.fingerprint
    rows = Rows(data2, "train", (9, 1, 120, 44))
    _same(_payload(served.payload(rows)), _payload(live.payload(rows)))
    assert served.info()["served_rows"] == 17 and served.info()["forward_rows"] == 0


@pytest.mark.parametrize("change, message", [
    ("data.max_answer_length=16", "another data"),
    ("teachers.0.template.prompt=Q: {prompt}", "another template"),
    ("teachers.0.model_config.hidden_size=64", "another teacher"),
    ("loss.params.top_k=7", "top_k: store 50, job 7"),
    ("loss.mode=reference", "cannot serve loss.mode reference"),
    ("loss.params.shared_weight=0.5", "shared_weight needs the teacher's distribution"),
    ("loss.params.projection_weight=0.5", "projection_weight needs the teacher's distribution"),
])
def test_a_store_that_does_not_match_the_job_is_refused_naming_what_differs(taught, change, message):
    from workers.teacher.store_format import check_store
    job, store, _ = taught
    other = apply_overrides(job, [f"teachers.0.store={store}", change])
    with pytest.raises(UserError, match=message):
        check_store(other, other.teachers[0])


def test_rows_whose_teacher_tokens_differ_from_the_store_are_refused(taught):
    from workers.data.prepared import Rows, prepare
    job, store, _ = taught
    # A student whose answers are long enough to be cut: the cut applies to every model, so the teacher's
    # tokens of those rows are not the ones the store was made from.
    other = apply_overrides(job, ["name=st-long", "student.template.answer=" + " {answer}" * 10])
    data = prepare(other, other.data_cache)
    assert data.counts["truncated"] > 0
    _, served = _live_and_store(other, store)
    with pytest.raises(UserError, match="other teacher tokens in this job than in the store"):
        served.payload(Rows(data, "train", tuple(range(8))))


def test_an_interrupted_teach_resumes_without_recomputing_finished_shards(taught):
    from mlflow import MlflowClient

    from orchestrator.teach import run_teach
    job, taught_store, _ = taught
    store = Path(taught_store)  # left complete again at the end: the other tests may run after this one
    shards = sorted(store.glob("*/shard-*.arrow"))
    before = {p: p.stat().st_mtime_ns for p in shards}
    # As if stopped after three of the four shards: train's last (rows 128-179) missing, the store unfinished.
    assert shards[-1] == store / "train" / "shard-00002.arrow"
    shards[-1].unlink()
    meta = json.loads((store / "meta.json").read_text())
    (store / "meta.json").write_text(json.dumps({**meta, "complete": False}))
    run_teach(job, out=str(store.parent), shard_rows=64, batch_size=32)
    assert {p: p.stat().st_mtime_ns for p in shards[:-1]} == {p: before[p] for p in shards[:-1]}
    assert shards[-1].exists() and json.loads((store / "meta.json").read_text())["complete"]
    client = MlflowClient(job.tracking.resolved_uri())
    runs = client.search_runs([client.get_experiment_by_name(job.tracking.experiment).experiment_id],
                              "tags.`mlot.teach` = 'st'", order_by=["start_time ASC"])
    rows = [r.data.metrics["teach/teacher-sp/rows"] for r in runs]
    assert rows[-1] == 52 and 200 in rows[:-1]  # the resumed run taught only the missing shard


def test_a_hidden_store_on_s3_is_exact_for_any_settings_and_fp16_payloads_are_within_their_rounding(taught):
    """The hidden store is written to and read from S3 (a real S3 HTTP server on loopback): shards, meta and
    LM head go up, the reader copies them down once per node."""
    from orchestrator.teach import run_teach
    from specs import storage
    from workers.data.prepared import Rows, prepare
    job, _, tmp = taught
    hidden = run_teach(job, out="s3://mlot/stores", fmt="hidden", hidden_dtype="float32")["teacher-sp"]
    assert hidden == "s3://mlot/stores/teacher-sp" and storage.exists(f"{hidden}/head.safetensors")
    half = run_teach(job, out=str(tmp / "fp16"), compress="fp16")["teacher-sp"]
    live, from_hidden = _live_and_store(job, hidden)
    rows = Rows(prepare(job, job.data_cache), "train", (4, 90, 17, 160))
    # One store, every setting a sweep may try (the loss config of each request), reference mode included.
    for override in ([], ["loss.params.top_k=7", "loss.params.teacher_temperature=1.7"],
                     ["loss.params.ranking=token", "loss.params.sd_temperature=3.0"], ["loss.mode=reference"],
                     ["loss.params.shared_weight=0.5", "loss.params.chunk_weight=1.0", "loss.params.shared_top_k=5",
                      "loss.params.projection_weight=1.0"]):
        loss = apply_overrides(job, override).loss
        _same(_payload(from_hidden.payload(rows, loss=loss)), _payload(live.payload(rows, loss=loss)))
    _, from_half = _live_and_store(job, half)
    a, b = _payload(from_half.payload(rows)), _payload(live.payload(rows))
    assert torch.equal(a.columns, b.columns)
    torch.testing.assert_close(a.probs, b.probs, rtol=2.0 ** -11, atol=1e-7)  # fp16: 11 significant bits
    sizes = {name: sum(f.stat().st_size for f in Path(tmp, name).rglob("*.arrow")) for name in ("stores", "fp16")}
    assert sizes["fp16"] < 0.75 * sizes["stores"]
