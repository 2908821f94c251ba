"""A teacher model hosted in a Ray actor, serving compact payloads to the student workers.

The actor owns one HF causal LM and its own tokenizer and template. Given text rows it tokenises
them its own way, runs the forward in inference mode on its own device, and returns only what the
loss needs (``mlot.compress_teacher``): ranked top-k probabilities, never full-vocabulary logits.
Nothing here imports the driver: the actor class is plain Python that ``ray.remote`` wraps.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from typing import Any

import torch

import mlot
from specs import storage
from workers.data import encode_batch
from workers.forward import answer_hidden, answer_logits, to_device
from workers.models import build_model, check_vocab, load_tokenizer


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
    """

    def __init__(self, teacher: Any, data: Any, loss: Any, seed: int = 0, weights_dir: str | None = None,
                 cache: bool = False) -> None:
        self.name = teacher.name
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
        self.payload_config = loss.payload_config()
        self.forward_rows = 0  # rows this replica ran a forward pass on (sharing / caching is measured by it)
        self.cache: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = {} if cache else None
        self._head_is_exact: bool | None = None  # checked once: logits == head(final hidden)?
        self._configs: dict[str, Any] = {}

    def info(self) -> dict[str, Any]:
        import ray
        return {"name": self.name, "device": str(self.device), "dtype": self.dtype, "vocab_size": self.vocab_size,
                "node_id": ray.get_runtime_context().get_node_id() if ray.is_initialized() else None,
                "padded_rows": self.padded_rows, "forward_rows": self.forward_rows,
                "cached_batches": None if self.cache is None else len(self.cache)}

    def payload(self, rows: list[dict[str, Any]], batch_id: Any = None, loss: Any = None) -> dict[str, Any]:
        """Tokenise ``rows`` with this teacher's template, run it, and compress.

        Args:
            loss: a ``LossConfig`` whose payload to compute (a sweep's trial); default the actor's own.

        Returns a plain dict (numpy arrays, no pickled classes): ``payload`` (``TeacherPayload.to_numpy``),
        ``batch_id`` echoed back (the worker checks it: a payload never lands on another batch),
        ``seconds`` spent, ``answer_tokens``.
        """
        t0 = time.perf_counter()
        cfg = self.payload_config if loss is None else self._config_for(loss)
        with torch.inference_mode():
            logits, labels = self._answer_logits(rows)
            payload = mlot.compress_teacher(logits, labels, config=cfg)
        return {"payload": payload.to("cpu").to_numpy(), "batch_id": batch_id, "seconds": time.perf_counter() - t0,
                "answer_tokens": int(payload.lengths.sum())}

    def _config_for(self, loss: Any) -> Any:
        """The payload settings of a request's loss, built once per distinct loss (workers send it every time)."""
        key = loss.model_dump_json()
        if key not in self._configs:
            self._configs[key] = loss.payload_config()
        return self._configs[key]

    def _answer_logits(self, rows: list[dict[str, Any]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Answer-window logits [B, K, V] and labels [B, K]; from the hidden-state cache when enabled."""
        key = _rows_key(rows) if self.cache is not None else None
        if key is not None and key in self.cache:
            hidden, labels = self.cache[key]
            return self._head(hidden.to(self.device)), labels.to(self.device)
        batch = to_device(encode_batch(rows, self.tokenizer, self.template, self.data.max_prompt_length,
                                       self.data.max_answer_length, on_bad_row="error")[0], self.device)
        self.forward_rows += len(rows)
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
        self.cache[key] = (hidden.cpu(), labels.cpu())
        return logits, labels

    def _head(self, hidden: torch.Tensor) -> torch.Tensor:
        if self._head_is_exact is False:
            return hidden  # the cache holds logits
        return self.model.get_output_embeddings()(hidden)[..., :self.vocab_size]

    def pretrain(self, rows: list[dict[str, Any]], steps: int, lr: float, batch_size: int, seed: int) -> dict[str, Any]:
        """Briefly train this (tiny, random) teacher on the task with CE, so distillation has signal.

        Returns the loss curve; ``save`` then writes the weights the replicas load.
        """
        g = torch.Generator().manual_seed(seed)
        opt = torch.optim.AdamW(self.model.parameters(), lr=lr)
        self.model.train()
        losses = []
        for _ in range(steps):
            pick = torch.randint(0, len(rows), (batch_size,), generator=g).tolist()
            batch, _ = encode_batch([rows[i] for i in pick], self.tokenizer, self.template,
                                    self.data.max_prompt_length, self.data.max_answer_length, on_bad_row="error")
            batch = to_device(batch, self.device)
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
        from workers.evaluate import greedy_answers
        return greedy_answers(self.model, self.tokenizer, self.template, rows, self.data.max_prompt_length,
                              max_new_tokens, self.device)


def _rows_key(rows: list[dict[str, Any]]) -> str:
    """Content key of a batch of rows (their text, in order)."""
    import hashlib
    import json

    return hashlib.sha256(json.dumps(rows, sort_keys=True, default=str).encode()).hexdigest()


class PayloadCache:
    """Serves the payload of a batch it has seen before; asks its teacher for the others.

    Exact by construction: the key is the batch's rows (their text) and the teacher's payload
    settings are fixed per actor. Same interface as :class:`TeacherActor` for the workers.
    """

    def __init__(self, teacher: Any) -> None:
        self.teacher = teacher
        self.store: dict[str, dict[str, Any]] = {}
        self.hits = self.misses = 0

    def payload(self, rows: list[dict[str, Any]], batch_id: Any = None, loss: Any = None) -> dict[str, Any]:
        import ray

        key = _rows_key(rows) + ("" if loss is None else loss.model_dump_json())
        if key in self.store:
            self.hits += 1
        else:
            self.misses += 1
            self.store[key] = ray.get(self.teacher.payload.remote(rows, loss=loss))
        return {**self.store[key], "batch_id": batch_id}

    def stats(self) -> dict[str, int]:
        return {"hits": self.hits, "misses": self.misses, "entries": len(self.store)}

    def info(self) -> dict[str, Any]:
        """The teacher's own info (its forward rows), as for a TeacherActor."""
        import ray
        return ray.get(self.teacher.info.remote())
