"""The GPU check: one command, one table, one JSON file.

    python benchmarks/gpu_check.py                        # on a GPU machine: about 5-8 minutes on one GPU
    python benchmarks/gpu_check.py --device cpu --quick   # the CPU smoke test the suite runs (< 3 minutes)

Six sections, one table row per case (``section | case | metric = value ...``), and the same rows in
``--out`` (JSON: ``{"device", "torch", "cuda", "quick", "rows": [{"section", "case", ...metrics}]}``):

1. ``parity``: paper and reference mode, forward + backward on ``--device`` against the same inputs on
   the CPU in fp32: the largest absolute difference of the loss and of the student gradient
   (``ok`` when both are <= 1e-5).
2. ``loss``: B=16, 2048-token inputs, 256-token answers, vocabularies 50,304/32,000 and 151,936/128,256
   (``--quick``: B=2, 64 tokens, 16-token answers, 512/384): time (ms) and peak memory (MB) of
   forward + backward of mlot's paper loss on a payload, and of a plain batched PyTorch restatement
   of the same loss (dense softmax over every answer row, autograd through all of it) in the same run,
   with the ratio and the largest difference of the two losses.
3. ``distill``: a whole ``mlot distill`` of the quickstart models on one device shared by teacher and
   student (on a GPU: half a GPU each, fractional ``num_gpus``), ZeRO-2 and ZeRO-3, bf16 student and
   teacher: tokens/s, teacher wait fraction and peak device memory, read back from MLflow.
4. ``serving``: one teacher replica (~1.1B parameters, bf16 on a GPU; ``--quick``: the quickstart teacher)
   answering 64 requests of 4 rows, one by one (``TeacherActor``) and all at once (``BatchingTeacher``, 8192
   tokens per forward): teacher tokens/s of each, their ratio, forwards, and the largest payload difference.
5. ``vllm``: the same ~1.1B teacher on one GPU, served by the vLLM engine (``teachers[i].engine: vllm``, in the
   runtime at ``--vllm-python``) and by the HF engine, 8 requests of 32 rows each (token ranking, which both serve
   exactly): teacher tokens/s of each, their ratio, the vLLM replica's start-up and the largest payload difference
   (bf16 kernels round differently). Skipped, with the reason printed, without a GPU or a vLLM runtime: the CPU
   engine is checked by ``tests/test_vllm_engine.py``.
6. ``student_loss``: the student's CE with its LM head (H = 896) over 16 x 256 answer rows at V = 151,936, fp32
   (``--quick``: 2 x 16 rows, V = 512, H = 32), forward + backward: peak memory of the dense restatement
   (``F.cross_entropy`` on an fp32 copy of the built logits), of mlot's chunked loss on the built logits and of
   mlot reading the head (``mlot.HeadLogits``: no logits built), the ratios and the largest loss and gradient
   differences against the dense one (``ok`` when all are <= 1e-4: GPU matmuls sum in other orders).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import PeakMemory, timeit
from loss import make_inputs  # the benchmarks folder is on the path: this is a script beside them
from students import answer_labels

import mlot
from mlot.ot import sinkhorn_log, uniform_log_marginal

REPO = Path(__file__).resolve().parents[1]


def answer_rows(x: torch.Tensor, y: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows [B, W, V] that predict each sample's answer tokens (left-padded batch), first answer row first."""
    n = (y != -100).sum(1)
    idx = ((y.shape[1] - n - 1)[:, None] + torch.arange(width, device=y.device)).clamp(max=y.shape[1] - 1)
    mask = torch.arange(width, device=y.device)[None] < n[:, None]
    return x.gather(1, idx[..., None].expand(-1, -1, x.shape[-1])).float(), mask


def plain_paper(s, ls, t, lt, k=50, tau_sd=2.0, reg=0.1, iters=20, beta=0.1, gamma=0.1) -> torch.Tensor:
    """Paper-mode MultiLevelOT (the defaults) written plainly: dense softmax of every answer row of both
    models, per-sequence top-k by column totals, HAD, SL, and the sequence Sinkhorn distance."""
    width = int(max((ls != -100).sum(1).max(), (lt != -100).sum(1).max()))
    rs, ms = answer_rows(s, ls, width)
    rt, mt = answer_rows(t.detach(), lt, width)
    ps, pt = torch.softmax(rs, -1) * ms[..., None], torch.softmax(rt, -1) * mt[..., None]
    cs, ct = ps.sum(1).topk(k).indices, pt.sum(1).topk(k).indices

    def take(p, cols):
        return p.gather(-1, cols[:, None, :].expand(-1, width, -1))
    sk, tk = take(ps, cs), take(pt, ct)
    log_sk = take(torch.log_softmax(rs, -1), cs) * ms[..., None]
    pair = ms & mt
    n = pair.sum(1).clamp(min=1)
    had = (pair * (tk - sk).abs().sum(-1)).sum(1) / n
    sl = (pair * -(tk * log_sk).sum(-1)).sum(1) / n
    a = take(torch.softmax(rt / tau_sd, -1), ct) * mt[..., None]
    b = take(torch.softmax(rs / tau_sd, -1), cs) * ms[..., None]
    cost = torch.cdist(a, b, p=1)
    plan = sinkhorn_log(cost, uniform_log_marginal(mt, cost.dtype), uniform_log_marginal(ms, cost.dtype), reg, iters)
    sd = (plan * cost).sum((1, 2))
    return (had + beta * sl + gamma * sd).mean()


def inputs(B, L, T, vs, vt, device, seed=0):
    return make_inputs(B, L, T, vs, vt, device, torch.float32, seed)


def check_parity(device: str, quick: bool) -> list[dict]:
    rows = []
    B, L, T, vs, vt = (2, 48, 12, 300, 200) if quick else (4, 256, 64, 4096, 3072)
    for mode in ("paper", "reference"):
        out = {}
        for dev in ("cpu", device):
            s, ls, t, lt = inputs(B, L, T, vs, vt, dev, seed=1)
            x = s.detach().requires_grad_()
            r = mlot.multilevel_ot(x, ls, t, lt, mode=mode)
            r.distill.backward()
            out[dev] = (float(r.distill), x.grad.cpu())
        d_loss = abs(out["cpu"][0] - out[device][0])
        d_grad = float((out["cpu"][1] - out[device][1]).abs().max())
        rows.append({"section": "parity", "case": f"{mode} fp32 {device} vs cpu", "loss_diff": d_loss,
                     "grad_diff": d_grad, "ok": d_loss <= 1e-5 and d_grad <= 1e-5})
    return rows


def bench_loss(device: str, quick: bool, reps: int) -> list[dict]:
    shapes = [(2, 64, 16, 512, 384)] if quick else [(16, 2048, 256, 50304, 32000), (16, 2048, 256, 151936, 128256)]
    rows = []
    for shape in shapes:
        rows.append(_bench_shape(device, reps, *shape))
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    return rows


def _bench_shape(device: str, reps: int, B: int, L: int, T: int, vs: int, vt: int) -> dict:
    """One shape's row; its tensors are freed on return (the large shapes hold tens of GB)."""
    s, ls, t, lt = inputs(B, L, T, vs, vt, device)
    payload = mlot.compress_teacher(t, lt)
    x = s.detach()
    cases = {"mlot paper (payload)": lambda: mlot.multilevel_ot(x.requires_grad_(), ls, payload).distill,
             "plain batched PyTorch": lambda: plain_paper(x.requires_grad_(), ls, t, lt)}
    result = {}
    for name, fn in cases.items():
        with PeakMemory(device) as mem:
            sec = timeit(lambda: fn().backward(), device, reps=reps)
        result[name] = (sec, mem.peak, float(fn()))
    (mine, mine_mem, mine_loss), (plain, plain_mem, plain_loss) = result.values()
    return {"section": "loss", "case": f"B={B} L={L} T={T} V={vs}/{vt}", "mlot_ms": 1e3 * mine,
            "plain_ms": 1e3 * plain, "speedup": plain / mine, "mlot_peak_mb": mine_mem / 2**20,
            "plain_peak_mb": plain_mem / 2**20, "loss_diff": abs(mine_loss - plain_loss)}


def run_distill_checks(device: str, quick: bool) -> list[dict]:
    import ray
    from mlflow import MlflowClient

    from orchestrator.configuration import load_config
    from orchestrator.driver import run_distill

    gpu = device.startswith("cuda")
    steps = 3 if quick else 40
    rows = []
    with tempfile.TemporaryDirectory() as out:
        for stage in (3,) if quick else (2, 3):  # the smoke run: ZeRO-3 only (ZeRO-2 bf16 runs in the cluster tests)
            sets = [f"name=gpu-check-z{stage}", f"output_dir={out}", f"tracking.uri=sqlite:///{out}/mlflow.db",
                    f"train.steps={steps}", "train.warmup_steps=0", f"train.checkpoint_every={steps}",
                    "train.eval_every=null", "teachers.0.pretrain.steps=0", "data.limit=400",
                    f"student.deepspeed.stage={stage}", "student.dtype=bfloat16", "teachers.0.dtype=bfloat16"]
            if gpu:  # one GPU shared: half for the teacher replica, half for the training worker
                sets += ["train.use_gpu=true", "train.resources_per_worker={GPU: 0.5}",
                         "teachers.0.resources.num_gpus=0.5"]
            job = load_config(REPO / "orchestrator" / "configs" / "quickstart.yaml", sets)
            t0 = time.time()
            s = run_distill(job, evaluate=False)
            client = MlflowClient(s.tracking_uri)

            def hist(key):
                return [m.value for m in client.get_metric_history(s.run_id, key)]
            tail = slice(1, None) if steps > 1 else slice(None)  # the first step pays for warm-up
            rows.append({"section": "distill", "case": f"ZeRO-{stage} bf16, {steps} steps",
                         "tokens_per_s": statistics.median(hist("train/tokens_per_s")[tail]),
                         "teacher_wait_frac": statistics.mean(hist("train/teacher_wait_frac")[tail]),
                         "peak_mem_mb": max(hist("train/peak_mem_mb")), "wall_s": time.time() - t0})
            ray.shutdown()
    return rows


def bench_student_loss(device: str, quick: bool) -> list[dict]:
    """Peak memory of the student's CE with its LM head (H = 896): dense (the head's logits, F.cross_entropy over an
    fp32 copy), chunked (``mlot.Objective`` on the built logits) and reading the head (``mlot.HeadLogits``)."""
    import torch.nn.functional as F

    from mlot.identity import IdentityConfig

    B, T, V, H = (2, 16, 512, 32) if quick else (16, 256, 151_936, 896)
    g = torch.Generator().manual_seed(0)
    labels = answer_labels(B, T, V, g).to(device)
    hidden = torch.randn(B, T + 1, H, generator=g).to(device)
    weight = (torch.randn(V, H, generator=g) * (2 / H ** 0.5)).to(device)
    objective = mlot.Objective(mlot.get_method("sft"), "paper", {}, 1.0, IdentityConfig())

    def dense(h, w):  # row t predicts label t + 1, over an fp32 copy of every row
        return F.cross_entropy(F.linear(h, w)[:, :-1].float().reshape(-1, V), labels[:, 1:].reshape(-1),
                               ignore_index=-100)

    variants = {"dense": dense, "chunked": lambda h, w: objective(F.linear(h, w), labels, {}, {})[0],
                "head": lambda h, w: objective(mlot.HeadLogits(h, w), labels, {}, {})[0]}
    out = {}
    for name, fn in variants.items():
        h, w = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
        with PeakMemory(device) as mem:
            loss = fn(h, w)
            loss.backward()
        out[name] = (mem.peak, float(loss.detach()), h.grad, w.grad)
        del h, w
    d_mem, d_loss, d_h, d_w = out["dense"]
    row = {"section": "student_loss", "case": f"CE + LM head, {B}x{T} rows, V={V}, H={H}",
           "dense_peak_mb": d_mem / 2**20, "ok": True}
    for name in ("chunked", "head"):
        mem, loss, g_h, g_w = out[name]
        diff = max(abs(loss - d_loss), float((g_h - d_h).abs().max()), float((g_w - d_w).abs().max()))
        row.update({f"{name}_peak_mb": mem / 2**20, f"{name}_ratio": d_mem / max(mem, 1), f"{name}_diff": diff})
        row["ok"] = row["ok"] and diff <= 1e-4
    return [row]


#: The serving benchmarks' teacher: the quickstart teacher grown to ~1.1B parameters (head size 128).
BIG_TEACHER = [f"teachers.0.hf_config.{k}={v}" for k, v in (
    ("hidden_size", 2048), ("num_hidden_layers", 16), ("intermediate_size", 5632), ("num_attention_heads", 16),
    ("num_key_value_heads", 16))]


def bench_serving(quick: bool) -> list[dict]:
    """Teacher tokens/s of one replica serving requests alone and batched (no Ray: the actor classes in-process,
    the batching replica's coroutines on one event loop as Ray runs them)."""
    import asyncio

    from orchestrator.config import ServingConfig
    from orchestrator.configuration import load_config
    from workers.data.prepared import Rows, prepare
    from workers.teacher.actor import TeacherActor
    from workers.teacher.batching import BatchingTeacher

    big = [] if quick else BIG_TEACHER
    job = load_config(REPO / "orchestrator" / "configs" / "quickstart.yaml", ["data.limit=400", *big])
    n = 16 if quick else 64
    with tempfile.TemporaryDirectory() as out:
        data = prepare(job, out)
        requests = [Rows(data, "train", tuple(range(4 * i, 4 * i + 4))) for i in range(n)]
        t = job.teachers[0]
        alone = TeacherActor(t, job.data, job.loss, seed=0)
        batching = BatchingTeacher(t, job.data, job.loss, seed=0, serving=ServingConfig(max_batch_tokens=8192))
        tokens = sum(len(ids) for r in requests for ids, _ in alone.examples(r))
        alone.payload(requests[0])  # warm-up
        t0 = time.perf_counter()
        one_by_one = [alone.payload(r) for r in requests]
        t_alone = time.perf_counter() - t0

        async def at_once():
            return await asyncio.gather(*(batching.payload(r) for r in requests))
        asyncio.run(at_once())  # warm-up
        forwards = batching.info()["forwards"]
        t0 = time.perf_counter()
        merged = asyncio.run(at_once())
        t_batched = time.perf_counter() - t0
    diff = max(float((mlot.TeacherPayload.from_numpy(a["payload"]).probs
                      - mlot.TeacherPayload.from_numpy(b["payload"]).probs).abs().max())
               for a, b in zip(one_by_one, merged))
    return [{"section": "serving", "case": f"hf teacher, {n} requests x 4 rows", "alone_tok_s": tokens / t_alone,
             "batched_tok_s": tokens / t_batched, "speedup": t_alone / t_batched,
             "batched_forwards": batching.info()["forwards"] - forwards, "payload_diff": diff}]


def bench_vllm(device: str, python: str) -> list[dict]:
    """The ``vllm`` rows: on a GPU with a vLLM runtime, else none (the reason printed)."""
    why = None if device.startswith("cuda") else "needs a GPU"
    why = why or (None if Path(python).exists() else f"no vLLM runtime at {python} (--vllm-python)")
    if why:
        print(f"vllm     | skipped: {why}; the CPU engine is checked by tests/test_vllm_engine.py")
        return []
    from orchestrator.configuration import load_config
    job = load_config(REPO / "orchestrator" / "configs" / "quickstart.yaml", [
        "data.limit=400", *BIG_TEACHER, "teachers.0.dtype=bfloat16", "teachers.0.engine=vllm",
        "teachers.0.resources.num_gpus=1", f"teachers.0.vllm.python={python}", "teachers.0.vllm.kv_cache_gb=16",
        "loss.params.ranking=token", "loss.params.sd_temperature=1.0"])
    return [vllm_vs_hf(job, requests=8, rows=32, case="~1.1B bf16 teacher, 8 requests x 32 rows")]


def vllm_vs_hf(job, requests: int, rows: int, case: str) -> dict:
    """Teacher tokens/s of ``job``'s first teacher (``engine: vllm``) served by a vLLM replica (a Ray actor in its
    runtime) and by the HF engine in this process, on the same requests of ``rows`` rows each."""
    import ray

    from orchestrator.engines import start_replicas
    from workers.data.prepared import Rows, prepare
    from workers.teacher.actor import TeacherActor

    def serve(fn, batches):
        """Seconds for all of ``batches`` (after a warm-up request) and the replies."""
        fn(batches[0])
        t0 = time.perf_counter()
        replies = [fn(b) for b in batches]
        return time.perf_counter() - t0, replies

    with tempfile.TemporaryDirectory() as out:
        data = prepare(job, out)
        batches = [Rows(data, "train", tuple(range(rows * i, rows * i + rows))) for i in range(requests)]
        hf = TeacherActor(job.teachers[0], job.data, job.loss, seed=job.train.seed)
        tokens = sum(len(ids) for b in batches for ids, _ in hf.examples(b))
        hf_s, hf_out = serve(hf.payload, batches)
        del hf
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        ray.init(address="local", num_cpus=4, num_gpus=int(torch.cuda.is_available()), include_dashboard=False)
        try:
            t0 = time.perf_counter()
            [actor] = start_replicas(job, job.teachers[0], 0, None, cache=False)
            ray.get(actor.info.remote())
            start_s = time.perf_counter() - t0
            vllm_s, vllm_out = serve(lambda b: ray.get(actor.payload.remote(b)), batches)
        finally:
            ray.shutdown()
    diff = max(float((mlot.TeacherPayload.from_numpy(a["payload"]).probs
                      - mlot.TeacherPayload.from_numpy(b["payload"]).probs).abs().max())
               for a, b in zip(hf_out, vllm_out))
    return {"section": "vllm", "case": case, "hf_tok_s": tokens / hf_s, "vllm_tok_s": tokens / vllm_s,
            "speedup": hf_s / vllm_s, "vllm_start_s": start_s, "payload_diff": diff}


def print_table(rows: list[dict]) -> None:
    for r in rows:
        metrics = "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                            for k, v in r.items() if k not in ("section", "case"))
        print(f"{r['section']:8s} | {r['case']:38s} | {metrics}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true",
                    help="small shapes, 3 training steps, ZeRO-3 only (the CPU smoke test)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default="gpu_check.json", help="where the JSON goes")
    ap.add_argument("--vllm-python", default=str(REPO / ".venv-vllm" / "bin" / "python"),
                    help="python of a vLLM runtime for the vllm rows (a GPU build of vLLM on a GPU machine)")
    args = ap.parse_args(argv)
    rows = check_parity(args.device, args.quick) + bench_loss(args.device, args.quick, args.reps)
    rows += run_distill_checks(args.device, args.quick) + bench_serving(args.quick)
    rows += bench_vllm(args.device, args.vllm_python) + bench_student_loss(args.device, args.quick)
    print_table(rows)
    Path(args.out).write_text(json.dumps({"device": args.device, "torch": torch.__version__,
                                          "cuda": torch.cuda.get_device_name() if args.device.startswith("cuda")
                                          else None, "quick": args.quick, "rows": rows}, indent=1))
    print(f"wrote {args.out}")
    return 0 if all(r.get("ok", True) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
