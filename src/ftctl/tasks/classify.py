"""task=classify: sequence classification with a classification head on a pretrained model.

An encoder (BERT-style, model.kind=encoder: the head reads the pooled [CLS] state) or a decoder
(model.kind=causal: the head reads the last non-padding token, as in the GPT-2 spam classifier), loaded
with transformers' AutoModelForSequenceClassification and a new head. ``classify.strategy`` says what
trains (a registry below, one function each):

  features    nothing: the frozen model's pooled token states go into a scikit-learn logistic regression
  head        the new head only (and BERT's pooler, the dense layer that feeds it)
  last_block  the last classify.blocks blocks, the final norm and the head
  lora        LoRA (peft's TaskType.SEQ_CLS, the peft.* keys), the head trained whole beside it
  full        every weight

The rows come from the same sources and the same 70/10/20-style split as every other task
(data.val_fraction, data.test_fraction, data.split_seed); ``data.balance`` handles imbalanced labels.
Scores (accuracy, precision, recall, F1 macro and per class, the confusion matrix) are scikit-learn's.
"""
from __future__ import annotations

import hashlib
import json
import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from ftctl.core.atomic import atomic_write_json, atomic_write_text, replace_folder
from ftctl.core.device import pick_device
from ftctl.core.errors import ConfigError, DataError
from ftctl.core.registry import CLASSIFY
from ftctl.data.pipeline import DataBundle, SplitData, describe, map_columns, split_indices, tokenizer_fingerprint
from ftctl.data.sources import read_source
from ftctl.methods.peft import freeze, head_modules, parameter_report
from ftctl.methods.peft import full as full_method
from ftctl.methods.peft import lora as lora_method
from ftctl.models import load as models
from ftctl.rundir import load_folder
from ftctl.tasks.base import Task

log = logging.getLogger("ftctl")

METRIC_NAMES = ("accuracy", "precision", "recall", "f1")
FEATURES_FILE = "logreg.safetensors"


# ----------------------------------------------------------------------------- data
@dataclass
class ClassifyBundle(DataBundle):
    labels: list[str] = field(default_factory=list)
    class_weights: list[float] | None = None  # data.balance=class_weights, per class id
    balance_report: str = ""
    train_unbalanced: list[dict] = field(default_factory=list, repr=False)  # the training rows before balancing


def _read(spec: str, key: str, cfg) -> list[tuple[str, str | None, str | None, str | None]]:
    """(location, text, label, error) for every row of a source, after data.columns."""

    d, c = cfg.data, cfg.classify
    src = read_source(spec, key, d.split if key == "data.path" else None, d.get("subset") if key == "data.path" else None)
    records = src.records[:d.limit] if d.limit and key == "data.path" else src.records
    out = []
    for r in records:
        if r.error:
            out.append((r.loc, None, None, r.error))
            continue
        try:
            row = map_columns(r.row, dict(d.columns or {}))
        except DataError as e:
            out.append((r.loc, None, None, e.message))
            continue
        text, label = row.get(c.text_field), row.get(c.label_field)
        if not isinstance(text, str) or not text.strip():
            out.append((r.loc, None, None, f"field '{c.text_field}' is missing or empty (classify.text_field)"))
        elif label is None or isinstance(label, (dict, list)) or not str(label).strip():
            out.append((r.loc, None, None, f"field '{c.label_field}' is missing or not a label (classify.label_field)"))
        else:
            out.append((r.loc, text, str(label).strip(), None))
    return out


def _split(name: str, rows, labels: list[str], tokenizer, data_cfg) -> SplitData:
    """Tokenize one split's rows under the bad-row and length policies."""
    sd = SplitData(name=name, rows=len(rows))
    index = {lab: i for i, lab in enumerate(labels)}
    good = []
    for loc, text, label, err in rows:
        if err is None and label not in index:
            err = f"label {label!r} is not one of classify.labels={labels}"
        if err is not None:
            if data_cfg.bad_rows == "error":
                raise DataError(f"{loc}: {err} (data.bad_rows=skip drops bad rows and reports them)")
            sd.skipped_bad += 1
            if len(sd.bad_examples) < 3:
                sd.bad_examples.append(f"{loc}: {err}")
            continue
        good.append((loc, text, label))
    ids = tokenizer([t for _, t, _ in good], add_special_tokens=True)["input_ids"] if good else []
    for (loc, text, label), seq in zip(good, ids):
        if len(seq) > data_cfg.max_length:
            if data_cfg.overlong == "error":
                raise DataError(f"{loc}: {len(seq)} tokens > data.max_length={data_cfg.max_length} (raise "
                                "data.max_length, or set data.overlong=drop|truncate)")
            if data_cfg.overlong == "drop":
                sd.dropped_too_long += 1
                continue
            # keep the end-of-sequence token ([SEP] for BERT) a truncated row would otherwise lose
            seq = seq[:data_cfg.max_length - 1] + seq[-1:] if tokenizer.sep_token_id is not None else \
                seq[:data_cfg.max_length]
            sd.truncated += 1
        sd.examples.append({"input_ids": list(seq), "label": index[label]})
        sd.prompts.append(text)
        sd.references.append(label)
    sd.kept = len(sd.examples)
    sd.all_references = [[r] for r in sd.references]
    sd.lengths = [len(e["input_ids"]) for e in sd.examples]
    sd.tokens = sum(sd.lengths)
    return sd


def balance(examples: list[dict], mode: str, n_labels: int, seed: int) -> tuple[list[dict], list[float] | None, str]:
    """data.balance over the training rows: (rows, class weights or None, a one-line report).
    oversample repeats rows of the smaller classes (drawn at random, seeded) up to the largest class's
    count; undersample keeps a random subset of each class of the smallest class's count; class_weights
    keeps the rows and weighs the loss by scikit-learn's "balanced" weights, n / (classes x count)."""
    by = [[e for e in examples if e["label"] == k] for k in range(n_labels)]
    counts = [len(b) for b in by]
    before = "/".join(map(str, counts))
    if mode == "none":
        return examples, None, ""
    if mode == "class_weights":
        import numpy as np
        from sklearn.utils.class_weight import compute_class_weight

        present = [k for k in range(n_labels) if counts[k]]
        w = compute_class_weight("balanced", classes=np.array(present), y=np.array([e["label"] for e in examples]))
        weights = [0.0] * n_labels
        for k, v in zip(present, w):
            weights[k] = float(v)
        return examples, weights, f"class weights {', '.join(f'{v:.3g}' for v in weights)} (rows per class {before})"
    rng = random.Random(seed)
    present = [b for b in by if b]
    if mode == "oversample":
        top = max(len(b) for b in present)
        out = [e for b in present for e in b + [b[rng.randrange(len(b))] for _ in range(top - len(b))]]
    elif mode == "undersample":
        low = min(len(b) for b in present)
        out = [e for b in present for e in rng.sample(b, low)]
    else:
        raise ConfigError(f"data.balance={mode!r}; choose none, oversample, undersample or class_weights")
    rng.shuffle(out)
    after = "/".join(str(sum(1 for e in out if e["label"] == k)) for k in range(n_labels))
    return out, None, f"{mode}: rows per class {before} -> {after}"


def build_data(cfg, tokenizer) -> ClassifyBundle:
    """Train / validation / test splits of (text, label) rows, tokenized; the same split as task=generate."""
    d = cfg.data
    main = _read(d.path, "data.path", cfg)
    tr, va, te = split_indices(len(main), d.val_fraction, d.test_fraction, d.split_seed, bool(d.val_path),
                               bool(d.test_path))
    parts = {"train": [main[i] for i in tr],
             "validation": _read(d.val_path, "data.val_path", cfg) if d.val_path else [main[i] for i in va],
             "test": _read(d.test_path, "data.test_path", cfg) if d.test_path else [main[i] for i in te]}
    labels = list(cfg.classify.labels) or sorted({r[2] for rows in parts.values() for r in rows if r[3] is None})
    if len(labels) < 2:
        raise DataError(f"{d.path}: task=classify needs at least two labels in field '{cfg.classify.label_field}' "
                        f"(found {labels})")
    splits = {name: _split(name, rows, labels, tokenizer, d) for name, rows in parts.items()}
    train = splits["train"]
    if not train.kept:
        raise DataError(f"{d.path}: no training rows left ({describe(train)})")
    original = train.examples
    train.examples, weights, report = balance(original, d.balance, len(labels), d.split_seed)
    fp = hashlib.sha256(json.dumps({
        "rows": [r[1:3] for r in main], "labels": labels, "tokenizer": tokenizer_fingerprint(tokenizer),
        "max_length": d.max_length, "overlong": d.overlong, "balance": d.balance,
        "val": d.val_path, "test": d.test_path}, default=str).encode()).hexdigest()
    return ClassifyBundle(train, splits["validation"], splits["test"], fp, labels=labels, class_weights=weights,
                          balance_report=report, train_unbalanced=original)


# ----------------------------------------------------------------------------- scores
def scores(y_true: list[int], y_pred: list[int], labels: list[str]) -> dict:
    """Accuracy, precision / recall / F1 (macro and per class) and the confusion matrix (rows: the true
    label, columns: the predicted one), by scikit-learn, on a 0..100 scale."""
    from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

    ids = list(range(len(labels)))
    if not y_true:
        return {"rows": 0}
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=ids, zero_division=0)
    pm, rm, fm, _ = precision_recall_fscore_support(y_true, y_pred, labels=ids, average="macro", zero_division=0)
    return {
        "rows": len(y_true), "accuracy": round(100 * accuracy_score(y_true, y_pred), 4),
        "precision_macro": round(100 * pm, 4), "recall_macro": round(100 * rm, 4), "f1_macro": round(100 * fm, 4),
        "per_class": {lab: {"precision": round(100 * p[k], 4), "recall": round(100 * r[k], 4),
                            "f1": round(100 * f[k], 4), "support": int(s[k])} for k, lab in enumerate(labels)},
        "labels": list(labels), "confusion_matrix": confusion_matrix(y_true, y_pred, labels=ids).tolist(),
    }


def flat(sc: dict, prefix: str = "") -> dict:
    """The headline numbers of ``scores`` as flat keys (accuracy, f1_macro, f1_<label>, ...)."""
    out = {f"{prefix}{k}": sc[k] for k in ("accuracy", "precision_macro", "recall_macro", "f1_macro") if k in sc}
    for lab, v in sc.get("per_class", {}).items():
        out.update({f"{prefix}{m}_{lab}": v[m] for m in ("precision", "recall", "f1")})
    return out


# ----------------------------------------------------------------------------- batches and the objective
def collate(examples: list[dict], pad_id: int) -> dict:
    """Right-padded input ids, the attention mask and the class ids."""
    import torch

    n = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), n), dtype=torch.long)
    for i, e in enumerate(examples):
        ids[i, :len(e["input_ids"])] = torch.tensor(e["input_ids"])
        mask[i, :len(e["input_ids"])] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([e["label"] for e in examples])}


def predict(model, examples: list[dict], pad_id: int, batch_size: int = 64, weights=None) -> tuple[list[int], float]:
    """Predicted class ids of ``examples`` and their mean (weighted) cross-entropy."""
    import torch
    import torch.nn.functional as F

    device = next(model.parameters()).device
    w = torch.tensor(weights, device=device) if weights else None
    preds, total, count = [], 0.0, 0.0
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            for i in range(0, len(examples), batch_size):
                batch = {k: v.to(device) for k, v in collate(examples[i:i + batch_size], pad_id).items()}
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
                total += float(F.cross_entropy(logits, batch["labels"], weight=w, reduction="sum"))
                count += float(w[batch["labels"]].sum()) if w is not None else len(batch["labels"])
                preds += logits.argmax(-1).tolist()
    finally:
        if was:
            model.train()
    return preds, total / max(count, 1e-12)


class Objective:
    """Cross-entropy over the classes (weighted with data.balance=class_weights), normalised by the rows
    (or their weights) of the whole step, so that accumulation equals one big batch."""
    name = "classify"

    def __init__(self, pad_id: int, labels: list[str], weights: list[float] | None = None):
        self.pad_id, self.labels, self.weights = pad_id, labels, weights

    def collate(self, examples):
        return collate(examples, self.pad_id)

    def count(self, batches) -> float:
        if self.weights:
            return sum(sum(self.weights[k] for k in b["labels"].tolist()) for b in batches)
        return sum(len(b["labels"]) for b in batches)

    def tokens(self, examples) -> int:
        return sum(len(e["input_ids"]) for e in examples)

    def loss(self, model, batch, n_items, stats=None):
        import torch
        import torch.nn.functional as F

        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        w = torch.tensor(self.weights, device=logits.device) if self.weights else None
        return F.cross_entropy(logits, batch["labels"], weight=w, reduction="sum") / n_items

    def validate(self, model, examples, batch_size, device) -> dict:
        preds, loss = predict(model, examples, self.pad_id, batch_size, self.weights)
        sc = scores([e["label"] for e in examples], preds, self.labels)
        # val_acc, not val_accuracy: that name is the preference accuracy of DPO and reward runs
        return {"val_loss": loss, **{("val_acc" if k == "accuracy" else f"val_{k}"): v
                                     for k, v in flat(sc).items() if k.startswith(("accuracy", "f1"))}}


def final_scores(model, bundle: ClassifyBundle, pad_id: int, batch_size: int = 64) -> dict:
    """Scores on the training rows (before balancing), validation and test, with the manifest's flat keys."""
    out: dict = {"labels": bundle.labels, "balance": bundle.balance_report or "none", "splits": {}}
    for name, examples in (("train", bundle.train_unbalanced), ("validation", bundle.validation.examples),
                           ("test", bundle.test.examples)):
        if examples:
            preds, _ = predict(model, examples, pad_id, batch_size)
            out["splits"][name] = scores([e["label"] for e in examples], preds, bundle.labels)
    return out


def headline(result: dict) -> dict:
    """train / val / test accuracy and test F1 (macro and per class) as flat manifest keys."""
    short = {"train": "train", "validation": "val", "test": "test"}
    out = {}
    for name, sc in result["splits"].items():
        out[f"{short[name]}_accuracy"] = sc["accuracy"]
        out[f"{short[name]}_f1_macro"] = sc["f1_macro"]
        for lab, v in sc["per_class"].items():
            out[f"{short[name]}_f1_{lab}"] = v["f1"]
    return out


# ----------------------------------------------------------------------------- strategies
def _freeze_all(model):
    for p in model.parameters():
        p.requires_grad_(False)


def _heads(model) -> list:
    """The new head, and BERT's pooler (the dense layer between the [CLS] state and the head)."""

    heads = head_modules(model)
    pooler = getattr(getattr(model, "base_model", None), "pooler", None)
    return heads + ([pooler] if pooler is not None else [])


@CLASSIFY.register("features")
def features(model, cfg, **_):
    """Feature-based: the frozen model's pooled token states train a logistic regression (scikit-learn)."""
    _freeze_all(model)
    return model


@CLASSIFY.register("head")
def head(model, cfg, **_):
    """Head only: the new classification head trains (with BERT's pooler); the pretrained model is frozen."""
    _freeze_all(model)
    for m in _heads(model):
        m.requires_grad_(True)
    return model


@CLASSIFY.register("last_block")
def last_block(model, cfg, gradient_checkpointing=False, **_):
    """The last classify.blocks transformer blocks, the final norm and the head train."""
    from types import SimpleNamespace

    model = freeze(model, SimpleNamespace(trainable_layers=cfg.classify.blocks), False, gradient_checkpointing)
    for m in _heads(model):
        m.requires_grad_(True)
    return model


@CLASSIFY.register("lora")
def lora(model, cfg, gradient_checkpointing=False, steps=None, model_path=None, **_):
    """LoRA on the peft.target_modules (peft's TaskType.SEQ_CLS); the head (and pooler) trained whole."""

    pcfg = OmegaConf.create(OmegaConf.to_container(cfg.peft, resolve=True))
    extra = ["pooler"] if getattr(getattr(model, "base_model", None), "pooler", None) is not None else []
    pcfg.modules_to_save = list(pcfg.modules_to_save or []) + extra or None
    return lora_method(model, pcfg, quantized=False, gradient_checkpointing=gradient_checkpointing,
                       task_type="SEQ_CLS")


@CLASSIFY.register("full")
def full(model, cfg, gradient_checkpointing=False, **_):
    """Full fine-tuning: every weight, and the head."""

    return full_method(model, cfg.peft, False, gradient_checkpointing)


def describe_strategy(name: str) -> str:
    return (CLASSIFY.get(name).__doc__ or "").strip().splitlines()[0]


# ----------------------------------------------------------------------------- feature-based
def pooling(cfg) -> str:
    p = cfg.classify.get("pooling", "auto")
    return ({"encoder": "mean"}.get(cfg.model.get("kind", "causal"), "last")) if p == "auto" else p


def embed(model, examples: list[dict], pad_id: int, how: str, batch_size: int = 64):
    """Pooled last hidden states of the model under the head (numpy, [rows, hidden])."""
    import numpy as np
    import torch

    body = model.base_model
    device = next(model.parameters()).device
    out = []
    model.eval()
    with torch.no_grad():
        for i in range(0, len(examples), batch_size):
            b = {k: v.to(device) for k, v in collate(examples[i:i + batch_size], pad_id).items()}
            hidden = body(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state.float()
            mask = b["attention_mask"].unsqueeze(-1).float()
            if how == "mean":
                v = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
            elif how == "cls":
                v = hidden[:, 0]
            else:  # the last non-padding token (right padding)
                v = hidden[torch.arange(hidden.shape[0]), b["attention_mask"].sum(1) - 1]
            out.append(v.cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, body.config.hidden_size), dtype=np.float32)


def fit_features(model, bundle: ClassifyBundle, cfg, pad_id: int, console) -> tuple[dict, dict]:
    """Fit the logistic regression on the pooled states of the training rows; (its weights, scores)."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    how = pooling(cfg)
    with console.status(f"features: embedding {len(bundle.train.examples)} training rows ({how} pooling)"):
        x = embed(model, bundle.train.examples, pad_id, how)
    y = np.array([e["label"] for e in bundle.train.examples])
    weights = {k: w for k, w in enumerate(bundle.class_weights)} if bundle.class_weights else None
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=cfg.classify.C, max_iter=2000, class_weight=weights,
                                                             random_state=cfg.seed))
    clf.fit(x, y)
    scaler, lr = clf.steps[0][1], clf.steps[1][1]
    state = {"mean": scaler.mean_, "scale": scaler.scale_, "coef": lr.coef_, "intercept": lr.intercept_,
             "classes": lr.classes_}
    result = {"labels": bundle.labels, "balance": bundle.balance_report or "none", "splits": {}}
    for name, examples in (("train", bundle.train_unbalanced), ("validation", bundle.validation.examples),
                           ("test", bundle.test.examples)):
        if examples:
            feats = x if examples is bundle.train.examples else embed(model, examples, pad_id, how)
            result["splits"][name] = scores([e["label"] for e in examples], clf.predict(feats).tolist(), bundle.labels)
    return state, result


def save_features(state: dict, folder: Path, how: str, labels: list[str]) -> None:
    """The logistic regression as safetensors (no pickle) and a JSON that says how to read it."""
    import numpy as np
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: np.ascontiguousarray(v, dtype=np.float64) for k, v in state.items()}, str(folder / FEATURES_FILE))
    (folder / "classifier.json").write_text(json.dumps({"kind": "logistic_regression", "pooling": how,
                                                        "labels": labels}, indent=2))


def features_predict(folder: Path, x) -> list[int]:
    """Class ids from saved logistic-regression weights: standardise, then the largest decision value (the
    sign of the single one for two classes), as scikit-learn's predict does."""
    import numpy as np
    from safetensors.numpy import load_file

    s = load_file(str(folder / FEATURES_FILE))
    z = (np.asarray(x, dtype=np.float64) - s["mean"]) / s["scale"]
    dec = z @ s["coef"].T + s["intercept"]
    classes = s["classes"].astype(int)
    picked = (dec[:, 0] > 0).astype(int) if dec.shape[1] == 1 else dec.argmax(1)
    return classes[picked].tolist()


# ----------------------------------------------------------------------------- ftctl eval
def run_eval(ecfg, cfg, manifest: dict, run, console) -> dict:
    """ftctl eval for a classifier (``run``: the opened run, ``ftctl.rundir.Run``, or None for model=DIR):
    predict the split's labels, score, print, write eval/<name>.json."""
    bad = [m for m in ecfg.metrics if m not in METRIC_NAMES]
    if bad:
        raise ConfigError(f"eval metric {bad[0]!r} does not apply to a classifier (task=classify); choose from: "
                          f"{', '.join(METRIC_NAMES)}")
    if ecfg.compare or ecfg.shots:
        raise ConfigError("compare= and shots= do not apply to a classifier (the base model has no trained head)")
    model_path = Path(manifest["model_path"])
    tokenizer = models.load_tokenizer(model_path)
    labels = manifest.get("classify", {}).get("labels") or list(cfg.classify.labels)
    if labels:
        cfg = OmegaConf.merge(cfg, {"classify": {"labels": labels}})
    bundle = build_data(cfg, tokenizer)
    split = {"train": bundle.train_unbalanced, "validation": bundle.validation.examples,
             "test": bundle.test.examples}.get(ecfg.split)
    prompts = bundle.split(ecfg.split).prompts  # the texts of the kept rows, before any balancing
    n = min(len(split), ecfg.limit or len(split))
    if n == 0:
        raise ConfigError(f"no {ecfg.split} rows to evaluate")
    examples = split[:n]
    t0 = time.time()
    with console.status(f"classifying {n} {ecfg.split} rows"):
        preds = _eval_predictions(ecfg, cfg, run, bundle, examples, tokenizer.pad_token_id)
    sc = scores([e["label"] for e in examples], preds, bundle.labels)
    want = {"accuracy": ("accuracy",), "precision": ("precision",), "recall": ("recall",), "f1": ("f1",)}
    shown = {k: v for k, v in flat(sc).items() if k.startswith(tuple(p for m in ecfg.metrics for p in want[m]))}
    label = "tuned" if run is not None else "model"
    _print_eval(console, f"{run.path if run is not None else model_path} — {n} {ecfg.split} rows", label, shown, sc,
                bundle.labels)
    name = ecfg.name or "_".join(ecfg.metrics)
    where = (run.path / "eval") if run is not None else Path(ecfg.output or model_path / "eval")
    where.mkdir(parents=True, exist_ok=True)
    report = {"run": str(run.path) if run is not None else None, "model": str(model_path), "rows": n,
              "metrics": list(ecfg.metrics), "results": {label: {**shown, "seconds": round(time.time() - t0, 1)}},
              "scores": sc, "settings": {"split": ecfg.split, "limit": ecfg.limit, "batch_size": ecfg.batch_size},
              "data": {"path": cfg.data.path, "task": "classify"}}
    lines = [json.dumps({"prompt": t, "reference": bundle.labels[e["label"]], f"prediction_{label}": bundle.labels[p],
                         f"scores_{label}": {"accuracy": 100.0 * (p == e["label"])}}, ensure_ascii=False)
             for t, e, p in zip(prompts[:n], examples, preds)]
    atomic_write_text(where / f"{name}.predictions.jsonl", "\n".join(lines) + "\n")
    atomic_write_json(where / f"{name}.json", report)
    console.print(f"wrote {where / (name + '.json')} and {name}.predictions.jsonl", highlight=False)
    return report


def _eval_predictions(ecfg, cfg, run, bundle, examples: list[dict], pad_id: int) -> list[int]:
    """The classifier's predicted class ids: the run's model (or model=DIR with a new head), or the features
    strategy's logistic regression on the base's pooled states."""
    device = pick_device()
    model = run.load_model(device) if run is not None else \
        load_folder(Path(ecfg.model), device, cfg.model, cfg.quant, head="classify", pad_id=pad_id,
                    labels=bundle.labels)
    if run is not None and run.classifier is not None:
        how = json.loads((run.classifier / "classifier.json").read_text())["pooling"]
        return features_predict(run.classifier, embed(model, examples, pad_id, how, ecfg.batch_size))
    return predict(model, examples, pad_id, ecfg.batch_size)[0]


def _print_eval(console, title: str, label: str, shown: dict, sc: dict, labels: list[str]) -> None:
    from rich.table import Table

    table = Table(title=title)
    table.add_column("metric")
    table.add_column(label, justify="right")
    for k, v in shown.items():
        table.add_row(k, f"{v:.2f}")
    console.print(table)
    cm = Table(title="confusion matrix (rows: true label, columns: predicted)")
    cm.add_column("")
    for lab in labels:
        cm.add_column(lab, justify="right")
    for lab, row in zip(labels, sc["confusion_matrix"]):
        cm.add_row(lab, *map(str, row))
    console.print(cm)


# ----------------------------------------------------------------------------- the run
def summary_line(result: dict) -> str:
    parts = []
    for name, sc in result["splits"].items():
        per = ", ".join(f"F1 {lab} {v['f1']:.1f}" for lab, v in sc["per_class"].items())
        parts.append(f"{name} accuracy {sc['accuracy']:.2f}% ({per})")
    return "; ".join(parts)


# ----------------------------------------------------------------------------- the task
class ClassifyTask(Task):
    name = "classify"

    def build_data(self, cfg, tokenizer):
        return build_data(cfg, tokenizer)

    def announce_data(self, cfg, bundle, console) -> None:
        if bundle.balance_report:
            console.print(f"data.balance={cfg.data.balance}: {bundle.balance_report}", highlight=False)
            log.info("data.balance=%s: %s", cfg.data.balance, bundle.balance_report)

    def head(self, cfg) -> str:
        return "classify"

    def labels(self, bundle) -> list[str]:
        return bundle.labels

    def method(self, cfg) -> str:
        return f"classify.strategy={cfg.classify.strategy}"

    def adapt(self, model, cfg, *, quantized: bool, steps: int, model_path):
        return CLASSIFY.get(cfg.classify.strategy)(model, cfg, gradient_checkpointing=cfg.trainer.gradient_checkpointing,
                                                   steps=steps, model_path=model_path)

    def fits_without_steps(self, cfg) -> bool:
        return cfg.classify.strategy == "features"

    def fit_without_steps(self, cfg, model, bundle, tokenizer, out: Path, console) -> tuple[Path, dict]:
        """classify.strategy=features: the logistic regression, fitted on the frozen model's pooled states and
        saved in <run>/classifier/."""

        state, result = fit_features(model, bundle, cfg, tokenizer.pad_token_id, console)
        n_lr = int(state["coef"].size + state["intercept"].size)
        total = parameter_report(model)["total_params"] + n_lr
        final = replace_folder(out / "classifier", lambda tmp: save_features(state, tmp, pooling(cfg), bundle.labels))
        updates = {"trainable_params": n_lr, "total_params": total, "trainable_percent": round(100 * n_lr / total, 4),
                   "trainable_modules": [{"pattern": "logistic_regression", "tensors": 2, "params": n_lr}],
                   "classify": result, **headline(result)}
        console.print(f"{len(bundle.train.examples)} train rows, {bundle.validation.kept} validation rows; logistic "
                      f"regression on {pooling(cfg)}-pooled states: {n_lr:,} trained of {total:,} parameters "
                      f"({updates['trainable_percent']:.4g}%)", highlight=False)
        console.print(summary_line(result), highlight=False)
        return final, updates

    def objective(self, ctx):
        return Objective(ctx.pad_id, ctx.bundle.labels, ctx.bundle.class_weights)

    def manifest(self, cfg) -> dict:
        steps = {} if not self.fits_without_steps(cfg) else {"total_steps": 0, "optimizer": None, "adapter": False}
        return {"peft_method": cfg.peft.method if cfg.classify.strategy == "lora" else None,
                "task": "classify", "strategy": cfg.classify.strategy, **steps}

    def finish(self, model, bundle, pad_id: int, manifest: dict, console) -> None:
        with console.status("scoring the classifier on the train, validation and test rows"):
            result = final_scores(model, bundle, pad_id)
        manifest.update(classify=result, **headline(result))
        console.print(summary_line(result), highlight=False)
