"""End-to-end distillation on a real local Ray cluster: DeepSpeed ZeRO workers, teacher actors, MLflow.

Tiny random-weight Llama models with genuinely different real tokenizers (WordPiece student,
SentencePiece and Tekken byte-BPE teachers) and the generated quickstart task.
"""

import json
from pathlib import Path

import pytest
import torch

from helpers import metric_history as _history
from helpers import quickstart_job as _job

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def ray_cluster():
    import ray
    yield
    ray.shutdown()


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


def test_zero2_two_workers_end_to_end(tmp_path, ray_cluster, monkeypatch):
    from mlflow import MlflowClient

    from orchestrator.driver import run_distill
    gets = _record_driver_gets(monkeypatch)
    job = _job(tmp_path, "z2", "train.num_workers=2", "student.deepspeed.stage=2")
    s = run_distill(job)

    steps = [st for st, _ in _history(s, "train/loss")]
    assert steps == [1, 2, 3, 4]
    for key in ("train/ce", "train/teacher-sp/had", "train/teacher-sp/sd", "train/teacher-sp/sl", "train/lr",
                "train/tokens_per_s", "train/teacher_wait_s", "train/payload_bytes_per_token"):
        assert _history(s, key), key
    assert [st for st, _ in _history(s, "eval/loss")] == [2, 4]
    # Payload bytes reached the workers ...
    assert all(v > 0 for _, v in _history(s, "train/payload_bytes_per_token"))
    # ... and never the driver: nothing it fetched holds a payload.
    assert gets and not any(_contains_payload(g) for g in gets)

    client = MlflowClient(s.tracking_uri)
    run = client.get_run(s.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.num_workers"] == "2" and run.data.params["student.deepspeed.stage"] == "2"
    arts = {a.path for a in client.list_artifacts(s.run_id)} | {a.path for a in client.list_artifacts(s.run_id, "plots")}
    assert {"config.yaml", "student", "plots/loss_curve.png", "plots/transport_plan.png"} <= arts
    assert "final/exact_match" in run.data.metrics

    ckpts = sorted(p for p in (tmp_path / "z2" / "ray").glob("*/checkpoint_*") if p.is_dir())
    assert len(ckpts) == 2  # steps 2 and 4
    assert json.loads((ckpts[-1] / "mlot_job.json").read_text())["step"] == 4
    _loadable(s.export_dir, 30522)


def test_zero3_two_teachers_with_different_tokenizers(tmp_path, ray_cluster):
    from orchestrator.driver import run_distill
    tekken = {"name": "teacher-tekken", "tokenizer": "builtin:tekken", "weight": 0.5, "resources": {"num_cpus": 0.25},
              "model_config": {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                               "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 256,
                               "vocab_size": 131072, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 11,
                               "tie_word_embeddings": True}}
    job = _job(tmp_path, "z3", "train.num_workers=2", "student.deepspeed.stage=3", add_teacher=tekken)
    assert len(job.teachers) == 2
    s = run_distill(job)
    for t in ("teacher-sp", "teacher-tekken"):
        assert [st for st, _ in _history(s, f"train/{t}/distill")] == [1, 2, 3, 4]
    model = _loadable(s.export_dir, 30522)
    # ZeRO-3 export gathered real weights (a partitioned export would hold empty tensors).
    assert sum(p.numel() for p in model.parameters()) > 1_000_000


def test_resume_continues_from_the_checkpointed_step(tmp_path, ray_cluster):
    from orchestrator.config import apply_overrides
    from orchestrator.driver import run_distill
    job = _job(tmp_path, "resume")
    first = run_distill(job)
    assert [st for st, _ in _history(first, "train/loss")] == [1, 2, 3, 4]
    longer = apply_overrides(job, ["train.steps=6"])
    second = run_distill(longer, resume=True)
    assert second.run_id == first.run_id  # the same MLflow run goes on
    assert [st for st, _ in _history(second, "train/loss")] == [1, 2, 3, 4, 5, 6]

    with pytest.raises(ValueError, match="other model/data/loss settings"):
        run_distill(apply_overrides(job, ["loss.params.top_k=7"]), resume=True)
