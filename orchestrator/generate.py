"""``mlot generate``: a teacher writes pseudo-labels for the training prompts (the unlabeled setting), or a saved
model answers a dataset's prompts.

    mlot generate CONFIG --output teacher_labels.jsonl --field teacher_answer
    mlot distill  CONFIG --set data.source=teacher_labels.jsonl --set data.columns.answer=teacher_answer

    mlot generate --model runs/<job>/final --data test.jsonl --output answers.jsonl   # prompted as it was trained

The teacher's replicas greedy-decode an answer (first line) for every row of the job's training split;
the output has every original column of those rows plus the answer column ``field``, so the same job
trains on it by pointing ``data.source`` at the file and ``data.columns.answer`` at ``field``. A
teacher with ``pretrain`` is pretrained (on the labeled training rows) and saved under the job's run
directory first, exactly as ``mlot distill`` does; a later ``mlot distill`` of the same job name loads
that saved teacher, so the labels and the distilled distributions come from one and the same model.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from orchestrator.cluster import connect_ray
from orchestrator.config import JobConfig
from orchestrator.configuration import load_config
from orchestrator.driver import prepare_data, say, start_teachers
from specs import UserError

#: Rows per ``generate`` call: big enough to batch the decoding, small enough to spread over replicas.
CHUNK_ROWS = 64


def prompt_problems(job: JobConfig, teacher_name: str, rows: list[dict[str, Any]]) -> dict[int, Any]:
    """Rows whose *prompt* the teacher cannot template or tokenise: {row index: the BadRowError}.

    Only the prompt matters here (the answer is what the teacher is about to write), so rows with a
    missing or empty gold answer are still labelled.
    """
    from workers.data.encoding import BadRowError
    from workers.generation import prompt_ids
    from workers.models import load_tokenizer

    spec = next(t for t in job.teachers if t.name == teacher_name)
    tok = load_tokenizer(spec.tokenizer_name, spec.trust_remote_code)
    template = spec.template
    bad: dict[int, Any] = {}
    for i, row in enumerate(rows):
        try:
            prompt_ids(row, tok, template, job.data.max_prompt_length)
        except BadRowError as e:
            bad[i] = e
    return bad


def run_generate(job: JobConfig, output: str, field: str = "teacher_answer", teacher: str | None = None,
                 max_new_tokens: int | None = None, *, teachers: dict[str, list[Any]] | None = None) -> str:
    """Label the training split's prompts with a teacher's greedy answers; write them as JSON lines.

    Args:
        job: the job config; its ``data`` section says which rows (``source``, ``train_split``,
            ``limit``) and its teacher's template how each prompt is written.
        output: the ``.jsonl`` file to write (parent folders are created; written atomically).
        field: the new column holding the teacher's answer; it must not be an existing column.
        teacher: which of ``job.teachers`` answers (default: the first).
        max_new_tokens: longest answer in the teacher's tokens (default: ``data.max_answer_length``).
        teachers: running actors ({name: [handles]}, as from ``start_teachers``) to use instead of
            starting new ones (benchmarks reuse one pretrained teacher).

    Returns:
        ``output``. Rows whose prompt the teacher cannot encode are skipped under
        ``data.on_bad_row: skip`` (an error otherwise), and rows the teacher answers with an empty
        line are left out (an empty answer is not a training target); both are counted on stdout.

    Raises:
        ValueError: an unknown teacher, ``field`` already a column, every answer empty, or
            (``on_bad_row: error``) a prompt the teacher cannot encode, naming the row.
    """
    import ray

    from workers.data.encoding import BadRowError
    from workers.data.tasks import load_records, load_rows

    names = [t.name for t in job.teachers]
    name = teacher or (names[0] if names else None)
    if name not in names:
        raise UserError(f"--teacher {teacher!r}: job {job.name!r} has teachers {names}")
    d = job.data
    records, columns, label = load_records(d.source, d.name, d.train_split, d.limit)
    if field in columns:
        raise UserError(f"--field {field!r} is already a column of {label} (columns {columns}); "
                         "choose another name so the original column is kept")
    rows = load_rows(d.source, d.name, d.train_split, d.columns, d.limit)

    bad = prompt_problems(job, name, rows)
    if bad and d.on_bad_row == "error":
        i = min(bad)
        raise BadRowError(i, bad[i].field, f"{bad[i].reason} (teacher {name}; set data.on_bad_row: skip to leave such "
                          "rows out)")
    keep = [i for i in range(len(rows)) if i not in bad]

    own = teachers is None
    if own:
        connect_ray(job)
        # Only the named teacher is started; it pretrains on the labeled training rows like in distill.
        solo = job.model_copy(update={"teachers": [t for t in job.teachers if t.name == name]})
        teachers = start_teachers(solo, prepare_data(solo) if solo.teachers[0].pretrain.steps else None)
    replicas = teachers[name]
    n_tokens = d.max_answer_length if max_new_tokens is None else max_new_tokens

    # Plain round-robin over the teacher's own actors rather than a Ray Data actor pool: the actors
    # already hold the (pretrained) model on the resources the config gives the teacher, whereas a
    # map_batches pool would build and load a second copy per replica and needs every operator's CPUs
    # hand-tuned not to hang on a small machine (notes/STACK.md). Each actor queues its calls, so
    # submitting every chunk at once keeps all replicas busy; ray.get in submission order keeps rows
    # aligned with their answers.
    chunks = [keep[i:i + CHUNK_ROWS] for i in range(0, len(keep), CHUNK_ROWS)]
    say(f"generate: teacher {name}, {len(replicas)} replica(s), {len(keep)} prompts in {len(chunks)} chunks")
    try:
        refs = [replicas[c % len(replicas)].generate.remote([rows[i] for i in chunk], n_tokens)
                for c, chunk in enumerate(chunks)]
        answers = [a for ref in refs for a in ray.get(ref)]
    finally:
        if own:  # actors started here have no other owner: free their resources
            for h in replicas:
                ray.kill(h)

    labeled = [(i, answer) for i, answer in zip(keep, answers) if answer]
    empty = len(keep) - len(labeled)
    if not labeled:
        raise UserError(f"teacher {name} answered all {len(keep)} prompts with an empty line: nothing to train on "
                         "(an untrained teacher stops at once; give it teachers.N.pretrain.steps or a trained model)")
    write_jsonl(output, ({**records[i], field: answer} for i, answer in labeled))
    say(f"generate: wrote {len(labeled)} rows to {output}" + (f"; skipped {len(bad)} bad prompt(s)" if bad else "")
        + (f"; left out {empty} empty answer(s)" if empty else ""))
    return output


def run_model_generate(model_path: str, data_source: str, output: str, field: str, recipe: Any, split: str,
                       data_name: str | None = None, limit: int | None = None) -> str:
    """A saved model's greedy answers (first line) to a dataset's prompts, prompted as ``recipe`` (a
    ``specs.recipe.Recipe``, e.g. ``orchestrator.evaluation.model_recipe``) says; every row is written with its
    original columns plus ``field``. Returns ``output``."""
    from orchestrator.evaluation import model_answers
    from workers.data.tasks import load_records, load_rows

    records, columns, label = load_records(data_source, data_name, split, limit)
    if field in columns:
        raise UserError(f"--field {field!r} is already a column of {label} (columns {columns}); choose another name")
    # Only the prompt's fields are needed: a dataset without the answer column can be answered.
    mapping = {k: v for k, v in recipe.columns.items() if k in recipe.template.prompt_fields()}
    rows = load_rows(data_source, data_name, split, mapping, limit)
    answers = model_answers(model_path, recipe, rows)
    write_jsonl(output, ({**records[i], field: a} for i, a in enumerate(answers)))
    say(f"generate: {model_path} answered {len(answers)} prompts of {label}; wrote {output}")
    return output


def write_jsonl(output: str, records: Any) -> None:
    """Write dicts as JSON lines, atomically: a half-written file never sits where training would pick it up."""
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=out.name + ".")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def cmd_generate(args: argparse.Namespace) -> int:
    """``mlot generate``: load the job, write the pseudo-labels, say how to train on them; or (``--model``) write a
    saved model's answers."""
    if (args.config is None) == (args.model is None):
        raise UserError("mlot generate: give a job CONFIG (its teacher labels the training prompts) or --model DIR "
                        "--data SOURCE (a saved model answers the rows), not both")
    if args.model:
        if not args.data:
            raise UserError("mlot generate --model: --data is required (the rows whose prompts the model answers)")
        from orchestrator.evaluation import recipe_from_args
        path = run_model_generate(args.model, args.data, args.output, args.field or "prediction",
                                  recipe_from_args(args), args.split, args.name, args.limit)
        print(f"\n  answers : {path}  (column {args.field or 'prediction'!r})")
        return 0
    job = load_config(args.config, args.set or [])
    field = args.field or "teacher_answer"
    path = run_generate(job, args.output, field, args.teacher, args.max_new_tokens)
    print(f"\n  pseudo-labels : {path}  (column {field!r})")
    # The same overrides keep the job's name and output_dir, so distill finds the teacher saved here.
    same = "".join(f" --set {kv}" for kv in args.set or [])
    print(f"  train on them : mlot distill {args.config}{same} --set data.source={path} "
          f"--set data.columns.answer={field}")
    return 0


def add_generate_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``mlot generate CONFIG --output PATH [--field] [--teacher] [--max-new-tokens] [--set K=V ...]`` and
    ``mlot generate --model DIR --data SOURCE --output PATH [model options]``."""
    from orchestrator.evaluation import add_model_options

    g = subparsers.add_parser("generate", help="a teacher answers the training prompts (greedy, first line) and "
                              "the rows are written with that answer as a new column (the unlabeled setting); with "
                              "--model, a saved model answers --data's prompts")
    g.add_argument("config", nargs="?", help="job YAML (see orchestrator/configs/); or give --model")
    g.add_argument("--output", required=True, help="the .jsonl file to write")
    g.add_argument("--field", help="name of the new answer column (default: teacher_answer; prediction with --model)")
    g.add_argument("--teacher", help="which teacher of the job answers (default: the first)")
    g.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config value, e.g. --set data.limit=500")
    add_model_options(g, required=False)  # its --max-new-tokens: the teacher's too (default data.max_answer_length)
    g.set_defaults(func=cmd_generate)
    return g
