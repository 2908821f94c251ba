"""The student's training loop: one Ray Train worker driving a DeepSpeed ZeRO engine.

Reads like single-process code: build the model, wrap it in DeepSpeed, then for each step pull the
teachers' payloads for this micro-batch (requested ``prefetch`` batches ahead, so teacher inference
overlaps the student step), compute CE + sum_j w_j * distill_j on the answer rows, step, log, and
checkpoint. Payloads go teacher actor -> object store -> this worker; the driver never sees them.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time
from collections import deque
from pathlib import Path
from typing import Any

import torch

import mlot
from workers.data import encode_batch
from workers.forward import answer_logits, to_device
from workers.models import build_model, check_vocab, load_tokenizer
from workers.teacher import template_of

CKPT_TAG = "mlot"


# ---------------------------------------------------------------------------- setup


def deepspeed_config(job: Any) -> dict[str, Any]:
    """The DeepSpeed config for this job: ZeRO stage/offload from ``student.deepspeed``, or its JSON.

    The optimizer is ours (a client AdamW), so DeepSpeed builds no fused CPU Adam; batch sizes always
    come from ``train`` (a JSON that disagrees would silently change the effective batch).
    """
    ds, train = job.student.deepspeed, job.train
    if ds.config_path:
        cfg = json.loads(Path(ds.config_path).read_text())
    else:
        zero: dict[str, Any] = {"stage": ds.stage, "stage3_gather_16bit_weights_on_model_save": True}
        if ds.offload_optimizer:
            zero["offload_optimizer"] = {"device": "cpu"}
        if ds.offload_param:
            zero["offload_param"] = {"device": "cpu"}
        cfg = {"zero_optimization": zero, "bf16": {"enabled": job.student.dtype == "bfloat16"},
               "fp16": {"enabled": job.student.dtype == "float16"}}
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


def _skip_shm_build() -> None:
    """DeepSpeed's first initialize JIT-builds a shared-memory all-reduce used only for inference
    (about a minute and GBs of RAM on CPU). Training never uses it, so replace the builder."""
    import deepspeed.comm.torch  # noqa: F401  (load the module so it can be patched)
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None


def lr_lambda(train: Any, total_steps: int):
    """Warm-up then constant / linear / cosine decay, as a LambdaLR multiplier of step."""
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


class BatchOrder:
    """Which rows form micro-batch m on this rank: a seeded shuffle per epoch of this rank's shard.

    Deterministic in (seed, rank, m), so a resumed run sees exactly the batches it would have seen.
    """

    def __init__(self, rows: list[dict[str, Any]], rank: int, world: int, batch_size: int, seed: int) -> None:
        shard = len(rows) // world  # every rank the same count: DeepSpeed steps are collective
        self.rows = rows[rank::world][:shard]
        self.batch_size, self.seed, self.rank = batch_size, seed, rank
        self.per_epoch = max(1, shard // batch_size)
        self._perm: tuple[int, list[int]] | None = None

    def __call__(self, m: int) -> list[dict[str, Any]]:
        epoch, i = divmod(m, self.per_epoch)
        if self._perm is None or self._perm[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = (epoch, torch.randperm(len(self.rows), generator=g).tolist())
        idx = self._perm[1][i * self.batch_size:(i + 1) * self.batch_size]
        return [self.rows[j] for j in idx]


class PayloadStream:
    """Keeps up to ``depth`` micro-batches of teacher payloads in flight for this worker.

    Replicas are picked round-robin over (micro-batch, rank), so N workers spread over a teacher's
    replicas. A payload carries the batch id it was computed for; a mismatch is a hard error.
    """

    def __init__(self, teachers: dict[str, list[Any]], order: BatchOrder, rank: int, world: int, depth: int,
                 loss: Any) -> None:
        self.teachers, self.order, self.rank, self.world, self.depth = teachers, order, rank, world, depth
        self.loss = loss  # sent along: long-lived teachers serve trials with different loss settings
        self.inflight: deque[tuple[int, dict[str, Any]]] = deque()
        self.next_m = 0

    def _submit(self, m: int) -> None:
        rows = self.order(m)
        refs = {}
        for name, replicas in self.teachers.items():
            actor = replicas[(m * self.world + self.rank) % len(replicas)]
            refs[name] = actor.payload.remote(rows, batch_id=[self.rank, m], loss=self.loss)
        self.inflight.append((m, refs))

    def _fetch(self, name: str, ref: Any, m: int, attempts: int = 5) -> dict[str, Any]:
        """ray.get with retries on other replicas: a teacher that died (and is restarting) costs time, not the run."""
        import ray
        from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

        for attempt in range(attempts):
            try:
                return ray.get(ref)
            except (ActorDiedError, ActorUnavailableError, RayActorError) as e:
                if attempt == attempts - 1:
                    raise
                replicas = self.teachers[name]
                actor = replicas[(m * self.world + self.rank + attempt + 1) % len(replicas)]
                print(f"[mlot] teacher {name} failed on batch {[self.rank, m]} ({type(e).__name__}); "
                      f"retrying ({attempt + 1}/{attempts - 1})", flush=True)
                time.sleep(min(2.0 ** attempt, 10.0))
                ref = actor.payload.remote(self.order(m), batch_id=[self.rank, m], loss=self.loss)
        raise AssertionError("unreachable")

    def get(self, m: int) -> tuple[dict[str, mlot.TeacherPayload], float, int]:
        """Payloads of micro-batch m, the seconds spent waiting for them, and their total bytes."""

        if self.next_m <= m and not self.inflight:
            self.next_m = m
        while self.next_m <= m + self.depth:
            self._submit(self.next_m)
            self.next_m += 1
        while self.inflight and self.inflight[0][0] < m:  # e.g. skipped after a restart
            self.inflight.popleft()
        got_m, refs = self.inflight.popleft()
        t0 = time.perf_counter()
        out, nbytes = {}, 0
        for name, ref in refs.items():
            reply = self._fetch(name, ref, m)
            if reply["batch_id"] != [self.rank, m] or got_m != m:
                raise RuntimeError(f"teacher {name} answered batch {reply['batch_id']} for batch {[self.rank, m]}")
            out[name] = mlot.TeacherPayload.from_numpy(reply["payload"])
            nbytes += out[name].nbytes()
        return out, time.perf_counter() - t0, nbytes


class StopSignal:
    """Set by the driver on Ctrl-C (a Ray actor): the workers checkpoint at the next step and stop."""

    def __init__(self) -> None:
        self.stop = False

    def set(self) -> None:
        self.stop = True

    def is_set(self) -> bool:
        return self.stop


def _stop_requested(signal: Any, dist: Any) -> bool:
    """Rank 0 asks the driver's StopSignal; every rank gets the answer (they must stop at the same step)."""
    import ray

    flag = torch.tensor([1.0 if signal is not None and ray.get(signal.is_set.remote()) else 0.0])
    if dist.is_initialized():
        dist.broadcast(flag, src=0)
    return bool(flag.item())


def _fault_injection(config: dict[str, Any], step: int, rank: int) -> None:
    """Chaos-testing hook (the fault tests): rank 0 dies at ``fault_exit_at_step``, once per run directory.

    It waits ``fault_delay_s`` first, so the last checkpoint's report has reached the controller.
    """
    at, marker = config.get("fault_exit_at_step"), config.get("fault_marker")
    if at and step == at and rank == 0 and marker and not Path(marker).exists():
        Path(marker).write_text(str(step))
        time.sleep(config.get("fault_delay_s", 8.0))
        os._exit(1)


# ---------------------------------------------------------------------------- the loop


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point. ``config``: job (JobConfig), train_rows/eval_rows (lists or ObjectRefs),
    teachers ({name: [actor handles]}), run_id (MLflow), tracking_uri, export_dir, resume_from."""
    import deepspeed
    import ray
    import ray.train
    import torch.distributed as dist

    job = config["job"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    rows = _resolve(config["train_rows"])
    eval_rows = _resolve(config["eval_rows"])
    if job.train.use_gpu:
        import ray.train.torch
        device = ray.train.torch.get_device()
    else:
        device = torch.device("cpu")
        torch.set_num_threads(1)  # Ray gives each worker its CPU share; more threads only contend

    torch.manual_seed(job.train.seed)
    tokenizer = load_tokenizer(job.student.tokenizer_name, job.student.trust_remote_code)
    model = build_model(job.student.model, job.student.hf_config, job.student.dtype, job.student.trust_remote_code,
                        tokenizer, who="student")
    check_vocab(model, tokenizer, "student")
    vocab = len(tokenizer)
    n_params = sum(p.numel() for p in model.parameters())  # before ZeRO-3 partitions them away
    steps = total_steps(job, len(rows), world)
    optimizer = torch.optim.AdamW(model.parameters(), lr=job.train.lr, weight_decay=job.train.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(job.train, steps))
    _skip_shm_build()
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(job), dist_init_required=False)

    start = _restore(engine, config.get("resume_from"), config["fingerprint"])
    template = template_of(job.student)
    order = BatchOrder(rows, rank, world, job.train.batch_size, job.train.seed)
    stream = PayloadStream(config["teachers"], order, rank, world, job.train.prefetch, job.loss)
    weights = {t.name: t.weight for t in job.teachers}
    # Params are write-once in MLflow: log them when the run starts, not again on resumption.
    tracker = _Tracker(config, rank, {"params": n_params, "world": world} if start == 0 else {})
    loss_params = dict(job.loss.params)
    bad_steps = skipped_total = 0
    last_eval: float | None = None
    history: list[dict[str, float]] = []

    for step in range(start, steps):
        t_step = time.perf_counter()
        sums: dict[str, float] = {}
        tokens, wait, nbytes, answer_tokens = 0, 0.0, 0, 0
        for micro in range(job.train.grad_accum):
            m = step * job.train.grad_accum + micro
            batch, _ = encode_batch(order(m), tokenizer, template, job.data.max_prompt_length,
                                    job.data.max_answer_length, on_bad_row="error")
            payloads, waited, got = stream.get(m) if job.loss.method != "sft" else ({}, 0.0, 0)
            wait += waited
            nbytes += got
            batch = to_device(batch, device)
            logits, labels = answer_logits(engine, batch, vocab)
            ce = mlot.causal_lm_loss(logits, labels)
            loss = job.loss.ce_weight * ce
            parts = {"ce": ce.detach()}
            for name, payload in payloads.items():
                r = mlot.payload_loss(job.loss.method, logits, labels, payload.to(device), job.loss.mode, **loss_params)
                loss = loss + weights[name] * r.loss
                parts[f"{name}/distill"] = r.distill.detach()
                parts.update({f"{name}/{k}": v.detach().mean() for k, v in r.terms.items()})
            if m in config.get("fault_nan_batches", ()):
                loss = loss * float("nan")  # fault tests: a poisoned batch
            if not _all_finite(loss, dist):
                bad_steps += 1
                skipped_total += 1
                tracker.warn(f"step {step}: non-finite loss; step skipped ({bad_steps} in a row)")
                if bad_steps > job.train.max_nonfinite_steps:
                    raise FloatingPointError(f"{bad_steps} consecutive non-finite losses (train.max_nonfinite_steps="
                                             f"{job.train.max_nonfinite_steps}): stopping")
                continue
            bad_steps = 0
            engine.backward(loss)
            engine.step()
            parts["loss"] = loss.detach()
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + float(v) / job.train.grad_accum
            tokens += int(batch["attention_mask"].sum())
            answer_tokens += int((labels != -100).sum())
        elapsed = time.perf_counter() - t_step
        metrics = {f"train/{k}": v for k, v in sums.items()}
        metrics.update({"train/lr": scheduler.get_last_lr()[0], "train/tokens_per_s": tokens * world / elapsed,
                        "train/teacher_wait_s": wait, "train/teacher_wait_frac": wait / elapsed,
                        "train/payload_bytes_per_token": nbytes / max(answer_tokens, 1), "train/step_s": elapsed,
                        "train/nonfinite_skipped": skipped_total})
        done = step + 1
        if job.train.eval_every and (done % job.train.eval_every == 0 or done == steps) and eval_rows:
            last_eval = evaluate_ce(engine, eval_rows, tokenizer, template, job, rank, world, device, vocab)
            metrics["eval/loss"] = last_eval
        history.append({"step": done, **metrics})
        tracker.log(metrics, done)
        if rank == 0 and "train/loss" in metrics and (done % max(1, steps // 20) == 0 or done == steps):  # ~20 lines
            print(f"[mlot] step {done}/{steps}  loss {metrics['train/loss']:.4f}  ce {metrics['train/ce']:.4f}"
                  + (f"  eval {last_eval:.4f}" if last_eval is not None else "")
                  + f"  {metrics['train/tokens_per_s']:.0f} tok/s  teacher wait {100 * metrics['train/teacher_wait_frac']:.0f}%",
                  flush=True)
        # Every report carries the latest eval metric: a sweep's scheduler compares trials on it.
        report = {**metrics, "step": done, **({"eval/loss": last_eval} if last_eval is not None else {})}
        stop = _stop_requested(config.get("stop_signal"), dist) and done < steps
        if stop:
            report["train/stopped_at_step"] = done
        if done % job.train.checkpoint_every == 0 or done == steps or stop:
            _checkpoint(engine, report, done, config["fingerprint"])
        elif "eval/loss" in metrics:
            ray.train.report(report)
        if stop:
            tracker.warn(f"stopped at step {done} on request; checkpoint written: resume with --resume")
            return
        _fault_injection(config, done, rank)

    export_student(engine, tokenizer, job, config["export_dir"], rank)
    # Every rank runs this forward: under ZeRO-3 a forward gathers parameters collectively.
    plan = _eval_plan(engine, tokenizer, template, job, eval_rows, config["teachers"], device, vocab)
    if rank == 0:
        tracker.finish(history, plan, config["teachers"], steps)


def _resolve(x: Any) -> Any:
    import ray
    return ray.get(x) if isinstance(x, ray.ObjectRef) else x


def _all_finite(loss: torch.Tensor, dist: Any) -> bool:
    """Every rank agrees whether to step: a rank alone skipping would deadlock the collectives."""
    flag = torch.tensor([0.0 if torch.isfinite(loss.detach()).all() else 1.0])
    if dist.is_initialized():
        dist.all_reduce(flag)
    return float(flag) == 0.0


@torch.no_grad()
def evaluate_ce(engine: Any, rows: list[dict[str, Any]], tokenizer: Any, template: Any, job: Any, rank: int,
                world: int, device: Any, vocab: int) -> float:
    """Mean answer-token CE on the held-out rows, over all ranks (each scores its shard)."""
    import torch.distributed as dist

    engine.eval()
    total = torch.zeros(2, dtype=torch.float64)
    shard = rows[rank::world]
    for i in range(0, len(shard), job.train.batch_size):
        batch, _ = encode_batch(shard[i:i + job.train.batch_size], tokenizer, template, job.data.max_prompt_length,
                                job.data.max_answer_length, on_bad_row="error")
        logits, labels = answer_logits(engine, to_device(batch, device), vocab)
        n = int((labels[:, 1:] != -100).sum())
        total += torch.tensor([float(mlot.causal_lm_loss(logits, labels)) * n, n], dtype=torch.float64)
    engine.train()
    if dist.is_initialized():
        dist.all_reduce(total)
    return float(total[0] / total[1].clamp(min=1))


def _checkpoint(engine: Any, metrics: dict[str, float], step: int, fingerprint: str) -> None:
    """Every rank saves its ZeRO shard (a collective) and reports; Ray merges the rank directories."""
    import ray.train
    from ray.train import Checkpoint

    with tempfile.TemporaryDirectory() as d:
        engine.save_checkpoint(d, tag=CKPT_TAG, client_state={"step": step, "rng": torch.get_rng_state()})
        Path(d, "mlot_job.json").write_text(json.dumps({"step": step, "fingerprint": fingerprint}))
        ray.train.report({**metrics, "step": step}, checkpoint=Checkpoint.from_directory(d))


def _restore(engine: Any, resume_from: str | None, fingerprint: str) -> int:
    """Load the newest checkpoint (a restart inside the run, or ``resume_from``); return the step to start at."""
    import ray.train
    from ray.train import Checkpoint

    ckpt = ray.train.get_checkpoint() or (Checkpoint(resume_from) if resume_from else None)
    if ckpt is None:
        return 0
    with ckpt.as_directory() as d:
        meta = json.loads(Path(d, "mlot_job.json").read_text())
        if meta["fingerprint"] != fingerprint:
            raise ValueError(f"checkpoint {d} was written by a job with other model/data/loss settings "
                             f"({meta['fingerprint']} != {fingerprint}); resume it with its own config")
        _, state = engine.load_checkpoint(d, tag=CKPT_TAG)
    torch.set_rng_state(state["rng"])
    return int(state["step"])


def export_student(engine: Any, tokenizer: Any, job: Any, export_dir: str, rank: int) -> None:
    """Write the trained student as one consolidated HF model (safetensors) + tokenizer.

    Under ZeRO-3 every rank holds a slice of each parameter, so all ranks gather them (a collective)
    and rank 0 writes.
    """
    import deepspeed

    module = engine.module
    if job.student.deepspeed.stage == 3:
        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            state = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()} if rank == 0 else None
    else:
        state = {k: v.detach().cpu() for k, v in module.state_dict().items()} if rank == 0 else None
    if rank == 0:
        os.makedirs(export_dir, exist_ok=True)
        module.save_pretrained(export_dir, state_dict=state, safe_serialization=True)
        tokenizer.save_pretrained(export_dir)


class _Tracker:
    """Rank 0 logs metrics and artefacts to the job's MLflow run (created by the driver)."""

    def __init__(self, config: dict[str, Any], rank: int, info: dict[str, Any]) -> None:
        self.rank, self.run_id, self.export_dir = rank, config["run_id"], config["export_dir"]
        self.client = None
        self.pending: list[Any] = []  # metrics not yet accepted by the tracking server
        self.gap_since = 0
        if rank == 0 and self.run_id:
            # No blocking retries inside the training step: a failed call is buffered and resent later.
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
            from mlflow import MlflowClient
            self.client = MlflowClient(config["tracking_uri"])
            try:
                for k, v in info.items():
                    self.client.log_param(self.run_id, f"student.{k}", v)
            except Exception as e:  # tracking must not stop training
                self.warn(f"MLflow: could not log the student's params ({type(e).__name__})")

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Log to MLflow; while the tracking server is unreachable, keep the metrics and send them later.

        Training never waits for tracking: a failed call is retried with the next step's metrics.
        """
        if self.client is None:
            return
        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        self.pending.extend(Metric(k, float(v), now, step) for k, v in metrics.items())
        if self._flush():
            if self.gap_since:
                self.warn(f"MLflow back at step {step}; sent the metrics buffered since step {self.gap_since}")
                self._flush_gap(step)
        elif not self.gap_since:
            self.gap_since = step
            self.warn(f"MLflow unreachable at step {step}; buffering metrics")

    def _flush(self) -> bool:
        try:
            for i in range(0, len(self.pending), 1000):  # MLflow's per-call limit
                self.client.log_batch(self.run_id, metrics=self.pending[i:i + 1000])
        except Exception:  # any transport or server error: keep everything for the next try
            return False
        self.pending = []
        return True

    def _flush_gap(self, step: int) -> None:
        from mlflow.entities import Metric
        self.pending.append(Metric("tracking/gap_steps", float(step - self.gap_since), int(time.time() * 1000), step))
        self.gap_since = 0
        self._flush()

    def _wait_for_server(self, step: int, budget_s: float = 300.0) -> bool:
        """At the end of training: wait (bounded) for the server, so buffered metrics are not lost."""
        deadline = time.time() + budget_s
        delay = 1.0
        while not self._flush():
            if time.time() > deadline:
                self.warn(f"MLflow still unreachable after {budget_s:.0f}s: {len(self.pending)} metrics not sent; "
                          "the trained student is saved locally all the same")
                return False
            time.sleep(delay)
            delay = min(delay * 2, 15.0)
        if self.gap_since:
            self.warn(f"MLflow back after the last step; sent the metrics buffered since step {self.gap_since}")
            self._flush_gap(step)
        return True

    def warn(self, message: str) -> None:
        print(f"[mlot] {message}", flush=True)

    def finish(self, history: list[dict[str, float]], plan: Any, teachers: dict[str, list[Any]], step: int) -> None:
        """Final artefacts: the loss curve, a transport-plan heatmap of a fixed eval sample, the student;
        and how many rows each teacher ran a forward pass on (cumulative for long-lived teachers)."""
        if self.client is None or not self._wait_for_server(step):
            return
        import ray
        for name, replicas in teachers.items():
            rows = sum(info["forward_rows"] for info in ray.get([a.info.remote() for a in replicas]))
            self.log({f"teacher/{name}/forward_rows": rows}, step)
        from workers.plots import loss_curve_png, plan_heatmap_png
        with tempfile.TemporaryDirectory() as d:
            if history:
                self.client.log_artifact(self.run_id, loss_curve_png(history, Path(d) / "loss_curve.png"), "plots")
            if plan is not None:
                self.client.log_artifact(self.run_id, plan_heatmap_png(plan, Path(d) / "transport_plan.png"), "plots")
        self.client.log_artifacts(self.run_id, self.export_dir, "student")


@torch.no_grad()
def _eval_plan(engine: Any, tokenizer: Any, template: Any, job: Any, eval_rows: list[dict[str, Any]],
               teachers: dict[str, list[Any]], device: Any, vocab: int) -> Any:
    """The sequence-level transport plan between the first teacher and the student on eval row 0."""
    import ray

    if job.loss.method != "multilevel_ot" or not teachers or not eval_rows or job.loss.mode != "paper":
        return None
    rows = eval_rows[:1]
    name, replicas = next(iter(teachers.items()))
    reply = ray.get(replicas[0].payload.remote(rows, batch_id="plan", loss=job.loss))
    payload = mlot.TeacherPayload.from_numpy(reply["payload"])
    batch, _ = encode_batch(rows, tokenizer, template, job.data.max_prompt_length, job.data.max_answer_length)
    engine.eval()
    logits, labels = answer_logits(engine, to_device(batch, device), vocab)
    r = mlot.multilevel_ot(logits, labels, payload.to(device), mode="paper", **job.loss.params)
    engine.train()
    if r.plan is None:
        return None
    tn, sn = int(payload.lengths[0]), int((labels[0] != -100).sum())
    return r.plan[0, :tn, :sn].cpu().numpy()
