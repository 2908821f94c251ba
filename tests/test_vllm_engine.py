"""The vLLM teacher engine (``teachers[i].engine: vllm``, ``workers.teacher.vllm_engine``) against the HF engine on
the same weights and rows, the on-policy vLLM generator (``train.on_policy.engine: vllm``,
``workers.student.vllm_generator``) against HF ``generate`` on the weights it was sent, and a ZeRO-3 distillation
of the quickstart through both.

The engine runs in the vLLM runtime ``scripts/setup_vllm.sh`` creates (``.venv-vllm``; ``.ci/run`` does). One
replica is started for the whole file, as ``mlot distill`` starts it (the teacher pretrained by the HF engine, then
loaded from its saved folder); the HF engine loads the same folder in this process.
"""

import time
from types import SimpleNamespace

import pytest
import torch
from helpers import ExitAtStep, metric_history, quickstart_job

import mlot
from orchestrator.config import LossConfig
from orchestrator.configuration import apply_overrides
from orchestrator.engines import REPO
from specs import UserError, storage

VLLM_PYTHON = REPO / ".venv-vllm" / "bin" / "python"

pytestmark = [pytest.mark.integration, pytest.mark.skipif(
    not VLLM_PYTHON.exists(), reason=f"the vLLM runtime is absent ({VLLM_PYTHON}): `bash scripts/setup_vllm.sh`")]

SETS = ("teachers.0.engine=vllm", "teachers.0.pretrain.steps=40", "teachers.0.pretrain.lr=3e-3",
        # vLLM's own SD normaliser is unknown at tau_SD != 1 (refused): SD at the teacher's temperature.
        "loss.params.sd_temperature=1.0",
        # vLLM's CPU attention has kernels for head sizes 32, 64, ...; the quickstart teacher's 96 / 4 = 24 has none.
        "teachers.0.model_config.num_attention_heads=3", "teachers.0.model_config.num_key_value_heads=3")
#: The student's answers sampled by the vLLM generator; its head size 64 / 2 = 32 (the quickstart's 16 has no kernel).
GENERATOR = ("train.on_policy.fraction=1.0", "train.on_policy.engine=vllm",
             "student.model_config.num_attention_heads=2", "student.model_config.num_key_value_heads=2")


@pytest.fixture(scope="module")
def served(tmp_path_factory, local_ray):

    from orchestrator.driver import prepare_data, start_teachers, stop_teachers
    from workers.teacher.actor import TeacherActor

    tmp = tmp_path_factory.mktemp("vllm")
    job = quickstart_job(tmp, "vllm", *SETS)
    data = prepare_data(job)
    t0 = time.perf_counter()
    teachers = start_teachers(job, data)
    print(f"\nvLLM teacher: pretraining + engine start-up {time.perf_counter() - t0:.1f}s")
    hf = TeacherActor(job.teachers[0], job.data, job.loss, seed=job.train.seed,
                      weights_dir=storage.join(job.run_path, "teachers", "teacher-sp"), student=job.student)
    yield SimpleNamespace(job=job, data=data, teachers=teachers, vllm=teachers["teacher-sp"][0], hf=hf)
    stop_teachers(teachers)


def _rows(served, split="train", n=8):
    from workers.data.prepared import Rows
    return Rows(served.data, split, tuple(range(3, 3 + n)))


def _both(served, rows, loss=None, answers=None):
    import ray
    vllm = ray.get(served.vllm.payload.remote(rows, batch_id=7, loss=loss, answers=answers))
    assert vllm["batch_id"] == 7
    return (mlot.TeacherPayload.from_numpy(vllm["payload"]),
            mlot.TeacherPayload.from_numpy(served.hf.payload(rows, loss=loss, answers=answers)["payload"]))


def _assert_token_payloads_equal(got, want):
    torch.testing.assert_close(got.probs, want.probs, rtol=0, atol=1e-5)
    # A column may swap only with a neighbour of (numerically) the same probability.
    swapped = got.columns != want.columns
    assert bool((want.probs[swapped] - got.probs[swapped]).abs().le(1e-6).all())
    assert torch.equal(got.lengths, want.lengths) and got.settings == want.settings
    assert got.sd_log_shift is None and want.sd_log_shift is None


def test_token_ranking_and_gold_log_probs_equal_the_hf_engines(served):
    """Token ranking, the aligned-chunk term's gold log-probabilities and per-sample mixing's NLL per byte, for a
    sweep-style loss sent with the request: within 1e-5 of the HF engine's, on the data's answers and on the
    student's own (an on-policy micro-batch). The projection term's class probabilities come from the top K: never
    above the HF engine's, and low by at most U / (S + U) (U: the row's unreturned mass, S: its returned word-start
    mass where the teacher's gold token starts a word, else 1 - U): the bound ``projection_payload`` states."""
    import ray

    from mlot.identity import word_start
    from workers.data.prepared import open_data
    from workers.generation import Answer
    from workers.models import load_tokenizer
    from workers.vocab import teacher_map

    loss = apply_overrides(served.job, ["loss.params.ranking=token", "loss.params.top_k=20",
                                        "loss.params.chunk_weight=1.0", "loss.params.projection_weight=1.0",
                                        "loss.params.projection_top_k=5", "loss.teacher_mix=confidence"]).loss
    rows = _rows(served)
    student = load_tokenizer(served.job.student.tokenizer_name)
    texts = [r["answer"].split()[0] + " and more" for r in open_data(rows.data).rows(rows.split, rows.indices)]
    answers = [Answer(t, i % 2 == 0, tuple(student(" " + t, add_special_tokens=False)["input_ids"]))
               for i, t in enumerate(texts)]
    vmap = teacher_map(served.job.teachers[0], served.job.student)
    top = ray.get(served.vllm.score.remote(served.hf.examples(rows)))
    p = top.logp.exp()
    unreturned = (1 - p.sum(-1)).clamp(min=0)                                                   # [B, T]
    for on_policy in (None, answers):
        got, want = _both(served, rows, loss, on_policy)
        assert got.probs.shape[-1] == 20
        _assert_token_payloads_equal(got, want)
        torch.testing.assert_close(got.identity.token_logp, want.identity.token_logp, rtol=0, atol=1e-5)
        assert torch.equal(got.identity.bounds, want.identity.bounds)
        assert torch.equal(got.identity.student_bounds, want.identity.student_bounds)
        torch.testing.assert_close(got.nll_per_byte, want.nll_per_byte, rtol=1e-5, atol=1e-6)
        g, w = got.identity, want.identity
        assert torch.equal(g.gold_target, w.gold_target) and g.targets.shape[-1] == 5
        n = int(max(g.targets.max(), w.targets.max())) + 2
        dense = lambda i: torch.zeros(*i.targets.shape[:2], n).scatter_add_(  # noqa: E731
            -1, i.targets.long().clamp(min=0), i.target_probs.float())[..., :-1]
        assert bool((dense(g) <= dense(w) + 1e-5).all())
        if on_policy is None:  # the rows ``top`` scored
            given = word_start(g.gold_target.long(), vmap)
            starts = (p * vmap.teacher_start[top.ids]).sum(-1)
            returned = torch.where(given, starts, 1 - unreturned)[:, :given.shape[1]]
            bound = (unreturned[:, :given.shape[1]] / (returned + unreturned[:, :given.shape[1]]))[..., None]
            assert bool((dense(w) - dense(g) <= bound + 1e-5).all()) and bool(given.any())


def test_sequence_ranking_differs_from_the_hf_engines_within_the_stated_bound(served):
    """Sequence ranking: settled ranks hold the HF engine's columns, each rank's error is within
    ``mlot.top_logprobs.sequence_ranking_error``, and so are the HAD and SL differences for a student."""
    import ray

    from mlot.top_logprobs import sequence_ranking_error
    from workers.data.prepared import STUDENT, open_data

    rows = _rows(served, n=8)
    no_sd = apply_overrides(served.job, ["loss.params.use_sd=false"]).loss
    got, want = _both(served, rows, no_sd)
    top = ray.get(served.vllm.score.remote(served.hf.examples(rows)))
    settled, error = sequence_ranking_error(top, got.probs.shape[-1])
    assert torch.equal(got.columns[settled], want.columns[settled]) and torch.equal(got.lengths, want.lengths)
    assert bool(((got.probs - want.probs).abs().sum(1) <= error + 1e-5).all())

    labels = open_data(rows.data).batch(rows.split, rows.indices, STUDENT, 0)["labels"]
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(*labels.shape, 30522, generator=g) * 3
    exact, approx = (mlot.multilevel_ot(logits, labels, p, config=no_sd.payload_config()) for p in (want, got))
    start, s_len = mlot.answer_spans(labels)
    s_rows, mask = mlot.gather_rows(logits, start, s_len, int(s_len.max()))
    ranked = s_rows.log_softmax(-1).gather(-1, exact.student_columns[:, None].expand(-1, s_rows.shape[1], -1))
    worst_log = (ranked.abs() * mask[..., None]).amax(1)  # [B, k]: max_t |log s_i(t)|
    n_pair = torch.minimum(s_len, got.lengths).float()
    had, sl = ((approx.terms[k] - exact.terms[k]).abs() for k in ("had", "sl"))
    had_bound, sl_bound = error.sum(1) / n_pair, (error * worst_log).sum(1) / n_pair
    assert bool((had <= had_bound + 1e-5).all()) and bool((sl <= sl_bound + 1e-5).all())
    # Measured, with SD (at the teacher's temperature: its Sinkhorn plan has no stated bound).
    full = [mlot.multilevel_ot(logits, labels, p, config=served.job.loss.payload_config()).loss
            for p in _both(served, rows)[::-1]]
    print(f"\nsequence ranking, {len(rows.indices)} rows: {int(settled.sum())}/{settled.numel()} ranks settled; "
          f"max |probs diff| {float((got.probs - want.probs).abs().max()):.2e}; HAD diff max {float(had.max()):.2e} "
          f"(bounds {float(had_bound.min()):.2e}..{float(had_bound.max()):.2e}); SL diff max {float(sl.max()):.2e} "
          f"(bounds {float(sl_bound.min()):.2e}..{float(sl_bound.max()):.2e}); loss with SD {float(full[0]):.6f} "
          f"(hf) vs {float(full[1]):.6f} (vllm)")


def test_a_loss_that_needs_full_logits_is_refused_per_request(served):
    """A sweep's trial whose loss the engine cannot serve gets a UserError naming the setting."""
    import ray
    with pytest.raises(UserError, match="sd_temperature=2.0"):
        ray.get(served.vllm.payload.remote(_rows(served), loss=LossConfig(method="multilevel_ot")))
    with pytest.raises(UserError, match="max_logprobs to at least 61"):
        ray.get(served.vllm.payload.remote(_rows(served), loss=LossConfig(method="multilevel_ot", params={
            "ranking": "token", "top_k": 60, "sd_temperature": 1.0})))


def test_greedy_generation_equals_the_hf_engines(served):
    import ray

    from workers.data.prepared import open_data
    rows = open_data(served.data).rows("eval", range(6))
    answers = ray.get(served.vllm.generate.remote(rows, 8))
    assert answers == served.hf.generate(rows, 8) and sum(map(len, answers)) > 0


def _prompts(served, n=6) -> list[list[int]]:
    """The student's prompt tokens of ``n`` eval rows (as ``on_policy_examples`` cuts them)."""
    from workers.data.encoding import answers_of
    from workers.data.prepared import STUDENT, open_data
    examples = open_data(served.data).examples("eval", range(n), STUDENT)
    gold = answers_of([labels for _, labels in examples])
    return [ids[:len(ids) - len(answer)] for (ids, _), answer in zip(examples, gold)]


def test_the_on_policy_generator_decodes_the_weights_it_was_sent(served):
    """Near-greedy answers from the vLLM generator (vLLM raises a temperature below 0.01 to 0.01) are HF's greedy
    choices on the weights the trainer sent: every token within 0.1 of the HF model's best logit (a token 0.1 below
    is drawn with probability e^-10), before and after every weight changes; and a request for weights not yet
    sent waits for them instead of answering from the old ones."""
    import ray

    from orchestrator.engines import start_generator
    from workers.models import build_model, load_tokenizer

    job = apply_overrides(served.job, [*GENERATOR, "train.on_policy.temperature=1e-6",
                                       "train.on_policy.max_new_tokens=8"])
    generator = start_generator(job)
    tok = load_tokenizer(job.student.tokenizer_name)
    torch.manual_seed(0)
    model = build_model(None, job.student.hf_config, "float32", tokenizer=tok).eval()
    special = [i for i in tok.all_special_ids if i != tok.eos_token_id]  # never sampled
    prompts, seeds = _prompts(served), list(range(6))

    def assert_greedy(answers: list[list[int]]) -> None:
        assert [len(a) for a in answers] == [8] * len(prompts)  # no EOS drawn (its logit is low in this model)
        for p, a in zip(prompts, answers):
            with torch.no_grad():
                logits = model(torch.tensor([p + a])).logits[0, len(p) - 1:-1]
            logits[:, special] = -torch.inf
            gap = logits.max(-1).values - logits.gather(-1, torch.tensor(a)[:, None])[:, 0]
            assert bool((gap <= 0.1).all()), (p, a, gap)

    try:
        ray.get(generator.load.remote(model.state_dict(), 0))
        first = ray.get(generator.sample.remote(prompts, seeds, 0))
        assert_greedy(first)
        pending = generator.sample.remote(prompts, seeds, 1)  # step 1's weights: not sent yet
        assert not ray.wait([pending], timeout=2)[0]
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        ray.get(generator.load.remote(model.state_dict(), 1))
        second = ray.get(pending)
        assert_greedy(second)
        assert second != first and ray.get(generator.info.remote())["loads"] == 2
    finally:
        ray.kill(generator)


def test_distill_end_to_end_on_the_vllm_teacher_and_generator(served, tmp_path):
    """ZeRO-3, 2 workers, every micro-batch on-policy: the vLLM generator samples both ranks' answers from the
    weights sent every 2 steps, the vLLM teacher scores them. Rank 0 dies after step 3: the group restarts from
    step 2's checkpoint, sends step 2's weights again, and step 3 replays to its loss (the same samples)."""
    from mlflow import MlflowClient

    from orchestrator.driver import run_distill

    job = apply_overrides(served.job, [
        *GENERATOR, "name=vllm-on-policy", "train.num_workers=2", "student.deepspeed.stage=3", "train.batch_size=4",
        "train.on_policy.sync_every=2", "train.on_policy.max_new_tokens=6", "train.max_failures=1"])
    crash = ExitAtStep(3, str(tmp_path / "crashed"))
    s = run_distill(job, teachers=served.teachers, callbacks=[crash], evaluate=False)
    losses = metric_history(s, "train/loss")
    assert [st for st, _ in losses] == [1, 2, 3, 4] and all(v == v and v > 0 for _, v in losses)
    assert MlflowClient(s.tracking_uri).get_run(s.run_id).data.tags["mlot.rewinds"] == "2"
    replays = metric_history(s, "train/replay_loss_diff")
    assert [st for st, _ in replays] == [3] and replays[0][1] <= 1e-5, replays
    assert [st for st, _ in metric_history(s, "train/weight_sync_s")] == [1, 3]  # before steps 1 and 3
    assert [v for _, v in metric_history(s, "train/on_policy_frac")] == [1.0] * 4
    assert all(0 < v <= 6 for _, v in metric_history(s, "train/generated_tokens"))
    assert all(v > 0 for _, v in metric_history(s, "train/teacher-sp/distill"))
    # The replica's counters (since it started: this file's requests too) reached the run.
    [rows] = [v for _, v in metric_history(s, "teacher/teacher-sp/forward_rows")]
    assert rows >= 4 * 2 * job.train.batch_size
