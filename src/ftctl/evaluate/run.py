"""`ftctl eval`: generate on a run's held-out rows with the tuned (and optionally the base) model,
score, print a table, and write eval/<name>.json and eval/<name>.predictions.jsonl."""
from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

from omegaconf import OmegaConf

from ..errors import ConfigError, RunDirError
from ..runs import atomic_write_json, atomic_write_text, read_manifest


@dataclass
class EvalConfig:
    run: Optional[str] = None
    metrics: List[str] = field(default_factory=list)
    compare: Optional[str] = None  # base: also score the base model
    limit: Optional[int] = None
    max_new_tokens: int = 32
    batch_size: int = 16
    name: Optional[str] = None
    split: str = "validation"  # validation | test | train


def _load_models(run: Path, manifest: dict, cfg, device):
    """(base, tuned) loaders for a run directory."""
    from .. import models

    base_path = Path(manifest["model_path"])

    def base():
        return models.load_model(base_path, cfg.model, cfg.quant, device)

    def tuned():
        if (run / "adapter").is_dir():
            from peft import PeftModel

            try:
                return PeftModel.from_pretrained(base(), run / "adapter")
            except (RuntimeError, ValueError, KeyError) as e:  # shapes or module names that are not there
                raise RunDirError(f"adapter {run / 'adapter'} does not fit the base model {base_path} "
                                  f"({str(e).strip().splitlines()[0][:160]})") from e
        if (run / "model").is_dir():
            return models.load_model(run / "model", cfg.model, cfg.quant, device)
        raise RunDirError(f"{run}: no adapter/ or model/ folder (did the run finish?)")

    return base, tuned


def run_eval(ecfg: EvalConfig, console=None) -> dict:
    import torch
    from rich.console import Console
    from rich.table import Table

    from .. import models
    from ..data import pipeline
    from ..registry import METRICS
    from .generate import generate

    console = console or Console()
    if not ecfg.run:
        raise ConfigError("ftctl eval needs run=<run directory>")
    if not ecfg.metrics:
        raise ConfigError(f"ftctl eval needs at least one metric; available: {', '.join(METRICS.names())}")
    fns = {m: METRICS.get(m) for m in ecfg.metrics}
    if ecfg.name is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", ecfg.name):
        raise ConfigError(f"name={ecfg.name!r}: use letters, digits, '.', '_' and '-' only (it names files in eval/)")
    run = Path(ecfg.run)
    manifest = read_manifest(run)
    if manifest is None or not (run / "config.yaml").is_file():
        raise RunDirError(f"run={run}: not a run directory (no manifest.json/config.yaml)")
    if manifest.get("status") != "finished":
        raise RunDirError(f"run={run}: the run is {manifest.get('status')}, not finished")
    cfg = OmegaConf.load(run / "config.yaml")
    tokenizer = models.load_tokenizer(Path(manifest["model_path"]))
    split = pipeline.build(cfg, tokenizer).split(ecfg.split)
    prompts, refs = split.prompts, split.references
    if ecfg.limit:
        prompts, refs = prompts[:ecfg.limit], refs[:ecfg.limit]
    if not prompts:
        raise ConfigError(f"run={run}: the run has no {ecfg.split} rows to evaluate"
                          + (" (data.val_fraction=0)" if ecfg.split == "validation" else
                             " (set data.test_fraction or data.test_path when training)" if ecfg.split == "test" else ""))
    rows = prompts
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    base_loader, tuned_loader = _load_models(run, manifest, cfg, device)
    which = [("tuned", tuned_loader)] + ([("base", base_loader)] if ecfg.compare == "base" else [])
    if ecfg.compare not in (None, "base"):
        raise ConfigError(f"compare={ecfg.compare!r} is not allowed; choose: base")

    results, preds_by = {}, {}
    for label, loader in which:
        t0 = time.time()
        model = loader()
        with console.status(f"generating {len(prompts)} answers with the {label} model"):
            preds = generate(model, tokenizer, prompts, max_new_tokens=ecfg.max_new_tokens, batch_size=ecfg.batch_size)
        del model
        scores = {m: fn(preds, refs) for m, fn in fns.items()}
        results[label] = {m: round(s[0], 4) for m, s in scores.items()}
        results[label]["seconds"] = round(time.time() - t0, 1)
        preds_by[label] = (preds, {m: s[1] for m, s in scores.items()})

    table = Table(title=f"{run} — {len(rows)} {ecfg.split} rows")
    table.add_column("metric")
    for label, _ in which:
        table.add_column(label, justify="right")
    if "base" in results:
        table.add_column("Δ tuned − base", justify="right")
    for m in ecfg.metrics:
        cells = [f"{results[label][m]:.2f}" for label, _ in which]
        if "base" in results:
            cells.append(f"{results['tuned'][m] - results['base'][m]:+.2f}")
        table.add_row(m, *cells)
    console.print(table)

    name = ecfg.name or "_".join(ecfg.metrics)
    (run / "eval").mkdir(exist_ok=True)
    report = {"run": str(run), "rows": len(rows), "metrics": ecfg.metrics, "results": results,
              "settings": {"max_new_tokens": ecfg.max_new_tokens, "batch_size": ecfg.batch_size,
                           "limit": ecfg.limit, "split": ecfg.split, "compare": ecfg.compare, "decoding": "greedy"}}
    lines = []
    for i, (p, r) in enumerate(zip(prompts, refs)):
        row = {"prompt": p, "reference": r}
        for label in results:
            preds, per_row = preds_by[label]
            row[f"prediction_{label}"] = preds[i]
            row[f"scores_{label}"] = {m: per_row[m][i] for m in ecfg.metrics}
        lines.append(json.dumps(row))
    atomic_write_text(run / "eval" / f"{name}.predictions.jsonl", "\n".join(lines) + "\n")
    atomic_write_json(run / "eval" / f"{name}.json", report)
    return report
