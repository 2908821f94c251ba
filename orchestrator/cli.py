"""The ``mlot`` command line: distill, validate, quickstart, tune, teach, generate, eval, inspect.

Exit codes: 0 done, 2 bad input (a ``specs.UserError``: the message names what to fix), 130 interrupted;
any other exception is a bug and keeps its traceback."""

from __future__ import annotations

import argparse
import sys
from importlib import resources
from pathlib import Path
from typing import Any

from orchestrator import console
from orchestrator.configuration import ConfigError, load_config
from orchestrator.tune import SpaceError
from specs import UserError

#: ``mlot quickstart``'s jobs: the known-truth task (the default: the teacher knows more than the labels carry,
#: and students are scored against the truth) and the extractive-QA one (exact match / F1 against gold answers).
QUICKSTARTS = {"truth": "known_truth.yaml", "qa": "quickstart.yaml"}
#: The known-truth study's held-out truth KL, mean ± sample std over seeds 2-11 (docs/quality.md, section 1, "The
#: default chosen by both variants": arms "SFT" and "aligned (its defaults)", projection weight 1): what the
#: quickstart's rows are read against.
STUDY_TRUTH_KL = {"SFT": (0.1722, 0.0112), "aligned": (0.0784, 0.0044)}


def bundled_config(name: str) -> Path:
    """Path of a config shipped inside the package (orchestrator/configs/)."""
    return Path(str(resources.files("orchestrator") / "configs" / name))


def _load(args: argparse.Namespace):
    return load_config(args.config, args.set or [])


def cmd_validate(args: argparse.Namespace) -> int:
    job = _load(args)
    print(f"{args.config}: OK (job {job.name!r}, {len(job.teachers)} teacher(s), "
          f"loss {job.loss.method}/{job.loss.mode}, "
          f"{job.train.num_workers} worker(s), ZeRO-{job.student.deepspeed.stage})")
    return 0


#: End-of-job scores as the summary table heads them (``eval.metric`` decides which a job has).
SCORE_NAMES = {"exact_match": "exact match", "f1": "F1", "rougeLsum": "ROUGE-Lsum"}


def summary_table(rows: list[tuple[str, Any]]) -> str:
    """The end of every ``mlot distill``: each (label, DistillSummary)'s held-out scores, eval CE and scored rows,
    then where the first one's student and MLflow run are and how to open them."""
    truth = any("eval/truth_kl" in s.metrics for _, s in rows)  # a known-truth job: KL to p*, the measure there
    scores = [] if truth else [k for k in SCORE_NAMES if any(k in s.eval for _, s in rows)]  # (not one label's)
    width = max(len("student"), *(len(label) for label, _ in rows))
    heads = ["truth KL"] * truth + [SCORE_NAMES[k] for k in scores] + ["eval CE", "rows"]
    lines = [f"{'student':{width}s} " + " ".join(f"{h:>12s}" for h in heads)]
    for label, s in rows:
        ce = s.metrics.get("eval/loss", float("nan"))
        values = [f"{s.metrics.get('eval/truth_kl', float('nan')):12.4f}"] * truth + [
            f"{s.eval.get(k, float('nan')):12.1f}" for k in scores] + [f"{ce:12.3f}", f"{int(s.eval.get('n', 0)):12d}"]
        lines.append(f"{label:{width}s} " + " ".join(values))
    first = rows[0][1]
    lines += ["", f"  student model : {first.export_dir}  (AutoModelForCausalLM.from_pretrained; "
              f"mlot eval --model {first.export_dir} --data ...)",
              f"  MLflow run    : {first.run_id}  at {first.tracking_uri}",
              f"  open the UI   : mlflow ui --backend-store-uri {first.tracking_uri}"]
    return "\n".join(lines)


def cmd_distill(args: argparse.Namespace) -> int:
    from orchestrator.driver import run_distill, run_with_baseline

    job = _load(args)
    if args.baseline:
        main, base = run_with_baseline(job, args.baseline)
        print("\n" + summary_table([(f"{main.job} (distilled)", main),
                                    (f"{base.job} ({args.baseline}, same budget)", base)]))
        return 0
    summary = run_distill(job, resume=args.resume)
    if summary.stopped_at:
        print(f"\n  stopped at step {summary.stopped_at}: mlot distill {args.config} --resume continues")
        return 130  # interrupted (cleanly, with a checkpoint): the shell convention for Ctrl-C
    print("\n" + summary_table([(summary.job, summary)]))
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from orchestrator.tune import run_tune

    job = _load(args)
    s = run_tune(job, args.space, num_samples=args.num_samples, scheduler=args.scheduler, search=args.search,
                 metric=args.metric, mode=args.mode, resume=args.resume, share_teachers=not args.no_share_teachers,
                 max_concurrent=args.max_concurrent)
    print(f"\n  best config   : {s.best_config_path}  (re-run: mlot distill {s.best_config_path})")
    print(f"  MLflow parent : {s.parent_run_id}   sweep wall time {s.wall_s:.0f}s")
    return 0


def cmd_teach(args: argparse.Namespace) -> int:
    from orchestrator.teach import run_teach

    job = _load(args)
    paths = run_teach(job, args.out, fmt=args.format, compress=args.compress, hidden_dtype=args.hidden_dtype,
                      batch_size=args.batch_size, shard_rows=args.shard_rows)
    for i, t in enumerate(job.teachers):
        if t.name in paths:
            print(f"  teacher {t.name}: {paths[t.name]}   (distil from it: --set teachers.{i}.store={paths[t.name]})")
    return 0


def cmd_quickstart(args: argparse.Namespace) -> int:
    args.config = str(bundled_config(QUICKSTARTS[args.task]))
    args.baseline = "sft"
    args.resume = False
    code = cmd_distill(args)
    if args.task == "truth":
        (sft, sft_sd), (ours, ours_sd) = STUDY_TRUTH_KL["SFT"], STUDY_TRUTH_KL["aligned"]
        print(f"\n  truth KL = KL(p* || student) on the held-out prompts (lower is better). The known-truth study "
              f"(docs/quality.md), 10 seeds of this job's models, data and budget: SFT {sft:.3f} ± {sft_sd:.3f}, "
              f"aligned {ours:.3f} ± {ours_sd:.3f} (its in-process loop; this DeepSpeed job's data order and teacher "
              f"pre-training differ, so compare the gap, not the last digit).")
    return code


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mlot", description="Cross-tokenizer distillation with multi-level optimal "
                                "transport, on Ray Train + DeepSpeed, tracked in MLflow.")
    sub = p.add_subparsers(dest="command", required=True)

    def with_config(sp: argparse.ArgumentParser, positional: bool = True) -> None:
        if positional:
            sp.add_argument("config", help="job YAML (see orchestrator/configs/)")
        sp.add_argument("--set", action="append", metavar="KEY=VALUE",
                        help="override a config value, e.g. --set train.lr=3e-4 --set teachers.0.weight=2")

    d = sub.add_parser("distill", help="distil teacher(s) into the student described by CONFIG")
    with_config(d)
    d.add_argument("--resume", action="store_true", help="continue this job's last run from its newest checkpoint")
    d.add_argument("--baseline", metavar="METHOD",
                   help="also train with this loss method of mlot.METHODS (e.g. sft, uld), same budget; compare")
    d.set_defaults(func=cmd_distill)

    t = sub.add_parser("tune", help="sweep OT settings of CONFIG with Ray Tune (teacher work shared across trials)")
    with_config(t)
    t.add_argument("--space", required=True, help="search space YAML (see tune_spaces/)")
    t.add_argument("--num-samples", type=int, default=1, help="samples of the space (grid entries multiply)")
    t.add_argument("--scheduler", choices=["asha"], help="early-stop poor trials on the periodic eval metric")
    t.add_argument("--search", choices=["optuna"], help="search algorithm (default: random / grid)")
    t.add_argument("--metric", default="eval/loss")
    t.add_argument("--mode", choices=["min", "max"], default="min")
    t.add_argument("--max-concurrent", type=int, help="trials at once (default: as many as the CPUs fit)")
    t.add_argument("--no-share-teachers", action="store_true",
                   help="each trial starts its own teachers (for comparison)")
    t.add_argument("--resume", action="store_true", help="continue an interrupted sweep of this job")
    t.set_defaults(func=cmd_tune)

    te = sub.add_parser("teach", help="run every teacher over the job's rows once and write a store per teacher "
                        "that distill / tune read instead of live teachers (teachers.N.store)")
    with_config(te)
    te.add_argument("--out", help="where the stores go (default: <output_dir>/<name>/store); one folder per teacher")
    te.add_argument("--format", choices=["payload", "hidden"], default="payload",
                    help="payload: top-k payloads, exact for this loss's settings; hidden: final hidden states + "
                    "LM head, exact for any temperature / top-k / mode (default: payload)")
    te.add_argument("--compress", choices=["fp16"], help="payload format: probabilities in fp16 (rel. error <= 2^-11)")
    te.add_argument("--hidden-dtype", choices=["bfloat16", "float32"], default="bfloat16",
                    help="hidden format: bfloat16 (half the bytes) or float32 (payloads identical to live teachers)")
    te.add_argument("--batch-size", type=int, default=64, help="rows per teacher forward (sorted by length)")
    te.add_argument("--shard-rows", type=int, default=1024, help="rows per store shard (the unit of resumption)")
    te.set_defaults(func=cmd_teach)

    from orchestrator.evaluation import add_eval_parser
    from orchestrator.generate import add_generate_parser
    from orchestrator.inspect import add_inspect_parser
    add_generate_parser(sub)
    add_eval_parser(sub)
    add_inspect_parser(sub)

    v = sub.add_parser("validate", help="check CONFIG and print what it would run")
    with_config(v)
    v.set_defaults(func=cmd_validate)

    q = sub.add_parser("quickstart", help="the bundled demo: tiny teacher and student with different real "
                       "tokenizers, local Ray on CPU; distils, trains an SFT baseline, compares")
    with_config(q, positional=False)
    q.add_argument("--task", choices=list(QUICKSTARTS), default="truth",
                   help="truth: the known-truth task, scored against the true answer distribution (default); "
                   "qa: extractive QA, scored by exact match / F1 against gold answers")
    q.set_defaults(func=cmd_quickstart)
    for command in sub.choices.values():
        command.add_argument("--verbose", action="store_true", help="also show the frameworks' output: Ray's "
                             "forwarded worker logs, model-loading and dataset bars, Ray's and MLflow's info lines")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console.set_verbose(args.verbose)
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"mlot: invalid config:\n{e}", file=sys.stderr)
        return 2
    except SpaceError as e:
        print(f"mlot: invalid search space:\n{e}", file=sys.stderr)
        return 2
    except UserError as e:  # bad input: the message and the fix, not a traceback (anything else is a bug: kept)
        print(f"mlot: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mlot: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
