"""``mlot generate`` -> ``mlot distill`` on the pseudo-labels -> ``mlot eval``, and the eval metrics.

The end-to-end test runs a real local Ray cluster with the quickstart's tiny models (SentencePiece
teacher, WordPiece student) on 200 rows kept in a local jsonl with extra columns, so it also checks
that the generated file keeps every original column.
"""

import argparse
import json
from pathlib import Path

import pytest

from specs import UserError

QUICKSTART = Path(__file__).resolve().parents[1] / "orchestrator" / "configs" / "quickstart.yaml"


# --------------------------------------------------------------------------------------------- metrics


def test_rouge_lsum_hand_computed():
    from workers.data.metrics import rouge_lsum

    # One sentence each: LCS("the cat on the mat", "the cat sat on the mat") = 5 tokens,
    # P = 5/5, R = 5/6, F = 2PR / (P + R) = 10/11.
    assert rouge_lsum("the cat on the mat", ["the cat sat on the mat"]) == pytest.approx(10 / 11)
    # Two sentences in swapped order. Summary-level LCS is the union, per reference sentence, of its LCS
    # with every candidate sentence: "it purred" gets {it, purred} from "it softly purred", "the cat sat"
    # gets {the, cat} from "the cat": 4 hits over 5 reference and 5 candidate tokens, F = 0.8. (Plain
    # ROUGE-L over the joined texts finds an LCS of only 2 here: 0.4.)
    assert rouge_lsum("the cat\nit softly purred", ["it purred\nthe cat sat"]) == pytest.approx(0.8)
    # Max over references; an empty prediction scores 0.
    assert rouge_lsum("a dog barked", ["nothing alike", "a dog barked"]) == pytest.approx(1.0)
    assert rouge_lsum("", ["a dog barked"]) == 0.0


def test_score_predictions_metric_choice():
    from workers.data.metrics import score_predictions

    preds, golds = ["The Cat", "dog"], [["cat"], ["a big dog", "hound"]]
    qa = score_predictions(preds, golds, "qa")
    assert set(qa) == {"exact_match", "f1"}
    assert qa["exact_match"] == pytest.approx(50.0)  # "The Cat" == "cat" after SQuAD normalisation
    assert qa["f1"] == pytest.approx(100 * (1 + 2 / 3) / 2)  # "dog" vs "big dog": P 1, R 1/2
    assert set(score_predictions(preds, golds, "rouge")) == {"rougeLsum"}
    assert set(score_predictions(preds, golds, "all")) == {"exact_match", "f1", "rougeLsum"}
    with pytest.raises(UserError, match="qa, rouge, all"):
        score_predictions(preds, golds, "bleu")


# --------------------------------------------------------------------------------------------- parsers


def _parser() -> argparse.ArgumentParser:
    from orchestrator.evaluation import add_eval_parser
    from orchestrator.generate import add_generate_parser

    p = argparse.ArgumentParser(prog="mlot")
    sub = p.add_subparsers(dest="command", required=True)
    add_eval_parser(sub)
    add_generate_parser(sub)
    return p


def test_eval_parser():
    from orchestrator.evaluation import cmd_eval

    args = _parser().parse_args([
        "eval", "--model", "runs/x/final", "--data", "../shared/data/qed/validation.jsonl",
        "--columns", "context=context, question=question,answer=answers", "--limit", "50", "--metric", "qa",
        "--template-prompt", "{context}\\nQuestion: {question}\\nAnswer:", "--tracking-uri", "sqlite:///m.db"])
    assert args.func is cmd_eval
    assert args.columns == {"context": "context", "question": "question", "answer": "answers"}
    assert (args.limit, args.metric, args.split, args.tracking_uri) == (50, "qa", "validation", "sqlite:///m.db")
    defaults = _parser().parse_args(["eval", "--model", "m", "--data", "d"])
    # Unset: the model's recipe decides, else the defaults of a model not made by mlot.
    assert (defaults.columns, defaults.template_prompt, defaults.metric, defaults.max_new_tokens) == (None,) * 4
    assert (defaults.limit, defaults.tracking_uri) == (None, None)
    for bad in (["--columns", "prompt=question"], ["--columns", "prompt"], ["--metric", "bleu"]):
        with pytest.raises(SystemExit):
            _parser().parse_args(["eval", "--model", "m", "--data", "d", *bad])


def test_generate_parser():
    from orchestrator.generate import cmd_generate

    args = _parser().parse_args(["generate", "job.yaml", "--output", "out.jsonl", "--set", "data.limit=10"])
    assert args.func is cmd_generate
    assert (args.config, args.output, args.field, args.teacher, args.set) == (
        "job.yaml", "out.jsonl", None, None, ["data.limit=10"])  # field: teacher_answer (prediction with --model)
    with pytest.raises(SystemExit):
        _parser().parse_args(["generate", "job.yaml"])  # --output is required


# ------------------------------------------------------------------------------------------- end to end


def _labeled_file(path: Path, n: int) -> Path:
    """Quickstart rows as a local jsonl with an id and a list of gold answers (like QED's)."""
    from workers.data.tasks import quickstart_dataset

    with path.open("w") as f:
        for i, row in enumerate(quickstart_dataset()[:n]):
            f.write(json.dumps({"id": i, "question": row["prompt"], "answers": [row["answer"], "unknown"]}) + "\n")
    return path


def _job(tmp_path: Path, source: Path, *extra: str):
    from orchestrator.configuration import load_config

    return load_config(QUICKSTART, [
        "name=gen", f"output_dir={tmp_path}", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
        f"data.source={source}", "data.columns.prompt=question", "data.columns.answer=answers", "data.limit=200",
        "train.steps=4", "train.warmup_steps=1", "train.checkpoint_every=4", "train.eval_every=null",
        "teachers.0.pretrain.steps=100", *extra])


def test_generate_rejects_bad_requests_before_starting_anything(tmp_path):
    from orchestrator.generate import run_generate

    job = _job(tmp_path, _labeled_file(tmp_path / "qa.jsonl", 20))
    with pytest.raises(UserError, match="already a column"):
        run_generate(job, str(tmp_path / "out.jsonl"), field="answers")
    with pytest.raises(UserError, match="teacher-sp"):
        run_generate(job, str(tmp_path / "out.jsonl"), teacher="nobody")
    assert not (tmp_path / "out.jsonl").exists()


@pytest.mark.integration
def test_generate_distill_eval_end_to_end(tmp_path, local_ray, monkeypatch):
    from helpers import metric_history
    from mlflow import MlflowClient

    from orchestrator.configuration import apply_overrides, config_from_dict
    from orchestrator.driver import run_distill
    from orchestrator.evaluation import run_eval
    from orchestrator.generate import run_generate
    from specs import Template

    # MLflow puts a new experiment's artifacts under ./mlruns of the working directory: keep them in tmp.
    monkeypatch.chdir(tmp_path)
    source = _labeled_file(tmp_path / "qa.jsonl", 200)
    job = _job(tmp_path, source)

    out = run_generate(job, str(tmp_path / "labels" / "teacher.jsonl"), field="teacher_answer", max_new_tokens=8)
    labeled = [json.loads(line) for line in Path(out).read_text().splitlines()]
    assert 0 < len(labeled) <= 200  # rows answered with an empty line are left out
    originals = {r["id"]: r for r in map(json.loads, source.read_text().splitlines())}
    for row in labeled:
        assert set(row) == {"id", "question", "answers", "teacher_answer"}
        assert ({k: row[k] for k in ("question", "answers")}
                == {k: originals[row["id"]][k] for k in ("question", "answers")})
        assert isinstance(row["teacher_answer"], str) and row["teacher_answer"].strip()
        assert "\n" not in row["teacher_answer"]
    saved_teacher = tmp_path / "gen" / "teachers" / "teacher-sp"
    assert (saved_teacher / "config.json").exists()  # pretrained and saved like `mlot distill` does

    # A case whose answers are known: the saved teacher, scored against its own greedy answers.
    own = run_eval(str(saved_teacher), out, {"prompt": "question", "answer": "teacher_answer"},
                   template=job.teachers[0].template, max_prompt_length=96, max_new_tokens=8, limit=30, metric="qa")
    assert (own["n"], own["exact_match"], own["f1"]) == (30, 100.0, 100.0)

    # The unlabeled setting: the same job trains on the teacher's answers (and reuses the saved teacher), with a
    # second, untrained teacher and per-sample confidence weights: the trained teacher, which finds its own
    # answers likely, must get nearly all of it. (Across tokenizers: tests/test_on_policy.py.)
    unlabeled = apply_overrides(job, [f"data.source={out}", "data.columns.answer=teacher_answer", "data.limit=null"])
    raw = unlabeled.model_dump(mode="json")
    raw["teachers"].append({**raw["teachers"][0], "name": "teacher-random", "pretrain": {"steps": 0}})
    raw["loss"]["teacher_mix"] = "confidence"
    summary = run_distill(config_from_dict(raw), evaluate=False)  # scored by run_eval below
    assert Path(summary.export_dir, "config.json").exists()
    weights = {t: [v for _, v in metric_history(summary, f"train/{t}/mix_weight")]
               for t in ("teacher-sp", "teacher-random")}
    assert len(weights["teacher-sp"]) == 4 and min(weights["teacher-sp"]) > 0.9
    assert all(a + b == pytest.approx(1.0) for a, b in zip(weights["teacher-sp"], weights["teacher-random"]))
    assert min(v for _, v in metric_history(summary, "train/teacher-sp/selected")) >= 0.9

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    scores = run_eval(summary.export_dir, str(source), {"prompt": "question", "answer": "answers"},
                      template=Template(prompt="{prompt}"), max_prompt_length=96, max_new_tokens=8, limit=30,
                      tracking_uri=uri, run_name="e2e", metric="all")
    assert scores["n"] == 30
    client = MlflowClient(uri)
    run = client.search_runs([client.get_experiment_by_name("mlot-eval").experiment_id])[0]
    assert run.info.run_name == "e2e" and run.info.status == "FINISHED"
    assert run.data.metrics["eval/f1"] == pytest.approx(scores["f1"])
    assert run.data.params["model"] == summary.export_dir
    predictions = Path(client.download_artifacts(run.info.run_id, "predictions.jsonl", str(tmp_path)))
    lines = [json.loads(line) for line in predictions.read_text().splitlines()]
    assert len(lines) == 30 and lines[0]["gold"] == originals[0]["answers"]
    # The scores are those of the logged predictions (recomputed from the artefact).
    from workers.data.metrics import score
    again = score([x["prediction"] for x in lines], [x["gold"] for x in lines])
    assert (scores["exact_match"], scores["f1"]) == (again["exact_match"], again["f1"])


@pytest.mark.integration
def test_cli_distill_reads_plainly_stops_on_ctrl_c_resumes_and_its_student_carries_its_recipe(tmp_path):
    """A newcomer's job, run as they would (``mlot distill`` in a shell): a template over fields other than
    prompt/answer; the first Ctrl-C checkpoints and stops (exit 130), ``--resume`` continues from that step, each
    step logged once; the console shows each line once and no framework chatter, and ends with the summary table;
    the exported student is then scored and answers with no template flags, exactly as with them."""
    import signal
    import subprocess
    import sys

    import yaml
    from mlflow import MlflowClient

    from orchestrator.cli import main
    from orchestrator.evaluation import model_answers, model_recipe, run_eval
    from specs import Template
    from workers.data.tasks import load_rows, quickstart_dataset

    source = tmp_path / "qa.jsonl"
    with source.open("w") as f:
        for i, row in enumerate(quickstart_dataset()[:240]):
            f.write(json.dumps({"id": i, "lead": "Answer in two words.", "question": row["prompt"],
                                "answers": [row["answer"]]}) + "\n")
    template = {"prompt": "{lead}\nQ: {question}\nA:", "answer": " {answer}"}
    config = yaml.safe_load(QUICKSTART.read_text())
    config.update(name="newcomer", output_dir=str(tmp_path / "runs"), tracking={"uri": f"sqlite:///{tmp_path}/m.db"})
    config["data"].update(source=str(source), columns={"lead": "lead", "question": "question", "answer": "answers"},
                          limit=None)
    config["student"]["template"] = template
    config["teachers"][0].update(template=template, pretrain={"steps": 0})
    # Far more steps than pass before the Ctrl-C arrives; the checkpoint is the one the stop writes.
    config["train"].update(steps=400, warmup_steps=1, checkpoint_every=400, eval_every=3)
    config["eval"] = {"max_rows": 16, "num_tasks": 1}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(config))
    mlot = str(Path(sys.executable).with_name("mlot"))

    def assert_plain(out: str) -> list[str]:
        lines = [line for line in out.splitlines() if line.strip()]
        assert len(lines) == len(set(lines)), [x for x in lines if lines.count(x) > 1]
        for chatter in ("Loading weights", "Reporting training result", "RayTrainWorker", "TrainController", "it/s"):
            assert chatter not in out, chatter
        return [x for x in lines if x.startswith("[mlot] step ")]

    proc = subprocess.Popen([mlot, "distill", "job.yaml"], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    seen = []
    for line in proc.stdout:  # wait for training progress, then press Ctrl-C once
        seen.append(line)
        if line.startswith("[mlot] step "):
            proc.send_signal(signal.SIGINT)
            break
    out = "".join(seen) + proc.communicate(timeout=300)[0]
    assert proc.returncode == 130 and "stopped at step" in out, out[-3000:]
    assert "eta" in assert_plain(out)[0]
    stopped = int(out.split("stopped at step ")[1].split(";")[0].split()[0])
    assert 0 < stopped < 400

    steps = stopped + 5
    run = subprocess.run([mlot, "distill", "job.yaml", "--resume", "--set", f"train.steps={steps}"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    progress = assert_plain(run.stdout + run.stderr)
    assert len(progress) == 5 and progress[-1].startswith(f"[mlot] step {steps}/{steps} [####################] 100%")
    assert "done in" in progress[-1]
    table = run.stdout[run.stdout.index("student "):]
    assert "exact match" in table and "eval CE" in table and str(tmp_path / "runs" / "newcomer" / "final") in table
    client = MlflowClient(f"sqlite:///{tmp_path}/m.db")
    [logged] = client.search_runs([client.get_experiment_by_name("mlot").experiment_id])
    logged_steps = [m.step for m in client.get_metric_history(logged.info.run_id, "train/loss")]
    assert sorted(logged_steps) == list(range(1, steps + 1)) and logged.info.status == "FINISHED"

    model = str(tmp_path / "runs" / "newcomer" / "final")
    flags = dict(columns={"lead": "lead", "question": "question", "answer": "answers"}, template=Template(**template),
                 max_prompt_length=config["data"]["max_prompt_length"],
                 max_new_tokens=config["data"]["max_answer_length"], metric="qa")
    def scores(**given):
        return {k: v for k, v in run_eval(model, str(source), limit=24, **given).items() if k != "seconds"}

    assert scores() == scores(**flags)
    assert main(["eval", "--model", model, "--data", str(source), "--limit", "24"]) == 0

    out = tmp_path / "answers.jsonl"
    assert main(["generate", "--model", model, "--data", str(source), "--limit", "24", "--output", str(out)]) == 0
    written = [json.loads(x) for x in out.read_text().splitlines()]
    rows = load_rows(str(source), columns=flags["columns"], limit=24)
    explicit = model_recipe(model, template=flags["template"], columns=flags["columns"],
                            max_prompt_length=flags["max_prompt_length"], max_new_tokens=flags["max_new_tokens"])
    assert [w["prediction"] for w in written] == model_answers(model, explicit, rows)
    assert [w["id"] for w in written] == list(range(24)) and set(written[0]) == {"id", "lead", "question", "answers",
                                                                                 "prediction"}
    # Without its recipe the same folder is a model not made by mlot: the {prompt} default cannot fill the template.
    (Path(model) / "mlot_recipe.json").unlink()
    with pytest.raises(UserError, match="prompt"):
        run_eval(model, str(source), limit=4)
