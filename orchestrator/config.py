"""The typed job config: one YAML file describes a distillation job.

    from orchestrator.configuration import load_config, dump_config
    cfg = load_config("orchestrator/configs/quickstart.yaml", ["train.lr=3e-4", "teachers.0.weight=2"])
    cfg.train.lr, cfg.student.tokenizer_name, cfg.loss.payload_config(), cfg.to_flat_dict()

This module is the schema; ``orchestrator.configuration`` loads, overrides and dumps it. Every entry
point (distill, tune, generate, eval) reads this one schema; a sweep is a set of overrides of a job
config (``apply_overrides``). A bad config raises ``ConfigError`` whose message names the field path
(``train.lr``), the bad value and what is allowed: users see their mistake, never a pydantic traceback.

Notes for callers:
- The YAML key ``model_config`` (a transformers config dict) is the attribute ``hf_config`` in
  Python: pydantic reserves ``model_config`` on models. Dumps use the YAML name.
- Relative paths (``data.source``, ``student.deepspeed.config_path``, ``output_dir``) are relative
  to the working directory of the process, like any CLI argument, not to the YAML file.
- Existence of model / data paths is *not* checked here: on a cluster they may exist only on the
  nodes. Only ``student.deepspeed.config_path`` is read at load time (it must be a JSON object).
"""

from __future__ import annotations

import difflib
import json
import os
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from specs import (
    BUILTIN_DATASETS,
    BUILTIN_TOKENIZERS,
    DATA_FILE_FORMATS,
    FieldProblem,
    Template,
    format_fields,
)
from specs import deepspeed as deepspeed_spec

__all__ = [
    "BUILTIN_DATASETS", "BUILTIN_TOKENIZERS", "DATA_FILE_SUFFIXES", "ClusterConfig", "DataConfig",
    "DeepSpeedConfig", "EvalConfig", "JobConfig", "LossConfig", "ModelSpec", "OnPolicyConfig",
    "PretrainConfig", "StudentConfig", "SweepConfig", "TeacherConfig", "ActorResources", "Template",
    "TrackingConfig", "TrainConfig", "VllmConfig", "VllmRuntime",
]

#: Local file formats ``data.source`` may point to (a directory of them is fine too).
DATA_FILE_SUFFIXES: tuple[str, ...] = tuple(DATA_FILE_FORMATS)
# Suffixes that are certainly data files we cannot read: refusing them early beats a late reader error.
# (An arbitrary unknown suffix is not refused: hub names like "org/the-stack-v1.2" contain dots.)
_UNSUPPORTED_DATA_SUFFIXES = (".txt", ".tsv", ".xls", ".xlsx", ".gz", ".zip", ".bz2", ".xz", ".tar",
                              ".pkl", ".pickle", ".yaml", ".yml", ".xml", ".h5", ".hdf5", ".feather")
# Ray's built-in resource names: they have dedicated fields, and a custom entry would clash with them.
_RESERVED_RESOURCES = ("CPU", "GPU", "memory", "object_store_memory")
_POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length")
_NAME_RE = r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$"


# --------------------------------------------------------------------------------------------- models

_SECTION = ConfigDict(
    extra="forbid",              # an unknown key is almost always a typo: refuse it, never ignore it
    frozen=True,                 # a validated job does not change; derive a new one with apply_overrides
    protected_namespaces=(),     # allow a field called "model" without pydantic's namespace warning
    validate_by_name=True,
    validate_by_alias=True,
    serialize_by_alias=True,     # dumps use the YAML names (model_config), so they load back
    hide_input_in_errors=False,
)


class _Section(BaseModel):
    model_config = _SECTION


class DeepSpeedConfig(_Section):
    """The student's DeepSpeed ZeRO settings (a DeepSpeed config is generated from them)."""

    stage: Literal[1, 2, 3] = Field(2, description="ZeRO stage: 1 (optimizer states), 2 (+gradients), 3 (+parameters) partitioned.")
    offload_optimizer: bool = Field(False, description="Keep optimizer states in CPU memory.")
    offload_param: bool = Field(False, description="Keep parameters in CPU memory (ZeRO-3 only).")
    config_path: str | None = Field(None, description="A DeepSpeed JSON config that replaces the generated one; must exist.")

    @model_validator(mode="after")
    def _check(self) -> DeepSpeedConfig:
        problems = []
        if self.offload_param and self.stage != 3:
            problems.append(("offload_param", True, f"only valid with stage: 3 (parameters are partitioned only by ZeRO-3; stage is {self.stage}); set stage: 3 or offload_param: false"))
        if self.config_path is not None:
            path = Path(self.config_path).expanduser()
            if not path.is_file():
                problems.append(("config_path", self.config_path, f"no such file (resolved to {path.absolute()}); expected an existing DeepSpeed JSON file or null"))
            else:
                try:
                    cfg = json.loads(path.read_text())
                except (OSError, ValueError) as exc:
                    problems.append(("config_path", self.config_path, f"not readable as JSON: {exc}"))
                else:
                    if not isinstance(cfg, dict):
                        problems.append(("config_path", self.config_path, "the JSON file must hold an object (a DeepSpeed config)"))
                    elif unfilled := deepspeed_spec.unresolvable(cfg):
                        problems.append(("config_path", self.config_path, f"{', '.join(unfilled)}: \"auto\" is filled only for {', '.join(f'zero_optimization.{k}' for k in deepspeed_spec.SIZED)}, bf16/fp16.enabled and the batch sizes; set a value there"))
        if problems:
            raise FieldProblem(*problems)
        return self


class ModelSpec(_Section):
    """A model and how to feed it: shared by the student and each teacher."""

    model: str | None = Field(None, description="Hugging Face hub name or local path of a causal LM.")
    hf_config: dict[str, Any] | None = Field(
        None, alias="model_config",
        description="A transformers config dict incl. model_type, for a randomly initialised (tiny) model "
                    "(AutoConfig.for_model(**d) + AutoModelForCausalLM.from_config). Exactly one of model / model_config.")
    tokenizer: str | None = Field(None, description=f"HF tokenizer name or path, or one of {', '.join(BUILTIN_TOKENIZERS)}; null uses `model`.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="Weights / compute dtype.")
    trust_remote_code: bool = Field(False, description="Allow model / tokenizer code from the hub (transformers trust_remote_code).")
    template: Template = Field(default_factory=Template, description="Prompt / answer templates for this model.")

    @model_validator(mode="after")
    def _check_model(self) -> ModelSpec:
        problems: list[tuple[str, Any, str]] = []
        if (self.model is None) == (self.hf_config is None):
            which = "both are set" if self.model is not None else "neither is set"
            problems.append(("model", self.model, f"exactly one of model (a hub name / path) or model_config (a transformers config dict) is required; {which}"))
        if self.hf_config is not None:
            problems.extend(_check_hf_config(self.hf_config))
        if self.tokenizer is None and self.model is None:
            problems.append(("tokenizer", None, f"required when model_config is used (there is no model to take it from): a HF tokenizer name/path or one of {', '.join(BUILTIN_TOKENIZERS)}"))
        elif self.tokenizer is not None and self.tokenizer.startswith("builtin:") and self.tokenizer not in BUILTIN_TOKENIZERS:
            problems.append(("tokenizer", self.tokenizer, f"unknown builtin tokenizer; allowed: {', '.join(BUILTIN_TOKENIZERS)}"))
        if problems:
            raise FieldProblem(*problems)
        return self

    @property
    def tokenizer_name(self) -> str:
        """The tokenizer to load: ``tokenizer``, else ``model``."""
        return self.tokenizer if self.tokenizer is not None else typing.cast(str, self.model)


def _check_hf_config(d: dict[str, Any]) -> list[tuple[str, Any, str]]:
    # Imported here: orchestrator.configuration imports this schema, so a module-level import is a circle.
    from orchestrator.configuration.errors import MISSING

    model_type = d.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        return [("model_config.model_type", d.get("model_type", MISSING), "required: the transformers model type, e.g. 'llama' or 'gpt2'")]
    # Imported here: transformers' config table costs ~2 s and is only needed for model_config jobs.
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    if model_type not in CONFIG_MAPPING_NAMES:
        close = difflib.get_close_matches(model_type, list(CONFIG_MAPPING_NAMES), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        return [("model_config.model_type", model_type, f"not a transformers model type{hint}")]
    return []


class StudentConfig(ModelSpec):
    """The model being trained (one copy per training worker, under DeepSpeed)."""

    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="Training precision: bfloat16 / float16 train with DeepSpeed mixed precision and fp32 master weights (the loss softmax stays fp32).")
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig, description="DeepSpeed ZeRO settings.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in the backward pass (less memory, about a third more compute).")
    export_dtype: Literal["float32", "bfloat16", "float16"] | None = Field(None, description="dtype of the exported student (one safetensors model, gathered one layer at a time and written by rank 0); null: the training dtype (dtype). bfloat16 / float16 halve a float32 student's file and rank 0's copy.")


class ActorResources(_Section):
    """Ray resources of one serving actor (a teacher replica, the on-policy vLLM generator)."""

    num_gpus: float = Field(0, ge=0, description="GPUs per actor (fractions share a GPU; above 1: tensor parallel for vLLM, a device map for hf).")
    num_cpus: float = Field(0.25, ge=0, description="CPUs per actor; small so training workers keep the CPUs.")
    accelerator_type: str | None = Field(None, description="Ray accelerator type to place the actor on, e.g. 'H100'.")
    memory: int | None = Field(None, ge=0, description="Memory per actor in bytes (Ray logical resource).")
    custom: dict[str, float] = Field(default_factory=dict, description="Custom Ray resources per actor, e.g. {teacher_node: 1}.")

    @field_validator("custom")
    @classmethod
    def _check_custom(cls, v: dict[str, float]) -> dict[str, float]:
        problems = [(f"custom.{k}", x, "must be >= 0") for k, x in v.items() if x < 0]
        problems += [(f"custom.{k}", x, f"{k!r} is a built-in Ray resource: use num_cpus / num_gpus / memory instead")
                     for k, x in v.items() if k in _RESERVED_RESOURCES]
        if problems:
            # A field validator's loc already ends in "custom": report paths relative to it.
            raise FieldProblem(*[(p.removeprefix("custom."), x, m) for p, x, m in problems])
        return v


class PretrainConfig(_Section):
    """Optional brief training of a (tiny, random) teacher on the task before distillation."""

    steps: int = Field(0, ge=0, description="Pre-training steps (0: none).")
    lr: float = Field(1e-3, gt=0, description="Pre-training learning rate.")
    batch_size: int = Field(16, ge=1, description="Pre-training batch size.")
    split: str | None = Field(None, min_length=1, description="The split of data.source the teacher pre-trains on (e.g. builtin:known_truth's `teacher` split: many more labels per prompt than the student's); null: the job's data.train_split.")


class ServingConfig(_Section):
    """How a teacher replica takes requests (workers.teacher.batching)."""

    max_batch_tokens: int | None = Field(None, ge=1, description="Merge the pending requests of all workers into forwards of at most this many padded tokens (rows x longest row; a request larger than it still goes alone); null: each request is its own forward.")
    max_wait_ms: float = Field(2.0, ge=0, description="How long an idle replica waits for other requests to batch with the first.")


class VllmRuntime(_Section):
    """Where and how a vLLM engine runs: in its own runtime, as vLLM pins another transformers than the project."""

    python: str = Field(".venv-vllm/bin/python", min_length=1, description="Python of the vLLM runtime the engine's actor runs in (vLLM pins another transformers than the project: `bash scripts/setup_vllm.sh` creates .venv-vllm); a path relative to the repository root, or absolute. It must exist on every node that hosts the actor.")
    max_model_len: int | None = Field(None, ge=2, description="Longest prompt + answer (tokens) the engine holds; null: the model's positions.")
    kv_cache_gb: float = Field(1.0, gt=0, description="KV-cache memory per engine in GiB (1 GiB holds ~700k tokens of a tiny model, ~8k of a 7B one in bf16).")
    enforce_eager: bool = Field(True, description="Run the model eagerly (no CUDA graphs / torch.compile): a faster start-up; scoring is prefill-only, which graphs speed up little (a generator decoding long answers on a GPU gains from false).")


class VllmConfig(VllmRuntime):
    """The vLLM engine of a teacher (teachers[i].engine: vllm; workers.teacher.vllm_engine)."""

    max_logprobs: int | None = Field(None, ge=1, description="Log-probabilities the engine returns per answer row; null: the job loss's top_k + 1. A sweep whose trials raise top_k needs it larger.")


class TeacherConfig(ModelSpec):
    """One teacher model served by a pool of Ray actors."""

    dtype: Literal["float32", "bfloat16", "float16"] | None = Field(None, description="Inference dtype; null: bfloat16 on a GPU, float32 on the CPU.")
    name: str = Field(..., min_length=1, pattern=_NAME_RE, description="Unique teacher name (actor names, metrics); letters, digits, _ . -")
    weight: float = Field(1.0, ge=0, description="Weight of this teacher's distillation loss.")
    replicas: int | str = Field(1, description="Number of actor replicas serving this teacher; auto: as many as the cluster's nodes hold (after the training workers' and the earlier teachers' requests), at most max_replicas.")
    max_replicas: int = Field(8, ge=1, description="The most replicas replicas: auto starts.")
    resources: ActorResources = Field(default_factory=ActorResources, description="Ray resources per replica.")
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig, description="Brief task pre-training (for tiny random teachers); null: none.")
    store: str | None = Field(None, min_length=1, description="A teacher store made by `mlot teach` (a folder or URI): read this teacher's outputs from it instead of running it (no teacher resources); refused if it does not match the job.")
    serving: ServingConfig = Field(default_factory=ServingConfig, description="Request batching of each replica.")
    engine: Literal["hf", "vllm"] = Field("hf", description="What runs the teacher: hf (a transformers model; every loss) or vllm (vLLM's engine in its own runtime, teachers[i].vllm; top-K prompt log-probabilities: exact for token ranking and the gold log-probabilities, bounded for sequence ranking; refuses what needs full logits).")
    vllm: VllmConfig = Field(default_factory=VllmConfig, description="The vLLM engine's settings (engine: vllm).")

    @model_validator(mode="after")
    def _check_engine(self) -> TeacherConfig:
        if self.engine == "vllm" and self.serving.max_batch_tokens is not None:
            raise FieldProblem(("serving.max_batch_tokens", self.serving.max_batch_tokens, "batches the requests of an hf replica; vLLM schedules its own batches: set it to null with engine: vllm"))
        return self

    @field_validator("replicas")
    @classmethod
    def _replicas(cls, v: int | str) -> int | str:
        if v != "auto" and (isinstance(v, str) or v < 1):
            raise ValueError("expected an integer >= 1, or auto (as many as the cluster holds)")
        return v

    @field_validator("pretrain", mode="before")
    @classmethod
    def _no_pretrain(cls, v: Any) -> Any:
        # `--set teachers.0.pretrain=null` switches it off (the section's defaults are "no pre-training").
        return {} if v is None else v


class DataConfig(_Section):
    """Where the (prompt, answer) rows come from and how long they may be."""

    source: str = Field(..., min_length=1, description=f"HF dataset name, a local {'/'.join(DATA_FILE_SUFFIXES)} file or directory, or one of {', '.join(BUILTIN_DATASETS)}.")
    name: str | None = Field(None, description="HF dataset config name.")
    columns: dict[str, str] = Field(default_factory=lambda: {"prompt": "prompt", "answer": "answer"},
                                    description="Template field -> dataset column; must contain 'answer'.")
    train_split: str = Field("train", description="Split used for training.")
    eval_split: str | None = Field(None, description="Split used for evaluation; null holds out eval_fraction of the training split.")
    eval_fraction: float = Field(0.1, ge=0, le=0.5, description="Held-out fraction of the training split when eval_split is null.")
    max_prompt_length: int = Field(256, ge=1, description="Prompt tokens kept (per model's tokenizer).")
    max_answer_length: int = Field(64, ge=1, description="Answer tokens kept (per model's tokenizer).")
    on_bad_row: Literal["error", "skip"] = Field("error", description="What to do with a row that cannot be templated/tokenized.")
    limit: int | None = Field(None, ge=1, description="Use only the first N rows.")
    num_proc: int | None = Field(None, ge=1, description="Processes that tokenise the rows (one pass for every model, cached); null: 1 below 10,000 rows, else one per CPU up to 8.")
    cache_dir: str | None = Field(None, min_length=1, description="Where tokenised data is cached by fingerprint (a rerun or a sweep's trials tokenise nothing); a folder every node shares, or a URI. null: <output_dir>/.cache/data.")

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        problems: list[tuple[str, Any, str]] = []
        if self.source.startswith("builtin:") and self.source not in BUILTIN_DATASETS:
            problems.append(("source", self.source, f"unknown builtin dataset; allowed: {', '.join(BUILTIN_DATASETS)}"))
        suffix = Path(self.source).suffix.lower()
        if suffix in _UNSUPPORTED_DATA_SUFFIXES or (suffix and Path(self.source).is_file() and suffix not in DATA_FILE_SUFFIXES):
            problems.append(("source", self.source, f"unsupported file type {suffix!r}; allowed: {', '.join(DATA_FILE_SUFFIXES)} (or a HF dataset name)"))
        if "answer" not in self.columns:
            problems.append(("columns", self.columns, "must map 'answer' to a dataset column"))
        bad = [k for k in self.columns if not k.isidentifier()]
        if bad:
            problems.append(("columns", self.columns, f"keys {bad} are not usable as template field names (letters, digits, _)"))
        if self.source == "builtin:known_truth" and "prompt" not in self.columns.values():
            problems.append(("columns", self.columns, "builtin:known_truth's eval scores each prompt against its true answer distribution: map its 'prompt' column to a template field, e.g. {prompt: prompt}"))
        if problems:
            raise FieldProblem(*problems)
        return self

    @property
    def source_kind(self) -> Literal["builtin", "local", "hub"]:
        """How ``source`` is read: a generated builtin set, a local file/dir, or a HF hub dataset."""
        if self.source.startswith("builtin:"):
            return "builtin"
        p = Path(self.source).expanduser()
        if p.suffix.lower() in DATA_FILE_SUFFIXES or self.source.startswith(("/", "./", "../", "~")) or p.exists():
            return "local"
        return "hub"


class LossConfig(_Section):
    """The distillation loss: total = ce_weight * CE + sum_j weight_j * loss(student, teacher_j).

    Methods and their parameters come from the registry in ``mlot.methods`` (one definition each).
    """

    method: str = Field("aligned", description="Distillation loss: a method of mlot.METHODS (aligned: CE + the vocabulary projection at weight 1, the default the known-truth study chose on both of its variants, docs/quality.md; multilevel_ot: the paper's; uld, kl, sft; sft: CE only, no teachers).")
    mode: Literal["paper", "reference"] = Field("paper", description="MultiLevelOT mode: the paper's method, or the released code's arithmetic.")
    ce_weight: float = Field(1.0, ge=0, description="Weight of the student's cross-entropy on the answer.")
    params: dict[str, Any] = Field(default_factory=dict, description="Parameters of the method (see mlot.METHODS[method].params); unknown names are refused.")
    teacher_mix: str = Field("sum", description="How several teachers' losses combine (mlot.mixing): sum (weights), mean (weights normalised), best (per sample, the teacher with the lowest NLL per answer byte), confidence (per-sample softmax(log weight - NLL per byte / mix_temperature)).")
    mix_temperature: float = Field(1.0, gt=0, description="Temperature of teacher_mix confidence, in nats per byte.")
    fused_head: bool = Field(True, description="Read the student's logits from its LM head chunk by chunk (mlot.HeadLogits): no [rows, vocab] logits or logit gradient is ever built, the memory of the loss is a few chunks. false: the model builds its logits (the reference mode always does).")

    @model_validator(mode="after")
    def _check_params(self) -> LossConfig:
        # Imported here: mlot imports torch, which config-only users (dump, lint) should not pay for
        # unless they validate a loss.
        from mlot.methods import METHODS
        from mlot.mixing import MIXES, PER_SAMPLE_MIXES

        if self.teacher_mix not in MIXES:
            raise FieldProblem(("teacher_mix", self.teacher_mix, f"one of {', '.join(MIXES)}"))
        if self.teacher_mix in PER_SAMPLE_MIXES and self.mode == "reference":
            raise FieldProblem(("teacher_mix", self.teacher_mix, "weighs teachers per sample; reference mode couples "
                                "the batch (no per-sample loss): use loss.mode paper, or teacher_mix sum / mean"))

        if self.method not in METHODS:
            close = difflib.get_close_matches(self.method, list(METHODS), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise FieldProblem(("method", self.method, f"unknown loss method; {hint}known: {', '.join(METHODS)}"))
        problems = METHODS[self.method].problems(self.mode, self.params)
        if problems:
            raise FieldProblem(*[(p if p in ("method", "mode") else f"params.{p}".rstrip("."), v, m)
                                 for p, v, m in problems])
        return self

    @property
    def spec(self) -> Any:
        """The ``mlot.Method`` of this loss."""
        from mlot.methods import get_method

        return get_method(self.method)

    @property
    def reads_head(self) -> bool:
        """Does the student's loss read its LM head (``fused_head``, in a mode that needs no built logits)?"""
        return self.fused_head and self.mode not in self.spec.dense_modes

    def payload_config(self) -> Any:
        """The ``mlot.MultiLevelOTConfig`` a teacher compresses with for this loss."""
        return self.spec.payload_config(self.mode, self.params)

    def objective(self, weights: dict[str, float]) -> Any:
        """The ``mlot.objective.Objective`` of this loss, with the teachers' ``weights`` as the mix's prior."""
        from mlot.objective import Objective

        return Objective(self.spec, self.mode, self.params, self.ce_weight, self.spec.identity_config(self.params),
                         self.teacher_mix, self.mix_temperature, weights)


class OnPolicyConfig(_Section):
    """On-policy distillation (GKD-style): on a fraction of micro-batches the student samples its own answers
    to the batch's prompts, and the teachers score that text in their own tokens."""

    fraction: float = Field(0.0, ge=0, le=1, description="Share of micro-batches trained on the student's own samples (chosen from train.seed and the micro-batch: a resumed run replays them).")
    max_new_tokens: int = Field(32, ge=1, description="Longest generated answer, in student tokens.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature of the student's answers.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling of the student's answers (1: the full distribution).")
    ce: bool = Field(False, description="Also train CE on the generated answers (off: only the distillation terms learn from them).")
    mode: Literal["replace", "add"] = Field("replace", description="replace: a chosen micro-batch trains on the student's own answers instead of its labels (GKD's mix); add: on both, the labels' loss plus the on-policy loss on the student's answers to the same prompts (one forward over twice the rows).")
    start_step: int = Field(0, ge=0, description="Optimizer steps trained on the labels only before any micro-batch is on-policy (a warm start: the student learns to answer before it samples).")
    engine: Literal["hf", "vllm"] = Field("hf", description="What samples the answers: hf (each rank's own student; train.on_policy.gather under ZeRO-3) or vllm (one copy of the student on vLLM in its own runtime, train.on_policy.vllm, placed by train.on_policy.resources, sent the trainer's weights every sync_every steps: ranks run no collective while answers are sampled).")
    sync_every: int = Field(1, ge=1, description="engine: vllm: send the trainer's weights to the vLLM copy every N optimizer steps (1: every answer is sampled from the current weights). train.checkpoint_every must be a multiple of it, so a resumed run samples from the weights it sampled from before.")
    vllm: VllmRuntime = Field(default_factory=VllmRuntime, description="The vLLM generator's runtime and engine settings (engine: vllm).")
    resources: ActorResources = Field(default_factory=ActorResources, description="Ray resources of the vLLM generator (engine: vllm), e.g. {num_gpus: 1, accelerator_type: L40S}.")
    gather: Literal["once", "per_layer"] = Field("once", description="engine: hf under ZeRO-3: once gathers the whole student on every rank for a micro-batch's generation (one all-gather, then decoding with the KV cache and no collective per token: the student must fit one device); per_layer keeps it partitioned and gathers each layer at every decoded token, all ranks in step (for students that do not fit).")

    @property
    def generator(self) -> bool:
        """Does the job run the vLLM generator (on-policy micro-batches sampled by engine: vllm)?"""
        return self.fraction > 0 and self.engine == "vllm"


class TrainConfig(_Section):
    """Student training: steps, optimiser, workers and checkpoints."""

    steps: int | None = Field(None, ge=1, description="Optimizer steps to train; exactly one of steps / epochs (default: steps=100).")
    epochs: int | None = Field(None, ge=1, description="Epochs to train instead of steps.")
    batch_size: int = Field(8, ge=1, description="Micro-batch size per worker.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches accumulated per optimizer step.")
    lr: float = Field(1e-4, gt=0, description="Peak learning rate (AdamW).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    schedule: Literal["constant", "linear", "cosine"] = Field("linear", description="Learning-rate schedule after warm-up.")
    warmup_steps: int = Field(0, ge=0, description="Linear warm-up steps.")
    seed: int = Field(0, description="Random seed (data order, init of random-weight models).")
    num_workers: int = Field(1, ge=1, description="Training workers (Ray Train / DeepSpeed data parallel ranks).")
    use_gpu: bool = Field(False, description="One GPU per training worker (a worker without CUDA falls back to the CPU, with a warning).")
    accelerator_type: str | None = Field(None, description="Ray accelerator type the training workers must run on, e.g. 'H100' (Ray Train ScalingConfig.accelerator_type).")
    backend: Literal["nccl", "gloo"] | None = Field(None, description="torch.distributed backend; null: nccl with use_gpu, gloo otherwise.")
    resources_per_worker: dict[str, float] = Field(default_factory=dict, description="Ray resources per worker, e.g. {CPU: 4, student_node: 1}.")
    checkpoint_every: int = Field(50, ge=1, description="Checkpoint every N optimizer steps (and at the end).")
    checkpoint_upload: Literal["sync", "async"] = Field("sync", description="sync: training waits until the checkpoint is on storage; async: each rank writes its shard to local disk and Ray Train uploads it in the background while training goes on (no step time on remote storage, but a driver killed before an upload completes resumes from the previous checkpoint).")
    eval_every: int | None = Field(None, ge=1, description="Evaluate every N optimizer steps; null: no periodic evaluation.")
    eval_rows: int | None = Field(2000, ge=1, description="Eval CE during training on a fixed, seeded sample of at most this many eval rows (the same at every eval); null: the whole eval split.")
    prefetch: int = Field(2, ge=0, description="Teacher payload batches requested ahead of the current step.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Gradient clipping norm; null: no clipping.")
    max_nonfinite_steps: int = Field(10, ge=0, description="Consecutive non-finite micro-batches (student logits or loss) tolerated before the run fails; each is skipped on every rank with zero gradient contribution.")
    max_failures: int = Field(1, ge=-1, description="Worker-group restarts from the last checkpoint after a worker dies (Ray Train FailureConfig; -1: unlimited).")
    on_policy: OnPolicyConfig = Field(default_factory=OnPolicyConfig, description="On-policy distillation: the student's own answers, scored by the teachers.")

    @model_validator(mode="before")
    @classmethod
    def _default_steps(cls, data: Any) -> Any:
        # "steps: 100" is the default only when neither is given; a YAML that sets epochs gets steps=None.
        if isinstance(data, Mapping) and data.get("steps") is None and data.get("epochs") is None:
            data = {**data, "steps": 100}
        return data

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        problems: list[tuple[str, Any, str]] = []
        if self.steps is not None and self.epochs is not None:
            problems.append(("epochs", self.epochs, f"set exactly one of train.steps / train.epochs (steps is {self.steps}); set the other to null"))
        if self.steps is not None and self.warmup_steps > self.steps:
            problems.append(("warmup_steps", self.warmup_steps, f"must be <= train.steps ({self.steps})"))
        bad = {k: v for k, v in self.resources_per_worker.items() if v < 0}
        problems += [(f"resources_per_worker.{k}", v, "must be >= 0") for k, v in bad.items()]
        if problems:
            raise FieldProblem(*problems)
        return self


class EvalConfig(_Section):
    """The end-of-job scoring of the exported student (greedy answers, scored as ``metric`` says)."""

    max_rows: int | None = Field(200, ge=0, description="Score a seeded sample of at most this many eval rows (null: all; 0: no end-of-job scoring); eval CE during training reads train.eval_rows of them.")
    num_tasks: int = Field(2, ge=1, description="Ray tasks the scored rows are split over (each loads the student once).")
    metric: Literal["qa", "rouge", "all"] = Field("qa", description="What the scoring measures: qa (exact match + F1), rouge (ROUGE-Lsum, for summaries) or all; the exported student's mlot eval uses it too.")


class TrackingConfig(_Section):
    """MLflow tracking."""

    uri: str | None = Field(None, description="MLflow tracking URI; null: sqlite:///<absolute cwd>/mlflow.db.")
    experiment: str = Field("mlot", min_length=1, description="MLflow experiment name.")
    run_name: str | None = Field(None, description="MLflow run name; null: the job name.")
    tags: dict[str, str] = Field(default_factory=dict, description="Extra MLflow run tags.")

    def resolved_uri(self, cwd: str | Path | None = None) -> str:
        """The tracking URI to use. The default is a sqlite file: MLflow 3's ./mlruns file store
        refuses to run without MLFLOW_ALLOW_FILE_STORE (notes/STACK.md)."""
        if self.uri is not None:
            return self.uri
        return f"sqlite:///{Path(cwd or os.getcwd()).absolute() / 'mlflow.db'}"


class ClusterConfig(_Section):
    """Which Ray cluster to run on."""

    address: str | None = Field(None, description="Ray address of an existing cluster (e.g. 'auto', '10.0.0.5:6379', 'ray://host:10001'); null: always start a fresh local Ray.")
    num_cpus: int | None = Field(None, ge=1, description="CPUs of a locally started Ray (logical; may exceed the machine's).")
    runtime_env: dict[str, Any] = Field(default_factory=dict, description="Ray runtime_env for the job (pip, env_vars, working_dir...).")
    autoscaling: bool = Field(False, description="The cluster adds nodes on demand (Ray autoscaler): skip the up-front check that every teacher replica and training worker fits an existing node.")
    launcher_config: str | None = Field(None, description="The cluster-launcher YAML of an autoscaling cluster (e.g. cluster.yaml): a sweep sizes its concurrency from its node types' resources times max_workers, not from the nodes that exist now.")


class SweepConfig(_Section):
    """Settings of ``mlot tune`` (the YAML section ``tune``)."""

    teacher_cache_bytes: int | None = Field(None, ge=1, description="Bytes each shared teacher replica may keep of cached hidden states (least recently used evicted first); null: half of the replica's teachers[*].resources.memory when set, else 10% of its node's memory.")
    max_concurrent: int | None = Field(None, ge=1, description="Trials at once; null: as many as fit the cluster (cluster.launcher_config for an autoscaling cluster). --max-concurrent overrides it.")


class JobConfig(_Section):
    """A whole distillation job."""

    name: str = Field("mlot-job", min_length=1, pattern=_NAME_RE, description="Job name; the run writes to <output_dir>/<name>. Letters, digits, _ . -")
    output_dir: str = Field("runs", min_length=1, description="Where checkpoints and exports go (under <output_dir>/<name>): a local or shared directory, or a URI every node can reach (s3://, gs://, any pyarrow filesystem).")
    student: StudentConfig = Field(..., description="The model being trained.")
    teachers: list[TeacherConfig] = Field(default_factory=list, description="Teacher models (at least one unless loss.method is sft).")
    data: DataConfig = Field(..., description="Training / evaluation data.")
    loss: LossConfig = Field(default_factory=LossConfig, description="Distillation loss.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Student training.")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="End-of-job scoring of the exported student.")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="MLflow tracking.")
    cluster: ClusterConfig = Field(default_factory=ClusterConfig, description="Ray cluster.")
    tune: SweepConfig = Field(default_factory=SweepConfig, description="Sweeps (mlot tune).")

    @model_validator(mode="after")
    def _check_job(self) -> JobConfig:
        problems: list[tuple[str, Any, str]] = []
        if not self.teachers and self.loss.spec.needs_teacher:
            problems.append(("teachers", [], f"at least one teacher is needed for loss.method {self.loss.method!r} (sft trains without teachers)"))
        seen: dict[str, int] = {}
        for i, t in enumerate(self.teachers):
            if t.name in seen:
                problems.append((f"teachers.{i}.name", t.name, f"duplicate teacher name (also teachers.{seen[t.name]}.name); names must be unique"))
            seen.setdefault(t.name, i)
        if self.loss.spec.same_vocabulary:
            # Token-level KL compares distributions over one vocabulary: the tokenizers must be the same.
            for i, t in enumerate(self.teachers):
                if t.tokenizer_name != self.student.tokenizer_name:
                    problems.append((f"teachers.{i}.tokenizer", t.tokenizer_name,
                                     f"loss.method {self.loss.method!r} compares distributions over one vocabulary: every teacher must use the student's tokenizer ({self.student.tokenizer_name!r}); use aligned / multilevel_ot / uld across tokenizers"))
        known = set(self.data.columns)
        for prefix, spec in [("student", self.student)] + [(f"teachers.{i}", t) for i, t in enumerate(self.teachers)]:
            for key in ("prompt", "answer"):
                fmt = getattr(spec.template, key)
                unknown = sorted(set(format_fields(fmt)) - known)
                if unknown:
                    problems.append((f"{prefix}.template.{key}", fmt, f"uses field(s) {unknown} that data.columns does not define; known: {sorted(known)}"))
            if "answer" not in spec.template.answer_fields():
                # The answer column is what is distilled, cut to fit every tokenizer and scored: a template that
                # renders another field would train on text the cut never shortens and the scores never see.
                problems.append((f"{prefix}.template.answer", spec.template.answer, "must render the {answer} field (the distilled and scored text); map the column you want with data.columns.answer, e.g. columns: {answer: summary} and answer: ' {answer}'"))
        for prefix, spec in [("student", self.student)] + [(f"teachers.{i}", t) for i, t in enumerate(self.teachers)]:
            # Known only for model_config models (a hub model's limit needs its downloaded config).
            positions = next((spec.hf_config[k] for k in _POSITION_KEYS if isinstance((spec.hf_config or {}).get(k), int)), None)
            answer = max(self.data.max_answer_length, self.train.on_policy.max_new_tokens if prefix == "student" else 0)
            total = self.data.max_prompt_length + answer
            if positions is not None and total > positions:
                problems.append(("data.max_prompt_length", self.data.max_prompt_length,
                                 f"max_prompt_length + max(max_answer_length, train.on_policy.max_new_tokens) = {total} exceeds {prefix}'s {positions} positions (model_config); lower them or raise the model's positions"))
        if self.train.on_policy.fraction > 0:
            problems += _on_policy_problems(self)
        problems += _vllm_problems(self)
        if self.train.eval_every is not None and self.data.eval_split is None and self.data.eval_fraction == 0:
            problems.append(("train.eval_every", self.train.eval_every, "needs evaluation data: set data.eval_split or data.eval_fraction > 0"))
        if problems:
            raise FieldProblem(*problems)
        return self

    @property
    def run_path(self) -> str:
        """``<output_dir>/<name>``: where this job's state, checkpoints and exports go (an absolute local
        path, or a URI such as ``s3://bucket/runs/<name>``; see ``specs.storage``)."""
        from specs.storage import join
        return join(self.output_dir, self.name)

    @property
    def data_cache(self) -> str:
        """Where tokenised data is cached: ``data.cache_dir``, else ``<output_dir>/.cache/data`` (shared by the
        jobs and sweeps that write there)."""
        from specs.storage import join
        return join(self.data.cache_dir or self.output_dir, *([] if self.data.cache_dir else [".cache", "data"]))

    def to_flat_dict(self) -> dict[str, Any]:
        """Dotted keys -> leaf values (``{"train.lr": 1e-4, "teachers.0.name": ...}``), for MLflow params.
        Lists are indexed like overrides; empty dicts/lists are kept as leaves so keys are stable."""
        out: dict[str, Any] = {}

        def walk(prefix: str, value: Any) -> None:
            if isinstance(value, dict) and value:
                for k, v in value.items():
                    walk(f"{prefix}.{k}" if prefix else str(k), v)
            elif isinstance(value, list) and value:
                for i, v in enumerate(value):
                    walk(f"{prefix}.{i}", v)
            else:
                out[prefix] = value

        walk("", self.model_dump(mode="json"))
        return out


def _on_policy_problems(job: JobConfig) -> list[tuple[str, Any, str]]:
    """What an on-policy job cannot do: train without teachers, or read a teacher from its store."""
    out: list[tuple[str, Any, str]] = []
    if not job.loss.spec.needs_teacher:
        out.append(("train.on_policy.fraction", job.train.on_policy.fraction,
                    f"on-policy training distils the student's own answers; loss.method {job.loss.method!r} has no teacher"))
    for i, t in enumerate(job.teachers):
        if t.store:
            out.append((f"teachers.{i}.store", t.store, "a teacher store holds outputs for the dataset's answers, not for text the student generates: on-policy training (train.on_policy.fraction > 0) needs live teachers"))
    start, steps = job.train.on_policy.start_step, job.train.steps
    if steps is not None and start >= steps:
        out.append(("train.on_policy.start_step", start, f"no micro-batch would be on-policy: train.steps is {steps}; set start_step below it (0: on-policy from the first step)"))
    every = job.train.on_policy.sync_every
    if job.train.on_policy.engine == "vllm" and job.train.checkpoint_every % every:
        out.append(("train.on_policy.sync_every", every, f"must divide train.checkpoint_every ({job.train.checkpoint_every}): a run resumed from a checkpoint between two weight syncs would sample from other weights than it did; set sync_every to a divisor of it"))
    return out


def _vllm_problems(job: JobConfig) -> list[tuple[str, Any, str]]:
    """What of the loss a vLLM teacher cannot serve: it sees top-K log-probabilities, not logits (mlot.top_logprobs)."""
    live = [i for i, t in enumerate(job.teachers) if t.engine == "vllm" and not t.store]
    if not live or job.loss.spec.payload is None:
        return []
    from mlot.top_logprobs import top_logprobs_problems

    engines = ", ".join(f"teachers.{i}.engine" for i in live)
    fix = f"or set {engines} to hf"
    out = [("loss.mode" if name == "mode" else f"loss.params.{name}", value,
            f"{engines} is vllm, which serves top-K log-probabilities: {why}; {fix}")
           for name, value, why in top_logprobs_problems(job.loss.payload_config())]
    identity = job.loss.spec.identity_config(job.loss.params)
    if identity.shared:
        out.append(("loss.params.shared_weight", job.loss.params["shared_weight"], f"{engines} is vllm: the "
                    f"exact-match term needs the teacher's mass on every shared token (its whole distribution); set "
                    f"it to 0 ({fix})"))
    return out
