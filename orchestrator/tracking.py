"""MLflow from the driver's side: experiments, the job's run, and what may be logged.

The workers only log into a run that exists (``workers.student.tracking``); creating experiments and runs,
and deciding what a run's params are, happens here.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from orchestrator.config import JobConfig
from orchestrator.configuration import dump_config

#: Names of settings that hold credentials (e.g. cluster.runtime_env.env_vars.AWS_SECRET_ACCESS_KEY).
_SECRET_NAME = r"[\w.]*(?:SECRET|TOKEN|PASSWORD|ACCESS_KEY|SESSION_KEY|API_KEY)[\w.]*"


def redact(text: str) -> str:
    """Hide credentials before anything is logged: written into URIs (scheme://user:secret@host), or as the
    value of a setting whose name says it is one (YAML ``AWS_SECRET_ACCESS_KEY: ...``)."""
    text = re.sub(r"(\w+://)[^/@\s]+@", r"\1***@", text)
    return re.sub(rf"(?im)^(\s*{_SECRET_NAME}\s*:\s*)\S.*$", r"\1'***'", text)


def redact_value(key: str, value: Any) -> str:
    """A config value as an MLflow param: hidden when its dotted ``key`` names a credential."""
    return "***" if re.fullmatch(_SECRET_NAME, key, re.I) else redact(str(value))


def artifact_location(uri: str) -> str | None:
    """Where a new experiment keeps its artefacts: beside a sqlite store (not the working directory's
    ./mlruns); None lets a tracking server decide."""
    if uri.startswith("sqlite:///"):
        return (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").resolve().as_uri()
    return None


#: The MLflow UI opens an experiment of this kind on its runs and model-training charts (untagged, MLflow 3 may
#: take it for a GenAI experiment and open on traces and evaluations).
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")


def experiment_id(client: Any, name: str, uri: str) -> str:
    """The id of MLflow experiment ``name``, created (with its artefacts beside a sqlite store) if new, and
    tagged as model training."""
    exp = client.get_experiment_by_name(name)
    if exp is None:
        return client.create_experiment(name, artifact_location(uri), tags=dict([EXPERIMENT_KIND]))
    if EXPERIMENT_KIND[0] not in exp.tags:  # made before mlot tagged its experiments, or by hand
        client.set_experiment_tag(exp.experiment_id, *EXPERIMENT_KIND)
    return exp.experiment_id


def start_tracking(job: JobConfig, run_id: str | None = None, parent_run_id: str | None = None) -> tuple[str, str]:
    """Create (or reopen, when resuming) the job's MLflow run; log the resolved config. Returns (uri, run_id).

    ``parent_run_id`` nests the run under a sweep's parent run.
    """
    import mlflow
    from mlflow import MlflowClient
    from mlflow.entities import Param

    uri = job.tracking.resolved_uri()
    client = MlflowClient(uri)
    if run_id is None:
        tags = {"mlot.job": job.name, **job.tracking.tags}
        if parent_run_id:
            tags["mlflow.parentRunId"] = parent_run_id
        run = client.create_run(experiment_id(client, job.tracking.experiment, uri),
                                run_name=job.tracking.run_name or job.name, tags=tags)
        run_id = run.info.run_id
        params = [Param(k, redact_value(k, v)[:6000]) for k, v in job.to_flat_dict().items()]
        for i in range(0, len(params), 100):
            client.log_batch(run_id, params=params[i:i + 100])
        client.log_text(run_id, redact(dump_config(job)), "config.yaml")
    else:
        client.update_run(run_id, status="RUNNING")
    mlflow.set_tracking_uri(uri)
    return uri, run_id
