"""What runs a teacher's replicas (``teachers[i].engine``): an HF model in the project's runtime, or vLLM in its own.

vLLM pins another transformers than the project, so its replicas run in the venv ``scripts/setup_vllm.sh``
creates: Ray starts them with that venv's python (``runtime_env={"py_executable": ...}``). The driver never
imports vLLM.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from orchestrator.cluster import teacher_options
from specs import UserError

#: The repository root: ``teachers[i].vllm.python`` is relative to it.
REPO = Path(__file__).resolve().parents[1]


def vllm_python(teacher: Any, index: int) -> str:
    """The absolute path of ``teachers[index].vllm.python``; a UserError naming the field when it is no interpreter
    (checked on the driver's node: every node hosting a replica needs it at the same path)."""
    path = Path(teacher.vllm.python).expanduser()
    path = path if path.is_absolute() else REPO / path
    if not (path.is_file() and os.access(path, os.X_OK)):
        raise UserError(f"teachers.{index}.vllm.python: no Python interpreter at {path} (engine: vllm runs in its "
                        "own runtime); create it with `bash scripts/setup_vllm.sh` in the repository root, or point "
                        "the field at one")
    return str(path)


def start_replicas(job: Any, teacher: Any, index: int, weights: str | None, cache: bool) -> list[Any]:
    """Start the replicas of ``teachers[index]`` on its engine; they load ``weights`` (a saved folder) when given.

    ``cache``: keep hidden states for a sweep's later trials (the hf engine's; refused for vllm).
    """
    import ray

    if teacher.engine == "vllm":
        from workers.teacher.vllm_engine import VllmTeacher

        if cache:
            raise UserError(f"teachers.{index}.engine: vllm keeps no hidden-state cache, which the teachers a sweep "
                            "shares need: run mlot tune with --no-share-teachers, or use engine: hf")
        options = {**teacher_options(teacher), "runtime_env": {"py_executable": vllm_python(teacher, index)}}
        actor = ray.remote(VllmTeacher).options(**options)
        return [actor.remote(teacher, job.data, job.loss, job.train.seed, weights, job.student)
                for _ in range(teacher.replicas)]
    from workers.teacher.actor import TeacherActor
    from workers.teacher.batching import BatchingTeacher

    batching = teacher.serving.max_batch_tokens is not None
    actor = ray.remote(BatchingTeacher if batching else TeacherActor).options(**teacher_options(teacher))
    return [actor.remote(teacher, job.data, job.loss, job.train.seed, weights, cache, job.student,
                         job.tune.teacher_cache_bytes, **({"serving": teacher.serving} if batching else {}))
            for _ in range(teacher.replicas)]
