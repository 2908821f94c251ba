"""The recipe an exported student carries: ``mlot_recipe.json`` beside its weights.

A student answers well only when it is prompted the way it was trained: the same prompt/answer template over the
same row fields, the same chat setting and EOS rule, the same prompt cut. ``mlot distill`` writes these next to
the exported model, so ``mlot eval --model DIR`` and ``mlot generate --model DIR`` need no template flags (flags
still override); a model folder without the file (not made by mlot) keeps the flags' defaults.

The tokenizer's own chat template, where ``template.chat`` uses it, is saved with the tokenizer
(``save_pretrained`` writes it beside the weights).
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from specs import Template

RECIPE_FILE = "mlot_recipe.json"


class Recipe(BaseModel):
    """How the exported student was prompted in training, and how it generates by default."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    job: str = Field(description="The job that trained the student.")
    template: Template = Field(description="The student's prompt/answer template (chat setting and EOS rule).")
    columns: dict[str, str] = Field(description="Template field -> dataset column, as the job's data.columns.")
    max_prompt_length: int = Field(description="Prompt tokens kept (cut from the left, as in training).")
    max_new_tokens: int = Field(description="Longest generated answer: the job's data.max_answer_length.")
    metric: str = Field("qa", description="What mlot eval scores by default (the job's eval.metric).")

    def save(self, folder: str | Path) -> Path:
        """Write the recipe into a local model folder; returns the file."""
        path = Path(folder) / RECIPE_FILE
        path.write_text(self.model_dump_json(indent=2) + "\n")
        return path

    @classmethod
    def load(cls, folder: str | Path) -> Recipe | None:
        """The recipe of a local model folder, or None when the folder has none (a model not made by mlot)."""
        path = Path(folder) / RECIPE_FILE
        if not path.is_file():
            return None
        return cls.model_validate(json.loads(path.read_text()))
