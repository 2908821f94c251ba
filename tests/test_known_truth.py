"""The known-truth task (``workers.data.known_truth``): p* is what the rows are drawn from, the splits hold out whole
(creature, place, season) triples, and the metrics are exact on cases worked out by hand."""

import math

import numpy as np
import pytest
import torch

from specs import Template, UserError
from workers.data.known_truth import (
    ANSWERS,
    FREQUENCY,
    KnownTruth,
    answer_log_probs,
    entropy,
    truth_metrics,
    uniform_kl,
)
from workers.models import load_tokenizer


def test_splits_hold_out_whole_triples_and_entropy_follows_the_frequency_word():
    task = KnownTruth(seed=0)
    triples = {split: {(p.creature, p.place, p.season) for p in prompts} for split, prompts in task.prompts.items()}
    assert not (triples["train"] & triples["test"]) and not (triples["train"] & triples["validation"])
    assert sum(len(t) for t in triples.values()) == 8 * 6 * 4
    by_word = {w: np.mean([entropy(task.truth(p)) for p in task.prompts["test"] if p.frequency == w])
               for w in FREQUENCY}
    assert by_word["always"] < by_word["usually"] < by_word["often"] < by_word["sometimes"] < math.log(len(ANSWERS))
    assert KnownTruth(seed=0).truth(task.prompts["test"][3]).tolist() == task.truth(task.prompts["test"][3]).tolist()


def test_the_numbers_variant_shares_the_latent_truth_and_answers_with_numbers():
    """Same factors, splits and p* as the text task; only the answers' text (and the question) differ."""
    from workers.data.known_truth import NUMBERS
    text, numbers = KnownTruth(seed=0), KnownTruth(seed=0, task="numbers")
    prompt, other = text.prompts["test"][3], numbers.prompts["test"][3]
    assert other.text.startswith("How many seeds does") and other.creature == prompt.creature
    assert numbers.truth(other) == pytest.approx(text.truth(prompt))
    assert {r["answer"] for r in numbers.rows("train", 3)} <= set(NUMBERS)


def test_sampled_answers_follow_p_star():
    task = KnownTruth(seed=1)
    rows = task.rows("train", 200, seed=2)  # 107,200 answers over 536 prompts
    counts = np.array([sum(r["answer"] == a for r in rows) for a in ANSWERS]) / len(rows)
    mean_truth = np.mean([task.truth(p) for p in task.prompts["train"]], axis=0)
    np.testing.assert_allclose(counts, mean_truth, atol=0.005)  # ~5 standard errors
    assert rows[0]["truth"] == pytest.approx(task.truth(task.prompts["train"][0]).tolist())


def test_metrics_are_exact_on_worked_cases():
    task = KnownTruth(seed=0)
    p = np.stack([task.truth(q) for q in task.prompts["test"][:12]])
    perfect = truth_metrics(np.log(p), p)
    assert perfect["kl"] == pytest.approx(0.0, abs=1e-12) and perfect["top1"] == 1.0
    assert perfect["nll"] == pytest.approx(np.mean([entropy(row) for row in p]), rel=1e-12)
    assert perfect["ece"] == pytest.approx(0.0, abs=1e-12)
    # A model that knows nothing: KL = log N - H(p*); renormalisation removes any constant per prompt.
    uniform = truth_metrics(np.full_like(p, -7.0), p)
    assert uniform["kl"] == pytest.approx(uniform_kl(p), rel=1e-12)
    assert uniform["nll"] == pytest.approx(7.0, rel=1e-12)
    # One prompt, two answers, q = (0.75, 0.25) against p* = (0.5, 0.5): every number by hand.
    two = truth_metrics(np.log([[0.75, 0.25]]), np.array([[0.5, 0.5]]), bins=4)
    assert two["kl"] == pytest.approx(0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25), rel=1e-12)
    assert two["ece"] == pytest.approx((abs(0.75 - 0.5) + abs(0.25 - 0.5)) / 2, rel=1e-12)
    assert two["top1"] == 1.0  # ties in p* resolve to the first answer, as argmax does


def test_answer_log_probs_is_the_models_own_sequence_log_probability():
    from transformers import LlamaConfig, LlamaForCausalLM
    tok = load_tokenizer("builtin:sentencepiece")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2))
    template = Template()
    prompts, answers = ["What does a fox near the river often eat in spring?"], list(ANSWERS[:3])
    got = answer_log_probs(model, tok, template, prompts, answers, 64, batch_size=2)
    for j, answer in enumerate(answers):  # one sequence at a time, no padding, by the chain rule
        from workers.data.encoding import encode_example
        ids, labels = encode_example({"prompt": prompts[0], "answer": answer}, tok, template, 64, 1 << 20)
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
        want = sum(float(logp[i - 1, t]) for i, t in enumerate(labels) if t != -100)
        assert got[0, j] == pytest.approx(want, abs=1e-4)


def test_builtin_known_truth_splits_load_prepare_and_score_a_student_against_p_star(tmp_path):
    """The builtin's splits load and prepare for a job, and the student's in-training truth eval
    (``eval/truth_*``, what ``mlot tune`` ranks trials on) equals the metrics recomputed from the
    validation prompts and p*."""
    from helpers import quickstart_job

    from orchestrator.configuration import apply_overrides
    from workers.data.known_truth import BUILTIN_SAMPLES
    from workers.data.prepared import open_data, prepare
    from workers.data.tasks import load_rows
    from workers.models import build_model
    from workers.student.in_loop_eval import evaluate_truth
    task = KnownTruth(seed=0)
    for split, per_prompt in BUILTIN_SAMPLES.items():
        prompts = task.prompts["train" if split == "teacher" else split]
        rows = load_rows("builtin:known_truth", split=split)
        assert len(rows) == per_prompt * len(prompts) and rows[0]["answer"] in ANSWERS
    job = quickstart_job(tmp_path, "kt", "data.source=builtin:known_truth", "data.eval_split=validation",
                         "data.limit=null")
    data = prepare(job, str(tmp_path / "cache"))
    assert data.sizes == {"train": 3 * len(task.prompts["train"]), "eval": len(task.prompts["validation"])}
    # A teacher's pretrain.split: the same source's `teacher` split, prepared like the job's own rows.
    from orchestrator.driver import pretrain_data
    taught = apply_overrides(job, ["teachers.0.pretrain.split=teacher", "data.limit=100"])  # of its 25,728 rows
    assert pretrain_data(job, job.teachers[0], data) is data
    other = pretrain_data(taught, taught.teachers[0], data)
    assert other.sizes["train"] == 100
    pairs = lambda rows: sorted((r["prompt"], r["answer"]) for r in rows)  # noqa: E731 (prepare orders rows its way)
    assert pairs(open_data(other).rows("train", range(100))) == pairs(
        load_rows("builtin:known_truth", split="teacher", limit=100))
    with pytest.raises(UserError, match="builtin:known_truth has splits"):
        load_rows("builtin:known_truth", split="validaton")

    tok = load_tokenizer(job.student.tokenizer_name)
    torch.manual_seed(0)
    model = build_model(None, job.student.hf_config, "float32", False, tok)
    got = evaluate_truth(model, open_data(data), tok, job, torch.device("cpu"))
    prompts = task.prompts["validation"]
    log_q = answer_log_probs(model, tok, job.student.template, [p.text for p in prompts], ANSWERS,
                             job.data.max_prompt_length)
    want = truth_metrics(log_q, np.stack([task.truth(p) for p in prompts]))
    assert got == pytest.approx({f"eval/truth_{k}": v for k, v in want.items()}, rel=1e-6)  # fp32, other batches
    assert got["eval/truth_kl"] > 0.1  # an untrained student is far from p*


def test_truth_needs_the_builtins_own_prompts():
    from orchestrator.configuration import ConfigError, config_from_dict
    from workers.data.known_truth import builtin_truth
    task = KnownTruth(seed=0)
    prompt = task.prompts["test"][0]
    assert builtin_truth([prompt.text]) == pytest.approx(task.truth(prompt)[None])
    with pytest.raises(UserError, match="not a prompt of builtin:known_truth"):
        builtin_truth(["What does a fox eat?"])
    import yaml
    from helpers import QUICKSTART
    data = yaml.safe_load(QUICKSTART.read_text())
    data["data"] = {**data["data"], "source": "builtin:known_truth",
                    "columns": {"prompt": "question", "answer": "answer"}}
    with pytest.raises(ConfigError, match="data.columns.*map its 'prompt' column"):
        config_from_dict(data)
