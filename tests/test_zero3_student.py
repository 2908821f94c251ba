"""The student under ZeRO-3 on two real ranks (torch.distributed gloo processes, DeepSpeed on the CPU, no Ray):
built partitioned (no rank ever holds a parameter whole after its submodule is built) with the very weights of
the whole build, and exported one layer at a time to a safetensors model that ``from_pretrained`` loads."""

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
