"""On-policy micro-batches and teacher mixing, without Ray: the teacher actor class as plain Python, a real
tiny student generating, real tokenizers (WordPiece student; SentencePiece and Tekken teachers).

(Under Ray Train: the ZeRO-3 test of tests/test_distill_integration.py trains on-policy with two teachers and
resumes; tests/test_generate_eval.py logs the confidence weights of a trained and a random teacher.)"""

import pytest
import torch
from helpers import TEKKEN, quickstart_job

import mlot
from mlot.mixing import mix_weights, mixed_loss
from orchestrator.config import OnPolicyConfig
from orchestrator.configuration import apply_overrides
from workers.data.encoding import answers_of
from workers.data.prepared import STUDENT, Rows, open_data, prepare
from workers.generation import Answer, encode_answers
from workers.models import build_model, load_tokenizer
from workers.student.on_policy import BOTH, LABELS, OWN, chosen, kind, sample_answers, student_examples, to_answers
from workers.teacher.actor import TeacherActor


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("on_policy")
    job = quickstart_job(tmp, "op", add_teacher=TEKKEN)
    return job, prepare(job, job.data_cache)


def test_the_on_policy_choice_depends_on_seed_and_micro_batch_only():
    picks = [m for m in range(2000) if chosen(7, m, 0.3)]
    assert 500 <= len(picks) <= 700 and picks == [m for m in range(2000) if chosen(7, m, 0.3)]
    assert picks != [m for m in range(2000) if chosen(8, m, 0.3)]
    assert not any(chosen(7, m, 0.0) for m in range(100)) and all(chosen(7, m, 1.0) for m in range(100))


def test_a_warm_start_trains_on_labels_first_and_mode_add_keeps_the_labels_of_every_chosen_micro_batch():
    replace_ = OnPolicyConfig(fraction=0.3)
    add = OnPolicyConfig(fraction=0.3, mode="add")
    picks = {m for m in range(2000) if chosen(7, m, 0.3)}
    assert [kind(7, m, replace_) for m in range(2000)] == [OWN if m in picks else LABELS for m in range(2000)]
    # from micro-batch 500 on (start_step 250 at grad_accum 2), the same choices; none before
    assert [kind(7, m, add, first=500) for m in range(2000)] == \
        [BOTH if m in picks and m >= 500 else LABELS for m in range(2000)]


def _student(job, tok):
    torch.manual_seed(0)
    return build_model(job.student.model, job.student.hf_config, "float32", False, tok, who="student").eval()


def test_teachers_score_exactly_the_text_the_student_generated(setup):
    job, data = setup
    tok = load_tokenizer(job.student.tokenizer_name)
    rows = tuple(range(8))
    opened = open_data(data)
    gold = opened.examples("train", rows, STUDENT)
    gold_answers = answers_of([labels for _, labels in gold])
    prompts = [ids[:len(ids) - len(a)] for (ids, _), a in zip(gold, gold_answers)]
    settings = OnPolicyConfig(fraction=1.0, max_new_tokens=6)
    model = _student(job, tok)
    generated = sample_answers(model, tok, prompts, settings, seed=3, device=torch.device("cpu"))
    assert generated == sample_answers(model, tok, prompts, settings, seed=3, device=torch.device("cpu"))
    assert generated != sample_answers(model, tok, prompts, settings, seed=4, device=torch.device("cpu"))
    special = set(tok.all_special_ids) - {tok.eos_token_id}
    assert all(len(g) <= 6 and not special & set(g) for g in generated)

    text_rows = opened.rows("train", rows)
    answers = to_answers(tok, generated, text_rows, gold_answers)
    assert all(a.sampled and a.ids == tuple(g) for a, g in zip(answers, generated))
    # The student's training examples are its prompt + exactly the generated tokens, labelled on the answer.
    for (ids, labels), p, a in zip(student_examples(prompts, answers), prompts, answers):
        assert ids == p + list(a.ids) and answers_of([labels])[0] == list(a.ids)

    squash = lambda text: "".join(text.split())  # noqa: E731 (tokenizers differ only in spacing)
    for t in job.teachers:
        t_tok = load_tokenizer(t.tokenizer_name)
        encoded = encode_answers(text_rows, answers, t_tok, t.template, job.data.max_prompt_length)
        t_answers = answers_of([labels for _, labels in encoded])
        for a, t_ids in zip(answers, t_answers):
            # both spans decode to the same text; each ends with its own EOS exactly when the student's did
            assert (squash(t_tok.decode(t_ids, skip_special_tokens=True))
                    == squash(tok.decode(a.ids, skip_special_tokens=True)))
            assert (t_ids[-1] == t_tok.eos_token_id) == a.ended
        actor = TeacherActor(t, job.data, job.loss, seed=0, student=job.student)
        payload = mlot.TeacherPayload.from_numpy(actor.payload(Rows(data, "train", rows), answers=answers)["payload"])
        assert payload.lengths.tolist() == [len(x) for x in t_answers]


def test_an_empty_or_invalid_generation_falls_back_to_the_gold_answer(setup):
    job, data = setup
    tok = load_tokenizer(job.student.tokenizer_name)
    rows = open_data(data).rows("train", (0, 1, 2))
    gold = [[5, 6], [7], [8, 9]]
    got = to_answers(tok, [[tok.eos_token_id], [], tok("fine", add_special_tokens=False)["input_ids"]], rows, gold)
    assert [a.sampled for a in got] == [False, False, True]
    assert got[0] == Answer(rows[0]["answer"], True, (5, 6), sampled=False)
    assert got[2].text == "fine" and not got[2].ended
    # a row of plain text fields (no prepared data, no cut mark) is an uncut answer
    [plain] = to_answers(tok, [[]], [{"prompt": "p", "answer": "beech nuts"}], [[9]])
    assert plain == Answer("beech nuts", True, (9,), sampled=False)


def test_mix_weights_are_the_stated_formulas():
    prior = torch.tensor([1.0, 0.5])
    nll = torch.tensor([[0.2, 1.0], [2.0, 0.5], [0.7, 0.7]])
    assert mix_weights("sum", prior).tolist() == [[1.0, 0.5]]
    assert mix_weights("mean", prior)[0].tolist() == pytest.approx([2 / 3, 1 / 3])
    assert mix_weights("best", prior, nll).tolist() == [[1, 0], [0, 1], [1, 0]]  # a tie goes to the first
    want = torch.softmax(prior.log() - nll / 0.5, dim=1)
    torch.testing.assert_close(mix_weights("confidence", prior, nll, 0.5), want)
    # the loss: per teacher, the sum of its results' alpha * per-sample terms, weighted per sample
    a = mlot.DistillResult(torch.tensor(0.0), 0.5, torch.tensor([1.0, 2.0, 3.0]))
    b = mlot.DistillResult(torch.tensor(0.0), 1.0, torch.tensor([4.0, 5.0, 6.0]))
    extra = mlot.DistillResult(torch.tensor(0.0), 1.0, torch.tensor([0.1, 0.1, 0.1]))
    loss, w = mixed_loss([[a, extra], [b]], "best", prior, nll)
    assert float(loss) == pytest.approx(((0.5 + 0.1) + 5.0 + (1.5 + 0.1)) / 3)
    a.distill, b.distill = a.per_sample.mean(), b.per_sample.mean()
    extra.distill = extra.per_sample.mean()
    loss, _ = mixed_loss([[a, extra], [b]], "sum", prior)
    assert float(loss) == pytest.approx(1.0 * (0.5 * 2.0 + 0.1) + 0.5 * 5.0)
    with pytest.raises(ValueError, match="nll"):
        mix_weights("confidence", prior)


def test_best_and_confidence_choose_the_teacher_that_knows_the_task(setup):
    """A SentencePiece teacher trained on the task and a random Tekken one: per answer byte, the trained teacher
    finds nearly every gold answer likelier (different tokenizers, the same text)."""
    job, data = setup
    trained = TeacherActor(job.teachers[0], job.data, job.loss, seed=0, student=job.student)
    trained.pretrain(data, steps=60, lr=1e-2, batch_size=16, seed=0)
    random_tekken = TeacherActor(job.teachers[1], job.data, job.loss, seed=0, student=job.student)
    loss = apply_overrides(job, ["loss.teacher_mix=confidence"]).loss
    nll = []
    for start in range(0, 40, 8):
        rows = Rows(data, "eval", tuple(range(start, start + 8)))
        nll.append(torch.stack([mlot.TeacherPayload.from_numpy(t.payload(rows, loss=loss)["payload"]).nll_per_byte
                                for t in (trained, random_tekken)], 1))
    nll = torch.cat(nll)
    prior = torch.tensor([t.weight for t in job.teachers])
    best = mix_weights("best", prior, nll)
    assert float(best[:, 0].mean()) >= 0.9
    confidence = mix_weights("confidence", prior, nll, loss.mix_temperature)
    assert float(confidence[:, 0].mean()) > 0.8
    # no per-sample nll is computed for a job that does not mix per sample
    assert mlot.TeacherPayload.from_numpy(trained.payload(rows)["payload"]).nll_per_byte is None
