"""A teacher store's format, its ``meta.json`` and the check that a job may read it, in one place.

``mlot teach`` writes the meta (:meth:`StoreMeta.write`), the job's driver checks it before training
(:func:`check_store`), and the store reader (``workers.teacher.store.StoreTeacher``) serves from it; all three
read the same :class:`StoreMeta`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

from specs import UserError, storage

STORE_VERSION = 2  # 2: payload stores keep the gold tokens' log-probabilities
META = "meta.json"
HEAD = "head.safetensors"
PAYLOAD, HIDDEN = "payload", "hidden"
FORMATS = (PAYLOAD, HIDDEN)


@dataclass
class StoreMeta:
    """What made a store, and how far it got.

    Attributes:
        identity: what its outputs depend on (:func:`store_identity`).
        format: ``payload`` (ranked top-k of the settings it was made with) or ``hidden`` (final hidden states
            and the LM head: any settings).
        compress: ``fp16`` or None (payload format); hidden_dtype: ``bfloat16`` / ``float32`` (hidden format).
        payload_settings: the teacher settings of the payload format's loss (``MultiLevelOTConfig.teacher_settings``).
        complete: every shard is written; rows: how many (set when complete).
    """

    teacher: str
    identity: dict[str, Any]
    format: str
    vocab_size: int
    data_fingerprint: str
    compress: str | None = None
    hidden_dtype: str | None = None
    payload_settings: dict[str, Any] | None = None
    version: int = STORE_VERSION
    complete: bool = False
    rows: int | None = field(default=None, compare=False)

    def same_recipe(self, other: StoreMeta) -> bool:
        """Made by the same teacher, data and settings (progress aside)."""
        mine, theirs = asdict(self), asdict(other)
        return all(mine[k] == theirs[k] for k in mine if k not in ("complete", "rows"))

    def write(self, store: str) -> None:
        storage.write_text(storage.join(store, META), json.dumps(asdict(self), indent=1))

    @classmethod
    def read(cls, store: str, where: str = "the store") -> StoreMeta:
        """The meta of ``store``; a clear error when there is none or it is of another format version."""
        path = storage.join(store, META)
        if not storage.exists(path):
            raise UserError(f"{where}: {store!r} is not a teacher store (no {META}); "
                            "make it with: mlot teach CONFIG --out DIR")
        raw = json.loads(storage.read_text(path))
        if raw.get("version") != STORE_VERSION:
            raise UserError(f"{where}: {store!r} has store format version {raw.get('version')!r}, this mlot reads "
                            f"{STORE_VERSION}; teach it again")
        return cls(**raw)


def shard_path(store: str, split: str, shard: int) -> str:
    return storage.join(store, split, f"shard-{shard:05d}.arrow")


def check_format(fmt: str, mode: str, where: str = "--format") -> None:
    """Refuse a store format the job's ``loss.mode`` cannot be served from."""
    if fmt not in FORMATS:
        raise UserError(f"{where} {fmt!r}: one of {', '.join(FORMATS)}")
    if fmt == PAYLOAD and mode == "reference":
        raise UserError(f"{where}: a payload store cannot serve loss.mode reference (its columns are ranked per "
                        "micro-batch); make the store with --format hidden")


def store_identity(job: Any, teacher: Any) -> dict[str, Any]:
    """What a store's outputs depend on, apart from the rows themselves (each row carries its tokens' hash):
    the teacher's model, weights recipe and dtype, its tokenizer (full serialisation) and template, and the
    data source and length limits. Not the student: any student can read the store."""
    from workers.data.prepared import tokenizer_fingerprint
    from workers.models import load_tokenizer

    model = teacher.model_dump(mode="json", include={"model", "hf_config", "dtype", "pretrain", "trust_remote_code"})
    if teacher.hf_config or teacher.pretrain.steps:  # random initial weights: the seed makes them
        model["seed"] = job.train.seed
    d = job.data
    return {"teacher": model,
            "tokenizer": tokenizer_fingerprint(load_tokenizer(teacher.tokenizer_name, teacher.trust_remote_code)),
            "template": teacher.template.model_dump(mode="json"),
            "data": d.model_dump(mode="json", include={"source", "name", "columns", "max_prompt_length",
                                                       "max_answer_length"})}


def check_store(job: Any, teacher: Any) -> StoreMeta:
    """The store's meta, after refusing a store this job (a ``JobConfig``) cannot read, naming what differs."""
    where = f"teachers[{teacher.name}].store"
    meta = StoreMeta.read(teacher.store, where)
    if not meta.complete:
        raise UserError(f"{where}: {teacher.store!r} is unfinished; run mlot teach again with the same config and "
                        "--out to finish it")
    want = store_identity(job, teacher)
    diff = [k for k in want if meta.identity.get(k) != want[k]]
    if diff:
        detail = "; ".join(f"{k}: store {_short(meta.identity.get(k))}, job {_short(want[k])}" for k in diff)
        raise UserError(f"{where}: {teacher.store!r} was made with another {', '.join(diff)} ({detail}); "
                        "teach this job's teacher again")
    check_format(meta.format, job.loss.mode, where)
    if meta.format == PAYLOAD:
        check_payload_settings(teacher.name, meta, job.loss)
    return meta


def check_payload_settings(name: str, meta: StoreMeta, loss: Any) -> None:
    """Refuse a payload store for a loss (a ``LossConfig``) whose payload it does not hold."""
    wanted = loss.payload_config().teacher_settings()
    if meta.payload_settings != wanted:
        diff = {k: (meta.payload_settings.get(k), wanted.get(k)) for k in sorted({*meta.payload_settings, *wanted})
                if meta.payload_settings.get(k) != wanted.get(k)}
        raise UserError(f"teacher {name}: its store holds payloads for other loss settings "
                        + ", ".join(f"{k}: store {a!r}, job {b!r}" for k, (a, b) in diff.items())
                        + "; teach again with these settings, or make the store with --format hidden (exact for any "
                        "settings)")
    identity = loss.spec.identity_config(loss.params)
    for param, on in (("shared_weight", identity.shared), ("projection_weight", identity.projection)):
        if on:
            raise UserError(f"teacher {name}: loss.params.{param} needs the teacher's distribution over the student's "
                            "vocabulary classes, which a payload store does not keep: make the store with --format "
                            f"hidden (exact for any student), or set {param} to 0 (chunk_weight works from a payload "
                            "store)")


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= 80 else f"{text[:60]}... (sha {hashlib.sha256(text.encode()).hexdigest()[:8]})"
