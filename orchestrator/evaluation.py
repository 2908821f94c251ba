"""``mlot eval``: score a saved model on a dataset the way the paper does.

    mlot eval --model runs/qed_small/final --data ../shared/data/qed/validation.jsonl

A student ``mlot distill`` exported carries its recipe (``specs.recipe``: template, columns, prompt cut, answer
length, metric), so these need no flags; a model not made by mlot is told them (flags override a recipe):

    mlot eval --model some/model --data test.jsonl --columns context=context,question=question,answer=answers \\
        --template-prompt '{context}\\nQuestion: {question}\\nAnswer:' --metric qa

Greedy decoding with the model's own prompt template, first line of the answer kept (as the paper
does). Metrics: SQuAD-style exact match and token F1 (``workers.data.metrics``; max over the gold answers)
for QA, ROUGE-Lsum F-measure (Google's ``rouge-score``, which HF ``evaluate`` wraps; max over the
references) for summaries; all in percent.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from specs import Template, UserError
from specs.recipe import Recipe
from workers.data.metrics import METRICS, gold_answers, score_predictions

#: How a model without a recipe (not made by mlot) is prompted and scored unless told otherwise.
NO_RECIPE = Recipe(job="", template=Template(), columns={"prompt": "prompt", "answer": "answer"},
                   max_prompt_length=256, max_new_tokens=64, metric="all")


def model_recipe(model_path: str, template_prompt: str | None = None, **given: Any) -> Recipe:
    """How to prompt a saved model: each given setting (not None), else the recipe saved with it, else
    :data:`NO_RECIPE`. ``template_prompt`` replaces the prompt format only (the answer format, chat setting and
    EOS rule stay the recipe's); ``given``: other :class:`specs.recipe.Recipe` fields (``template``, ``columns``,
    ``max_prompt_length``, ``max_new_tokens``, ``metric``)."""
    base = Recipe.load(model_path) or NO_RECIPE
    recipe = base.model_copy(update={k: v for k, v in given.items() if v is not None})
    if template_prompt is not None:
        recipe = recipe.model_copy(update={"template": recipe.template.model_copy(update={"prompt": template_prompt})})
    if "answer" not in recipe.columns:
        raise UserError(f"columns must map 'answer' to the gold answer column, got {recipe.columns}")
    if recipe.metric not in METRICS:
        raise UserError(f"metric must be one of {', '.join(METRICS)}, got {recipe.metric!r}")
    return recipe


def model_answers(model_path: str, recipe: Recipe, rows: Sequence[dict[str, Any]]) -> list[str]:
    """Greedy answers (first line) of a saved causal LM to the rows' prompts, prompted as ``recipe`` says."""
    import torch
    from transformers import AutoModelForCausalLM

    from workers.generation import greedy_answers
    from workers.models import load_tokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(model_path).to(device)
    tokenizer = load_tokenizer(model_path)
    return greedy_answers(model, tokenizer, recipe.template, rows, recipe.max_prompt_length, recipe.max_new_tokens,
                          device)


def run_eval(model_path: str, data_source: str, columns: dict[str, str] | None = None, split: str = "validation",
             template: Template | None = None, max_prompt_length: int | None = None,
             max_new_tokens: int | None = None, limit: int | None = None, tracking_uri: str | None = None,
             run_name: str | None = None, metric: str | None = None, data_name: str | None = None,
             experiment: str = "mlot-eval", template_prompt: str | None = None) -> dict[str, float]:
    """Greedy-decode answers with a saved causal LM and score them against the gold answers.

    Args:
        model_path: a saved HF model + tokenizer (e.g. the ``final/`` folder ``mlot distill`` exports).
        data_source, columns, split, data_name, limit: which rows, as ``workers.data.tasks.load_rows`` reads
            them; ``columns`` maps template fields to dataset columns and must map ``answer`` (a list
            column gives several gold answers).
        template / template_prompt: the template the model was trained with, or its prompt format alone.
        max_prompt_length: prompt tokens kept (cut from the left, like in training).
        max_new_tokens: longest generated answer.
        metric: ``qa``, ``rouge`` or ``all`` (see :func:`score_predictions`).
        tracking_uri: when given, a run in MLflow experiment ``experiment`` gets the params, the
            metrics and the predictions (``predictions.jsonl``).
        run_name: that run's name (default ``eval-<model folder>``).
        Settings left None come from the model's recipe (:func:`model_recipe`).

    Returns:
        ``{"n": rows scored, "seconds": decoding time, <metric>: percent, ...}``.
    """
    from workers.data.tasks import load_rows

    recipe = model_recipe(model_path, template_prompt, template=template, columns=columns,
                          max_prompt_length=max_prompt_length, max_new_tokens=max_new_tokens, metric=metric)
    rows = load_rows(data_source, data_name, split, recipe.columns, limit)
    if not rows:
        raise UserError(f"no rows to evaluate in {data_source!r}")
    t0 = time.perf_counter()
    predictions = model_answers(model_path, recipe, rows)
    seconds = time.perf_counter() - t0
    golds = [gold_answers(r) for r in rows]
    results = {"n": float(len(rows)), "seconds": seconds, **score_predictions(predictions, golds, recipe.metric)}
    if tracking_uri:
        _log_run(tracking_uri, experiment, run_name or f"eval-{Path(model_path).name}", results, predictions, golds, {
            "model": model_path, "data": data_source, "split": split, "columns": json.dumps(recipe.columns),
            "template.prompt": recipe.template.prompt, "max_prompt_length": recipe.max_prompt_length,
            "max_new_tokens": recipe.max_new_tokens, "limit": limit, "metric": recipe.metric})
    return results


def _log_run(uri: str, experiment: str, run_name: str, results: dict[str, float], predictions: Sequence[str],
             golds: Sequence[Sequence[str]], params: dict[str, Any]) -> str:
    """One finished MLflow run with the evaluation's params, metrics and predictions; returns its id."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param

    from orchestrator.tracking import experiment_id

    client = MlflowClient(uri)
    run_id = client.create_run(experiment_id(client, experiment, uri), run_name=run_name).info.run_id
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(f"eval/{k}", v, now, 0) for k, v in results.items()],
                     params=[Param(k, str(v)[:6000]) for k, v in params.items()])
    lines = [json.dumps({"prediction": p, "gold": g}, ensure_ascii=False) for p, g in zip(predictions, golds)]
    client.log_text(run_id, "\n".join(lines) + "\n", "predictions.jsonl")
    client.set_terminated(run_id, "FINISHED")
    return run_id


def format_table(results: dict[str, float]) -> str:
    """The scores as a two-column text table (percent, two decimals; counts as integers)."""
    lines = [f"{'metric':12s} {'value':>9s}"]
    for k, v in results.items():
        lines.append(f"{k:12s} {v:9.0f}" if k == "n" else f"{k:12s} {v:9.2f}")
    return "\n".join(lines)


def parse_columns(text: str) -> dict[str, str]:
    """``"prompt=question,answer=answers"`` -> ``{"prompt": "question", "answer": "answers"}``."""
    out: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        field, sep, column = part.partition("=")
        if not sep or not field.strip() or not column.strip():
            raise argparse.ArgumentTypeError(
                f"--columns: expected FIELD=COLUMN pairs separated by commas, got {part!r}")
        out[field.strip()] = column.strip()
    if "answer" not in out:
        raise argparse.ArgumentTypeError(f"--columns must map 'answer' to the gold answer column, got {text!r}")
    return out


def recipe_from_args(args: argparse.Namespace) -> Recipe:
    """The settings :func:`add_model_options`' flags give, over the model's recipe."""
    # Shells do not turn "\n" into a newline inside quotes: accept the escape as typed.
    prompt = args.template_prompt.replace("\\n", "\n") if args.template_prompt is not None else None
    return model_recipe(args.model, prompt, columns=args.columns, max_prompt_length=args.max_prompt_length,
                        max_new_tokens=args.max_new_tokens, metric=getattr(args, "metric", None))


def cmd_eval(args: argparse.Namespace) -> int:
    """``mlot eval``: score the model, print the table."""
    r = recipe_from_args(args)
    results = run_eval(args.model, args.data, r.columns, args.split, r.template, r.max_prompt_length,
                       r.max_new_tokens, args.limit, args.tracking_uri, args.run_name, r.metric, args.name)
    print(f"\n{args.model} on {args.data} ({args.split}):")
    print(format_table(results))
    return 0


def add_model_options(p: argparse.ArgumentParser, required: bool = True) -> None:
    """The flags that say which saved model answers which rows, and how it is prompted (``mlot eval``, ``mlot
    generate --model``); unset ones come from the model's recipe (:func:`model_recipe`)."""
    p.add_argument("--model", required=required, help="saved HF model folder (e.g. runs/<job>/final: its "
                   "mlot_recipe.json gives the defaults of the flags below)")
    p.add_argument("--data", required=required, help="HF dataset name or local json/jsonl/parquet/arrow/csv file")
    p.add_argument("--name", help="HF dataset config name")
    p.add_argument("--columns", type=parse_columns, help="template field=dataset column pairs, e.g. "
                   "prompt=question,answer=answers (default: the recipe's, else prompt=prompt,answer=answer)")
    p.add_argument("--split", default="validation", help="dataset split (ignored for local files; default validation)")
    p.add_argument("--template-prompt", help="the prompt template the model was trained with, over the --columns "
                   "fields (default: the recipe's, else {prompt})")
    p.add_argument("--limit", type=int, help="only the first N rows")
    p.add_argument("--max-prompt-length", type=int, help="prompt tokens kept (default: the recipe's, else 256)")
    p.add_argument("--max-new-tokens", type=int, help="longest answer (default: the recipe's, else 64)")


def add_eval_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``mlot eval --model PATH --data SOURCE [--columns ...] [--split] [--template-prompt] [--limit N]
    [--metric qa|rouge|all] [--tracking-uri URI] ...``."""
    e = subparsers.add_parser("eval", help="greedy answers of a saved model on a dataset, scored with exact match / "
                              "F1 (QA) and ROUGE-Lsum (summaries)")
    add_model_options(e)
    e.add_argument("--metric", choices=METRICS,
                   help="qa: exact match + F1; rouge: ROUGE-Lsum; all (default: the recipe's, else all)")
    e.add_argument("--tracking-uri", help="log params, metrics and predictions to this MLflow tracking URI")
    e.add_argument("--run-name", help="MLflow run name (default eval-<model folder>)")
    e.set_defaults(func=cmd_eval)
    return e
