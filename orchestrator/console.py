"""What the console shows: mlot's own lines and progress by default; the frameworks' chatter with ``--verbose``.

Quiet (the default) means: the workers' forwarded output off (Ray's ``log_to_driver``: Ray Train's report dumps,
DeepSpeed's warnings, every actor's model-loading bar; mlot's lines reach the driver through
``workers.student.console.Console`` all the same), Ray's own log lines below ERROR off, and the datasets /
transformers / hub progress bars and MLflow's INFO lines off in this process and in the local Ray it starts.
Errors still surface as exceptions with their tracebacks.
"""

from __future__ import annotations

import os

#: The libraries' own switches (read when they are imported): set unless the user set them.
QUIET_ENV = {"HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
             "TRANSFORMERS_VERBOSITY": "error", "MLFLOW_LOGGING_LEVEL": "WARNING"}

_verbose = False


def set_verbose(on: bool) -> None:
    """Choose for this process (the CLI's ``--verbose``); call first, before the libraries are imported."""
    global _verbose
    _verbose = on
    if not on:
        for key, value in QUIET_ENV.items():
            os.environ.setdefault(key, value)


def ray_init_options() -> dict[str, object]:
    """``ray.init`` keywords: forwarded worker output and Ray's own log level."""
    return {"log_to_driver": _verbose, "logging_level": "INFO" if _verbose else "ERROR"}
