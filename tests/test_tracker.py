"""Training never stops for tracking: metrics logged while MLflow is down arrive once it is back."""

from pathlib import Path

from mlflow import MlflowClient

from workers.student.tracking import MetricsBuffer


class FlakyClient:
    """A real MLflow client (sqlite store) whose calls fail on demand while ``down``.

    This isolates the tracker's buffering logic; it is not an outage of a real ``mlflow server``.
    """

    def __init__(self, uri: str) -> None:
        self.real, self.down = MlflowClient(uri), False

    def __getattr__(self, name):
        attr = getattr(self.real, name)

        def call(*a, **k):
            if self.down:
                raise ConnectionError("tracking server unreachable")
            return attr(*a, **k)
        return call


def test_metrics_buffered_through_an_outage(tmp_path: Path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    real = MlflowClient(uri)
    run_id = real.create_run(real.create_experiment("t")).info.run_id
    tracker = MetricsBuffer(FlakyClient(uri), run_id)
    tracker.log({"train/loss": 3.0}, 1)
    tracker.client.down = True
    tracker.log({"train/loss": 2.0}, 2)   # lost without buffering
    tracker.log({"train/loss": 1.5}, 3)
    tracker.client.down = False
    tracker.log({"train/loss": 1.0}, 4)
    steps = sorted((m.step, m.value) for m in real.get_metric_history(run_id, "train/loss"))
    assert steps == [(1, 3.0), (2, 2.0), (3, 1.5), (4, 1.0)]
    assert [m.value for m in real.get_metric_history(run_id, "tracking/gap_steps")] == [2]
