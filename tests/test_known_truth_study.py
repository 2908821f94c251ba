"""``benchmarks/known_truth.py --quick`` (the smoke run of the known-truth study): every arm trains and is scored
against p*, the metrics keep their invariants, each arm's logged loss is its terms recombined with the method's
weights, and the MLflow run carries the same numbers as ``results.json``. The ranking is not checked: 12 steps
say nothing about it."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from workers.data.known_truth import KnownTruth, entropy

REPO = Path(__file__).resolve().parents[1]
# One arm per code path of the study's loop (SeqKD's generation, a sorted-distribution method with two teachers,
# the same-tokenizer KL, the identity terms, on-policy, mixing); the losses themselves, ULD and the reference mode
# included, are tied to their formulas in test_baselines.py, test_loss_paper.py and test_loss_reference.py.
ARMS = ["SFT", "SeqKD (greedy)", "MultiLevelOT, two teachers", "same-tokenizer KL (ceiling)",
        "MultiLevelOT + exact match + chunks", "aligned, on-policy 0.5 added",
        "MultiLevelOT, trained + random teacher (best)"]


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out = tmp_path_factory.mktemp("known_truth")
    run = subprocess.run([sys.executable, str(REPO / "benchmarks" / "known_truth.py"), "--quick", "--arms", *ARMS,
                          "--out", str(out), "--tracking-uri", f"sqlite:///{out}/mlflow.db"], cwd=out,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return out, json.loads((out / "results.json").read_text())


def test_every_arm_is_scored_against_p_star_with_consistent_metrics(study):
    out, got = study
    task = KnownTruth(seed=0)
    test = task.prompts["test"]
    mean_entropy = float(np.mean([entropy(task.truth(p)) for p in test]))
    assert [r["arm"] for r in got["results"]] == ARMS and {r["seed"] for r in got["results"]} == {0}
    for r in [*got["results"], *({"final": m} for m in got["teachers"].values())]:
        m = r["final"]
        assert m["kl"] >= 0 and math.isfinite(m["kl"])
        # NLL of the model's own (unrenormalised) probabilities = H(p*) + KL + the mass it puts outside the set
        assert m["nll"] >= mean_entropy + m["kl"] - 1e-9
        assert abs(m["top1"] * len(test) - round(m["top1"] * len(test))) < 1e-9 and 0 <= m["ece"] <= 1
        if "curve" in r:
            assert r["curve"][-1] == {"step": 12, **m}
    assert set(got["teachers"]) == {"sp", "tekken", "random"} and got["teachers"]["tekken"]["steps"] == 25
    assert got["teachers"]["random"]["steps"] == 0 and got["teachers"]["random"]["kl"] > got["teachers"]["sp"]["kl"]
    seqkd = {r["arm"]: r["unusable_targets"] for r in got["results"] if r["arm"].startswith("SeqKD")}
    assert all(0 <= n < 3 * len(task.prompts["train"]) for n in seqkd.values())


def test_each_arms_loss_is_its_logged_terms_recombined(study):
    """loss = CE + sum over teachers of alpha * distill, and MultiLevelOT's distill = HAD + beta SL + gamma SD,
    with the method's default weights (means over the last steps: the relation is linear)."""
    _, got = study
    terms = {r["arm"]: r["final_terms"] for r in got["results"]}
    alpha = {"MultiLevelOT, two teachers": 0.15, "same-tokenizer KL (ceiling)": 1.0}
    for arm in ("SFT", "SeqKD (greedy)"):
        assert set(terms[arm]) == {"loss", "ce"} and terms[arm]["loss"] == pytest.approx(terms[arm]["ce"])
    for arm, a in alpha.items():
        t = terms[arm]
        distill = sum(v for k, v in t.items() if k.endswith("/distill"))
        assert t["loss"] == pytest.approx(t["ce"] + a * distill, rel=1e-5), arm
    # the identity-aware terms, weight 1 each, on top of the method's own
    both = terms["MultiLevelOT + exact match + chunks"]
    assert both["loss"] == pytest.approx(both["ce"] + 0.15 * both["t0/distill"] + both["t0/shared_kl"]
                                         + both["t0/chunk_kl"], rel=1e-5)
    assert both["t0/aligned"] >= 1  # every answer's first token aligns
    t = terms["MultiLevelOT, two teachers"]
    for j in (0, 1):
        assert t[f"t{j}/distill"] == pytest.approx(t[f"t{j}/had"] + 0.1 * t[f"t{j}/sl"] + 0.1 * t[f"t{j}/sd"], rel=1e-5)
    assert terms["MultiLevelOT, two teachers"]["t1/distill"] > 0
    # teacher mixing (mlot.mixing): per sample the teacher with the lowest NLL per answer byte
    best = terms["MultiLevelOT, trained + random teacher (best)"]
    assert best["t0/mix_weight"] + best["t1/mix_weight"] == pytest.approx(1.0)
    # on-policy added to the labels (mode add, half the steps): the projection on the labels and on the answers
    policy = terms["aligned, on-policy 0.5 added"]
    assert policy["t0/projection_kl"] > 0 and policy["on_policy/t0/projection_kl"] > 0
    # the logged total (means over the last 10 steps) = the labels' CE + projection, plus on the k steps with answers
    # their own loss: k / 10 of its mean over those steps
    k = 10 * (policy["loss"] - policy["ce"] - policy["t0/projection_kl"]) / policy["on_policy/loss"]
    assert 1 <= round(k) <= 10 and k == pytest.approx(round(k), abs=1e-3), k


def test_the_mlflow_run_has_the_table_the_plot_and_the_same_numbers(study):
    from mlflow import MlflowClient

    out, got = study
    client = MlflowClient(f"sqlite:///{out}/mlflow.db")
    [run] = client.search_runs([client.get_experiment_by_name("mlot-known-truth").experiment_id])
    for r in got["results"]:
        slug = "".join(c if c.isalnum() else "_" for c in r["arm"].lower())
        slug = "_".join(p for p in slug.split("_") if p)
        assert run.data.metrics[f"{slug}/kl"] == pytest.approx(r["final"]["kl"])
    files = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"table.md", "results.json", "kl_over_steps.png"} <= files
    table = (out / "table.md").read_text()
    assert all(f"| {arm} | 1 |" in table for arm in ARMS) and "| teacher sp |" in table
    assert (out / "kl_over_steps.png").read_bytes()[:4] == b"\x89PNG"
