"""A teacher model hosted in a Ray actor, serving compact payloads to the student workers.

The actor owns one HF causal LM and its own tokenizer and template. A request names rows of the job's
prepared data by index (``workers.data.prepared.Rows``); the actor reads its own tokens of them (tokenised
once, before training), runs the forward in inference mode on its own device, and returns only what the
loss needs (``mlot.compress_teacher``): ranked top-k probabilities, never full-vocabulary logits.
Nothing here imports the driver: the actor class is plain Python that ``ray.remote`` wraps.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

import mlot
from specs import storage
from workers.data.encoding import collate
from workers.data.prepared import DataRef, Rows, open_data, teacher_key
from workers.forward import answer_hidden, answer_logits, answer_window, to_device
from workers.generation import encode_answers
from workers.models import build_model, check_vocab, load_tokenizer
from workers.serving import PayloadReply, PayloadSettings, Request, ServerInfo, node_id
from workers.teacher.extras import Extras
from workers.teacher.hidden_cache import HiddenCache, default_budget
from workers.teacher.store import hidden_columns, payload_columns, write_shard
from workers.teacher.store_format import HEAD, PAYLOAD


def teacher_examples(teacher: Any, rows: Rows, answers: list[Any] | None = None) -> list[tuple[list[int], list[int]]]:
    """A teacher server's ``(input_ids, labels)`` of ``rows``: the prepared data's, or with the student's ``answers``
    (an on-policy micro-batch) in its own template and tokens. ``teacher``: a server with ``key``, ``tokenizer``,
    ``template`` and ``data`` (the job's ``DataConfig``), whatever its engine."""
    if answers is None:
        return open_data(rows.data).examples(rows.split, rows.indices, teacher.key)
    return encode_answers(open_data(rows.data).rows(rows.split, rows.indices), answers, teacher.tokenizer,
                          teacher.template, teacher.data.max_prompt_length)


class TeacherActor:
    """One replica of one teacher. Wrapped with ``ray.remote(...).options(resources...)`` by the driver.

    Args:
        teacher: an ``orchestrator.config.TeacherConfig``.
        data: the job's ``DataConfig`` (max lengths).
        loss: the job's ``LossConfig`` (which payload to compute).
        seed: seed for random-weight (``model_config``) teachers; replicas agree on it.
        weights_dir: a saved HF model to load instead (e.g. the pretrained quickstart teacher), a local path
            or a storage URI.
        cache: keep each batch's final hidden states (keyed by its rows) and serve later requests
            for it, whatever their loss settings, with only the LM head recomputed. For sweeps, where
            every trial asks for the same batches: one forward pass per example for the whole sweep.
        student: the job's ``StudentConfig``: needed to serve the identity-aware terms (``mlot.identity``),
            whose payload holds the student's character bounds too (``workers.teacher.extras``).
        cache_bytes: the cache's budget (least recently used batches evicted first;
            ``workers.teacher.hidden_cache``); None: half of ``resources.memory`` when set, else 10% of the
            node's memory.
    """

    def __init__(self, teacher: Any, data: Any, loss: Any, seed: int = 0, weights_dir: str | None = None,
                 cache: bool = False, student: Any = None, cache_bytes: int | None = None) -> None:
        self.name, self.key = teacher.name, teacher_key(teacher.name)
        self.loss, self.settings = loss, PayloadSettings(loss)
        self.extras = Extras(teacher, student, self.key)
        self.data = data
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = load_tokenizer(teacher.tokenizer_name, teacher.trust_remote_code)
        self.dtype = teacher.dtype or ("bfloat16" if self.device.type == "cuda" else "float32")
        # A replica given several GPUs spreads its layers over them (a teacher larger than one GPU).
        spread = self.device.type == "cuda" and teacher.resources.num_gpus > 1
        torch.manual_seed(seed)
        with storage.local_copy(weights_dir) if weights_dir else nullcontext() as saved:
            source = (saved, None, False) if saved else (teacher.model, teacher.hf_config, teacher.trust_remote_code)
            self.model = build_model(*source[:2], self.dtype, source[2], self.tokenizer,
                                     who=f"teacher {self.name}", device_map="auto" if spread else None)
        self.padded_rows = check_vocab(self.model, self.tokenizer, f"teachers[{self.name}]")
        self.vocab_size = len(self.tokenizer)
        if getattr(self.model, "hf_device_map", None) is None:
            self.model.to(self.device)
        self.model.eval()
        self.template = teacher.template
        self.forward_rows = 0  # rows this replica ran a forward pass on (sharing / caching is measured by it)
        self.cache = HiddenCache(cache_bytes or default_budget(teacher.resources.memory)) if cache else None
        self._head_is_exact: bool | None = None  # checked once: logits == head(final hidden)?
        self.served_rows = self.served_requests = self.forwards = 0
        self.busy_s = 0.0  # seconds spent serving payload requests

    def info(self) -> ServerInfo:
        return ServerInfo(name=self.name, device=str(self.device), dtype=self.dtype, vocab_size=self.vocab_size,
                          node_id=node_id(), padded_rows=self.padded_rows, forward_rows=self.forward_rows,
                          served_rows=self.served_rows, served_requests=self.served_requests, forwards=self.forwards,
                          busy_s=self.busy_s, cached_batches=None if self.cache is None else len(self.cache),
                          store=None)

    def cache_stats(self) -> dict[str, int] | None:
        """The hidden-state cache's hits, misses, bytes, entries, evictions and budget (None: no cache)."""
        return None if self.cache is None else self.cache.stats()

    def payload(self, rows: Rows, batch_id: Any = None, loss: Any = None, answers: list[Any] | None = None
                ) -> PayloadReply:
        """Run this teacher on its own tokens of ``rows`` and compress.

        Args:
            loss: a ``LossConfig`` whose payload to compute (a sweep's trial); default the actor's own.
            answers: on an on-policy micro-batch, the student's answers (``workers.generation.Answer``): the
                teacher encodes each row's prompt with that answer text, in its own tokens and template.

        Returns a ``workers.serving.PayloadReply``.
        """
        t0 = time.perf_counter()
        with torch.inference_mode():
            logits, labels = self._answer_logits(rows) if answers is None else self._text_logits(rows, answers)
            reply = self._reply(Request(rows, batch_id, loss, answers), logits, labels, t0)
        self.busy_s += time.perf_counter() - t0
        return reply

    def serve_merged(self, requests: list[Request], examples: list[list[tuple[list[int], list[int]]]]
                     ) -> list[PayloadReply]:
        """Several requests' rows in one forward; each request's payload is then computed on its own rows alone.

        ``examples``: each request's ``(input_ids, labels)`` (:meth:`examples`). Rows are left-padded to the
        longest of all, so a request's answer window (the last K positions, K of its own rows) holds the same
        tokens as when it is served alone; only the attention's reductions over the longer padding may round
        differently (|difference| of a few 1e-7 on fp32 logits).
        """
        t0 = time.perf_counter()
        flat = [e for ex in examples for e in ex]
        with torch.inference_mode():
            logits, labels = answer_logits(self.model, to_device(collate(flat, self.tokenizer.pad_token_id),
                                                                 self.device), self.vocab_size)
            self.forward_rows += len(flat)
            self.forwards += 1
            replies, start = [], 0
            for request, ex in zip(requests, examples):
                own = slice(start, start + len(ex))
                start += len(ex)
                k = answer_window(labels[own])
                replies.append(self._reply(request, logits[own, -k:], labels[own, -k:], t0))
        self.busy_s += time.perf_counter() - t0
        return replies

    def examples(self, rows: Rows, answers: list[Any] | None = None) -> list[tuple[list[int], list[int]]]:
        """This teacher's ``(input_ids, labels)`` of ``rows`` (:func:`teacher_examples`)."""
        return teacher_examples(self, rows, answers)

    def _reply(self, request: Request, logits: torch.Tensor, labels: torch.Tensor, t0: float) -> PayloadReply:
        """The payload of one request from its answer-window logits [B, K, V] and labels [B, K]."""
        labels = labels.to(logits.device)  # a teacher spread over GPUs puts its logits on its last one
        payload = mlot.compress_teacher(logits, labels, config=self.settings(request.loss))
        self.extras.add(payload, request.loss or self.loss, request.rows, request.answers, logits, labels)
        self.served_rows += len(request.rows.indices)
        self.served_requests += 1
        return PayloadReply(payload=payload.to("cpu").to_numpy(), batch_id=request.batch_id,
                            seconds=time.perf_counter() - t0, answer_tokens=int(payload.lengths.sum()))

    def _answer_logits(self, rows: Rows) -> tuple[torch.Tensor, torch.Tensor]:
        """Answer-window logits [B, K, V] and labels [B, K]; from the hidden-state cache when enabled."""
        key = rows.key() if self.cache is not None else None
        cached = self.cache.get(key) if key is not None else None
        if cached is not None:
            hidden, labels = cached
            logits = self._head(hidden)
            return logits, labels.to(logits.device)
        batch = to_device(self._batch(rows.data, rows.split, rows.indices), self.device)
        self.forward_rows += len(rows.indices)
        self.forwards += 1
        if key is None:
            return answer_logits(self.model, batch, self.vocab_size)
        hidden, labels = answer_hidden(self.model, batch)
        logits = self._head(hidden)
        if self._head_is_exact is None:
            # Heads with soft-capping or scaling (some architectures) are not head(hidden): then cache logits.
            direct, _ = answer_logits(self.model, batch, self.vocab_size)
            self._head_is_exact = bool(torch.allclose(direct, logits, rtol=1e-5, atol=1e-5))
        if not self._head_is_exact:
            logits, _ = answer_logits(self.model, batch, self.vocab_size)
            hidden = logits  # cache what is exact
        self.cache.put(key, hidden, labels)
        return logits, labels

    def _text_logits(self, rows: Rows, answers: list[Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Answer-window logits and labels of ``rows`` with the student's answers in place of the data's."""
        examples = self.examples(rows, answers)
        self.forward_rows += len(examples)
        self.forwards += 1
        return answer_logits(self.model, to_device(collate(examples, self.tokenizer.pad_token_id), self.device),
                             self.vocab_size)

    def teach(self, rows: Rows, path: str, fmt: str, loss: Any, batch_size: int, compress: str | None = None,
              hidden_dtype: str = "bfloat16") -> dict[str, Any]:
        """Run this teacher over ``rows`` (one shard of a store) and write the shard to ``path``.

        Rows are batched ``batch_size`` at a time in order of length (little padding, whatever the students'
        micro-batches); each keeps its key (origin, record) and the hash of its tokens (``workers.teacher.store``).

        Returns: rows, answer tokens, bytes written, seconds.
        """
        t0 = time.perf_counter()
        data = open_data(rows.data)
        examples = data.examples(rows.split, rows.indices, self.key)
        records = data.records(rows.split, rows.indices)
        hashes = data.hashes(rows.split, self.key)[list(rows.indices)]
        order = sorted(range(len(examples)), key=lambda i: len(examples[i][0]))
        columns: dict[str, list[Any]] = {"origin": [], "record": [], "row_hash": []}
        for start in range(0, len(order), batch_size):
            pick = order[start:start + batch_size]
            batch = to_device(collate([examples[i] for i in pick], self.tokenizer.pad_token_id), self.device)
            with torch.inference_mode():
                if fmt == PAYLOAD:
                    logits, labels = answer_logits(self.model, batch, self.vocab_size)
                    part = payload_columns(mlot.compress_teacher(logits, labels, config=self.settings(loss)),
                                           mlot.identity.gold_log_probs(logits, labels), compress)
                else:
                    part = hidden_columns(*answer_hidden(self.model, batch), hidden_dtype)
            for name, values in part.items():
                columns.setdefault(name, []).extend(values)
            columns["origin"] += [rows.data.origins[rows.split]] * len(pick)
            columns["record"] += [records[i] for i in pick]
            columns["row_hash"] += [int(hashes[i]) for i in pick]
        self.forward_rows += len(order)
        nbytes = write_shard(path, columns)
        return {"rows": len(order), "answer_tokens": sum(columns["length"]), "bytes": nbytes,
                "seconds": time.perf_counter() - t0}

    def write_head(self, store: str, data: DataRef) -> int:
        """Save the LM head (``head.safetensors``, fp32) for a ``hidden`` store; refuse a model whose logits are
        not ``head(final hidden)`` (soft-capping, scaling). Returns the bytes of the head."""
        from safetensors.torch import save_file

        from specs import UserError

        batch = to_device(self._batch(data, "train", range(min(4, data.sizes["train"]))), self.device)
        with torch.inference_mode():
            direct, _ = answer_logits(self.model, batch, self.vocab_size)
            hidden, _ = answer_hidden(self.model, batch)
            head = self.model.get_output_embeddings()
            if head.bias is not None or not torch.allclose(head(hidden)[..., :self.vocab_size], direct,
                                                            rtol=1e-5, atol=1e-5):
                raise UserError(f"teacher {self.name}: its logits are not a plain projection of its final hidden "
                                "states; make its store with --format payload")
        with storage.local_folder(store) as local:
            save_file({"weight": head.weight.detach().float().cpu().contiguous()}, str(Path(local, HEAD)))
            return Path(local, HEAD).stat().st_size

    def _batch(self, data: DataRef, split: str, indices: Any) -> dict[str, torch.Tensor]:
        return open_data(data).batch(split, indices, self.key, self.tokenizer.pad_token_id)

    def _head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits of final hidden states (cached ones come from the CPU): on the head's device, which for a
        teacher spread over GPUs is not the first."""
        if self._head_is_exact is False:
            return hidden.to(self.device)  # the cache holds logits
        head = self.model.get_output_embeddings()
        return head(hidden.to(head.weight.device))[..., :self.vocab_size]

    def pretrain(self, data: DataRef, steps: int, lr: float, batch_size: int, seed: int) -> dict[str, Any]:
        """Briefly train this (tiny, random) teacher on the task's training rows with CE, so distillation has
        signal.

        Returns the loss curve; ``save`` then writes the weights the replicas load.
        """
        g = torch.Generator().manual_seed(seed)
        opt = torch.optim.AdamW(self.model.parameters(), lr=lr)
        self.model.train()
        losses = []
        for _ in range(steps):
            pick = torch.randint(0, data.sizes["train"], (batch_size,), generator=g).tolist()
            batch = to_device(self._batch(data, "train", pick), self.device)
            logits, labels = answer_logits(self.model, batch, self.vocab_size)
            loss = mlot.causal_lm_loss(logits, labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        self.model.eval()
        self._forget()
        return {"losses": losses}

    def _forget(self) -> None:
        """New weights: cached hidden states are stale."""
        if self.cache is not None:
            self.cache.clear()

    def save(self, path: str) -> str:
        """Save model + tokenizer as a HF directory (safetensors) at ``path`` (a local path or a storage URI)."""
        with storage.local_folder(path) as local:
            self.model.save_pretrained(local, safe_serialization=True)
            self.tokenizer.save_pretrained(local)
        return path

    def generate(self, rows: list[dict[str, Any]], max_new_tokens: int = 32) -> list[str]:
        """Greedy answers for ``rows`` (their prompts, templated), first line only."""
        from workers.generation import greedy_answers
        return greedy_answers(self.model, self.tokenizer, self.template, rows, self.data.max_prompt_length,
                              max_new_tokens, self.device)


class PayloadCache:
    """Serves the payload of a batch it has seen before; asks its teacher for the others.

    Exact by construction: the key is the batch's rows (prepared data, split and indices) and the
    request's payload settings. A ``workers.serving.TeacherServer`` like :class:`TeacherActor`.
    """

    def __init__(self, teacher: Any) -> None:
        self.teacher = teacher
        self.store: dict[str, dict[str, Any]] = {}
        self.hits = self.misses = 0

    def payload(self, rows: Rows, batch_id: Any = None, loss: Any = None, answers: list[Any] | None = None
                ) -> PayloadReply:
        import ray

        if answers is not None:  # the student's own answers: new text every time, nothing to reuse
            return ray.get(self.teacher.payload.remote(rows, batch_id, loss, answers))
        key = rows.key() + ("" if loss is None else loss.model_dump_json())
        if key in self.store:
            self.hits += 1
        else:
            self.misses += 1
            self.store[key] = ray.get(self.teacher.payload.remote(rows, loss=loss))
        return {**self.store[key], "batch_id": batch_id}

    def stats(self) -> dict[str, int]:
        return {"hits": self.hits, "misses": self.misses, "entries": len(self.store)}

    def info(self) -> ServerInfo:
        """The teacher's own info (its forward rows), as for a TeacherActor."""
        import ray
        return ray.get(self.teacher.info.remote())
