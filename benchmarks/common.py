"""Timing and peak-memory helpers shared by the benchmarks (CPU and CUDA)."""

from __future__ import annotations

import statistics
import threading
import time
from typing import Callable

import torch

from orchestrator.cli import QUICKSTARTS

#: The QA quickstart job (orchestrator/configs/quickstart.yaml) the pipeline, serving, store, identity and sweep
#: benchmarks measure.
QUICKSTART = QUICKSTARTS["qa"]


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


class PeakMemory:
    """Peak memory above the starting level while the block runs: CUDA allocator stats, else sampled RSS."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.peak = 0

    def __enter__(self) -> "PeakMemory":
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.base = _rss_bytes()
            self.top = self.base
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.top = max(self.top, _rss_bytes())
            time.sleep(0.0005)

    def __exit__(self, *exc: object) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.top, _rss_bytes()) - self.base


def timeit(fn: Callable[[], object], device: str, reps: int = 5, warmup: int = 1) -> float:
    """Median wall time of fn() in seconds (CUDA-synchronised)."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


class LiveTensorPeak:
    """Peak bytes of the tensors created while the block runs and still alive, forward and backward.

    A ``TorchDispatchMode`` sees every ATen op, autograd's backward ops included: each new storage is counted
    until it is freed (a weak reference expires); views and in-place results are not new. What exists before the
    block (inputs) is not counted, nor what a kernel allocates and frees inside itself. This is what the code
    holds, independent of the allocator's caching and of which pages the OS has touched.
    """

    def __enter__(self) -> "LiveTensorPeak":
        from torch.multiprocessing.reductions import StorageWeakRef
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_leaves

        tracker = self
        self.live: dict[int, tuple[object, int]] = {}
        self.now = self.peak = 0

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for key in [k for k, (ref, _) in tracker.live.items() if ref.expired()]:
                    tracker.now -= tracker.live.pop(key)[1]
                inputs = {StorageWeakRef(t.untyped_storage()).cdata for t in tree_leaves((args, kwargs))
                          if isinstance(t, torch.Tensor)}
                for t in tree_leaves(out):  # a view of or an in-place op on an input is no new storage
                    if isinstance(t, torch.Tensor):
                        ref = StorageWeakRef(t.untyped_storage())
                        if ref.cdata not in tracker.live and ref.cdata not in inputs:
                            tracker.live[ref.cdata] = (ref, t.untyped_storage().nbytes())
                            tracker.now += t.untyped_storage().nbytes()
                tracker.peak = max(tracker.peak, tracker.now)
                return out

        self._mode = _Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._mode.__exit__(*exc)
