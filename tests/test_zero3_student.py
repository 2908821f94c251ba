"""The student under ZeRO-3 on two real ranks (torch.distributed gloo processes, DeepSpeed on the CPU, no Ray):
built partitioned (no rank ever holds a parameter whole after its submodule is built) with the very weights of
the whole build, and exported one layer at a time to a safetensors model that ``from_pretrained`` loads."""

import contextlib
import itertools
import json

import pytest
import torch
from helpers import free_ports
from helpers import quickstart_job as _job

pytestmark = pytest.mark.integration

WORLD = 2


def _on_rank(rank: int, port: int, job, out: str) -> None:
    """One rank: build the student under ZeRO-3, take one optimizer step, export it (fp32 and bf16); rank 0 writes
    what it saw to ``out`` (what the test asserts)."""
    import os

    import deepspeed
    import torch.distributed as dist

    from workers.models import build_model, load_tokenizer
    from workers.student.checkpoint import export_student
    from workers.student.engine import build_engine
    from workers.student.model import build_student

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK="0")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    tok = load_tokenizer(job.student.tokenizer_name)
    torch.manual_seed(job.train.seed)
    model = build_student(job, tok)
    rng_after_build = torch.get_rng_state()
    # Right after the build: every parameter's tensor is empty and this rank's partition is its share only.
    held = {name: [p.numel(), p.ds_tensor.numel(), p.ds_numel] for name, p in model.named_parameters()}
    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        built = {k: v.detach().clone() for k, v in model.state_dict().items()}
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight

    engine, _ = build_engine(job, model, steps=1)
    ids = tok(["What colour is a banana? yellow"] * job.train.batch_size, return_tensors="pt")["input_ids"]
    engine.backward(engine(input_ids=ids, labels=ids).loss)
    engine.step()
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
        trained = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
    export_student(engine, tok, f"{out}/fp32", rank)
    export_student(engine, tok, f"{out}/bf16", rank, dtype="bfloat16")
    if rank == 0:
        s = job.student
        torch.manual_seed(job.train.seed)
        whole = build_model(s.model, s.hf_config, "float32", tokenizer=tok).state_dict()
        torch.save({"built": built, "whole": whole, "trained": trained, "tied": tied,
                    "rng_equal": torch.equal(rng_after_build, torch.get_rng_state()) if s.model is None else None},
                   f"{out}/rank0.pt")
    with open(f"{out}/held{rank}.json", "w") as f:
        json.dump(held, f)
    dist.destroy_process_group()


def _run(job, out) -> dict:
    import torch.multiprocessing as mp
    [port] = free_ports(1)
    mp.spawn(_on_rank, args=(port, job, str(out)), nprocs=WORLD, join=True)
    return torch.load(out / "rank0.pt", weights_only=True)


def _assert_partitioned(out) -> None:
    for rank in range(WORLD):
        held = json.loads((out / f"held{rank}.json").read_text())
        assert held and all(tensor == 0 and 0 < part == -(-whole // WORLD) < whole
                            for tensor, part, whole in held.values()), held


def _assert_export(out, trained: dict) -> None:
    from pathlib import Path

    from transformers import AutoModelForCausalLM, AutoTokenizer
    for sub, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        assert [p.name for p in Path(out, sub).glob("*.safetensors")] == ["model.safetensors"]
        model = AutoModelForCausalLM.from_pretrained(out / sub)
        assert len(AutoTokenizer.from_pretrained(out / sub)) == 30522
        got = model.state_dict()
        assert set(got) == set(trained) and all(v.dtype == dtype for v in got.values())
        assert all(torch.equal(got[k], v.to(dtype)) for k, v in trained.items()), sub
        assert model.lm_head.weight is model.model.embed_tokens.weight


def test_zero3_student_from_config_is_built_partitioned_with_the_whole_builds_weights_and_exported(tmp_path):
    # A padded vocabulary (30,528 rows for the WordPiece's 30,522 tokens) and tied embeddings.
    job = _job(tmp_path, "z3", "student.deepspeed.stage=3", "student.model_config.vocab_size=30528",
               "train.batch_size=2")
    seen = _run(job, tmp_path)
    _assert_partitioned(tmp_path)
    # The same seed gives the very weights, and leaves the very RNG state, of the whole (unpartitioned) build.
    assert set(seen["built"]) == set(seen["whole"])
    assert all(torch.equal(seen["built"][k], v) for k, v in seen["whole"].items())
    assert seen["rng_equal"] and seen["tied"]
    assert seen["built"]["lm_head.weight"].shape == (30528, 64)
    assert not torch.equal(seen["trained"]["model.norm.weight"], seen["built"]["model.norm.weight"])  # it trained
    _assert_export(tmp_path, seen["trained"])


def test_zero3_student_from_a_checkpoint_is_loaded_partitioned(tmp_path):
    from orchestrator.configuration import apply_overrides
    from workers.models import build_model, load_tokenizer
    job = _job(tmp_path, "z3-pretrained", "student.deepspeed.stage=3", "train.batch_size=2")
    torch.manual_seed(123)  # other weights than the seed of the job would draw
    saved = build_model(None, job.student.hf_config, tokenizer=load_tokenizer(job.student.tokenizer_name))
    saved.save_pretrained(tmp_path / "checkpoint")
    job = apply_overrides(job, [f"student.model={tmp_path / 'checkpoint'}", "student.model_config=null"])
    seen = _run(job, tmp_path)
    _assert_partitioned(tmp_path)
    assert all(torch.equal(seen["built"][k], v) for k, v in saved.state_dict().items()) and seen["tied"]
    _assert_export(tmp_path, seen["trained"])


def _head_or_logits_on_rank(rank: int, port: int, jobs: dict, out: str) -> None:
    """One rank: for each ZeRO stage's job, train the (tied) student two optimizer steps with MultiLevelOT + CE on
    this rank's own batches, the loss reading the LM head (``answer_head`` + ``HeadWhole``, as the trainer does) and
    then, from the same seed, the built logits (``answer_logits``); rank 0 saves the runs' losses and weights."""
    import os

    import deepspeed
    import torch.distributed as dist
    from helpers import make_batch

    import mlot
    from workers.forward import answer_head, answer_logits
    from workers.models import load_tokenizer
    from workers.student.engine import build_engine
    from workers.student.model import HeadWhole, build_student

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK="0")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    tok = load_tokenizer(jobs[2].student.tokenizer_name)
    method = mlot.get_method("multilevel_ot")
    objective = mlot.Objective(method, "paper", {"top_k": 8}, 0.5)
    g = torch.Generator().manual_seed(rank)
    mask = torch.ones(2, 14, dtype=torch.long)
    mask[1, :4] = 0  # left padding
    ids = torch.randint(1000, 2000, (2, 14), generator=g) * mask
    labels = torch.where(torch.arange(14) >= 8, ids, -100)
    labels[1, 8] = -100  # a gap in an answer
    batch = {"input_ids": ids, "attention_mask": mask, "position_ids": (mask.cumsum(1) - 1).clamp(min=0),
             "labels": labels}
    t_logits, t_labels = make_batch([5, 4], [3, 6], 300, seed=10 + rank, dtype=torch.float32)
    payloads = {"t": mlot.compress_teacher(t_logits, t_labels, config=method.payload_config("paper", {"top_k": 8}))}
    seen = {}
    for (stage, job), fused in itertools.product(jobs.items(), (True, False)):
        torch.manual_seed(job.train.seed)
        model = build_student(job, tok)
        engine, _ = build_engine(job, model, steps=2)
        head = HeadWhole(model, zero3=stage == 3)
        losses = []
        for _ in range(2):
            if fused:
                logits, lab = answer_head(engine, batch, len(tok), head)
            else:
                logits, lab = answer_logits(engine, batch, len(tok))
            with head() if fused else contextlib.nullcontext():
                loss, _ = objective(logits, lab, payloads)
            engine.backward(loss)
            engine.step()
            losses.append(float(loss))
        with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
            seen[stage, fused] = {"losses": losses, "tied": head.tied,
                                  "state": {k: v.detach().clone() for k, v in engine.module.state_dict().items()}}
    if rank == 0:
        torch.save(seen, f"{out}/head_or_logits.pt")
    dist.destroy_process_group()


def test_the_loss_reading_the_lm_head_trains_as_the_built_logits_do(tmp_path):
    """ZeRO-2 and ZeRO-3 on two ranks, a tied LM head on a padded vocabulary: read from the head, the loss of each
    step and the weights after two optimizer steps equal those of the built logits (the head's gradient is
    reduced once, the loss's and the embedding's shares summed: reduced twice, ZeRO-2 refuses and ZeRO-3 trains
    other weights)."""
    import torch.multiprocessing as mp
    jobs = {stage: _job(tmp_path, "head", f"student.deepspeed.stage={stage}", "student.model_config.vocab_size=30528",
                        "train.batch_size=2", "train.grad_accum=1") for stage in (2, 3)}
    [port] = free_ports(1)
    mp.spawn(_head_or_logits_on_rank, args=(port, jobs, str(tmp_path)), nprocs=WORLD, join=True)
    seen = torch.load(tmp_path / "head_or_logits.pt", weights_only=True)
    for stage in jobs:
        head, built = seen[stage, True], seen[stage, False]
        torch.testing.assert_close(head["losses"], built["losses"], rtol=1e-5, atol=1e-5, msg=f"ZeRO-{stage}")
        assert head["losses"][1] < head["losses"][0]  # it learns
        for name, value in built["state"].items():
            torch.testing.assert_close(head["state"][name], value, rtol=1e-5, atol=1e-6, msg=f"ZeRO-{stage} {name}")
        assert head["tied"]
