"""Two vocabularies related by their token strings, built once per (teacher, student) tokenizer pair.

Every token is read as a *key*, (starts a word, text) (:func:`token_key`): ``▁fresh`` (SentencePiece),
``Ġfresh`` (byte-level BPE) and a WordPiece ``fresh`` start a word; ``##water`` and a bare ``water``
continue one. Two relations are built on the keys:

* **shared classes** (exact match, :func:`mlot.identity.shared_vocab_kl`): keys present in both vocabularies.
* **the projection** (:func:`mlot.identity.projection_kl`, after X-Token's P-KL, arXiv 2605.21699): each
  student token is sent to the teacher token that *spells its beginning*: for a word start, the first piece
  of the teacher tokenizer's own encoding of " " + its text (past a bare space piece, ``▁`` / ``Ġ``: how
  digit-splitting tokenizers write " 1984"); for a continuation, its own key when the teacher has it, else
  the longest teacher continuation that is a prefix of it. The map ``f: V_s -> V_t`` pushes the student's
  distribution forward onto teacher classes, so a student that writes "freshwater" as one token is compared
  with the teacher's mass on "▁fresh" (its first piece): it may spread that mass over any of its own tokens
  that begin with it, which exact matching on equal strings cannot allow (it moves the student's mass onto
  "fresh", a token it never writes here). The map ignores context (the teacher writes " kernels" as
  "▁k|ern|els" but " kernel" as "▁kernel"): the loss corrects it for the gold tokens, where the context is
  known (:func:`mlot.identity.projection_kl`).

Both relations also mark which tokens *start a word* (the EOS token included): where both answers' tokens
start a word, the projection compares the two models given that a new word comes next, because what they
say about continuing the previous word is not comparable: after its token "field" a WordPiece student writes
"fields" as one other token, never as "field" + "##s", while a teacher that writes "▁field|s" puts the mass
of "fields" there on "s".
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

#: The longest prefix the projection looks for, in characters: longer tokens are matched by their first 24.
MAX_KEY_CHARS = 24
#: Student tokens kept per projection class (what the student side gathers per teacher class it is sent): a class
#: with more keeps its first ids, the others' mass counting as "elsewhere". The widest classes of the bundled
#: pairs are the single digits of a digit-splitting teacher (WordPiece has about 400 numbers per first digit).
MAX_MEMBERS = 1024
#: Reserved, never-trained entries (BERT's "[unused12]", Gemma's "<unused3>"): no string to match.
UNUSED = re.compile(r"\[unused\d+\]|<unused\d+>")


@dataclass(frozen=True)
class VocabMap:
    """Tokens of two vocabularies grouped into classes by their strings.

    Attributes:
        teacher_class: [V_t] long, the shared class of each teacher token, -1 where its string has no match.
        student_members: [C, m] long, the student ids of each shared class (-1 padded; m is 1 unless the
            student has several spellings of one normalised string, e.g. cased ones).
        student_shared: [V_s] bool, the student tokens in some shared class.
        coverage: what share of each vocabulary is mapped (exact match and projection), and the class counts.
        teacher_target: [V_t] long, the projection class of each teacher token (-1: no student token begins
            with it); teacher tokens with one key share a class. None on a map built without the projection.
        target_members: [P, m_p] long, the student ids projected onto each class (-1 padded).
        student_target: [V_s] long, the class each student token is projected onto (-1: none).
        teacher_start: [V_t] bool, the teacher tokens that start a word (a bare space piece and EOS included);
            None where the two vocabularies are one (nothing needs conditioning).
        target_start: [P] bool, the projection classes of word-start keys (EOS included).
        student_start: [V_s] bool, the student tokens that start a word (EOS included).
        eos_target: the projection class of the two EOS tokens (-1: none).
    """

    teacher_class: Tensor
    student_members: Tensor
    student_shared: Tensor
    coverage: dict[str, float]
    teacher_target: Tensor | None = None
    target_members: Tensor | None = None
    student_target: Tensor | None = None
    teacher_start: Tensor | None = None
    target_start: Tensor | None = None
    student_start: Tensor | None = None
    eos_target: int = -1


def token_key(token: str, wordpiece: bool, lower: bool) -> tuple[bool, str] | None:
    """(starts a word, text) of a vocabulary entry: ``▁x`` / ``Ġx`` (SentencePiece, byte-level BPE) and a
    WordPiece ``x`` start a word, ``##x`` and a bare piece continue one. None for byte-fallback and reserved
    entries and a bare space piece."""
    if token.startswith("<0x") and token.endswith(">") or UNUSED.fullmatch(token):
        return None
    if token.startswith("##"):
        start, text = False, token[2:]
    elif token[:1] in ("▁", "Ġ"):
        start, text = True, token[1:]
    else:
        start, text = wordpiece, token
    if not text:
        return None
    return start, text.lower() if lower else text


def _keys(tokenizer: Any, vocab: dict[str, int], lower: bool) -> dict[int, tuple[bool, str] | None]:
    wordpiece = sum(t.startswith("##") for t in vocab) > 0.05 * len(vocab)  # a few "##" tokens exist anywhere
    special = set(tokenizer.all_special_ids)
    keys = {i: None if i in special else token_key(t, wordpiece, lower) for t, i in vocab.items()}
    if (eos := _eos(tokenizer)) >= 0:
        keys[eos] = (True, "</eos>")  # the two EOS tokens correspond
    return keys


def vocab_map(teacher_tokenizer: Any, student_tokenizer: Any) -> VocabMap:
    """The shared classes and the projection of two tokenizers (case-folded when either side is uncased).
    Identical vocabularies map every id to itself."""
    t_vocab, s_vocab = teacher_tokenizer.get_vocab(), student_tokenizer.get_vocab()
    v_t, v_s = _size(t_vocab), _size(s_vocab)
    if t_vocab == s_vocab:
        ids = torch.arange(v_t)
        return VocabMap(ids, ids[:, None], torch.ones(v_s, dtype=torch.bool),
                        {"teacher": 1.0, "student": 1.0, "classes": float(v_t), "projected": 1.0,
                         "targets": float(v_t)}, ids, ids[:, None], ids, eos_target=_eos(teacher_tokenizer))
    lower = _uncased(teacher_tokenizer, t_vocab) or _uncased(student_tokenizer, s_vocab)
    t_keys, s_keys = _keys(teacher_tokenizer, t_vocab, lower), _keys(student_tokenizer, s_vocab, lower)
    teacher_class, members = _classes(t_keys, {i: k for i, k in s_keys.items() if k is not None}, v_t)
    student_shared = torch.zeros(v_s, dtype=torch.bool)
    student_shared[members[members >= 0]] = True
    firsts = _first_pieces(teacher_tokenizer, t_keys, {i: k for i, k in s_keys.items() if k is not None})
    teacher_target, target_members = _classes(t_keys, firsts, v_t)
    target_members = target_members[:, :MAX_MEMBERS]
    student_target = torch.full((v_s,), -1, dtype=torch.long)
    kept = target_members >= 0
    student_target[target_members[kept]] = torch.arange(target_members.shape[0])[:, None].expand_as(kept)[kept]
    teacher_start = _starts(t_vocab, t_keys, v_t)
    target_start = torch.zeros(target_members.shape[0], dtype=torch.bool)
    target_start[teacher_target[teacher_start & (teacher_target >= 0)]] = True
    coverage = {"teacher": float((teacher_class >= 0).float().mean()), "student": float(student_shared.float().mean()),
                "classes": float(members.shape[0] if (teacher_class >= 0).any() else 0),
                "projected": float((target_members >= 0).sum()) / v_s,
                "targets": float(target_members.shape[0] if (teacher_target >= 0).any() else 0)}
    eos = _eos(teacher_tokenizer)
    return VocabMap(teacher_class, members, student_shared, coverage, teacher_target, target_members, student_target,
                    teacher_start, target_start, _starts(s_vocab, s_keys, v_s),
                    int(teacher_target[eos]) if eos >= 0 else -1)


def _eos(tokenizer: Any) -> int:
    """The EOS token's id, -1 when the tokenizer has none."""
    return -1 if tokenizer.eos_token_id is None else int(tokenizer.eos_token_id)


def _classes(t_keys: dict[int, tuple[bool, str] | None], s_keys: dict[int, tuple[bool, str]],
             v_t: int) -> tuple[Tensor, Tensor]:
    """Classes of the keys both sides have: [V_t] the class of each teacher id (-1: none) and [C, m] the
    student ids in each class (-1 padded)."""
    by_key: dict[tuple[bool, str], list[int]] = {}
    for i, key in s_keys.items():
        by_key.setdefault(key, []).append(i)
    shared = sorted({k for k in t_keys.values() if k is not None} & set(by_key))
    index = {k: c for c, k in enumerate(shared)}
    teacher_class = torch.full((v_t,), -1, dtype=torch.long)
    for i, key in t_keys.items():
        if key in index:
            teacher_class[i] = index[key]
    width = max((len(by_key[k]) for k in shared), default=1)
    members = torch.full((max(len(shared), 1), width), -1, dtype=torch.long)
    for c, k in enumerate(shared):
        members[c, :len(by_key[k])] = torch.tensor(by_key[k])
    return teacher_class, members


def _first_pieces(teacher_tokenizer: Any, t_keys: dict[int, tuple[bool, str] | None],
                  s_keys: dict[int, tuple[bool, str]]) -> dict[int, tuple[bool, str]]:
    """Student id -> the key of the teacher token that spells its beginning (ids with none are left out)."""
    teacher_keys = {k for k in t_keys.values() if k is not None}
    out = {i: k for i, k in s_keys.items() if not k[0] and k in teacher_keys}
    starts = [i for i, k in s_keys.items() if k[0] and k[1] != "</eos>"]
    encoded = teacher_tokenizer([" " + s_keys[i][1] for i in starts], add_special_tokens=False)["input_ids"]
    for i, ids in zip(starts, encoded):
        first = next((t_keys.get(t) for t in ids if t_keys.get(t) is not None), None)  # past a bare space piece
        if first is not None:
            out[i] = first
    for i, (start, text) in s_keys.items():
        if i not in out and not start:  # a continuation the teacher lacks: its longest teacher prefix
            for n in range(min(len(text), MAX_KEY_CHARS), 0, -1):
                if (False, text[:n]) in teacher_keys:
                    out[i] = (False, text[:n])
                    break
    out.update({i: k for i, k in s_keys.items() if k == (True, "</eos>")})
    return out


def _starts(vocab: dict[str, int], keys: dict[int, tuple[bool, str] | None], v: int) -> Tensor:
    """[V] bool: the tokens whose key starts a word, EOS and bare space pieces ("▁", "Ġ") included."""
    out = torch.zeros(v, dtype=torch.bool)
    out[[i for i, k in keys.items() if k is not None and k[0]]] = True
    out[[i for t, i in vocab.items() if t in ("▁", "Ġ")]] = True
    return out


def _size(vocab: dict[str, int]) -> int:
    return max(vocab.values()) + 1


def _uncased(tokenizer: Any, vocab: dict[str, int]) -> bool:
    return bool(getattr(tokenizer, "do_lower_case", False)) or not any(
        t != t.lower() for t in list(vocab)[:20000] if t.isalpha())
