"""Shared test setup: offline HF, quiet Ray, locations of ../shared material."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "30")

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MLOT_SHARED", REPO.parent / "shared"))
VECTORS = SHARED / "vectors" / "reference"
QED = SHARED / "data" / "qed" / "validation.jsonl"


@pytest.fixture(scope="session")
def vector_files() -> list[Path]:
    files = sorted(VECTORS.glob("*.npz"))
    if not files:
        pytest.skip(f"reference vectors not found under {VECTORS} (set MLOT_SHARED to the shared/ folder)")
    return files
