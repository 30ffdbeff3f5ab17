"""The adaptation-method registry: ``peft.method`` -> a function that makes a model trainable.

Each function takes (model, peft_cfg, quantized, gradient_checkpointing) and returns the model to
train, with exactly the parameters to update set to ``requires_grad``.
"""
from __future__ import annotations

from omegaconf import OmegaConf

from .errors import ConfigError
from .registry import ADAPTERS


def _target_modules(peft_cfg):
    tm = peft_cfg.target_modules
    return tm if isinstance(tm, str) else list(OmegaConf.to_container(tm) if OmegaConf.is_config(tm) else tm)


def _prepare(model, quantized: bool, gradient_checkpointing: bool):
    if quantized:
        from peft import prepare_model_for_kbit_training

        # casts norms and other non-quantized weights to float32, enables input grads for checkpointing
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    elif gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    return model


@ADAPTERS.register("lora")
def lora(model, peft_cfg, quantized: bool = False, gradient_checkpointing: bool = False, **extra):
    """LoRA (Hu et al., 2021) through peft; over a 4/8-bit base this is QLoRA."""
    from peft import LoraConfig, get_peft_model

    model = _prepare(model, quantized, gradient_checkpointing)
    mts = OmegaConf.to_container(peft_cfg.modules_to_save) if peft_cfg.modules_to_save is not None else None
    config = LoraConfig(r=peft_cfg.r, lora_alpha=peft_cfg.alpha, lora_dropout=peft_cfg.dropout,
                        target_modules=_target_modules(peft_cfg), bias=peft_cfg.bias,
                        modules_to_save=mts, **{"task_type": "CAUSAL_LM", **extra})
    try:
        return get_peft_model(model, config)
    except ValueError as e:
        raise ConfigError(f"peft.target_modules={peft_cfg.target_modules}: {str(e).splitlines()[0]}") from e


@ADAPTERS.register("dora")
def dora(model, peft_cfg, quantized: bool = False, gradient_checkpointing: bool = False, **extra):
    """DoRA (Liu et al., 2024): LoRA on the direction of each weight plus a trained magnitude vector."""
    return lora(model, peft_cfg, quantized, gradient_checkpointing, use_dora=True, **extra)


@ADAPTERS.register("full")
def full(model, peft_cfg, quantized: bool = False, gradient_checkpointing: bool = False, **extra):
    """Full fine-tuning: every weight is trained."""
    if quantized:
        raise ConfigError("peft.method=full cannot train a quantized base; use quant=none, or an adapter method such as lora")
    model = _prepare(model, False, gradient_checkpointing)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def is_adapter(model) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)
