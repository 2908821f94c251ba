"""PNG artefacts for MLflow: the loss curves and a transport-plan heatmap (matplotlib, headless)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")  # no display on cluster nodes
import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator


def loss_curve_png(history: list[dict[str, float]], path: Path) -> str:
    """Plot every ``train/*`` loss term (and ``eval/loss``) against the step."""
    keys = sorted({k for h in history for k in h if k == "eval/loss" or (k.startswith("train/") and (
        k.endswith(("loss", "ce", "distill", "had", "sl", "sd"))))})
    fig, ax = plt.subplots(figsize=(7, 4))
    for k in keys:
        pts = [(h["step"], h[k]) for h in history if k in h]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], label=k, marker="o" if k == "eval/loss" else None)
    ax.set_xlabel("optimizer step")
    ax.set_yscale("symlog", linthresh=1e-3)
    ax.legend(fontsize=7)
    ax.set_title("mlot training curves")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def tick_labels(pieces: Sequence[str], most: int = 60) -> tuple[list[int], list[str]]:
    """(positions, labels) for an axis of token pieces: at most ``most`` of them (every n-th when there are more),
    spaces shown as ``·``, newlines as ``\\n``, ``$`` escaped (matplotlib would read mathtext), empty as ``∅``."""
    step = max(1, math.ceil(len(pieces) / most))
    at = list(range(0, len(pieces), step))
    return at, [pieces[i].replace("$", r"\$").replace(" ", "·").replace("\n", "\\n") or "∅" for i in at]


def plan_heatmap_png(plan: Any, path: Path, teacher_tokens: Sequence[str] | None = None,
                     student_tokens: Sequence[str] | None = None) -> str:
    """Heatmap of a [T_t, T_s] transport plan: which teacher tokens each student token draws from.

    ``teacher_tokens`` [T_t] / ``student_tokens`` [T_s]: the answers' decoded pieces, written on the axes
    (token indices when None)."""
    t_len, s_len = len(plan), len(plan[0]) if len(plan) else 0
    labelled = teacher_tokens is not None or student_tokens is not None
    size = (min(20, max(5, 0.2 * s_len + 2)), min(20, max(4, 0.2 * t_len + 1.5))) if labelled else (5, 4)
    fig, ax = plt.subplots(figsize=size)
    im = ax.imshow(plan, aspect="auto", cmap="viridis")
    for axis, tokens, rotation in ((ax.xaxis, student_tokens, 90), (ax.yaxis, teacher_tokens, 0)):
        if tokens is None:
            axis.set_major_locator(MaxNLocator(integer=True))
        else:
            at, labels = tick_labels(list(tokens))
            axis.set_ticks(at, labels, rotation=rotation, fontsize=7)
    ax.set_xlabel("student answer token")
    ax.set_ylabel("teacher answer token")
    ax.set_title("sequence-level transport plan (eval sample 0)")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def metric_vs_params_png(table: list[dict[str, Any]], keys: list[str], metric: str, path: Path) -> str | None:
    """One panel per swept parameter: each trial's final metric against its value."""
    done = [row for row in table if row.get(metric) is not None]
    if not done or not keys:
        return None
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.5), squeeze=False)
    for ax, key in zip(axes[0], keys):
        values = [row["config"].get(key) for row in done]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        xs = values if numeric else [str(v)[:24] for v in values]
        ax.scatter(xs, [row[metric] for row in done])
        ax.set_xlabel(key)
        ax.set_ylabel(metric)
        if not numeric:
            ax.tick_params(axis="x", labelrotation=60, labelsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)
