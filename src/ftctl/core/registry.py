"""Name -> function registries. A recipe picks a method, template or quantization scheme by a short
name; the name maps here to one function. Adding one is a function with ``@REGISTRY.register`` plus
a YAML file in configs/. Modules that register are imported on first lookup, and keep heavy
imports (torch, transformers) inside their functions so composing a config stays fast."""
from __future__ import annotations

import importlib
from typing import Callable

from ftctl.core.errors import ConfigError


class Registry:
    def __init__(self, key: str, module: str):
        self.key = key  # the config key that selects from this registry, for error messages
        self.module = module  # the module whose import fills the registry
        self._items: dict[str, Callable] = {}

    def register(self, name: str):
        def deco(fn: Callable) -> Callable:
            if name in self._items:
                raise ValueError(f"{self.key}: '{name}' registered twice")
            self._items[name] = fn
            return fn

        return deco

    def _load(self) -> None:
        importlib.import_module(self.module)

    def names(self) -> list[str]:
        self._load()
        return sorted(self._items)

    def get(self, name: str) -> Callable:
        self._load()
        try:
            return self._items[name]
        except KeyError:
            raise ConfigError(f"{self.key}={name!r} is not known; choose one of: {', '.join(self.names())}") from None


METHODS = Registry("peft.method", "ftctl.methods.peft")  # name -> methods.spec.MethodSpec
QUANT = Registry("quant.method", "ftctl.models.load")
TEMPLATES = Registry("template.name", "ftctl.data.templates")
DATASETS = Registry("data.path=builtin:", "ftctl.data.builtin")
BUILTIN_MODELS = Registry("model.path=builtin:", "ftctl.models.load")
METRICS = Registry("eval metric", "ftctl.evaluate.metrics")
CLASSIFY = Registry("classify.strategy", "ftctl.tasks.classify")
OBJECTIVES = Registry("objective", "ftctl.objectives")
