"""Forward+backward time and peak memory of the mlot losses against a looped restatement and the floor.

    python benchmarks/loss.py                 # CPU, the spec's shapes scaled down
    python benchmarks/loss.py --device cuda --batch 16 --seq 2048 --answer 256 --vs 50304 --vt 32000

Everything runs in one process and is printed as ratios to the floor (one read of the student
logits) and to the looped restatement of the released arithmetic (a Python loop over the batch, as
the method spec describes the released code).
"""

from __future__ import annotations

import argparse
import gc

import torch
from common import PeakMemory, timeit

import mlot


def released_loop(s_logits: torch.Tensor, s_labels: torch.Tensor, t_logits: torch.Tensor, t_labels: torch.Tensor,
                  k: int = 50) -> torch.Tensor:
    """The released arithmetic restated plainly: per-sample Python loops, as the released code is written."""
    def rows(x, labels):
        out = []
        for b in range(x.shape[0]):  # one sample at a time
            idx = (labels[b] != -100).nonzero().flatten()
            z = x[b, idx[0] - 1: idx[0] - 1 + len(idx)].float()
            out.append(torch.softmax(z / (z.std(-1, keepdim=True) + 1e-4), -1))
        return out
    s_rows, t_rows = rows(s_logits, s_labels), rows(t_logits, t_labels)
    M = max(max(len(r) for r in s_rows), max(len(r) for r in t_rows))
    pad = lambda r: torch.cat([r, r.new_zeros(M - len(r), r.shape[1])])  # noqa: E731
    s = torch.stack([pad(r) for r in s_rows])
    t = torch.stack([pad(r) for r in t_rows])
    sk = s[..., s.sum((0, 1)).argsort(descending=True)[:k]]
    tk = t[..., t.sum((0, 1)).argsort(descending=True)[:k]]
    had = torch.stack([(sk[b, :min(len(s_rows[b]), len(t_rows[b]))] - tk[b, :min(len(s_rows[b]), len(t_rows[b]))])
                       .abs().sum(-1).mean() for b in range(len(s_rows))])
    sl = -(torch.softmax(sk, -1) * torch.log_softmax(tk, -1)).sum(-1).mean()
    sd = 0.0
    for b in range(len(s_rows)):
        W = torch.cdist(torch.softmax(tk[b] / 2, -1), torch.softmax(sk[b] / 2, -1), p=1)
        P = torch.exp(-W / 0.1)
        for _ in range(10):
            P = P / P.sum(-1, keepdim=True)
            P = P / P.sum(-2, keepdim=True)
        sd = sd + (P * W).sum()
    return (had + 0.1 * sl).mean() + 0.1 * 0.001 * sd


def _rows_only(s: torch.Tensor, ls: torch.Tensor, payload: mlot.TeacherPayload) -> None:
    keep = int((ls != -100).sum(1).max()) + 1  # left-padded answers end at the right edge
    x = s[:, -keep:].detach().requires_grad_()
    mlot.multilevel_ot(x, ls[:, -keep:], payload).distill.backward()


def make_inputs(B: int, L: int, T: int, vs: int, vt: int, device: str, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    def side(V, lengths):
        x = (torch.randn(B, L, V, generator=g) * 2).to(device=device, dtype=dtype)
        y = torch.full((B, L), -100, dtype=torch.long)
        for b, n in enumerate(lengths):
            y[b, L - n:] = torch.randint(0, V, (n,), generator=g)
        return x, y.to(device)
    s, ls = side(vs, [T - (b % 4) * (T // 8) for b in range(B)])
    t, lt = side(vt, [T - ((b + 1) % 4) * (T // 8) for b in range(B)])
    return s, ls, t, lt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--answer", type=int, default=128)
    ap.add_argument("--vs", type=int, default=16000)
    ap.add_argument("--vt", type=int, default=12000)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    s, ls, t, lt = make_inputs(args.batch, args.seq, args.answer, args.vs, args.vt, args.device, dtype)
    payload_paper = mlot.compress_teacher(t, lt)
    payload_ref = mlot.compress_teacher(t, lt, mode="reference")

    def fwd_bwd(loss_fn):
        def run():
            x = s.detach().requires_grad_()
            loss_fn(x).backward()
        return run

    cases = {
        "floor: one read of student logits": lambda: s.sum(),
        "looped released restatement": fwd_bwd(lambda x: released_loop(x, ls, t, lt)),
        "mlot reference (teacher logits)": fwd_bwd(
            lambda x: mlot.multilevel_ot(x, ls, t, lt, mode="reference").distill),
        "mlot reference (payload)": fwd_bwd(lambda x: mlot.multilevel_ot(x, ls, payload_ref, mode="reference").distill),
        "mlot paper (teacher logits)": fwd_bwd(lambda x: mlot.multilevel_ot(x, ls, t, lt).distill),
        "mlot paper (payload)": fwd_bwd(lambda x: mlot.multilevel_ot(x, ls, payload_paper).distill),
        "mlot paper, assignment ranking (payload)": fwd_bwd(
            lambda x: mlot.multilevel_ot(x, ls, mlot.compress_teacher(t, lt), student_ranking="assignment").distill),
        # What the trainer passes: logits only for the answer rows (HF logits_to_keep), so the
        # gradient buffer is [B, T+1, V] instead of [B, L, V].
        "mlot paper (payload, answer rows only)": lambda: _rows_only(s, ls, payload_paper),
        "compress_teacher (paper)": lambda: mlot.compress_teacher(t, lt),
    }
    print(f"device={args.device} dtype={args.dtype} B={args.batch} L={args.seq} answer<={args.answer} "
          f"V_s={args.vs} V_t={args.vt} threads={torch.get_num_threads()}")
    results = {}
    for name, fn in cases.items():
        gc.collect()
        with PeakMemory(args.device) as mem:
            fn()
        results[name] = (timeit(fn, args.device, reps=args.reps), mem.peak)
    floor = results["floor: one read of student logits"][0]
    loop = results["looped released restatement"][0]
    print(f"{'case':44s} {'ms':>9s} {'x floor':>8s} {'x loop':>7s} {'peak MB':>8s}")
    for name, (sec, peak) in results.items():
        print(f"{name:44s} {sec * 1e3:9.2f} {sec / floor:8.1f} {sec / loop:7.3f} {peak / 2**20:8.1f}")
    print(f"speed-up over the looped restatement: reference (logits) "
          f"{loop / results['mlot reference (teacher logits)'][0]:.1f}x, "
          f"paper (payload) {loop / results['mlot paper (payload)'][0]:.1f}x")
    bpt = payload_paper.bytes_per_token()
    print(f"payload: {bpt:.1f} bytes/answer token (k=50, fp32) vs full bf16 logits "
          f"{mlot.full_logits_bytes_per_token(args.vt)} bytes -> "
          f"{mlot.full_logits_bytes_per_token(args.vt) / bpt:.0f}x smaller")


if __name__ == "__main__":
    main()
