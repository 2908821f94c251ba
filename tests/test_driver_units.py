"""Driver pieces that need no cluster: secrets redaction, artefact location, resume fingerprints."""

from pathlib import Path

from orchestrator.configuration import apply_overrides, dump_config, load_config
from orchestrator.driver import fingerprint
from orchestrator.tracking import artifact_location, redact, redact_value

QUICKSTART = Path(__file__).resolve().parents[1] / "orchestrator" / "configs" / "quickstart.yaml"


def test_credentials_in_uris_and_secret_settings_never_reach_logs():
    job = load_config(QUICKSTART, ["tracking.uri=https://alice:tok3n@mlflow.example.com",
                                   "cluster.runtime_env.env_vars.AWS_SECRET_ACCESS_KEY=s3cr3t",
                                   "cluster.runtime_env.env_vars.HF_HOME=/data/hf"])
    flat = {k: redact_value(k, v) for k, v in job.to_flat_dict().items()}  # the run's params
    assert flat["tracking.uri"] == "https://***@mlflow.example.com"
    assert flat["cluster.runtime_env.env_vars.AWS_SECRET_ACCESS_KEY"] == "***"
    assert flat["cluster.runtime_env.env_vars.HF_HOME"] == "/data/hf"
    text = redact(dump_config(job))  # the run's config.yaml artefact
    assert "tok3n" not in str(flat) + text and "s3cr3t" not in str(flat) + text and "/data/hf" in text


def test_artefacts_live_beside_a_sqlite_store(tmp_path):
    assert artifact_location(f"sqlite:///{tmp_path}/mlflow.db") == (tmp_path / "mlartifacts").as_uri()
    assert artifact_location("http://127.0.0.1:5000") is None


def test_fingerprint_allows_longer_runs_but_not_other_losses():
    job = load_config(QUICKSTART)
    assert fingerprint(apply_overrides(job, ["train.steps=500", "tracking.experiment=x"])) == fingerprint(job)
    assert fingerprint(apply_overrides(job, ["loss.params.top_k=7"])) != fingerprint(job)
    assert fingerprint(apply_overrides(job, ["train.batch_size=4"])) != fingerprint(job)
