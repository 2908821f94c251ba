"""``benchmarks/gpu_check.py`` runs as it is on the CPU (the GPU run is the same script): its parity rows
pass, its plain batched restatement of the paper loss equals mlot's, and its distill run reports."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.integration
def test_gpu_check_smoke_on_cpu(tmp_path):
    out = tmp_path / "gpu_check.json"
    run = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--quick",
                          "--out", str(out)], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads(out.read_text())
    rows = {(r["section"], r["case"]): r for r in report["rows"]}
    assert [c for s, c in rows if s == "parity"] == ["paper fp32 cpu vs cpu", "reference fp32 cpu vs cpu"]
    assert all(r["ok"] for (s, _), r in rows.items() if s == "parity")
    [loss] = [r for (s, _), r in rows.items() if s == "loss"]
    assert loss["loss_diff"] < 1e-5 and loss["mlot_ms"] > 0 and loss["plain_ms"] > 0
    distill = [r for (s, _), r in rows.items() if s == "distill"]
    assert [r["case"] for r in distill] == ["ZeRO-3 bf16, 3 steps"]
    assert all(r["tokens_per_s"] > 0 and r["peak_mem_mb"] > 0 for r in distill)
    [student] = [r for (s, _), r in rows.items() if s == "student_loss"]
    assert student["ok"] and student["chunked_diff"] < 1e-5 and student["head_diff"] < 1e-5  # = F.cross_entropy's
    assert "parity   | paper fp32 cpu vs cpu" in run.stdout
