"""Does distillation help a student? A study against a known answer distribution (``builtin:known_truth``).

    python benchmarks/known_truth.py [--out DIR] [--seeds 5] [--steps 200] [--tune-samples 6] [--identity] [--policy]
                                     [--quick]

The task (``workers/data/known_truth.py``, task seed 0) has an explicit p*(answer | prompt) over 8 multi-word
answers, so what a student learnt is measured against the truth on held-out prompts, whatever its
tokenizer: KL(p* || q) over the answer set, NLL per answer, top-1 agreement with argmax p*, ECE.

1. **Teachers** (tiny Llama, SentencePiece and Tekken tokenizers) learn the task from 48 sampled answers
   per training prompt (the ``teacher`` split); their own held-out KL is reported.
2. **Students** (tiny Llama, WordPiece) see 3 sampled answers per training prompt (drawn per seed) and, per
   arm, a teacher's signal: :data:`ARMS`. Every arm of a seed has the same student initialisation, label
   draws, batch order, steps and learning-rate schedule (the product's ``lr_lambda``), so arms are compared
   per seed (paired). The loss is the product's own objective (``mlot.objective.Objective``), on payloads
   from ``mlot.compress_teacher`` with the method's payload settings, as ``workers/teacher/actor.py`` computes
   them; the loop runs in-process (no Ray, no DeepSpeed) so that 8 arms x 5 seeds fit a 2-core machine.
3. **The product's sweep**: ``mlot tune`` (Ray Tune trials of real DeepSpeed jobs, teachers as Ray actors)
   over MultiLevelOT's knobs (``tune_spaces/multilevel_ot.yaml``) with the metric ``eval/truth_kl`` on the
   *validation* prompts; its best configuration is then run here on fresh seeds next to SFT and ULD.

``--identity`` adds the identity-aware arms (:data:`IDENTITY_ARMS`, ``mlot.identity``), ``--policy`` the
on-policy and teacher-mixing arms (:data:`POLICY_ARMS`: ``workers.student.on_policy``, ``mlot.mixing``). Results:
``results.json``, ``table.md`` and ``kl_over_steps.png`` in ``--out``, and one MLflow run (experiment
``mlot-known-truth``) with the table, the plot and each arm's mean held-out KL per step. ``docs/quality.md``
has the numbers.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache, partial
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlot
from mlot.identity import IdentityConfig, answer_bounds, compress_identity
from mlot.methods import ALIGNED_DEFAULTS
from mlot.mixing import PER_SAMPLE_MIXES, nll_per_byte
from mlot.vocab import vocab_map
from orchestrator.config import OnPolicyConfig, TrainConfig
from specs import Template
from workers.data.encoding import BadRowError, answers_of, collate, encode_example
from workers.data.known_truth import TASKS, KnownTruth, answer_log_probs, builtin_rows, truth_metrics
from workers.forward import answer_logits
from workers.generation import (
    encode_answers,
    generate_answers,
)
from workers.models import build_model, load_tokenizer
from workers.student.engine import lr_lambda
from workers.student.on_policy import LABELS, OWN, kind, on_policy_examples, sample_answers, sampling_seed

REPO = Path(__file__).resolve().parents[1]
WORDPIECE, SENTENCEPIECE, TEKKEN = "builtin:wordpiece", "builtin:sentencepiece", "builtin:tekken"
#: teacher name -> (tokenizer, share of ``--teacher-steps``); both learn the task from the ``teacher`` split.
#: Tekken's 131k-token head makes its steps about 2.6x dearer than SentencePiece's on this CPU: half the steps.
#: ``random`` is never trained: the bad teacher of the teacher-mixing arms.
TEACHERS = {"sp": (SENTENCEPIECE, 1.0), "tekken": (TEKKEN, 0.5), "random": (TEKKEN, 0.0)}
TINY = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 128,
        "tie_word_embeddings": True}
TEMPLATE = Template()
MAX_PROMPT, MAX_ANSWER = 64, 16
LABELS_PER_PROMPT = 3
METRICS = ("kl", "nll", "top1", "ece")


@dataclass(frozen=True)
class Arm:
    """One way to train the student. ``targets``: what it does CE on: the sampled labels, or (SeqKD) answers
    the first teacher generates for the same prompts, ``sampled`` (3 per prompt) or ``greedy``."""

    method: str = "sft"
    mode: str = "paper"
    params: dict[str, Any] = field(default_factory=dict)
    teachers: tuple[str, ...] = ()
    targets: str = "labels"
    tokenizer: str = WORDPIECE
    ce_weight: float = 1.0
    identity: IdentityConfig = IdentityConfig()  # the mlot.identity terms' weights (on the first teacher)
    mix: str = "sum"  # loss.teacher_mix (mlot.mixing)
    on_policy: float = 0.0  # train.on_policy.fraction: steps on the student's own sampled answers (no CE there)
    policy_mode: str = "replace"  # train.on_policy.mode: instead of the labels' step, or added to it
    policy_start: int = 0  # train.on_policy.start_step: steps on the labels only first (a warm start)


ARMS: dict[str, Arm] = {
    "SFT": Arm(),
    "SeqKD (sampled)": Arm(teachers=("sp",), targets="sampled"),
    "SeqKD (greedy)": Arm(teachers=("sp",), targets="greedy"),
    "ULD": Arm("uld", teachers=("sp",)),
    "MultiLevelOT (paper)": Arm("multilevel_ot", teachers=("sp",)),
    "MultiLevelOT (reference)": Arm("multilevel_ot", "reference", teachers=("sp",)),
    "MultiLevelOT, two teachers": Arm("multilevel_ot", teachers=("sp", "tekken")),
    # the teacher's top 100 of 32,000 tokens per position (ULD's distributed default): all but ~0 of its mass
    "same-tokenizer KL (ceiling)": Arm("kl", params={"top_k": 100}, teachers=("sp",), tokenizer=SENTENCEPIECE),
}


#: Identity-aware terms (issue 15: ``mlot.identity``), weight 1 each: measured against the same seeds and budget
#: with ``--identity`` (next to SFT and the same-tokenizer ceiling, which give the gap they close).
IDENTITY_ARMS: dict[str, Arm] = {
    "exact match (shared-vocab KL)": Arm(teachers=("sp",), identity=IdentityConfig(shared_weight=1.0)),
    "aligned-chunk likelihood": Arm(teachers=("sp",), identity=IdentityConfig(chunk_weight=1.0)),
    "MultiLevelOT + exact match + chunks": Arm("multilevel_ot", teachers=("sp",),
                                               identity=IdentityConfig(shared_weight=1.0, chunk_weight=1.0)),
}

#: On-policy distillation and teacher mixing (issue 14): the student's own answers scored by the teacher on half
#: the steps (``train.on_policy.fraction: 0.5``), and a trained + an untrained teacher summed or per-sample best.
POLICY_ARMS: dict[str, Arm] = {
    "MultiLevelOT, on-policy 0.5": Arm("multilevel_ot", teachers=("sp",), on_policy=0.5),
    "aligned chunks, on-policy 0.5": Arm(teachers=("sp",), identity=IdentityConfig(chunk_weight=1.0), on_policy=0.5),
    # issue 25: on-policy added to the label steps (mode add), on the default loss, warm-started or from the start
    "aligned, on-policy 0.5 added after 100 steps": Arm(teachers=("sp",), identity=IdentityConfig(**ALIGNED_DEFAULTS),
                                                        on_policy=0.5, policy_mode="add", policy_start=100),
    "aligned, on-policy 0.5 added": Arm(teachers=("sp",), identity=IdentityConfig(**ALIGNED_DEFAULTS), on_policy=0.5,
                                        policy_mode="add"),
    "MultiLevelOT, trained + random teacher (sum)": Arm("multilevel_ot", teachers=("sp", "random")),
    "MultiLevelOT, trained + random teacher (best)": Arm("multilevel_ot", teachers=("sp", "random"), mix="best"),
}


#: The best configuration of the study's ``mlot tune`` sweep (docs/quality.md: 6 trials on the validation prompts).
TUNED_MLOT = {"alpha": 0.0715, "beta": 0.369, "gamma": 0.462, "ranking": "token", "student_temperature": 0.682,
              "teacher_temperature": 0.869, "top_k": 8}

#: The vocabulary projection (``mlot.identity.projection_kl``, weight 3: the best of 1 and 3 in a 2-seed pilot on
#: seeds 0-1, so the table runs on seeds 2-11), alone and with the aligned chunks: the headline arms of issue 25,
#: next to SFT, the tuned MultiLevelOT, the chunks alone and the ceiling.
PROJECTION = IdentityConfig(projection_weight=3.0)
PROJECTION_ARMS: dict[str, Arm] = {
    "MultiLevelOT (tuned)": Arm("multilevel_ot", params=TUNED_MLOT, teachers=("sp",)),
    "vocabulary projection": Arm(teachers=("sp",), identity=PROJECTION),
    "aligned chunks + projection": Arm(teachers=("sp",), identity=replace(PROJECTION, chunk_weight=1.0)),
    # the ``aligned`` method's defaults (chosen by both task variants: docs/quality.md)
    "aligned (its defaults)": Arm(teachers=("sp",), identity=IdentityConfig(**ALIGNED_DEFAULTS)),
}


@dataclass(frozen=True)
class Budget:
    task: str = "text"  # a variant of workers.data.known_truth.TASKS
    steps: int = 200
    batch_size: int = 32
    lr: float = 3e-3
    warmup_steps: int = 10
    curve_points: int = 5  # held-out evaluations over the run (the last at the final step)
    teacher_steps: int = 600
    teacher_batch_size: int = 64


# ---------------------------------------------------------------------------- models, data, one training loop


def tiny_model(tokenizer: Any, seed: int) -> Any:
    torch.manual_seed(seed)
    return build_model(None, TINY, "float32", False, tokenizer, who="model")


def held_out_truth(task: str) -> tuple[list[str], np.ndarray]:
    truth = KnownTruth(seed=0, task=task)
    prompts = truth.prompts["test"]
    return [p.text for p in prompts], np.stack([truth.truth(p) for p in prompts])


def held_out(model: Any, tokenizer: Any, task: str) -> dict[str, float]:
    """Truth metrics of ``model`` on the test prompts (held-out (creature, place, season) triples)."""
    prompts, p_star = held_out_truth(task)
    log_q = answer_log_probs(model, tokenizer, TEMPLATE, prompts, TASKS[task][0], MAX_PROMPT, batch_size=256)
    return truth_metrics(log_q, p_star)


def fit(model: Any, tokenizer: Any, rows: list[dict[str, Any]], budget: Budget, seed: int, steps: int,
        batch_size: int, loss_fn: Any = None, curve: bool = False, on_policy: OnPolicyConfig | None = None
        ) -> dict[str, Any]:
    """AdamW with the product's warm-up + linear schedule over epoch-shuffled batches of ``rows``.

    ``loss_fn(logits, labels, indices, answers) -> (loss, parts)`` (default CE). ``on_policy``: the product's
    ``train.on_policy`` (the same ``workers.student.on_policy`` code): on its chosen steps the student answers the
    batch's prompts itself, ``answers`` are then its answers (None for the labels), trained instead of the labels
    or added to them (one loss over both, as the product's recipe). Returns the held-out curve (when asked) and
    the mean of each loss part over the last 10 steps."""
    examples = [encode_example(r, tokenizer, TEMPLATE, MAX_PROMPT, MAX_ANSWER) for r in rows]
    settings = on_policy or OnPolicyConfig(max_new_tokens=MAX_ANSWER)
    train = TrainConfig(steps=steps, lr=budget.lr, warmup_steps=budget.warmup_steps, schedule="linear")
    opt = torch.optim.AdamW(model.parameters(), lr=train.lr, weight_decay=train.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(train, steps))
    order, g = [], random.Random(seed)
    every = max(1, steps // budget.curve_points)
    points, last = [], []
    model.train()
    for step in range(1, steps + 1):
        if len(order) < batch_size:
            perm = list(range(len(examples)))
            g.shuffle(perm)
            order += perm
        idx, order = order[:batch_size], order[batch_size:]
        what = kind(seed, step, settings, first=settings.start_step + 1)  # steps count from 1 here
        pieces = [] if what == OWN else [([examples[i] for i in idx], None)]  # (examples, the student's answers)
        if what != LABELS:
            sample = partial(sample_answers, model, tokenizer, settings=settings, seed=sampling_seed(seed, 0, step),
                             device=torch.device("cpu"))
            pieces.append(on_policy_examples(sample, tokenizer, [examples[i] for i in idx], [rows[i] for i in idx]))
        loss, parts = 0.0, {}
        for i, (piece, answers) in enumerate(pieces):  # mode add: the labels' loss + the on-policy loss
            logits, labels = answer_logits(model, collate(piece, tokenizer.pad_token_id), len(tokenizer))
            mine = loss_fn(logits, labels, idx, answers) if loss_fn else (mlot.causal_lm_loss(logits, labels), {})
            loss = loss + mine[0]
            parts.update({f"on_policy/{k}" if i else k: v for k, v in mine[1].items()})
        if len(pieces) > 1:
            parts["loss"] = loss.detach()  # the step's total, as the product logs it
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        last = (last + [{"loss": loss.item(), **{k: float(v) for k, v in parts.items()}}])[-10:]
        if curve and (step % every == 0 or step == steps):
            points.append({"step": step, **held_out(model, tokenizer, budget.task)})
    terms = sorted(set().union(*last))  # on_policy/* only on the steps that had answers
    return {"curve": points, "final_terms": {k: float(np.mean([p[k] for p in last if k in p])) for k in terms}}


# ---------------------------------------------------------------------------- teachers


def train_teacher(out: str, name: str, budget: Budget) -> dict[str, float]:
    """Train (or reuse, when ``out/teachers/<name>`` holds one of this recipe) one teacher on the ``teacher``
    split; returns its held-out metrics."""
    torch.set_num_threads(1)  # the teachers train side by side, one core each
    spec, share = TEACHERS[name]
    folder = Path(out) / "teachers" / name
    done = folder / "known_truth.json"
    steps = max(1, round(budget.teacher_steps * share)) if share else 0
    recipe = {"tokenizer": spec, "steps": steps, "batch_size": budget.teacher_batch_size, "lr": budget.lr,
              "config": TINY, **({"task": budget.task} if budget.task != "text" else {})}
    if done.exists() and json.loads(done.read_text())["recipe"] == recipe:
        return json.loads(done.read_text())["held_out"]
    t0 = time.time()
    tok = load_tokenizer(spec)
    model = tiny_model(tok, seed=1000)
    if steps:
        fit(model, tok, builtin_rows("teacher", budget.task), budget, seed=1000, steps=steps,
            batch_size=budget.teacher_batch_size)
    model.eval()
    model.save_pretrained(folder)
    metrics = {**held_out(model, tok, budget.task), "steps": steps, "train_s": time.time() - t0}
    done.write_text(json.dumps({"recipe": recipe, "held_out": metrics}))
    return metrics


def train_teachers(pool: ProcessPoolExecutor, out: Path, budget: Budget, names: set[str]
                   ) -> dict[str, dict[str, float]]:
    """The teachers ``names`` (those the arms use, and SentencePiece, the ceiling's tokenizer), side by side."""
    futures = {name: pool.submit(train_teacher, str(out), name, budget) for name in TEACHERS if name in names}
    report = {name: f.result() for name, f in futures.items()}
    for name, metrics in report.items():
        print(f"teacher {name} ({TEACHERS[name][0]}): held-out {fmt_metrics(metrics)}", flush=True)
    return report


@lru_cache(maxsize=None)
def load_teacher(out: str, name: str) -> Any:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(Path(out) / "teachers" / name)
    return model.eval()


def teacher_answers(out: Path, name: str, prompts: list[str], how: str, seed: int) -> list[str]:
    """SeqKD targets: the teacher's own answers to ``prompts``, sampled from its full distribution
    (temperature 1, no top-k / top-p) or greedy; text, first line, stripped."""
    tok, model = load_tokenizer(TEACHERS[name][0]), load_teacher(str(out), name)
    sampling = {"do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0} if how == "sampled" else {}
    torch.manual_seed(seed)
    return generate_answers(model, tok, TEMPLATE, [{"prompt": p} for p in prompts], MAX_PROMPT, MAX_ANSWER,
                            batch_size=256, **sampling)


# ---------------------------------------------------------------------------- one arm, one seed


def usable(row: dict[str, Any], tokenizer: Any) -> bool:
    """Can a generated answer be a CE target (not empty, valid text)? Others are dropped and counted."""
    try:
        encode_example(row, tokenizer, TEMPLATE, MAX_PROMPT, MAX_ANSWER)
        return True
    except BadRowError:
        return False


def student_rows(seed: int, task: str) -> list[dict[str, Any]]:
    """The labels of a seed: 3 answers per training prompt drawn from p* (the same for every arm)."""
    return KnownTruth(seed=0, task=task).rows("train", LABELS_PER_PROMPT, seed=10_000 + seed)


def arm_rows(out: str, name: str, arm: Arm, seed: int, tok: Any, task: str) -> tuple[list[dict[str, Any]], int]:
    """The rows the student does CE on (the seed's labels, or the first teacher's answers to the same prompts)
    and how many generated answers were unusable."""
    rows = student_rows(seed, task)
    if arm.targets == "labels":
        return rows, 0
    draws = teacher_answers(Path(out), arm.teachers[0], [r["prompt"] for r in rows], arm.targets, seed)
    rows = [{**r, "answer": a} for r, a in zip(rows, draws) if usable({**r, "answer": a}, tok)]
    if not rows:
        raise RuntimeError(f"{name}: teacher {arm.teachers[0]} generated no usable answer for {len(draws)} prompts "
                           "(empty or invalid text): train it longer (--teacher-steps)")
    return rows, len(draws) - len(rows)


class TeacherSide:
    """One teacher over an arm's rows: its tokens of them, and its answer logits for a batch of them (with the
    student's answers instead of the rows' on an on-policy step)."""

    def __init__(self, out: str, name: str, rows: list[dict[str, Any]]) -> None:
        self.tok, self.model, self.rows = load_tokenizer(TEACHERS[name][0]), load_teacher(out, name), rows
        self.examples = [encode_example(r, self.tok, TEMPLATE, MAX_PROMPT, MAX_ANSWER) for r in rows]

    @torch.no_grad()
    def logits(self, idx: list[int], answers: list[Any] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        examples = [self.examples[i] for i in idx] if answers is None else encode_answers(
            [self.rows[i] for i in idx], answers, self.tok, TEMPLATE, MAX_PROMPT)
        return answer_logits(self.model, collate(examples, self.tok.pad_token_id), len(self.tok))


class ArmLoss:
    """The product's objective (``mlot.objective.Objective``, as ``workers/student/recipe.py`` calls it) for one
    arm, on payloads made as the product's teachers make them (``mlot.compress_teacher`` with the method's
    payload settings, the identity payload with both sides' bounds as ``workers.teacher.extras`` computes them,
    the NLL per answer byte for per-sample mixes). Teachers are named ``t0``, ``t1``, ... (weight 1 each, the
    product's default); no CE on an on-policy step."""

    def __init__(self, out: str, arm: Arm, rows: list[dict[str, Any]], tok: Any) -> None:
        self.arm, self.tok, self.rows = arm, tok, rows
        method = mlot.get_method(arm.method)
        self.objective = mlot.Objective(method, arm.mode, arm.params, arm.ce_weight, arm.identity, arm.mix)
        uses_teacher = method.needs_teacher or arm.identity.on
        self.teachers = [TeacherSide(out, t, rows) for t in arm.teachers] if uses_teacher else []
        # A method without a payload of its own (SFT + identity terms): the identity payload rides on a default one.
        self.payload_cfg = method.payload_config(arm.mode, arm.params) if method.needs_teacher else mlot.make_config()
        self.vmaps = {"t0": vocab_map(self.teachers[0].tok, tok)} if arm.identity.needs_distribution else {}

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor, idx: list[int],
                 answers: list[Any] | None = None) -> tuple[torch.Tensor, dict]:
        payloads = {}
        for j, teacher in enumerate(self.teachers):
            t_logits, t_labels = teacher.logits(idx, answers)
            payload = mlot.compress_teacher(t_logits, t_labels, config=self.payload_cfg)
            if self.arm.identity.on:
                ident = self.arm.identity
                payload.identity = compress_identity(
                    t_logits, t_labels, answer_bounds(teacher.tok, answers_of(t_labels.tolist())), self.vmaps.get("t0"),
                    top_k=ident.shared_top_k, shared=ident.shared,
                    projection_top_k=ident.projection_top_k if ident.projection else 0)
                payload.identity.student_bounds = answer_bounds(self.tok, answers_of(labels.tolist()))
            if self.arm.mix in PER_SAMPLE_MIXES:
                texts = [a.text for a in answers] if answers else [self.rows[i]["answer"] for i in idx]
                payload.nll_per_byte = nll_per_byte(t_logits, t_labels, torch.tensor([len(t.encode()) for t in texts]))
            payloads[f"t{j}"] = payload
        return self.objective(logits, labels, payloads, self.vmaps, ce=not answers)


def run_arm(out: str, name: str, arm: Arm, seed: int, budget: Budget) -> dict[str, Any]:
    torch.set_num_threads(1)  # the study runs one arm per core
    t0 = time.time()
    tok = load_tokenizer(arm.tokenizer)
    rows, unusable = arm_rows(out, name, arm, seed, tok, budget.task)
    loss_fn = ArmLoss(out, arm, rows, tok)
    model = tiny_model(tok, seed)
    policy = OnPolicyConfig(fraction=arm.on_policy, mode=arm.policy_mode, start_step=arm.policy_start,
                            max_new_tokens=MAX_ANSWER)
    result = fit(model, tok, rows, budget, seed, budget.steps, budget.batch_size, loss_fn, curve=True,
                 on_policy=policy)
    return {"arm": name, "seed": seed, "final": result["curve"][-1], "curve": result["curve"],
            "final_terms": result["final_terms"], "unusable_targets": unusable, "seconds": time.time() - t0}


def run_all(pool: ProcessPoolExecutor, out: Path, arms: dict[str, Arm], seeds: list[int],
            budget: Budget) -> list[dict[str, Any]]:
    """Every (arm, seed) on the pool's processes (one per core)."""
    futures = [pool.submit(run_arm, str(out), name, arm, seed, budget) for seed in seeds for name, arm in arms.items()]
    results = []
    for f in futures:
        results.append(r := f.result())
        print(f"{r['arm']:<30} seed {r['seed']}: {fmt_metrics(r['final'])}  ({r['seconds']:.0f} s)", flush=True)
    return results


def fmt_metrics(m: dict[str, float]) -> str:
    return " ".join(f"{k} {m[k]:.4f}" for k in METRICS if k in m)


# ---------------------------------------------------------------------------- the product's sweep


def tune_job(out: Path, budget: Budget, tracking_uri: str) -> dict[str, Any]:
    """The study's student and SentencePiece teacher as an ``mlot`` job: train on the ``train`` split (the
    builtin's own label draws), score ``eval/truth_kl`` on the ``validation`` prompts."""
    return {
        "name": "known-truth", "output_dir": str(out / "runs"),
        "student": {"model_config": TINY, "tokenizer": WORDPIECE, "deepspeed": {"stage": 2}},
        "teachers": [{"name": "teacher-sp", "model": str(out / "teachers" / "sp"), "tokenizer": SENTENCEPIECE,
                      "resources": {"num_cpus": 0.25}}],
        "data": {"source": "builtin:known_truth", "train_split": "train", "eval_split": "validation",
                 "max_prompt_length": MAX_PROMPT, "max_answer_length": MAX_ANSWER},
        "loss": {"method": "multilevel_ot", "mode": "paper"},
        "train": {"steps": budget.steps, "batch_size": budget.batch_size, "lr": budget.lr,
                  "warmup_steps": budget.warmup_steps, "eval_every": max(1, budget.steps // 3),
                  "checkpoint_every": budget.steps},
        "tracking": {"uri": tracking_uri, "experiment": "mlot-known-truth"},
        "cluster": {"num_cpus": 4},
    }


def run_tune(out: Path, budget: Budget, samples: int, tracking_uri: str) -> tuple[Arm, dict[str, Any]]:
    """``mlot tune`` on the validation prompts; returns the best trial as an arm, and the sweep's summary."""
    import yaml

    job = out / "tune_job.yaml"
    job.write_text(yaml.safe_dump(tune_job(out, budget, tracking_uri), sort_keys=False))
    cmd = [sys.executable, "-m", "orchestrator.cli", "tune", str(job), "--space",
           str(REPO / "tune_spaces" / "multilevel_ot.yaml"), "--num-samples", str(samples),
           "--scheduler", "asha", "--metric", "eval/truth_kl", "--mode", "min"]
    t0 = time.time()
    subprocess.run(cmd, check=True, cwd=REPO)
    best = yaml.safe_load((out / "runs" / "known-truth" / "best.yaml").read_text())
    loss = best["loss"]
    arm = Arm("multilevel_ot", loss.get("mode", "paper"), dict(loss.get("params") or {}), ("sp",),
              ce_weight=float(loss.get("ce_weight", 1.0)))
    return arm, {"command": " ".join(cmd[1:]), "wall_s": time.time() - t0, "best": loss}


# ---------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    from known_truth_report import report  # benchmarks/ is the script's own folder

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/known_truth")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--first-seed", type=int, default=0, help="seeds first-seed .. first-seed + seeds - 1")
    ap.add_argument("--steps", type=int, default=Budget.steps)
    ap.add_argument("--teacher-steps", type=int, default=Budget.teacher_steps)
    ap.add_argument("--tune-samples", type=int, default=6, help="mlot tune trials (0: no sweep)")
    ap.add_argument("--jobs", type=int, default=2, help="arms trained at once (one process, one core each)")
    ap.add_argument("--arms", nargs="*", help="these arms, of any group (default: every arm of ARMS)")
    ap.add_argument("--identity", action="store_true", help="add the identity-aware arms (mlot.identity)")
    ap.add_argument("--policy", action="store_true", help="add the on-policy and teacher-mixing arms")
    ap.add_argument("--projection", action="store_true", help="add the vocabulary-projection arms")
    ap.add_argument("--task", choices=list(TASKS), default="text",
                    help="the task variant: text answers, or numbers that SentencePiece splits into digits")
    ap.add_argument("--tracking-uri", help="MLflow URI (default: sqlite:///<cwd>/mlflow.db, as the product)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 seed, 12 steps, teachers 50 steps, no sweep")
    args = ap.parse_args(argv)
    budget = Budget(task=args.task, steps=args.steps, teacher_steps=args.teacher_steps)
    if args.quick:
        args.seeds, args.tune_samples = 1, 0
        budget = replace(budget, steps=12, teacher_steps=50, curve_points=1)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    uri = args.tracking_uri or f"sqlite:///{Path.cwd() / 'mlflow.db'}"  # the product's default
    named = {**ARMS, **IDENTITY_ARMS, **POLICY_ARMS, **PROJECTION_ARMS}
    unknown = set(args.arms or ()) - set(named)
    if unknown:
        ap.error(f"unknown arm(s) {sorted(unknown)}; known: {list(named)}")
    arms = {k: v for k, v in named.items() if k in (args.arms or ARMS)}
    arms.update(IDENTITY_ARMS if args.identity else {})
    arms.update(POLICY_ARMS if args.policy else {})
    arms.update(PROJECTION_ARMS if args.projection else {})
    t0 = time.time()
    seeds, tuned = list(range(args.first_seed, args.first_seed + args.seeds)), None
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=get_context("spawn")) as pool:
        teachers = train_teachers(pool, out, budget, {"sp", *(t for arm in arms.values() for t in arm.teachers)})
        results = run_all(pool, out, arms, seeds, budget)
        if args.tune_samples:
            arm, sweep = run_tune(out, budget, args.tune_samples, uri)
            fresh = list(range(seeds[-1] + 1, seeds[-1] + 1 + args.seeds))
            fresh_arms = {"SFT": ARMS["SFT"], "ULD": ARMS["ULD"], "MultiLevelOT (tuned)": arm}
            tuned = {"sweep": sweep, "arm": asdict(arm), "results": run_all(pool, out, fresh_arms, fresh, budget)}
    report(out, {"budget": asdict(budget), "seeds": seeds, "teachers": teachers, "results": results,
                 "tuned": tuned, "wall_s": time.time() - t0, "argv": sys.argv[1:] if argv is None else argv},
           uri)
    return 0


if __name__ == "__main__":
    sys.exit(main())
