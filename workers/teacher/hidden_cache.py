"""A sweep's shared-teacher cache: each batch's final hidden states (or logits, for heads that are not a plain
projection), kept under a byte budget with least-recently-used eviction.

Every trial of a sweep asks for the same batches in the same order per epoch, so a hit saves a teacher forward;
the budget keeps a long sweep (batch keys change every epoch) from filling the actor's memory: at 1M rows of a
4096-wide teacher an unbounded cache would hold ~0.5 TB per epoch.
"""

from __future__ import annotations

from collections import OrderedDict

import torch


def default_budget(reserved_memory: int | None) -> int:
    """A replica's cache budget when the job sets none: half the memory it reserved (``resources.memory``), else
    10% of this node's memory (the replica shares the node with its model and other actors)."""
    if reserved_memory:
        return reserved_memory // 2
    import psutil
    return psutil.virtual_memory().total // 10


def tensor_bytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class HiddenCache:
    """batch key -> (hidden [B, K, H] or logits, labels [B, K]) on the CPU, at most ``budget`` bytes in all.

    Args:
        budget: bytes the entries may take together; an entry larger than the whole budget is not kept.
    """

    def __init__(self, budget: int) -> None:
        if budget <= 0:
            raise ValueError(f"the teacher cache budget must be > 0 bytes, got {budget}")
        self.budget = budget
        self.entries: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self.bytes = self.hits = self.misses = self.evictions = 0

    def get(self, key: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        entry = self.entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        self.hits += 1
        self.entries.move_to_end(key)  # most recently used last: eviction takes from the front
        return entry

    def put(self, key: str, hidden: torch.Tensor, labels: torch.Tensor) -> None:
        size = tensor_bytes(hidden, labels)
        if key in self.entries or size > self.budget:
            return
        while self.bytes + size > self.budget:
            _, old = self.entries.popitem(last=False)
            self.bytes -= tensor_bytes(*old)
            self.evictions += 1
        self.entries[key] = (hidden.cpu(), labels.cpu())
        self.bytes += size

    def clear(self) -> None:
        """New weights: every entry is stale."""
        self.entries.clear()
        self.bytes = 0

    def __len__(self) -> int:
        return len(self.entries)

    def stats(self) -> dict[str, int]:
        return {"hits": self.hits, "misses": self.misses, "bytes": self.bytes, "entries": len(self.entries),
                "evictions": self.evictions, "budget": self.budget}
