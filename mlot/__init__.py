"""mlot: cross-tokenizer distillation losses (MultiLevelOT and baselines). Pure PyTorch, no Ray.

    import mlot
    result = mlot.multilevel_ot(student_logits, student_labels, teacher_logits, teacher_labels)
    loss = ce + result.loss                      # alpha * (HAD + beta*SL + gamma*SD)

    payload = mlot.compress_teacher(teacher_logits, teacher_labels)   # on the teacher's device
    result = mlot.multilevel_ot(student_logits, student_labels, payload)  # identical result
"""

from . import identity, mixing
from .baselines import causal_lm_loss, kl_distill, mined, mined_alignment, sft, uld
from .config import MultiLevelOTConfig, make_config
from .head import HeadLogits
from .methods import METHODS, Method, get_method, register
from .multilevel import compress_teacher, multilevel_ot
from .objective import Objective
from .ot import sinkhorn_log, sinkhorn_plain
from .payload import TeacherPayload, full_logits_bytes_per_token
from .result import DistillResult
from .spans import answer_spans, gather_rows

__all__ = [
    "METHODS", "DistillResult", "HeadLogits", "Method", "MultiLevelOTConfig", "Objective", "TeacherPayload",
    "answer_spans", "causal_lm_loss", "compress_teacher", "full_logits_bytes_per_token", "gather_rows", "get_method",
    "identity", "kl_distill", "make_config", "mined", "mined_alignment", "mixing", "multilevel_ot", "register", "sft",
    "sinkhorn_log", "sinkhorn_plain", "uld",
]
