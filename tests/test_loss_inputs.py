"""Bad input gets a clear ValueError naming what is wrong and where."""

import pytest
import torch
from helpers import make_batch

import mlot


@pytest.fixture()
def batch():
    s, ls = make_batch([4, 5], [3, 3], 30, seed=1)
    t, lt = make_batch([3, 6], [2, 2], 40, seed=2)
    return s, ls, t, lt


@pytest.mark.parametrize("mode", ["paper", "reference"])
def test_mismatched_batch_sizes(batch, mode):
    s, ls, t, lt = batch
    with pytest.raises(ValueError, match="batch size mismatch"):
        mlot.multilevel_ot(s, ls, t[:1], lt[:1], mode=mode)


def test_labels_without_answer_name_the_sample(batch):
    s, ls, t, lt = batch
    lt = lt.clone()
    lt[1] = -100
    with pytest.raises(ValueError, match=r"teacher_labels: sample\(s\) \[1\] have no answer token"):
        mlot.multilevel_ot(s, ls, t, lt)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("side", ["student", "teacher"])
def test_non_finite_logits_name_the_sample(batch, bad, side):
    s, ls, t, lt = (x.clone() for x in batch)
    if side == "student":
        s[1, 4, 7] = bad
    else:
        t[1, 3, 2] = bad
    with pytest.raises(ValueError, match=rf"{side}_logits: non-finite .* sample\(s\) \[1\]"):
        mlot.multilevel_ot(s, ls, t, lt)


def test_non_finite_outside_answer_is_ignored(batch):
    s, ls, t, lt = (x.clone() for x in batch)
    s[0, 0, 0] = float("nan")  # a prompt row: never read
    assert torch.isfinite(mlot.multilevel_ot(s, ls, t, lt).distill)


def test_unknown_parameter_lists_allowed(batch):
    with pytest.raises(ValueError, match=r"unknown MultiLevelOT parameter\(s\) \['topk'\]; allowed: top_k"):
        mlot.multilevel_ot(*batch, topk=5)


@pytest.mark.parametrize("params,field", [({"top_k": 0}, "top_k"), ({"sinkhorn_reg": 0.0}, "sinkhorn_reg"),
                                          ({"ranking": "global"}, "ranking"), ({"sinkhorn_iters": 0}, "sinkhorn_iters"),
                                          ({"student_ranking": "assignment", "top_k": None}, "assignment")])
def test_bad_values_name_the_field(batch, params, field):
    with pytest.raises(ValueError, match=field):
        mlot.multilevel_ot(*batch, **params)


def test_payload_from_other_settings_refused(batch):
    s, ls, t, lt = batch
    payload = mlot.compress_teacher(t, lt, top_k=10)
    with pytest.raises(ValueError, match="top_k"):
        mlot.multilevel_ot(s, ls, payload, top_k=20)
    with pytest.raises(ValueError, match="teacher_labels must be None"):
        mlot.multilevel_ot(s, ls, payload, lt, top_k=10)


def test_non_contiguous_and_position_zero_labels(batch):
    s, ls, t, lt = batch
    gap = ls.clone()
    gap[0, 4] = -100
    with pytest.raises(ValueError, match=r"non-contiguous"):
        mlot.multilevel_ot(s, gap, t, lt)
    first = ls.clone()
    first[1] = -100
    first[1, :3] = 5
    with pytest.raises(ValueError, match=r"label position 0"):
        mlot.multilevel_ot(s, first, t, lt)


def test_payload_version_checked(batch):
    d = mlot.compress_teacher(batch[2], batch[3]).to_numpy()
    d["version"] = 99
    with pytest.raises(ValueError, match="version"):
        mlot.TeacherPayload.from_numpy(d)
