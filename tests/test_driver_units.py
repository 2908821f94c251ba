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
    assert fingerprint(apply_overrides(job, ["train.steps=500", "tracking.experiment=x", "loss.fused_head=false"])) \
        == fingerprint(job)
    assert fingerprint(apply_overrides(job, ["loss.params.top_k=7"])) != fingerprint(job)
    assert fingerprint(apply_overrides(job, ["train.batch_size=4"])) != fingerprint(job)


def test_a_known_truth_summary_heads_with_the_truth_kl_and_drops_one_labels_exact_match():
    """The quickstart's table: KL to p* per student (the measure on the known-truth task); exact match against
    one sampled label is not shown there. A QA job's table keeps its scores."""
    from orchestrator.cli import summary_table
    from orchestrator.driver import DistillSummary

    truth = [(name, DistillSummary(name, "/x", "r", "sqlite:///m.db", {"eval/truth_kl": kl, "eval/loss": 2.5},
                                   {"exact_match": 10.0, "n": 50}))
             for name, kl in (("distilled", 0.0912), ("sft", 0.1734))]
    lines = summary_table(truth).splitlines()
    assert lines[0].split() == ["student", "truth", "KL", "eval", "CE", "rows"]
    assert lines[1].split()[:2] == ["distilled", "0.0912"] and lines[2].split()[:2] == ["sft", "0.1734"]
    qa = summary_table([("qa", DistillSummary("qa", "/x", "r", "u", {"eval/loss": 2.5}, {"exact_match": 10.0,
                                                                                         "n": 50}))])
    assert qa.splitlines()[0].split() == ["student", "exact", "match", "eval", "CE", "rows"]
