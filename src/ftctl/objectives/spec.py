"""What an objective is to the training loop: a spec registered by name (``objective=NAME``), saying what
the objective needs, and a builder that makes the objective for one run.

An objective object (built per run) has: ``collate(examples) -> batch``, ``count(batches)`` (the targets a
step's loss is normalised by: tokens or pairs), ``tokens(examples)`` (real tokens, for throughput),
``loss(model, batch, n_items, stats)`` and ``validate(model, examples, batch_size, device) -> dict``.
Adding an objective is one module that defines it and calls ``register(ObjectiveSpec(...))``, plus one
import line in ``ftctl/objectives/__init__.py``."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ftctl.core.registry import OBJECTIVES


@dataclass
class BuildContext:
    """What a builder may use: the composed config, the (unwrapped) model, the data, and where it runs."""
    cfg: Any
    model: Any
    pad_id: int
    bundle: Any
    model_path: Path
    steps: int
    console: Any
    autocast: Callable | None = None  # the engine's mixed-precision context where one process holds the model


@dataclass(frozen=True)
class ObjectiveSpec:
    name: str
    build: Callable[[BuildContext], Any]
    description: str
    pairs: bool = False        # trains on preference pairs (chosen/rejected); per-step pair statistics are logged
    reference: bool = False    # may need a reference policy (the starting model)
    generation: bool = False   # samples from the policy while it trains
    head: str = "lm"           # "lm": the language-model head; "score": a new scalar head (reward models)
    sharded: bool = False      # runs under the sharded engines (FSDP, ZeRO): no unsharded second model or head


def register(spec: ObjectiveSpec) -> ObjectiveSpec:
    return OBJECTIVES.register(spec.name)(spec)


def objective_spec(name: str) -> ObjectiveSpec:
    return OBJECTIVES.get(name)
