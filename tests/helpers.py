"""Test builders: random logits with answer spans at chosen places, and small quickstart jobs."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import torch

import mlot
from workers.student.callbacks import TrainCallback


def make_batch(lengths: list[int], prompt: list[int], vocab: int, *, seq_len: int | None = None, left_pad: bool = False,
               seed: int = 0, dtype: torch.dtype = torch.float64,
               scale: float = 3.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits [B, L, V] and labels [B, L] with answer i of length lengths[i] after prompt[i] tokens."""
    g = torch.Generator().manual_seed(seed)
    L = seq_len or max(p + n for p, n in zip(prompt, lengths)) + 2
    logits = (torch.randn(len(lengths), L, vocab, generator=g, dtype=torch.float64) * scale).to(dtype)
    labels = torch.full((len(lengths), L), -100, dtype=torch.long)
    for b, (n, p) in enumerate(zip(lengths, prompt)):
        first = (L - n) if left_pad else p
        labels[b, first:first + n] = torch.randint(0, vocab, (n,), generator=g)
    return logits, labels


QUICKSTART = Path(__file__).resolve().parents[1] / "orchestrator" / "configs" / "quickstart.yaml"


# ---------------------------------------------------------------------------- processes a test starts (servers, nodes)


def free_ports(n: int, low: int = 0) -> list[int]:
    """``n`` distinct free ports, any (``low`` 0) or from ``low`` up: below the kernel's ephemeral range, where no
    process that binds port 0 (as Ray's own components do) can take them before their owner starts."""
    import socket

    socks, port = [], low
    try:
        while len(socks) < n:
            sock = socket.socket()
            try:
                sock.bind(("127.0.0.1", port))
                socks.append(sock)
            except OSError:
                sock.close()
            port += 1 if low else 0
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def wait_listening(port: int, proc: subprocess.Popen, what: str, timeout: float = 180) -> None:
    """Until something listens on loopback ``port``; fails if ``proc`` exits first or the time runs out."""
    import socket
    import time

    deadline = time.time() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            assert proc.poll() is None, f"{what} exited before it listened"
            assert time.time() < deadline, f"{what} did not listen on port {port} within {timeout:.0f} s"
            time.sleep(0.3)


def stop(procs: list[subprocess.Popen]) -> None:
    """SIGTERM, then SIGKILL, every process and its descendants, by id (never ``ray stop``: it would stop every
    Ray on the machine)."""
    import os
    import signal

    import psutil

    alive = []
    for proc in procs:
        try:
            root = psutil.Process(proc.pid)
            alive += [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            pass
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for p in alive:
            try:
                os.kill(p.pid, sig)
            except ProcessLookupError:
                pass
        _, alive = psutil.wait_procs(alive, timeout=2 if sig == signal.SIGTERM else 60)  # returns once all are gone
    for proc in procs:
        proc.wait(timeout=60)

# A second, random-weight teacher with another tokenizer (Tekken byte-level BPE, 131,072 ids), weight 0.5.
TEKKEN = {"name": "teacher-tekken", "tokenizer": "builtin:tekken", "weight": 0.5, "resources": {"num_cpus": 0.25},
          "model_config": {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                           "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 256,
                           "vocab_size": 131072, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 11,
                           "tie_word_embeddings": True}}


def quickstart_job(tmp_path: Path, name: str, *extra: str, add_teacher: dict | None = None):
    """The bundled quickstart job, small and fast, writing under tmp_path (runs and a sqlite MLflow store)."""
    import yaml

    from orchestrator.configuration import config_from_dict
    data = yaml.safe_load(QUICKSTART.read_text())
    if add_teacher:
        data["teachers"].append(add_teacher)
    return config_from_dict(data, [
        f"name={name}", f"output_dir={tmp_path}", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
        "train.steps=4", "train.warmup_steps=1", "train.checkpoint_every=2", "train.eval_every=2",
        "teachers.0.pretrain.steps=0", "data.limit=400", *extra])


def metric_history(summary, key: str) -> list[tuple[int, float]]:
    """(step, value) pairs of a metric of a finished job's MLflow run, in logging order."""
    from mlflow import MlflowClient
    return [(m.step, m.value) for m in MlflowClient(summary.tracking_uri).get_metric_history(summary.run_id, key)]


# ---------------------------------------------------------------------------- fault injection (tests only)
# The callbacks below travel to Ray workers, which cannot import this test module: pickle them by value.

import ray.cloudpickle  # noqa: E402

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


class ExitAtStep(TrainCallback):
    """Training rank 0 dies (``os._exit``) after step ``step``, once per run directory (``marker``).

    It waits ``delay_s`` first, so the last checkpoint's report has reached the Ray Train controller.
    """

    def __init__(self, step: int, marker: str, delay_s: float = 8.0) -> None:
        self.step, self.marker, self.delay_s = step, marker, delay_s

    def on_step_end(self, step, rank, engine):
        import os
        import time
        if step == self.step and rank == 0 and not Path(self.marker).exists():
            Path(self.marker).write_text(str(step))
            time.sleep(self.delay_s)
            os._exit(1)


class PoisonLogits(TrainCallback):
    """NaN student logits on micro-batches ``batches`` (on ``rank`` only, or on every rank if None):
    what a real numerical blow-up in the student's forward looks like to the loss."""

    def __init__(self, batches, rank=None) -> None:
        self.batches, self.rank = set(batches), rank

    def on_logits(self, m, rank, logits):
        if m in self.batches and self.rank in (None, rank):
            if isinstance(logits, mlot.HeadLogits):  # the loss reads the head: poison what it reads
                return dataclasses.replace(logits, hidden=logits.hidden + float("nan"))
            return logits + float("nan")
        return logits


class OptimizerSteps(TrainCallback):
    """Writes DeepSpeed's own step counters after every loop step (one line per rank and step)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_step_end(self, step, rank, engine):
        with open(self.path, "a") as f:
            f.write(f"{rank} {step} {engine.global_steps} {engine.micro_steps}\n")


class RecordCollectives(TrainCallback):
    """Wraps the worker's torch.distributed collectives (the loop's own and DeepSpeed's) and writes, per call,
    the collective's name, its tensor's device and the worker's device (where its logits live)."""

    NAMES = ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor", "reduce")

    def __init__(self, path: str) -> None:
        self.path = path

    def on_logits(self, m, rank, logits):
        import torch.distributed as dist
        if getattr(dist, "_mlot_recorded", False):
            return logits
        device, path = str(logits.device), self.path

        def wrap(name, fn):
            def call(tensor, *args, **kwargs):
                t = tensor[0] if isinstance(tensor, (list, tuple)) else tensor
                with open(path, "a") as f:
                    f.write(f"{rank} {name} {t.device} {device}\n")
                return fn(tensor, *args, **kwargs)
            return call
        for name in self.NAMES:
            if hasattr(dist, name):
                setattr(dist, name, wrap(name, getattr(dist, name)))
        dist._mlot_recorded = True
        return logits
