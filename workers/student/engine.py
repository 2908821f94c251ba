"""The student's DeepSpeed engine: its config, the LR schedule, the device, and the collectives.

Every collective here takes tensors on the worker's device: NCCL (GPU training) accepts CUDA tensors
only, even though gloo (CPU training) accepts anything. Call these helpers instead of
``torch.distributed`` directly, so no CPU tensor can reach a GPU process group.
"""

from __future__ import annotations

import contextlib
import json
import math
import resource
import sys
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist

from specs import deepspeed as deepspeed_spec


def deepspeed_config(job: Any, hidden: int | None = None) -> dict[str, Any]:
    """The DeepSpeed config for this job: ZeRO stage/offload from ``student.deepspeed``, or its JSON.

    The optimizer is ours (a client AdamW), so DeepSpeed builds no fused CPU Adam; batch sizes always
    come from ``train`` (a JSON that disagrees would silently change the effective batch). ``"auto"`` values are
    filled as transformers' Trainer fills them (``specs.deepspeed``); the generated ZeRO-3 config uses them for its
    buffer sizes, which ``hidden`` (the student's hidden size, once it is built) sizes.
    """
    ds, train = job.student.deepspeed, job.train
    if ds.config_path:
        cfg = json.loads(Path(ds.config_path).read_text())
    else:
        zero: dict[str, Any] = {"stage": ds.stage, "stage3_gather_16bit_weights_on_model_save": True}
        if ds.stage == 3:
            zero.update(dict.fromkeys(deepspeed_spec.SIZED, "auto"), sub_group_size=deepspeed_spec.SUB_GROUP)
        if ds.offload_optimizer:
            zero["offload_optimizer"] = {"device": "cpu"}
        if ds.offload_param:
            zero["offload_param"] = {"device": "cpu"}
        cfg = {"zero_optimization": zero, "bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"}}
    cfg = deepspeed_spec.resolve(cfg, hidden, job.student.dtype)
    cfg.update({
        "train_micro_batch_size_per_gpu": train.batch_size,
        "gradient_accumulation_steps": train.grad_accum,
        "gradient_clipping": train.max_grad_norm or 0.0,
        "zero_allow_untested_optimizer": True,   # a client torch AdamW: no fused-Adam build
        "zero_force_ds_cpu_optimizer": False,    # ... also with optimizer offload
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    })
    cfg.pop("train_batch_size", None)
    return cfg


def lr_lambda(train: Any, total_steps: int):
    """Warm-up then constant / linear / cosine decay, as a LambdaLR multiplier of the optimizer step."""
    def f(step: int) -> float:
        if step < train.warmup_steps:
            return (step + 1) / (train.warmup_steps + 1)
        frac = (step - train.warmup_steps) / max(1, total_steps - train.warmup_steps)
        if train.schedule == "linear":
            return max(0.0, 1.0 - frac)
        if train.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))
        return 1.0
    return f


def total_steps(job: Any, n_rows: int, world: int) -> int:
    """Optimizer steps of the run: ``train.steps``, or epochs over this job's rows."""
    if job.train.steps:
        return job.train.steps
    per_epoch = (n_rows // world) // (job.train.batch_size * job.train.grad_accum)
    if per_epoch == 0:
        raise ValueError(f"data has {n_rows} training rows: too few for {world} worker(s) x batch "
                         f"{job.train.batch_size} x grad_accum {job.train.grad_accum}")
    return job.train.epochs * per_epoch


def skip_shm_build() -> None:
    """DeepSpeed's first initialize JIT-builds a shared-memory all-reduce used only for inference
    (about a minute and GBs of RAM on CPU). Training never uses it, so replace the builder."""
    import deepspeed.comm.torch  # noqa: F401  (load the module so it can be patched)
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None


def build_engine(job: Any, model: torch.nn.Module, steps: int) -> tuple[Any, Any]:
    """Wrap ``model`` in a DeepSpeed engine with a client AdamW and the job's LR schedule.

    DeepSpeed steps the scheduler once per optimizer step (at each accumulation boundary), so the
    schedule counts optimizer steps, never micro-batches. Returns (engine, scheduler).
    """
    import deepspeed

    optimizer = torch.optim.AdamW(model.parameters(), lr=job.train.lr, weight_decay=job.train.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(job.train, steps))
    skip_shm_build()
    config = deepspeed_config(job, getattr(model.config, "hidden_size", None))
    engine, _, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                   config=config, dist_init_required=False)
    return engine, scheduler


def zero_contribution(engine: Any) -> torch.Tensor:
    """A zero loss that a skipped micro-batch backs up instead of its own.

    DeepSpeed counts accumulation boundaries by its own micro-step counter, so every micro-batch must
    call backward + step. ZeRO-1/2 reduce gradients in per-parameter hooks and need every parameter
    to get one at a boundary: a zero through each parameter. ZeRO-3 parameters are partitioned
    (a full-shape gradient is refused) and its boundary reduces what was accumulated: a graph-free
    zero. Neither touches activations, so a NaN in the forward cannot leak into the gradients.
    """
    if engine.zero_optimization_stage() == 3:
        return torch.zeros((), device=engine.device, requires_grad=True) * 0.0
    return sum(p.sum() for p in engine.module.parameters() if p.requires_grad) * 0.0


@contextlib.contextmanager
def generation_module(engine: Any, gather: str, world: int) -> Iterator[tuple[torch.nn.Module, bool]]:
    """The module to sample from, and whether every rank must keep stepping until all are done (``synced_gpus``).

    Under ZeRO-3 a forward gathers each layer from every rank, so decoding token by token would move the whole
    model once per token. ``gather="once"`` gathers every parameter for the block (DeepSpeed's
    ``unwrap_model_for_generation``: its hooks off, so ranks decode on their own with the KV cache, no
    collective until the block ends, when the parameters are partitioned again); ``"per_layer"`` keeps the
    partitioned module, all ranks in step. Other stages hold whole parameters already.
    """
    if engine.zero_optimization_stage() != 3:
        yield engine.module, False
    elif gather == "per_layer":
        yield engine.module, world > 1
    else:
        from deepspeed.runtime.zero.stage3 import unwrap_model_for_generation
        with unwrap_model_for_generation(engine):
            yield engine.module, False


def worker_device(use_gpu: bool) -> torch.device:
    """This worker's device: its GPU under Ray Train, else the CPU (with one thread: Ray gives each
    worker its CPU share, and more threads would only contend). A worker asked to use a GPU that has
    no CUDA (logical GPUs of a test cluster, a broken driver) says so and computes on the CPU."""
    if use_gpu and torch.cuda.is_available():
        import ray.train.torch
        return ray.train.torch.get_device()
    if use_gpu:
        print("[mlot] train.use_gpu is set but this worker has no CUDA device: training on the CPU", flush=True)
    torch.set_num_threads(1)
    return torch.device("cpu")


# ---------------------------------------------------------------------------- collectives


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when ``flag`` is true on any rank (ranks must take the same branch, or the
    next collective deadlocks)."""
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def from_rank_zero(flag: bool, device: torch.device) -> bool:
    """Rank 0's ``flag`` on every rank."""
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    if dist.is_initialized():
        dist.broadcast(t, src=0)
    return bool(t.item())


def sum_over_ranks(values: list[float], device: torch.device) -> list[float]:
    """Element-wise sum of ``values`` over ranks (float64)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this worker: allocated device memory on a GPU, the process's peak RSS on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
