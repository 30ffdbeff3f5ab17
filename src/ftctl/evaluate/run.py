"""`ftctl eval`: generate on held-out rows with a tuned model (a run directory, or a model folder),
optionally the base model beside it (``compare=base``) or the base model prompted with k training
examples (``shots=k``), score, print a table, and write eval/<name>.json and
eval/<name>.predictions.jsonl."""
from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

from omegaconf import OmegaConf

from ftctl.core.errors import ConfigError, RunDirError
from ftctl.core.atomic import atomic_write_json, atomic_write_text
from ftctl.rundir import load_finished_run


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


def load_models(run: Path, manifest: dict, cfg, device):
    """(base, tuned) loaders for a run directory."""
    from ftctl.models import load as models

    base_path = Path(manifest["model_path"])

    head = "score" if cfg.get("objective") == "reward" else "lm"

    def base():
        return models.load_model(base_path, cfg.model, cfg.quant, device, head=head,
                                 pad_id=models.load_tokenizer(base_path).pad_token_id)

    def tuned():
        if (run / "adapter").is_dir():
            from peft import PeftModel

            try:
                return PeftModel.from_pretrained(base(), run / "adapter")
            except (RuntimeError, ValueError, KeyError) as e:  # shapes or module names that are not there
                raise RunDirError(f"adapter {run / 'adapter'} does not fit the base model {base_path} "
                                  f"({str(e).strip().splitlines()[0][:160]})") from e
        if (run / "model").is_dir():
            return models.load_model(run / "model", cfg.model, cfg.quant, device, head=head,
                                     pad_id=models.load_tokenizer(base_path).pad_token_id)
        raise RunDirError(f"{run}: no adapter/ or model/ folder (did the run finish?)")

    return base, tuned


def _reference_loader(run: Path, manifest: dict, cfg, device, base_loader):
    """The DPO reference of a run: the base, or base + the SFT adapter it continued (model.adapter)."""
    if not cfg.model.get("adapter"):
        return base_loader

    def load():
        from peft import PeftModel

        from ftctl.rundir import adapter_folder

        return PeftModel.from_pretrained(base_loader(), adapter_folder(cfg.model.adapter))
    return load


def _check(ecfg: EvalConfig) -> None:
    from ftctl.core.registry import METRICS

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
    """The training config the rows and template come from: the run's, or composed for a model folder."""
    if ecfg.run:
        run = Path(ecfg.run)
        manifest, cfg = load_finished_run(run)
        for o in overrides:  # e.g. data.path=other.jsonl, to score the run on another file
            if "=" not in o or o.split("=", 1)[0].split(".")[0] not in ("data", "template"):
                raise ConfigError(f"{o}: with run=, only data.* and template.* keys can be changed")
        if overrides:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(overrides))
        return cfg, manifest, run
    from ftctl.config.compose import compose

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
        from ftctl.evaluate.embed import nearest

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

    from ftctl.data.tokenize import collate

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

    from ftctl.objectives.losses import pair_collate, sequence_logps

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
    from ftctl.objectives.losses import pair_credit

    rows = [pair_credit(a - b) for a, b in zip(c, r)]
    return sum(rows) / max(len(rows), 1), rows


def run_eval(ecfg: EvalConfig, overrides: list[str] | None = None, console=None) -> dict:
    import torch
    from rich.console import Console
    from rich.table import Table

    from ftctl.models import load as models
    from ftctl.data import pipeline
    from ftctl.core.registry import METRICS
    from ftctl.evaluate.generate import generate

    console = console or Console()
    _check(ecfg)
    cfg, manifest, run = _config(ecfg, list(overrides or []))
    if cfg.get("task", "generate") == "classify":
        from ftctl.tasks.classify import run_eval as classify_eval

        return classify_eval(ecfg, cfg, manifest, run, console)
    seq2seq = cfg.model.get("kind", "causal") == "seq2seq"
    if seq2seq and set(ecfg.metrics) & set(MODEL_METRICS):
        raise ConfigError(f"{', '.join(sorted(set(ecfg.metrics) & set(MODEL_METRICS)))}: not available for "
                          "model.kind=seq2seq runs; score generations (rouge, bleu, exact_match, accuracy, f1)")
    model_path = Path(manifest["model_path"])
    tokenizer = models.load_tokenizer(model_path)
    bundle = pipeline.build(cfg, tokenizer)
    split = bundle.split(ecfg.split)
    n = min(len(split.prompts), ecfg.limit or len(split.prompts))
    if n == 0:
        why = (f"{split.rows} rows in the split, {split.skipped_bad} bad, {split.dropped_too_long} too long"
               if split.rows else "data.test_fraction / data.test_path unset" if ecfg.split == "test"
               else "data.val_fraction=0 and no data.val_path" if ecfg.split == "validation" else "empty")
        raise ConfigError(f"no {ecfg.split} rows to evaluate ({why})")
    prompts = split.prompts[:n]
    refs = [r if len(r) > 1 else r[0] for r in split.all_references[:n]] if split.all_references else split.references[:n]
    examples = split.examples[:n]
    tpl = cfg.template
    chat_prompts = tpl.name == "chat" or (tpl.name == "preference" and tpl.get("style") == "chat")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    if run is not None:
        base_loader, tuned_loader = load_models(run, manifest, cfg, device)
    else:
        def tuned_loader():
            return models.load_model(model_path, cfg.model, cfg.quant, device)
        base_loader = None
    which = []
    if ecfg.shots:
        if not bundle.train.prompts:
            raise ConfigError(f"shots={ecfg.shots}: no training rows to take examples from")
        which.append((f"base {ecfg.shots}-shot", base_loader or tuned_loader,
                      _shots(ecfg, bundle.train, prompts, console)))
    else:
        which.append(("tuned" if run is not None else "model", tuned_loader, prompts))
    if ecfg.compare == "base":
        which.append(("base", base_loader, prompts))

    gen_metrics = [m for m in ecfg.metrics if m not in MODEL_METRICS]
    objective = cfg.get("objective", "sft")
    if objective == "reward" and set(ecfg.metrics) != {"reward_accuracy"}:
        raise ConfigError(f"{run}: a reward model scores answers, it does not write them; the metric for it is "
                          "reward_accuracy")
    ref_scores = None
    if "reward_accuracy" in ecfg.metrics:
        if not bundle.preference:
            raise ConfigError(f"reward_accuracy needs preference pairs (template=preference); {cfg.data.path} with "
                              f"template={tpl.name} gives single answers")
        if objective != "reward":
            if run is None:
                raise ConfigError("reward_accuracy of a policy needs run=<a DPO run> (its implicit reward is measured "
                                  "against the run's reference model)")
            with console.status(f"reference log-probabilities of {n} pairs"):
                ref = _reference_loader(run, manifest, cfg, device, base_loader)()
                ref_scores = pair_scores(ref, examples, tokenizer.pad_token_id, ecfg.batch_size)
                del ref
    results, per_row, preds_by = {}, {}, {}
    for label, loader, these_prompts in which:
        t0 = time.time()
        model = loader()
        scores: dict[str, tuple[float, list[float]]] = {}
        if gen_metrics:
            with console.status(f"generating {n} answers with the {label} model") as status:
                preds = generate(model, tokenizer, these_prompts, max_new_tokens=ecfg.max_new_tokens,
                                 batch_size=ecfg.batch_size, do_sample=ecfg.do_sample, temperature=ecfg.temperature,
                                 top_p=ecfg.top_p, top_k=ecfg.top_k, stop=list(ecfg.stop), seed=ecfg.seed,
                                 add_special_tokens=not chat_prompts,
                                 progress=lambda k, s=status, lab=label: s.update(
                                     f"generating with the {lab} model: {k}/{n}"))
            preds_by[label] = preds
            for m in gen_metrics:
                scores.update(METRICS.get(m)(preds, refs, labels=list(ecfg.labels) or None))
        if "perplexity" in ecfg.metrics:
            with console.status(f"perplexity of the {label} model on {n} rows"):
                scores["perplexity"] = perplexity(model, examples, tokenizer.pad_token_id, ecfg.batch_size)
        if "reward_accuracy" in ecfg.metrics:
            with console.status(f"scoring {n} preference pairs with the {label} model"):
                scores["reward_accuracy"] = reward_accuracy(
                    pair_scores(model, examples, tokenizer.pad_token_id, ecfg.batch_size), ref_scores)
        del model
        results[label] = {k: round(v[0], 4) for k, v in scores.items()}
        results[label]["seconds"] = round(time.time() - t0, 1)
        per_row[label] = {k: v[1] for k, v in scores.items()}

    labels = [w[0] for w in which]
    table = Table(title=f"{run or model_path} — {n} {ecfg.split} rows")
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

    name = ecfg.name or "_".join(ecfg.metrics) + (f"_{ecfg.shots}shot" if ecfg.shots else "")
    where = (run / "eval") if run is not None else Path(ecfg.output or model_path / "eval")
    where.mkdir(parents=True, exist_ok=True)
    settings = {k: getattr(ecfg, k) for k in ("split", "limit", "max_new_tokens", "batch_size", "do_sample",
                                                "temperature", "top_p", "top_k", "stop", "seed", "compare",
                                                "shots", "shot_selection", "labels")}
    settings["decoding"] = "sampling" if ecfg.do_sample else "greedy"
    report = {"run": str(run) if run is not None else None, "model": str(model_path), "rows": n,
              "metrics": ecfg.metrics, "results": results, "settings": settings,
              "data": {"path": cfg.data.path, "template": cfg.template.name}}
    lines = []
    for i in range(n):
        row = {"prompt": prompts[i], "reference": refs[i]}
        for label in labels:
            if label in preds_by:
                row[f"prediction_{label}"] = preds_by[label][i]
            row[f"scores_{label}"] = {k: v[i] for k, v in per_row[label].items()}
        lines.append(json.dumps(row, ensure_ascii=False))
    atomic_write_text(where / f"{name}.predictions.jsonl", "\n".join(lines) + "\n")
    atomic_write_json(where / f"{name}.json", report)
    console.print(f"wrote {where / (name + '.json')} and {name}.predictions.jsonl", highlight=False)
    return report
