"""Causal language models (the default task): a decoder trained on the template's targets, or on pairs
(DPO, reward models); the adaptation method (peft=NAME) wraps it, or an earlier run's adapter goes on training."""
from __future__ import annotations

from ftctl.core.errors import ConfigError
from ftctl.methods.peft import prepare
from ftctl.methods.spec import method_spec
from ftctl.models.load import check_adapter_files
from ftctl.rundir import adapter_folder
from ftctl.tasks.base import Task


def continue_adapter(model, spec: str, quantized: bool, gradient_checkpointing: bool):
    """Load an earlier run's adapter onto the base, trainable, to go on training it."""
    from peft import PeftModel

    folder = adapter_folder(spec)
    check_adapter_files(folder, f"model.adapter={spec}")
    model = prepare(model, quantized, gradient_checkpointing)
    try:
        return PeftModel.from_pretrained(model, folder, is_trainable=True)
    except (RuntimeError, ValueError, KeyError) as e:
        raise ConfigError(f"model.adapter={spec}: does not fit model.path ({str(e).splitlines()[0][:200]})") from e


class CausalTask(Task):
    name = "generate"
    peft_task_type: str | None = None  # peft's TaskType for the adapter, where it is not a causal LM

    def adapt(self, model, cfg, *, quantized: bool, steps: int, model_path):
        gc = cfg.trainer.gradient_checkpointing
        if cfg.model.adapter:
            return continue_adapter(model, cfg.model.adapter, quantized, gc)
        # a reward model's adapter also trains its new scalar head (peft's SEQ_CLS task saves "score")
        task_type = "SEQ_CLS" if self.head(cfg) == "score" else self.peft_task_type
        extra = {"task_type": task_type} if task_type else {}
        return method_spec(cfg.peft.method).wrap(model, cfg.peft, quantized=quantized, gradient_checkpointing=gc,
                                             steps=steps, model_path=model_path, **extra)
