"""The method registry: every distillation loss the trainer can run, described in one place.

A :class:`Method` declares its name, whether it needs a teacher, which ``loss.params`` it takes (and
their validation), the payload settings its teacher compresses with, and its loss on a payload. The
config, the driver, the teacher actors, the student workers and the CLI all ask this registry; adding
a loss is one :func:`register` call::

    def my_loss(student_logits, student_labels, payload, mode, *, scale=1.0):
        r = mlot.multilevel_ot(student_logits, student_labels, payload, mode, use_sd=False)
        return dataclasses.replace(r, alpha=scale * r.alpha)

    mlot.register(mlot.Method("my_loss", my_loss, params=("scale",),
                              payload=lambda mode, p: mlot.make_config(mode, use_sd=False)))

after which ``loss.method: my_loss`` with ``loss.params: {scale: 2}`` is a valid job.
"""

from __future__ import annotations

import difflib
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from torch import Tensor

from .baselines import ULD_PARAMS, kl_distill, sft, uld
from .config import FIELDS, MultiLevelOTConfig, make_config
from .identity import IDENTITY_FIELDS, IdentityConfig
from .multilevel import multilevel_ot
from .payload import TeacherPayload
from .result import DistillResult

#: (student_logits [B, L_s, V_s], student_labels [B, L_s], payload or None, mode, **params) -> result
LossFn = Callable[..., DistillResult]
#: (mode, params) -> the settings a teacher compresses its logits with
PayloadFn = Callable[[str, Mapping[str, Any]], MultiLevelOTConfig]
Problem = tuple[str, Any, str]  # (parameter, value, message)


@dataclass(frozen=True)
class Method:
    """One distillation loss, as the distributed trainer sees it.

    Attributes:
        name: the ``loss.method`` value.
        loss: its loss on a teacher payload (None where it cannot run on one).
        params: the ``loss.params`` names it accepts; any other name is an error.
        payload: the teacher's payload settings for (mode, params); None where there is no payload.
        needs_teacher: False for methods that train on the labels alone (sft).
        same_vocabulary: True for methods that pair teacher and student columns by id (kl): every
            teacher must then use the student's tokenizer.
        defaults: parameter values used when the job does not set them (documented with the method), the
            identity terms' among them.
        modes: the ``loss.mode`` values it supports.
        distributed: False for methods that need full teacher logits and both tokenizers in one
            process (no compact payload exists for them).
        identity: True for methods that take the identity-aware terms (``mlot.identity``) next to their
            own: ``shared_weight``, ``chunk_weight``, ``projection_weight`` and their ``*_top_k`` are then
            parameters too.
        dense_modes: the modes whose loss needs the student's logits built (a dense [B, L, V] softmax), not
            read from the LM head (``mlot.head.HeadLogits``).
    """

    name: str
    loss: LossFn | None
    params: tuple[str, ...] = ()
    payload: PayloadFn | None = None
    defaults: Mapping[str, Any] = field(default_factory=dict)
    modes: tuple[str, ...] = ("paper",)
    needs_teacher: bool = True
    same_vocabulary: bool = False
    distributed: bool = True
    identity: bool = False
    dense_modes: tuple[str, ...] = ()

    @property
    def accepted(self) -> tuple[str, ...]:
        """Every ``loss.params`` name: the method's own, and the identity terms' where it takes them."""
        return self.params + (IDENTITY_FIELDS if self.identity else ())

    def resolved(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """The job's own-loss params (not the identity terms') over the method's defaults."""
        return {k: v for k, v in {**self.defaults, **params}.items() if k not in IDENTITY_FIELDS}

    def identity_config(self, params: Mapping[str, Any]) -> IdentityConfig:
        """The weights of the identity-aware terms in ``params`` over the method's defaults (all off when
        neither sets one)."""
        return IdentityConfig(**{k: v for k, v in {**self.defaults, **params}.items() if k in IDENTITY_FIELDS})

    def problems(self, mode: str, params: Mapping[str, Any]) -> list[Problem]:
        """Everything wrong with (mode, params), each naming the parameter; [] when they are usable."""
        if not self.distributed:
            return [("method", self.name, f"{self.name} needs full teacher logits and both tokenizers in one process "
                     f"(call mlot.{self.name} directly); "
                     f"the distributed trainer runs {', '.join(distributed_names())}")]
        if mode not in self.modes:
            return [("mode", mode, f"{self.name} supports loss.mode {' / '.join(self.modes)}")]
        out: list[Problem] = []
        for key in params:
            if key not in self.accepted:
                close = difflib.get_close_matches(key, self.accepted, n=1)
                hint = f"did you mean {close[0]!r}? " if close else ""
                allowed = ", ".join(self.accepted) or "none"
                out.append((key, params[key], f"unknown parameter of loss {self.name!r}; {hint}allowed: {allowed}"))
        if out:
            return out
        try:  # the real objects validate the values: the check can never drift from what runs
            if self.payload is not None:
                self.payload(mode, self.resolved(params))
            if self.identity:
                self.identity_config(params)
        except (ValueError, TypeError) as exc:
            named = [k for k in params if k in str(exc)] or [""]
            return [(named[0], params.get(named[0]), str(exc))]
        return []

    def payload_config(self, mode: str, params: Mapping[str, Any]) -> MultiLevelOTConfig:
        if self.payload is None:
            raise ValueError(f"loss method {self.name!r} takes no teacher payload")
        return self.payload(mode, self.resolved(params))

    def __call__(self, student_logits: Tensor, student_labels: Tensor, payload: TeacherPayload | None,
                 mode: str, params: Mapping[str, Any]) -> DistillResult:
        """The distillation result of one teacher's payload (CE is the caller's)."""
        assert self.loss is not None, f"{self.name} has no distributed loss"
        return self.loss(student_logits, student_labels, payload, mode, **self.resolved(params))


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add ``method`` to the registry (a name is registered once)."""
    if method.name in METHODS:
        raise ValueError(f"loss method {method.name!r} is already registered")
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    """The registered method called ``name``; a ValueError listing the known ones otherwise."""
    if name not in METHODS:
        raise ValueError(f"unknown loss method {name!r}; known: {', '.join(METHODS)}")
    return METHODS[name]


def distributed_names() -> list[str]:
    return [m.name for m in METHODS.values() if m.distributed]


# ---------------------------------------------------------------------------- the built-in methods

_MLOT_PARAMS = tuple(f for f in FIELDS if f != "mode")
_KL_PARAMS = tuple(p for p in inspect.signature(kl_distill).parameters if p not in
                   ("student_logits", "student_labels", "teacher_logits", "teacher_labels"))

#: ULD's payload keeps the teacher's top 100 sorted probabilities per token (not the whole
#: vocabulary: that would be 8 * V_t bytes per token, 4x bf16 logits). ``top_k: null`` restores it.
ULD_DISTRIBUTED_TOP_K = 100


def _kl_payload(mode: str, p: Mapping[str, Any]) -> MultiLevelOTConfig:
    if p.get("direction", "forward") not in ("forward", "reverse"):
        raise ValueError(f"direction must be 'forward' or 'reverse', got {p['direction']!r}")
    if p.get("direction") == "reverse" and p.get("top_k") is not None:
        raise ValueError("direction 'reverse' needs the teacher's full distribution: set top_k to null")
    return make_config("paper", ranking="token", top_k=p.get("top_k"), use_sd=False,
                       teacher_temperature=p.get("temperature", 1.0))


register(Method(
    "multilevel_ot", lambda s, sl, payload, mode, **p: multilevel_ot(s, sl, payload, mode=mode, **p),
    params=_MLOT_PARAMS, payload=lambda mode, p: make_config(mode, **p), modes=("paper", "reference"), identity=True,
    dense_modes=("reference",)))
register(Method(
    "uld", lambda s, sl, payload, mode, **p: uld(s, sl, payload, **p), params=_MLOT_PARAMS,
    payload=lambda mode, p: make_config("paper", **{**ULD_PARAMS, **p}), defaults={"top_k": ULD_DISTRIBUTED_TOP_K},
    identity=True))
register(Method(
    "kl", lambda s, sl, payload, mode, **p: kl_distill(s, sl, payload, **p), params=_KL_PARAMS, payload=_kl_payload,
    same_vocabulary=True))
register(Method("sft", lambda s, sl, payload, mode: sft(s, sl), needs_teacher=False))

#: ``aligned``'s defaults: the vocabulary projection at weight 1, the one setting of the known-truth study
#: (docs/quality.md, 10 seeds) that beats SFT on both variants: it closes 2.4x the SFT -> same-tokenizer gap on text
#: answers and gains on numbers one tokenizer splits into digits, where weight 3 (better on text) and the chunks
#: lose. ``chunk_weight`` and ``projection_weight`` stay parameters.
ALIGNED_DEFAULTS = {"chunk_weight": 0.0, "projection_weight": 1.0}


def _no_term(student_logits: Tensor, student_labels: Tensor, payload: TeacherPayload | None, mode: str
             ) -> DistillResult:
    """No term of its own: ``aligned`` is CE + the identity terms (``mlot.objective`` adds them)."""
    zero = student_logits.new_zeros(())
    return DistillResult(zero, 0.0, student_logits.new_zeros(student_logits.shape[0]), {})


# The terms that pair teacher and student by the text they predict, without a sorted-distribution term: the
# aligned-chunk likelihood and the vocabulary projection (mlot.identity). Its payload carries only what they
# need: the base payload's smallest form (the teacher's top 1 per token) holds the identity payload.
register(Method("aligned", _no_term, payload=lambda mode, p: make_config("paper", top_k=1, use_sd=False),
                defaults=ALIGNED_DEFAULTS, identity=True))
register(Method("mined", None, distributed=False))
