"""A teacher output store: one teacher's outputs on every row of a job, written once, read by any student.

A MultiLevelOT payload lives in the teacher's own token space, so it does not depend on the student's
tokenizer: students with other tokenizers, and a sweep's trials, can all train from one store.

Layout of one teacher's store (a local folder or a storage URI)::

    meta.json                    what made it (teacher, tokenizer, template, data, format, payload settings)
    head.safetensors             the LM head, saved once (format ``hidden``)
    <split>/shard-00000.arrow    Arrow IPC files (memory-mapped when read), a row per data row

Rows are keyed by ``(origin, record)``: the source split and the row's place in it, which do not depend on
any tokenizer. Each row also keeps a hash of the teacher's token ids, so a job whose teacher tokens differ
(another template, length limit or answer cut) is refused instead of trained on the wrong outputs.

Formats:

* ``payload``: the ranked top-k probabilities (+ SD shift) of ``mlot.compress_teacher``, exact for the
  settings it was made with, and the log-probability of each gold answer token (what the aligned-chunk
  term of ``mlot.identity`` needs; not the exact-match term's shared classes, which depend on the student's
  vocabulary). Paper mode only: reference mode ranks columns per micro-batch.
  ``compress="fp16"`` halves the probabilities (relative error <= 2**-11 each).
* ``hidden``: the final hidden states of the answer rows plus the LM head: logits are recomputed on read,
  so the payload is exact for *any* temperature / top-k / mode (in ``float32``; ``bfloat16`` rounds), and
  for both identity-aware terms, for any student.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

import mlot
from mlot.spans import IGNORE_INDEX
from specs import UserError, storage
from workers.data.prepared import DataRef, Rows, open_data, teacher_key
from workers.serving import PayloadReply, PayloadSettings, ServerInfo, node_id
from workers.teacher.extras import Extras
from workers.teacher.store_format import HEAD, HIDDEN, META, PAYLOAD, StoreMeta, check_payload_settings

_HIDDEN_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


# ---------------------------------------------------------------------------- writing (inside a teacher actor)


def payload_columns(payload: mlot.TeacherPayload, token_logp: torch.Tensor, compress: str | None
                    ) -> dict[str, list[Any]]:
    """Per-row columns of a paper-mode batch payload and its gold tokens' log-probabilities [B, T]
    (``mlot.identity.gold_log_probs``, float32): row b keeps its ``lengths[b]`` answer rows."""
    dtype = np.float16 if compress == "fp16" else np.float32
    out: dict[str, list[Any]] = {"length": [], "probs": [], "sd_log_shift": [], "columns": [], "token_logp": []}
    for b, n in enumerate(payload.lengths.tolist()):
        out["length"].append(n)
        out["token_logp"].append(token_logp[b, :n].cpu().numpy().astype(np.float32))
        out["probs"].append(payload.probs[b, :n].cpu().numpy().astype(dtype).ravel())
        sd = payload.sd_log_shift
        out["sd_log_shift"].append(None if sd is None else sd[b, :n].cpu().numpy().astype(np.float32))
        cols = payload.columns[b] if payload.columns.dim() == 2 else payload.columns[b, :n]
        out["columns"].append(cols.cpu().numpy().astype(np.int32).ravel())
    return out


def hidden_columns(hidden: torch.Tensor, labels: torch.Tensor, dtype: str) -> dict[str, list[Any]]:
    """Per-row columns of answer-window hidden states [B, K, H]: row b keeps its last ``n_b + 1`` rows (the
    one before its first answer token through its last) and their labels."""
    out: dict[str, list[Any]] = {"length": [], "hidden": [], "labels": []}
    for b in range(hidden.shape[0]):
        n = int((labels[b] != IGNORE_INDEX).sum())
        rows = hidden[b, -(n + 1):].to(_HIDDEN_DTYPES[dtype]).contiguous().cpu()
        out["length"].append(n)
        out["hidden"].append(rows.view(torch.uint8).numpy().tobytes())
        out["labels"].append(labels[b, -(n + 1):].cpu().numpy().astype(np.int32))
    return out


def write_shard(path: str, columns: dict[str, list[Any]]) -> int:
    """Write one shard as an Arrow IPC file, atomically (a shard that exists is complete). Returns its bytes."""
    import pyarrow as pa

    table = pa.table(columns)
    sink = io.BytesIO()
    with pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    data = sink.getvalue()
    if storage.is_uri(path):
        import pyarrow.fs

        fs, p = pyarrow.fs.FileSystem.from_uri(path)
        fs.create_dir(p.rsplit("/", 1)[0], recursive=True)
        with fs.open_output_stream(f"{p}.{os.getpid()}.tmp") as f:
            f.write(data)
        fs.move(f"{p}.{os.getpid()}.tmp", p)  # only a whole shard ever has the shard's name
    else:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        Path(tmp).write_bytes(data)
        os.replace(tmp, path)
    return len(data)


# ---------------------------------------------------------------------------- reading


class _Shard:
    """One shard's columns as numpy views of the memory-mapped file (no per-row Arrow objects on the read path)."""

    def __init__(self, path: Path) -> None:
        import pyarrow as pa

        table = pa.ipc.open_file(pa.memory_map(str(path))).read_all()
        self.rows = table.num_rows
        self.keys = list(zip(table.column("origin").to_pylist(), table.column("record").to_pylist()))
        self.hash = table.column("row_hash").to_numpy()
        self.length = table.column("length").to_numpy()
        self.lists: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for name in ("probs", "sd_log_shift", "columns", "token_logp", "labels", "hidden"):
            if name in table.column_names:
                arr = table.column(name).combine_chunks()
                if arr.null_count < len(arr):  # an all-null column: SD off
                    self.lists[name] = _offsets_values(arr)

    def get(self, name: str, row: int) -> np.ndarray | None:
        if name not in self.lists:
            return None
        offsets, values = self.lists[name]
        return values[offsets[row]:offsets[row + 1]]


def _offsets_values(arr: Any) -> tuple[np.ndarray, np.ndarray]:
    import pyarrow as pa

    if pa.types.is_binary(arr.type):  # buffers: validity, int32 offsets, bytes
        offsets = np.frombuffer(arr.buffers()[1], dtype=np.int32)[arr.offset:arr.offset + len(arr) + 1]
        return offsets, np.frombuffer(arr.buffers()[2], dtype=np.uint8)
    return arr.offsets.to_numpy(), arr.values.to_numpy(zero_copy_only=False)


class StoreTeacher:
    """Serves a teacher's payloads from its store (a ``workers.serving.TeacherServer``, like a live
    ``workers.teacher.actor.TeacherActor``): the students cannot tell it from a live teacher. Needs no GPU.

    A job's rows are matched to the store once per (prepared data, split): by key, and by the hash of the
    teacher's tokens (refused where they differ); a request then only gathers rows.

    Args:
        teacher: the job's ``TeacherConfig`` (``store`` set); its key in the prepared data is its name.
        loss: the job's ``LossConfig``: the payload settings a request without its own loss gets.
        student: the job's ``StudentConfig``, for the identity-aware terms (as ``TeacherActor``).
    """

    def __init__(self, teacher: Any, loss: Any, student: Any = None) -> None:
        self.name, self.key, self.loss = teacher.name, teacher_key(teacher.name), loss
        self.extras = Extras(teacher, student, self.key)
        self.root = _local_root(teacher.store)
        self.meta = StoreMeta.read(self.root)
        self.shards = [_Shard(p) for p in sorted(Path(self.root).glob("*/shard-*.arrow"))]
        self.starts = np.cumsum([0] + [s.rows for s in self.shards])
        self.index = {key: int(start) + i for shard, start in zip(self.shards, self.starts)
                      for i, key in enumerate(shard.keys)}
        self.hashes = np.concatenate([s.hash for s in self.shards]) if self.shards else np.zeros(0, np.int64)
        self.head: torch.Tensor | None = None
        if self.meta.format == HIDDEN:
            from safetensors.torch import load_file
            self.head = load_file(str(Path(self.root, HEAD)))["weight"]
        check = (lambda loss: check_payload_settings(self.name, self.meta, loss)) if self.meta.format == PAYLOAD \
            else None
        self.settings = PayloadSettings(loss, check)
        self._located: dict[tuple[str, str, str], np.ndarray] = {}
        self.served_rows = self.served_requests = 0

    def info(self) -> ServerInfo:
        return ServerInfo(name=self.name, device="store", dtype=self.meta.hidden_dtype or PAYLOAD,
                          vocab_size=self.meta.vocab_size, node_id=node_id(), padded_rows=0, forward_rows=0,
                          served_rows=self.served_rows, served_requests=self.served_requests, forwards=0, busy_s=0.0,
                          cached_batches=None, store=self.meta.format)

    def payload(self, rows: Rows, batch_id: Any = None, loss: Any = None, answers: list[Any] | None = None
                ) -> PayloadReply:
        """The payload of ``rows`` for ``loss`` (default the job's), as a live teacher computes it."""
        if answers is not None:
            raise ValueError(f"teacher {self.name}: a store holds outputs for the dataset's answers only, not the "
                             "student's own (the config refuses on-policy training from a store)")
        loss = loss or self.loss
        cfg = self.settings(loss)
        found = [self._row(int(g)) for g in self._locate(rows.data, rows.split)[list(rows.indices)]]
        if self.meta.format == PAYLOAD:
            payload = self._stored_payload(found)
            self.extras.add(payload, loss, rows, token_logp=self._token_logp(found, payload.lengths))
        else:
            logits, labels = self._hidden_logits(found)
            payload = mlot.compress_teacher(logits, labels, config=cfg)
            self.extras.add(payload, loss, rows, logits=logits, labels=labels)
        self.served_rows += len(found)
        self.served_requests += 1
        return PayloadReply(payload=payload.to_numpy(), batch_id=batch_id, seconds=0.0,
                            answer_tokens=int(payload.lengths.sum()))

    def _row(self, g: int) -> tuple[_Shard, int]:
        s = int(np.searchsorted(self.starts, g, side="right")) - 1
        return self.shards[s], g - int(self.starts[s])

    def _locate(self, data: DataRef, split: str) -> np.ndarray:
        """[n] store row of every row of ``split`` in ``data``; refuses rows the store lacks or holds in other
        tokens (checked once for the whole split)."""
        key = (data.path, data.fingerprint, split)
        if key not in self._located:
            opened, origin = open_data(data), data.origins[split]
            records = opened.column(split, "__record__")
            where = np.array([self.index.get((origin, int(r)), -1) for r in records], dtype=np.int64)
            if (where < 0).any():
                record = int(records[np.flatnonzero(where < 0)[0]])
                raise UserError(f"teacher {self.name}: its store has no row {record} of split {origin!r} "
                                f"(made from {self.meta.identity['data']['source']!r}); run mlot teach for this "
                                "job's data")
            differ = np.flatnonzero(self.hashes[where] != opened.hashes(split, self.key))
            if len(differ):
                raise UserError(f"teacher {self.name}: {len(differ)} row(s), e.g. row {int(records[differ[0]])} of "
                                f"split {origin!r}, have other teacher tokens in this job than in the store (another "
                                "template, length limit or answer cut, e.g. from a student tokenizer that cuts "
                                "answers elsewhere): run mlot teach for this job, or raise data.max_answer_length "
                                "so no answer is cut")
            self._located[key] = where
        return self._located[key]

    def _stored_payload(self, found: list[tuple[_Shard, int]]) -> mlot.TeacherPayload:
        lengths = [int(shard.length[row]) for shard, row in found]
        k, width = len(found[0][0].get("probs", found[0][1])) // lengths[0], max(lengths)
        token_cols = self.meta.payload_settings.get("ranking") == "token"
        probs = np.zeros((len(found), width, k), np.float32)
        sd = np.zeros((len(found), width), np.float32) if "sd_log_shift" in found[0][0].lists else None
        columns = np.zeros((len(found), width, k) if token_cols else (len(found), k), np.int32)
        for b, ((shard, row), n) in enumerate(zip(found, lengths)):
            probs[b, :n] = shard.get("probs", row).reshape(n, k)
            if sd is not None:
                sd[b, :n] = shard.get("sd_log_shift", row)
            columns[b] = _pad_rows(shard.get("columns", row), n, k, width) if token_cols else shard.get("columns", row)
        return mlot.TeacherPayload("paper", torch.from_numpy(probs), None if sd is None else torch.from_numpy(sd),
                                   torch.from_numpy(columns), torch.tensor(lengths),
                                   dict(self.meta.payload_settings))

    @staticmethod
    def _token_logp(found: list[tuple[_Shard, int]], lengths: torch.Tensor) -> torch.Tensor:
        """[B, T] the stored gold tokens' log-probabilities (0 past each row's answer)."""
        token_logp = torch.zeros(len(found), int(lengths.max()))
        for b, (shard, row) in enumerate(found):
            token_logp[b, :int(lengths[b])] = torch.from_numpy(shard.get("token_logp", row).copy())
        return token_logp

    def _hidden_logits(self, found: list[tuple[_Shard, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Answer-window logits and labels from the stored hidden rows: each row's padded on the left to the
        batch's window, as a live left-padded batch."""
        dtype = _HIDDEN_DTYPES[self.meta.hidden_dtype]
        h = self.head.shape[1]
        rows = [(torch.frombuffer(bytearray(shard.get("hidden", row)), dtype=dtype).reshape(-1, h),
                 torch.from_numpy(shard.get("labels", row).astype(np.int64))) for shard, row in found]
        window = max(r.shape[0] for r, _ in rows)
        hidden = torch.zeros(len(rows), window, h, dtype=self.head.dtype)
        labels = torch.full((len(rows), window), IGNORE_INDEX, dtype=torch.long)
        for b, (r, lab) in enumerate(rows):
            hidden[b, window - r.shape[0]:] = r.to(self.head.dtype)
            labels[b, window - r.shape[0]:] = lab
        with torch.no_grad():
            return torch.nn.functional.linear(hidden, self.head)[..., :self.meta.vocab_size], labels


def _pad_rows(values: np.ndarray, n: int, k: int, width: int) -> np.ndarray:
    out = np.zeros((width, k), np.int32)
    out[:n] = values.reshape(n, k)
    return out


def _local_root(store: str) -> str:
    """A local folder holding ``store``: itself, or for a URI this node's copy (made once per store content)."""
    if not storage.is_uri(store):
        if not Path(store, META).exists():
            raise UserError(f"teacher store {store!r} does not exist (no {META}); make it with mlot teach")
        return store
    if not storage.exists(storage.join(store, META)):
        raise UserError(f"teacher store {store!r} does not exist (no {META}); make it with mlot teach")
    digest = hashlib.sha256((store + storage.read_text(storage.join(store, META))).encode()).hexdigest()[:16]
    return storage.node_copy(store, "store", digest)  # per store content: a store taught again is copied again
