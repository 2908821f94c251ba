"""The student model as its DeepSpeed stage needs it: whole on every rank, or (ZeRO-3) partitioned as it is built.

Under ZeRO-3 building the whole student on every rank first, as stages 0-2 do, would hold the whole model on each
rank before DeepSpeed partitions it: the very memory ZeRO-3 exists to spread. There the student is built inside
DeepSpeed's ``zero.Init`` instead (each submodule is partitioned as soon as its constructor returns), which is a
collective: every rank builds it, at the same time.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch

from workers.models import build_model, causal_lm_config, check_vocab
from workers.student.engine import deepspeed_config, skip_shm_build


def is_zero3(ds_config: dict[str, Any]) -> bool:
    """Does this DeepSpeed config partition the parameters (ZeRO stage 3)?"""
    return int(ds_config.get("zero_optimization", {}).get("stage", 0)) == 3


def training_dtype(ds_config: dict[str, Any]) -> torch.dtype:
    """The dtype DeepSpeed trains the module in: bf16 / fp16 when its config enables them, else fp32."""
    if (ds_config.get("bf16") or ds_config.get("bfloat16") or {}).get("enabled"):
        return torch.bfloat16
    return torch.float16 if (ds_config.get("fp16") or {}).get("enabled") else torch.float32


def build_student(job: Any, tokenizer: Any) -> Any:
    """The job's student (a ``PreTrainedModel``; :func:`workers.models.build_model` checks its vocabulary).

    Stages 0-2: whole, in fp32, whatever ``student.dtype`` says: DeepSpeed's bf16/fp16 mode casts the module and keeps
    fp32 master weights in the optimizer. Stage 3 (the stage of :func:`deepspeed_config`, which a JSON config may
    set): partitioned as it is built, in the training dtype (:func:`training_dtype`); a rank holds its partitions
    and at most one submodule whole, while that submodule is built:

    * ``student.model`` (a checkpoint): transformers' own ZeRO-3 loading, which reads an ``HfDeepSpeedConfig``
      through a weak reference while ``from_pretrained`` runs (an empty partitioned model, then each checkpoint
      tensor copied into its partitions);
    * ``student.model_config``: a random init with the very weights (and RNG state after) of the whole build for
      the same seed (:func:`_partitioned_init`).
    """
    s = job.student
    ds_config = deepspeed_config(job)
    if not is_zero3(ds_config):
        return build_model(s.model, s.hf_config, "float32", s.trust_remote_code, tokenizer, who="student")
    skip_shm_build()  # zero.Init starts DeepSpeed's communication, which would build it
    dtype = training_dtype(ds_config)
    if s.model is None:
        return _partitioned_from_config(causal_lm_config(s.hf_config, tokenizer, "student"), ds_config, dtype,
                                        tokenizer)
    from transformers.integrations import HfDeepSpeedConfig

    hf_zero3 = HfDeepSpeedConfig(ds_config)  # transformers reads it through a weak reference: alive while loading
    try:
        return build_model(s.model, None, dtype, s.trust_remote_code, tokenizer, who="student")
    finally:
        del hf_zero3  # and gone after, so that nothing else in transformers (generate, resizing) acts on it


def _partitioned_from_config(config: Any, ds_config: dict[str, Any], dtype: torch.dtype, tokenizer: Any) -> Any:
    """``AutoModelForCausalLM.from_config`` inside ``deepspeed.zero.Init``, the weight init gathered
    (:func:`_partitioned_init`)."""
    import deepspeed
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, AutoModelForCausalLM
    from transformers.integrations.deepspeed import prevent_arange_dtype_change

    # Import the model's modules first: zero.Init replaces torch.Tensor.__new__, which breaks torch._dynamo's import.
    MODEL_FOR_CAUSAL_LM_MAPPING.get(type(config), None)
    # prevent_arange_dtype_change: RoPE tables are built with an explicit fp32 arange, which zero.Init would cast.
    # zero.Init takes its dtype from the config (the same as `dtype`): given one, DeepSpeed 0.19 ignores it on a CPU.
    with prevent_arange_dtype_change(), deepspeed.zero.Init(config_dict_or_path=ds_config), _partitioned_init():
        lm = AutoModelForCausalLM.from_config(config, dtype=dtype)
    check_vocab(lm, tokenizer, "student")
    return lm


@contextlib.contextmanager
def _partitioned_init() -> Iterator[None]:
    """Run transformers' weight init of every model built in the block on gathered parameters.

    Under ``zero.Init`` a submodule is partitioned (its tensors left empty) as soon as its constructor returns, so the
    ``post_init`` of the model holding it would initialise empty tensors. transformers' own ZeRO-3 build instead skips
    torch's init in every constructor and initialises afterwards, on rank 0: other weights than the whole build's for
    the same seed. Here each model's init runs where the whole build runs it (at the end of its constructor, after
    torch's constructor inits), in the same order and on every rank (the same random draws everywhere; rank 0's copy
    is kept), so the weights and the RNG state afterwards are those of the whole build.
    """
    from transformers import PreTrainedModel

    whole = PreTrainedModel.init_weights
    PreTrainedModel.init_weights = _init_weights_gathered
    try:
        yield
    finally:
        PreTrainedModel.init_weights = whole


def _init_weights_gathered(model: Any) -> None:
    """``PreTrainedModel.init_weights`` (``initialize_weights`` then ``tie_weights``) with each submodule's
    parameters gathered around its ``_initialize_weights`` (a collective)."""
    import deepspeed
    from transformers import PreTrainedModel
    from transformers.initialization import guard_torch_init_functions

    custom = model.is_custom_code()

    def visit(module: torch.nn.Module, init: Any) -> None:  # transformers' smart_apply: children first
        for child in module.children():
            visit(child, child._initialize_weights if isinstance(child, PreTrainedModel) else init)
        if getattr(module, "_is_hf_initialized", False):
            return  # an inner model's post_init initialised it (transformers skips it too): nothing to gather
        # _init_weights may write a direct child's parameters too (e.g. module.q_proj.weight).
        params = [*module.parameters(recurse=False),
                  *(p for c in module.children() if not isinstance(c, PreTrainedModel) for p in c.parameters(False))]
        with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
            init(module, custom)

    with torch.no_grad(), guard_torch_init_functions():
        visit(model, model._initialize_weights)
    model.tie_weights(recompute_mapping=False)


class HeadWhole:
    """The context in which the student's LM head holds its values, for losses that read it
    (``mlot.HeadLogits``, ``workers.forward.answer_head``): reentrant, so the trainer enters it once around a
    micro-batch's objective and every read inside costs nothing more.

    Under ZeRO-3 the head's parameters are gathered (a collective: every rank enters it in the same order, forward
    and backward). A head tied to the input embedding gets gradients twice per backward, the loss's share first
    (in the head's own context) and the embedding's last: ``ds_grad_is_ready`` tells DeepSpeed (stages 1-3) to reduce
    the sum once, at the second, as its tiled losses do.
    """

    def __init__(self, model: Any, zero3: bool) -> None:
        head = model.get_output_embeddings()
        self.params = [p for p in (head.weight, getattr(head, "bias", None)) if p is not None]
        self.tied = head.weight is model.get_input_embeddings().weight
        self.zero3, self.depth = zero3, 0
        self._stack = contextlib.ExitStack()

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        if self.depth == 0:
            if self.zero3:
                import deepspeed

                self._stack.enter_context(deepspeed.zero.GatheredParameters(self.params, modifier_rank=None))
            if self.tied:
                self.params[0].ds_grad_is_ready = False
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1
            if self.depth == 0:
                if self.tied:
                    self.params[0].ds_grad_is_ready = True
                self._stack.close()
