"""Test builders: random logits with answer spans at chosen places, and small quickstart jobs."""

from __future__ import annotations

from pathlib import Path

import torch


def make_batch(lengths: list[int], prompt: list[int], vocab: int, *, seq_len: int | None = None, left_pad: bool = False,
               seed: int = 0, dtype: torch.dtype = torch.float64, scale: float = 3.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits [B, L, V] and labels [B, L] with answer i of length lengths[i] after prompt[i] tokens."""
    g = torch.Generator().manual_seed(seed)
    L = seq_len or max(p + n for p, n in zip(prompt, lengths)) + 2
    logits = (torch.randn(len(lengths), L, vocab, generator=g, dtype=torch.float64) * scale).to(dtype)
    labels = torch.full((len(lengths), L), -100, dtype=torch.long)
    for b, (n, p) in enumerate(zip(lengths, prompt)):
        first = (L - n) if left_pad else p
        labels[b, first:first + n] = torch.randint(0, vocab, (n,), generator=g)
    return logits, labels


QUICKSTART = Path(__file__).resolve().parents[1] / "orchestrator" / "configs" / "quickstart.yaml"


def quickstart_job(tmp_path: Path, name: str, *extra: str, add_teacher: dict | None = None):
    """The bundled quickstart job, small and fast, writing under tmp_path (runs and a sqlite MLflow store)."""
    import yaml

    from orchestrator.config import config_from_dict
    data = yaml.safe_load(QUICKSTART.read_text())
    if add_teacher:
        data["teachers"].append(add_teacher)
    return config_from_dict(data, [
        f"name={name}", f"output_dir={tmp_path}", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
        "train.steps=4", "train.warmup_steps=1", "train.checkpoint_every=2", "train.eval_every=2",
        "teachers.0.pretrain.steps=0", "data.limit=400", *extra])


def metric_history(summary, key: str) -> list[tuple[int, float]]:
    """(step, value) pairs of a metric of a finished job's MLflow run, in logging order."""
    from mlflow import MlflowClient
    return [(m.step, m.value) for m in MlflowClient(summary.tracking_uri).get_metric_history(summary.run_id, key)]
