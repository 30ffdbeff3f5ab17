"""One spec per adaptation method (``peft.method=NAME``): how it wraps a model, and its traits, as data.

In the spirit of peft's PeftType -> config -> tuner mapping, every method is the same shape: a
:class:`MethodSpec` holding the wrap function and what the rest of ftctl needs to know about the method
(does it save an adapter, does that adapter merge, which quantized bases it trains over, does it add
virtual tokens, does it need a per-step hook ...). Modules that care about a trait read it here instead of
testing method names. The specs are made by the :func:`method` decorator on each wrap function in
``ftctl.methods.peft``: adding a method with the traits of existing ones is one function and one decorator
line (plus its YAML file in configs/peft/).

Nothing here imports torch, transformers or peft at import time: validation reads the traits while the
config is composed.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Optional

from ftctl.core.errors import ConfigError
from ftctl.core.registry import METHODS

# the quant.method values (ftctl.models.load's QUANT registry; tests/test_method_specs.py checks they agree)
ANY_BASE = ("none", "nf4", "fp4", "int8")
FLOAT_BASE = ("none",)
FOUR_BIT_BASE = ("nf4", "fp4")

# peft types that no ftctl method makes but that peft merges: an adapter trained elsewhere and continued
# with model.adapter= keeps its own type
OTHER_MERGEABLE_PEFT_TYPES = frozenset({"HRA", "BONE", "FOURIERFT", "SHIRA", "C3A", "MISS", "ROAD", "RANDLORA",
                                        "DELORA", "GRALORA", "WAVEFT"})


@dataclass(frozen=True)
class MethodSpec:
    name: str  # peft.method=NAME
    # (model, peft_cfg, quantized=False, gradient_checkpointing=False, steps=None, model_path=None, **extra)
    # -> the model to train, exactly its trained parameters requiring grad; refuses a base it cannot train over
    wrap: Callable
    description: str  # one line (the wrap function's docstring), for `ftctl methods`
    # peft's PeftType of the saved adapter (adapter_config.json's peft_type); None: no adapter, the plain model
    # trains and is saved whole (run/model/)
    peft_type: Optional[str] = None
    merges: bool = False  # the adapter folds into the base weights (peft's merge_and_unload; `ftctl merge`)
    base_quant: tuple[str, ...] = ANY_BASE  # the quant.method values it trains over
    quant_reason: str = ""  # why the other quant.method values are refused, said after "peft.method=NAME "
    # trained virtual tokens go before the input (peft's prompt learning): no packing, nothing to merge, the
    # model's own forward (positions shift)
    virtual_tokens: bool = False
    # the model's forward adds a regulariser to the loss (AdaLoRA's orthogonality term): the loss must come
    # from the model's own forward, not from logits at the target positions only
    forward_adds_loss: bool = False
    # the initialisation rewrites the base weights (PiSSA, OLoRA keep the residual W - B·A): the saved adapter
    # is converted to plain LoRA against the original base, and the base must be unquantized
    mutates_base_init: bool = False
    # the base's weight matrices train themselves (full, freeze): autograd keeps every trained layer's inputs
    # (ftctl plan) and a quantized base cannot be used
    trains_base_weights: bool = False
    # for `ftctl plan` on the meta device: the method with the same trainable shapes whose initialisation needs
    # no real weights (PiSSA's SVD, LoftQ's quantization error read the weights)
    shapes_as: Optional[str] = None
    # (model, step) -> None after every optimizer step (AdaLoRA's rank allocation, which reads the gradients)
    step_hook: Optional[Callable] = None
    # (model, optimizer_cls, trainer_cfg, peft_cfg, **optimizer_kwargs) -> optimizer, where the method needs its
    # own parameter groups (LoRA+); None: ftctl's usual decay / no-decay groups
    optimizer: Optional[Callable] = None

    @property
    def adapter(self) -> bool:
        """Saves a peft adapter (run/adapter/); otherwise a whole model folder (run/model/)."""
        return self.peft_type is not None

    @property
    def quantized_base(self) -> bool:
        """Trains over at least one quantized base (quant.method other than none)."""
        return any(q != "none" for q in self.base_quant)

    @property
    def targets_only(self) -> bool:
        """The SFT loss may be computed from the final hidden states at the target positions only
        (trainer.logits=targets): no virtual tokens, and nothing added to the loss by the model's forward."""
        return not (self.virtual_tokens or self.forward_adds_loss)

    def check_base(self, quant: str) -> None:
        """Refuse quant.method=``quant`` (a config value) where the method cannot train over that base."""
        if quant not in self.base_quant:
            raise ConfigError(f"peft.method={self.name} {self.quant_reason or 'cannot train over quant=' + quant}")




def method(name: str, **traits) -> Callable:
    """Register the decorated wrap function as ``peft.method=name`` with these MethodSpec traits. The function
    registered (and returned) first refuses a quantized base the spec does not allow, so no method repeats
    that check. The registry (``ftctl.core.registry.METHODS``) fills on first lookup by importing methods/peft.py."""
    def deco(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrap(model, peft_cfg, quantized=False, *args, **kwargs):
            spec.check_base(base_quant_of(model) if quantized else "none")
            return fn(model, peft_cfg, quantized, *args, **kwargs)

        spec = MethodSpec(name=name, wrap=wrap, description=((fn.__doc__ or "").strip().splitlines() or [""])[0], **traits)
        METHODS.register(name)(spec)
        return wrap

    return deco


def method_spec(name: str) -> MethodSpec:
    """The spec of ``peft.method=name``; a ConfigError that lists the methods for an unknown name."""
    return METHODS.get(name)


def method_names() -> list[str]:
    return METHODS.names()


def spec_for_peft_type(peft_type: str) -> Optional[MethodSpec]:
    """The spec of the method that saves adapters of this peft type (the one of that name where several share it,
    e.g. lora for LORA: they share every trait of the adapter itself); None for a type no method makes."""
    peft_type = str(getattr(peft_type, "value", peft_type)).split(".")[-1].upper()
    own = peft_type.lower()
    if own in METHODS.names() and method_spec(own).peft_type == peft_type:
        return method_spec(own)
    return next((method_spec(n) for n in METHODS.names() if method_spec(n).peft_type == peft_type), None)


def adapter_spec(model) -> Optional[MethodSpec]:
    """The spec for the peft adapter ``model`` carries (made by peft.method, continued with model.adapter, or
    classify.strategy=lora), found by its peft type; None for a plain model or an adapter type no method makes."""
    config = getattr(model, "active_peft_config", None)
    return None if config is None else spec_for_peft_type(config.peft_type)


def peft_type_merges(peft_type: str) -> bool:
    """Whether an adapter of this peft type (adapter_config.json) folds into the base weights."""
    spec = spec_for_peft_type(peft_type)
    return spec.merges if spec is not None else str(peft_type).upper() in OTHER_MERGEABLE_PEFT_TYPES


def base_quant_of(model) -> str:
    """The quant.method a loaded model's linear layers carry: nf4 or fp4 (bitsandbytes 4-bit), int8, or none."""
    import bitsandbytes as bnb

    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            return str(m.weight.quant_type)
        if isinstance(m, bnb.nn.Linear8bitLt):
            return "int8"
    return "none"
