"""``mlot inspect``: the bundled quickstart job inspects clean, and each planted silent failure (a BOS on one side
only, a chat-template token inside the answer, digits split by one tokenizer only, a tokenizer without a pad token,
answers cut) is reported naming the config field that fixes it; the payload sizes are exactly what a real payload
holds; the transport-plan heatmap carries token labels. No Ray, no model."""

from __future__ import annotations

import copy
import html
import json
import re

import pytest
import torch

import mlot
from mlot.config import make_config
from mlot.identity import IdentityConfig, compress_identity, pad_bounds
from mlot.vocab import VocabMap
from orchestrator.cli import bundled_config, main
from orchestrator.configuration import load_config
from workers.data.inspect import aligned_chunks, inspect_job, payload_bytes_per_token
from workers.models import load_tokenizer
from workers.student.plots import plan_heatmap_png, tick_labels

QUICKSTART = str(bundled_config("quickstart.yaml"))
CHATML = ("{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def inspect_cli(capsys, tmp_path, *sets: str, rows: int = 4, track: bool = False) -> str:
    """Run ``mlot inspect`` on the quickstart config (writing under tmp_path); its terminal output."""
    args = ["inspect", QUICKSTART, "--rows", str(rows), "--set", f"output_dir={tmp_path}",
            "--set", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", *[a for s in sets for a in ("--set", s)]]
    assert main(args + ([] if track else ["--no-track"])) == 0
    return capsys.readouterr().out


def findings(out: str, mark: str = "!") -> dict[str, str]:
    """kind -> 'field: message' of the warnings ("!") or notes ("-") printed."""
    return {m[1]: m[2] for m in re.finditer(rf"^  {re.escape(mark)} \[(\w+)\] (.*)$", out, re.M)}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Tokenizers saved to folders (jobs name them by path): SentencePiece without its BOS, SentencePiece with a
    ChatML chat template (turn markers that are not its EOS), and a tiny byte-level BPE with no pad and no unk."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from workers.data.tasks import quickstart_dataset

    root = tmp_path_factory.mktemp("tokenizers")
    no_bos = copy.deepcopy(load_tokenizer("builtin:sentencepiece"))  # the cached one is shared: never mutate it
    no_bos.add_bos_token = False
    no_bos.save_pretrained(root / "no_bos")
    chat = copy.deepcopy(load_tokenizer("builtin:sentencepiece"))
    chat.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    chat.chat_template = CHATML
    chat.save_pretrained(root / "chatml")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator([f"{r['prompt']} {r['answer']}" for r in quickstart_dataset(300)],
                            trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>"],
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bpe.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                       special_tokens=[("<s>", bpe.token_to_id("<s>"))])
    PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>").save_pretrained(root / "no_pad")
    return {name: str(root / name) for name in ("no_bos", "chatml", "no_pad")}


def test_quickstart_inspects_clean_writes_the_report_and_logs_it(capsys, tmp_path):
    out = inspect_cli(capsys, tmp_path, rows=3, track=True)
    assert findings(out) == {} and "no warnings" in out
    # SentencePiece has no pad of its own: said, as handled, not warned about.
    assert list(findings(out, "-")) == ["pad"] and findings(out, "-")["pad"].startswith("teachers.0.tokenizer: ")

    job = load_config(QUICKSTART, [f"output_dir={tmp_path}"])
    insp = inspect_job(job, 3)
    first = insp.rows[0]
    assert (first.record, first.fields["answer"]) == (788, "friday")
    assert first.encoded["student"].answer == ["friday", " [SEP]"] and first.encoded["student"].bounds == [0, 6, 7]
    assert first.encoded["teachers.0"].answer == ["fr", "iday", "</s>"]
    assert first.encoded["teachers.0"].bounds == [0, 2, 6, 7]
    assert [(c.teacher, c.student) for c in first.chunks["teachers.0"]] == [(("fr", "iday"), ("friday",)),
                                                                          (("</s>",), (" [SEP]",))]
    assert first.encoded["teachers.0"].prompt[:3] == ["<s>", " Paul", " says"]
    [t] = insp.teachers
    # multilevel_ot with the paper defaults: k = 50 probabilities, the SD shift, one column order per answer.
    n = sum(len(r.encoded["teachers.0"].answer_ids) for r in insp.rows)
    assert t.payload[0].method == "multilevel_ot" and t.payload[0].bytes_per_token == 4 * 50 + 4 + (4 * 50 + 8) * 3 / n
    assert [p.method for p in t.payload if p.bytes_per_token is None] == ["kl"]  # kl needs one tokenizer

    page = (tmp_path / "quickstart" / "inspect" / "report.html").read_text()  # the default place
    assert "<link" not in page and "<script" not in page and "http" not in page  # self-contained
    for e in first.encoded.values():
        for piece in e.prompt + e.answer:
            assert f'<span class="tok">{html.escape(piece)}</span>' in page

    from mlflow import MlflowClient
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.get_experiment_by_name(job.tracking.experiment)
    [run] = client.search_runs([exp.experiment_id], "attributes.run_name = 'inspect-quickstart'")
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["report.html"]


def test_a_chat_template_teacher_inspects_clean(capsys, tmp_path):
    out = inspect_cli(capsys, tmp_path, "teachers.0.tokenizer=builtin:tekken", "teachers.0.template.chat=true",
                      rows=2)
    assert findings(out) == {}  # Tekken's chat answer ends with its EOS </s>: nothing but the answer is labelled
    prompts = re.findall(r"^  teacher-sp  prompt (\S+)$", out, re.M)
    assert len(prompts) == 2 and all(p.startswith("<s>|[INST]|") and p.endswith("|[/INST]") for p in prompts)
    answers = re.findall(r"^ {14}answer\[\d+:\d+\] (\S+)   bounds", out, re.M)
    assert len(answers) == 4 and all(a.endswith("|</s>") for a in answers[1::2])


def test_a_prompt_without_bos_on_one_side_is_warned(capsys, tmp_path, saved):
    out = inspect_cli(capsys, tmp_path, f"teachers.0.tokenizer={saved['no_bos']}")
    warned = findings(out)
    assert list(warned) == ["bos"]
    assert warned["bos"].startswith("teachers.0.template.prompt: teacher-sp's prompts start without a BOS")
    assert "'<s>{prompt}'" in warned["bos"]


def test_a_chat_turn_marker_inside_the_answer_is_warned(capsys, tmp_path, saved):
    out = inspect_cli(capsys, tmp_path, f"teachers.0.tokenizer={saved['chatml']}", "teachers.0.template.chat=true")
    warned = findings(out)
    assert list(warned) == ["special_in_answer"]
    assert warned["special_in_answer"].startswith("teachers.0.template.chat: teacher-sp: special token(s) <|im_end|> "
                                                  "inside the labelled answer of 4 sampled row(s)")


def test_digits_split_by_one_tokenizer_only_are_warned(capsys, tmp_path):
    data = tmp_path / "sums.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"What is {a} plus {b}?", "answer": str(a + b)}) + "\n"
                            for a, b in [(12, 30), (45, 67), (100, 23), (250, 250), (31, 7), (80, 19)]))
    out = inspect_cli(capsys, tmp_path, f"data.source={data}")
    warned = findings(out)
    assert list(warned) == ["digits"]
    assert warned["digits"].startswith("loss.params.chunk_weight: teacher-sp split(s) multi-digit numbers into single "
                                       "digits, student keep(s) them whole")
    # With the chunk-likelihood term on, numbers are compared as whole chunks: a note naming the tokenizer.
    out = inspect_cli(capsys, tmp_path, f"data.source={data}", "loss.params.chunk_weight=0.1")
    assert findings(out) == {} and findings(out, "-")["digits"].startswith("teachers.0.tokenizer: ")
    # The projection term above weight 1 loses to SFT on such answers (the known-truth study): a warning naming
    # it; at aligned's default (1), which gained there, a note.
    out = inspect_cli(capsys, tmp_path, f"data.source={data}", "loss.method=aligned", "loss.params.projection_weight=3")
    assert findings(out)["digits"].startswith("loss.params.projection_weight: teacher-sp split(s)")
    out = inspect_cli(capsys, tmp_path, f"data.source={data}", "loss.method=aligned")
    assert findings(out) == {} and findings(out, "-")["digits"].startswith("loss.params.projection_weight: ")


def test_a_tokenizer_without_a_pad_token_is_explained(capsys, tmp_path, saved):
    out = inspect_cli(capsys, tmp_path, f"teachers.0.tokenizer={saved['no_pad']}")
    assert findings(out) == {}
    note = findings(out, "-")["pad"]
    assert note.startswith("teachers.0.tokenizer: teacher-sp pads with its EOS '</s>'")
    assert "mlot masks padding by length, so EOS labels are kept" in note


def test_answers_cut_to_max_answer_length_are_warned(capsys, tmp_path):
    warned = findings(inspect_cli(capsys, tmp_path, "data.max_answer_length=1"))
    assert list(warned) == ["answer_cut"]
    assert re.match(r"data\.max_answer_length: 4 of 4 sampled answers were cut to fit data\.max_answer_length=1 "
                    r"tokens in every model \(the longest is \d+ tokens", warned["answer_cut"])


def test_bad_rows_argument_is_a_user_error(capsys, tmp_path):
    assert main(["inspect", QUICKSTART, "--rows", "0", "--no-track", "--set", f"output_dir={tmp_path}"]) == 2
    assert "--rows must be >= 1" in capsys.readouterr().err


# ---------------------------------------------------------------------------- the pure parts


def test_aligned_chunks_cut_at_the_shared_bounds():
    # teacher "▁black|berr|ies|</s>" vs student "black|##berries|[SEP]": shared bounds 0, 5, 12, 13.
    chunks = aligned_chunks([0, 5, 9, 12, 13], ["black", "berr", "ies", "</s>"], [0, 5, 12, 13],
                            ["black", "berries", "[SEP]"])
    assert [(c.start, c.end, c.teacher, c.student) for c in chunks] == [
        (0, 5, ("black",), ("black",)), (5, 12, ("berr", "ies"), ("berries",)), (12, 13, ("</s>",), ("[SEP]",))]


@pytest.mark.parametrize("mode, params, identity", [
    ("paper", {"top_k": 8}, IdentityConfig()),                                       # sequence ranking + SD shift
    ("paper", {"top_k": 8, "ranking": "token", "use_sd": False}, IdentityConfig()),  # a column list per token
    ("paper", {"top_k": None, "sd_temperature": 1.0}, IdentityConfig(chunk_weight=1.0)),  # all columns, no shift
    ("reference", {"top_k": 8}, IdentityConfig()),                                  # one order per batch
    ("paper", {"top_k": 8}, IdentityConfig(shared_weight=1.0, chunk_weight=1.0, shared_top_k=5)),
    ("paper", {"top_k": 8}, IdentityConfig(shared_weight=1.0, shared_top_k=None)),
    ("paper", {"top_k": 8}, IdentityConfig(chunk_weight=1.0, projection_weight=1.0, projection_top_k=4)),
    ("paper", {"top_k": 8}, IdentityConfig(shared_weight=1.0, projection_weight=1.0, projection_top_k=30)),
])
def test_payload_size_formula_is_what_a_real_payload_holds(mode, params, identity):
    vocab, classes, targets, lengths = 40, 12, 7, [3, 6, 2]
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 10, vocab, generator=g) * 3
    labels = torch.full((3, 10), -100)
    for b, (n, start) in enumerate(zip(lengths, [2, 1, 4])):
        labels[b, start:start + n] = torch.randint(0, vocab, (n,), generator=g)
    cfg = make_config(mode, **params)
    payload = mlot.compress_teacher(logits, labels, config=cfg)
    if identity.on:
        bounds = pad_bounds([list(range(n + 1)) for n in lengths])
        cls = torch.arange(vocab) % (classes + 1) - 1  # every (classes + 1)-th token has no class
        target = torch.arange(vocab) % (targets + 1) - 1
        vmap = VocabMap(cls, torch.arange(classes)[:, None], torch.ones(classes, dtype=torch.bool), {}, target,
                        torch.arange(targets)[:, None])
        payload.identity = compress_identity(logits, labels, bounds, vmap, top_k=identity.shared_top_k,
                                             shared=identity.shared,
                                             projection_top_k=identity.projection_top_k if identity.projection else 0)
        payload.identity.student_bounds = pad_bounds([list(range(n + 2)) for n in lengths])
    assert payload_bytes_per_token(cfg, identity, vocab, classes, targets, lengths) == payload.bytes_per_token()


def test_heatmap_tick_labels_show_spaces_and_survive_mathtext(tmp_path):
    assert tick_labels([" the", "$^$", "", "a\nb"]) == ([0, 1, 2, 3], ["·the", r"\$^\$", "∅", "a\\nb"])
    assert tick_labels(list("abcdefgh"), most=3) == ([0, 3, 6], ["a", "d", "g"])
    # Unescaped, "$^$" is a mathtext error at draw time.
    png = plan_heatmap_png([[0.5, 0.0], [0.0, 0.5]], tmp_path / "plan.png", ["$^$", "</s>"], [" x", "[SEP]"])
    assert (tmp_path / "plan.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png == str(tmp_path / "plan.png")


def test_the_trained_jobs_plan_heatmap_is_labelled_with_both_answers_pieces(tmp_path, monkeypatch):
    """``eval_plan`` (the end-of-run heatmap's data) on eval row 0 of a prepared quickstart job, with the teacher
    actor replaced by the same computation in process."""
    import types

    import ray

    from workers.data.prepared import open_data, prepare, teacher_key
    from workers.forward import answer_logits
    from workers.models import build_model
    from workers.student.in_loop_eval import eval_plan

    job = load_config(QUICKSTART, [f"output_dir={tmp_path}", "data.limit=50"])
    data = prepare(job, str(tmp_path / "cache"), say=lambda *_: None)
    s_tok, t_tok = load_tokenizer(job.student.tokenizer_name), load_tokenizer(job.teachers[0].tokenizer_name)
    torch.manual_seed(0)
    student = build_model(None, job.student.hf_config, tokenizer=s_tok)
    teacher = build_model(None, job.teachers[0].hf_config, tokenizer=t_tok)

    def payload(rows, batch_id, loss):
        batch = open_data(rows.data).batch(rows.split, rows.indices, teacher_key("teacher-sp"), t_tok.pad_token_id)
        return {"payload": mlot.compress_teacher(*answer_logits(teacher, batch, len(t_tok)),
                                                 config=loss.payload_config()).to_numpy()}

    monkeypatch.setattr(ray, "get", lambda reply: reply)
    replica = types.SimpleNamespace(payload=types.SimpleNamespace(remote=payload))
    sample = eval_plan(student, data, s_tok, job, {"teacher-sp": [replica]}, 0, torch.device("cpu"), len(s_tok))
    answer = open_data(data).rows("eval", [0])[0]["answer"]
    assert sample.plan.shape == (len(sample.teacher), len(sample.student))
    assert "".join(sample.teacher[:-1]).strip() == answer and sample.teacher[-1] == "</s>"
    assert "".join(sample.student[:-1]) == answer and sample.student[-1].strip() == "[SEP]"
    png = plan_heatmap_png(sample.plan, tmp_path / "plan.png", sample.teacher, sample.student)
    assert (tmp_path / "plan.png").read_bytes()[:4] == b"\x89PNG" and png.endswith("plan.png")
