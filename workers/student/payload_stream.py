"""Which rows a worker trains on, and the teachers' payloads for them, requested ahead of time.

:class:`BatchOrder` is a pure function of (seed, rank, micro-batch): a resumed or restarted run sees
exactly the batches it would have seen. :class:`PayloadStream` keeps ``depth`` micro-batches of payload
requests in flight per teacher, so teacher inference overlaps the student step, and retries on another
replica when a teacher dies. An on-policy micro-batch (``workers.student.on_policy``) cannot be asked for ahead: its
answers exist only once the student has generated them; its request goes out when :meth:`PayloadStream.get`
receives them. A request names rows by index (each teacher reads its own tokens of them from
the prepared data); payloads go teacher actor -> object store -> this worker.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

import mlot
from workers.data.prepared import DataRef, Rows


class BatchOrder:
    """Which training rows (indices into the prepared train split) form micro-batch m on this rank: a seeded
    shuffle per epoch of this rank's shard."""

    def __init__(self, n_rows: int, rank: int, world: int, batch_size: int, seed: int) -> None:
        shard = n_rows // world  # every rank the same count: DeepSpeed steps are collective
        self.rows = range(rank, n_rows, world)[:shard]
        self.batch_size, self.seed, self.rank = batch_size, seed, rank
        self.per_epoch = max(1, shard // batch_size)
        self._perm: tuple[int, list[int]] | None = None

    def __call__(self, m: int) -> list[int]:
        epoch, i = divmod(m, self.per_epoch)
        if self._perm is None or self._perm[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = (epoch, torch.randperm(len(self.rows), generator=g).tolist())
        idx = self._perm[1][i * self.batch_size:(i + 1) * self.batch_size]
        return [self.rows[j] for j in idx]


@dataclass
class Fetched:
    """The payloads of one micro-batch, and what getting them cost, per teacher."""

    payloads: dict[str, mlot.TeacherPayload] = field(default_factory=dict)
    wait_s: dict[str, float] = field(default_factory=dict)      # seconds this worker blocked on each
    nbytes: dict[str, int] = field(default_factory=dict)        # payload bytes received from each
    answer_tokens: dict[str, int] = field(default_factory=dict)  # answer tokens in each teacher's tokens


class PayloadStream:
    """Keeps up to ``depth`` micro-batches of teacher payloads in flight for this worker.

    Replicas are picked round-robin over (micro-batch, rank), so N workers spread over a teacher's
    replicas. A payload carries the batch id it was computed for; a mismatch is a hard error.
    ``loss`` (a LossConfig) is sent along: long-lived teachers serve trials with different settings.
    ``on_policy(m)``: is micro-batch m on-policy (asked for only with its answers)?
    """

    def __init__(self, teachers: dict[str, list[Any]], data: DataRef, order: BatchOrder, rank: int, world: int,
                 depth: int, loss: Any, attempts: int = 5, on_policy: Callable[[int], bool] = lambda m: False) -> None:
        self.teachers, self.data, self.order = teachers, data, order
        self.rank, self.world, self.depth = rank, world, depth
        self.loss, self.attempts, self.on_policy = loss, attempts, on_policy
        self.inflight: deque[tuple[int, dict[str, Any] | None]] = deque()
        self.next_m = 0
        self.answers: dict[int, list[Any]] = {}  # on-policy micro-batch -> the student's answers (until fetched)

    def _request(self, name: str, m: int, attempt: int = 0) -> Any:
        replicas = self.teachers[name]
        actor = replicas[(m * self.world + self.rank + attempt) % len(replicas)]
        extra = {"answers": self.answers[m]} if m in self.answers else {}
        return actor.payload.remote(Rows(self.data, "train", tuple(self.order(m))), batch_id=[self.rank, m],
                                    loss=self.loss, **extra)

    def _fetch(self, name: str, ref: Any, m: int) -> dict[str, Any]:
        """ray.get with retries on other replicas: a teacher that died (and is restarting) costs time, not the run."""
        import ray
        from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

        for attempt in range(1, self.attempts + 1):
            try:
                return ray.get(ref)
            except (ActorDiedError, ActorUnavailableError, RayActorError) as e:
                if attempt == self.attempts:
                    raise
                print(f"[mlot] teacher {name} failed on batch {[self.rank, m]} ({type(e).__name__}); "
                      f"retrying ({attempt}/{self.attempts - 1})", flush=True)
                time.sleep(min(2.0 ** (attempt - 1), 10.0))
                ref = self._request(name, m, attempt)
        raise AssertionError("unreachable")

    def get(self, m: int, answers: list[Any] | None = None) -> Fetched:
        """The payloads of micro-batch m (requests up to ``m + depth`` are sent first); ``answers``: the
        student's answers, for an on-policy m."""
        if self.next_m <= m and not self.inflight:
            self.next_m = m
        while self.next_m <= m + self.depth:
            ahead = None if self.on_policy(self.next_m) else {n: self._request(n, self.next_m) for n in self.teachers}
            self.inflight.append((self.next_m, ahead))
            self.next_m += 1
        while self.inflight and self.inflight[0][0] < m:  # e.g. skipped after a restart
            self.inflight.popleft()
        got_m, refs = self.inflight.popleft()
        if (refs is None) != (answers is not None):
            raise RuntimeError(f"micro-batch {m}: on-policy is {refs is None}, answers given: {answers is not None}")
        if refs is None:
            self.answers[m] = answers
            refs = {name: self._request(name, m) for name in self.teachers}
        out = Fetched()
        for name, ref in refs.items():
            t0 = time.perf_counter()
            reply = self._fetch(name, ref, m)
            out.wait_s[name] = time.perf_counter() - t0
            if reply["batch_id"] != [self.rank, m] or got_m != m:
                raise RuntimeError(f"teacher {name} answered batch {reply['batch_id']} for batch {[self.rank, m]}")
            payload = mlot.TeacherPayload.from_numpy(reply["payload"])
            out.payloads[name] = payload
            out.nbytes[name] = payload.nbytes()
            out.answer_tokens[name] = int(payload.lengths.sum())
        self.answers.pop(m, None)
        return out
