"""`ftctl merge`: fold a run's adapter into its base weights and write a standalone model folder,
after checking that the merged model's logits match base + adapter."""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ftctl.core.errors import ConfigError, FtctlError, RunDirError
from ftctl.core.atomic import atomic_write_json
from ftctl.rundir import load_finished_run

# largest |logit difference| accepted between the merged model and base + adapter, by dtype
TOLERANCE = {"float32": 1e-3, "bfloat16": 0.25, "float16": 0.05}
# peft methods whose weights fold into the base's (soft prompts and the adaption prompt do not)
MERGEABLE = {"LORA", "LOHA", "LOKR", "IA3", "ADALORA", "OFT", "BOFT", "VERA", "HRA", "BONE", "FOURIERFT", "SHIRA",
             "C3A", "MISS", "ROAD", "RANDLORA", "DELORA", "GRALORA", "WAVEFT"}


@dataclass
class MergeConfig:
    run: Optional[str] = None
    output: Optional[str] = None  # default: <run>/merged
    dtype: str = "float32"  # float32 | bfloat16 | float16: the merged weights' dtype
    overwrite: bool = False
    max_shard_size: str = "2GB"
    check_rows: int = 4  # held-out prompts whose logits are compared


def merge(mcfg: MergeConfig, console) -> Path:
    import torch

    from ftctl.models import load as models

    if not mcfg.run:
        raise ConfigError("ftctl merge needs run=<run directory>")
    if mcfg.dtype not in TOLERANCE:
        raise ConfigError(f"dtype={mcfg.dtype!r} is not allowed; choose one of: {', '.join(TOLERANCE)}")
    run = Path(mcfg.run)
    manifest, cfg = load_finished_run(run)
    if (run / "model").is_dir() and not (run / "adapter").is_dir():
        raise ConfigError(f"run={run} is a full fine-tune: {run / 'model'} is already a standalone model folder")
    if (run / "classifier").is_dir():
        raise ConfigError(f"run={run} is a feature-based classifier (classify.strategy=features): its logistic "
                          "regression in classifier/ sits on the unchanged base; there is nothing to merge")
    adapter = run / "adapter"
    if not (adapter / "adapter_config.json").is_file():
        raise RunDirError(f"run={run}: no adapter/adapter_config.json (did the run finish?)")
    peft_type = json.loads((adapter / "adapter_config.json").read_text()).get("peft_type", "?")
    if peft_type not in MERGEABLE:
        raise ConfigError(f"{peft_type.lower()} adapters cannot be merged: their trained parameters are extra inputs "
                          "(virtual tokens or prompts), not changes to the base weights; use the run's adapter as is")
    out = Path(mcfg.output) if mcfg.output else run / "merged"
    if out.exists() and any(out.iterdir()) and not mcfg.overwrite:
        raise RunDirError(f"output={out} already exists; choose another output= or pass overwrite=true")

    base_path = Path(manifest["model_path"])
    tokenizer = models.load_tokenizer(base_path)
    dtype = getattr(torch, mcfg.dtype)
    t0 = time.time()
    from peft import PeftModel

    classify = cfg.get("task", "generate") == "classify"
    auto_cls, head_kwargs = models.auto_class(cfg.model.get("kind", "causal"), "classify" if classify else "lm",
                                              tokenizer.pad_token_id, manifest.get("classify", {}).get("labels"))
    # the base in full precision, never quantized: a QLoRA adapter folds into the real weights
    with console.status(f"loading {base_path} in {mcfg.dtype} with the adapter"):
        base = auto_cls.from_pretrained(base_path, dtype=dtype, use_safetensors=True,
                                        trust_remote_code=bool(cfg.model.get("trust_remote_code", False)), **head_kwargs)
        model = PeftModel.from_pretrained(base, adapter).eval()
    inputs = _sample_inputs(cfg, tokenizer, mcfg.check_rows)
    if base.config.is_encoder_decoder:  # the same text through the decoder exercises its weights too
        inputs["decoder_input_ids"] = inputs["input_ids"]
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

    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    with console.status(f"writing {out}"):
        merged.save_pretrained(tmp, safe_serialization=True, max_shard_size=mcfg.max_shard_size)
        tokenizer.save_pretrained(tmp)
        atomic_write_json(tmp / "ftctl-merge.json", {
            "run": str(run), "base": str(base_path), "adapter": str(adapter), "peft_type": peft_type,
            "dtype": mcfg.dtype, "max_logit_diff": diff, "tolerance": tol, "check_prompts": int(mask.shape[0]),
            "quantized_training_base": cfg.quant.method != "none"})
        if out.exists():
            shutil.rmtree(out)
        os.rename(tmp, out)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    console.print(f"[green]merged[/] in {time.time() - t0:.0f}s: {out} ({size / 2**20:.0f} MiB); "
                  f"load it with {auto_cls.__name__}.from_pretrained({str(out)!r})", highlight=False)
    return out


def _sample_inputs(cfg, tokenizer, n: int):
    """A few held-out prompts with their answers (the run's own data), right-padded."""
    from ftctl.data import pipeline

    try:
        if cfg.get("task", "generate") == "classify":
            from ftctl.tasks.classify import build_data

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
