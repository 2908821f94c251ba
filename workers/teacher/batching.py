"""A teacher replica that merges the requests of all workers into batched forwards (``teachers[i].serving``).

A plain :class:`~workers.teacher.actor.TeacherActor` serves each worker's micro-batch alone: a 7B teacher then
runs forwards of 4 rows while its GPU could take 64, and the host work of a request (reading its rows,
collating, compressing, the device-to-host copy, serialising) runs in series with the GPU's. Here one replica is
a Ray *async* actor: every ``payload`` call is a coroutine that queues its request and waits; one loop takes the
queued requests into a batch of at most ``max_batch_tokens`` padded tokens (the oldest first, then those closest
to it in length, so little padding), runs one forward in a worker thread and answers each request with its own
payload (:meth:`TeacherActor.serve_merged`). While a forward runs, the event loop keeps accepting requests and a
second thread reads their rows, so the next batch is ready when the GPU is free.

Why an async actor and not Ray Serve's ``@serve.batch``: the students already hold the replicas' actor handles
(the ``workers.serving.TeacherServer`` protocol), which the driver places exactly (accelerator types, outside the
workers' placement group, one per GPU); Serve would add a controller and proxies with their own placement, and its
batching counts requests, not tokens.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from workers.serving import PayloadReply, Request
from workers.teacher.actor import TeacherActor


@dataclass
class _Queued:
    request: Request
    examples: list[tuple[list[int], list[int]]]
    future: asyncio.Future
    longest: int = field(init=False)

    def __post_init__(self) -> None:
        self.longest = max(len(ids) for ids, _ in self.examples)


def take_batch(queued: list[Any], max_tokens: int) -> list[Any]:
    """Which queued requests go into the next forward: the oldest, then the others closest to it in length, while
    (rows x longest row) stays within ``max_tokens`` (the oldest always goes, whatever its size).

    ``queued``: oldest first, each with ``examples`` and ``longest``. The chosen ones are removed from it.
    """
    first = queued[0]
    chosen, rows, longest = [first], len(first.examples), first.longest
    for q in sorted(queued[1:], key=lambda q: abs(q.longest - first.longest)):
        grown = max(longest, q.longest)
        if (rows + len(q.examples)) * grown <= max_tokens:
            chosen.append(q)
            rows, longest = rows + len(q.examples), grown
    for q in chosen:
        queued.remove(q)
    return chosen


class BatchingTeacher(TeacherActor):
    """One teacher replica batching the requests of all workers; the other methods as :class:`TeacherActor`.

    Args: as :class:`TeacherActor`, plus ``serving`` (the teacher's ``ServingConfig``: ``max_batch_tokens``,
    ``max_wait_ms``, the wait for companions when a request finds the replica idle).
    """

    def __init__(self, *args: Any, serving: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.serving = serving
        self.queued: list[_Queued] = []
        self.draining = False
        self.reader = ThreadPoolExecutor(1, thread_name_prefix="teacher-rows")     # reading requests' rows
        self.runner = ThreadPoolExecutor(1, thread_name_prefix="teacher-forward")  # forwards, one at a time

    async def payload(self, rows: Any, batch_id: Any = None, loss: Any = None, answers: list[Any] | None = None
                      ) -> PayloadReply:
        """Queue the request; its reply comes from the next batched forward (``TeacherServer.payload``)."""
        loop = asyncio.get_running_loop()
        if self.cache is not None:  # a sweep's hidden-state cache is keyed by micro-batch: served one by one
            return await loop.run_in_executor(self.runner, TeacherActor.payload, self, rows, batch_id, loss, answers)
        request = Request(rows, batch_id, loss, answers)
        examples = await loop.run_in_executor(self.reader, self.examples, rows, answers)
        queued = _Queued(request, examples, loop.create_future())
        self.queued.append(queued)
        if not self.draining:
            self.draining = True
            loop.create_task(self._drain())
        return await queued.future

    async def _drain(self) -> None:
        """Serve the queue until it is empty. An idle replica waits ``max_wait_ms`` for companions first; requests
        that arrive during a forward are batched right after it."""
        loop = asyncio.get_running_loop()
        try:
            await asyncio.sleep(self.serving.max_wait_ms / 1000)
            while self.queued:
                batch = take_batch(self.queued, self.serving.max_batch_tokens)
                try:
                    replies = await loop.run_in_executor(self.runner, self.serve_merged, [q.request for q in batch],
                                                         [q.examples for q in batch])
                except Exception as e:  # each waiting request gets the error, with its traceback
                    for q in batch:
                        q.future.set_exception(e)
                    continue
                for q, reply in zip(batch, replies):
                    q.future.set_result(reply)
        finally:
            self.draining = False
