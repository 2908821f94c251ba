"""Driver pieces that need no cluster: secrets redaction, artefact location, resume fingerprints."""

from pathlib import Path

from orchestrator.config import apply_overrides, load_config
from orchestrator.driver import fingerprint
from orchestrator.tracking import artifact_location, redact

QUICKSTART = Path(__file__).resolve().parents[1] / "orchestrator" / "configs" / "quickstart.yaml"


def test_credentials_in_uris_never_reach_logs():
    job = load_config(QUICKSTART, ["tracking.uri=https://alice:tok3n@mlflow.example.com"])
    flat = {k: redact(str(v)) for k, v in job.to_flat_dict().items()}
    assert flat["tracking.uri"] == "https://***@mlflow.example.com"
    assert "tok3n" not in str(flat)


def test_artefacts_live_beside_a_sqlite_store(tmp_path):
    assert artifact_location(f"sqlite:///{tmp_path}/mlflow.db") == (tmp_path / "mlartifacts").as_uri()
    assert artifact_location("http://127.0.0.1:5000") is None


def test_fingerprint_allows_longer_runs_but_not_other_losses():
    job = load_config(QUICKSTART)
    assert fingerprint(apply_overrides(job, ["train.steps=500", "tracking.experiment=x"])) == fingerprint(job)
    assert fingerprint(apply_overrides(job, ["loss.params.top_k=7"])) != fingerprint(job)
    assert fingerprint(apply_overrides(job, ["train.batch_size=4"])) != fingerprint(job)
