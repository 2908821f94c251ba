"""The vocabulary map of a job's (teacher, student) tokenizer pair (``mlot.vocab.vocab_map``), built once per
process: both sides need it, the teacher for the exact-match term's payload, the student for its side of it."""

from __future__ import annotations

import functools
from typing import Any

from mlot.vocab import VocabMap, vocab_map
from workers.models import load_tokenizer


@functools.lru_cache(maxsize=8)
def pair_map(teacher_tokenizer: str, teacher_trust: bool, student_tokenizer: str, student_trust: bool) -> VocabMap:
    """The :func:`mlot.vocab.vocab_map` of two tokenizer specs, built once per process."""
    return vocab_map(load_tokenizer(teacher_tokenizer, teacher_trust), load_tokenizer(student_tokenizer, student_trust))


def teacher_map(teacher: Any, student: Any) -> VocabMap:
    """The map of a job's teacher (``TeacherConfig``) to its student (``StudentConfig``)."""
    return pair_map(teacher.tokenizer_name, teacher.trust_remote_code, student.tokenizer_name,
                    student.trust_remote_code)
