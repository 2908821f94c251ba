"""``mlot inspect``: how the job's tokenizers meet on a sample of its training rows, before any GPU hour.

    mlot inspect CONFIG [--rows 8] [--set K=V ...] [--out DIR] [--no-track]

Prints a compact summary (models, counts, each teacher's vocabulary coverage and payload size, the first rows'
tokens side by side, the findings) and writes a self-contained HTML report (inline CSS, nothing fetched) to
``DIR/report.html`` (default ``<output_dir>/<name>/inspect/``, a local folder or a storage URI); unless
``--no-track``, the report is also the artefact of a short MLflow run ``inspect-<name>`` in the job's
experiment. The analysis is :mod:`workers.data.inspect`; no Ray is started and no model is built.
"""

from __future__ import annotations

import argparse
import html
import tempfile
from pathlib import Path
from typing import Any

from orchestrator.config import JobConfig
from orchestrator.configuration import load_config
from specs import UserError, storage

SHOWN_ROWS = 2  # rows printed in the terminal (the report has every sampled row)


def run_inspect(job: JobConfig, rows: int = 8, out: str | None = None, track: bool = True) -> tuple[Any, str]:
    """Inspect ``rows`` training rows of ``job``; write the report. Returns (the ``Inspection``, the report path)."""
    from workers.data.inspect import inspect_job

    if rows < 1:
        raise UserError(f"--rows must be >= 1, got {rows}")
    insp = inspect_job(job, rows)
    path = storage.join(out or storage.join(job.run_path, "inspect"), "report.html")
    page = render_html(insp)
    storage.write_text(path, page)
    if track:
        _log_report(job, page)
    return insp, path


def _log_report(job: JobConfig, page: str) -> str:
    """A finished MLflow run ``inspect-<job>`` in the job's experiment, with the report as its artefact."""
    from mlflow import MlflowClient

    from orchestrator.tracking import experiment_id

    uri = job.tracking.resolved_uri()
    client = MlflowClient(uri)
    run_id = client.create_run(experiment_id(client, job.tracking.experiment, uri), run_name=f"inspect-{job.name}",
                               tags={"mlot.inspect": job.name, **job.tracking.tags}).info.run_id
    with tempfile.TemporaryDirectory() as d:
        local = Path(d, "report.html")
        local.write_text(page, encoding="utf-8")
        client.log_artifact(run_id, str(local))
    client.set_terminated(run_id, "FINISHED")
    return run_id


# ---------------------------------------------------------------------------- the terminal


def _show(piece: str) -> str:
    """A token piece on one terminal line: spaces as ``·``, newlines as ``\\n``, an empty piece as ``∅``."""
    return piece.replace(" ", "·").replace("\n", "\\n") or "∅"


def _tokens(pieces: list[str]) -> str:
    return "|".join(map(_show, pieces))


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _bytes(cost: Any) -> str:
    return "n/a" if cost.bytes_per_token is None else f"{cost.bytes_per_token:,.1f}"


def render_text(insp: Any) -> str:
    """The terminal summary."""
    width = max(len(m.name) for m in insp.models)
    lines = [f"mlot inspect: job {insp.job!r}, {insp.counts['rows']} training row(s) of {insp.source!r} "
             f"(seed {insp.seed})"]
    for m in insp.models:
        lines.append(f"  {m.name:{width}s}  {m.tokenizer}  ({m.vocab:,} tokens)  bos {m.bos}  eos {m.eos}  pad {m.pad}"
                     + ("  chat template" if m.chat else ""))
    truncated = ", ".join(f"{m.name} {insp.counts[f'prompts_truncated.{m.field}']}" for m in insp.models)
    lines.append(f"  answers cut: {insp.counts['answers_cut']}   prompts truncated: {truncated}   "
                 f"bad rows: {insp.counts['bad_rows']}")
    for t in insp.teachers:
        c = t.coverage
        lines.append(f"teacher {t.name}: vocabulary map covers {_pct(c['teacher'])} of its tokens, "
                     f"{_pct(c['student'])} of the student's ({int(c['classes']):,} classes)")
        lines.append(f"  answer tokens in shared classes {_pct(t.shared_answer)}, starting where a student token "
                     f"starts {_pct(t.aligned)}, {t.chunks_per_answer:.1f} aligned chunks per answer")
        costs = " | ".join(f"{p.method} {_bytes(p)} ({p.settings})" for p in t.payload)
        lines.append(f"  payload bytes / answer token: {costs} | full bf16 logits {t.full_logits:,}")
    for r in insp.rows[:SHOWN_ROWS]:
        lines.append(f"row {r.record}" + ("  (answer cut)" if r.cut else "") + ": "
                     + "  ".join(f"{k}={v!r}" for k, v in r.fields.items() if not k.endswith("_all")))
        for m in insp.models:
            e = r.encoded[m.field]
            lines.append(f"  {m.name:{width}s}  prompt {_tokens(e.prompt)}")
            span = f"[{len(e.prompt_ids)}:{len(e.prompt_ids) + len(e.answer_ids)}]"
            lines.append(f"  {'':{width}s}  answer{span} {_tokens(e.answer)}   bounds {e.bounds}")
        for t in insp.teachers:
            chunks = "  ".join(f"{_tokens(list(c.teacher))} = {_tokens(list(c.student))}" for c in r.chunks[t.field])
            lines.append(f"  chunks {t.name} = student: {chunks}")
    for level, mark in (("warning", "!"), ("note", "-")):
        found = [f for f in insp.findings if f.level == level]
        if found:
            lines.append(f"{level}s:")
            lines += [f"  {mark} [{f.kind}] {f.field}: {f.message}" for f in found]
    if not insp.warnings():
        lines.append("no warnings")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- the HTML report

_CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em; color: #222; max-width: 1200px; }
h1 { font-size: 1.4em; } h2 { font-size: 1.15em; margin-top: 1.6em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: .5em 0; } td, th { border: 1px solid #ddd; padding: 3px 8px;
  vertical-align: top; text-align: left; } th { background: #f4f4f4; }
code { background: #f4f4f4; padding: 0 3px; }
.tok { display: inline-block; white-space: pre; font-family: ui-monospace, monospace; border: 1px solid #bbb;
  border-radius: 3px; padding: 0 2px; margin: 1px; background: #fafafa; }
.tok:empty::after { content: "∅"; color: #aaa; }
.ans .tok { background: #e6f2ff; border-color: #7aa7d8; }
.warning { border-left: 4px solid #c0392b; background: #fdf0ef; padding: 4px 8px; margin: 4px 0; list-style: none; }
.note { border-left: 4px solid #888; background: #f5f5f5; padding: 4px 8px; margin: 4px 0; list-style: none; }
.muted { color: #777; }
"""


def _esc(text: Any) -> str:
    return html.escape(str(text))


def _chips(pieces: Any) -> str:
    return "".join(f'<span class="tok">{_esc(p).replace(chr(10), "⏎")}</span>' for p in pieces)


def _table(head: list[str], rows: list[list[str]]) -> str:
    """An HTML table; ``rows`` cells are HTML already."""
    cells = "".join(f"<tr>{''.join(f'<td>{c}</td>' for c in row)}</tr>" for row in rows)
    return f"<table><tr>{''.join(f'<th>{_esc(h)}</th>' for h in head)}</tr>{cells}</table>"


def _row_html(r: Any, insp: Any) -> str:
    names = {m.field: m.name for m in insp.models}
    fields = " &nbsp; ".join(f"<b>{_esc(k)}</b>: {_esc(v)}" for k, v in r.fields.items() if not k.endswith("_all"))
    tokens = _table(["model", "prompt", "answer (the labelled span)", "span", "character bounds"],
                    [[_esc(names[f]), _chips(e.prompt), f'<span class="ans">{_chips(e.answer)}</span>',
                      f"{len(e.prompt_ids)}–{len(e.prompt_ids) + len(e.answer_ids)}", _esc(e.bounds)]
                     for f, e in r.encoded.items()])
    chunks = "".join(
        f"<p class=muted>aligned chunks, {_esc(names[f])} / student</p>"
        + _table(["chars", names[f], "student"],
                 [[f"{c.start}–{c.end}", _chips(c.teacher), _chips(c.student)] for c in cs])
        for f, cs in r.chunks.items())
    cut = " <b>(answer cut)</b>" if r.cut else ""
    return f"<h3>row {r.record}{cut}</h3><p>{fields}</p>{tokens}{chunks}"


def render_html(insp: Any) -> str:
    """The self-contained report: findings, models, teachers, then every sampled row."""
    findings = "".join(
        f'<li class="{f.level}"><b>{_esc(f.level)}</b> [{_esc(f.kind)}] <code>{_esc(f.field)}</code>: '
        f"{_esc(f.message)}" + (f' <span class="muted">(rows {_esc(", ".join(map(str, f.records)))})</span>'
                                if f.records else "") + "</li>" for f in insp.findings) or "<li>none</li>"
    models = _table(["field", "name", "tokenizer", "vocab", "bos", "eos", "pad", "unk", "chat"],
                    [[_esc(v) for v in (m.field, m.name, m.tokenizer, f"{m.vocab:,}", m.bos, m.eos, m.pad, m.unk,
                                        m.chat)] for m in insp.models])
    counts = _table(["over the sample", "rows"], [[_esc(k), _esc(v)] for k, v in insp.counts.items()])
    teachers = "".join(
        f"<h3>{_esc(t.name)} <span class=muted>({_esc(t.field)})</span></h3>"
        + _table(["teacher vocab mapped", "student vocab mapped", "classes", "answer tokens shared",
                  "aligned starts", "chunks / answer"],
                 [[_pct(t.coverage["teacher"]), _pct(t.coverage["student"]), f"{int(t.coverage['classes']):,}",
                   _pct(t.shared_answer), _pct(t.aligned), f"{t.chunks_per_answer:.2f}"]])
        + _table(["loss method", "payload bytes / answer token", "settings"],
                 [[_esc(p.method), _bytes(p), _esc(p.settings)] for p in t.payload]
                 + [["full logits (bf16)", f"{t.full_logits:,}", "for scale"]])
        for t in insp.teachers)
    rows = "".join(_row_html(r, insp) for r in insp.rows)
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>mlot inspect: {_esc(insp.job)}</title>"
            f"<style>{_CSS}</style></head><body><h1>mlot inspect: {_esc(insp.job)}</h1>"
            f"<p>{insp.counts['rows']} training row(s) of <code>{_esc(insp.source)}</code>, seed {insp.seed}</p>"
            f"<h2>Findings</h2><ul>{findings}</ul><h2>Models</h2>{models}{counts}"
            f"<h2>Teachers</h2>{teachers}<h2>Rows</h2>{rows}</body></html>")


# ---------------------------------------------------------------------------- the command


def cmd_inspect(args: argparse.Namespace) -> int:
    job = load_config(args.config, args.set or [])
    insp, path = run_inspect(job, args.rows, args.out, track=not args.no_track)
    print(render_text(insp))
    print(f"\n  report : {path}")
    return 0


def add_inspect_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``mlot inspect CONFIG [--rows N] [--set K=V ...] [--out DIR] [--no-track]``."""
    p = subparsers.add_parser("inspect", help="show how the job's tokenizers meet on a sample of its training rows "
                              "(tokens side by side, aligned chunks, vocabulary coverage, payload sizes, warnings); "
                              "writes an HTML report")
    p.add_argument("config", help="job YAML (see orchestrator/configs/)")
    p.add_argument("--rows", type=int, default=8, help="training rows to sample with train.seed (default: 8)")
    p.add_argument("--out", help="folder of report.html (default: <output_dir>/<name>/inspect)")
    p.add_argument("--no-track", action="store_true", help="do not log the report to MLflow")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config value, e.g. --set data.max_answer_length=16")
    p.set_defaults(func=cmd_inspect)
    return p
