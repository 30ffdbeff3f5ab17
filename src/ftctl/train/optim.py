"""trainer.optimizer -> an optimizer over the trainable parameters, from torch, bitsandbytes or transformers.

Weight decay applies to matrices only (not to biases, norms or vectors). A method whose spec brings its own
optimizer (LoRA+, with peft's ``create_loraplus_optimizer``) makes it instead.
"""
from __future__ import annotations

from ftctl.methods.spec import method_spec


def optimizer_class(name: str):
    """(class, extra keyword arguments) for trainer.optimizer."""
    import torch

    if name == "adamw":
        return torch.optim.AdamW, {}
    if name == "sgd":
        return torch.optim.SGD, {"momentum": 0.9}
    if name == "adafactor":
        from transformers.optimization import Adafactor

        # a fixed learning rate from the schedule, not Adafactor's own relative step size
        return Adafactor, {"scale_parameter": False, "relative_step": False, "warmup_init": False}
    import bitsandbytes as bnb

    return {"adamw_8bit": bnb.optim.AdamW8bit, "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
            "paged_adamw_32bit": bnb.optim.PagedAdamW32bit}[name], {}


def make_optimizer(trainer_cfg, peft_cfg, model, params):

    cls, kwargs = optimizer_class(trainer_cfg.optimizer)
    own = method_spec(peft_cfg.method).optimizer
    if own is not None:
        return own(model, cls, trainer_cfg, peft_cfg, **kwargs)
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    return cls([{"params": decay, "weight_decay": trainer_cfg.weight_decay},
                {"params": no_decay, "weight_decay": 0.0}], lr=trainer_cfg.lr, **kwargs)
