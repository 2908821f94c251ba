"""On-policy answers from a vLLM copy of the student (``train.on_policy.engine: vllm``).

One actor, in the vLLM runtime (``scripts/setup_vllm.sh``'s ``.venv-vllm``, started with its python as the vLLM
teacher is), holds the student's architecture on a vLLM ``LLM`` and samples every rank's on-policy answers; the
ranks run no collective while it does, so no ``synced_gpus``-style wait can hang a ZeRO-3 group. The weights come
from the trainer: at the first step a group trains (a start or a restart) and every ``sync_every`` optimizer steps,
the ranks gather the student one submodule at a time (``checkpoint.consolidated_state_dict``, the export's gather)
and rank 0 sends the state dict (:meth:`VllmGenerator.load`, tagged with that step). A rank's request names the
step of the weights it must be sampled from: the actor answers it only once those are loaded, whichever rank's
message arrives first.

Samples are reproducible per (seed, rank, micro-batch) as with the hf engine (each answer a vLLM request with its
own seed, so batching does not change it), though not the same samples: the two engines draw differently.
"""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
import time
from typing import Any, Sequence

import torch

from workers.models import causal_lm_config, load_tokenizer
from workers.vllm_runtime import check_head_size, engine_in_process


class VllmGenerator:
    """A vLLM copy of the student; one Ray (async) actor serving all ranks.

    Args:
        student: ``job.student`` (its architecture: ``model``'s config, or ``model_config``; its tokenizer).
        on_policy: ``job.train.on_policy`` (``max_new_tokens``, ``temperature``, ``top_p``, ``vllm``, ``resources``).
        max_prompt_length: ``data.max_prompt_length`` (the engine holds prompt + answer).
        seed: ``train.seed``.
    """

    def __init__(self, student: Any, on_policy: Any, max_prompt_length: int, seed: int) -> None:
        engine_in_process()
        from vllm import LLM

        t0 = time.perf_counter()
        self.settings = on_policy
        tokenizer = load_tokenizer(student.tokenizer_name, student.trust_remote_code)
        self.eos = tokenizer.eos_token_id
        # As the hf engine: no special token but EOS is sampled, so an answer's tokens are exactly its text. vLLM's
        # strongest bias (-100: a probability times e^-100) on the few special ids, not a vocabulary-long allowed
        # list that every answer's request would carry and check (152k ids each).
        self.bias = {i: -100.0 for i in sorted(set(tokenizer.all_special_ids) - {self.eos})} or None
        self.dtype = student.dtype if torch.cuda.is_available() else "float32"
        runtime = on_policy.vllm
        with tempfile.TemporaryDirectory(prefix="mlot-vllm-student-") as folder:
            config = self._write_config(student, tokenizer, folder)
            check_head_size(config.get_text_config(), "student.model" if student.model else "student.model_config")
            # load_format="dummy": nothing is read from disk; the trainer sends the weights before the first sample.
            self.llm = LLM(model=folder, skip_tokenizer_init=True, load_format="dummy", dtype=self.dtype, seed=seed,
                           trust_remote_code=student.trust_remote_code, enforce_eager=runtime.enforce_eager,
                           max_model_len=runtime.max_model_len or max_prompt_length + on_policy.max_new_tokens,
                           kv_cache_memory_bytes=int(runtime.kv_cache_gb * (1 << 30)), enable_prefix_caching=False,
                           tensor_parallel_size=max(1, int(on_policy.resources.num_gpus)))
        self.version: int | None = None  # the training step of the loaded weights
        self._loaded: asyncio.Condition | None = None  # made in the actor's event loop (the first call)
        self.loads = self.requests = self.answers = 0
        self.busy_s = self.load_s = 0.0
        print(f"[mlot] on-policy generator: vLLM engine up in {time.perf_counter() - t0:.1f}s", flush=True)

    @staticmethod
    def _write_config(student: Any, tokenizer: Any, folder: str) -> Any:
        """The student's HF config, saved as ``config.json`` in ``folder`` (what vLLM builds its model from)."""
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(student.model, trust_remote_code=student.trust_remote_code) \
            if student.model else causal_lm_config(student.hf_config, tokenizer, who="student")
        config.save_pretrained(folder)
        path = os.path.join(folder, "config.json")
        with open(path) as f:
            saved = json.load(f)
        saved.pop("dtype", None)  # the engine's dtype is the one asked for
        with open(path, "w") as f:
            json.dump(saved, f)
        return config

    def _condition(self) -> asyncio.Condition:
        if self._loaded is None:
            self._loaded = asyncio.Condition()
        return self._loaded

    async def load(self, state: dict[str, torch.Tensor], version: int) -> None:
        """Take the trainer's weights (HF names, as ``state_dict``) as those of training step ``version``."""
        t0 = time.perf_counter()
        weights = [(k, v.to(getattr(torch, self.dtype))) for k, v in state.items()]
        # In place, with the engine's own post-processing after (on the CPU, vLLM repacks its linear layers).
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(weights)})
        async with self._condition():
            self.version = version
            self._condition().notify_all()
        self.loads += 1
        self.load_s += time.perf_counter() - t0

    async def sample(self, prompts: Sequence[Sequence[int]], seeds: Sequence[int], version: int,
                     timeout_s: float = 600.0) -> list[list[int]]:
        """Sample an answer to each prompt (token ids) with its own seed, from the weights of step ``version``;
        each answer's tokens up to and including its first EOS (as ``workers.student.on_policy.sample_answers``)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        async with self._condition():
            await asyncio.wait_for(self._condition().wait_for(lambda: self.version == version), timeout_s)
        t0 = time.perf_counter()
        s = self.settings
        params = [SamplingParams(temperature=s.temperature, top_p=s.top_p, top_k=0, max_tokens=s.max_new_tokens,
                               seed=seed, stop_token_ids=[self.eos], logit_bias=self.bias,
                               detokenize=False) for seed in seeds]
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params, use_tqdm=False)
        answers = []
        for out in outs:
            ids = list(out.outputs[0].token_ids)
            answers.append(ids[:ids.index(self.eos) + 1] if self.eos in ids else ids)
        self.requests += 1
        self.answers += len(answers)
        self.busy_s += time.perf_counter() - t0
        return answers

    def info(self) -> dict[str, Any]:
        """What the generator did: weight loads, requests and answers, seconds busy sampling and loading."""
        return {"version": self.version, "loads": self.loads, "requests": self.requests, "answers": self.answers,
                "busy_s": self.busy_s, "load_s": self.load_s}
