"""ULD, KL, SFT and MinED on cases checkable by hand, with real (on-the-fly) tokenizers for MinED."""

import math

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import mlot
from mlot.baselines import VocabMap, edit_distance


def _one_row(probs: list[list[float]], prompt: int = 2):
    """Logits [1, L, V] whose answer rows have exactly these probabilities, and labels for them."""
    p = torch.tensor(probs, dtype=torch.float64)
    L = prompt + len(probs) + 1
    logits = torch.zeros(1, L, p.shape[1], dtype=torch.float64)
    logits[0, prompt - 1: prompt - 1 + len(probs)] = p.log()
    labels = torch.full((1, L), -100)
    labels[0, prompt: prompt + len(probs)] = 0
    return logits, labels


def test_uld_by_hand():
    t, lt = _one_row([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]])
    s, ls = _one_row([[0.4, 0.6], [0.7, 0.3], [0.5, 0.5]])
    r = mlot.uld(s, ls, t, lt)
    # sorted: t [.5,.3,.2] vs s [.6,.4,0] -> .1+.1+.2 ; t [.8,.1,.1] vs s [.7,.3,0] -> .1+.2+.1 ; mean over 2 rows
    assert float(r.distill) == pytest.approx((0.4 + 0.4) / 2)
    assert r.alpha == 1.5


def test_forward_and_reverse_kl_by_hand():
    t, lt = _one_row([[0.5, 0.25, 0.25]])
    s, ls = _one_row([[0.25, 0.5, 0.25]])
    fwd = mlot.kl_distill(s, ls, t, lt)
    rev = mlot.kl_distill(s, ls, t, lt, direction="reverse")
    expected = 0.5 * math.log(2) + 0.25 * math.log(0.5)
    assert float(fwd.distill) == pytest.approx(expected)
    assert float(rev.distill) == pytest.approx(expected)  # symmetric here by construction
    s2, ls2 = _one_row([[0.7, 0.2, 0.1]])
    assert float(mlot.kl_distill(s2, ls2, t, lt).distill) == pytest.approx(
        sum(a * math.log(a / b) for a, b in zip([0.5, 0.25, 0.25], [0.7, 0.2, 0.1])))


def test_kl_refuses_different_vocabularies():
    t, lt = _one_row([[0.5, 0.3, 0.2]])
    s, ls = _one_row([[0.4, 0.6]])
    with pytest.raises(ValueError, match="one vocabulary"):
        mlot.kl_distill(s, ls, t, lt)


def test_kl_top_k_payload_is_forward_only():
    t, lt = _one_row([[0.5, 0.3, 0.2]])
    with pytest.raises(ValueError, match="top_k=None"):
        mlot.kl_distill(t, lt, t, lt, direction="reverse", top_k=2)
    assert float(mlot.kl_distill(t, lt, t, lt, top_k=2).distill) == pytest.approx(0.0, abs=1e-12)


def test_sft_is_zero_with_graph_and_ce_matches_hf():
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    ids = torch.randint(0, 50, (2, 9))
    labels = ids.clone()
    labels[:, :4] = -100
    out = model(input_ids=ids, labels=labels)
    torch.testing.assert_close(mlot.causal_lm_loss(out.logits, labels), out.loss)
    r = mlot.sft(out.logits, labels)
    assert float(r.loss) == 0.0 and r.distill.requires_grad


def _word_tokenizer(vocab: list[str]) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")


TEACHER_VOCAB = ["[UNK]", "[PAD]", "hello", "world", "new", "york", "cat"]
STUDENT_VOCAB = ["[UNK]", "[PAD]", "hel", "lo", "world", "newyork", "hello", "dog", "york", "new"]


def test_edit_distance_and_alignment_by_hand():
    assert edit_distance("kitten", "sitting") == 3
    assert mlot.mined_alignment(["hello", "world"], ["hel", "lo", "world"]) == [0, 0, 1]
    assert mlot.mined_alignment(["▁new", "▁york"], ["Ġnewyork"]) in ([0], [1])


def test_vocab_map_prefers_exact_then_nearest():
    vm = VocabMap(_word_tokenizer(TEACHER_VOCAB), _word_tokenizer(STUDENT_VOCAB))
    assert vm(TEACHER_VOCAB.index("hello")) == STUDENT_VOCAB.index("hello")
    assert vm(TEACHER_VOCAB.index("york")) == STUDENT_VOCAB.index("york")
    assert vm(TEACHER_VOCAB.index("cat")) == STUDENT_VOCAB.index("[UNK]")  # the student has no piece for it


def test_mined_moves_teacher_mass_onto_mapped_student_tokens():
    tt, st = _word_tokenizer(TEACHER_VOCAB), _word_tokenizer(STUDENT_VOCAB)
    # teacher answer "hello world": row 0 all mass on "hello", row 1 on "world"
    t, lt = _one_row([[1e-9] * 2 + [1 - 5e-9] + [1e-9] * 4, [1e-9] * 3 + [1 - 5e-9] + [1e-9] * 3])
    lt[0, 2:4] = torch.tensor([2, 3])
    # student answer "hel lo world": its target at "hel"/"lo" rows is "hello", at "world" row "world"
    V = len(STUDENT_VOCAB)
    s = torch.zeros(1, 6, V, dtype=torch.float64, requires_grad=True)
    ls = torch.full((1, 6), -100)
    ls[0, 2:5] = torch.tensor([2, 3, 4])
    r = mlot.mined(s, ls, t, lt, teacher_tokenizer=tt, student_tokenizer=st, top_k=1)
    # uniform student, one-hot target: KL = log V at every row
    assert float(r.distill) == pytest.approx(math.log(V), rel=1e-6)
    r.distill.backward()
    g = s.grad[0]
    assert g[1, STUDENT_VOCAB.index("hello")] < 0 and g[2, STUDENT_VOCAB.index("hello")] < 0
    assert g[3, STUDENT_VOCAB.index("world")] < 0


def test_method_registry_has_every_method():
    assert set(mlot.METHODS) == {"multilevel_ot", "uld", "sft", "kl", "mined", "aligned"}
    assert [m.name for m in mlot.METHODS.values() if not m.needs_teacher] == ["sft"]
