"""A teacher replica served by vLLM (``teachers[i].engine: vllm``): prefill-only scoring with top-K log-probabilities.

The actor runs in the vLLM runtime (``scripts/setup_vllm.sh``'s ``.venv-vllm``: vLLM pins another transformers than
the project), started by Ray with that venv's python (``runtime_env={"py_executable": ...}``, as NeMo RL runs its
vLLM workers); the driver and the students never import vLLM. A request is scored as :class:`TeacherActor` scores
it, on the same rows' teacher tokens (prepared data, or the student's answers on an on-policy micro-batch), but the
engine returns per answer row only the K most probable tokens' log-probabilities and the gold token's
(``SamplingParams(max_tokens=1, prompt_logprobs=K)``, K = the loss's top_k + 1); :mod:`mlot.top_logprobs` turns them
into the payload ``mlot.compress_teacher`` builds, exactly for token ranking and the gold log-probabilities, within
the bounds stated there for sequence ranking. Losses that need full logits are refused when the job is validated
(``orchestrator.config``) and again per request (a sweep's trials).

The weights equal the HF engine's: a ``model_config`` teacher is built by transformers from the same seed (then
saved for vLLM to load), a pretrained one is loaded from the folder the driver saved.
"""

from __future__ import annotations

import tempfile
import time
from contextlib import contextmanager, nullcontext
from typing import Any, Iterator

import numpy as np
import torch

from mlot.spans import IGNORE_INDEX
from mlot.top_logprobs import TopLogprobs, compress_top_logprobs, top_logprobs_problems
from specs import UserError, storage
from workers.data.encoding import collate
from workers.data.prepared import Rows, teacher_key
from workers.generation import first_line, prompt_ids
from workers.models import build_model, load_tokenizer, model_vocab_size
from workers.serving import PayloadReply, PayloadSettings, ServerInfo, node_id
from workers.teacher.actor import teacher_examples
from workers.teacher.extras import Extras
from workers.vllm_runtime import check_head_size, engine_in_process


class VllmTeacher:
    """One replica of one teacher on a vLLM ``LLM`` engine; a ``workers.serving.TeacherServer``.

    Args: as :class:`workers.teacher.actor.TeacherActor` (``teacher``, ``data``, ``loss``, ``seed``,
    ``weights_dir``, ``student``); the engine's settings are ``teacher.vllm``, its GPUs (tensor parallel)
    ``teacher.resources.num_gpus``.
    """

    def __init__(self, teacher: Any, data: Any, loss: Any, seed: int = 0, weights_dir: str | None = None,
                 student: Any = None) -> None:
        engine_in_process()
        from vllm import SamplingParams
        from vllm.platforms import current_platform

        t0 = time.perf_counter()
        self.name, self.key, self.data, self.loss = teacher.name, teacher_key(teacher.name), data, loss
        self.tokenizer = load_tokenizer(teacher.tokenizer_name, teacher.trust_remote_code)
        self.template, self.vocab_size = teacher.template, len(self.tokenizer)
        self.extras = Extras(teacher, student, self.key)
        top_k = loss.payload_config().top_k if loss.spec.payload is not None else None  # None: only generating
        self.k = teacher.vllm.max_logprobs or (top_k or 0) + 1  # K: one past the loss's top_k
        self.settings = PayloadSettings(loss, check=self._check)
        self.llm, self.dtype = self._engine(teacher, seed, weights_dir)
        self.device = current_platform.device_type
        self._scoring = SamplingParams(max_tokens=1, prompt_logprobs=self.k, flat_logprobs=True, detokenize=False)
        up = time.perf_counter() - t0
        self._score([([self.tokenizer.bos_token_id or 0] * 2, [IGNORE_INDEX, 0])])  # warm-up: kernels built now
        print(f"[mlot] teacher {self.name}: vLLM engine up in {up:.1f}s, warm-up {time.perf_counter() - t0 - up:.1f}s",
              flush=True)
        self.forward_rows = self.served_rows = self.served_requests = self.forwards = 0
        self.busy_s = 0.0

    # ------------------------------------------------------------------------ the engine

    def _engine(self, teacher: Any, seed: int, weights_dir: str | None) -> tuple[Any, str]:
        """The vLLM ``LLM`` of this teacher and its dtype."""
        from vllm import LLM

        dtype = teacher.dtype or ("bfloat16" if torch.cuda.is_available() else "float32")
        with self._model_folder(teacher, seed, weights_dir, dtype) as model:
            llm = LLM(model=model, skip_tokenizer_init=True, dtype=dtype, seed=seed,
                      trust_remote_code=teacher.trust_remote_code, enforce_eager=teacher.vllm.enforce_eager,
                      max_model_len=teacher.vllm.max_model_len, max_logprobs=self.k,
                      kv_cache_memory_bytes=int(teacher.vllm.kv_cache_gb * (1 << 30)),
                      tensor_parallel_size=max(1, int(teacher.resources.num_gpus)))
        return llm, dtype

    @contextmanager
    def _model_folder(self, teacher: Any, seed: int, weights_dir: str | None, dtype: str) -> Iterator[str]:
        """What vLLM loads: the saved weights (a local copy of a URI), the hub name / path, or a ``model_config``
        model built here from ``seed`` and saved to a temporary folder; checked first (:meth:`_check_model`)."""
        if weights_dir or teacher.model:
            from transformers import AutoConfig

            with storage.local_copy(weights_dir) if weights_dir else nullcontext(teacher.model) as model:
                text = AutoConfig.from_pretrained(model, trust_remote_code=teacher.trust_remote_code).get_text_config()
                self._check_model(text, text.vocab_size)
                yield model
            return
        torch.manual_seed(seed)
        built = build_model(None, teacher.hf_config, dtype, teacher.trust_remote_code, self.tokenizer,
                            who=f"teacher {self.name}")
        self._check_model(built.config.get_text_config(), model_vocab_size(built))
        with tempfile.TemporaryDirectory(prefix="mlot-vllm-") as folder:
            built.save_pretrained(folder, safe_serialization=True)
            del built
            yield folder

    def _check_model(self, text: Any, rows: int) -> None:
        """Refuse a model vLLM would not score as the HF engine does: vLLM normalises its log-probabilities over
        every row of the LM head (``rows``), the HF engine over the tokenizer's ids, so a padded head would change
        every probability; and vLLM's CPU attention has kernels for some head sizes only."""
        if rows != self.vocab_size:
            raise UserError(f"teachers[{self.name}]: its LM head has {rows:,} rows for the tokenizer's "
                            f"{self.vocab_size:,} tokens; vLLM normalises over every row: use engine: hf for this "
                            "teacher" + (" (or pair it with its own tokenizer)" if rows < self.vocab_size else ""))
        check_head_size(text, f"teachers[{self.name}]")

    # ------------------------------------------------------------------------ serving

    def _check(self, loss: Any) -> None:
        """Refuse a request's loss whose payload cannot be built from this engine's top-K log-probabilities."""
        cfg = loss.payload_config()
        problems = [f"{name}={value!r}: {why}" for name, value, why in top_logprobs_problems(cfg)]
        if loss.spec.identity_config(loss.params).shared:
            problems.append("shared_weight > 0: the exact-match term needs the teacher's whole distribution")
        if cfg.ranking == "token" and (cfg.top_k or 0) >= self.k:
            problems.append(f"top_k={cfg.top_k}: this engine returns {self.k} log-probabilities per row; raise "
                            f"teachers[{self.name}].vllm.max_logprobs to at least {(cfg.top_k or 0) + 1}")
        if problems:
            raise UserError(f"teacher {self.name} (engine: vllm) cannot serve this loss: {'; '.join(problems)}")

    def info(self) -> ServerInfo:
        return ServerInfo(name=self.name, device=self.device, dtype=self.dtype, vocab_size=self.vocab_size,
                          node_id=node_id(), padded_rows=0, forward_rows=self.forward_rows,
                          served_rows=self.served_rows, served_requests=self.served_requests, forwards=self.forwards,
                          busy_s=self.busy_s, cached_batches=None, store=None)

    def examples(self, rows: Rows, answers: list[Any] | None = None) -> list[tuple[list[int], list[int]]]:
        """This teacher's ``(input_ids, labels)`` of ``rows`` (``workers.teacher.actor.teacher_examples``)."""
        return teacher_examples(self, rows, answers)

    def payload(self, rows: Rows, batch_id: Any = None, loss: Any = None, answers: list[Any] | None = None
                ) -> PayloadReply:
        """Score this teacher's tokens of ``rows`` (the student's ``answers`` on an on-policy micro-batch) and
        compress, as ``TeacherActor.payload``. Returns a ``workers.serving.PayloadReply``."""
        t0 = time.perf_counter()
        config = self.settings(loss)
        examples = self.examples(rows, answers)
        top = self.score(examples)
        payload = compress_top_logprobs(top, config)
        labels = None if answers is None else collate(examples, self.tokenizer.pad_token_id)["labels"]
        self.extras.add(payload, loss or self.loss, rows, answers, labels=labels, token_logp=top.gold, top=top)
        self.served_rows += len(rows.indices)
        self.served_requests += 1
        seconds = time.perf_counter() - t0
        self.busy_s += seconds
        return PayloadReply(payload=payload.to_numpy(), batch_id=batch_id, seconds=seconds,
                            answer_tokens=int(payload.lengths.sum()))

    def score(self, examples: list[tuple[list[int], list[int]]]) -> TopLogprobs:
        """The engine's top-K and gold log-probabilities of each example's answer rows (one prefill each, batched
        by vLLM)."""
        top = self._score(examples)
        self.forward_rows += len(examples)
        self.forwards += 1
        return top

    def _score(self, examples: list[tuple[list[int], list[int]]]) -> TopLogprobs:
        from vllm.inputs import TokensPrompt

        outs = self.llm.generate([TokensPrompt(prompt_token_ids=ids) for ids, _ in examples], self._scoring,
                                 use_tqdm=False)
        return TopLogprobs.pad([self._answer_rows(ids, labels, out.prompt_logprobs)
                                for (ids, labels), out in zip(examples, outs)], self.vocab_size)

    def _answer_rows(self, ids: list[int], labels: list[int], flat: Any) -> tuple[np.ndarray, ...]:
        """(top ids [T, K], their log-probabilities [T, K], the gold log-probabilities [T]) of one example's answer
        from vLLM's ``FlatLogprobs`` (position j holds the gold token j first, then the top K of its row j - 1)."""
        first = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
        n = sum(label != IGNORE_INDEX for label in labels)
        start, end = flat.start_indices[first], flat.end_indices[first + n - 1]
        tok = np.asarray(flat.token_ids[start:end], dtype=np.int64).reshape(n, self.k + 1)
        val = np.asarray(flat.logprobs[start:end], dtype=np.float32).reshape(n, self.k + 1)
        if first == 0 or not (tok[:, 0] == ids[first:first + n]).all():
            raise RuntimeError(f"teacher {self.name}: vLLM's prompt log-probabilities do not line up with the "
                               "answer tokens (an answer must follow at least one prompt token)")
        return tok[:, 1:], val[:, 1:], val[:, 0]

    def generate(self, rows: list[dict[str, Any]], max_new_tokens: int = 32) -> list[str]:
        """Greedy answers for ``rows`` (their prompts, templated), first line only, as ``TeacherActor.generate``."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        prompts = [TokensPrompt(prompt_token_ids=prompt_ids(r, self.tokenizer, self.template,
                                                            self.data.max_prompt_length)) for r in rows]
        params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens, detokenize=False,
                                stop_token_ids=[self.tokenizer.eos_token_id])
        outs = self.llm.generate(prompts, params, use_tqdm=False)
        return [first_line(self.tokenizer.decode(o.outputs[0].token_ids, skip_special_tokens=True)) for o in outs]
