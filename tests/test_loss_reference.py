"""Reference mode reproduces the released code's arithmetic: exact parity with ../shared/vectors."""

import numpy as np
import pytest
import torch

import mlot

TOL = 1e-9


def _load(path):
    d = np.load(path)
    return {k: d[k] for k in d.files}


def test_vectors_match_to_1e9(vector_files):
    for path in vector_files:
        d = _load(path)
        student = torch.tensor(d["student_logits"], requires_grad=True)
        r = mlot.multilevel_ot(student, torch.tensor(d["student_labels"]), torch.tensor(d["teacher_logits"]),
                               torch.tensor(d["teacher_labels"]), mode="reference", top_k=int(d["k"]))
        r.distill.backward()
        name = path.stem
        np.testing.assert_allclose(r.had.detach().numpy(), d["had"], rtol=0, atol=TOL, err_msg=name)
        for term in ("sl", "sd", "distill"):
            assert abs(float(getattr(r, term).detach()) - float(d[term])) <= TOL, (name, term)
        assert r.alpha == float(d["alpha"])
        np.testing.assert_array_equal(r.teacher_columns.numpy(), d["teacher_columns"], err_msg=name)
        np.testing.assert_array_equal(r.student_columns.numpy(), d["student_columns"], err_msg=name)
        np.testing.assert_allclose(student.grad.numpy(), d["grad_student_logits"], rtol=0, atol=TOL, err_msg=name)


def test_vectors_through_payload_identical(vector_files):
    """Teacher logits -> payload -> numpy dict (as shipped) -> loss gives bit-identical terms and grads."""
    for path in vector_files:
        d = _load(path)
        labels_s, labels_t = torch.tensor(d["student_labels"]), torch.tensor(d["teacher_labels"])
        s1 = torch.tensor(d["student_logits"], requires_grad=True)
        s2 = torch.tensor(d["student_logits"], requires_grad=True)
        full = mlot.multilevel_ot(s1, labels_s, torch.tensor(d["teacher_logits"]), labels_t, mode="reference")
        shipped = mlot.TeacherPayload.from_numpy(
            mlot.compress_teacher(torch.tensor(d["teacher_logits"]), labels_t, mode="reference").to_numpy())
        via = mlot.multilevel_ot(s2, labels_s, shipped, mode="reference")
        full.distill.backward()
        via.distill.backward()
        assert torch.equal(full.had, via.had) and torch.equal(full.distill, via.distill), path.stem
        assert torch.equal(s1.grad, s2.grad), path.stem


def test_reference_is_batch_coupled():
    """The released ranking is per batch: a sample's terms change with its partners (why paper mode exists)."""
    from helpers import make_batch
    s, ls = make_batch([5, 9], [4, 3], 120, seed=1)
    t, lt = make_batch([6, 8], [3, 5], 90, seed=2)
    pair = mlot.multilevel_ot(s, ls, t, lt, mode="reference")
    alone = mlot.multilevel_ot(s[:1], ls[:1], t[:1], lt[:1], mode="reference")
    assert not torch.allclose(pair.had[0], alone.had[0])


def test_reference_payload_cannot_be_split():
    from helpers import make_batch
    t, lt = make_batch([6, 8], [3, 5], 90, seed=2)
    payload = mlot.compress_teacher(t, lt, mode="reference")
    with pytest.raises(ValueError, match="one whole batch"):
        payload.index_select(torch.tensor([0]))


def test_reference_chunking_is_invisible(monkeypatch, vector_files):
    """The released arithmetic runs over chunks of answer positions: one per chunk changes nothing."""
    import mlot.softmax
    d = _load(vector_files[0])
    args = (torch.tensor(d["student_labels"]), torch.tensor(d["teacher_logits"]), torch.tensor(d["teacher_labels"]))
    x1 = torch.tensor(d["student_logits"], requires_grad=True)
    whole = mlot.multilevel_ot(x1, *args, mode="reference")
    whole.distill.backward()
    monkeypatch.setattr(mlot.softmax, "_CHUNK_BYTES", 1)
    x2 = torch.tensor(d["student_logits"], requires_grad=True)
    chunked = mlot.multilevel_ot(x2, *args, mode="reference")
    chunked.distill.backward()
    assert abs(float(chunked.distill.detach()) - float(whole.distill.detach())) < 1e-12
    torch.testing.assert_close(x2.grad, x1.grad, rtol=0, atol=1e-12)
