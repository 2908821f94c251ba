"""``mlot.Objective``, the one statement of the training objective (the trainer's ``_loss_step`` and the
known-truth study both call it), tied to its formula: ``ce_weight * CE + mix_j(alpha * distill_j)``."""

import pytest
import torch
from helpers import make_batch

import mlot


def _batch():
    student, s_labels = make_batch([3, 5, 4], [2, 1, 3], vocab=40, seed=1)
    payloads = {}
    for j, (vocab, seed) in enumerate([(60, 2), (50, 3)]):
        t_logits, t_labels = make_batch([4, 6, 3], [1, 2, 2], vocab=vocab, seed=seed)
        payload = mlot.compress_teacher(t_logits, t_labels, config=mlot.make_config("paper", top_k=8))
        payload.nll_per_byte = torch.tensor([1.0, 0.2, 0.5]) if j == 0 else torch.tensor([0.3, 0.9, 0.4])
        payloads[f"t{j}"] = payload
    return student.requires_grad_(), s_labels, payloads


def test_sum_mix_is_ce_weight_times_ce_plus_weighted_method_losses():
    logits, labels, payloads = _batch()
    objective = mlot.Objective(mlot.get_method("multilevel_ot"), params={"top_k": 8}, ce_weight=0.5,
                               weights={"t0": 2.0, "t1": 0.25})
    loss, parts = objective(logits, labels, payloads)
    ce = mlot.causal_lm_loss(logits, labels)
    distill = {n: mlot.multilevel_ot(logits, labels, p, top_k=8) for n, p in payloads.items()}
    want = 0.5 * ce + 2.0 * distill["t0"].loss + 0.25 * distill["t1"].loss
    assert torch.allclose(loss, want, rtol=0, atol=1e-12)
    assert parts["loss"] == loss.detach() and parts["ce"] == ce.detach()
    for name, r in distill.items():
        assert parts[f"{name}/distill"] == r.distill.detach()
        assert parts[f"{name}/had"] == r.had.mean() and parts[f"{name}/sd"] == r.sd.mean()
    # an on-policy micro-batch (the student's own answers): no CE, the same distillation
    no_ce, _ = objective(logits, labels, payloads, ce=False)
    assert torch.allclose(no_ce, want - 0.5 * ce, rtol=0, atol=1e-12)
    loss.backward()  # differentiable in the student logits
    assert logits.grad is not None and torch.isfinite(logits.grad).all()


def test_best_mix_takes_each_samples_lowest_nll_teacher_and_sft_is_ce_alone():
    logits, labels, payloads = _batch()
    objective = mlot.Objective(mlot.get_method("multilevel_ot"), params={"top_k": 8}, mix="best")
    loss, parts = objective(logits, labels, payloads)
    per = {n: mlot.multilevel_ot(logits, labels, p, top_k=8) for n, p in payloads.items()}
    pick = [per["t1"], per["t0"], per["t1"]]  # nll per byte: t1 lower on samples 0 and 2
    mixed = torch.stack([r.alpha * r.per_sample[b] for b, r in enumerate(pick)]).mean()
    want = mlot.causal_lm_loss(logits, labels) + mixed
    assert torch.allclose(loss, want, rtol=0, atol=1e-12)
    assert parts["t0/mix_weight"] == pytest.approx(1 / 3) and parts["t1/selected"] == pytest.approx(2 / 3)
    sft, sft_parts = mlot.Objective(mlot.get_method("sft"))(logits, labels, {})
    assert sft == mlot.causal_lm_loss(logits, labels) and set(sft_parts) == {"ce", "loss"}
