"""One answer text on every side: teacher and student spans decode to the same string, also when the
answer is cut to fit ``max_answer_length`` and when a model uses its chat template (three real tokenizers)."""

import itertools
import unicodedata

import pytest

from mlot.spans import IGNORE_INDEX
from specs import Template
from workers.data.answer_cut import ANSWER_CUT, cut_answer
from workers.data.encoding import BadRowError, encode_example
from workers.models import load_tokenizer

MODELS = {  # (tokenizer, template): WordPiece, SentencePiece, Tekken byte-BPE with its chat format
    "wordpiece": ("builtin:wordpiece", Template()),
    "sentencepiece": ("builtin:sentencepiece", Template(prompt="Q: {prompt}\nA:")),
    "tekken-chat": ("builtin:tekken", Template(chat=True)),
}
ROWS = [
    {"prompt": "Who publishes it?", "answer": "Encyclopaedia Britannica, the oldest English-language general "
                                              "encyclopaedia still in print, by Britannica Inc."},
    {"prompt": "Who found X-rays?", "answer": "Wilhelm Conrad Röntgen, of Germany"},
    {"prompt": "Colour?", "answer": "yellow"},
    {"prompt": "Longest word?", "answer": "Pneumonoultramicroscopicsilicovolcanoconiosis is a word"},
]


def _norm(text: str) -> str:
    """What every tokenizer keeps: lower case (WordPiece is uncased), no accents (it strips them), and no
    whitespace (WordPiece decodes "english-language" as "english - language")."""
    text = unicodedata.normalize("NFKD", text.lower())
    return "".join(ch for ch in text if not unicodedata.combining(ch) and not ch.isspace())


def _span_text(row, tok, template) -> str:
    """The decoded answer span of a row in one model (its EOS left out)."""
    ids, labels = encode_example(row, tok, template, 64, 1 << 20)
    span = [i for i, lab in zip(ids, labels) if lab != IGNORE_INDEX]
    if span and span[-1] == tok.eos_token_id:
        span = span[:-1]
    return tok.decode(span, skip_special_tokens=True)


@pytest.fixture(scope="module")
def models():
    return {name: (load_tokenizer(spec), template) for name, (spec, template) in MODELS.items()}


@pytest.mark.parametrize("max_answer_length", [4, 7, 12, 64])
@pytest.mark.parametrize("pair", list(itertools.combinations(MODELS, 2)))
def test_every_side_spans_the_same_answer_text(models, pair, max_answer_length):
    chosen = [models[name] for name in pair]
    for row in ROWS:
        cut, was_cut = cut_answer(row, chosen, max_answer_length)
        texts = [_norm(_span_text(cut, tok, tpl)) for tok, tpl in chosen]
        assert texts[0] == texts[1] == _norm(cut["answer"]), (pair, max_answer_length, texts)
        for tok, tpl in chosen:  # within the limit, and the cut text is a prefix of the original answer
            ids, labels = encode_example(cut, tok, tpl, 64, 1 << 20)
            assert sum(lab != IGNORE_INDEX for lab in labels) <= max_answer_length
        assert row["answer"].startswith(cut["answer"]) and was_cut == (cut["answer"] != row["answer"])
        if was_cut:  # no EOS on a cut answer; the original stays a gold answer for scoring
            assert cut[ANSWER_CUT] and cut["answer_all"] == [row["answer"]]
            assert all(encode_example(cut, t, p, 64, 1 << 20)[0][-1] != t.eos_token_id for t, p in chosen)


def test_the_cut_is_the_longest_word_prefix_that_fits(models):
    chosen = list(models.values())
    row = ROWS[0]
    cut, _ = cut_answer(row, chosen, 12)
    words = row["answer"].split()
    n = len(cut["answer"].split())
    longer = {**cut, "answer": " ".join(words[:n + 1])}
    assert any(sum(lab != IGNORE_INDEX for lab in encode_example(longer, t, p, 64, 1 << 20)[1]) > 12 for t, p in chosen)


def test_a_single_overlong_word_is_cut_inside_and_an_impossible_limit_is_an_error(models):
    chosen = list(models.values())
    cut, was_cut = cut_answer(ROWS[3], chosen, 3)
    assert was_cut and 0 < len(cut["answer"]) < len("Pneumonoultramicroscopicsilicovolcanoconiosis")
    with pytest.raises(BadRowError, match="max_answer_length"):
        cut_answer({"prompt": "p", "answer": "x"}, [models["tekken-chat"]], 0)
