"""A job's rows, tokenised once for the student and every teacher, cached as memory-mapped Arrow.

:func:`prepare` reads the source with HF ``datasets`` (memory-mapped Arrow: local files, ``save_to_disk``
folders, the hub), then runs *one* ``datasets.map`` pass over ``num_proc`` processes that maps columns to
template fields, cuts each answer once for every model (:mod:`workers.data.answer_cut`), encodes the row with
every model's tokenizer and template and marks rows that cannot be encoded. It splits train/eval (seeded),
leaves bad rows out (or names the first one's file and line) and saves the result under
``<cache_dir>/<fingerprint>``. A later run with the same inputs (a rerun, a sweep's trials) opens that
folder and tokenises nothing.

Training workers and teacher actors open the folder (:meth:`PreparedData.open`) and read rows *by index*:
a batch is a list of row indices, so what a worker trains on stays a pure function of (seed, rank, step),
a teacher request carries indices instead of text, and nothing is tokenised on the training step or in the
request path. No process holds the dataset as Python objects.

Why ``datasets.map`` rather than Ray Data: the pass runs before Ray starts (placement checks and the
schedule need the row counts), its output is one memory-mapped folder that any process opens with random
access by index (Ray Data's streaming split hands each worker an iterator in its own order, which would
break the seeded order that resume and reference mode rely on), and it needs no cluster resources.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from mlot.spans import IGNORE_INDEX
from specs import UserError, storage
from workers.data.answer_cut import encode_for_all
from workers.data.encoding import ANSWER_CUT, BadRowError, collate
from workers.data.tasks import RECORD, check_columns, load_records, map_columns

FORMAT = 2  # bump when what is stored (or how it is computed) changes: old caches then miss
STUDENT = "student"
META = "mlot.json"  # written last: a folder without it is an interrupted build


def teacher_key(name: str) -> str:
    """A teacher's key in the prepared data (teacher names cannot contain '@', the student's is ``student``)."""
    return f"teacher.{name}"


def _col(key: str, what: str) -> str:
    return f"{what}@{key}"


def row_hash(ids: Sequence[int], prompt_len: int) -> int:
    """Identity of a row in one model's tokens (its ids and where its answer starts), as an int64: what a
    teacher store checks a job's rows against (``workers.teacher.store``)."""
    digest = hashlib.blake2b(np.asarray([prompt_len, *ids], dtype=np.int64).tobytes(), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


@dataclass(frozen=True)
class DataRef:
    """Where a job's prepared data lies (a local folder or a storage URI) and what it holds. Picklable:
    the driver hands it to workers and teachers."""

    path: str
    fingerprint: str
    sizes: dict[str, int]  # rows per split ("train", "eval")
    origins: dict[str, str]  # the source split each split's rows come from (a row is (origin, record) there)
    counts: dict[str, int]  # "skipped" (bad rows left out), "truncated" (answers cut for every model)
    cache_hit: bool = False
    seconds: float = 0.0  # spent preparing (tokenising, or opening the cache)


@dataclass(frozen=True)
class Rows:
    """Rows of one split of prepared data, by index: what a training batch or a teacher request names."""

    data: DataRef
    split: str
    indices: tuple[int, ...]

    def key(self) -> str:
        return f"{self.data.fingerprint}/{self.split}/{','.join(map(str, self.indices))}"


# ---------------------------------------------------------------------------- building


@dataclass(frozen=True)
class Model:
    """One model's view of the rows: its key in the prepared data, tokenizer spec and template."""

    key: str
    tokenizer: str
    trust_remote_code: bool
    template: Any  # specs.Template


def job_models(job: Any) -> list[Model]:
    """The student and every teacher of a job, as :class:`Model`s."""
    return [Model(STUDENT, job.student.tokenizer_name, job.student.trust_remote_code, job.student.template),
            *(Model(teacher_key(t.name), t.tokenizer_name, t.trust_remote_code, t.template) for t in job.teachers)]


def data_inputs(job: Any) -> dict[str, Any]:
    """What of a job's config its prepared data depends on (the data section, every model's tokenizer spec and
    template, the split seed): jobs that agree on it can share one prepared copy (a sweep's trials)."""
    d = job.data
    return {"data": d.model_dump(mode="json", exclude={"num_proc", "cache_dir"}),
            "split_seed": None if d.eval_split else job.train.seed,
            "models": [(m.key, m.tokenizer, m.trust_remote_code, m.template.model_dump(mode="json"))
                       for m in job_models(job)]}


def prepare(job: Any, cache_dir: str, num_proc: int | None = None, say: Any = print) -> DataRef:
    """Tokenise the job's data for every model once, or open the cached result of an identical earlier pass.

    Args:
        job: a JobConfig (``data``, ``student``, ``teachers``, ``train.seed``).
        cache_dir: a local folder or storage URI that every node of the job can read.
        num_proc: tokenising processes (None: 1 below 10,000 rows, else up to 8, one per CPU).

    Raises:
        BadRowError: under ``data.on_bad_row: error``, the first bad row in file order (its file and line).
        UserError: no usable training rows; a source that cannot be read.
    """
    t0 = time.perf_counter()
    d, models = job.data, job_models(job)
    splits = {}
    for name, split in (("train", d.train_split), ("eval", d.eval_split)):
        if split:
            splits[name], available, label = load_records(d.source, d.name, split, d.limit)
            check_columns(d.columns, available, label)
    fp = fingerprint(job, models, {k: _source_key(d.source, ds) for k, ds in splits.items()})
    origins = {"train": d.train_split, "eval": d.eval_split or d.train_split}
    path = storage.join(cache_dir, fp)
    if storage.exists(storage.join(path, META)):
        meta = json.loads(storage.read_text(storage.join(path, META)))
        return DataRef(path, fp, meta["sizes"], origins, meta["counts"], True, time.perf_counter() - t0)
    local = _local_dir(path, fp)
    build = Path(tempfile.mkdtemp(prefix=f"{fp}.", dir=Path(local).parent))
    try:
        sizes, counts = _build(job, models, splits, build, num_proc, say)
        Path(build, META).write_text(json.dumps({"format": FORMAT, "fingerprint": fp, "sizes": sizes,
                                                  "counts": counts, "source": d.source}))
        if not Path(local, META).exists():  # another job may have finished the same pass meanwhile
            shutil.rmtree(local, ignore_errors=True)
            os.replace(build, local)
        if storage.is_uri(path):
            storage.upload(local, path)
    finally:
        shutil.rmtree(build, ignore_errors=True)
    return DataRef(path, fp, sizes, origins, counts, False, time.perf_counter() - t0)


def fingerprint(job: Any, models: list[Model], sources: dict[str, str]) -> str:
    """Everything the prepared data depends on: the source's content, the column mapping and split, every
    model's tokenizer (its full serialisation, not only its name) and template, the length limits."""
    from workers.models import load_tokenizer

    d = job.data
    keep = {
        "format": FORMAT, "sources": sources,
        "data": d.model_dump(mode="json", exclude={"num_proc", "cache_dir", "source"}),
        "split_seed": None if d.eval_split else job.train.seed,
        "models": [(m.key, tokenizer_fingerprint(load_tokenizer(m.tokenizer, m.trust_remote_code)),
                    m.template.model_dump(mode="json")) for m in models],
    }
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:20]


def tokenizer_fingerprint(tok: Any) -> str:
    """A hash of everything that decides how ``tok`` encodes text."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        # Calls set the backend's truncation and padding state: not part of what the tokenizer *is*.
        spec = {k: v for k, v in json.loads(backend.to_str()).items() if k not in ("truncation", "padding")}
        body = json.dumps(spec, sort_keys=True)
    else:
        body = json.dumps(sorted(tok.get_vocab().items()))
    extra = json.dumps([getattr(tok, "chat_template", None), tok.all_special_ids, tok.eos_token_id,
                        tok.bos_token_id, tok.pad_token_id], default=str)
    return hashlib.sha256((body + extra).encode()).hexdigest()


def _source_key(source: str, ds: Any) -> str:
    # datasets fingerprints file sources by their paths and modification times, save_to_disk folders by
    # their stored state; a builtin dataset is generated by code (its version is FORMAT's business).
    return source if source.startswith("builtin:") else ds._fingerprint


def _build(job: Any, models: list[Model], splits: dict[str, Any], out: Path, num_proc: int | None,
           say: Any) -> tuple[dict[str, int], dict[str, int]]:
    """Encode, split, drop or report bad rows, save to ``out`` as a DatasetDict. Returns (sizes, counts)."""
    import datasets

    d = job.data
    encoded = {name: _encode(ds, job, models, out / f"{name}.encoded.arrow", num_proc, say)
               for name, ds in splits.items()}
    if not d.eval_split:  # hold out a seeded eval_fraction of the training split, as indices
        order = list(range(len(encoded["train"])))
        random.Random(job.train.seed).shuffle(order)
        n_eval = int(len(order) * d.eval_fraction)
        parts = {"train": (encoded["train"], order[n_eval:]), "eval": (encoded["train"], order[:n_eval])}
    else:
        parts = {name: (ds, list(range(len(ds)))) for name, ds in encoded.items()}
    kept, counts = {}, {"skipped": 0, "truncated": 0}
    for name, (ds, order) in parts.items():
        bad, cut = set(_positions(ds, _is_bad)), set(_positions(ds, _is_cut))
        if bad and d.on_bad_row == "error":
            raise _first_error(ds, min(bad), d.source)
        good = [i for i in order if i not in bad]
        if len(good) < len(order):
            examples = sorted(ds[i][RECORD] for i in order if i in bad)[:5]
            say(f"data: {name}: skipped {len(order) - len(good)} bad row(s) (data.on_bad_row=skip), "
                f"e.g. records {examples}")
        counts["skipped"] += len(order) - len(good)
        counts["truncated"] += sum(i in cut for i in good)
        kept[name] = ds.select(good).remove_columns(["bad", "bad_field"])
    if not len(kept["train"]):
        raise UserError(f"data.source {d.source!r}: no usable training rows")
    # An empty split (eval_fraction: 0) has no Arrow file to save: it is left out (``PreparedData.size`` is 0).
    datasets.DatasetDict({name: ds for name, ds in kept.items() if len(ds)}).save_to_disk(str(out / "splits"))
    for name in encoded:
        for f in out.glob(f"{name}.encoded*.arrow"):
            f.unlink()
    if counts["truncated"]:
        say(f"data: {counts['truncated']} answer(s) cut to fit data.max_answer_length={d.max_answer_length} "
            "tokens in every model (the same text on every side)")
    return {name: len(ds) for name, ds in kept.items()}, counts


def _encode(ds: Any, job: Any, models: list[Model], cache_file: Path, num_proc: int | None, say: Any) -> Any:
    """One datasets.map pass: template fields, cut answer, every model's ids, bad-row marks."""
    import datasets

    d = job.data
    n = num_proc or (1 if len(ds) < 10_000 else max(1, min(8, os.cpu_count() or 1)))
    n = min(n, max(1, len(ds)))
    say(f"data: tokenising {len(ds)} rows for {len(models)} model(s) with {n} process(es)")
    list_fields = [f for f, c in d.columns.items() if _is_list(ds.features, c)]
    features = datasets.Features({
        RECORD: datasets.Value("int64"), ANSWER_CUT: datasets.Value("bool"),
        "bad": datasets.Value("string"), "bad_field": datasets.Value("string"),
        **{f: datasets.Value("string") for f in d.columns},
        **{f"{f}_all": datasets.List(datasets.Value("string")) for f in {*list_fields, "answer"}},
        **{_col(m.key, "ids"): datasets.List(datasets.Value("int32")) for m in models},
        **{_col(m.key, "prompt_len"): datasets.Value("int32") for m in models},
        **{_col(m.key, "hash"): datasets.Value("int64") for m in models},
    })
    spec = {"columns": d.columns, "list_fields": list_fields, "models": models,
            "max_prompt": d.max_prompt_length, "max_answer": d.max_answer_length}
    return ds.map(_encode_row, with_indices=True, fn_kwargs={"spec": spec}, num_proc=n if n > 1 else None,
                  remove_columns=ds.column_names, features=features, cache_file_name=str(cache_file),
                  desc="tokenising")


def _is_list(features: Any, column: str) -> bool:
    import datasets

    feature: Any = features
    for part in column.split("."):
        if isinstance(feature, (dict, datasets.Features)) and part in feature:
            feature = feature[part]
        else:
            return False
    return isinstance(feature, (list, datasets.List, datasets.LargeList, datasets.Sequence))


def _encode_row(record: dict[str, Any], index: int, spec: dict[str, Any]) -> dict[str, Any]:
    from workers.models import load_tokenizer  # cached per process

    models = spec["models"]
    row = map_columns(record, spec["columns"], index)
    out: dict[str, Any] = {RECORD: index, ANSWER_CUT: False, "bad": "", "bad_field": "",
                           **{f: row[f] if isinstance(row[f], str) else None for f in spec["columns"]}}
    for f in {*spec["list_fields"], "answer"}:
        golds = row.get(f"{f}_all") or ([row[f]] if f == "answer" else [])
        out[f"{f}_all"] = [g for g in golds if isinstance(g, str)]
    tokenizers = [(load_tokenizer(m.tokenizer, m.trust_remote_code), m.template) for m in models]
    try:
        row, cut, encoded = encode_for_all(row, tokenizers, spec["max_prompt"], spec["max_answer"], index=index)
    except BadRowError as e:
        return {**out, "bad": e.reason, "bad_field": e.field,
                **{_col(m.key, what): empty for m in models for what, empty in (("ids", []), ("prompt_len", 0),
                                                                                 ("hash", 0))}}
    out.update({ANSWER_CUT: cut, "answer": row["answer"]})
    for m, (ids, labels) in zip(models, encoded):
        out[_col(m.key, "ids")] = ids
        out[_col(m.key, "prompt_len")] = n_prompt = sum(label == IGNORE_INDEX for label in labels)
        out[_col(m.key, "hash")] = row_hash(ids, n_prompt)
    return out


def _is_bad(table: Any) -> Any:
    import pyarrow.compute as pc
    return pc.not_equal(table.column("bad"), "")


def _is_cut(table: Any) -> Any:
    return table.column(ANSWER_CUT)


def _positions(ds: Any, where: Any) -> list[int]:
    """Positions of ``ds`` (a map output: no indices mapping) where the Arrow predicate holds."""
    import pyarrow.compute as pc
    return pc.indices_nonzero(where(ds.data)).to_pylist()


def _first_error(ds: Any, position: int, source: str) -> BadRowError:
    row = ds[position]
    record = row[RECORD]
    return BadRowError(record, row["bad_field"], f"{row['bad']} ({_place(source, record)}; data.on_bad_row: skip "
                       "leaves such rows out)")


def _place(source: str, record: int) -> str:
    """Where record ``record`` (0-based, file order) sits in ``source``: a line number for JSON lines."""
    path = Path(source)
    if path.suffix.lower() == ".jsonl" and path.is_file():
        with path.open(encoding="utf-8", errors="replace") as f:
            seen = -1
            for line_no, line in enumerate(f, 1):
                seen += bool(line.strip())
                if seen == record:
                    return f"{source}, line {line_no}"
    return f"record {record} of data.source {source!r}, 0-based in file order"


# ---------------------------------------------------------------------------- reading

_OPEN: dict[tuple[str, str], PreparedData] = {}


def _local_dir(path: str, fp: str) -> str:
    """The local folder of prepared data at ``path``: itself, or this node's copy of a URI."""
    if not storage.is_uri(path):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        return path
    local = storage.node_cache("data", fp)
    local.parent.mkdir(parents=True, exist_ok=True)
    return str(local)


def open_data(ref: DataRef) -> PreparedData:
    """This process's one open copy of ``ref`` (workers and teachers open it once, then read by index)."""
    key = (ref.path, ref.fingerprint)
    if key not in _OPEN:
        _OPEN[key] = PreparedData(ref)
    return _OPEN[key]


class PreparedData:
    """Prepared data opened for reading by index: the splits' Arrow files, memory-mapped (opening copies nothing).

    Read with pyarrow alone: training workers and teacher actors need not import ``datasets``.
    """

    def __init__(self, ref: DataRef) -> None:
        self.ref = ref
        if storage.is_uri(ref.path):
            local = storage.node_copy(ref.path, "data", ref.fingerprint)
        elif Path(ref.path, META).exists():
            local = ref.path
        else:
            raise UserError(f"prepared data {ref.path} is not on this node: set data.cache_dir to a folder "
                            "every node shares, or a URI (s3://, gs://, ...)")
        self.tables = {split: _read_split(folder) for split in ("train", "eval")
                       if (folder := Path(local, "splits", split)).is_dir()}

    def size(self, split: str) -> int:
        return self.tables[split].num_rows if split in self.tables else 0

    def _take(self, split: str, indices: Sequence[int], columns: list[str]) -> dict[str, list[Any]]:
        import pyarrow as pa
        return self.tables[split].select(columns).take(pa.array(list(indices), pa.int64())).to_pydict()

    def examples(self, split: str, indices: Sequence[int], key: str) -> list[tuple[list[int], list[int]]]:
        """``(input_ids, labels)`` of rows ``indices`` in model ``key``'s tokens (labels -100 on the prompt)."""
        got = self._take(split, indices, [_col(key, "ids"), _col(key, "prompt_len")])
        return [(ids, [IGNORE_INDEX] * n + ids[n:]) for ids, n in zip(got[_col(key, "ids")],
                                                                      got[_col(key, "prompt_len")])]

    def batch(self, split: str, indices: Sequence[int], key: str, pad_id: int) -> dict[str, Any]:
        """A left-padded batch (:func:`workers.data.encoding.collate`) of rows ``indices`` for model ``key``."""
        return collate(self.examples(split, indices, key), pad_id)

    def column(self, split: str, name: str) -> np.ndarray:
        """A whole scalar column of a split as an array: ``RECORD``, or ``hash@<model key>``."""
        return self.tables[split].column(name).to_numpy()

    def hashes(self, split: str, key: str) -> np.ndarray:
        """[n] int64: :func:`row_hash` of every row of ``split`` in model ``key``'s tokens."""
        return self.column(split, _col(key, "hash"))

    def records(self, split: str, indices: Sequence[int]) -> list[int]:
        """The rows' places in their source split (file order, 0-based)."""
        return self._take(split, indices, [RECORD])[RECORD]

    def rows(self, split: str, indices: Sequence[int]) -> list[dict[str, Any]]:
        """The rows' text fields (template fields, ``answer_all``, the cut mark, the record number)."""
        got = self._take(split, indices, [c for c in self.tables[split].column_names if "@" not in c])
        return [dict(zip(got, values)) for values in zip(*got.values())]


def _read_split(folder: Path) -> Any:
    """One split written by ``datasets.save_to_disk``: Arrow stream files, memory-mapped and concatenated."""
    import pyarrow as pa

    files = sorted(folder.glob("*.arrow"))
    return pa.concat_tables([pa.ipc.open_stream(pa.memory_map(str(f))).read_all() for f in files])
