"""Behaviour of the job config: bundled configs load, every documented mistake gives a ConfigError
that names the field path and the bad value, overrides work, and dumps load back equal."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pydantic
import pytest
import yaml

from orchestrator.config import JobConfig
from orchestrator.configuration import (
    ConfigError,
    apply_overrides,
    config_from_dict,
    dump_config,
    load_config,
    parse_override,
)

CONFIGS = Path(__file__).resolve().parents[1] / "orchestrator" / "configs"
QUICKSTART = CONFIGS / "quickstart.yaml"
EXAMPLE = CONFIGS / "example_cluster.yaml"


def raw_quickstart() -> dict[str, Any]:
    return yaml.safe_load(QUICKSTART.read_text())


def write(tmp_path: Path, data: dict[str, Any] | str, name: str = "job.yaml") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return path


def error_of(tmp_path: Path, data: dict[str, Any] | str, overrides: list[str] | None = None) -> str:
    """Load ``data`` and return the ConfigError text; fail if it loads."""
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, data), overrides or [])
    text = str(info.value)
    # Users get our report, never pydantic's dump.
    assert "validation error for" not in text and "errors.pydantic.dev" not in text
    return text


def assert_names(text: str, *parts: str) -> None:
    for part in parts:
        assert part in text, f"{part!r} not in error:\n{text}"


# ------------------------------------------------------------------------------------ bundled configs


def test_a_config_that_names_no_loss_method_gets_the_one_the_study_chose() -> None:
    """No ``loss.method``: ``aligned``, CE + the vocabulary projection at weight 1 (``mlot.methods.ALIGNED_DEFAULTS``,
    the setting docs/quality.md measured on both known-truth variants), not the paper's MultiLevelOT."""
    raw = raw_quickstart()
    del raw["loss"]["method"], raw["loss"]["params"]
    loss = config_from_dict(raw).loss
    assert loss.method == "aligned"
    identity = loss.spec.identity_config(loss.params)
    assert (identity.projection_weight, identity.chunk_weight, identity.shared_weight) == (1.0, 0.0, 0.0)


def test_quickstart_loads() -> None:
    cfg = load_config(QUICKSTART)
    assert cfg.student.hf_config is not None and cfg.student.hf_config["model_type"] == "llama"
    assert cfg.student.hf_config["vocab_size"] == 30522
    assert (cfg.student.hf_config["bos_token_id"], cfg.student.hf_config["eos_token_id"],
            cfg.student.hf_config["pad_token_id"]) == (101, 102, 0)
    assert cfg.student.tokenizer_name == "builtin:wordpiece"
    [teacher] = cfg.teachers
    assert teacher.name == "teacher-sp" and teacher.tokenizer_name == "builtin:sentencepiece"
    assert teacher.hf_config is not None and teacher.hf_config["vocab_size"] == 32000
    assert teacher.pretrain.steps == 150
    assert cfg.data.source == "builtin:quickstart" and cfg.data.source_kind == "builtin"
    assert (cfg.train.steps, cfg.train.epochs, cfg.train.batch_size, cfg.train.lr) == (150, None, 16, 3e-3)
    assert (cfg.train.checkpoint_every, cfg.train.eval_every, cfg.train.num_workers) == (50, 50, 1)
    assert cfg.student.deepspeed.stage == 2
    assert cfg.tracking.uri is None and cfg.tracking.resolved_uri("/tmp/x") == "sqlite:////tmp/x/mlflow.db"
    assert cfg.run_path == str(Path("runs", "quickstart").resolve())
    assert apply_overrides(cfg, ["output_dir=s3://bucket/runs/"]).run_path == "s3://bucket/runs/quickstart"
    assert cfg.loss.payload_config().top_k == 50


def test_example_cluster_loads() -> None:
    cfg = load_config(EXAMPLE)
    [teacher] = cfg.teachers
    assert (teacher.replicas, teacher.max_replicas) == ("auto", 8) and teacher.resources.accelerator_type == "H100"
    assert teacher.resources.custom == {"teacher_node": 1.0}
    assert cfg.student.model == "EleutherAI/pythia-410m" and cfg.student.dtype == "bfloat16"
    assert cfg.student.deepspeed.stage == 3
    assert cfg.train.num_workers == 4 and cfg.train.use_gpu and cfg.train.resources_per_worker == {"student_node": 1.0}
    assert cfg.train.steps is None and cfg.train.epochs == 3
    assert cfg.data.source_kind == "local"


# ------------------------------------------------------------------------------------------ errors


def test_malformed_yaml_names_file_and_line(tmp_path: Path) -> None:
    text = "name: job\ntrain:\n  lr: 0.1\n  steps: [1, 2\n"
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    msg = str(info.value)
    assert str(path) in msg and "malformed YAML" in msg
    assert f"{path}:5:" in msg  # the unclosed list is reported where the stream ends


def test_duplicate_yaml_key_is_an_error(tmp_path: Path) -> None:
    text = "name: a\ntrain:\n  lr: 0.1\n  lr: 0.2\n"
    msg = error_of(tmp_path, text)
    assert_names(msg, "duplicate key 'lr'", ":4:")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_wrong_type(tmp_path: Path) -> None:
    data = raw_quickstart()
    data["train"]["lr"] = "fast"
    msg = error_of(tmp_path, data)
    assert_names(msg, "train.lr", "'fast'", "float > 0")


def test_error_is_a_value_error_with_issues(tmp_path: Path) -> None:
    data = raw_quickstart()
    data["train"]["lr"] = -1
    data["train"]["batch_size"] = 0
    with pytest.raises(ValueError) as info:
        load_config(write(tmp_path, data))
    assert isinstance(info.value, ConfigError)
    assert {i.path for i in info.value.issues} == {"train.lr", "train.batch_size"}


def test_unknown_top_level_key(tmp_path: Path) -> None:
    data = raw_quickstart()
    data["trian"] = {"lr": 1}
    msg = error_of(tmp_path, data)
    assert_names(msg, "trian", "allowed keys", "train", "teachers")


def test_unknown_nested_key(tmp_path: Path) -> None:
    data = raw_quickstart()
    data["teachers"][0]["resources"]["gpus"] = 1
    msg = error_of(tmp_path, data)
    assert_names(msg, "teachers.0.resources.gpus", "allowed keys", "num_gpus", "accelerator_type")


@pytest.mark.parametrize("both", [True, False])
def test_model_and_model_config_exactly_one(tmp_path: Path, both: bool) -> None:
    data = raw_quickstart()
    if both:
        data["student"]["model"] = "gpt2"
    else:
        del data["student"]["model_config"]
    msg = error_of(tmp_path, data)
    assert_names(msg, "student.model", "model_config", "both are set" if both else "neither is set")
    if both:
        assert "'gpt2'" in msg


def test_model_config_needs_a_known_model_type(tmp_path: Path) -> None:
    data = raw_quickstart()
    data["student"]["model_config"]["model_type"] = "lama"
    assert_names(error_of(tmp_path, data), "student.model_config.model_type", "'lama'", "llama")


def test_offload_param_needs_stage_3(tmp_path: Path) -> None:
    data = raw_quickstart()
    data["student"]["deepspeed"] = {"stage": 2, "offload_param": True}
    assert_names(error_of(tmp_path, data), "student.deepspeed.offload_param", "True", "stage: 3")
    data["student"]["deepspeed"]["stage"] = 3
    assert load_config(write(tmp_path, data)).student.deepspeed.offload_param


def test_deepspeed_config_path_must_exist(tmp_path: Path) -> None:
    data = raw_quickstart()
    missing = str(tmp_path / "ds.json")
    data["student"]["deepspeed"]["config_path"] = missing
    assert_names(error_of(tmp_path, data), "student.deepspeed.config_path", missing)
    Path(missing).write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    assert load_config(write(tmp_path, data)).student.deepspeed.config_path == missing


def test_a_deepspeed_jsons_auto_values_are_filled_as_transformers_fills_them_or_named(tmp_path: Path) -> None:
    """``"auto"`` (transformers' Trainer convention) sizes ZeRO's buffers from the student's hidden size H: reduce
    buckets of H² elements (not DeepSpeed's 5e8), prefetch 0.9·H², whole parameters under 10·H; the generated
    ZeRO-3 config uses the same; an "auto" mlot cannot fill is named with the fix."""
    from workers.student.engine import deepspeed_config
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 3, "reduce_bucket_size": "auto",
                                                      "stage3_prefetch_bucket_size": "auto"},
                                "bf16": {"enabled": "auto"}, "train_batch_size": "auto"}))
    data = raw_quickstart()
    data["student"] |= {"deepspeed": {"config_path": str(path)}, "dtype": "bfloat16"}
    job = load_config(write(tmp_path, data))
    zero = deepspeed_config(job, hidden=2048)["zero_optimization"]
    assert (zero["reduce_bucket_size"], zero["stage3_prefetch_bucket_size"]) == (2048 ** 2, int(0.9 * 2048 ** 2))
    assert deepspeed_config(job, hidden=2048)["bf16"] == {"enabled": True}
    assert "reduce_bucket_size" not in deepspeed_config(job)["zero_optimization"]  # before the model is built
    generated = deepspeed_config(load_config(QUICKSTART, ["student.deepspeed.stage=3"]), hidden=4096)
    assert generated["zero_optimization"] | {"stage": 3} == generated["zero_optimization"]
    assert (generated["zero_optimization"]["reduce_bucket_size"], generated["zero_optimization"]["sub_group_size"],
            generated["zero_optimization"]["stage3_param_persistence_threshold"]) == (4096 ** 2, 10 ** 7, 40960)
    assert generated["bf16"] == {"enabled": False} and deepspeed_config(load_config(QUICKSTART), hidden=64)[
        "zero_optimization"] == {"stage": 2, "stage3_gather_16bit_weights_on_model_save": True}  # stage 2 as before
    path.write_text(json.dumps({"zero_optimization": {"stage": 3, "sub_group_size": "auto"}}))
    assert_names(error_of(tmp_path, data), "student.deepspeed.config_path", "zero_optimization.sub_group_size",
                 "set a value there")


def test_duplicate_teacher_names(tmp_path: Path) -> None:
    data = raw_quickstart()
    data["teachers"].append(copy.deepcopy(data["teachers"][0]))
    assert_names(error_of(tmp_path, data), "teachers.1.name", "'teacher-sp'", "duplicate")


def test_bad_loss_param_name(tmp_path: Path) -> None:
    data = raw_quickstart()
    data["loss"]["params"] = {"topk": 5}
    assert_names(error_of(tmp_path, data), "loss.params.topk", "5", "top_k", "allowed")


def test_bad_loss_param_value_uses_mlot_checks(tmp_path: Path) -> None:
    data = raw_quickstart()
    data["loss"]["params"] = {"top_k": 0}
    assert_names(error_of(tmp_path, data), "loss.params.top_k", "0")
    # Every method's params are checked by its own registry entry, not only MultiLevelOT's.
    data["loss"]["method"] = "uld"
    assert_names(error_of(tmp_path, data), "loss.params.top_k", "0")


@pytest.mark.parametrize("method, typo, fix", [("kl", "temprature", "temperature"), ("uld", "tpo_k", "top_k"),
                                               ("multilevel_ot", "sinkhorn_itres", "sinkhorn_iters")])
def test_loss_param_typos_are_refused_for_every_method(tmp_path: Path, method: str, typo: str, fix: str) -> None:
    data = raw_quickstart()
    data["loss"]["method"] = method
    data["teachers"][0]["tokenizer"] = data["student"]["tokenizer"]  # kl needs one vocabulary
    data["teachers"][0]["model_config"]["vocab_size"] = data["student"]["model_config"]["vocab_size"]
    data["loss"]["params"] = {typo: 1}
    assert_names(error_of(tmp_path, data), f"loss.params.{typo}", f"did you mean {fix!r}", "allowed")
    data["loss"]["params"] = {fix: 2 if fix != "temperature" else 2.0}
    assert load_config(write(tmp_path, data)).loss.params == {fix: data["loss"]["params"][fix]}


def test_identity_terms_are_params_of_the_ot_methods_and_checked(tmp_path: Path) -> None:
    cfg = load_config(QUICKSTART, ["loss.params={chunk_weight: 1.0, shared_weight: 0.5, top_k: 20}"])
    ident = cfg.loss.spec.identity_config(cfg.loss.params)
    assert (ident.shared_weight, ident.chunk_weight, ident.shared_top_k) == (0.5, 1.0, 20)
    assert cfg.loss.payload_config().top_k == 20  # the method's own settings are unaffected
    data = raw_quickstart()
    data["loss"]["params"] = {"chunk_wieght": 1.0}
    assert_names(error_of(tmp_path, data), "loss.params.chunk_wieght", "did you mean 'chunk_weight'")
    data["loss"] |= {"method": "uld", "params": {"shared_weight": -1}}
    assert_names(error_of(tmp_path, data), "loss.params.shared_weight", ">= 0")
    data["loss"] |= {"method": "multilevel_ot", "params": {"shared_top_k": 0}}
    assert_names(error_of(tmp_path, data), "loss.params.shared_top_k", "positive integer")
    data["loss"] |= {"params": {"projection_top_k": None}}
    assert_names(error_of(tmp_path, data), "loss.params.projection_top_k", "positive integer")


def test_the_quickstart_runs_the_known_truth_task_with_the_aligned_defaults() -> None:
    """``mlot quickstart``'s job: the teacher pre-trains on the task's 48-labels-per-prompt split, the students
    learn from 3 and are scored on the held-out prompts; ``aligned`` is CE + projection (1) by default (the
    chunks off), its payload's own part the smallest (top 1, no SD)."""
    from orchestrator.cli import QUICKSTARTS, bundled_config
    cfg = load_config(bundled_config(QUICKSTARTS["truth"]))
    assert cfg.data.source == "builtin:known_truth" and (cfg.data.train_split, cfg.data.eval_split) == ("train", "test")
    assert cfg.teachers[0].pretrain.split == "teacher" and cfg.loss.method == "aligned"
    ident = cfg.loss.spec.identity_config(cfg.loss.params)
    assert (ident.chunk_weight, ident.projection_weight, ident.shared_weight) == (0.0, 1.0, 0.0)
    assert cfg.loss.spec.identity_config({"projection_weight": 0.5}).projection_weight == 0.5
    assert (cfg.loss.payload_config().top_k, cfg.loss.payload_config().use_sd) == (1, False)


def test_on_policy_and_teacher_mix_are_checked(tmp_path: Path) -> None:
    cfg = load_config(QUICKSTART, ["train.on_policy.fraction=0.5", "loss.teacher_mix=confidence"])
    assert (cfg.train.on_policy.fraction, cfg.train.on_policy.ce, cfg.loss.teacher_mix) == (0.5, False, "confidence")
    data = raw_quickstart()
    data["loss"]["teacher_mix"] = "bst"
    assert_names(error_of(tmp_path, data), "loss.teacher_mix", "sum, mean, best, confidence")
    data["loss"] |= {"teacher_mix": "best", "mode": "reference"}
    assert_names(error_of(tmp_path, data), "loss.teacher_mix", "reference mode")
    data = raw_quickstart()
    data["train"]["on_policy"] = {"fraction": 1.0}
    data["teachers"][0]["store"] = "/somewhere/teacher-sp"
    assert_names(error_of(tmp_path, data), "teachers.0.store", "live teachers")
    data = raw_quickstart()
    data["train"]["on_policy"] = {"fraction": 1.5}
    assert_names(error_of(tmp_path, data), "train.on_policy.fraction")
    data["train"]["on_policy"] = {"fraction": 1.0, "max_new_tokens": 400}
    assert_names(error_of(tmp_path, data), "data.max_prompt_length", "train.on_policy.max_new_tokens")
    data["train"] |= {"steps": 50, "on_policy": {"fraction": 0.5, "start_step": 50}}
    assert_names(error_of(tmp_path, data), "train.on_policy.start_step", "train.steps is 50")
    data["train"]["on_policy"] = {"fraction": 0.5, "mode": "sum"}
    assert_names(error_of(tmp_path, data), "train.on_policy.mode", "replace", "add")


def test_a_vllm_teacher_is_refused_what_needs_full_logits(tmp_path: Path) -> None:
    """engine: vllm serves top-K log-probabilities (mlot.top_logprobs): the quickstart's default SD temperature,
    reference mode and the exact-match term are refused naming the setting; so is request batching, and a missing
    vLLM runtime names its field and the setup script."""
    from orchestrator.engines import vllm_python
    from specs import UserError

    data = raw_quickstart()
    data["teachers"][0]["engine"] = "vllm"
    assert_names(error_of(tmp_path, data), "loss.params.sd_temperature", "teachers.0.engine is vllm", "got 2.0")
    data["loss"]["params"] = {"sd_temperature": 1.0}
    cfg = load_config(write(tmp_path, data))
    assert cfg.teachers[0].engine == "vllm" and cfg.teachers[0].vllm.python == ".venv-vllm/bin/python"
    shared = {"params": {"sd_temperature": 1.0, "shared_weight": 0.5}}
    for loss, field in (({"mode": "reference"}, "loss.mode"), (shared, "loss.params.shared_weight")):
        assert_names(error_of(tmp_path, {**data, "loss": {**data["loss"], **loss}}), field, "teachers.0.engine")
    # the recommended cross-tokenizer loss needs only the top K: its projection comes from them
    assert load_config(write(tmp_path, {**data, "loss": {"method": "aligned"}})).loss.method == "aligned"
    data["teachers"][0]["serving"] = {"max_batch_tokens": 4096}
    assert_names(error_of(tmp_path, data), "teachers.0.serving.max_batch_tokens", "engine: vllm")
    teacher = apply_overrides(cfg, [f"teachers.0.vllm.python={tmp_path}/none/python"]).teachers[0]
    with pytest.raises(UserError, match=r"teachers\.0\.vllm\.python: no Python interpreter .*setup_vllm\.sh"):
        vllm_python(teacher.vllm, "teachers.0.vllm")


def test_loss_methods_come_from_the_registry(tmp_path: Path) -> None:
    import mlot
    data = raw_quickstart()
    data["loss"]["method"] = "multilevel"
    assert_names(error_of(tmp_path, data), "loss.method", "did you mean 'multilevel_ot'", *mlot.METHODS)
    data["loss"]["method"] = "mined"
    assert_names(error_of(tmp_path, data), "loss.method", "full teacher logits", "mlot.mined")
    data["loss"] |= {"method": "sft", "params": {"top_k": 5}}
    assert_names(error_of(tmp_path, data), "loss.params.top_k", "allowed: none")
    data["loss"] |= {"method": "kl", "params": {"direction": "reverse", "top_k": 5}}
    assert_names(error_of(tmp_path, data), "loss.params", "full distribution")


def test_uld_payload_is_bounded_by_default() -> None:
    from mlot.methods import ULD_DISTRIBUTED_TOP_K
    cfg = load_config(QUICKSTART, ["loss.method=uld"])
    assert cfg.loss.payload_config().top_k == ULD_DISTRIBUTED_TOP_K
    assert load_config(QUICKSTART, ["loss.method=uld", "loss.params.top_k=null"]).loss.payload_config().top_k is None


def test_loss_params_build_the_mlot_config(tmp_path: Path) -> None:
    cfg = load_config(QUICKSTART, ["loss.mode=reference", "loss.params={top_k: 20, sinkhorn_iters: 5}"])
    mc = cfg.loss.payload_config()
    assert (mc.mode, mc.top_k, mc.sinkhorn_iters, mc.alpha) == ("reference", 20, 5, 1.5)


def test_kl_needs_the_students_tokenizer(tmp_path: Path) -> None:
    data = raw_quickstart()
    data["loss"]["method"] = "kl"
    assert_names(error_of(tmp_path, data), "teachers.0.tokenizer", "'builtin:sentencepiece'", "builtin:wordpiece")
    data["teachers"][0]["tokenizer"] = "builtin:wordpiece"
    assert load_config(write(tmp_path, data)).loss.method == "kl"


def test_teachers_required_unless_sft(tmp_path: Path) -> None:
    data = raw_quickstart()
    data["teachers"] = []
    assert_names(error_of(tmp_path, data), "teachers", "at least one teacher")
    data["loss"]["method"] = "sft"
    assert load_config(write(tmp_path, data)).teachers == []


def test_steps_and_epochs(tmp_path: Path) -> None:
    data = raw_quickstart()
    del data["train"]["steps"]
    data["train"]["warmup_steps"] = 0
    assert load_config(write(tmp_path, data)).train.steps == 100  # the default
    data["train"]["epochs"] = 2
    cfg = load_config(write(tmp_path, data))
    assert (cfg.train.steps, cfg.train.epochs) == (None, 2)
    data["train"]["steps"] = 10
    assert_names(error_of(tmp_path, data), "train.epochs", "exactly one")


def test_template_fields_must_be_mapped_columns(tmp_path: Path) -> None:
    data = raw_quickstart()
    data["teachers"][0]["template"] = {"prompt": "Q: {question}"}
    assert_names(error_of(tmp_path, data), "teachers.0.template.prompt", "question", "data.columns")
    data["data"]["columns"]["question"] = "q"
    assert load_config(write(tmp_path, data)).data.columns["question"] == "q"


def test_an_answer_template_must_render_the_answer_field(tmp_path: Path) -> None:
    """A summary column rendered by the answer template under its own name would be distilled but never cut (the
    cut shortens ``answer``) nor scored: refused, naming the fix (map the column to ``answer``)."""
    data = raw_quickstart()
    data["data"]["columns"] = {"prompt": "prompt", "summary": "answer", "answer": "answer"}
    data["student"]["template"] = {"prompt": "{prompt}", "answer": " {summary}"}
    assert_names(error_of(tmp_path, data), "student.template.answer", "{answer}", "data.columns.answer")
    data["data"]["columns"] = {"prompt": "prompt", "answer": "answer"}
    data["student"]["template"]["answer"] = " {answer}"
    assert load_config(write(tmp_path, data)).student.template.answer == " {answer}"


def test_columns_need_answer(tmp_path: Path) -> None:
    data = raw_quickstart()
    data["data"]["columns"] = {"prompt": "prompt"}
    assert_names(error_of(tmp_path, data), "data.columns", "answer")


def test_lengths_must_fit_a_tiny_models_positions(tmp_path: Path) -> None:
    data = raw_quickstart()
    data["data"]["max_prompt_length"] = 250
    assert_names(error_of(tmp_path, data), "data.max_prompt_length", "250", "256 positions")


def test_builtin_names_are_checked(tmp_path: Path) -> None:
    data = raw_quickstart()
    data["student"]["tokenizer"] = "builtin:bpe"
    data["data"]["source"] = "builtin:nope"
    assert_names(error_of(tmp_path, data), "student.tokenizer", "builtin:tekken", "data.source", "builtin:quickstart")


# --------------------------------------------------------------------------------------- overrides


def test_overrides_change_values_including_list_items() -> None:
    cfg = load_config(QUICKSTART, [
        "train.lr=3e-4", "teachers.0.weight=2", "train.use_gpu=true", "tracking.tags={team: nlp}",
        "student.deepspeed.stage=3", "train.eval_every=null", "loss.params.top_k=8",
    ])
    assert cfg.train.lr == pytest.approx(3e-4) and isinstance(cfg.train.lr, float)
    assert cfg.teachers[0].weight == 2.0
    assert cfg.train.use_gpu is True
    assert cfg.tracking.tags == {"team": "nlp"}
    assert cfg.student.deepspeed.stage == 3
    assert cfg.train.eval_every is None
    assert cfg.loss.payload_config().top_k == 8


def test_override_of_a_string_field_keeps_the_text() -> None:
    cfg = load_config(QUICKSTART, ["student.template.prompt=Q: {prompt}?", "name=123"])
    assert cfg.student.template.prompt == "Q: {prompt}?"
    assert cfg.name == "123"


def test_override_creates_missing_sections(tmp_path: Path) -> None:
    data = raw_quickstart()
    del data["student"]["deepspeed"], data["cluster"]
    cfg = load_config(write(tmp_path, data), ["student.deepspeed.stage=1", "cluster.address=auto"])
    assert (cfg.student.deepspeed.stage, cfg.cluster.address) == (1, "auto")


@pytest.mark.parametrize("override, parts", [
    ("train.lrr=1", ["train.lrr", "'lrr'", "did you mean 'lr'", "allowed keys"]),
    ("nosuch.x=1", ["'nosuch'", "top level", "allowed keys"]),
    ("teachers.3.weight=2", ["teachers.3", "out of range", "1 item"]),
    ("teachers.first.weight=2", ["teachers", "index"]),
    ("train.lr.x=1", ["train.lr", "not a section"]),
    ("train.lr", ["train.lr", "KEY=VALUE"]),
    ("train.lr=[1", ["malformed YAML"]),
])
def test_bad_override(override: str, parts: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(QUICKSTART, [override])
    assert_names(str(info.value), override, *parts)


def test_override_value_errors_name_the_path() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(QUICKSTART, ["teachers.0.replicas=0"])
    assert_names(str(info.value), "teachers.0.replicas", "0", ">= 1", "teachers.0.replicas=0")


def test_parse_override() -> None:
    assert parse_override("a.b.0=[1, 2]") == (["a", "b", "0"], [1, 2])
    assert parse_override("x=") == (["x"], None)
    assert parse_override("x=1e-4") == (["x"], 1e-4)


def test_config_from_dict_does_not_mutate_its_input() -> None:
    data = raw_quickstart()
    before = copy.deepcopy(data)
    config_from_dict(data, ["train.lr=0.5", "teachers.0.weight=3"])
    assert data == before


def test_apply_overrides_validates() -> None:
    cfg = load_config(QUICKSTART)
    assert apply_overrides(cfg, ["train.seed=7"]).train.seed == 7
    with pytest.raises(ConfigError, match="train.seed"):
        apply_overrides(cfg, ["train.seed=x"])


# --------------------------------------------------------------------------------- flat dict, dump


def test_flat_dict() -> None:
    flat = load_config(EXAMPLE).to_flat_dict()
    assert flat["train.lr"] == pytest.approx(1e-6)
    assert flat["teachers.0.name"] == "llama2-7b-chat"
    assert flat["teachers.0.resources.custom.teacher_node"] == 1.0
    assert flat["loss.params.top_k"] == 50
    assert flat["student.deepspeed.stage"] == 3
    assert flat["train.steps"] is None and flat["train.epochs"] == 3
    assert flat["tracking.tags.paper"] == "multilevelot-aaai25"
    assert all(not isinstance(v, dict | list) or v in ({}, []) for v in flat.values())
    quick = load_config(QUICKSTART).to_flat_dict()
    assert quick["student.model_config.hidden_size"] == 64 and quick["train.resources_per_worker"] == {}


@pytest.mark.parametrize("path", [QUICKSTART, EXAMPLE])
def test_dump_load_round_trip(tmp_path: Path, path: Path) -> None:
    cfg = load_config(path)
    text = dump_config(cfg)
    assert "model_config" in text or cfg.student.hf_config is None  # the YAML name, not hf_config
    again = load_config(write(tmp_path, text))
    assert again == cfg
    assert again.model_dump() == cfg.model_dump()
    # model_dump() itself round-trips through YAML.
    assert config_from_dict(yaml.safe_load(yaml.safe_dump(cfg.model_dump()))) == cfg


def test_config_is_frozen() -> None:
    cfg = load_config(QUICKSTART)
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        cfg.train.lr = 1.0  # type: ignore[misc]
    assert isinstance(cfg, JobConfig)


def test_a_vllm_generator_must_sync_at_every_checkpoint(tmp_path: Path) -> None:
    """A checkpoint between two weight syncs would resume sampling from other weights: refused, naming the field."""
    data = raw_quickstart()
    data["train"] = {**data.get("train", {}), "checkpoint_every": 10,
                     "on_policy": {"fraction": 0.5, "engine": "vllm", "sync_every": 4}}
    assert_names(error_of(tmp_path, data), "train.on_policy.sync_every", "must divide train.checkpoint_every (10)")
    data["train"]["on_policy"]["sync_every"] = 5
    cfg = load_config(write(tmp_path, data))
    assert cfg.train.on_policy.generator and not cfg.model_copy(update={"train": cfg.train.model_copy(
        update={"on_policy": cfg.train.on_policy.model_copy(update={"engine": "hf"})})}).train.on_policy.generator
