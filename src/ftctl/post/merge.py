"""`ftctl merge`: fold a run's adapter into its base weights and write a standalone model folder,
after checking that the merged model's logits match base + adapter."""
from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ftctl.core import lock
from ftctl.core.atomic import atomic_write_json, replace_folder
from ftctl.core.device import pick_device
from ftctl.core.errors import ConfigError, FtctlError, RunDirError
from ftctl.data import pipeline
from ftctl.methods.spec import peft_type_merges
from ftctl.models.load import auto_class
from ftctl.rundir import check_output_folder, open_run
from ftctl.tasks.classify import build_data

MERGE_FILE = "ftctl-merge.json"  # what ftctl merge writes into its output folder (its proof of authorship)
# largest |logit difference| accepted between the merged model and base + adapter, by dtype
TOLERANCE = {"float32": 1e-3, "bfloat16": 0.25, "float16": 0.05}


@dataclass
class MergeConfig:
    run: Optional[str] = None
    output: Optional[str] = None  # default: <run>/merged
    dtype: str = "float32"  # float32 | bfloat16 | float16: the merged weights' dtype
    overwrite: bool = False
    max_shard_size: str = "2GB"
    check_rows: int = 4  # held-out prompts whose logits are compared
    trust_remote_code: bool = False  # run the model folder's Python code (never taken from the run's saved config)


def _open(mcfg: MergeConfig):
    """(run, peft type, output folder) of a run whose adapter can be merged; ConfigError or RunDirError
    saying why not otherwise."""
    if not mcfg.run:
        raise ConfigError("ftctl merge needs run=<run directory>")
    if mcfg.dtype not in TOLERANCE:
        raise ConfigError(f"dtype={mcfg.dtype!r} is not allowed; choose one of: {', '.join(TOLERANCE)}")
    run = open_run(mcfg.run, trust_remote_code=mcfg.trust_remote_code)
    if run.model_folder is not None and run.adapter is None:
        raise ConfigError(f"run={run.path} is a full fine-tune: {run.model_folder} is already a standalone model folder")
    if run.classifier is not None:
        raise ConfigError(f"run={run.path} is a feature-based classifier (classify.strategy=features): its logistic "
                          "regression in classifier/ sits on the unchanged base; there is nothing to merge")
    adapter = run.path / "adapter"
    if not (adapter / "adapter_config.json").is_file():
        raise RunDirError(f"run={run.path}: no adapter/adapter_config.json (did the run finish?)")
    peft_type = json.loads((adapter / "adapter_config.json").read_text()).get("peft_type", "?")
    if not peft_type_merges(peft_type):
        raise ConfigError(f"{peft_type.lower()} adapters cannot be merged: their trained parameters are extra inputs "
                          "(virtual tokens or prompts), not changes to the base weights; use the run's adapter as is")
    out = check_output_folder(Path(mcfg.output) if mcfg.output else run.path / "merged", [run.path, run.base_path],
                              MERGE_FILE, mcfg.overwrite, allowed_inside=run.path / "merged")
    lock.check_free(run.path)
    return run, peft_type, out


def _fold(model, inputs, mcfg: MergeConfig, console):
    """The merged model, and the largest |logit difference| between it and base + adapter on ``inputs``
    (RunDirError above the dtype's tolerance)."""
    import torch

    with torch.no_grad():
        before = model(**inputs).logits.float()
        merged = model.merge_and_unload().eval()
        after = merged(**inputs).logits.float()
    mask = inputs["attention_mask"].bool()
    # per position for a language model; one row of class logits per prompt for a classifier
    diff = float((before - after).abs()[mask].max() if before.dim() == 3 else (before - after).abs().max())
    tol = TOLERANCE[mcfg.dtype]
    console.print(f"max |logit difference| merged vs base + adapter on {mask.shape[0]} prompts "
                  f"({int(mask.sum())} positions): {diff:.3g} (tolerance for {mcfg.dtype}: {tol})", highlight=False)
    if not diff <= tol:
        raise RunDirError(f"merge refused: merged logits differ from base + adapter by {diff:.3g} > {tol} "
                          f"(dtype={mcfg.dtype}); try dtype=float32")
    return merged, diff


def merge(mcfg: MergeConfig, console) -> Path:

    run, peft_type, out = _open(mcfg)
    tokenizer = run.tokenizer()
    t0 = time.time()
    # the base in full precision, never quantized, on the CPU: a QLoRA adapter folds into the real weights
    with console.status(f"loading {run.base_path} in {mcfg.dtype} with the adapter"):
        model = run.load_model(pick_device("cpu"), dtype=mcfg.dtype, quantized=False).eval()
    inputs = _sample_inputs(run.config, tokenizer, mcfg.check_rows)
    if model.get_base_model().config.is_encoder_decoder:  # the same text through the decoder exercises its weights too
        inputs["decoder_input_ids"] = inputs["input_ids"]
    merged, diff = _fold(model, inputs, mcfg, console)

    def build(folder: Path) -> None:
        merged.save_pretrained(folder, safe_serialization=True, max_shard_size=mcfg.max_shard_size)
        tokenizer.save_pretrained(folder)
        atomic_write_json(folder / MERGE_FILE, {
            "run": str(run.path), "base": str(run.base_path), "adapter": str(run.adapter), "peft_type": peft_type,
            "dtype": mcfg.dtype, "max_logit_diff": diff, "tolerance": TOLERANCE[mcfg.dtype],
            "check_prompts": int(inputs["attention_mask"].shape[0]),
            "quantized_training_base": run.config.quant.method != "none"})

    inside = run.path.resolve() in out.resolve().parents
    with console.status(f"writing {out}"), lock.hold(run.path, "ftctl merge") if inside else contextlib.nullcontext():
        replace_folder(out, build)  # into the run: under its lock (one writer)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    auto_cls, _ = auto_class(run.config.model.get("kind", "causal"), run.head, labels=run.labels)
    console.print(f"[green]merged[/] in {time.time() - t0:.0f}s: {out} ({size / 2**20:.0f} MiB); "
                  f"load it with {auto_cls.__name__}.from_pretrained({str(out)!r})", highlight=False)
    return out


def _sample_inputs(cfg, tokenizer, n: int):
    """A few held-out prompts with their answers (the run's own data), right-padded."""

    try:
        if cfg.get("task", "generate") == "classify":

            texts = build_data(cfg, tokenizer).validation.prompts[:n]
        else:
            split = pipeline.build(cfg, tokenizer).validation
            texts = [p + r for p, r in zip(split.prompts[:n], split.references[:n])]
    except FtctlError:  # the run's data may be gone; any text exercises every merged weight
        texts = []
    if not texts:
        texts = ["The quick brown fox jumps over the lazy dog.", "def add(a, b):\n    return a + b\n"]
    old = tokenizer.padding_side
    tokenizer.padding_side = "right"
    try:
        return tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=256)
    finally:
        tokenizer.padding_side = old
