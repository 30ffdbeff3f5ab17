"""`ftctl eval`: generate on held-out rows with a tuned model (a run directory, or a model folder),
optionally the base model beside it (``compare=base``) or the base model prompted with k training
examples (``shots=k``), score, print a table, and write eval/<name>.json and
eval/<name>.predictions.jsonl."""
from __future__ import annotations

import contextlib
import json
import math
import re
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, List, Optional

from omegaconf import OmegaConf

from ftctl.config.compose import compose
from ftctl.core import lock
from ftctl.core.atomic import atomic_write_json, atomic_write_text, json_safe
from ftctl.core.device import pick_device
from ftctl.core.errors import ConfigError
from ftctl.core.registry import METRICS
from ftctl.data import pipeline
from ftctl.data.templates import from_config
from ftctl.data.tokenize import collate
from ftctl.evaluate.embed import nearest
from ftctl.evaluate.generate import generate
from ftctl.models import load as models
from ftctl.objectives.losses import pair_collate, pair_credit, sequence_logps
from ftctl.rundir import Run, load_folder, open_run
from ftctl.tasks.classify import run_eval as classify_eval

# metrics computed from the model's scores of the reference answers, not from generated text
MODEL_METRICS = ("perplexity", "reward_accuracy")


@dataclass
class EvalConfig:
    run: Optional[str] = None  # a run directory
    model: Optional[str] = None  # or a model folder (e.g. from ftctl merge / quantize), with recipe=/data=...
    metrics: List[str] = field(default_factory=list)
    compare: Optional[str] = None  # base: also score the base model
    shots: int = 0  # > 0: the base model prompted with k training examples instead of the tuned model
    shot_selection: str = "random"  # random | similar (nearest training prompts by sentence embedding)
    split: str = "validation"  # validation | test | train
    limit: Optional[int] = None
    max_new_tokens: int = 32
    batch_size: int = 16
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop: List[str] = field(default_factory=list)  # cut each generation at the first of these strings
    seed: int = 0
    labels: List[str] = field(default_factory=list)  # accuracy / f1: the label names (default: distinct references)
    name: Optional[str] = None
    output: Optional[str] = None  # where eval/ goes for model=; default <model>/eval
    trust_remote_code: bool = False  # run=: run the model folder's Python code (never taken from the run's config)


def _check(ecfg: EvalConfig) -> None:

    if not ecfg.run and not ecfg.model:
        raise ConfigError("ftctl eval needs run=<run directory> or model=<model folder>")
    if ecfg.run and ecfg.model:
        raise ConfigError("ftctl eval takes run= or model=, not both")
    names = METRICS.names() + list(MODEL_METRICS)
    if not ecfg.metrics:
        raise ConfigError(f"ftctl eval needs at least one metric; available: {', '.join(names)}")
    for m in ecfg.metrics:
        if m not in names:
            raise ConfigError(f"eval metric {m!r} is not known; choose one of: {', '.join(names)}")
    if ecfg.name is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", ecfg.name):
        raise ConfigError(f"name={ecfg.name!r}: use letters, digits, '.', '_' and '-' only (it names files in eval/)")
    if ecfg.compare not in (None, "base"):
        raise ConfigError(f"compare={ecfg.compare!r} is not allowed; choose: base")
    if ecfg.compare and not ecfg.run:
        raise ConfigError("compare=base needs run=<run directory> (a model folder does not say what its base is)")
    if ecfg.shots < 0 or ecfg.shots > 64:
        raise ConfigError(f"shots={ecfg.shots} must be between 0 and 64")
    if ecfg.shot_selection not in ("random", "similar"):
        raise ConfigError(f"shot_selection={ecfg.shot_selection!r} is not allowed; choose: random, similar")
    for key in ("max_new_tokens", "batch_size"):
        if getattr(ecfg, key) <= 0:
            raise ConfigError(f"{key}={getattr(ecfg, key)} must be > 0")
    if ecfg.limit is not None and ecfg.limit <= 0:
        raise ConfigError(f"limit={ecfg.limit} must be > 0")
    if not ecfg.temperature > 0:
        raise ConfigError(f"temperature={ecfg.temperature} must be > 0")
    if not 0 < ecfg.top_p <= 1:
        raise ConfigError(f"top_p={ecfg.top_p} must be in (0, 1]")


def _config(ecfg: EvalConfig, overrides: list[str]):
    """(config, manifest, run): the training config the rows and template come from, the run's (opened with
    ``ftctl.rundir.open_run``) or composed for a model folder (run is None then)."""
    if ecfg.run:
        run = open_run(ecfg.run, trust_remote_code=ecfg.trust_remote_code)
        for o in overrides:  # e.g. data.path=other.jsonl, to score the run on another file
            if "=" not in o or o.split("=", 1)[0].split(".")[0] not in ("data", "template"):
                raise ConfigError(f"{o}: with run=, only data.* and template.* keys can be changed")
        if overrides:
            run.config = OmegaConf.merge(run.config, OmegaConf.from_dotlist(overrides))
        return run.config, run.manifest, run

    folder = Path(ecfg.model).expanduser()
    if not (folder / "config.json").is_file():
        raise ConfigError(f"model={folder}: not a model folder (no config.json)")
    cfg, _ = compose("train", list(overrides) + [f"model.path={folder.resolve()}", "quant=none"])
    return cfg, {"model_path": str(folder.resolve())}, None


def _shots(ecfg, train, prompts: list[str], console) -> list[str]:
    """Each prompt with k training examples (prompt + answer) in front of it."""
    import random

    pool = list(zip(train.prompts, train.references))
    if len(pool) < ecfg.shots:
        raise ConfigError(f"shots={ecfg.shots}: the training split has only {len(pool)} rows")
    if ecfg.shot_selection == "random":
        rng = random.Random(ecfg.seed)
        picks = [rng.sample(range(len(pool)), ecfg.shots) for _ in prompts]
    else:

        with console.status(f"embedding {len(pool)} training prompts to pick similar examples"):
            picks = nearest([p for p, _ in pool], prompts, ecfg.shots)
    out = []
    for p, pick in zip(prompts, picks):
        # the most similar example goes last, nearest the question
        shots = "".join(f"{pool[i][0]}{pool[i][1]}\n\n" for i in reversed(pick))
        out.append(shots + p)
    return out


def perplexity(model, examples: list[dict], pad_id: int, batch_size: int) -> tuple[float, list[float]]:
    """exp(mean negative log-likelihood) of the trained tokens (the completions), over the split and per row."""
    import torch

    device = next(model.parameters()).device
    model.eval()
    total, count, rows = 0.0, 0, []
    with torch.no_grad():
        for i in range(0, len(examples), batch_size):
            batch = {k: v.to(device) for k, v in collate(examples[i:i + batch_size], pad_id).items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
            logits = logits[:, -batch["input_ids"].shape[1]:]  # prompt-learning adapters prepend virtual positions
            labels = batch["labels"][:, 1:]
            nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels, ignore_index=-100,
                                                    reduction="none")
            mask = labels != -100
            for row_nll, row_mask in zip(nll, mask):
                n = int(row_mask.sum())
                s = float(row_nll[row_mask].sum())
                rows.append(math.exp(s / max(n, 1)))
                total, count = total + s, count + n
    return math.exp(total / max(count, 1)), rows


def pair_scores(model, examples: list[dict], pad_id: int, batch_size: int):
    """(chosen, rejected) scores of each pair: a reward model's scalar output, or a policy's summed
    log-probability of each answer."""
    import torch

    device = next(model.parameters()).device
    model.eval()
    chosen, rejected = [], []
    with torch.no_grad():
        for i in range(0, len(examples), batch_size):
            batch = {k: v.to(device) for k, v in pair_collate(examples[i:i + batch_size], pad_id).items()}
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            if out.logits.shape[-1] == 1:  # a reward model's scalar head
                s = out.logits.squeeze(-1).float()
            else:
                s, _ = sequence_logps(out.logits, batch["labels"])
            k = s.shape[0] // 2
            chosen += s[:k].tolist()
            rejected += s[k:].tolist()
    return chosen, rejected


def reward_accuracy(scores, ref_scores=None) -> tuple[float, list[float]]:
    """Share of pairs whose chosen answer gets the higher reward (a tie counts one half). With ref_scores
    the reward is DPO's implicit one, log pi - log pi_ref (beta does not change the order)."""
    c, r = scores
    if ref_scores is not None:
        c = [a - b for a, b in zip(c, ref_scores[0])]
        r = [a - b for a, b in zip(r, ref_scores[1])]

    rows = [pair_credit(a - b) for a, b in zip(c, r)]
    return sum(rows) / max(len(rows), 1), rows


@dataclass
class EvalRows:
    """The rows ftctl eval scores: the first ``n`` of a split, their prompts, references and tokenized examples."""
    bundle: Any
    n: int
    prompts: list[str]
    refs: list
    examples: list[dict]


def _rows(ecfg: EvalConfig, cfg, tokenizer) -> EvalRows:

    bundle = pipeline.build(cfg, tokenizer)
    split = bundle.split(ecfg.split)
    n = min(len(split.prompts), ecfg.limit or len(split.prompts))
    if n == 0:
        why = (f"{split.rows} rows in the split, {split.skipped_bad} bad, {split.dropped_too_long} too long"
               if split.rows else "data.test_fraction / data.test_path unset" if ecfg.split == "test"
               else "data.val_fraction=0 and no data.val_path" if ecfg.split == "validation" else "empty")
        raise ConfigError(f"no {ecfg.split} rows to evaluate ({why})")
    refs = [r if len(r) > 1 else r[0] for r in split.all_references[:n]] if split.all_references else split.references[:n]
    return EvalRows(bundle, n, split.prompts[:n], refs, split.examples[:n])


def _candidates(ecfg: EvalConfig, cfg, run: Run | None, model_path: Path, device, rows: EvalRows,
                console) -> list[tuple[str, Callable, list[str]]]:
    """(label, model loader, prompts) of each model to score: the tuned model (or the base with k shots),
    and the base beside it with compare=base."""
    if run is not None:
        base_loader, tuned_loader = partial(run.load_base, device), partial(run.load_model, device)
    else:
        base_loader, tuned_loader = None, partial(load_folder, model_path, device, cfg.model, cfg.quant)
    which = []
    if ecfg.shots:
        if not rows.bundle.train.prompts:
            raise ConfigError(f"shots={ecfg.shots}: no training rows to take examples from")
        which.append((f"base {ecfg.shots}-shot", base_loader or tuned_loader,
                      _shots(ecfg, rows.bundle.train, rows.prompts, console)))
    else:
        which.append(("tuned" if run is not None else "model", tuned_loader, rows.prompts))
    if ecfg.compare == "base":
        which.append(("base", base_loader, rows.prompts))
    return which


def _reference_scores(ecfg: EvalConfig, cfg, run: Run | None, device, rows: EvalRows, pad_id: int, console):
    """The reference model's pair scores for a policy's reward_accuracy (None when not needed); first, the
    checks that the metrics fit the run's objective and data."""
    objective = cfg.get("objective", "sft")
    if objective == "reward" and set(ecfg.metrics) != {"reward_accuracy"}:
        raise ConfigError(f"{run.path if run is not None else None}: a reward model scores answers, it does not "
                          "write them; the metric for it is reward_accuracy")
    if "reward_accuracy" not in ecfg.metrics:
        return None
    if not rows.bundle.preference:
        raise ConfigError(f"reward_accuracy needs preference pairs (template=preference); {cfg.data.path} with "
                          f"template={cfg.template.name} gives single answers")
    if objective == "reward":
        return None
    if run is None:
        raise ConfigError("reward_accuracy of a policy needs run=<a DPO run> (its implicit reward is measured "
                          "against the run's reference model)")
    with console.status(f"reference log-probabilities of {rows.n} pairs"):
        ref = run.load_reference(device)
        scores = pair_scores(ref, rows.examples, pad_id, ecfg.batch_size)
        del ref
    return scores


def _score(ecfg: EvalConfig, label: str, loader, prompts: list[str], rows: EvalRows, tokenizer, plain: bool,
           ref_scores, console) -> tuple[dict, dict, list[str] | None]:
    """(figures, per-row scores, generations or None) of one model."""

    gen_metrics = [m for m in ecfg.metrics if m not in MODEL_METRICS]
    n, pad_id = rows.n, tokenizer.pad_token_id
    t0 = time.time()
    model = loader()
    scores: dict[str, tuple[float, list[float]]] = {}
    preds = None
    if gen_metrics:
        with console.status(f"generating {n} answers with the {label} model") as status:
            preds = generate(model, tokenizer, prompts, max_new_tokens=ecfg.max_new_tokens,
                             batch_size=ecfg.batch_size, do_sample=ecfg.do_sample, temperature=ecfg.temperature,
                             top_p=ecfg.top_p, top_k=ecfg.top_k, stop=list(ecfg.stop), seed=ecfg.seed,
                             add_special_tokens=plain,
                             progress=lambda k, s=status: s.update(f"generating with the {label} model: {k}/{n}"))
        for m in gen_metrics:
            scores.update(METRICS.get(m)(preds, rows.refs, labels=list(ecfg.labels) or None))
    if "perplexity" in ecfg.metrics:
        with console.status(f"perplexity of the {label} model on {n} rows"):
            scores["perplexity"] = perplexity(model, rows.examples, pad_id, ecfg.batch_size)
    if "reward_accuracy" in ecfg.metrics:
        with console.status(f"scoring {n} preference pairs with the {label} model"):
            scores["reward_accuracy"] = reward_accuracy(pair_scores(model, rows.examples, pad_id, ecfg.batch_size),
                                                        ref_scores)
    del model
    figures = {k: round(v[0], 4) for k, v in scores.items()}
    figures["seconds"] = round(time.time() - t0, 1)
    return figures, {k: v[1] for k, v in scores.items()}, preds


def _print_table(console, title: str, results: dict, labels: list[str]) -> None:
    from rich.table import Table

    table = Table(title=title)
    table.add_column("metric")
    for label in labels:
        table.add_column(label, justify="right")
    if len(labels) == 2:
        table.add_column(f"Δ {labels[0]} − {labels[1]}", justify="right")
    for k in [k for k in results[labels[0]] if k != "seconds"]:
        cells = [f"{results[label][k]:.2f}" for label in labels]
        if len(labels) == 2:
            cells.append(f"{results[labels[0]][k] - results[labels[1]][k]:+.2f}")
        table.add_row(k, *cells)
    console.print(table)


def _write(ecfg: EvalConfig, cfg, run: Run | None, model_path: Path, rows: EvalRows, results: dict, per_row: dict,
           preds_by: dict, console) -> dict:
    """eval/<name>.json (the figures and settings) and eval/<name>.predictions.jsonl (one line per row)."""
    labels = list(results)
    name = ecfg.name or "_".join(ecfg.metrics) + (f"_{ecfg.shots}shot" if ecfg.shots else "")
    where = (run.path / "eval") if run is not None else Path(ecfg.output or model_path / "eval")
    where.mkdir(parents=True, exist_ok=True)
    settings = {k: getattr(ecfg, k) for k in ("split", "limit", "max_new_tokens", "batch_size", "do_sample",
                                                "temperature", "top_p", "top_k", "stop", "seed", "compare",
                                                "shots", "shot_selection", "labels")}
    settings["decoding"] = "sampling" if ecfg.do_sample else "greedy"
    report = {"run": str(run.path) if run is not None else None, "model": str(model_path), "rows": rows.n,
              "metrics": ecfg.metrics, "results": results, "settings": settings,
              "data": {"path": cfg.data.path, "template": cfg.template.name}}
    lines = []
    for i in range(rows.n):
        row = {"prompt": rows.prompts[i], "reference": rows.refs[i]}
        for label in labels:
            if label in preds_by:
                row[f"prediction_{label}"] = preds_by[label][i]
            row[f"scores_{label}"] = {k: v[i] for k, v in per_row[label].items()}
        lines.append(json.dumps(json_safe(row), ensure_ascii=False, allow_nan=False))  # null, never a bare NaN
    atomic_write_text(where / f"{name}.predictions.jsonl", "\n".join(lines) + "\n")
    atomic_write_json(where / f"{name}.json", report)
    console.print(f"wrote {where / (name + '.json')} and {name}.predictions.jsonl", highlight=False)
    return report


def run_eval(ecfg: EvalConfig, overrides: list[str] | None = None, console=None) -> dict:
    """Score a run (or a model folder) on its held-out rows: print a table, write eval/, return the report.
    A run directory's lock is held throughout (one writer per run: eval refuses a run another process holds,
    e.g. one being trained)."""
    from rich.console import Console

    console = console or Console()
    _check(ecfg)
    run_dir = Path(ecfg.run).expanduser() if ecfg.run else None
    held = run_dir is not None and (run_dir / "manifest.json").is_file()  # else open_run says what it is not
    with lock.hold(run_dir, "ftctl eval") if held else contextlib.nullcontext():
        return _evaluate(ecfg, list(overrides or []), console)


def _evaluate(ecfg: EvalConfig, overrides: list[str], console) -> dict:
    cfg, manifest, run = _config(ecfg, overrides)
    if cfg.get("task", "generate") == "classify":

        return classify_eval(ecfg, cfg, manifest, run, console)
    seq2seq = cfg.model.get("kind", "causal") == "seq2seq"
    if seq2seq and set(ecfg.metrics) & set(MODEL_METRICS):
        raise ConfigError(f"{', '.join(sorted(set(ecfg.metrics) & set(MODEL_METRICS)))}: not available for "
                          "model.kind=seq2seq runs; score generations (rouge, bleu, exact_match, accuracy, f1)")
    model_path = Path(manifest["model_path"])
    tokenizer = run.tokenizer() if run is not None else models.load_tokenizer(model_path)
    rows = _rows(ecfg, cfg, tokenizer)
    template, ctx = from_config(cfg)
    device = pick_device()
    which = _candidates(ecfg, cfg, run, model_path, device, rows, console)
    ref_scores = _reference_scores(ecfg, cfg, run, device, rows, tokenizer.pad_token_id, console)
    results, per_row, preds_by = {}, {}, {}
    for label, loader, prompts in which:
        results[label], per_row[label], preds = _score(ecfg, label, loader, prompts, rows, tokenizer,
                                                       template.plain(ctx), ref_scores, console)
        if preds is not None:
            preds_by[label] = preds
    _print_table(console, f"{run.path if run is not None else model_path} — {rows.n} {ecfg.split} rows", results,
                 list(results))
    return _write(ecfg, cfg, run, model_path, rows, results, per_row, preds_by, console)
