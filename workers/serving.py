"""The teacher-server protocol: what a student worker may ask of a teacher, whatever serves it.

A live model in a Ray actor (``workers.teacher.actor.TeacherActor``), a store reader
(``workers.teacher.store.StoreTeacher``) and a sweep's payload cache all implement :class:`TeacherServer`; the
student's payload stream (``workers.student.payload_stream``) only ever calls these two methods, so a new
serving engine is one more class with them.

A request names rows of the job's prepared data (``workers.data.prepared.Rows``), optionally the loss whose
payload to compute (a sweep's trial; default the server's own) and, on an on-policy micro-batch, the student's
answers (``workers.generation.Answer``). The reply is plain data (numpy arrays, no pickled classes).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Protocol, TypedDict


class Request(NamedTuple):
    """One payload request, as :meth:`TeacherServer.payload` takes it."""

    rows: Any
    batch_id: Any = None
    loss: Any = None
    answers: list[Any] | None = None


class PayloadReply(TypedDict):
    """One request's answer.

    Attributes:
        payload: ``mlot.TeacherPayload.to_numpy()`` of the request's rows, in their order.
        batch_id: the request's own, echoed (the worker checks it: a payload never lands on another batch).
        seconds: time the server spent on it.
        answer_tokens: the teacher's answer tokens in it (payload bytes per token are measured with it).
    """

    payload: dict[str, Any]
    batch_id: Any
    seconds: float
    answer_tokens: int


class ServerInfo(TypedDict):
    """What a server says of itself (the same keys for every kind).

    Attributes:
        name: the teacher's name. device / dtype: where and in what it computes (``store`` / the stored format
            for a store reader). vocab_size: the teacher tokenizer's. node_id: the Ray node it runs on.
        padded_rows: logit rows of a padded LM head it ignores. forward_rows: rows it ran a model forward on.
        served_rows / served_requests: rows / requests it answered. forwards: model forwards it ran (fewer than
            its requests when it batches them). busy_s: seconds it spent serving requests.
        cached_batches: batches in its hidden-state cache (None: no cache).
        store: the store format it reads (None: a live model).
    """

    name: str
    device: str
    dtype: str
    vocab_size: int
    node_id: str | None
    padded_rows: int
    forward_rows: int
    served_rows: int
    served_requests: int
    forwards: int
    busy_s: float
    cached_batches: int | None
    store: str | None


class TeacherServer(Protocol):
    """A teacher, as the students see it."""

    def payload(self, rows: Any, batch_id: Any = None, loss: Any = None, answers: list[Any] | None = None
                ) -> PayloadReply:
        """The payload of ``rows`` for ``loss`` (a ``LossConfig``; None: the server's own), on the student's
        ``answers`` instead of the data's when given."""
        ...

    def info(self) -> ServerInfo: ...


def node_id() -> str | None:
    """The Ray node this process runs on (None outside Ray)."""
    import ray
    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None


class PayloadSettings:
    """The payload settings (``mlot.MultiLevelOTConfig``) of each distinct loss a server is asked for, built once:
    workers send their ``LossConfig`` with every request.

    Args:
        loss: the server's own loss (a request without one gets it).
        check: run once per new loss, before its settings are used (a store refuses settings it cannot serve).
    """

    def __init__(self, loss: Any, check: Callable[[Any], None] | None = None) -> None:
        self.loss, self.check = loss, check
        self._built: dict[str, Any] = {}

    def __call__(self, loss: Any = None) -> Any:
        loss = loss or self.loss
        key = loss.model_dump_json()
        if key not in self._built:
            if self.check is not None:
                self.check(loss)
            self._built[key] = loss.payload_config()
        return self._built[key]
