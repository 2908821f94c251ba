"""The ``"auto"`` values of a DeepSpeed config, as transformers' Trainer fills them: one definition for the config
check (``orchestrator.config``) and the engine (``workers.student.engine``). Torch-free.

ZeRO's buffer sizes are sized by the model's hidden size H, not by DeepSpeed's fixed defaults: reduce buckets of
H² elements instead of 5e8 (for a 0.1-1B student 5e8 is its whole gradient, held at full size on every rank before
the reduce-scatter), a prefetch bucket of 0.9·H², and parameters under 10·H elements (norms, biases) kept whole.
The buckets never go below ``MIN_BUCKET`` elements: at a test model's H = 64, H² would mean hundreds of tiny
collectives per step. Measured: ``docs/benchmarks.md`` (a training rank's memory).
"""

from __future__ import annotations

from typing import Any

MIN_BUCKET = 1 << 20
#: The generated ZeRO-3 config's ``sub_group_size`` (DeepSpeed's default: 1e9). The optimizer steps one sub-group of
#: at most this many elements at a time, so what the step allocates on top of the states (the flattened gradient,
#: Adam's denominator) is bounded by 40 MB in fp32, not a temporary copy of the rank's whole partition.
SUB_GROUP = 10_000_000
#: zero_optimization keys sized from the hidden size (None: the model is not built yet, DeepSpeed's default then).
SIZED = ("reduce_bucket_size", "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold")
#: Top-level keys mlot always sets itself from ``train`` (an ``"auto"`` there is fine).
FROM_TRAIN = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping", "train_batch_size")


def sized(hidden: int) -> dict[str, int]:
    """The :data:`SIZED` values for a model of hidden size ``hidden``."""
    return {"reduce_bucket_size": max(hidden * hidden, MIN_BUCKET),
            "stage3_prefetch_bucket_size": max(int(0.9 * hidden * hidden), MIN_BUCKET),
            "stage3_param_persistence_threshold": 10 * hidden}


def unresolvable(cfg: dict[str, Any]) -> list[str]:
    """Dotted keys of ``cfg`` whose value is ``"auto"`` and that mlot does not fill (the fix: a number there)."""
    known = {f"zero_optimization.{k}" for k in SIZED} | set(FROM_TRAIN) | {"bf16.enabled", "fp16.enabled"}

    def walk(node: Any, prefix: str) -> list[str]:
        if isinstance(node, dict):
            return [k for key, v in node.items() for k in walk(v, f"{prefix}{key}.")]
        return [prefix[:-1]] if node == "auto" and prefix[:-1] not in known else []
    return walk(cfg, "")


def resolve(cfg: dict[str, Any], hidden: int | None, dtype: str) -> dict[str, Any]:
    """``cfg`` with its ``"auto"`` values filled: the :data:`SIZED` keys from ``hidden`` (dropped when it is None:
    DeepSpeed's defaults while the model is being built, where they are not used), ``bf16`` / ``fp16`` from the
    student's ``dtype``. The :data:`FROM_TRAIN` keys are the caller's."""
    out = {**cfg, "zero_optimization": dict(cfg.get("zero_optimization", {}))}
    zero = out["zero_optimization"]
    for key, value in (sized(hidden) if hidden else {}).items():
        if zero.get(key) == "auto":
            zero[key] = value
    for key in [k for k in SIZED if zero.get(k) == "auto"]:
        del zero[key]
    for section, on in (("bf16", dtype == "bfloat16"), ("fp16", dtype == "float16")):
        if isinstance(out.get(section), dict) and out[section].get("enabled") == "auto":
            out[section] = {**out[section], "enabled": on}
    return out
