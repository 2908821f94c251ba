"""The student's training loop: one Ray Train worker driving a DeepSpeed ZeRO engine.

Reads top to bottom like a torchtune recipe: ``setup`` (model, engine, checkpoint, data order, teacher
stream, tracking) -> ``train`` (one optimizer step per loop step, each ``grad_accum`` micro-steps) ->
``cleanup`` (export, artefacts). The loss of a micro-batch is ``_loss_step``, the job's ``mlot.objective``:
``ce_weight * CE + sum_j w_j * (alpha * distill_j + identity_j)`` over the registered method of
``loss.method``, where ``identity_j`` are the optional identity-aware terms (``mlot.identity.identity_terms``)
and ``w_j`` the teachers' weights, or per-sample weights (``loss.teacher_mix``, ``mlot.mixing``). On an
on-policy micro-batch (``train.on_policy``) the student first samples its own answers (``_generate``) and
the teachers score that text; it replaces the labels (``mode: replace``) or is added to them (``mode: add``: one
forward over both, the two losses summed, the on-policy parts logged as ``on_policy/<part>``).

A micro-batch whose student logits or loss are not finite on *any* rank is skipped on *every* rank:
it still backs up a zero and steps the engine, so DeepSpeed's accumulation windows, the optimizer
step count, the LR schedule and checkpoints stay in lockstep with ``train.steps``.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any

import torch

import mlot
from specs.progress import Progress
from workers.data.encoding import collate
from workers.data.prepared import STUDENT, open_data
from workers.forward import answer_head, answer_logits, answer_window, to_device
from workers.models import load_tokenizer
from workers.student import checkpoint, console
from workers.student.console import say
from workers.student.engine import (
    any_rank,
    build_engine,
    from_rank_zero,
    generation_module,
    peak_memory_mb,
    total_steps,
    worker_device,
    zero_contribution,
)
from workers.student.in_loop_eval import eval_plan, evaluate_ce, evaluate_truth
from workers.student.model import HeadWhole, build_student
from workers.student.on_policy import LABELS, OWN, kind, on_policy_examples, sample_answers, sampling_seed
from workers.student.payload_stream import BatchOrder, Fetched, PayloadStream
from workers.student.tracking import open_buffer
from workers.vocab import teacher_map

Example = tuple[list[int], list[int]]  # a student's (input_ids, labels)


@dataclass
class StepStats:
    """What one optimizer step's micro-batches add up to."""

    sums: dict[str, Any] = field(default_factory=dict)  # loss terms (tensors: no device sync per micro-batch)
    counted: dict[str, int] = field(default_factory=dict)  # micro-batches with each term (on_policy/*: some)
    tokens: int = 0
    wait_s: dict[str, float] = field(default_factory=dict)
    nbytes: dict[str, int] = field(default_factory=dict)
    answer_tokens: dict[str, int] = field(default_factory=dict)
    on_policy: int = 0  # on-policy micro-batches
    generation_s: float = 0.0
    generated: list[int] = field(default_factory=list)  # answer tokens of each sampled (used) answer
    fallbacks: int = 0  # unusable generations replaced by the gold answer
    weight_sync_s: float | None = None  # engine: vllm: sending the weights to the generator (a step that did)

    def add_io(self, fetched: Fetched, tokens: int) -> None:
        self.tokens += tokens
        for acc, new in ((self.wait_s, fetched.wait_s), (self.nbytes, fetched.nbytes),
                         (self.answer_tokens, fetched.answer_tokens)):
            for k, v in new.items():
                acc[k] = acc.get(k, 0) + v

    def add_generation(self, seconds: float, answers: list[Any]) -> None:
        self.on_policy += 1
        self.generation_s += seconds
        self.generated += [len(a.ids) for a in answers if a.sampled]
        self.fallbacks += sum(not a.sampled for a in answers)

    def add_terms(self, parts: dict[str, torch.Tensor]) -> None:
        for k, v in parts.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
            self.counted[k] = self.counted.get(k, 0) + 1

    def metrics(self, elapsed: float, world: int, micro_batches: int, on_policy: bool) -> dict[str, float]:
        out = {f"train/{k}": float(v) / self.counted[k] for k, v in self.sums.items()}
        wait = sum(self.wait_s.values())
        out.update({"train/tokens_per_s": self.tokens * world / elapsed, "train/step_s": elapsed,
                    "train/teacher_wait_s": wait, "train/teacher_wait_frac": wait / elapsed})
        if on_policy:
            out.update({"train/on_policy_frac": self.on_policy / micro_batches, "train/generation_s": self.generation_s,
                        "train/generation_frac": self.generation_s / elapsed,
                        "train/generation_fallbacks": self.fallbacks})
        if self.weight_sync_s is not None:
            out["train/weight_sync_s"] = self.weight_sync_s
        if self.generated:  # only steps with sampled answers have a length
            out["train/generated_tokens"] = sum(self.generated) / len(self.generated)
        for name in self.wait_s:
            out[f"train/{name}/wait_s"] = self.wait_s[name]
            out[f"train/{name}/payload_bytes_per_token"] = self.nbytes[name] / max(self.answer_tokens[name], 1)
        return out


def answer_rows_finite(logits: torch.Tensor | mlot.HeadLogits, labels: torch.Tensor) -> bool:
    """Are the logit rows every loss reads (those that predict an answer token) finite? Of a head, its hidden rows
    (a non-finite weight shows in the loss)."""
    x = logits.hidden if isinstance(logits, mlot.HeadLogits) else logits
    return bool(torch.isfinite(x[:, :-1][labels[:, 1:] != -100]).all())


class StudentRecipe:
    """One training worker. ``config``: job (JobConfig), data (the prepared rows' ``DataRef``),
    teachers ({name: [actor handles]}), run_id/tracking_uri (MLflow), export_dir and export_recipe (the
    ``specs.recipe.Recipe`` saved with the student), fingerprint, resume_from (the newest checkpoint the driver
    found on storage, or None), generator (``train.on_policy.engine: vllm``: the ``VllmGenerator`` actor, or None),
    stop_signal (a StopSignal actor), console (the driver's ``Console`` actor for progress lines, or None: stdout),
    callbacks (``workers.student.callbacks.TrainCallback``s; tests only)."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config, self.job = config, config["job"]
        self.objective = self.job.loss.objective({t.name: t.weight for t in self.job.teachers})
        self.method, self.identity = self.objective.method, self.objective.identity
        self.on_policy = self.job.train.on_policy
        self.callbacks = config.get("callbacks") or []

    def setup(self) -> None:
        import ray.train

        job, config = self.job, self.config
        console.use(config.get("console"))
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.data = open_data(config["data"])
        self.device = worker_device(job.train.use_gpu)
        torch.manual_seed(job.train.seed)
        self.tokenizer = load_tokenizer(job.student.tokenizer_name, job.student.trust_remote_code)
        model = build_student(job, self.tokenizer)  # under ZeRO-3 partitioned as it is built
        if job.student.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.vocab = len(self.tokenizer)
        self.n_params = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())  # ZeRO-3: whole size
        self.steps = total_steps(job, self.data.size("train"), self.world)
        self.engine, self.scheduler = build_engine(job, model, self.steps)
        # the loss reads the LM head chunk by chunk (mlot.HeadLogits): no [rows, V] logits, forward or backward
        self.head = HeadWhole(model, self.engine.zero_optimization_stage() == 3) if job.loss.reads_head else None
        self.start, counters = checkpoint.restore(self.engine, config["fingerprint"], config.get("resume_from"))
        self.order = BatchOrder(self.data.size("train"), self.rank, self.world, job.train.batch_size, job.train.seed)
        self.stream = PayloadStream(config["teachers"], config["data"], self.order, self.rank, self.world,
                                    job.train.prefetch, job.loss, on_policy=lambda m: self._kind(m) == OWN) \
            if self.method.needs_teacher else None
        self.tracker = open_buffer(config["tracking_uri"], config["run_id"]) \
            if self.rank == 0 and config["run_id"] else None
        # The exact-match and projection terms' side of the vocabulary maps (the teachers build the same ones).
        self.vmaps = {t.name: teacher_map(t, job.student) for t in job.teachers} \
            if self.identity.needs_distribution else {}
        if self.tracker:  # a restarted run (a resumption, or a restart that lost its checkpoint) logs no step twice
            self.tracker.resume(self.start)
        if self.tracker and self.start == 0:  # params are write-once in MLflow: not again on resumption
            self.tracker.log_params({"student.params": self.n_params, "student.world": self.world,
                                     **{f"identity.{name}.shared_{side}": round(v, 4) for name, m in self.vmaps.items()
                                        for side, v in m.coverage.items()}})
        self.generator = config.get("generator")
        self.weights_step: int | None = None  # engine: vllm: the step of the weights the generator samples from
        self.bad_in_a_row, self.skipped = 0, counters.get("skipped", 0)
        self.history: list[dict[str, float]] = []
        self.last_eval: dict[str, float] = {}  # the latest eval metrics, carried by every report
        self.progress = Progress("step", self.steps, first=self.start)

    def train(self) -> bool:
        """Train from the restored step to ``self.steps``; False when stopped early on request."""
        for step in range(self.start, self.steps):
            metrics = self._train_step(step)
            done = step + 1
            if self._eval_due(done):
                self.last_eval = self._evaluate()
                metrics.update(self.last_eval)
            self._log(metrics, done)
            stop = from_rank_zero(self._stop_requested(), self.device) and done < self.steps
            self._report(metrics, done, stop)
            for cb in self.callbacks:
                cb.on_step_end(done, self.rank, self.engine)
            if stop:
                say(f"stopped at step {done} on request; checkpoint written: resume with --resume")
                return False
        return True

    def _train_step(self, step: int) -> dict[str, float]:
        t0 = time.perf_counter()
        stats = StepStats()
        if self.generator is not None and self._sync_due(step):
            stats.weight_sync_s = self._sync_generator(step)
        for micro in range(self.job.train.grad_accum):
            self._micro_step(step * self.job.train.grad_accum + micro, stats)
        metrics = stats.metrics(time.perf_counter() - t0, self.world, self.job.train.grad_accum,
                                self.on_policy.fraction > 0)
        metrics.update({"train/lr": self.scheduler.get_last_lr()[0], "train/nonfinite_skipped": self.skipped,
                        "train/optimizer_steps": self.engine.global_steps,
                        "train/peak_mem_mb": peak_memory_mb(self.device),
                        "train/model_tflops_per_s": 6 * self.n_params * metrics["train/tokens_per_s"] / 1e12})
        return metrics

    def _micro_step(self, m: int, stats: StepStats) -> None:
        """Forward, loss, backward and engine step of micro-batch ``m`` (a skip is a zero backward)."""
        rows, what = self.order(m), self._kind(m)
        pieces = []  # (the student's examples, the teachers' payloads on them, CE on them?)
        if what != OWN:
            fetched = self.stream.get(m) if self.stream else Fetched()
            pieces.append((self.data.examples("train", rows, STUDENT), fetched, True))
        if what != LABELS:
            examples, answers = self._generate(m, rows, stats)
            fetched = self.stream.get(m, answers) if what == OWN else self.stream.score(m, answers)
            pieces.append((examples, fetched, self.on_policy.ce))
        batch = collate([e for examples, _, _ in pieces for e in examples], self.tokenizer.pad_token_id)
        logits, labels = self._forward(to_device(batch, self.device))
        for cb in self.callbacks:
            logits = cb.on_logits(m, self.rank, logits)
        with self.head() if self.head is not None else contextlib.nullcontext():  # gathered once for every read
            loss, parts = self._loss_step(logits, labels, [(len(e), f.payloads, ce) for e, f, ce in pieces]) \
                if answer_rows_finite(logits, labels) else (None, {})
        if any_rank(loss is None or not bool(torch.isfinite(loss)), self.device):
            self._count_skip(m, "student logits" if loss is None else "loss")
            loss = zero_contribution(self.engine)
        else:
            self.bad_in_a_row = 0
            stats.add_terms(parts)
        self.engine.backward(loss)
        self.engine.step()
        tokens = int(batch["attention_mask"].sum())
        for i, (_, fetched, _) in enumerate(pieces):
            stats.add_io(fetched, 0 if i else tokens)  # the batch's tokens once

    def _forward(self, batch: dict[str, torch.Tensor]) -> tuple[Any, torch.Tensor]:
        """The student's answer window: its LM head's input and weight (``mlot.HeadLogits``, which the loss reads
        chunk by chunk) or, with ``loss.fused_head`` off or in reference mode, its logits; and the labels."""
        if self.head is None:
            return answer_logits(self.engine, batch, self.vocab)
        return answer_head(self.engine, batch, self.vocab, self.head)

    def _generate(self, m: int, rows: list[int], stats: StepStats) -> tuple[list[Example], list[Any]]:
        """Sample the student's answers to the prompts of ``rows`` (every rank generates on the same
        micro-batches); returns its training examples on them and the answers the teachers will score."""
        t0 = time.perf_counter()
        seed = sampling_seed(self.job.train.seed, self.rank, m)
        examples, texts = self.data.examples("train", rows, STUDENT), self.data.rows("train", rows)
        if self.generator is not None:
            import ray

            def sample(prompts: list[list[int]]) -> list[list[int]]:  # one seed per answer: batching changes none
                seeds = [seed + i for i in range(len(prompts))]
                return ray.get(self.generator.sample.remote(prompts, seeds, self.weights_step))

            out, answers = on_policy_examples(sample, self.tokenizer, examples, texts)
        else:
            with generation_module(self.engine, self.on_policy.gather, self.world) as (module, synced):
                out, answers = on_policy_examples(
                    lambda prompts: sample_answers(module, self.tokenizer, prompts, self.on_policy, seed, self.device,
                                                   synced), self.tokenizer, examples, texts)
        stats.add_generation(time.perf_counter() - t0, answers)
        return out, answers

    def _sync_generator(self, step: int) -> float:
        """Send the student's weights after ``step`` optimizer steps to the vLLM generator (``sync_every``, and the
        first step a worker group trains: a restart's generator may hold newer weights). Every rank gathers (under
        ZeRO-3 a collective, one submodule at a time), rank 0 sends; the ranks' requests name ``step``, so none
        samples from other weights. Returns the seconds it took."""
        import ray

        t0 = time.perf_counter()
        state = checkpoint.consolidated_state_dict(self.engine.module, self.rank)
        if self.rank == 0:
            ray.get(self.generator.load.remote(state, step))
        self.weights_step = step
        return time.perf_counter() - t0

    def _kind(self, m: int) -> str:
        """What micro-batch m trains on (``workers.student.on_policy.kind``; the config refuses on-policy without
        teachers)."""
        return kind(self.job.train.seed, m, self.on_policy, self.on_policy.start_step * self.job.train.grad_accum)

    def _sync_due(self, step: int) -> bool:
        """Does the vLLM generator get the weights after ``step`` optimizer steps? Every ``sync_every`` steps from
        the first that may be on-policy (``start_step``), and at the first step this worker group trains (a
        restart's generator may hold newer weights)."""
        first = max(self.start, self.on_policy.start_step)
        return step == first or (step > first and step % self.on_policy.sync_every == 0)

    def _loss_step(self, logits: torch.Tensor, labels: torch.Tensor,
                   pieces: list[tuple[int, dict[str, mlot.TeacherPayload], bool]]
                   ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The training objective of one micro-batch (``mlot.objective``) and its named parts (detached).

        Args:
            logits: [B, K, V], labels: [B, K]: the rows of each piece in turn.
            pieces: (rows, the teachers' payloads on them, CE on them?) per piece: the labels, the student's own
                answers, or both (``mode: add``: the losses summed, the second's parts logged as ``on_policy/*``).
        """
        total, parts, first = 0.0, {}, 0
        for i, (n, payloads, ce) in enumerate(pieces):
            lab = labels[first:first + n]
            k = answer_window(lab)  # the piece's own answer window (the batch's is the longest of both)
            loss, mine = self.objective(logits[first:first + n, -k:], lab[:, -k:],
                                        {name: p.to(self.device) for name, p in payloads.items()}, self.vmaps, ce=ce)
            total, first = total + loss, first + n
            parts.update({f"on_policy/{key}" if i else key: v for key, v in mine.items()})
        if len(pieces) > 1:
            parts["loss"] = total.detach()
        return total, parts

    def _count_skip(self, m: int, what: str) -> None:
        self.skipped += 1
        self.bad_in_a_row += 1
        limit = self.job.train.max_nonfinite_steps
        if self.rank == 0:
            say(f"micro-batch {m}: non-finite {what} on some rank; "
                f"skipped on every rank ({self.bad_in_a_row} in a row)")
        if self.bad_in_a_row > limit:
            raise FloatingPointError(f"{self.bad_in_a_row} consecutive non-finite micro-batches "
                                     f"(train.max_nonfinite_steps={limit}): stopping")

    def _evaluate(self) -> dict[str, float]:
        """Eval CE on the held-out rows; for ``builtin:known_truth`` also the metrics against p*."""
        out = {"eval/loss": evaluate_ce(self.engine, self.data, self.tokenizer, self.job, self.rank, self.world,
                                        self.device, self.vocab)}
        if self.job.data.source == "builtin:known_truth":
            out.update(evaluate_truth(self.engine, self.data, self.tokenizer, self.job, self.device))
        return out

    def _eval_due(self, done: int) -> bool:
        every = self.job.train.eval_every
        return bool(every and self.data.size("eval") and (done % every == 0 or done == self.steps))

    def _log(self, metrics: dict[str, float], done: int) -> None:
        self.history.append({"step": done, **metrics})
        if self.tracker:
            self.tracker.log(metrics, done)
        if self.rank == 0 and "train/loss" in metrics and (done % max(1, self.steps // 20) == 0 or done == self.steps):
            say(self.progress.line(done, f"loss {metrics['train/loss']:.4f}  ce {metrics['train/ce']:.4f}"
                + (f"  eval {self.last_eval['eval/loss']:.4f}" if self.last_eval else "")
                + f"  {metrics['train/tokens_per_s']:.0f} tok/s"
                + f"  teacher wait {100 * metrics['train/teacher_wait_frac']:.0f}%"))

    def _stop_requested(self) -> bool:
        """Rank 0 asks the driver's StopSignal (every rank then gets its answer)."""
        import ray
        signal = self.config.get("stop_signal")
        return self.rank == 0 and signal is not None and ray.get(signal.is_set.remote())

    def _report(self, metrics: dict[str, float], done: int, stop: bool) -> None:
        """Report to Ray Train: with a checkpoint when one is due (or we stop), else only after an eval.
        Every report carries the latest eval metric: a sweep's scheduler compares trials on it."""
        import ray.train

        report = {**metrics, "step": done, **self.last_eval}
        if stop:
            report["train/stopped_at_step"] = done
        if done % self.job.train.checkpoint_every == 0 or done == self.steps or stop:
            checkpoint.save(self.engine, report, done, self.config["fingerprint"], self.job.train.checkpoint_upload,
                            counters={"skipped": self.skipped})
        elif "eval/loss" in metrics:
            ray.train.report(report)

    def cleanup(self) -> None:
        """Export the student, then log the end-of-run artefacts (rank 0)."""
        import ray

        export_dir, teachers = self.config["export_dir"], self.config["teachers"]
        checkpoint.export_student(self.engine, self.tokenizer, export_dir, self.rank, self.config["export_recipe"],
                                  self.job.student.export_dtype)
        plan = eval_plan(self.engine, self.config["data"], self.tokenizer, self.job, teachers, self.rank,
                         self.device, self.vocab)
        if self.tracker:
            infos = {name: ray.get([a.info.remote() for a in replicas]) for name, replicas in teachers.items()}
            counts = {name: {k: sum(i[k] for i in got) for k in ("forward_rows", "forwards", "served_requests")}
                      for name, got in infos.items()}
            self.tracker.finish(self.steps, self.history, plan, export_dir, counts)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point: setup -> train -> cleanup."""
    recipe = StudentRecipe(config)
    recipe.setup()
    if recipe.train():
        recipe.cleanup()

