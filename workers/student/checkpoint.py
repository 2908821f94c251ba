"""Checkpoints (DeepSpeed ZeRO shards through Ray Train) and the consolidated HF export of the student.

Each of these is a collective: every rank must call it, at the same step.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import torch

from specs import storage

CKPT_TAG = "mlot"


def save(engine: Any, metrics: dict[str, float], step: int, fingerprint: str) -> None:
    """Every rank saves its ZeRO shard and reports; Ray merges the rank directories into one checkpoint."""
    import ray.train
    from ray.train import Checkpoint

    with tempfile.TemporaryDirectory() as d:
        engine.save_checkpoint(d, tag=CKPT_TAG, client_state={"step": step, "rng": torch.get_rng_state()})
        Path(d, "mlot_job.json").write_text(json.dumps({"step": step, "fingerprint": fingerprint}))
        ray.train.report({**metrics, "step": step}, checkpoint=Checkpoint.from_directory(d))


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


def restore(engine: Any, fingerprint: str, found: str | None = None) -> int:
    """Load the run's newest checkpoint, if any; return the optimizer step to start at.

    Ray Train hands one over after a worker-group restart and to a ``--resume`` (the driver reuses the run's
    name and storage path); ``found`` is the newest the driver found on storage (:func:`newest`): the later of
    the two wins. The step is an optimizer step: checkpoints are only written at accumulation boundaries, so
    the engine's micro-step counter and the data order (a function of the step) resume in lockstep.
    """
    import ray.train
    from ray.train import Checkpoint

    candidates = [c for c in (ray.train.get_checkpoint(), Checkpoint(found) if found else None) if c is not None]
    if not candidates:
        return 0
    ckpt = max(candidates, key=_step)
    with ckpt.as_directory() as d:
        meta = json.loads(Path(d, "mlot_job.json").read_text())
        if meta["fingerprint"] != fingerprint:
            raise ValueError(f"checkpoint {d} was written by a job with other model/data/loss settings "
                             f"({meta['fingerprint']} != {fingerprint}); resume it with its own config")
        _, state = engine.load_checkpoint(d, tag=CKPT_TAG)
    torch.set_rng_state(state["rng"])
    return int(state["step"])


def export_student(engine: Any, tokenizer: Any, export_dir: str, rank: int) -> None:
    """Write the trained student as one consolidated HF model (safetensors) + tokenizer to ``export_dir``
    (a local path or a storage URI).

    Under ZeRO-3 every rank holds a slice of each parameter, so all ranks gather them (a collective)
    and rank 0 writes. The stage is the engine's, which a DeepSpeed JSON config may have set.
    """
    import deepspeed

    module = engine.module
    if engine.zero_optimization_stage() == 3:
        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            state = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()} if rank == 0 else None
    else:
        state = {k: v.detach().cpu() for k, v in module.state_dict().items()} if rank == 0 else None
    if rank == 0:
        with storage.local_folder(export_dir) as local:  # a URI: written here, then copied up
            module.save_pretrained(local, state_dict=state, safe_serialization=True)
            tokenizer.save_pretrained(local)
