"""The known-truth study's statistics, table, plot and MLflow run (``benchmarks/known_truth.py`` calls
:func:`report`).

Statistics are over seeds: mean ± sample std, and paired comparisons (the same seed = the same labels,
student initialisation and batch order in both arms) by a two-sided paired t-test on the per-seed held-out
KL. "Gap closed" is, per seed, (KL_SFT − KL_arm) / (KL_SFT − KL_ceiling) with the same-tokenizer KL student as
the ceiling: the share of what a teacher signal can give at all that an arm gets.
"""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path
from typing import Any

import numpy as np

METRICS = ("kl", "nll", "top1", "ece")
SFT, ULD, CEILING = "SFT", "ULD", "same-tokenizer KL (ceiling)"
MLOT = "MultiLevelOT (paper)"


def slug(name: str) -> str:
    """An MLflow-safe metric name for an arm."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def by_arm(results: list[dict[str, Any]]) -> dict[str, dict[int, dict[str, Any]]]:
    out: dict[str, dict[int, dict[str, Any]]] = {}
    for r in results:
        out.setdefault(r["arm"], {})[r["seed"]] = r
    return out


def mean_std(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} ± {sd:.4f}"


def paired(arms: dict[str, dict[int, dict[str, Any]]], a: str, b: str, metric: str = "kl") -> dict[str, Any] | None:
    """a − b per seed on ``metric``: mean, std, two-sided paired t-test p-value (None: fewer than 2 seeds)."""
    from scipy import stats

    if a not in arms or b not in arms or a == b:
        return None
    seeds = sorted(set(arms[a]) & set(arms[b]))
    if len(seeds) < 2:
        return None
    x = np.array([arms[a][s]["final"][metric] for s in seeds])
    y = np.array([arms[b][s]["final"][metric] for s in seeds])
    d = x - y
    p = float(stats.ttest_rel(x, y).pvalue) if np.any(d != d[0]) else (0.0 if d[0] else 1.0)
    return {"mean": float(d.mean()), "std": float(d.std(ddof=1)), "p": p, "seeds": seeds}


def gap_closed(arms: dict[str, dict[int, dict[str, Any]]], name: str) -> list[float] | None:
    if SFT not in arms or CEILING not in arms or name not in arms:
        return None
    out = []
    for s in sorted(set(arms[name]) & set(arms[SFT]) & set(arms[CEILING])):
        sft, top = arms[SFT][s]["final"]["kl"], arms[CEILING][s]["final"]["kl"]
        out.append((sft - arms[name][s]["final"]["kl"]) / (sft - top) if sft != top else float("nan"))
    return out or None


def mean_interval(values: list[float]) -> str:
    """Mean and its two-sided 95% t interval over seeds (the seeds' spread, ``mean ± t·sd/√n``)."""
    from scipy import stats

    if len(values) < 2:
        return f"{statistics.mean(values):.2f}"
    lo, hi = stats.t.interval(0.95, len(values) - 1, statistics.mean(values), stats.sem(values))
    return f"{statistics.mean(values):.2f} [{lo:.2f}, {hi:.2f}]"


def table(results: list[dict[str, Any]], teachers: dict[str, dict[str, float]] | None = None) -> str:
    """Markdown: one row per arm (mean ± std over seeds), paired differences in KL against SFT and ULD."""
    arms = by_arm(results)
    head = ["arm", "seeds", "held-out KL", "NLL / answer", "top-1", "ECE", "gap closed [95% CI]",
            "ΔKL vs SFT (p)", "ΔKL vs ULD (p)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, teacher in (teachers or {}).items():
        lines.append(f"| teacher {name} | — | " + " | ".join(f"{teacher[k]:.4f}" for k in METRICS)
                     + " | — | — | — |")
    for name, per_seed in arms.items():
        finals = [r["final"] for r in per_seed.values()]
        gap = gap_closed(arms, name)
        cells = [name, str(len(finals)), *(mean_std([f[k] for f in finals]) for k in METRICS),
                 mean_interval(gap) if gap and name not in (SFT, CEILING) else "—"]
        for other in (SFT, ULD):
            d = paired(arms, name, other)
            cells.append(f"{d['mean']:+.4f} ± {d['std']:.4f} (p={d['p']:.3g})" if d else "—")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def curve_png(results: list[dict[str, Any]], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, per_seed in by_arm(results).items():
        curves = [r["curve"] for r in per_seed.values()]
        steps = [p["step"] for p in curves[0]]
        kl = np.array([[p["kl"] for p in c] for c in curves])
        ax.plot(steps, kl.mean(0), marker="o", markersize=3, label=name)
        if len(curves) > 1:
            ax.fill_between(steps, kl.mean(0) - kl.std(0, ddof=1), kl.mean(0) + kl.std(0, ddof=1), alpha=0.15)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("held-out KL(p* ‖ q) (nats)")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def report(out: Path, study: dict[str, Any], tracking_uri: str) -> None:
    """Write ``results.json``, ``table.md``, ``kl_over_steps.png`` (and ``tuned_*`` for the sweep's arm on
    fresh seeds) to ``out``, print the tables, and log everything to one MLflow run."""
    (out / "results.json").write_text(json.dumps(study, indent=1, default=str))
    parts = [table(study["results"], study["teachers"])]
    pngs = [curve_png(study["results"], out / "kl_over_steps.png",
                      f"held-out KL over training, mean ± std over {len(study['seeds'])} seed(s)")]
    if study.get("tuned"):
        tuned = study["tuned"]
        parts.append(f"Tuned on the validation prompts: {json.dumps(tuned['sweep']['best'])}\n\n"
                     + table(tuned["results"]))
        pngs.append(curve_png(tuned["results"], out / "tuned_kl_over_steps.png", "fresh seeds: SFT, ULD, tuned"))
    text = "\n\n".join(parts) + f"\n\nwall time: {study['wall_s'] / 60:.1f} min\n"
    (out / "table.md").write_text(text)
    print(text, flush=True)
    _log_mlflow(study, text, pngs, tracking_uri)


def _log_mlflow(study: dict[str, Any], text: str, pngs: list[Path], uri: str) -> None:
    from mlflow import MlflowClient

    from orchestrator.tracking import experiment_id

    client = MlflowClient(uri)
    run = client.create_run(experiment_id(client, "mlot-known-truth", uri), run_name="known-truth-study",
                            tags={"mlot.study": "known_truth"})
    rid = run.info.run_id
    for k, v in {**study["budget"], "seeds": len(study["seeds"])}.items():
        client.log_param(rid, k, v)
    for name, per_seed in by_arm(study["results"]).items():
        for k in METRICS:
            client.log_metric(rid, f"{slug(name)}/{k}", statistics.mean(r["final"][k] for r in per_seed.values()))
        steps = [p["step"] for p in next(iter(per_seed.values()))["curve"]]
        for i, step in enumerate(steps):
            kl = statistics.mean(r["curve"][i]["kl"] for r in per_seed.values())
            client.log_metric(rid, f"curve/{slug(name)}/kl", kl, step=step)
    client.log_text(rid, text, "table.md")
    client.log_dict(rid, json.loads(json.dumps(study, default=str)), "results.json")
    for png in pngs:
        client.log_artifact(rid, str(png))
    client.set_terminated(rid)
    print(f"MLflow: {uri} run {rid}", flush=True)
