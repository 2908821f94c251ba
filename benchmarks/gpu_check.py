"""The GPU check: one command, one table, one JSON file.

    python benchmarks/gpu_check.py                        # on a GPU machine: about 5-8 minutes on one GPU
    python benchmarks/gpu_check.py --device cpu --quick   # the CPU smoke test the suite runs (< 3 minutes)

Three sections, one table row per case (``section | case | metric = value ...``), and the same rows in
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
    args = ap.parse_args(argv)
    rows = check_parity(args.device, args.quick) + bench_loss(args.device, args.quick, args.reps)
    rows += run_distill_checks(args.device, args.quick)
    print_table(rows)
    Path(args.out).write_text(json.dumps({"device": args.device, "torch": torch.__version__,
                                          "cuda": torch.cuda.get_device_name() if args.device.startswith("cuda")
                                          else None, "quick": args.quick, "rows": rows}, indent=1))
    print(f"wrote {args.out}")
    return 0 if all(r.get("ok", True) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
