"""MultiLevelOT: token-level (HAD, SL) and sequence-level (SD) optimal-transport distillation.

Two modes (see ``../shared/method/MULTILEVELOT.md``):

* ``paper``: the method as published. Per-sample sequence ranking and top-k, HAD/SL over paired
  positions, SD as log-domain entropic OT between the two answer sequences. A sample's loss does not
  depend on its batch partners.
* ``reference``: the released code's arithmetic, bit for bit (per-row std temperature, batch ranking,
  zero padding to the batch's longest answer, plain Sinkhorn), for reproducing published numbers.

Every function is split into a teacher side (``compress_teacher``: logits -> a small payload) and a
student side (the loss on a payload), so a teacher can run on another device or machine.
``multilevel_ot`` given teacher logits runs both sides in-process through the same code.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .config import MultiLevelOTConfig, make_config
from .ot import sinkhorn_log, sinkhorn_plain, uniform_log_marginal
from .payload import TeacherPayload
from .ranking import assignment_ranking
from .result import DistillResult
from .rows import AnswerRows, answer_rows, check_rows_finite
from .softmax import reference_probs, reference_row_stats
from .spans import answer_spans, compute_dtype, row_index


def compress_teacher(
    teacher_logits: Tensor, teacher_labels: Tensor, mode: str = "paper", *, config: MultiLevelOTConfig | None = None,
    **params: Any,
) -> TeacherPayload:
    """Turn teacher logits into the payload that is all the loss needs from the teacher.

    Args:
        teacher_logits: [B, L_t, V_t] (any float dtype; softmax runs in fp32, or fp64 for fp64 input).
        teacher_labels: [B, L_t] answer token ids, -100 elsewhere.
        mode, params: as for :func:`multilevel_ot` (or a ready ``config``).

    Returns:
        a :class:`TeacherPayload` holding [B, T_t, k] ranked probabilities.
    """
    cfg = config or make_config(mode, **params)
    with torch.no_grad():
        start, length = answer_spans(teacher_labels, name="teacher_labels")
        if cfg.mode == "reference":
            index, mask = row_index(start, length, int(length.max()), teacher_logits.shape[1])
            dtype = compute_dtype(teacher_logits)
            stats = reference_row_stats(teacher_logits, index, mask, dtype)
            check_rows_finite(stats.lse, mask, "teacher_logits")
            columns = stats.totals.topk(_k(cfg, teacher_logits.shape[-1])).indices
            probs = reference_probs(teacher_logits, index, mask, columns, stats, dtype)
            return TeacherPayload("reference", probs, None, columns.int(), length, cfg.teacher_settings())
        # Paper mode: one chunked pass for normalisers and ranking statistics, then only k columns.
        return _teacher_paper(AnswerRows(teacher_logits, teacher_labels), start, length, cfg)


def multilevel_ot(
    student_logits: Tensor,
    student_labels: Tensor,
    teacher_logits: Tensor | TeacherPayload,
    teacher_labels: Tensor | None = None,
    mode: str = "paper",
    *,
    config: MultiLevelOTConfig | None = None,
    **params: Any,
) -> DistillResult:
    """The MultiLevelOT distillation loss.

    Args:
        student_logits: [B, L_s, V_s], differentiable.
        student_labels: [B, L_s] answer token ids, -100 elsewhere (prompt, padding).
        teacher_logits: [B, L_t, V_t] teacher logits, or a :class:`TeacherPayload` from
            :func:`compress_teacher` (then ``teacher_labels`` is None).
        teacher_labels: [B, L_t].
        mode: ``"paper"`` (default) or ``"reference"``.
        params: any :class:`MultiLevelOTConfig` field (top_k, temperatures, sinkhorn_reg, ...).

    Returns:
        :class:`DistillResult` with ``had`` [B], ``sl``, ``sd`` ([B] paper, [] reference), ``distill`` []
        and ``loss = alpha * distill``.
    """
    cfg = config or make_config(mode, **params)
    if isinstance(teacher_logits, TeacherPayload):
        if teacher_labels is not None:
            raise ValueError("teacher_labels must be None when teacher_logits is a TeacherPayload "
                             "(it carries its spans)")
        payload = teacher_logits
    else:
        if teacher_labels is None:
            raise ValueError("teacher_labels is required with teacher logits")
        if teacher_logits.shape[0] != student_logits.shape[0]:
            raise ValueError(f"batch size mismatch: student_logits has {student_logits.shape[0]} samples, "
                             f"teacher_logits has {teacher_logits.shape[0]}")
        payload = compress_teacher(teacher_logits, teacher_labels, config=cfg)
    _check_inputs(student_logits, student_labels, payload, cfg)
    payload = payload.to(student_logits.device)
    if cfg.mode == "reference":
        return _student_reference(student_logits, student_labels, payload, cfg)
    return _student_paper(student_logits, student_labels, payload, cfg)


# ---------------------------------------------------------------------------- paper mode


def _teacher_paper(rows: AnswerRows, start: Tensor, length: Tensor, cfg: MultiLevelOTConfig) -> TeacherPayload:
    width = int(length.max())
    index, mask = row_index(start, length, width, rows.logits.shape[1])
    k = _k(cfg, rows.logits.shape[-1])
    sd_other = cfg.use_sd and cfg.sd_temperature != cfg.teacher_temperature
    temps = [cfg.teacher_temperature] + ([cfg.sd_temperature] if sd_other else [])
    columns, lse = _ranked_columns(rows, index, mask, temps, cfg.ranking, k, "teacher_logits")
    probs = rows.log_softmax_at(index, mask, columns, temps[:1])[0].exp() * mask[..., None]
    sd_log_shift = None
    if sd_other:
        # softmax(z/tau_sd)_i = p_i ** r * exp(shift): the per-token shift is all SD needs beyond p.
        r = cfg.teacher_temperature / cfg.sd_temperature
        sd_log_shift = (r * lse - rows.lse_at(index, mask, cfg.sd_temperature)) * mask
    return TeacherPayload("paper", probs, sd_log_shift, columns.int(), length, cfg.teacher_settings())


def _ranked_columns(rows: AnswerRows, index: Tensor, mask: Tensor, temps: list[float], ranking: str, k: int,
                    name: str) -> tuple[Tensor, Tensor]:
    """One chunked pass over the answer rows at ``index`` [B, W] where ``mask``: the normalisers of ``temps``
    and the sort ranking at the first, ``ranking`` ``sequence`` (column totals per sample: [B, k] ids) or
    ``token`` (per row: [B, W, k]). Returns (columns, lse [B, W] at the first temperature)."""
    totals, top = rows.scan(temps, weights=rows.weights(index, mask) if ranking == "sequence" else None,
                            top_k=k if ranking == "token" else None)
    lse = rows.lse_at(index, mask, temps[0])
    check_rows_finite(lse, mask, name)
    columns = totals.topk(k, dim=-1).indices if ranking == "sequence" else rows.at(index, mask, top)
    return columns, lse


def _student_paper(logits: Tensor, labels: Tensor, payload: TeacherPayload, cfg: MultiLevelOTConfig) -> DistillResult:
    start, s_len = answer_spans(labels, drop_last=cfg.skip_student_eos, name="student_labels")
    t_len = payload.lengths
    width = max(int(s_len.max()), payload.probs.shape[1], 1)
    index, s_mask = row_index(start, s_len, width, logits.shape[1])
    rows = answer_rows(logits, labels)
    dtype = rows.dtype
    t_mask = _length_mask(t_len, width)
    pair = _length_mask(torch.minimum(t_len, s_len), width)
    n_pair = pair.sum(1).clamp(min=1).to(dtype)
    t_k = _pad_rows(payload.probs.to(dtype), width)
    k = min(t_k.shape[-1], logits.shape[-1])

    # One chunked pass over the student's answer rows: normalisers and ranking statistics.
    sd_other = cfg.use_sd and cfg.sd_temperature != cfg.student_temperature
    temps = [cfg.student_temperature] + ([cfg.sd_temperature] if sd_other else [])
    assign = cfg.ranking == "sequence" and cfg.student_ranking == "assignment"
    pool_k = min(cfg.assignment_candidates or 2 * k, logits.shape[-1]) if assign else k
    columns, _ = _ranked_columns(rows, index, s_mask, temps, cfg.ranking, pool_k, "student_logits")
    if assign:
        with torch.no_grad():
            pool_probs = rows.log_softmax_at(index, s_mask, columns, temps[:1])[0].exp() * s_mask[..., None]
            columns = assignment_ranking(t_k, pool_probs, columns, pair)
    # The only reads with a gradient: log-softmax per temperature at the k kept columns (chunked, mlot.rows).
    log_p = rows.log_softmax_at(index, s_mask, columns, temps)
    m = s_mask[..., None]
    # With top_k=None the vocabularies differ in size: zero-pad the shorter side (as ULD does);
    # a padded student column scores log 1 = 0 in SL, i.e. teacher mass there is not rewarded.
    s_k, t_k = _pad_to_same_k(log_p[0].exp() * m, t_k)
    log_s_k, _ = _pad_to_same_k(log_p[0] * m, t_k)

    had = (pair * (t_k - s_k).abs().sum(-1)).sum(1) / n_pair
    zero = torch.zeros_like(had)
    sl = (pair * -(t_k * log_s_k).sum(-1)).sum(1) / n_pair if cfg.use_sl else zero
    sd, plan = zero, None
    if cfg.use_sd:
        t_sd = payload.sd_probs(cfg.sd_temperature, cfg.teacher_temperature).to(dtype)
        a = _pad_to_same_k(_pad_rows(t_sd, width), s_k)[0]
        b = _pad_to_same_k(log_p[1].exp() * m, t_k)[0] if sd_other else s_k
        if cfg.sd_level == "sequence":
            sd, plan = sequence_sinkhorn_distance(a, b, t_mask, s_mask, cfg)
        else:
            sd = (pair * token_sinkhorn_distance(a, b, cfg)).sum(1) / n_pair
    per_sample = had + cfg.beta * sl + cfg.gamma * cfg.sd_scale * sd
    return DistillResult(
        distill=per_sample.mean(), alpha=cfg.alpha, per_sample=per_sample, terms={"had": had, "sl": sl, "sd": sd},
        plan=plan, teacher_columns=payload.columns, student_columns=columns,
    )


def sequence_sinkhorn_distance(
    a: Tensor, b: Tensor, a_mask: Tensor, b_mask: Tensor, cfg: MultiLevelOTConfig
) -> tuple[Tensor, Tensor]:
    """Sequence-level Sinkhorn distance between answer sequences of different lengths.

    a: [B, T, k] teacher rows, b: [B, T, k] student rows, masks [B, T] (valid rows). Cost
    ``C_ij = ||a_i - b_j||_1``, uniform marginals on the valid rows, plan of mass 1.
    Returns the distance <P, C> [B] and the plan P [B, T, T] (detached).
    """
    cost = torch.cdist(a, b, p=1)
    plan = sinkhorn_log(cost, uniform_log_marginal(a_mask, cost.dtype), uniform_log_marginal(b_mask, cost.dtype),
                        cfg.sinkhorn_reg, cfg.sinkhorn_iters, cfg.sinkhorn_tol)
    present = a_mask.any(1) & b_mask.any(1)  # an empty span transports nothing
    return (plan * cost).sum((1, 2)) * present, plan.detach()


def token_sinkhorn_distance(a: Tensor, b: Tensor, cfg: MultiLevelOTConfig) -> Tensor:
    """Token-level SD (ablation): per position, OT between the k teacher and k student ranked probabilities.

    a, b: [B, T, k]. Cost ``|a_i - b_j|`` (k x k), uniform marginals. Returns <P, C> per position, [B, T].
    """
    B, T, k = a.shape
    cost = (a[..., :, None] - b[..., None, :]).abs().reshape(B * T, k, k)
    log_u = torch.full((B * T, k), -torch.log(torch.tensor(float(k))).item(), dtype=a.dtype, device=a.device)
    plan = sinkhorn_log(cost, log_u, log_u, cfg.sinkhorn_reg, cfg.sinkhorn_iters, cfg.sinkhorn_tol)
    return (plan * cost).sum((1, 2)).reshape(B, T)


# ---------------------------------------------------------------------------- reference mode


def _student_reference(logits: Tensor, labels: Tensor, payload: TeacherPayload,
                       cfg: MultiLevelOTConfig) -> DistillResult:
    start, s_len = answer_spans(labels, drop_last=cfg.skip_student_eos, name="student_labels")
    t_len = payload.lengths
    width = max(int(s_len.max()), int(t_len.max()), 1)  # M: the batch's longest answer, either side
    index, s_mask = row_index(start, s_len, width, logits.shape[1])
    dtype = compute_dtype(logits)
    stats = reference_row_stats(logits, index, s_mask, dtype)
    check_rows_finite(stats.lse, s_mask, "student_logits")
    columns = stats.totals.topk(min(payload.probs.shape[-1], logits.shape[-1])).indices
    # A vocabulary smaller than k (the released code would fail): zero-pad the shorter side, as paper mode does.
    s_k, t_k = _pad_to_same_k(reference_probs(logits, index, s_mask, columns, stats, dtype),
                              _pad_rows(payload.probs.to(dtype), width))
    pair_len = torch.minimum(s_len, t_len)
    pair = _length_mask(pair_len, width)
    had = (pair * (s_k - t_k).abs().sum(-1)).sum(1) / pair_len.clamp(min=1).to(dtype)
    # Released arithmetic: student-weighted, probabilities re-softmaxed, mean over all B*M rows.
    sl = -(torch.softmax(s_k, -1) * torch.log_softmax(t_k, -1)).sum(-1).mean()
    cost = torch.cdist(torch.softmax(t_k / cfg.sd_temperature, -1), torch.softmax(s_k / cfg.sd_temperature, -1), p=1)
    plan = sinkhorn_plain(cost, cfg.sinkhorn_reg, cfg.sinkhorn_iters)
    sd = cfg.sd_scale * (plan * cost).sum()
    distill = (had + cfg.beta * sl).mean() + cfg.gamma * sd
    return DistillResult(
        distill=distill, alpha=cfg.alpha, per_sample=None, terms={"had": had, "sl": sl, "sd": sd},
        plan=plan.detach(), teacher_columns=payload.columns, student_columns=columns,
    )


# ---------------------------------------------------------------------------- helpers


def _k(cfg: MultiLevelOTConfig, vocab: int) -> int:
    return vocab if cfg.top_k is None else min(cfg.top_k, vocab)


def _length_mask(lengths: Tensor, width: int) -> Tensor:
    return torch.arange(width, device=lengths.device)[None, :] < lengths[:, None]


def _pad_rows(x: Tensor, width: int) -> Tensor:
    """Zero-pad [B, T, k] to [B, width, k]."""
    return F.pad(x, (0, 0, 0, width - x.shape[1])) if x.shape[1] < width else x


def _pad_to_same_k(x: Tensor, other: Tensor) -> tuple[Tensor, Tensor]:
    """Zero-pad whichever of x, other [B, T, k] has fewer columns."""
    k = max(x.shape[-1], other.shape[-1])
    return F.pad(x, (0, k - x.shape[-1])), F.pad(other, (0, k - other.shape[-1]))


def _check_inputs(student_logits: Tensor, student_labels: Tensor, payload: TeacherPayload,
                  cfg: MultiLevelOTConfig) -> None:
    if student_logits.dim() != 3:
        raise ValueError(f"student_logits must be [batch, seq_len, vocab], got shape {tuple(student_logits.shape)}")
    if student_labels.shape != student_logits.shape[:2]:
        raise ValueError(f"student_labels shape {tuple(student_labels.shape)} does not match student_logits "
                         f"{tuple(student_logits.shape[:2])}")
    if payload.batch_size != student_logits.shape[0]:
        raise ValueError(f"batch size mismatch: student has {student_logits.shape[0]} samples, "
                         f"the teacher payload has {payload.batch_size}")
    want = cfg.teacher_settings()
    if payload.settings != want:
        diff = {k: (payload.settings.get(k), v) for k, v in want.items() if payload.settings.get(k) != v}
        raise ValueError(f"teacher payload was computed with other settings than this loss: {diff} "
                         "(payload value, loss value); compress the teacher with the loss's settings")
