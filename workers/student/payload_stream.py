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
from workers.student.console import say


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


#: Seconds a replica that failed a request is passed over (while Ray restarts it) when others are up.
COOLDOWN_S = 30.0
#: A request is also asked of another replica after max(HEDGE_FLOOR_S, 4 x the usual wait); the slow replica is
#: then passed over for HEDGE_COOLDOWN_S.
HEDGE_FLOOR_S, HEDGE_COOLDOWN_S = 2.0, 10.0


class PayloadStream:
    """Keeps up to ``depth`` micro-batches of teacher payloads in flight for this worker.

    Each request goes to the teacher's least loaded replica as this worker sees it (fewest of its requests in
    flight there; ties start at (micro-batch, rank), so N workers spread over the replicas). A request that fails
    because its replica died is sent at once to another one, and the dead replica is passed over for
    ``COOLDOWN_S`` while Ray restarts it; a request held by a restarting replica is asked of another one after
    :meth:`_hedge_s`. So a replica's death costs a step one retry, not the restart (requests carry
    ``max_task_retries=0``: none waits inside Ray through it). A payload carries the batch id it was computed
    for; a mismatch is a hard error. ``loss`` (a LossConfig) is sent along: long-lived teachers serve trials with
    different settings. ``on_policy(m)``: does micro-batch m train on the student's answers only (asked for only
    with them, in :meth:`get`)? A ``mode: add`` micro-batch's labels are asked for ahead like any other, its
    answers by :meth:`score`.
    """

    def __init__(self, teachers: dict[str, list[Any]], data: DataRef, order: BatchOrder, rank: int, world: int,
                 depth: int, loss: Any, attempts: int = 5, on_policy: Callable[[int], bool] = lambda m: False) -> None:
        self.teachers, self.data, self.order = teachers, data, order
        self.rank, self.world, self.depth = rank, world, depth
        self.loss, self.attempts, self.on_policy = loss, attempts, on_policy
        self.inflight: deque[tuple[int, dict[str, Any] | None]] = deque()
        self.next_m = 0
        self.answers: dict[int, list[Any]] = {}  # on-policy micro-batch -> the student's answers (until fetched)
        self.load = {name: [0] * len(r) for name, r in teachers.items()}  # this worker's requests in flight
        self.down_until = {name: [0.0] * len(r) for name, r in teachers.items()}  # passed over until then
        self.usual_wait: dict[str, float] = {}  # running mean of this worker's wait for each teacher

    def _replica(self, name: str, m: int) -> int:
        """The replica micro-batch m goes to: the least loaded of those up (all of them, when none is up)."""
        n, now = len(self.teachers[name]), time.monotonic()
        order = [(m * self.world + self.rank + i) % n for i in range(n)]
        up = [i for i in order if self.down_until[name][i] <= now] or order
        return min(up, key=lambda i: self.load[name][i])  # min keeps the first of equals: the spread

    def _request(self, name: str, m: int) -> tuple[Any, int]:
        i = self._replica(name, m)
        self.load[name][i] += 1
        extra = {"answers": self.answers[m]} if m in self.answers else {}
        ref = self.teachers[name][i].payload.options(max_task_retries=0).remote(
            Rows(self.data, "train", tuple(self.order(m))), batch_id=[self.rank, m], loss=self.loss, **extra)
        return ref, i

    def _fetch(self, name: str, sent: tuple[Any, int], m: int) -> dict[str, Any]:
        """The reply to micro-batch m's request ``sent`` (ref, replica). A replica's death or restart costs one
        retry: a request that fails is sent to another replica at once, and one that takes longer than
        :meth:`_hedge_s` (a replica that is restarting holds requests until it is back) is also asked of another
        replica, the first reply winning. With every replica down, retries back off."""
        import ray
        from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

        pending, failures = [sent], 0  # (ref, replica) asked for this micro-batch
        try:
            while True:
                hedge = len(pending) == 1 and self._others_up(name, pending[0][1])
                ready, _ = ray.wait([r for r, _ in pending], timeout=self._hedge_s(name) if hedge else None)
                if not ready:
                    self._pass_over(name, pending[0][1], HEDGE_COOLDOWN_S)
                    say(f"teacher {name} replica {pending[0][1]} slow on batch {[self.rank, m]}; asking another")
                    pending.append(self._request(name, m))
                    continue
                done = next(p for p in pending if p[0] == ready[0])
                try:
                    return ray.get(done[0])
                except (ActorDiedError, ActorUnavailableError, RayActorError) as e:
                    failures += 1
                    if failures == self.attempts:
                        raise
                    pending.remove(done)
                    self.load[name][done[1]] -= 1
                    self._pass_over(name, done[1], COOLDOWN_S)
                    say(f"teacher {name} replica {done[1]} failed on batch {[self.rank, m]} ({type(e).__name__}); "
                        f"retrying ({failures}/{self.attempts - 1})")
                    if not self._others_up(name, done[1]):
                        time.sleep(min(2.0 ** (failures - 1), 10.0))
                    if not pending:
                        pending.append(self._request(name, m))
        finally:
            for _, i in pending:
                self.load[name][i] -= 1

    def _others_up(self, name: str, i: int) -> bool:
        now = time.monotonic()
        return any(t <= now for j, t in enumerate(self.down_until[name]) if j != i)

    def _pass_over(self, name: str, i: int, seconds: float) -> None:
        self.down_until[name][i] = max(self.down_until[name][i], time.monotonic() + seconds)

    def _hedge_s(self, name: str) -> float:
        """How long a request may take before another replica is asked too: well above this worker's usual
        wait for the teacher (its running mean), and never under ``HEDGE_FLOOR_S``."""
        return max(HEDGE_FLOOR_S, 4 * self.usual_wait.get(name, 0.0))

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
        if got_m != m:
            raise RuntimeError(f"micro-batch {m}: the stream's next request is for micro-batch {got_m}")
        if (refs is None) != (answers is not None):
            raise RuntimeError(f"micro-batch {m}: on-policy is {refs is None}, answers given: {answers is not None}")
        return self.score(m, answers) if refs is None else self._collect(m, refs)

    def score(self, m: int, answers: list[Any]) -> Fetched:
        """The payloads of the student's ``answers`` to micro-batch m's prompts, asked for now (they exist only
        once generated): an on-policy m's (through :meth:`get`), or the second half of a ``mode: add`` one."""
        self.answers[m] = answers
        try:
            return self._collect(m, {name: self._request(name, m) for name in self.teachers})
        finally:
            self.answers.pop(m, None)

    def _collect(self, m: int, refs: dict[str, tuple[Any, int]]) -> Fetched:
        out = Fetched()
        for name, ref in refs.items():
            t0 = time.perf_counter()
            reply = self._fetch(name, ref, m)
            out.wait_s[name] = time.perf_counter() - t0
            self.usual_wait[name] = 0.9 * self.usual_wait.get(name, out.wait_s[name]) + 0.1 * out.wait_s[name]
            if reply["batch_id"] != [self.rank, m]:
                raise RuntimeError(f"teacher {name} answered batch {reply['batch_id']} for batch {[self.rank, m]}")
            payload = mlot.TeacherPayload.from_numpy(reply["payload"])
            out.payloads[name] = payload
            out.nbytes[name] = payload.nbytes()
            out.answer_tokens[name] = int(payload.lengths.sum())
        return out
