"""Datasets: the generated quickstart task, and rows from local files or the hub.

Rows come back with the *template's* field names (``columns`` maps template field -> dataset
column), so :mod:`workers.data.encoding` never needs to know how a dataset names its columns.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from specs import DATA_FILE_FORMATS, UserError

#: Each row's position in its source (file order, 0-based), kept through shuffles for error messages.
RECORD = "__record__"

# --- the quickstart task ------------------------------------------------------------------------
#
# Facts about everyday things, asked in varied words and by varied people. Every row is a distinct
# (task, item, phrasing, name) combination, so held-out rows are new prompts: a model that merely
# memorised its training strings scores nothing on them; it has to map the item in a new sentence
# to the fact it learnt from other sentences (and ignore the name and wording). Answers are 1-4
# lower-case English words (the WordPiece tokenizer is uncased, so exact match needs no case
# folding), and the tokenizers split them differently (e.g. "wednesday", "cock a doodle doo").

_COLOUR = {
    "a banana": "yellow", "a lemon": "yellow", "a tomato": "red", "a strawberry": "red",
    "grass": "green", "a frog": "green", "the sky": "blue", "snow": "white", "milk": "white",
    "coal": "black", "a carrot": "orange", "chocolate": "brown",
}
_SOUND = {
    "a cow": "moo", "a dog": "woof", "a cat": "meow", "a duck": "quack", "a sheep": "baa",
    "a pig": "oink", "a lion": "roar", "an owl": "hoot", "a snake": "hiss",
    "a rooster": "cock a doodle doo",
}
_HOME = {
    "a fish": "in the water", "a bird": "in a nest", "a bee": "in a hive", "a cow": "on a farm",
    "a bear": "in a cave", "a monkey": "in the jungle",
}
_DAYS = ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"]
_OPPOSITE_PAIRS = [("hot", "cold"), ("big", "small"), ("fast", "slow"), ("happy", "sad"), ("light", "dark")]
_OPPOSITE = {a: b for a, b in _OPPOSITE_PAIRS} | {b: a for a, b in _OPPOSITE_PAIRS}

_NAMES = ["Anna", "Ben", "Chloe", "David", "Emma", "Felix", "Grace", "Harry", "Isla", "Jack",
          "Kate", "Leo", "Mia", "Noah", "Olivia", "Paul", "Rosa", "Sam", "Tara", "Victor",
          "Alice", "Bob", "Clara", "Dan", "Eve", "Frank", "Gina", "Hugo", "Ivy", "Joe"]

# Each task: (table item -> answer, phrasings). Phrasings use {x} for the item and {name}.
_TASKS: dict[str, tuple[dict[str, str], list[str]]] = {
    "colour": (_COLOUR, [
        "What colour is {x}?",
        "{name} asks: what colour is {x}?",
        "Tell {name} the colour of {x}.",
        "{name} is thinking of {x}. What colour is it?",
    ]),
    "sound": (_SOUND, [
        "What sound does {x} make?",
        "{name} asks: what sound does {x} make?",
        "{name} hears {x}. What does it say?",
        "Tell {name} what {x} says.",
    ]),
    "home": (_HOME, [
        "Where does {x} live?",
        "{name} asks: where does {x} live?",
        "{name} is looking for {x}. Where does it live?",
        "Tell {name} where {x} lives.",
    ]),
    "next": (dict(zip(_DAYS, _DAYS[1:] + _DAYS[:1])), [
        "What day comes after {x}?",
        "{name} asks: what day comes after {x}?",
        "{name} says today is {x}. What day is tomorrow?",
        "Tell {name} what day comes after {x}.",
    ]),
    "opposite": (_OPPOSITE, [
        "What is the opposite of {x}?",
        "{name} asks: what is the opposite of {x}?",
        "{name} says {x}. What is the opposite?",
        "Tell {name} the opposite of {x}.",
    ]),
}


def _quickstart_space() -> list[tuple[str, str, str, str]]:
    """Every distinct (task, item, phrasing, name) combination, in a fixed order.

    A phrasing without ``{name}`` yields one combination per item, not one per name, so that no
    two rows share a prompt.
    """
    space: list[tuple[str, str, str, str]] = []
    for task, (table, phrasings) in _TASKS.items():
        for item in table:
            for phrasing in phrasings:
                names = _NAMES if "{name}" in phrasing else [""]
                space.extend((task, item, phrasing, name) for name in names)
    return space


def quickstart_dataset(n: int = 2000, seed: int = 0) -> list[dict[str, str]]:
    """A small generated QA task with rows ``{"prompt": ..., "answer": ...}``.

    Deterministic per ``(n, seed)``; rows are distinct prompts drawn without replacement from 4,095
    combinations of 45 facts (colours of things, animal sounds and homes, the next day of the week,
    opposites) x 4 phrasings (3 of them addressed to one of 30 names). Any split of the rows is
    therefore a held-out test: each held-out prompt is new, its fact was seen in other wordings.
    Answers are 1-4 lower-case English words.

    Raises:
        ValueError: ``n`` exceeds the number of distinct rows.
    """
    space = _quickstart_space()
    if not 0 < n <= len(space):
        raise ValueError(f"quickstart_dataset: n must be in 1..{len(space)} (distinct prompts), got {n}")
    rng = random.Random(seed)
    picks = rng.sample(space, n)
    rows = []
    for task, item, phrasing, name in picks:
        answer = _TASKS[task][0][item]
        rows.append({"prompt": phrasing.format(x=item, name=name), "answer": answer})
    return rows


# --- loading rows -------------------------------------------------------------------------------



def _lookup(record: dict[str, Any], column: str) -> tuple[bool, Any]:
    """Value of ``column`` in a record; dotted paths reach into struct columns
    (``answers.text`` in SQuAD-style datasets). Returns (found, value)."""
    if column in record:
        return True, record[column]
    value: Any = record
    for part in column.split("."):
        if isinstance(value, dict) and part in value:
            value = value[part]
        else:
            return False, None
    return "." in column, value


def load_records(
    source: str, name: str | None = None, split: str = "train", limit: int | None = None
) -> tuple[Any, list[str], str]:
    """The records of a source as stored, before any column mapping.

    Args: as :func:`load_rows`.

    Returns:
        ``(records, columns, label)``: the records (a ``datasets.Dataset`` with every original column),
        the column names, and how to name the source in messages.

    Raises:
        FileNotFoundError: ``source`` names a local data file that does not exist.
        ValueError: a bad ``limit``.
    """
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    import datasets

    if source.startswith("builtin:"):
        from workers.data.known_truth import builtin_rows

        records = quickstart_dataset() if source == "builtin:quickstart" else builtin_rows(split)
        ds = datasets.Dataset.from_list(records[:limit] if limit is not None else records)
        return ds, list(ds.column_names), repr(source) + ("" if source == "builtin:quickstart" else f" split {split!r}")

    path = Path(source)
    suffix = path.suffix.lower()
    if path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()):
        ds = _from_disk(path, split)  # written by datasets' save_to_disk
        label = f"{source!r} split {split!r}"
    elif suffix in DATA_FILE_FORMATS and path.is_file():
        try:
            ds = datasets.load_dataset(DATA_FILE_FORMATS[suffix], data_files={"train": str(path)}, split="train")
        except datasets.exceptions.DatasetGenerationError as e:
            raise UserError(f"data.source {source!r}: {_first_bad_line(path) or e}") from e
        label = repr(source)
    elif suffix in DATA_FILE_FORMATS and not path.exists():
        # Hub dataset ids never end in a file extension: this was meant as a local file.
        raise UserError(f"data.source: dataset file {source!r} does not exist")
    else:
        ds = datasets.load_dataset(source, name, split=split)
        label = f"{source!r}" + (f" ({name})" if name else "") + f" split {split!r}"
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    return ds, list(ds.column_names), label


def _from_disk(path: Path, split: str) -> Any:
    """A dataset saved with ``save_to_disk``: a Dataset, or a DatasetDict's ``split``."""
    import datasets

    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise UserError(f"data.source {str(path)!r} (save_to_disk) has splits {list(ds)}, not {split!r}: "
                            "set data.train_split / data.eval_split")
        ds = ds[split]
    return ds


def _first_bad_line(path: Path) -> str | None:
    """'line N: what is wrong' for the first line of a JSON-lines file that is not a JSON object."""
    import json

    if path.suffix.lower() != ".jsonl":
        return None
    with path.open(encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                return f"line {n}: not valid JSON ({e.msg} at column {e.colno}); fix or remove the line"
            if not isinstance(obj, dict):
                return f"line {n}: a JSON {type(obj).__name__}, not an object of columns"
    return None


def load_rows(
    source: str,
    name: str | None = None,
    split: str = "train",
    columns: dict[str, str] | None = None,
    limit: int | None = None,
) -> list[dict[str, Any]]:
    """Load rows and rename their columns to template fields.

    Args:
        source: ``builtin:quickstart`` (:func:`quickstart_dataset`, 2,000 rows, seed 0);
            ``builtin:known_truth`` (:mod:`workers.data.known_truth`: splits train, teacher, validation, test); a local
            ``.json``/``.jsonl``/``.parquet``/``.arrow``/``.csv`` file (one split: ``split`` is
            ignored); otherwise a dataset for ``datasets.load_dataset(source, name, split=split)``.
        name: the dataset's configuration name (hub datasets only).
        split: the split to load, e.g. ``train`` or ``validation``.
        columns: template field -> dataset column (dotted paths reach into struct columns); default
            ``{"prompt": "prompt", "answer": "answer"}``.
        limit: keep only the first ``limit`` rows.

    Returns:
        One dict per row with the mapped field names. A column holding a list (e.g. several
        reference answers) gives its first element under the field (None if the list is empty, which
        :func:`workers.data.encoding.encode_example` rejects as a bad row) and the whole list under
        ``<field>_all`` (for exact match against any reference).

    Raises:
        UserError: a mapped column is missing (naming the column, the dataset and the columns it has).
        ValueError: a bad ``limit``.
    """
    columns = dict(columns) if columns else {"prompt": "prompt", "answer": "answer"}
    records, available, label = load_records(source, name, split, limit)
    check_columns(columns, available, label)
    return [map_columns(record, columns, i) for i, record in enumerate(records)]


def check_columns(columns: dict[str, str], available: list[str], label: str) -> None:
    """Every mapped column (or the top of its dotted path) exists in the source, or a UserError naming it."""
    for field, column in columns.items():
        top = column.split(".", 1)[0]
        if column not in available and top not in available:
            raise UserError(
                f"dataset {label} has no column {column!r} (mapped to template field {field!r}); "
                f"its columns are {available}. Fix the `columns` mapping."
            )


def map_columns(record: dict[str, Any], columns: dict[str, str], index: int) -> dict[str, Any]:
    """A record with template field names (``columns``: field -> column path), its ``RECORD`` number, and for a
    list-valued column its first element under the field and the whole list under ``<field>_all``. A value
    that is absent is None (which :func:`workers.data.encoding.encode_example` rejects as a bad row)."""
    row: dict[str, Any] = {RECORD: index}
    for field, column in columns.items():
        _, value = _lookup(record, column)
        if isinstance(value, (list, tuple)):
            row[f"{field}_all"] = list(value)
            value = value[0] if value else None
        row[field] = value
    return row
