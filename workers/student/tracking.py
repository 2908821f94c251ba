"""Rank 0's MLflow logging: metrics that survive tracking-server outages, and the end-of-run artefacts.

Training never waits for tracking: a failed call keeps its metrics and they go out with the next
step's; only the end of the run waits (bounded) for the server, so nothing is lost.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from specs import storage
from workers.student.console import say

MLFLOW_BATCH = 1000  # MLflow's per-call metric limit
REPLAY_KEY = "train/step_s"  # logged at every step: the steps a run holds


class MetricsBuffer:
    """Logs metrics to one MLflow run through ``client`` (an ``MlflowClient``), buffering through outages.

    Create the client with no HTTP retries (``MLFLOW_HTTP_REQUEST_MAX_RETRIES=0``): a blocking retry
    inside the training step would stall every rank.
    """

    def __init__(self, client: Any, run_id: str) -> None:
        self.client, self.run_id = client, run_id
        self.pending: list[Any] = []  # metrics not yet accepted by the tracking server
        self.gap_since = 0           # the step since which the server has been unreachable (0: it is up)
        self.held: dict[int, float] = {}  # steps the run already holds (a restored run replays them): their loss

    def resume(self, step: int) -> None:
        """Training (re)starts after ``step`` (a checkpoint, or 0): the steps after it that the run already holds are
        trained again, and are not logged twice (a loss curve must not zigzag back). Each replayed step logs
        only ``train/replay_loss_diff``, |loss now - loss logged before| (0: the restore was exact), and the
        run's tag ``mlot.rewinds`` lists the steps it restarted from."""
        try:
            held = [m for m in self.client.get_metric_history(self.run_id, REPLAY_KEY) if m.step > step]
            if not held and not step:
                return  # a new run
            losses = {m.step: m.value for m in self.client.get_metric_history(self.run_id, "train/loss")}
            rewinds = self.client.get_run(self.run_id).data.tags.get("mlot.rewinds")
            self.client.set_tag(self.run_id, "mlot.rewinds", ",".join(filter(None, [rewinds, str(step)])))
        except Exception as e:  # tracking must not stop training: then replayed steps are logged again
            say(f"MLflow: could not read the run's logged steps ({type(e).__name__}); replayed steps log again")
            return
        self.held = {m.step: losses.get(m.step, float("nan")) for m in held}
        if self.held:
            say(f"resumed after step {step}: steps {min(self.held)}-{max(self.held)} are in the run already; "
                "they train again and are not logged twice")

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Log now if the server answers; otherwise keep the metrics for the next call."""
        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        if step in self.held:  # trained again after a restart: only how far its loss is from the first time
            before = self.held.pop(step)
            comparable = "train/loss" in metrics and not math.isnan(before)  # NaN: no loss was logged before
            metrics = {"train/replay_loss_diff": abs(metrics["train/loss"] - before)} if comparable else {}
        self.pending.extend(Metric(k, float(v), now, step) for k, v in metrics.items())
        if self._flush():
            if self.gap_since:
                say(f"MLflow back at step {step}; sent the metrics buffered since step {self.gap_since}")
                self._flush_gap(step)
        elif not self.gap_since:
            self.gap_since = step
            say(f"MLflow unreachable at step {step}; buffering metrics")

    def log_params(self, params: dict[str, Any]) -> None:
        try:
            for k, v in params.items():
                self.client.log_param(self.run_id, k, v)
        except Exception as e:  # tracking must not stop training
            say(f"MLflow: could not log params {sorted(params)} ({type(e).__name__})")

    def _flush(self) -> bool:
        try:
            for i in range(0, len(self.pending), MLFLOW_BATCH):
                self.client.log_batch(self.run_id, metrics=self.pending[i:i + MLFLOW_BATCH])
        except Exception:  # any transport or server error: keep everything for the next try
            return False
        self.pending = []
        return True

    def _flush_gap(self, step: int) -> None:
        from mlflow.entities import Metric
        self.pending.append(Metric("tracking/gap_steps", float(step - self.gap_since), int(time.time() * 1000), step))
        self.gap_since = 0
        self._flush()

    def wait_for_server(self, step: int, budget_s: float = 300.0) -> bool:
        """At the end of training: wait (bounded) for the server, so buffered metrics are not lost."""
        deadline = time.time() + budget_s
        delay = 1.0
        while not self._flush():
            if time.time() > deadline:
                say(f"MLflow still unreachable after {budget_s:.0f}s: {len(self.pending)} metrics not sent; "
                    "the trained student is saved locally all the same")
                return False
            time.sleep(delay)
            delay = min(delay * 2, 15.0)
        if self.gap_since:
            say(f"MLflow back after the last step; sent the metrics buffered since step {self.gap_since}")
            self._flush_gap(step)
        return True

    def finish(self, step: int, history: list[dict[str, float]], plan: Any, export_dir: str,
               teacher_counts: dict[str, dict[str, int]]) -> None:
        """The end-of-run artefacts: the loss curve, a transport-plan heatmap of a fixed eval sample, the
        exported student, and per teacher its ``forward_rows``, ``forwards`` and ``served_requests`` (fewer
        forwards than requests: it batched them)."""
        if not self.wait_for_server(step):
            return
        self.log({f"teacher/{name}/{k}": v for name, c in teacher_counts.items() for k, v in c.items()}, step)
        from workers.student.plots import loss_curve_png, plan_heatmap_png
        with tempfile.TemporaryDirectory() as d:
            if history:
                self.client.log_artifact(self.run_id, loss_curve_png(history, Path(d) / "loss_curve.png"), "plots")
            if plan is not None:
                png = plan_heatmap_png(plan.plan, Path(d) / "transport_plan.png", plan.teacher, plan.student)
                self.client.log_artifact(self.run_id, png, "plots")
        with storage.local_copy(export_dir) as local:
            self.client.log_artifacts(self.run_id, local, "student")


def open_buffer(tracking_uri: str, run_id: str) -> MetricsBuffer:
    """A MetricsBuffer on the job's run, with an MLflow client that never blocks on retries."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    from mlflow import MlflowClient
    return MetricsBuffer(MlflowClient(tracking_uri), run_id)
