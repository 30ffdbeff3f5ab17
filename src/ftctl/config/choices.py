"""The allowed values of every config key that takes a name: one table (CHOICES) that the validator checks
against, that the schema's defaults are tested against, and that docs/config-values.md is rendered from
(``python -m ftctl.config.choices > docs/config-values.md``). Keys whose values are a registry's names (methods,
templates, quantization schemes, metrics) read that registry, so adding a method adds its name here too.

The distributed strategies and their families (which run under torchrun, which are DeepSpeed and at what ZeRO
stage) are here as well: the launcher, the engines and ``ftctl plan`` import them from this module."""
from __future__ import annotations

from dataclasses import dataclass

from ftctl.core import registry


@dataclass(frozen=True)
class Choice:
    key: str  # the dotted config key
    meaning: str  # one line: what the key decides
    values: tuple[str, ...] = ()  # the allowed values, in the order messages and docs list them (with a registry:
    # the order of those of its names listed here; its other names follow)
    registry: str | None = None  # or: the name of the ftctl.core.registry Registry whose names are allowed
    extra: tuple[str, ...] = ()  # names allowed beside the registry's
    many: bool = False  # the key takes a list of these values
    when: tuple[str, str] | None = None  # checked only when this other key has this value


# distributed.strategy: (engine family, DeepSpeed ZeRO stage or 0, what it does)
DISTRIBUTED = {
    "single": ("single", 0, "one process"),
    "ddp": ("ddp", 0, "Accelerate's DistributedDataParallel: a whole copy of the model per process"),
    "fsdp": ("fsdp", 0, "torch FSDP2: parameters, gradients and optimizer state sharded across processes"),
    "zero1": ("deepspeed", 1, "DeepSpeed ZeRO-1: optimizer state sharded"),
    "zero2": ("deepspeed", 2, "DeepSpeed ZeRO-2: optimizer state and gradients sharded"),
    "zero3": ("deepspeed", 3, "DeepSpeed ZeRO-3: parameters, gradients and optimizer state sharded"),
    "zero3_offload": ("deepspeed", 3, "DeepSpeed ZeRO-3 with parameters and optimizer state in CPU memory"),
}
STRATEGIES = tuple(DISTRIBUTED)
ENGINE = {s: engine for s, (engine, _, _) in DISTRIBUTED.items()}  # strategy -> single | ddp | fsdp | deepspeed
ZERO_STAGE = {s: stage for s, (_, stage, _) in DISTRIBUTED.items() if stage}  # the DeepSpeed strategies' stages
DEEPSPEED = tuple(ZERO_STAGE)
# strategies that always run under torchrun (they need a process group, even of one process)
SHARDED = tuple(s for s, engine in ENGINE.items() if engine in ("fsdp", "deepspeed"))

DTYPES = ("auto", "float32", "bfloat16", "float16")
# trainer.optimizer: torch's AdamW and SGD (momentum 0.9), bitsandbytes' 8-bit and paged AdamW, transformers' Adafactor
OPTIMIZERS = ("adamw", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit", "sgd", "adafactor")
PRECISIONS = ("auto", "fp32", "bf16", "fp16", "fp8")
TRACKERS = ("tensorboard", "mlflow", "wandb")

_TABLE = (
    Choice("model.dtype", "dtype the weights load in (auto: float32 on CPU, bfloat16 on a GPU that has it)", DTYPES),
    Choice("model.kind", "causal decoder LM, encoder-decoder (T5), or BERT-style encoder (task=classify only)",
           ("causal", "seq2seq", "encoder")),
    Choice("data.overlong", "a row longer than data.max_length (counted and reported either way)",
           ("drop", "truncate", "error")),
    Choice("data.train_on", "which tokens the loss sees (assistant: every assistant turn; last: the last one)",
           ("completion", "all", "assistant", "last")),
    Choice("data.bad_rows", "a row that cannot be used (invalid, missing field, nothing to train on)", ("error", "skip")),
    Choice("data.balance", "task=classify with imbalanced labels: repeat minority rows, drop majority rows, or "
           "weight the loss", ("none", "oversample", "undersample", "class_weights")),
    Choice("template.name", "how a row becomes a prompt and a target (configs/template/)", registry="TEMPLATES"),
    Choice("template.style", "preference pairs: text as is, or rendered with the chat template", ("plain", "chat")),
    Choice("peft.method", "the adaptation method (configs/peft/; ftctl methods describes each)", registry="METHODS"),
    Choice("peft.prompt_init", "prompt_tuning: the virtual tokens' initial embeddings",
           ("sample_vocab", "random", "text")),
    Choice("quant.method", "the base model's quantization while training (configs/quant/)", registry="QUANT"),
    Choice("quant.compute_dtype", "dtype of the 4-bit matmuls (auto: bfloat16 on a GPU that has it, else float32)",
           DTYPES),
    Choice("precision.name", "mixed precision of the training step (configs/precision/)", PRECISIONS),
    Choice("trainer.optimizer", "torch AdamW or SGD, bitsandbytes 8-bit or paged AdamW, transformers Adafactor",
           OPTIMIZERS),
    Choice("trainer.scheduler", "the learning-rate schedule after warm-up", ("cosine", "linear", "constant")),
    Choice("trainer.logits", "SFT on a causal LM: the output head only where a label is trained, or everywhere",
           ("targets", "all")),
    Choice("trainer.on_nan", "a NaN/Inf loss or gradient: stop with the last good checkpoint, or skip the step",
           ("stop", "skip")),
    Choice("trainer.cpu_allocator", "CPU memory: hand large freed tensors back to the OS at once, or glibc's default",
           ("release", "default")),
    Choice("distributed.strategy", "one process, DDP, torch FSDP2, or DeepSpeed ZeRO-1/2/3 (offload: parameters and "
           "optimizer state in CPU memory)", STRATEGIES),
    Choice("eval.split", "which split eval.after_train scores", ("validation", "test", "train")),
    Choice("eval.after_train", "metrics scored at the end of training (a list)", registry="METRICS",
           extra=("perplexity", "reward_accuracy"), many=True),
    Choice("logging.report_to", "experiment trackers (a list, or none)", ("none",) + TRACKERS, many=True),
    Choice("logging.wandb_mode", "W&B: offline unless an API key is configured, or always online or offline",
           ("auto", "online", "offline")),
    Choice("sweep.direction", "whether a sweep's best trial has the lowest or highest sweep.metric (auto: min for "
           "losses, perplexity, memory and time)", ("auto", "min", "max")),
    Choice("objective", "the training loss (ftctl/objectives/, a registry): next-token SFT, preference pairs "
           "(dpo.*), or a reward model", ("sft", "dpo", "reward"), registry="OBJECTIVES"),
    Choice("task", "generate text, or classify with a classification head (classify.*)", ("generate", "classify")),
    Choice("classify.strategy", "task=classify: what trains (features: a logistic regression on frozen embeddings)",
           registry="CLASSIFY", when=("task", "classify")),
    Choice("classify.pooling", "features: how token states become one vector (auto: mean for an encoder, last "
           "token for a decoder)", ("auto", "mean", "cls", "last")),
    Choice("dpo.loss", "objective=dpo: DPO (sigmoid), IPO, hinge, robust DPO, and SimPO and ORPO (no reference "
           "model)", ("sigmoid", "ipo", "hinge", "robust", "simpo", "orpo")),
)
CHOICES: dict[str, Choice] = {c.key: c for c in _TABLE}


def allowed(key: str) -> tuple[str, ...]:
    """The allowed values of ``key`` (a registry's names are read when asked for, so the registry fills first)."""
    c = CHOICES[key]
    if c.registry is None:
        return c.values
    names = getattr(registry, c.registry).names()
    # values beside a registry: the order to list them in (the default first), the registry's others after them
    return tuple(v for v in c.values if v in names) + tuple(n for n in names if n not in c.values) + c.extra


def markdown() -> str:
    """docs/config-values.md: every key of the table, its allowed values and what it decides."""
    lines = [
        "# Allowed config values",
        "",
        "<!-- generated from ftctl/config/choices.py (CHOICES): python -m ftctl.config.choices > "
        "docs/config-values.md -->",
        "",
        "Every config key that takes a name, and the names it takes. A value outside these stops `compose` with "
        "one line naming the key, the value and this list. Keys marked *list* take several values, e.g. "
        "`eval.after_train=[rouge,exact_match]`.",
        "",
        "| key | allowed values | what it decides |",
        "| --- | --- | --- |",
    ]
    for c in _TABLE:
        values = ", ".join(f"`{v}`" for v in allowed(c.key))
        lines.append(f"| `{c.key}`{' (*list*)' if c.many else ''} | {values} | {c.meaning} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(markdown(), end="")
