"""Baselines the paper compares against, with MultiLevelOT's interface.

Each takes ``(student_logits, student_labels, teacher_logits_or_payload, teacher_labels, **params)``
and returns a :class:`DistillResult`; the training objective is ``CE + result.loss``.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import torch
from torch import Tensor

from .config import make_config
from .head import graph_zero
from .multilevel import compress_teacher, multilevel_ot
from .payload import TeacherPayload
from .result import DistillResult
from .rows import answer_rows, check_rows_finite
from .spans import IGNORE_INDEX, answer_spans, check_finite, compute_dtype, gather_rows, row_index

# ULD (Boizard et al. 2024) is MultiLevelOT reduced to its first term with token-wise ranking over
# the full vocabularies (shorter one zero-padded), weighted 1.5.
ULD_PARAMS: dict[str, Any] = {"ranking": "token", "top_k": None, "use_sl": False, "use_sd": False, "alpha": 1.5}


def causal_lm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """The HF causal-LM cross-entropy: mean over label tokens, logits [B, L, V] shifted against labels [B, L]
    (-100: ignored). Read chunk by chunk (``mlot.rows``): no [B * L, V] copy, in fp32 (fp64 for fp64 logits)."""
    return -answer_rows(logits, labels).gold_log_probs().mean()


def sft(student_logits: Tensor, student_labels: Tensor, teacher_logits: Any = None, teacher_labels: Any = None,
        **params: Any) -> DistillResult:
    """SFT: no distillation term (the objective is CE alone). Returns a zero that keeps the graph."""
    zero = graph_zero(student_logits)
    return DistillResult(distill=zero, alpha=0.0, per_sample=zero.expand(student_logits.shape[0]))


def uld(student_logits: Tensor, student_labels: Tensor, teacher_logits: Tensor | TeacherPayload,
        teacher_labels: Tensor | None = None, **params: Any) -> DistillResult:
    """ULD: per token, sort both full distributions, zero-pad the shorter vocabulary, sum |s - t|.

    ``mean over t < min(T_t, T_s)`` per sample, then mean over samples; alpha 1.5. Override e.g.
    ``top_k=50`` for a compact teacher payload (then ULD on the top-50 sorted probabilities).
    """
    return multilevel_ot(student_logits, student_labels, teacher_logits, teacher_labels, "paper",
                         **{**ULD_PARAMS, **params})


def kl_distill(student_logits: Tensor, student_labels: Tensor, teacher_logits: Tensor | TeacherPayload,
               teacher_labels: Tensor | None = None, *, direction: str = "forward", temperature: float = 1.0,
               top_k: int | None = None, alpha: float = 1.0) -> DistillResult:
    """Same-vocabulary KL, positions paired by index (only valid when both share one tokenizer).

    forward: KL(t || s) = sum_v t (log t - log s); reverse: KL(s || t). With ``top_k`` the teacher is
    its k largest probabilities per token (a compact payload; forward KL over those columns).
    Per-token mean over t < min(T_t, T_s), then mean over samples.
    """
    if direction not in ("forward", "reverse"):
        raise ValueError(f"direction must be 'forward' or 'reverse', got {direction!r}")
    if direction == "reverse" and top_k is not None:
        raise ValueError("reverse KL needs the teacher's full distribution: set top_k=None")
    cfg = make_config("paper", ranking="token", top_k=top_k, use_sd=False, teacher_temperature=temperature)
    payload = teacher_logits if isinstance(teacher_logits, TeacherPayload) else compress_teacher(
        teacher_logits, teacher_labels, config=cfg)
    if payload.settings != cfg.teacher_settings():
        raise ValueError(f"teacher payload settings {payload.settings} do not match KL's {cfg.teacher_settings()}")
    start, s_len = answer_spans(student_labels, name="student_labels")
    V = student_logits.shape[-1]
    t_cols = payload.columns.to(student_logits.device)
    if int(t_cols.max()) >= V or (top_k is None and payload.probs.shape[-1] != V):
        raise ValueError("same-vocabulary KL needs one vocabulary: the teacher's has "
                         f"{payload.probs.shape[-1] if top_k is None else 'ids >= ' + str(V)}"
                         f" entries, the student's {V}; use multilevel_ot or uld across tokenizers")
    width = max(int(s_len.max()), payload.probs.shape[1])
    index, s_mask = row_index(start, s_len, width, student_logits.shape[1])
    rows = answer_rows(student_logits, student_labels)
    check_rows_finite(rows.lse_at(index, s_mask, temperature), s_mask, "student_logits")
    dtype = rows.dtype
    t = torch.nn.functional.pad(payload.probs.to(dtype), (0, 0, 0, width - payload.probs.shape[1]))
    cols = torch.nn.functional.pad(t_cols, (0, 0, 0, width - t_cols.shape[1]))
    n = torch.minimum(s_len, payload.lengths.to(s_len.device))
    pair = torch.arange(width, device=n.device)[None] < n[:, None]
    log_q_k = rows.log_softmax_at(index, pair, cols, (temperature,))[0]  # the paired rows at the teacher's columns
    log_t = torch.log(t.clamp_min(torch.finfo(dtype).tiny))
    if direction == "forward":
        per_row = (t * (log_t - log_q_k)).sum(-1)
    else:  # top_k is None: columns are a permutation of the vocabulary
        q_k = log_q_k.exp()
        per_row = (q_k * (log_q_k - log_t)).sum(-1)
    per_sample = (pair * per_row).sum(1) / n.clamp(min=1).to(dtype)
    return DistillResult(distill=per_sample.mean(), alpha=alpha, per_sample=per_sample, terms={"kl": per_sample})


# ---------------------------------------------------------------------------- MinED


def _clean(token: str) -> str:
    """Token surface text without the tokenizer's space/continuation markers (byte-BPE, SentencePiece, WordPiece)."""
    return token.replace("Ġ", " ").replace("▁", " ").replace("Ċ", "\n").removeprefix("##").strip().lower()


@lru_cache(maxsize=1 << 20)
def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance between two strings."""
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def mined_alignment(teacher_tokens: list[str], student_tokens: list[str]) -> list[int]:
    """Align two tokenizations of one text by minimum total edit distance (monotone, DTW-style).

    Returns, for each student token j, the teacher token index it is aligned with.
    """
    t = [_clean(x) for x in teacher_tokens]
    s = [_clean(x) for x in student_tokens]
    n, m = len(t), len(s)
    inf = float("inf")
    D = [[inf] * (m + 1) for _ in range(n + 1)]
    D[0][0] = 0.0
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            D[i][j] = edit_distance(t[i - 1], s[j - 1]) + min(D[i - 1][j - 1], D[i - 1][j], D[i][j - 1])
    align = [0] * m
    i, j = n, m
    while i > 0 and j > 0:  # walk back, keeping for each student token the cheapest teacher partner
        if edit_distance(t[i - 1], s[j - 1]) <= edit_distance(t[align[j - 1]], s[j - 1]) or align[j - 1] == 0:
            align[j - 1] = i - 1
        step = min((D[i - 1][j - 1], 0), (D[i - 1][j], 1), (D[i][j - 1], 2))[1]
        i, j = (i - 1, j - 1) if step == 0 else (i - 1, j) if step == 1 else (i, j - 1)
    return align


class VocabMap:
    """Maps teacher token ids to the student token with the nearest surface string (edit distance).

    Candidates for a teacher token are an exact surface match and the pieces the student tokenizer
    makes of its text; the nearest by edit distance wins. Cached per id.
    """

    def __init__(self, teacher_tokenizer: Any, student_tokenizer: Any) -> None:
        self.t, self.s = teacher_tokenizer, student_tokenizer
        self.cache: dict[int, int] = {}
        self.by_text: dict[str, int] = {}
        for tok, idx in student_tokenizer.get_vocab().items():
            self.by_text.setdefault(_clean(tok), idx)

    def __call__(self, teacher_id: int) -> int:
        if teacher_id not in self.cache:
            text = _clean(self.t.convert_ids_to_tokens(int(teacher_id)) or "")
            if text in self.by_text:
                self.cache[teacher_id] = self.by_text[text]
            else:
                pieces = self.s.encode(text, add_special_tokens=False) or [self.s.unk_token_id or 0]
                names = self.s.convert_ids_to_tokens(pieces)
                self.cache[teacher_id] = min(zip(names, pieces), key=lambda p: edit_distance(_clean(p[0]), text))[1]
        return self.cache[teacher_id]


def mined(student_logits: Tensor, student_labels: Tensor, teacher_logits: Tensor, teacher_labels: Tensor, *,
          teacher_tokenizer: Any, student_tokenizer: Any, top_k: int = 50, temperature: float = 1.0,
          alpha: float = 1.0, vocab_map: VocabMap | None = None) -> DistillResult:
    """MinED (Wan et al. 2024): KL to the teacher's distribution carried over by minimum edit distance.

    Tokens are aligned by :func:`mined_alignment`; at each student answer token, the teacher's top-k
    probabilities at its aligned token are moved to student ids (:class:`VocabMap`), summed and
    renormalised, and KL(target || student) is averaged over tokens, then samples. The alignment is
    string work on token ids (done once per batch on the CPU); the loss itself is batched.
    """
    if teacher_logits.shape[0] != student_logits.shape[0]:
        raise ValueError(f"batch size mismatch: student {student_logits.shape[0]}, teacher {teacher_logits.shape[0]}")
    vmap = vocab_map or VocabMap(teacher_tokenizer, student_tokenizer)
    cfg = make_config("paper", ranking="token", top_k=top_k, use_sd=False, teacher_temperature=temperature)
    payload = compress_teacher(teacher_logits, teacher_labels, config=cfg)
    s_start, s_len = answer_spans(student_labels, name="student_labels")
    t_ids = [row[row != IGNORE_INDEX].tolist() for row in teacher_labels]
    s_ids = [row[row != IGNORE_INDEX].tolist() for row in student_labels]
    width = int(s_len.max())
    device = student_logits.device
    align = torch.full((len(s_ids), width), -1, dtype=torch.long)
    for b, (ti, si) in enumerate(zip(t_ids, s_ids)):  # string alignment: inherently per sample
        align[b, : len(si)] = torch.tensor(mined_alignment(teacher_tokenizer.convert_ids_to_tokens(ti),
                                                           student_tokenizer.convert_ids_to_tokens(si)))
    align = align.to(device)
    valid = align >= 0
    idx = align.clamp(min=0)
    k = payload.probs.shape[-1]
    t_probs = payload.probs.to(device).gather(1, idx[..., None].expand(-1, -1, k))  # [B, Ts, k]
    t_cols = payload.columns.to(device).gather(1, idx[..., None].expand(-1, -1, k))
    uniq, inv = torch.unique(t_cols, return_inverse=True)
    mapped = torch.tensor([vmap(int(u)) for u in uniq.tolist()], dtype=torch.long, device=device)[inv]
    rows, s_mask = gather_rows(student_logits, s_start, s_len, width)
    check_finite(rows, s_mask, "student_logits")
    dtype = compute_dtype(student_logits)
    log_q = torch.log_softmax(rows.to(dtype) / temperature, -1)
    target = torch.zeros_like(log_q).scatter_add_(-1, mapped, t_probs.to(dtype))
    target = target / target.sum(-1, keepdim=True).clamp_min(torch.finfo(dtype).tiny)
    kl = (target * (torch.log(target.clamp_min(torch.finfo(dtype).tiny)) - log_q)).sum(-1)
    ok = valid & s_mask
    per_sample = (ok * kl).sum(1) / ok.sum(1).clamp(min=1).to(dtype)
    return DistillResult(distill=per_sample.mean(), alpha=alpha, per_sample=per_sample, terms={"kl": per_sample})
