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
  settings it was made with. Paper mode only: reference mode ranks columns per micro-batch.
  ``compress="fp16"`` halves the probabilities (relative error <= 2**-11 each).
* ``hidden``: the final hidden states of the answer rows plus the LM head: logits are recomputed on read,
  so the payload is exact for *any* temperature / top-k / mode (in ``float32``; ``bfloat16`` rounds).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

import mlot
from mlot.spans import IGNORE_INDEX
from specs import UserError, storage
from workers.prepared import Rows, open_data

STORE_VERSION = 1
META = "meta.json"
HEAD = "head.safetensors"
_HIDDEN_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def row_hash(ids: list[int], prompt_len: int) -> int:
    """Identity of a row in a teacher's tokens (its ids and where the answer starts), as an int64."""
    digest = hashlib.blake2b(np.asarray([prompt_len, *ids], dtype=np.int64).tobytes(), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def shard_path(store: str, split: str, shard: int) -> str:
    return storage.join(store, split, f"shard-{shard:05d}.arrow")


# ---------------------------------------------------------------------------- writing (inside a teacher actor)


def payload_columns(payload: mlot.TeacherPayload, compress: str | None) -> dict[str, list[Any]]:
    """Per-row columns of a paper-mode batch payload: row b keeps its ``lengths[b]`` answer rows."""
    dtype = np.float16 if compress == "fp16" else np.float32
    out: dict[str, list[Any]] = {"length": [], "probs": [], "sd_log_shift": [], "columns": []}
    for b, n in enumerate(payload.lengths.tolist()):
        out["length"].append(n)
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
        with tempfile.TemporaryDirectory(prefix="mlot-shard-") as d:
            Path(d, "shard.arrow").write_bytes(data)
            _upload_file(Path(d, "shard.arrow"), path)
    else:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        Path(tmp).write_bytes(data)
        os.replace(tmp, path)
    return len(data)


def _upload_file(local: Path, uri: str) -> None:
    import pyarrow.fs

    fs, p = pyarrow.fs.FileSystem.from_uri(uri)
    fs.create_dir(p.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(p) as f:  # object stores publish a file only when it is closed: atomic
        f.write(local.read_bytes())


# ---------------------------------------------------------------------------- reading


class StoreTeacher:
    """Serves a teacher's payloads from its store, with the interface of ``workers.teacher.TeacherActor``
    (``payload``, ``info``): the students cannot tell it from a live teacher. Needs no GPU.

    Args:
        teacher: the job's ``TeacherConfig`` (``store`` set); its key in the prepared data is its name.
        loss: the job's ``LossConfig``: the payload settings a request without its own loss gets.
    """

    def __init__(self, teacher: Any, loss: Any) -> None:
        import pyarrow as pa

        from workers.prepared import teacher_key

        self.name, self.key, self.loss = teacher.name, teacher_key(teacher.name), loss
        self.root = _local_root(teacher.store)
        self.meta = json.loads(Path(self.root, META).read_text())
        self.tables: list[Any] = []
        self.index: dict[tuple[str, int], tuple[int, int]] = {}
        for shard in sorted(Path(self.root).glob("*/shard-*.arrow")):
            table = pa.ipc.open_file(pa.memory_map(str(shard))).read_all()
            for row, key in enumerate(zip(table.column("origin").to_pylist(), table.column("record").to_pylist())):
                self.index[key] = (len(self.tables), row)
            self.tables.append(table)
        self.head: torch.Tensor | None = None
        if self.meta["format"] == "hidden":
            from safetensors.torch import load_file
            self.head = load_file(str(Path(self.root, HEAD)))["weight"]
        self._configs: dict[str, Any] = {}
        self.served_rows = 0

    def info(self) -> dict[str, Any]:
        import ray
        return {"name": self.name, "device": "store", "dtype": self.meta.get("hidden_dtype") or "payload",
                "vocab_size": self.meta["vocab_size"], "padded_rows": 0, "forward_rows": 0,
                "node_id": ray.get_runtime_context().get_node_id() if ray.is_initialized() else None,
                "cached_batches": None, "served_rows": self.served_rows, "store": self.meta["format"]}

    def payload(self, rows: Rows, batch_id: Any = None, loss: Any = None) -> dict[str, Any]:
        """The payload of ``rows`` for ``loss`` (default the job's), as a live teacher computes it."""
        loss = loss or self.loss
        found = self._rows(rows)
        if self.meta["format"] == "payload":
            payload = self._stored_payload(found, loss)
        else:
            payload = self._from_hidden(found, loss)
        self.served_rows += len(found)
        return {"payload": payload.to_numpy(), "batch_id": batch_id, "seconds": 0.0,
                "answer_tokens": int(payload.lengths.sum())}

    def _rows(self, rows: Rows) -> list[tuple[Any, int]]:
        """(table, row) of each requested row; refuses rows the store lacks or holds in other tokens."""
        data = open_data(rows.data)
        origin = rows.data.origins[rows.split]
        records = data.records(rows.split, rows.indices)
        examples = data.examples(rows.split, rows.indices, self.key)
        found = []
        for record, (ids, labels) in zip(records, examples):
            at = self.index.get((origin, record))
            if at is None:
                raise UserError(f"teacher {self.name}: its store has no row {record} of split {origin!r} "
                                f"(made from {self.meta['data']['source']!r}); run mlot teach for this job's data")
            table, row = self.tables[at[0]], at[1]
            n_prompt = sum(label == IGNORE_INDEX for label in labels)
            if table.column("row_hash")[row].as_py() != row_hash(ids, n_prompt):
                raise UserError(f"teacher {self.name}: row {record} of split {origin!r} has other teacher tokens "
                                "in this job than in the store (another template, length limit or answer cut, "
                                "e.g. from a student tokenizer that cuts answers elsewhere): run mlot teach "
                                "for this job, or raise data.max_answer_length so no answer is cut")
            found.append((table, row))
        return found

    def _settings(self, loss: Any) -> Any:
        key = loss.model_dump_json()
        if key not in self._configs:
            self._configs[key] = loss.payload_config()
        return self._configs[key]

    def _stored_payload(self, found: list[tuple[Any, int]], loss: Any) -> mlot.TeacherPayload:
        cfg = self._settings(loss)
        if cfg.teacher_settings() != self.meta["payload_settings"]:
            raise UserError(payload_mismatch(self.name, self.meta["payload_settings"], cfg.teacher_settings()))
        lengths = [table.column("length")[row].as_py() for table, row in found]
        first, row0 = found[0]
        k, width = len(first.column("probs")[row0].values) // lengths[0], max(lengths)
        probs = torch.zeros(len(found), width, k)
        sd = torch.zeros(len(found), width) if first.column("sd_log_shift")[row0].is_valid else None
        token_cols = self.meta["payload_settings"].get("ranking") == "token"
        columns = torch.zeros((len(found), width, k) if token_cols else (len(found), k), dtype=torch.int32)
        for b, ((table, row), n) in enumerate(zip(found, lengths)):
            probs[b, :n] = _array(table, "probs", row).reshape(n, k)
            if sd is not None:
                sd[b, :n] = _array(table, "sd_log_shift", row)
            cols = _array(table, "columns", row)
            if token_cols:
                columns[b, :n] = cols.reshape(n, k)
            else:
                columns[b] = cols
        return mlot.TeacherPayload("paper", probs, sd, columns, torch.tensor(lengths),
                                   dict(self.meta["payload_settings"]))

    def _from_hidden(self, found: list[tuple[Any, int]], loss: Any) -> mlot.TeacherPayload:
        """Pad each row's hidden rows on the left to the batch's answer window, as a live left-padded batch."""
        dtype = _HIDDEN_DTYPES[self.meta["hidden_dtype"]]
        h = self.head.shape[1]
        rows = [(torch.frombuffer(bytearray(table.column("hidden")[row].as_py()), dtype=dtype).reshape(-1, h),
                 torch.from_numpy(_array(table, "labels", row).numpy().astype(np.int64))) for table, row in found]
        window = max(r.shape[0] for r, _ in rows)
        hidden = torch.zeros(len(rows), window, h, dtype=self.head.dtype)
        labels = torch.full((len(rows), window), IGNORE_INDEX, dtype=torch.long)
        for b, (r, lab) in enumerate(rows):
            hidden[b, window - r.shape[0]:] = r.to(self.head.dtype)
            labels[b, window - r.shape[0]:] = lab
        with torch.no_grad():
            logits = torch.nn.functional.linear(hidden, self.head)[..., :self.meta["vocab_size"]]
            return mlot.compress_teacher(logits, labels, config=self._settings(loss))


def payload_mismatch(name: str, stored: dict[str, Any], wanted: dict[str, Any]) -> str:
    diff = {k: (stored.get(k), wanted.get(k)) for k in sorted({*stored, *wanted}) if stored.get(k) != wanted.get(k)}
    return (f"teacher {name}: its store holds payloads for other loss settings "
            + ", ".join(f"{k}: store {a!r}, job {b!r}" for k, (a, b) in diff.items())
            + "; teach again with these settings, or make the store with --format hidden (exact for any settings)")


def _array(table: Any, column: str, row: int) -> torch.Tensor:
    values = table.column(column)[row].values.to_numpy(zero_copy_only=False)
    return torch.from_numpy(np.asarray(values, dtype=np.float32 if values.dtype == np.float16 else values.dtype))


def _local_root(store: str) -> str:
    """A local folder holding ``store``: itself, or for a URI this node's copy (made once per store content)."""
    if not storage.is_uri(store):
        if not Path(store, META).exists():
            raise UserError(f"teacher store {store!r} does not exist (no {META}); make it with mlot teach")
        return store
    import shutil

    if not storage.exists(storage.join(store, META)):
        raise UserError(f"teacher store {store!r} does not exist (no {META}); make it with mlot teach")
    digest = hashlib.sha256((store + storage.read_text(storage.join(store, META))).encode()).hexdigest()[:16]
    target = Path(tempfile.gettempdir(), "mlot-store", digest)
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f"{digest}.", dir=target.parent)
        with storage.local_copy(store) as local:
            shutil.copytree(local, tmp, dirs_exist_ok=True)
        os.replace(tmp, target)
    return str(target)
