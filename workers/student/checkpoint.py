"""Checkpoints (DeepSpeed ZeRO shards through Ray Train) and the consolidated HF export of the student.

Each of these is a collective: every rank must call it, at the same step.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from specs import storage

CKPT_TAG = "mlot"


def save(engine: Any, metrics: dict[str, float], step: int, fingerprint: str, upload: str = "sync",
         counters: dict[str, int] | None = None) -> None:
    """Every rank saves its ZeRO shard to local disk and reports; Ray merges the rank directories into one
    checkpoint on the run's storage. ``counters``: the loop's running counts (skipped micro-batches), restored
    with the step so that a restarted run goes on counting where it was.

    ``upload``: ``sync`` (training resumes once the checkpoint is on storage) or ``async`` (Ray Train uploads it
    in the background and deletes the local copy after; training goes on at once: on remote storage the upload of
    a large student's shards costs no step time).
    """
    import ray.train
    from ray.train import Checkpoint, CheckpointUploadMode

    d = tempfile.mkdtemp(prefix="mlot-ckpt-")  # kept until Ray Train has uploaded it (async: it deletes it)
    try:
        engine.save_checkpoint(d, tag=CKPT_TAG, client_state={"step": step, "rng": torch.get_rng_state(),
                                                                  "counters": counters or {}})
        Path(d, "mlot_job.json").write_text(json.dumps({"step": step, "fingerprint": fingerprint}))
        mode = CheckpointUploadMode.ASYNC if upload == "async" else CheckpointUploadMode.SYNC
        ray.train.report({**metrics, "step": step}, checkpoint=Checkpoint.from_directory(d),
                         checkpoint_upload_mode=mode)
    finally:
        if upload != "async":
            shutil.rmtree(d, ignore_errors=True)


def newest(run_dir: str, world: int) -> str | None:
    """The newest whole checkpoint under a Ray Train run's folder (a local path or URI): every rank's ZeRO shard
    is there. A driver that was killed may not have recorded its last checkpoints with Ray Train (its controller
    died with it); they are on storage all the same, and ``--resume`` continues from them."""
    for name in reversed(storage.listdir(run_dir)):
        folder = storage.join(run_dir, name)
        if name.startswith("checkpoint_") and storage.exists(storage.join(folder, "mlot_job.json")):
            shards = [f for f in storage.listdir(storage.join(folder, CKPT_TAG)) if f.endswith("optim_states.pt")]
            if len(shards) == world:
                return folder
    return None


def _step(ckpt: Any) -> int:
    with ckpt.filesystem.open_input_stream(f"{ckpt.path}/mlot_job.json") as f:
        return json.loads(f.read())["step"]


def restore(engine: Any, fingerprint: str, found: str | None = None) -> tuple[int, dict[str, int]]:
    """Load the run's newest checkpoint, if any; return the optimizer step to start at and the loop's counters
    saved with it (:func:`save`; none: 0 and {}).

    Ray Train hands one over after a worker-group restart and to a ``--resume`` (the driver reuses the run's
    name and storage path); ``found`` is the newest the driver found on storage (:func:`newest`): the later of
    the two wins. The step is an optimizer step: checkpoints are only written at accumulation boundaries, so
    the engine's micro-step counter and the data order (a function of the step) resume in lockstep.
    """
    import ray.train
    from ray.train import Checkpoint

    candidates = [c for c in (ray.train.get_checkpoint(), Checkpoint(found) if found else None) if c is not None]
    if not candidates:
        return 0, {}
    ckpt = max(candidates, key=_step)
    with ckpt.as_directory() as d:
        meta = json.loads(Path(d, "mlot_job.json").read_text())
        if meta["fingerprint"] != fingerprint:
            raise ValueError(f"checkpoint {d} was written by a job with other model/data/loss settings "
                             f"({meta['fingerprint']} != {fingerprint}); resume it with its own config")
        _, state = engine.load_checkpoint(d, tag=CKPT_TAG)
    engine.micro_steps = int(state["step"]) * engine.gradient_accumulation_steps()  # DeepSpeed does not save it
    torch.set_rng_state(state["rng"])
    return int(state["step"]), dict(state.get("counters", {}))


def export_student(engine: Any, tokenizer: Any, export_dir: str, rank: int, recipe: Any = None,
                   dtype: str | None = None) -> None:
    """Write the trained student as one consolidated HF model (safetensors) + tokenizer to ``export_dir``
    (a local path or a storage URI), with its ``specs.recipe.Recipe`` (how it is prompted) when given.

    The weights are in ``dtype`` (``float32`` | ``bfloat16`` | ``float16``; None: the module's, i.e. the training
    dtype), gathered one submodule at a time (:func:`consolidated_state_dict`; under ZeRO-3 a collective) and written
    by rank 0.
    """
    from workers.models import resolve_dtype

    module, cast = engine.module, resolve_dtype(dtype) if dtype else None
    state = consolidated_state_dict(module, rank, cast)
    if rank == 0:
        with storage.local_folder(export_dir) as local:  # a URI: written here, then copied up
            module.save_pretrained(local, state_dict=state, safe_serialization=True)
            _record_dtype(local, cast)
            tokenizer.save_pretrained(local)
            if recipe is not None:
                recipe.save(local)


def consolidated_state_dict(module: torch.nn.Module, rank: int,
                            dtype: torch.dtype | None = None) -> dict[str, torch.Tensor] | None:
    """``module.state_dict()`` whole, on rank 0's CPU (floating tensors cast to ``dtype`` when given); None elsewhere.

    Under ZeRO-3 every rank calls it (a collective): each submodule's own parameters are gathered from their
    partitions, copied on rank 0 and released before the next submodule's (``modifier_rank=None``: nothing is
    written back), so beside its partitions a rank holds one submodule whole, and rank 0 the copy it writes. A tied
    parameter (one ``Parameter`` under two names) is gathered and copied once and stays one tensor, which
    ``save_pretrained`` writes once. Under other stages no collective runs: the parameters are whole already.
    """
    import deepspeed

    names = set(module.state_dict())  # under ZeRO-3 the names only: partitioned tensors are empty
    state: dict[str, torch.Tensor] = {}
    copies: dict[int, torch.Tensor] = {}  # id(tensor) -> its copy (on rank 0)
    done: set[int] = set()  # the parameters gathered already, on every rank alike
    for prefix, sub in module.named_modules():
        params = [p for p in sub.parameters(recurse=False) if id(p) not in done]
        done.update(id(p) for p in params)
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            for name, t in (*sub.named_parameters(recurse=False), *sub.named_buffers(recurse=False)):
                key = f"{prefix}.{name}" if prefix else name
                if rank == 0 and key in names:
                    if id(t) not in copies:  # a gathered tensor is freed on leaving the block: copy it
                        cast = dtype if dtype is not None and t.is_floating_point() else t.dtype
                        copies[id(t)] = t.detach().to("cpu", cast, copy=hasattr(t, "ds_id"))
                    state[key] = copies[id(t)]
    return state if rank == 0 else None


def _record_dtype(folder: str, dtype: torch.dtype | None) -> None:
    """Make the saved ``config.json``'s ``dtype`` the weights' ``dtype`` (None: the module's, which
    ``save_pretrained`` wrote), so that ``from_pretrained``'s default (``dtype="auto"``) loads them as exported."""
    if dtype is None:
        return
    path = Path(folder, "config.json")
    config = json.loads(path.read_text())
    config["dtype"] = str(dtype).removeprefix("torch.")
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
