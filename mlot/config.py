"""Settings of the MultiLevelOT loss, with the defaults of each mode."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

Mode = Literal["paper", "reference"]

# Where the released code's constants differ from the paper's (method spec, section 3).
_REFERENCE_DEFAULTS: dict[str, Any] = {"alpha": 1.5, "sinkhorn_iters": 10, "sd_scale": 0.001}


@dataclass(frozen=True)
class MultiLevelOTConfig:
    """All knobs of MultiLevelOT. Defaults are the paper's (``mode="paper"``).

    Attributes:
        mode: ``paper`` (the method as published, per-sample) or ``reference`` (the released code's
            arithmetic, batch-coupled, for reproducing published numbers).
        top_k: columns kept after ranking (k); None keeps all (the "no top-k" ablation).
        teacher_temperature, student_temperature: tau for HAD and SL.
        sd_temperature: tau_SD, the temperature of the SD term's probabilities.
        ranking: ``sequence`` (one column order per sequence, the paper's SR) or ``token`` (ULD-style).
        student_ranking: ``sort`` (own column totals) or ``assignment`` (the paper's Q*: L1 linear
            assignment of student columns to the teacher's ranked columns).
        assignment_candidates: student columns considered by ``assignment`` (default 2k).
        use_sl, use_sd: switch the SL and SD terms (ablations).
        sd_level: ``sequence`` (T_t x T_s OT between answer sequences) or ``token`` (k x k OT per position).
        sinkhorn_reg: lambda; sinkhorn_iters: N; sinkhorn_tol: optional early stop on the marginals.
        alpha, beta, gamma: L = CE + alpha * (HAD + beta * SL + gamma * sd_scale * SD).
        sd_scale: extra factor on SD (1 in the paper; 0.001 in the released code).
        skip_student_eos: drop the student's final answer row (its EOS), as the released code does.
    """

    mode: Mode = "paper"
    top_k: int | None = 50
    teacher_temperature: float = 1.0
    student_temperature: float = 1.0
    sd_temperature: float = 2.0
    ranking: Literal["sequence", "token"] = "sequence"
    student_ranking: Literal["sort", "assignment"] = "sort"
    assignment_candidates: int | None = None
    use_sl: bool = True
    use_sd: bool = True
    sd_level: Literal["sequence", "token"] = "sequence"
    sinkhorn_reg: float = 0.1
    sinkhorn_iters: int = 20
    sinkhorn_tol: float | None = None
    alpha: float = 0.15
    beta: float = 0.1
    gamma: float = 0.1
    sd_scale: float = 1.0
    skip_student_eos: bool = False

    def __post_init__(self) -> None:
        _check_choice("mode", self.mode, ("paper", "reference"))
        _check_choice("ranking", self.ranking, ("sequence", "token"))
        _check_choice("student_ranking", self.student_ranking, ("sort", "assignment"))
        _check_choice("sd_level", self.sd_level, ("sequence", "token"))
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 1):
            raise ValueError(f"top_k must be a positive integer or None (keep all columns), got {self.top_k!r}")
        for name in ("teacher_temperature", "student_temperature", "sd_temperature", "sinkhorn_reg"):
            if not float(getattr(self, name)) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if not isinstance(self.sinkhorn_iters, int) or self.sinkhorn_iters < 1:
            raise ValueError(f"sinkhorn_iters must be an integer >= 1, got {self.sinkhorn_iters!r}")
        if self.sinkhorn_tol is not None and not self.sinkhorn_tol > 0:
            raise ValueError(f"sinkhorn_tol must be > 0 or None, got {self.sinkhorn_tol!r}")
        for name in ("alpha", "beta", "gamma", "sd_scale"):
            if not float(getattr(self, name)) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if self.mode == "reference" and self.top_k is None:
            raise ValueError("reference mode needs top_k (the released code keeps k columns)")
        if self.student_ranking == "assignment":
            if self.top_k is None or self.ranking != "sequence":
                raise ValueError("student_ranking='assignment' needs top_k set and ranking='sequence'")
            if self.assignment_candidates is not None and self.assignment_candidates < self.top_k:
                raise ValueError(f"assignment_candidates ({self.assignment_candidates}) "
                                 f"must be >= top_k ({self.top_k})")
        if self.use_sd and self.sd_level == "token" and self.top_k is None:
            raise ValueError("sd_level='token' needs top_k (a k x k transport per position)")

    def teacher_settings(self) -> dict[str, Any]:
        """The settings a teacher payload depends on (checked when a payload meets a loss)."""
        keys = ["mode", "top_k"] if self.mode == "reference" else [
            "mode", "top_k", "teacher_temperature", "sd_temperature", "ranking", "use_sd"]
        return {k: getattr(self, k) for k in keys}


FIELDS = tuple(f.name for f in dataclasses.fields(MultiLevelOTConfig))


def make_config(mode: Mode = "paper", **params: Any) -> MultiLevelOTConfig:
    """Build a config for ``mode``: the mode's defaults, then ``params``. Unknown names are refused."""
    unknown = sorted(set(params) - set(FIELDS))
    if unknown:
        raise ValueError(f"unknown MultiLevelOT parameter(s) {unknown}; "
                         f"allowed: {', '.join(f for f in FIELDS if f != 'mode')}")
    base = dict(_REFERENCE_DEFAULTS) if mode == "reference" else {}
    base.update(params)
    return MultiLevelOTConfig(mode=mode, **base)


def _check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
