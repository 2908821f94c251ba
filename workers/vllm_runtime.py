"""What both vLLM actors (the teacher engine, ``workers.teacher.vllm_engine``, and the on-policy generator,
``workers.student.vllm_generator``) do before building an engine. Imported only in the vLLM runtime's processes."""

from __future__ import annotations

import os
from typing import Any

from specs import UserError


def engine_in_process() -> None:
    """Run vLLM's engine core in this actor's process (no engine-core child), so Ray's restarts and kills cover it;
    and keep its log to warnings. Before the first ``import vllm``."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")


def check_head_size(text_config: Any, who: str) -> None:
    """Refuse, naming ``who`` (the config field), a model whose attention head size vLLM's CPU attention has no
    kernel for (it would fail deep inside the engine build otherwise). No check on other platforms."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    head = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
    sizes = CPUAttentionBackend.get_supported_head_sizes()
    if head not in sizes:
        raise UserError(f"{who}: head size {head} (hidden_size / num_attention_heads) has no vLLM CPU attention "
                        f"kernel; supported: {sizes} (change num_attention_heads, or use engine: hf)")
