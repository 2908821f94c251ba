"""Pieces of the student loop that need no cluster: ZeRO-3-safe eval batching, the batch order, step stats."""

import pytest
import torch

from workers.student.in_loop_eval import eval_batches, eval_rows
from workers.student.payload_stream import BatchOrder, Fetched
from workers.student.recipe import StepStats, answer_rows_finite


@pytest.mark.parametrize("n, world, batch", [(9, 2, 4), (33, 2, 8), (1, 3, 4), (16, 2, 8), (7, 4, 1)])
def test_eval_batches_same_count_on_every_rank_and_every_row_counted_once(n, world, batch):
    for rows in (eval_rows(n, None, 0), eval_rows(n, max(1, n // 3), seed=7)):  # all rows, a seeded sample
        per_rank = [eval_batches(rows, r, world, batch) for r in range(world)]
        assert len({len(b) for b in per_rank}) == 1  # ZeRO-3: the same number of collective forwards
        counted = sorted(i for batches in per_rank for chunk, counts in batches if counts for i in chunk)
        assert counted == rows
        assert all(chunk for batches in per_rank for chunk, _ in batches)  # padding batches still run a forward


def test_the_in_loop_eval_sample_is_bounded_fixed_and_seeded():
    sample = eval_rows(10_000, 2000, seed=3)
    assert len(set(sample)) == 2000 and sample == sorted(sample) and max(sample) < 10_000
    assert sample == eval_rows(10_000, 2000, seed=3) and sample != eval_rows(10_000, 2000, seed=4)
    assert eval_rows(50, 2000, seed=3) == list(range(50))  # fewer rows than the bound: all of them


def test_batch_order_is_a_pure_function_of_seed_rank_and_micro_batch():
    a, b = BatchOrder(40, 1, 2, 4, seed=3), BatchOrder(40, 1, 2, 4, seed=3)
    assert [a(m) for m in (7, 0, 12)] == [b(m) for m in (7, 0, 12)]  # any order of calls, any instance
    epoch = [i for m in range(5) for i in a(m)]
    assert sorted(epoch) == list(range(1, 40, 2))  # one epoch covers rank 1's shard exactly once
    assert a(5) != a(0)  # the next epoch is reshuffled


def test_step_stats_average_over_counted_micro_batches_and_bytes_per_teacher_token():
    stats = StepStats()
    stats.add_terms({"loss": torch.tensor(2.0), "ce": torch.tensor(1.0)})
    stats.add_terms({"loss": torch.tensor(4.0), "ce": torch.tensor(3.0)})
    stats.add_io(Fetched(wait_s={"t": 0.5}, nbytes={"t": 1000}, answer_tokens={"t": 10}), tokens=50)
    stats.add_io(Fetched(wait_s={"t": 0.5}, nbytes={"t": 3000}, answer_tokens={"t": 30}), tokens=50)  # a skipped one
    m = stats.metrics(elapsed=2.0, world=2, micro_batches=2, on_policy=False)
    assert (m["train/loss"], m["train/ce"]) == (3.0, 2.0)
    assert m["train/t/payload_bytes_per_token"] == 100.0 and m["train/t/wait_s"] == 1.0
    assert m["train/teacher_wait_frac"] == 0.5 and m["train/tokens_per_s"] == 100.0
    assert not any("generat" in k or "on_policy" in k for k in m)
    # one of the two micro-batches on-policy: 2 sampled answers (3 and 5 tokens), 1 gold fallback
    from workers.generation import Answer
    stats.add_generation(0.5, [Answer("a b", True, (1, 2, 3)), Answer("c", False, (4,) * 5),
                               Answer("gold", True, (9,), sampled=False)])
    m = stats.metrics(elapsed=2.0, world=2, micro_batches=2, on_policy=True)
    assert (m["train/on_policy_frac"], m["train/generation_s"], m["train/generation_frac"]) == (0.5, 0.5, 0.25)
    assert (m["train/generated_tokens"], m["train/generation_fallbacks"]) == (4.0, 1)


def test_answer_rows_finite_reads_only_rows_that_predict_an_answer_token():
    logits = torch.zeros(1, 4, 3)
    labels = torch.tensor([[-100, -100, 5, 6]])
    logits[0, 3] = float("nan")  # the last row predicts nothing
    assert answer_rows_finite(logits, labels)
    logits[0, 1, 0] = float("inf")  # predicts the first answer token
    assert not answer_rows_finite(logits, labels)


def test_storage_uri_round_trip(tmp_path):
    """The storage helpers on a pyarrow filesystem URI (file://: the code path of s3:// and gs://)."""
    from specs import storage
    base = f"file://{tmp_path}/remote"
    state = storage.join(base, "job", "run.json")
    assert state == f"file://{tmp_path}/remote/job/run.json" and not storage.exists(state)
    storage.write_text(state, '{"step": 3}')
    assert storage.exists(state) and storage.read_text(state) == '{"step": 3}'
    with storage.local_folder(storage.join(base, "job", "final")) as local:
        open(f"{local}/config.json", "w").write("{}")
    assert (tmp_path / "remote" / "job" / "final" / "config.json").read_text() == "{}"
    with storage.local_copy(storage.join(base, "job", "final")) as local:
        assert open(f"{local}/config.json").read() == "{}" and not local.startswith(str(tmp_path / "remote"))


_COPIER = """
import sys, time
import pyarrow.fs
from specs import storage
real = pyarrow.fs.copy_files
def counted(*args, **kwargs):  # one line per download, slow enough that the processes overlap
    open(sys.argv[2], "a").write("download\\n")
    time.sleep(0.5)
    return real(*args, **kwargs)
pyarrow.fs.copy_files = counted
print(storage.node_copy(sys.argv[1], "data", "fp1"))
"""


def test_node_copy_downloads_once_per_node_while_processes_race(tmp_path):
    """Four processes of one node ask for the same URI folder at once: one downloads, all get its whole copy."""
    import os
    import subprocess
    import sys

    (tmp_path / "remote").mkdir()
    (tmp_path / "remote" / "rows.arrow").write_bytes(b"x" * 1000)
    env = {**os.environ, "TMPDIR": str(tmp_path / "node")}  # this "node"'s cache folder
    (tmp_path / "node").mkdir()
    log = tmp_path / "downloads.txt"
    procs = [subprocess.Popen([sys.executable, "-c", _COPIER, f"file://{tmp_path}/remote", str(log)], env=env,
                              stdout=subprocess.PIPE, text=True, cwd=os.getcwd()) for _ in range(4)]
    paths = {p.communicate(timeout=120)[0].strip() for p in procs}
    assert all(p.returncode == 0 for p in procs)
    assert log.read_text().splitlines() == ["download"]
    [path] = paths
    assert (tmp_path / "node" / "mlot-data" / "fp1" / "rows.arrow").read_bytes() == b"x" * 1000
    assert path == str(tmp_path / "node" / "mlot-data" / "fp1")


def test_the_newest_whole_checkpoint_is_found_on_storage(tmp_path):
    """What ``--resume`` falls back to when the killed driver's Ray Train controller never recorded its last
    checkpoints: the newest folder that holds every rank's ZeRO shard (a half-uploaded one is passed over)."""
    from specs import storage
    from workers.student.checkpoint import newest

    def make(name: str, ranks: int) -> None:
        folder = tmp_path / "run" / name / "mlot"
        folder.mkdir(parents=True)
        (folder.parent / "mlot_job.json").write_text('{"step": 2}')
        for r in range(ranks):
            (folder / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt").write_bytes(b"")

    assert newest(str(tmp_path / "run"), world=2) is None  # no run folder yet
    make("checkpoint_2026-12-01_10-00-00.000001", 2)
    make("checkpoint_2026-12-01_10-00-09.000001", 2)
    make("checkpoint_2026-12-01_10-00-15.000001", 1)  # one rank's shard still missing
    assert newest(f"file://{tmp_path}/run", world=2) == f"file://{tmp_path}/run/checkpoint_2026-12-01_10-00-09.000001"
    assert storage.listdir(str(tmp_path / "run"))[0] == "checkpoint_2026-12-01_10-00-00.000001"
