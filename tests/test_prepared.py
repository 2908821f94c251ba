"""The one tokenisation pass (``workers.data.prepared``): exactly what per-row encoding gives, the same answer text on
every side (three real tokenizers, a chat template, cut answers), a fingerprint cache, parallel processes that
change nothing, bad rows named by file and line, and a cache on a storage URI."""

import json
import random
import unicodedata
from pathlib import Path

import pytest
from helpers import quickstart_job

from mlot.spans import IGNORE_INDEX
from workers.data.answer_cut import encode_for_all
from workers.data.encoding import BadRowError, encode_example
from workers.data.prepared import STUDENT, PreparedData, job_models, open_data, prepare, teacher_key
from workers.data.tasks import load_rows
from workers.models import load_tokenizer

QED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "qed" / "validation.jsonl"
TEKKEN_CHAT = {"name": "teacher-tekken", "tokenizer": "builtin:tekken", "template": {"chat": True},
               "model_config": {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
                                "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2,
                                "vocab_size": 131072, "max_position_embeddings": 512}}


def qed_job(tmp_path, *extra):
    """Student WordPiece, teachers SentencePiece (plain template) and Tekken (its chat template), on QED rows."""
    return quickstart_job(tmp_path, "qed", f"data.source={QED}", "data.columns.context=context",
                          "data.columns.prompt=question", "data.columns.answer=answers", "data.limit=60",
                          "student.template.prompt={context}\nQ: {prompt}\nA:", "data.max_prompt_length=200",
                          *extra, add_teacher=TEKKEN_CHAT)


def _norm(text: str) -> str:
    """What every tokenizer keeps: lower case, no accents, no whitespace (WordPiece is uncased and splits
    punctuation off)."""
    text = unicodedata.normalize("NFKD", text.lower())
    return "".join(ch for ch in text if not unicodedata.combining(ch) and not ch.isspace())


@pytest.mark.skipif(not QED.exists(), reason="shared QED sample not present")
def test_every_model_spans_the_same_answer_text_and_matches_per_row_encoding(tmp_path):
    job = qed_job(tmp_path, "data.max_answer_length=6")  # short: many answers are cut
    data = prepare(job, str(tmp_path / "cache"))
    assert data.counts["truncated"] > 0 and data.sizes["train"] + data.sizes["eval"] == 60
    opened = open_data(data)
    models = [(m, load_tokenizer(m.tokenizer), m.template) for m in job_models(job)]
    for split in ("train", "eval"):
        indices = list(range(data.sizes[split]))
        for i, row in zip(indices, opened.rows(split, indices)):
            texts = []
            for m, tok, template in models:
                ids, labels = opened.examples(split, [i], m.key)[0]
                # The stored ids are exactly what encoding the (cut) row with this model gives.
                assert (ids, labels) == encode_example(row, tok, template, 200, 6)
                span = [t for t, lab in zip(ids, labels) if lab != IGNORE_INDEX]
                assert 0 < len(span) <= 6
                texts.append(_norm(tok.decode(span, skip_special_tokens=True)))
            assert len(set(texts)) == 1 and texts[0] == _norm(row["answer"]), (row["answer"], texts)
            assert row["__answer_cut__"] == (row["answer"] not in row["answer_all"])


def test_the_pass_is_cached_by_fingerprint_and_parallel_processes_change_nothing(tmp_path):
    job = quickstart_job(tmp_path, "cached")
    first = prepare(job, str(tmp_path / "a"), num_proc=1)
    again = prepare(job, str(tmp_path / "a"), num_proc=2)  # num_proc is not part of the result
    assert not first.cache_hit and again.cache_hit and again.fingerprint == first.fingerprint
    parallel = prepare(job, str(tmp_path / "b"), num_proc=2)
    assert parallel.fingerprint == first.fingerprint and not parallel.cache_hit
    a, b = PreparedData(first), PreparedData(parallel)
    for split in ("train", "eval"):
        assert a.tables[split].to_pydict() == b.tables[split].to_pydict()
    # What the data depends on changes the fingerprint: a length limit, a template, the split seed.
    for change in ("data.max_answer_length=8", "teachers.0.template.prompt=Q: {prompt}", "train.seed=1"):
        other = prepare(quickstart_job(tmp_path, "cached", change), str(tmp_path / "a"))
        assert other.fingerprint != first.fingerprint and not other.cache_hit, change
    # ...and neither the job's name, nor its steps, nor where it writes.
    same = prepare(quickstart_job(tmp_path / "elsewhere", "other", "train.steps=9"), str(tmp_path / "a"))
    assert same.cache_hit and same.fingerprint == first.fingerprint


def test_the_split_is_the_seeded_holdout_and_matches_per_row_encoding(tmp_path):
    job = quickstart_job(tmp_path, "split")
    data = prepare(job, str(tmp_path / "cache"))
    rows = load_rows("builtin:quickstart", limit=400)
    random.Random(job.train.seed).shuffle(rows)
    n_eval = int(400 * job.data.eval_fraction)
    opened = open_data(data)
    assert [r["__record__"] for r in opened.rows("eval", range(n_eval))] == [r["__record__"] for r in rows[:n_eval]]
    assert [r["__record__"] for r in opened.rows("train", range(400 - n_eval))] == \
        [r["__record__"] for r in rows[n_eval:]]
    tokenizers = [(load_tokenizer(m.tokenizer), m.template) for m in job_models(job)]
    for i in (0, 17, 359):
        _, _, encoded = encode_for_all(rows[n_eval + i], tokenizers, job.data.max_prompt_length,
                                       job.data.max_answer_length)
        assert [opened.examples("train", [i], key)[0] for key in (STUDENT, teacher_key("teacher-sp"))] == encoded


def _jsonl(path: Path, rows: list, blank_after: int) -> None:
    lines = [json.dumps(r) for r in rows]
    lines.insert(blank_after, "")  # a blank line: records and lines differ from here on
    path.write_text("\n".join(lines) + "\n")


def test_a_bad_row_names_its_file_and_line_or_is_skipped_and_counted(tmp_path):
    path = tmp_path / "rows.jsonl"
    rows = [{"prompt": f"What is {i}?", "answer": str(i)} for i in range(30)]
    rows[12]["answer"] = "   "
    _jsonl(path, rows, blank_after=3)
    job = quickstart_job(tmp_path, "bad", f"data.source={path}", "data.eval_fraction=0.2")
    with pytest.raises(BadRowError, match=rf"row 12, field 'answer': empty .*{path}, line 14"):
        prepare(job, str(tmp_path / "cache"))
    skipping = prepare(quickstart_job(tmp_path, "bad", f"data.source={path}", "data.eval_fraction=0.2",
                                      "data.on_bad_row=skip"), str(tmp_path / "cache"))
    assert skipping.counts["skipped"] == 1 and skipping.sizes == {"train": 23, "eval": 6}
    kept = open_data(skipping)
    records = {r["__record__"] for split in ("train", "eval")
               for r in kept.rows(split, range(skipping.sizes[split]))}
    assert records == set(range(30)) - {12}


def test_a_cache_on_a_storage_uri_is_built_once_and_read_back_by_another_process(tmp_path):
    job = quickstart_job(tmp_path, "uri")
    uri = f"file://{tmp_path}/shared-cache"
    data = prepare(job, uri)
    assert data.path.startswith("file://") and (tmp_path / "shared-cache" / data.fingerprint / "mlot.json").exists()
    assert prepare(job, uri).cache_hit
    local = prepare(job, str(tmp_path / "local"))
    # A worker on another node: it copies the folder down once and reads the same rows.
    assert PreparedData(data).examples("train", [0, 5], STUDENT) == PreparedData(local).examples("train", [0, 5],
                                                                                                  STUDENT)


def test_no_eval_split_prepares_only_training_rows(tmp_path):
    data = prepare(quickstart_job(tmp_path, "no-eval", "data.eval_fraction=0", "data.limit=50",
                                   "train.eval_every=null"), str(tmp_path))
    opened = open_data(data)
    assert data.sizes == {"train": 50, "eval": 0} and opened.size("eval") == 0 and opened.size("train") == 50
