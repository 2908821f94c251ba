"""Benchmarks of the student side; ``--what`` picks a section (add new ones to SECTIONS).

loss: peak memory and time of the student's loss (``mlot.Objective``: CE, a method, the identity terms) with its LM
    head, forward and backward: fp32 hidden states of 16 x 256 answer rows, a head of H = 896 (Qwen2.5-0.5B's) at
    V = 151,936 (Qwen's vocabulary). Three variants: the dense student loss of commit 909d33d (``--baseline``: CE
    over an fp32 copy of the logits, the identity terms over full log-softmaxes, MultiLevelOT's own chunked reads
    with a gradient buffer each) on the head's built logits; this checkout on the built logits (``chunked``: every
    term reads the rows chunk by chunk through ``mlot.rows``, into one gradient buffer); this checkout reading the
    head (``head``: ``mlot.HeadLogits``, no [rows, V] tensor at all).

    python benchmarks/students.py --what loss                   # one [rows, V] fp32 copy is 2.5 GB
    python benchmarks/students.py --what loss --vocab 32768     # where memory is short (it says so)

How memory is measured: every (loss, variant) runs in a fresh subprocess that builds its inputs (seeded logits,
the teacher payload this process compressed once), then

* time and ``rss``: one forward + backward, timed; ``rss`` is the resident high-water mark (VmHWM, reset through
  /proc/self/clear_refs just before) minus the resident size then: what the OS gave the loss;
* ``tensors``: a second forward + backward under ``common.LiveTensorPeak`` (a dispatch mode that sees every op,
  autograd's backward included, and counts each new tensor storage until it is freed): the peak of what the
  loss holds at once, whatever the allocator caches.

The built variants include the logits and their gradient, a [rows, V] tensor each: the floor of any loss that
hands autograd logits; all three include the head's weight gradient ([V, H], 0.51 GiB here). The gradients of the
hidden states and of the weight are saved and compared with the baseline's by max |difference| (``dloss``,
``dgrad``). No timing here is a test: these are measurements, for the record (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch
from common import LiveTensorPeak
from student_memory import add_memory_options, memory_section

REPO = Path(__file__).resolve().parents[1]
BASELINE = "909d33de6cfd121275fc8b88c3a61b50ddfa634b"  # the last commit with the dense student loss

# name -> (method, loss.params, identity weights)
LOSSES = {
    "ce": ("sft", {}, {}),
    "multilevel_ot": ("multilevel_ot", {}, {}),
    "multilevel_ot+identity": ("multilevel_ot", {}, {"shared_weight": 0.5, "chunk_weight": 0.5}),
    "uld": ("uld", {}, {}),
}
COPIES = {"ce": 3, "multilevel_ot": 4, "multilevel_ot+identity": 9, "uld": 4}  # the baseline's peak, in copies


# ---------------------------------------------------------------------------- inputs


def _bounds(lengths: list[int], chars: list[int], g: torch.Generator) -> torch.Tensor:
    """[B, T + 1] character bounds: each answer of ``chars`` characters cut at random into ``lengths`` tokens."""
    from mlot.identity import pad_bounds

    cuts = [torch.randperm(c - 1, generator=g)[:n - 1].add(1).sort().values.tolist() for n, c in zip(lengths, chars)]
    return pad_bounds([[0, *cut, c] for cut, c in zip(cuts, chars)])


def answer_labels(B: int, T: int, V: int, g: torch.Generator) -> torch.Tensor:
    """[B, T + 1]: the answer window of a left-padded batch (row t predicts label t + 1), every answer T tokens."""
    labels = torch.randint(0, V, (B, T + 1), generator=g)
    labels[:, 0] = -100
    return labels


def make_inputs(args: argparse.Namespace, path: Path) -> None:
    """Student labels, one teacher's payload per loss (identity included where on) and the vocabulary map, saved
    for the variants (built once, by this checkout's ``mlot``)."""
    import mlot
    from mlot.identity import IdentityConfig, VocabMap, compress_identity

    g = torch.Generator().manual_seed(0)
    B, T, Tt, V, Vt = args.batch, args.answer, args.answer - args.answer // 16, args.vocab, args.teacher_vocab
    classes = Vt // 2
    members = torch.randint(0, V, (classes, 2), generator=g)
    members[torch.rand(classes, generator=g) < 0.7, 1] = -1
    shared = torch.zeros(V, dtype=torch.bool)
    shared[members[members >= 0]] = True
    vmap = VocabMap(torch.randint(-1, classes, (Vt,), generator=g), members, shared, {})
    chars = [4 * T] * B
    s_bounds, t_bounds = _bounds([T] * B, chars, g), _bounds([Tt] * B, chars, g)
    t_logits = torch.randn(B, Tt + 1, Vt, generator=g) * 2
    t_labels = answer_labels(B, Tt, Vt, g)
    payloads = {}
    for name, (method, params, ident) in LOSSES.items():
        m = mlot.get_method(method)
        if not m.needs_teacher:
            continue
        p = mlot.compress_teacher(t_logits, t_labels, config=m.payload_config("paper", params))
        if ident:
            cfg = IdentityConfig(**ident)
            p.identity = compress_identity(t_logits, t_labels, t_bounds, vmap if cfg.shared else None, cfg.shared_top_k)
            p.identity.student_bounds = s_bounds
        payloads[name] = p.to_numpy()
    torch.save({"labels": answer_labels(B, T, V, g), "payloads": payloads,
                "vmap": (vmap.teacher_class, vmap.student_members, vmap.student_shared)}, path)


# ---------------------------------------------------------------------------- one variant (a subprocess)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def _hwm() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))


def run_variant(args: argparse.Namespace) -> None:
    """Time, rss and tensor peak of one loss on one ``mlot`` (``args.root``); prints a JSON line, saves the grad."""
    sys.path.insert(0, args.root)
    for name in [m for m in sys.modules if m.split(".")[0] == "mlot"]:  # common imported the checkout's (orchestrator)
        del sys.modules[name]
    import mlot
    from mlot.identity import IdentityConfig, VocabMap

    assert Path(mlot.__file__).resolve().is_relative_to(Path(args.root).resolve()), mlot.__file__
    data = torch.load(args.inputs, weights_only=False)
    method, params, ident = LOSSES[args.loss]
    objective = mlot.Objective(mlot.get_method(method), "paper", params, 1.0, IdentityConfig(**ident))
    payloads = {"t": mlot.TeacherPayload.from_numpy(data["payloads"][args.loss])} if args.loss in data["payloads"] \
        else {}
    vmaps = {"t": VocabMap(*data["vmap"], {})}
    labels = data["labels"]
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(args.batch, args.answer + 1, args.hidden, generator=g)
    weight = torch.randn(args.vocab, args.hidden, generator=g) * (2 / args.hidden ** 0.5)  # logits ~ N(0, 2^2)

    def step() -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        h, w = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
        x = mlot.HeadLogits(h, w) if args.variant == "head" else torch.nn.functional.linear(h, w)
        loss, _ = objective(x, labels, payloads, vmaps)
        loss.backward()
        return loss.detach(), (h.grad, w.grad)

    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident size
    rss0, t0 = _rss(), time.perf_counter()
    loss, grad = step()
    seconds, rss = time.perf_counter() - t0, _hwm() - rss0
    torch.save(grad[0], args.grad)
    torch.save(grad[1], args.grad + ".w")
    del grad
    with LiveTensorPeak() as live:
        step()
    print(json.dumps({"loss": float(loss), "seconds": seconds, "rss": rss, "tensors": live.peak}))


# ---------------------------------------------------------------------------- the section


def _available() -> int:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable"))


def _baseline_tree(ref: str, into: Path) -> Path:
    """``mlot/`` as of commit ``ref``, unpacked under ``into`` (git archive: the checkout is not touched)."""
    tar = subprocess.run(["git", "-C", str(REPO), "archive", ref, "mlot"], check=True, capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(tar)) as t:
        t.extractall(into, filter="data")
    return into


def _max_diff(a: Path, b: Path, rows: int = 64) -> float:
    """max |a - b| of two saved gradients, read through mmap a few rows at a time."""
    x, y = torch.load(a, mmap=True, weights_only=True), torch.load(b, mmap=True, weights_only=True)
    return max(float((x[i:i + rows] - y[i:i + rows]).abs().max()) for i in range(0, x.shape[0], rows))


def loss_section(args: argparse.Namespace) -> None:
    copy = args.batch * args.answer * args.vocab * 4
    need = copy * (2 + max(COPIES[name] for name in args.losses))  # the logits, the peak, some room
    if need > _available():
        sys.exit(f"--what loss at V={args.vocab} needs about {need / 2**30:.0f} GiB (one [rows, V] fp32 copy is "
                 f"{copy / 2**30:.2f} GiB), {_available() / 2**30:.0f} GiB are available: pass a smaller --vocab")
    print(f"student loss, forward + backward: B={args.batch} x {args.answer} answer rows, V={args.vocab}, "
          f"teacher V={args.teacher_vocab}, fp32; one [rows, V] fp32 copy = {copy / 2**30:.2f} GiB; "
          f"baseline {args.baseline[:7]} vs this checkout; {torch.get_num_threads()} threads", flush=True)
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        make_inputs(args, tmp / "inputs.pt")
        roots = {"baseline": _baseline_tree(args.baseline, tmp / "baseline"), "chunked": REPO, "head": REPO}
        print(f"{'loss':24s} {'variant':9s} {'tensors GiB':>11s} {'copies':>6s} {'rss GiB':>8s} {'s':>7s} "
              f"{'tensors x':>9s} {'rss x':>6s} {'dloss':>9s} {'dgrad':>9s}")
        for name in args.losses:
            got = {}
            for variant, root in roots.items():
                cmd = [sys.executable, __file__, "--what", "loss", "--variant", variant, "--root", str(root),
                       "--loss", name, "--inputs", str(tmp / "inputs.pt"), "--grad", str(tmp / f"{variant}.pt"),
                       "--batch", str(args.batch), "--answer", str(args.answer), "--vocab", str(args.vocab),
                       "--hidden", str(args.hidden)]
                run = subprocess.run(cmd, capture_output=True, text=True)
                if run.returncode:
                    sys.exit(f"{name} / {variant} failed:\n{run.stderr[-3000:]}")
                got[variant] = json.loads(run.stdout.strip().splitlines()[-1])
            base = got["baseline"]
            for variant, r in got.items():
                dloss = abs(r["loss"] - base["loss"])
                dgrad = max(_max_diff(tmp / f"baseline.pt{w}", tmp / f"{variant}.pt{w}") for w in ("", ".w"))
                tail = "" if r is base else (f"{base['tensors'] / r['tensors']:9.2f} {base['rss'] / r['rss']:6.2f} "
                                             f"{dloss:9.2e} {dgrad:9.2e}")
                print(f"{name:24s} {variant:9s} {r['tensors'] / 2**30:11.2f} {r['tensors'] / copy:6.2f} "
                      f"{r['rss'] / 2**30:8.2f} {r['seconds']:7.2f} {tail}", flush=True)
    print("tensors: peak of what the loss holds (common.LiveTensorPeak); copies: that in [rows, V] fp32 copies "
          "(the logits' gradient is one); rss: resident high-water mark above the start; x: baseline / variant; "
          "dloss, dgrad: max |variant - baseline| (dgrad: of the hidden states and the head's weight)")


SECTIONS = {"loss": loss_section, "memory": memory_section}  # memory: see student_memory.py


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--what", required=True, choices=sorted(SECTIONS))
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--answer", type=int, default=256, help="answer rows per sample")
    ap.add_argument("--vocab", type=int, default=151936, help="student vocabulary (smaller where memory is short)")
    ap.add_argument("--teacher-vocab", type=int, default=32000)
    ap.add_argument("--hidden", type=int, default=896, help="the student's hidden size (its LM head's input)")
    ap.add_argument("--losses", nargs="+", default=list(LOSSES), choices=list(LOSSES))
    ap.add_argument("--baseline", default=BASELINE, help="git commit of the dense loss to compare with")
    add_memory_options(ap)
    # one variant's run (the section starts these as subprocesses)
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    ap.add_argument("--root", help=argparse.SUPPRESS)
    ap.add_argument("--loss", help=argparse.SUPPRESS)
    ap.add_argument("--inputs", help=argparse.SUPPRESS)
    ap.add_argument("--grad", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.variant:
        run_variant(args)
    else:
        SECTIONS[args.what](args)


if __name__ == "__main__":
    main()
