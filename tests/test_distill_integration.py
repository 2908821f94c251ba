"""End-to-end distillation on a real local Ray cluster: DeepSpeed ZeRO workers, teacher actors, MLflow.

Tiny random-weight Llama models with genuinely different real tokenizers (WordPiece student,
SentencePiece and Tekken byte-BPE teachers) and the generated quickstart task.
"""

import json
import math
from pathlib import Path

import pytest
import torch
from helpers import TEKKEN, ExitAtStep, OptimizerSteps, PoisonLogits, RecordCollectives
from helpers import metric_history as _history
from helpers import quickstart_job as _job

from specs import UserError, storage

pytestmark = pytest.mark.integration


def _record_driver_gets(monkeypatch) -> list:
    """Everything ray.get returns in the driver process (this one): payloads must never be among it."""
    import ray
    seen = []
    real_get = ray.get

    def spy(*args, **kwargs):
        out = real_get(*args, **kwargs)
        seen.append(out)
        return out
    monkeypatch.setattr(ray, "get", spy)
    return seen


def _contains_payload(obj) -> bool:
    if isinstance(obj, dict):
        return "payload" in obj or any(_contains_payload(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return any(_contains_payload(v) for v in obj)
    return False


def _loadable(path: str, vocab: int):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    assert len(tok) == vocab
    ids = tok("What colour is a banana?", return_tensors="pt")["input_ids"]
    assert torch.isfinite(model(ids).logits).all()
    assert list(Path(path).glob("*.safetensors"))
    return model


def test_zero2_two_workers_reference_mode_batched_teacher_end_to_end(tmp_path, local_ray, monkeypatch):
    """Also: the run writes to a storage URI (file://, the code path of s3:// and gs://): checkpoints, the
    pretrained teacher its replicas load, and the exported student all go through it. And the identity-aware
    terms (``mlot.identity``) are on: the teacher ships their payload with the student's bounds."""
    from mlflow import MlflowClient

    from orchestrator.driver import run_distill
    gets = _record_driver_gets(monkeypatch)
    job = _job(tmp_path, "z2", "train.num_workers=2", "student.deepspeed.stage=2", "loss.mode=reference",
               f"output_dir=file://{tmp_path}", "teachers.0.pretrain.steps=3", "student.gradient_checkpointing=true",
               "eval.max_rows=15", "eval.num_tasks=2", "loss.params.shared_weight=0.5",
               "loss.params.chunk_weight=2.0", "loss.params.projection_weight=0.25",
               "teachers.0.serving.max_batch_tokens=4096")
    calls = tmp_path / "collectives.txt"
    s = run_distill(job, callbacks=[RecordCollectives(str(calls))])
    # Every collective (the loop's agreement on skips, the stop signal, eval CE; DeepSpeed's gradient
    # reduction) took a tensor on the worker's own device: what NCCL requires.
    records = [line.split() for line in calls.read_text().splitlines()]
    assert {r[1] for r in records} >= {"all_reduce", "broadcast"} and {r[0] for r in records} == {"0", "1"}
    assert all(r[2] == r[3] for r in records), [r for r in records if r[2] != r[3]][:5]
    assert s.export_dir == f"file://{tmp_path}/z2/final"
    assert (tmp_path / "z2" / "teachers" / "teacher-sp" / "config.json").exists()

    steps = [st for st, _ in _history(s, "train/loss")]
    assert steps == [1, 2, 3, 4]
    for key in ("train/lr", "train/tokens_per_s", "train/teacher_wait_s", "train/teacher-sp/wait_s",
                "train/peak_mem_mb", "train/model_tflops_per_s"):
        assert len(_history(s, key)) == 4, key
    assert [v for _, v in _history(s, "train/optimizer_steps")] == [1, 2, 3, 4]
    assert [st for st, _ in _history(s, "eval/loss")] == [2, 4]
    # Reference mode's total: CE + 1.5 * (HAD + 0.1 SL + 0.1 SD) (SD already carries the released 0.001 scale)
    # + 0.5 * exact-match KL + 2 * aligned-chunk KL + 0.25 * projection KL, recomputed from the logged terms.
    h = {k: dict(_history(s, f"train/{k}")) for k in ("loss", "ce", "teacher-sp/distill", "teacher-sp/had",
                                                       "teacher-sp/sl", "teacher-sp/sd", "teacher-sp/shared_kl",
                                                       "teacher-sp/chunk_kl", "teacher-sp/chunks",
                                                       "teacher-sp/projection_kl", "teacher-sp/projected")}
    for st in steps:
        distill = h["teacher-sp/had"][st] + 0.1 * h["teacher-sp/sl"][st] + 0.1 * h["teacher-sp/sd"][st]
        assert h["teacher-sp/distill"][st] == pytest.approx(distill, rel=1e-5)
        identity = (0.5 * h["teacher-sp/shared_kl"][st] + 2.0 * h["teacher-sp/chunk_kl"][st]
                    + 0.25 * h["teacher-sp/projection_kl"][st])
        assert min(h["teacher-sp/shared_kl"][st], h["teacher-sp/chunk_kl"][st], h["teacher-sp/projection_kl"][st]) > 0
        assert h["teacher-sp/chunks"][st] >= 1 and h["teacher-sp/projected"][st] >= 1
        assert h["loss"][st] == pytest.approx(h["ce"][st] + 1.5 * distill + identity, rel=1e-5)
    # The one replica merged the two workers' prefetched requests into fewer forwards.
    [forwards], [requests] = ([v for _, v in _history(s, f"teacher/teacher-sp/{k}")]
                              for k in ("forwards", "served_requests"))
    assert requests >= 8 and forwards < requests, (forwards, requests)
    # Payload bytes reached the workers ...
    assert all(v > 0 for _, v in _history(s, "train/teacher-sp/payload_bytes_per_token"))
    # ... and never the driver: nothing it fetched holds a payload.
    assert gets and not any(_contains_payload(g) for g in gets)

    client = MlflowClient(s.tracking_uri)
    run = client.get_run(s.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.num_workers"] == "2" and run.data.params["student.deepspeed.stage"] == "2"
    # the vocabulary map's coverage (SentencePiece teacher -> WordPiece student: tests/test_identity.py)
    assert run.data.params["identity.teacher-sp.shared_teacher"] == "0.4908"
    assert run.data.params["identity.teacher-sp.shared_classes"] == "11913.0"
    assert run.data.params["identity.teacher-sp.shared_targets"] == "12415.0"
    arts = ({a.path for a in client.list_artifacts(s.run_id)}
            | {a.path for a in client.list_artifacts(s.run_id, "plots")})
    assert {"config.yaml", "student", "plots/loss_curve.png"} <= arts
    assert "final/exact_match" in run.data.metrics
    assert run.data.params["final.scored_rows"] == "15"  # a bounded sample of the 40 eval rows, over 2 Ray tasks
    # The MLflow UI opens the experiment as model training (not as a GenAI experiment).
    assert client.get_experiment(run.info.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"

    ckpts = sorted(p for p in (tmp_path / "z2" / "ray").glob("*/checkpoint_*") if p.is_dir())
    assert len(ckpts) == 2  # steps 2 and 4
    assert json.loads((ckpts[-1] / "mlot_job.json").read_text())["step"] == 4
    with storage.local_copy(s.export_dir) as local:
        _loadable(local, 30522)

    # The same job from a teacher store (mlot teach; final hidden states in fp32 + the LM head: exact in
    # reference mode too, whose ranking couples each micro-batch, and for the identity terms), each micro-batch
    # served alone: the same loss at every step as the batched live teacher's, to fp32 rounding (the store applies
    # the LM head to its own rows: a matmul of another shape, and a logit can differ by an ulp).
    from orchestrator.configuration import apply_overrides
    from orchestrator.teach import run_teach
    store = run_teach(job, fmt="hidden", hidden_dtype="float32")["teacher-sp"]
    assert store == f"file://{tmp_path}/z2/store/teacher-sp"
    served = run_distill(apply_overrides(job, ["name=z2-store", f"teachers.0.store={store}", "train.eval_every=null",
                                               "train.checkpoint_every=4"]), evaluate=False)
    want, got = dict(_history(s, "train/loss")), dict(_history(served, "train/loss"))
    assert sorted(got) == [1, 2, 3, 4] and all(abs(got[k] - want[k]) <= 1e-6 * abs(want[k]) for k in want), (want, got)
    # One tokenisation pass for both jobs: the second (same data, another name) read it from the cache.
    tags = [client.get_run(r.run_id).data.tags["mlot.data_cache_hit"] for r in (s, served)]
    assert tags == ["false", "true"]


def _zero3_release_after_use(tmp_path) -> str:
    """ZeRO-3 that frees every gathered parameter after each use, as it must for models too big to keep whole
    (with DeepSpeed's defaults a tiny model stays gathered, and a rank that skips a forward goes unnoticed)."""
    path = tmp_path / "zero3.json"
    path.write_text(json.dumps({"zero_optimization": {
        "stage": 3, "stage3_param_persistence_threshold": 0, "stage3_max_live_parameters": 0,
        "stage3_max_reuse_distance": 0, "stage3_prefetch_bucket_size": 0,
        "stage3_gather_16bit_weights_on_model_save": True}}))
    return str(path)


def test_zero3_on_policy_accumulation_with_a_nan_micro_batch_uneven_eval_and_a_restart(tmp_path, local_ray):
    """ZeRO-3, 2 workers, grad_accum 2, two teachers with other tokenizers, student-logit NaN on one rank,
    33 eval rows (17 + 16: one rank runs an extra forward), and, after a warm start of one step on the labels,
    every micro-batch on-policy *added* to its labels (``mode: add``: the student samples its answers, all ranks
    generating together as ZeRO-3 needs, both teachers score that text, and one forward trains on the labels and
    the answers): the run logs
    exactly train.steps optimizer steps, its total is the weighted sum of its logged terms, and when rank 0 dies
    after step 3 the group restarts from step 2's checkpoint and trains step 3 again to the loss it had (the same
    samples: restore is exact, weights, optimizer, schedule, RNG, data position, the skip count), each step logged
    once. (A new driver's ``--resume``: tests/test_multinode.py and tests/test_faults.py.)"""
    from orchestrator.configuration import apply_overrides
    from orchestrator.driver import run_distill
    poison = PoisonLogits({3}, rank=1)  # micro-batch 3 = the second half of step 2, on rank 1 only
    crash = ExitAtStep(3, str(tmp_path / "crashed"))  # rank 0 os._exit(1)s after step 3, once
    zero3 = _zero3_release_after_use(tmp_path)
    job = _job(tmp_path, "z3", "train.num_workers=2", f"student.deepspeed.config_path={zero3}", "train.grad_accum=2",
               "train.batch_size=8", "data.limit=330", "loss.ce_weight=0.7",
               "train.schedule=constant", "train.eval_every=2", "train.checkpoint_every=2", "train.max_failures=1",
               "train.on_policy.fraction=1.0", "train.on_policy.max_new_tokens=4", "train.on_policy.ce=true",
               "train.on_policy.mode=add", "train.on_policy.start_step=1", add_teacher=TEKKEN)
    steps_log = tmp_path / "optimizer_steps.txt"
    s = run_distill(job, callbacks=[poison, OptimizerSteps(str(steps_log)), crash], evaluate=False)

    # One optimizer step per loop step on every rank, the skipped micro-batch included, before and after the restart.
    lines = {tuple(map(int, line.split())) for line in steps_log.read_text().split("\n") if line}
    assert sorted(lines) == [(r, st, st, 2 * st) for r in (0, 1) for st in (1, 2, 3, 4)]
    assert (tmp_path / "crashed").read_text() == "3"
    from mlflow import MlflowClient
    assert MlflowClient(s.tracking_uri).get_run(s.run_id).data.tags["mlot.rewinds"] == "2"
    for key in ("train/loss", "train/step_s", "train/optimizer_steps"):
        assert [st for st, _ in _history(s, key)] == [1, 2, 3, 4], key  # each step once
    replays = _history(s, "train/replay_loss_diff")
    assert [st for st, _ in replays] == [3] and replays[0][1] <= 1e-5, replays
    assert [v for _, v in _history(s, "train/optimizer_steps")] == [1, 2, 3, 4]
    assert [v for _, v in _history(s, "train/nonfinite_skipped")] == [0, 1, 1, 1]  # step 4 counted after the restart
    assert [st for st, _ in _history(s, "eval/loss")] == [2, 4]

    # On-policy from step 2 (start_step 1): every micro-batch generated (up to 4 tokens per answer).
    assert [v for _, v in _history(s, "train/on_policy_frac")] == [0.0, 1.0, 1.0, 1.0]
    assert [st for st, v in _history(s, "train/generated_tokens") if 0 < v <= 4] == [2, 3, 4]
    assert [st for st, v in _history(s, "train/generation_frac") if 0 < v < 1] == [2, 3, 4]
    # The logged total is, on the labels and (from step 2) on the answers, ce_weight * CE + sum_j w_j * alpha *
    # distill_j, recomputed from the logged terms (on_policy.ce: the CE of the student's own answers too).
    alpha, weights = 0.15, {"teacher-sp": 1.0, "teacher-tekken": 0.5}
    total = dict(_history(s, "train/loss"))
    for step in (1, 2, 3, 4):
        want = 0.0
        for part in ("", "on_policy/") if step > 1 else ("",):
            ce = dict(_history(s, f"train/{part}ce"))[step]
            distill = [dict(_history(s, f"train/{part}{t}/distill"))[step] for t in weights]
            want += 0.7 * ce + sum(w * alpha * d for w, d in zip(weights.values(), distill))
            assert all(math.isfinite(v) and v > 0 for v in distill) and distill[0] != distill[1]
        assert total[step] == pytest.approx(want, rel=1e-5), step
    assert [st for st, _ in _history(s, "train/on_policy/loss")] == [2, 3, 4]
    for t in weights:
        assert all(v > 0 for _, v in _history(s, f"train/{t}/payload_bytes_per_token"))
        assert _history(s, f"train/{t}/wait_s")
    model = _loadable(s.export_dir, 30522)
    # ZeRO-3 export gathered real weights (a partitioned export would hold empty tensors).
    assert sum(p.numel() for p in model.parameters()) > 1_000_000
    # The row counts are params of the run, not one-point charts.
    run = MlflowClient(s.tracking_uri).get_run(s.run_id).data
    assert run.params["data.prepared.train_rows"] != "0" and not any(k.startswith("data/") for k in run.metrics)
    with pytest.raises(UserError, match="other model/data/loss settings"):
        run_distill(apply_overrides(job, ["loss.params.top_k=7"]), resume=True)
