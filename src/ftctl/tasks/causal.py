"""Causal language models (the default task): a decoder trained on the template's targets, or on pairs
(DPO, reward models); the adaptation method (peft=NAME) wraps it, or an earlier run's adapter goes on training."""
from __future__ import annotations

from pathlib import Path

from ftctl.core.errors import ConfigError
from ftctl.methods.peft import prepare
from ftctl.methods.spec import method_spec
from ftctl.rundir import adapter_folder
from ftctl.tasks.base import Task


def continue_adapter(model, spec: str, quantized: bool, gradient_checkpointing: bool):
    """Load an earlier run's adapter onto the base, trainable, to go on training it."""
    from peft import PeftModel

    folder = adapter_folder(spec)
    check_adapter_files(folder, spec)
    model = prepare(model, quantized, gradient_checkpointing)
    try:
        return PeftModel.from_pretrained(model, folder, is_trainable=True)
    except (RuntimeError, ValueError, KeyError) as e:
        raise ConfigError(f"model.adapter={spec}: does not fit model.path ({str(e).splitlines()[0][:200]})") from e


def check_adapter_files(folder: Path, spec: str) -> Path:
    """An adapter folder's config and weights, read before peft loads them, so that a bad file is one line
    naming it: adapter_config.json must be JSON; adapter_model.safetensors must parse; adapter_model.bin is read
    weights-only (tensors and plain data: a pickle that names anything else is refused, never run). Returns the
    weights file."""
    import json

    config = folder / "adapter_config.json"
    try:
        json.loads(config.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ConfigError(f"model.adapter={spec}: {config} is not valid JSON ({e})") from e
    weights = folder / "adapter_model.safetensors"
    if weights.is_file():
        from safetensors import safe_open

        try:
            with safe_open(str(weights), framework="pt") as f:
                f.keys()
        except Exception as e:  # safetensors raises its own SafetensorError (and OSError)
            raise ConfigError(f"model.adapter={spec}: {weights} is not a safetensors file "
                              f"({str(e).strip().splitlines()[0][:200]})") from e
        return weights
    weights = folder / "adapter_model.bin"
    if weights.is_file():
        _check_weights_only(weights, spec)
        return weights
    raise ConfigError(f"model.adapter={spec}: no adapter_model.safetensors or adapter_model.bin in {folder}")


def _check_weights_only(weights: Path, spec: str) -> None:
    """torch.load with weights_only=True: a pickle naming other globals is refused before anything runs."""
    import pickle
    import re
    import warnings

    import torch

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.load(weights, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        named = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) (\S+)", str(e))
        why = f"it names {named.group(1)}" if named else "not a weights-only file"
        raise ConfigError(f"model.adapter={spec}: {weights} holds pickled objects other than tensors and plain data "
                          f"({why}); refusing to load it (adapter_model.safetensors is the safe format)") from e
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise ConfigError(f"model.adapter={spec}: {weights} is not a PyTorch weights file "
                          f"({str(e).strip().splitlines()[0][:200]})") from e


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
