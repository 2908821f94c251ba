"""SQuAD-style scores on hand-computed cases, and greedy answers from a real tiny model."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from specs import Template
from workers.data.metrics import exact_match, gold_answers, normalize, score, token_f1
from workers.generation import greedy_answers
from workers.models import load_tokenizer


def test_normalize_like_squad():
    assert normalize("The  Eiffel-Tower!") == "eiffeltower"
    assert normalize("an apple, a pear") == "apple pear"


def test_exact_match_takes_the_best_gold():
    assert exact_match("the Beatles", ["Rolling Stones", "Beatles"]) == 1.0
    assert exact_match("Beatles band", ["Beatles"]) == 0.0


def test_token_f1_by_hand():
    # pred tokens {wilhelm, conrad, rontgen}; gold {wilhelm, conrad, röntgen, of, germany}: 2 common
    p, r = 2 / 3, 2 / 5
    assert token_f1("Wilhelm Conrad Rontgen",
                    ["Wilhelm Conrad Röntgen , of Germany"]) == pytest.approx(2 * p * r / (p + r))
    assert token_f1("x", ["y", "x"]) == 1.0
    assert token_f1("", ["y"]) == 0.0


def test_score_is_percent_mean():
    s = score(["yellow", "red"], [["yellow"], ["blue"]])
    assert s == {"exact_match": 50.0, "f1": 50.0}


def test_gold_answers_prefers_the_full_list():
    assert gold_answers({"answer": "a", "answer_all": ["a", "b"]}) == ["a", "b"]
    assert gold_answers({"answer": "a"}) == ["a"]


def test_greedy_answers_first_line_of_new_tokens():
    tok = load_tokenizer("builtin:wordpiece")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2, bos_token_id=101,
                                         eos_token_id=102, pad_token_id=0))
    rows = [{"prompt": "What colour is a banana?", "answer": "yellow"}, {"prompt": "Hi", "answer": "x"}]
    out = greedy_answers(model, tok, Template(), rows, 32, 5)
    assert len(out) == 2 and all(isinstance(o, str) and "\n" not in o for o in out)
    # Left padding must not change a row's answer: the batch agrees with each row alone.
    assert out == [greedy_answers(model, tok, Template(), [r], 32, 5)[0] for r in rows]
