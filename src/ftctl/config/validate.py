"""Checks of a composed config: allowed values, ranges and combinations, one ConfigError line naming the key,
the value, what is allowed, and the recipe file and line where the key was set."""
from __future__ import annotations

import math
import os
import re
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from ftctl.config.checks import check_distributed, check_logging
from ftctl.config.choices import CHOICES, allowed
from ftctl.core.errors import ConfigError
from ftctl.data import jinja
from ftctl.methods.spec import method_spec


def locate(key: str, files: list[Path]) -> str:
    """file:line of ``key`` (its last part) in the first of ``files`` that sets it, else ''."""
    leaf = key.split(".")[-1]
    pat = re.compile(rf"^\s*{re.escape(leaf)}\s*:")
    for f in files:
        try:
            for n, line in enumerate(f.read_text().splitlines(), 1):
                if pat.match(line):
                    return f"{f}:{n}: "
        except OSError:
            continue
    return ""


# ----------------------------------------------------------------------------- validate
def _check_task(cfg: DictConfig, files) -> None:
    """task=classify and model.kind: the combinations that exist."""
    if (cfg.task == "classify" or cfg.model.kind == "seq2seq") and cfg.distributed.strategy != "single":
        what = "task=classify" if cfg.task == "classify" else "model.kind=seq2seq"
        raise ConfigError(f"distributed={cfg.distributed.strategy} is not available with {what} yet (one process "
                          "only); use distributed=single")
    if cfg.task == "classify":
        _allowed(cfg, "classify.strategy", files)
        _positive(cfg, "classify.blocks", files)
        _positive(cfg, "classify.C", files)
        if cfg.objective != "sft":
            raise ConfigError(f"objective={cfg.objective} does not apply to task=classify (its loss is the "
                              "classification cross-entropy); leave objective unset")
        if cfg.model.kind == "seq2seq":
            raise ConfigError("task=classify works with model.kind=encoder or causal, not seq2seq")
        if cfg.model.adapter:
            raise ConfigError("model.adapter (continuing an adapter) does not apply to task=classify; start from "
                              "the base model (or model.path=<a merged model>)")
        if cfg.quant.method != "none":
            raise ConfigError(f"quant={cfg.quant.method} is not available with task=classify; use quant=none")
        if len(set(cfg.classify.labels)) != len(cfg.classify.labels) or len(cfg.classify.labels) == 1:
            raise ConfigError(f"classify.labels={list(cfg.classify.labels)} must be empty or at least two "
                              "distinct names")
        return
    if cfg.data.balance != "none":
        raise ConfigError(f"{locate('balance', files)}data.balance={cfg.data.balance} applies to task=classify "
                          "(a classification head); use data.balance=none")
    if cfg.model.kind == "encoder":
        raise ConfigError("model.kind=encoder (a BERT-style model) cannot generate text; use it with task=classify")
    if cfg.model.kind == "seq2seq":
        if cfg.objective != "sft":
            raise ConfigError(f"objective={cfg.objective} is not available for model.kind=seq2seq (SFT only)")
        if cfg.data.packing:
            raise ConfigError("data.packing=true does not apply to model.kind=seq2seq (source and target are "
                              "separate sequences); use data.packing=false")


def _allowed(cfg: DictConfig, key: str, files) -> None:
    """``key``'s value is one of the table's (ftctl.config.choices.CHOICES)."""
    value, values = OmegaConf.select(cfg, key), allowed(key)
    if value not in values:
        raise ConfigError(
            f"{locate(key, files)}{key}={value!r} is not allowed; choose one of: {', '.join(map(str, values))}"
        )


def check_choices(cfg: DictConfig, files=()) -> None:
    """Every single-valued key of the table holds an allowed value (a key the table marks ``when=(key, value)``
    only when that other key has that value); the list-valued keys are checked with their own messages."""
    for c in CHOICES.values():
        if not c.many and (c.when is None or OmegaConf.select(cfg, c.when[0]) == c.when[1]):
            _allowed(cfg, c.key, files)


def _positive(cfg: DictConfig, key: str, files, strict: bool = True) -> None:
    value = OmegaConf.select(cfg, key)
    if value is None or (value <= 0 if strict else value < 0):
        raise ConfigError(f"{locate(key, files)}{key}={value!r} must be {'> 0' if strict else '>= 0'}")


def _refuse_targets(node, where: str, files) -> None:
    """ftctl never instantiates classes named in a config: a ``_target_`` key is refused wherever it is."""
    if isinstance(node, dict):
        for k, v in node.items():
            key = f"{where}.{k}" if where else str(k)
            if k in ("_target_", "_partial_", "_args_"):
                raise ConfigError(f"{locate(key, files)}{key}: refused; ftctl does not instantiate classes named "
                                  "in configs (choose methods by name, e.g. peft.method=lora)")
            _refuse_targets(v, key, files)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            _refuse_targets(v, f"{where}[{i}]", files)


def _check_peft(cfg: DictConfig, files) -> None:

    spec = method_spec(cfg.peft.method)
    if not cfg.model.adapter and cfg.get("task", "generate") != "classify":  # else peft.method wraps nothing
        spec.check_base(cfg.quant.method)
    if spec.virtual_tokens and cfg.data.packing:
        raise ConfigError(f"{locate('packing', files)}data.packing=true does not work with peft.method={cfg.peft.method}: "
                          "virtual tokens go before each row, and packed rows need their own position ids; "
                          "use data.packing=false")
    tm = cfg.peft.target_modules
    if isinstance(tm, str) and tm != "all-linear":
        try:
            re.compile(tm)
        except re.error as e:
            raise ConfigError(f"{locate('target_modules', files)}peft.target_modules={tm!r} is not a valid regular "
                              f"expression ({e})") from None
    elif not (tm is None or tm == "all-linear" or OmegaConf.is_list(tm) and all(isinstance(x, str) for x in tm)):
        raise ConfigError(f"{locate('target_modules', files)}peft.target_modules={tm!r} must be \"all-linear\", a list "
                          "of module names (e.g. [q_proj,v_proj]), a regular expression over module names, or null")


def _check_data_and_eval(cfg: DictConfig, files) -> None:
    known = allowed("eval.after_train")
    for m in cfg.eval.after_train:
        if m not in known:
            raise ConfigError(f"{locate('after_train', files)}eval.after_train: metric {m!r} is not known; "
                              f"choose from: {', '.join(known)}")
    for i, m in enumerate(cfg.data.mix):
        if not m.weight > 0:
            raise ConfigError(f"{locate('weight', files)}data.mix[{i}].weight={m.weight} must be > 0")
    for key in ("val_fraction", "test_fraction"):
        if not 0 <= cfg.data[key] < 1:
            raise ConfigError(f"{locate(key, files)}data.{key}={cfg.data[key]} must be in [0, 1)")
    if cfg.data.val_fraction + cfg.data.test_fraction >= 1:
        raise ConfigError("data.val_fraction + data.test_fraction must be < 1 (some rows must be left to train on)")


def _check_template(cfg: DictConfig, files) -> None:
    if cfg.template.name == "flan" and not cfg.template.phrasings:
        raise ConfigError("template=flan needs template.phrasings (choose template=flan_summarize, flan_classify "
                          "or flan_qa, or give your own)")

    for i, phrasing in enumerate(cfg.template.phrasings):
        where = f"{locate('phrasings', files)}template.phrasings[{i}]"
        if "|||" not in phrasing:
            raise ConfigError(f"{where}: no '|||' between prompt and target")
        jinja.check(phrasing, where)
    if cfg.template.chat_template:
        jinja.check(cfg.template.chat_template, f"{locate('chat_template', files)}template.chat_template")


def _check_ranges(cfg: DictConfig, files) -> None:
    _positive(cfg, "dpo.beta", files)
    if not 0 <= cfg.dpo.label_smoothing < 0.5:
        raise ConfigError(f"{locate('label_smoothing', files)}dpo.label_smoothing={cfg.dpo.label_smoothing} "
                          "must be in [0, 0.5)")
    for key in ("trainer.batch_size", "trainer.grad_accum", "trainer.lr", "data.max_length",
                "peft.r", "peft.alpha", "trainer.log_every", "trainer.keep_checkpoints", "peft.target_r",
                "peft.block_size", "peft.n_butterfly_factor", "peft.num_virtual_tokens", "peft.encoder_hidden_size",
                "peft.adapter_len", "peft.adapter_layers", "peft.loraplus_lr_ratio"):
        _positive(cfg, key, files)
    for key in ("trainer.eval_every", "trainer.save_every", "trainer.weight_decay", "trainer.max_grad_norm",
                "peft.dropout", "peft.trainable_layers"):
        _positive(cfg, key, files, strict=False)
    if not 0 <= cfg.peft.dropout < 1:
        raise ConfigError(f"peft.dropout={cfg.peft.dropout} must be in [0, 1)")
    if cfg.trainer.max_steps <= 0 and cfg.trainer.epochs <= 0:
        raise ConfigError("trainer.max_steps and trainer.epochs are both <= 0; set one of them (e.g. trainer.max_steps=100)")
    r = cfg.resume
    if not (isinstance(r, bool) or isinstance(r, str) and r):
        raise ConfigError(f"resume={r!r} must be true, false or a checkpoint path")


# the keys that hold a file or folder path (data.mix[*].path and a resume path are handled beside them)
PATH_KEYS = ("output_dir", "model.path", "model.adapter", "data.path", "data.val_path", "data.test_path",
             "distributed.deepspeed_config")
# groups whose float keys must be finite numbers (a NaN passes every `<` and `>` check)
FINITE_GROUPS = ("trainer", "peft", "dpo", "data", "classify", "eval", "launcher")


def expand_paths(cfg: DictConfig) -> None:
    """``~`` at the start of every path key becomes the home folder, once, here (so a run never makes a folder
    literally named ``~``); names that are not paths (builtin:, hub ids, resume=true) are left as they are."""
    def expand(value):
        return os.path.expanduser(value) if isinstance(value, str) and value.startswith("~") else value

    with read_write(cfg), open_dict(cfg):
        for key in (*PATH_KEYS, "resume"):
            value = OmegaConf.select(cfg, key, default=None)
            if expand(value) is not value:
                OmegaConf.update(cfg, key, expand(value), merge=False)
        for m in cfg.data.get("mix") or []:
            if "path" in m and not OmegaConf.is_missing(m, "path") and expand(m.path) is not m.path:
                m.path = expand(m.path)


def _check_finite(cfg: DictConfig, files) -> None:
    """No NaN or infinity where a number is needed."""
    for group in FINITE_GROUPS:
        for k, v in (cfg.get(group) or {}).items():
            if isinstance(v, float) and not math.isfinite(v):
                raise ConfigError(f"{locate(k, files)}{group}.{k}={v!r} must be a finite number")
    for i, m in enumerate(cfg.data.get("mix") or []):
        if isinstance(m.get("weight"), float) and not math.isfinite(m.weight):
            raise ConfigError(f"{locate('weight', files)}data.mix[{i}].weight={m.weight!r} must be a finite number")


def _check_counts(cfg: DictConfig, files) -> None:
    """Row limits (null: all rows), thread count (null or 0: all cores) and the warmup fraction."""
    for key in ("data.limit", "eval.limit"):
        value = OmegaConf.select(cfg, key)
        if value is not None and value <= 0:
            raise ConfigError(f"{locate(key, files)}{key}={value!r} must be > 0 (null: all rows)")
    _positive(cfg, "trainer.eval_max_rows", files)
    threads = cfg.trainer.num_threads
    if threads is not None and threads < 0:
        raise ConfigError(f"{locate('num_threads', files)}trainer.num_threads={threads!r} must be >= 0 "
                          "(null: all cores)")
    if not 0 <= cfg.trainer.warmup_ratio <= 1:
        raise ConfigError(f"{locate('warmup_ratio', files)}trainer.warmup_ratio={cfg.trainer.warmup_ratio!r} "
                          "must be in [0, 1]")


def _repo_root() -> Path | None:
    """The checkout ftctl runs from (an editable install), else None."""
    import ftctl

    root = Path(ftctl.__file__).resolve().parents[2]
    return root if (root / "pyproject.toml").is_file() else None


def check_output_dir(cfg: DictConfig, files=()) -> None:
    """output_dir is a run folder of its own: never /, the home folder, ftctl's checkout or the current folder
    itself (a run writes config.yaml, model/ and more there, and overwrite=true removes them); a subfolder is fine."""
    if not cfg.output_dir:
        return
    out = Path(cfg.output_dir).resolve()
    refused = {Path.cwd().resolve(): "the current folder"}  # later entries name a folder that is several of these
    root = _repo_root()
    if root is not None:
        refused[root] = "ftctl's repository"
    refused[Path.home().resolve()] = "the home folder"
    refused[Path("/").resolve()] = "the filesystem root"
    if out in refused:
        raise ConfigError(f"{locate('output_dir', files)}output_dir={cfg.output_dir}: refusing to write a run into "
                          f"{refused[out]} itself; choose a folder of its own, e.g. output_dir={out / 'runs' / 'my-run'}")


def validate(cfg: DictConfig, files: list[Path] = ()) -> None:
    """Allowed values (the table in ftctl.config.choices), combinations and ranges: the first problem as one
    ConfigError line naming the key, the value and the recipe file:line that set it."""

    files = list(files)
    _refuse_targets(OmegaConf.to_container(cfg, resolve=False), "", files)
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"{', '.join(missing)}: required but not set (e.g. {missing[0]}=...)")
    expand_paths(cfg)
    _check_finite(cfg, files)
    check_output_dir(cfg, files)
    check_choices(cfg, files)
    _check_peft(cfg, files)
    _check_data_and_eval(cfg, files)
    _check_template(cfg, files)
    check_distributed(cfg, lambda key: locate(key, files))
    _check_task(cfg, files)
    check_logging(cfg, lambda key: locate(key, files))
    _check_ranges(cfg, files)
    _check_counts(cfg, files)
