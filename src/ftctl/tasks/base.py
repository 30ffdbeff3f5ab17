"""What a task is to the training loop. The loop is the same for every task; a task says how its rows are
read, which head the model gets, how the adaptation method wraps it, which objective trains it, what its
manifest records, and what is scored when training ends."""
from __future__ import annotations

from abc import ABC, abstractmethod

from ftctl.data import pipeline
from ftctl.objectives.spec import BuildContext, objective_spec


class Task(ABC):
    name = "generate"

    def build_data(self, cfg, tokenizer):
        """The train/validation (and test) splits, tokenized."""

        return pipeline.build(cfg, tokenizer)

    def announce_data(self, cfg, bundle, console) -> None:
        """Anything about the data worth a line before training (e.g. how classes were balanced)."""
        if bundle.preference and cfg.objective == "sft":
            console.print("preference pairs with the SFT objective: training on prompt + chosen answer",
                          highlight=False)

    def head(self, cfg) -> str:
        """The model head to load: "lm", "score" (a scalar head) or "classify"."""
        return objective_spec(cfg.objective).head

    def labels(self, bundle) -> list[str] | None:
        return None

    def method(self, cfg) -> str:
        """What trains, for the start line."""
        return f"method={cfg.peft.method}"

    @abstractmethod
    def adapt(self, model, cfg, *, quantized: bool, steps: int, model_path):
        """The model wrapped by the adaptation method."""

    def fits_without_steps(self, cfg) -> bool:
        """True where the task trains without gradient steps (classify.strategy=features)."""
        return False

    def fit_without_steps(self, cfg, model, bundle, tokenizer, out, console):
        """Where fits_without_steps: fit, write the final folder; returns it and the manifest's additions."""
        raise NotImplementedError(f"task {self.name} trains with gradient steps")

    def objective(self, ctx: BuildContext):
        return objective_spec(ctx.cfg.objective).build(ctx)

    def manifest(self, cfg) -> dict:
        return {"peft_method": cfg.peft.method}

    def finish(self, model, bundle, pad_id: int, manifest: dict, console) -> None:
        """Scores computed once training ends, added to the manifest."""
