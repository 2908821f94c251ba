"""What runs a teacher's replicas (``teachers[i].engine``): an HF model in the project's runtime, or vLLM in its own;
and the on-policy vLLM generator (``train.on_policy.engine: vllm``).

vLLM pins another transformers than the project, so its actors run in the venv ``scripts/setup_vllm.sh``
creates: Ray starts them with that venv's python (``runtime_env={"py_executable": ...}``). The driver never
imports vLLM.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from orchestrator.cluster import actor_options
from specs import UserError

#: The repository root: ``teachers[i].vllm.python`` and ``train.on_policy.vllm.python`` are relative to it.
REPO = Path(__file__).resolve().parents[1]


def vllm_python(runtime: Any, field: str) -> str:
    """The absolute path of a ``VllmRuntime``'s ``python`` (the config's ``field``, e.g. ``teachers.0.vllm``); a
    UserError naming the field when it is no interpreter (checked on the driver's node: every node hosting the
    engine needs it at the same path)."""
    path = Path(runtime.python).expanduser()
    path = path if path.is_absolute() else REPO / path
    if not (path.is_file() and os.access(path, os.X_OK)):
        raise UserError(f"{field}.python: no Python interpreter at {path} (engine: vllm runs in its "
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
        python = vllm_python(teacher.vllm, f"teachers.{index}.vllm")
        options = {**actor_options(teacher.resources), "runtime_env": {"py_executable": python}}
        actor = ray.remote(VllmTeacher).options(**options)
        return [actor.remote(teacher, job.data, job.loss, job.train.seed, weights, job.student)
                for _ in range(teacher.replicas)]
    from workers.teacher.actor import TeacherActor
    from workers.teacher.batching import BatchingTeacher

    batching = teacher.serving.max_batch_tokens is not None
    actor = ray.remote(BatchingTeacher if batching else TeacherActor).options(**actor_options(teacher.resources))
    return [actor.remote(teacher, job.data, job.loss, job.train.seed, weights, cache, job.student,
                         job.tune.teacher_cache_bytes, **({"serving": teacher.serving} if batching else {}))
            for _ in range(teacher.replicas)]


def start_generator(job: Any) -> Any:
    """The on-policy vLLM generator of ``job`` (``workers.student.vllm_generator``), or None when it runs none."""
    if not job.train.on_policy.generator:
        return None
    import ray

    from workers.student.vllm_generator import VllmGenerator

    on_policy = job.train.on_policy
    options = {**actor_options(on_policy.resources), "max_task_retries": 0,  # a lost weight load is not replayed
               "runtime_env": {"py_executable": vllm_python(on_policy.vllm, "train.on_policy.vllm")}}
    return ray.remote(VllmGenerator).options(**options).remote(job.student, on_policy, job.data.max_prompt_length,
                                                               job.train.seed)
