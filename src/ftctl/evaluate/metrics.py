"""Metrics over (prediction, references) pairs, computed by the maintained packages (rouge-score,
sacrebleu, scikit-learn). Each metric returns {score name: (corpus score, per-row scores)}, on a
0..100 scale; ``refs[i]`` is a string or a list of strings (several references per row)."""
from __future__ import annotations

import re

from ftctl.core.registry import METRICS

Scores = dict[str, tuple[float, list[float]]]


def _refs(r) -> list[str]:
    return [r] if isinstance(r, str) else list(r)


def _mean(rows: list[float]) -> float:
    return sum(rows) / max(len(rows), 1)


@METRICS.register("exact_match")
def exact_match(preds: list[str], refs: list, **_) -> Scores:
    """100 when the prediction, stripped of surrounding whitespace, equals a reference exactly."""
    rows = [100.0 * any(p.strip() == r.strip() for r in _refs(ref)) for p, ref in zip(preds, refs)]
    return {"exact_match": (_mean(rows), rows)}


def _rouge(preds, refs, types) -> Scores:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(types, use_stemmer=True)
    per = {t: [] for t in types}
    for p, ref in zip(preds, refs):
        # several references: each score is its best match over them (rouge-score's score_multi)
        s = scorer.score_multi(_refs(ref), p)
        for t in types:
            per[t].append(100.0 * s[t].fmeasure)
    return {t: (_mean(rows), rows) for t, rows in per.items()}


@METRICS.register("rouge")
def rouge(preds: list[str], refs: list, **_) -> Scores:
    """ROUGE-1, ROUGE-2, ROUGE-L and ROUGE-Lsum F1 (rouge-score, Porter stemming); with several
    references, the best match per row."""
    return _rouge(preds, refs, ["rouge1", "rouge2", "rougeL", "rougeLsum"])


@METRICS.register("rougeL")
def rouge_l(preds: list[str], refs: list, **_) -> Scores:
    """ROUGE-L F1 alone."""
    return _rouge(preds, refs, ["rougeL"])


@METRICS.register("bleu")
def bleu(preds: list[str], refs: list, **_) -> Scores:
    """Corpus BLEU (sacrebleu, default 13a tokenization); per row, sentence BLEU. Rows with fewer
    references than others repeat their first one (sacrebleu needs equal-length reference streams)."""
    import sacrebleu

    rr = [_refs(r) for r in refs]
    k = max((len(r) for r in rr), default=1)
    streams = [[r[j] if j < len(r) else r[0] for r in rr] for j in range(k)]
    corpus = sacrebleu.corpus_bleu(preds, streams).score if preds else 0.0
    rows = [sacrebleu.sentence_bleu(p, r).score for p, r in zip(preds, rr)]
    return {"bleu": (corpus, rows)}


def parse_label(text: str, labels: list[str]) -> str | None:
    """The label a generation names: the first of ``labels`` found as a whole word, earliest in the text
    (case-insensitive); None when it names none."""
    best, where = None, None
    for lab in labels:
        m = re.search(rf"(?<!\w){re.escape(lab)}(?!\w)", text, flags=re.I)
        if m and (where is None or m.start() < where or (m.start() == where and len(lab) > len(best))):
            best, where = lab, m.start()
    return best


def _labels(refs, labels) -> list[str]:
    if labels:
        return list(labels)
    return sorted({_refs(r)[0].strip() for r in refs})


@METRICS.register("accuracy")
def accuracy(preds: list[str], refs: list, labels=None, **_) -> Scores:
    """Share of rows whose generation names the reference label (labels parsed from the text; the label
    set is ``labels=`` or the distinct references)."""
    labs = _labels(refs, labels)
    rows = [100.0 * (parse_label(p, labs) == _refs(r)[0].strip()) for p, r in zip(preds, refs)]
    return {"accuracy": (_mean(rows), rows)}


@METRICS.register("f1")
def f1(preds: list[str], refs: list, labels=None, **_) -> Scores:
    """Macro F1 over the labels and F1 per label (scikit-learn), labels parsed from the generations; a
    generation that names no label counts as wrong for every class."""
    from sklearn.metrics import f1_score

    labs = _labels(refs, labels)
    y_true = [_refs(r)[0].strip() for r in refs]
    y_pred = [parse_label(p, labs) or "<none>" for p in preds]
    correct = [100.0 * (a == b) for a, b in zip(y_true, y_pred)]  # per row: whether the label is right
    out: Scores = {"f1_macro": (100.0 * f1_score(y_true, y_pred, labels=labs, average="macro", zero_division=0),
                                correct)}
    per = f1_score(y_true, y_pred, labels=labs, average=None, zero_division=0)
    for lab, v in zip(labs, per):
        out[f"f1_{lab}"] = (100.0 * float(v), correct)
    return out


def _precision_recall(preds, refs, labels, which: str) -> Scores:
    from sklearn.metrics import precision_recall_fscore_support

    labs = _labels(refs, labels)
    y_true = [_refs(r)[0].strip() for r in refs]
    y_pred = [parse_label(p, labs) or "<none>" for p in preds]
    correct = [100.0 * (a == b) for a, b in zip(y_true, y_pred)]
    k = {"precision": 0, "recall": 1}[which]
    macro = precision_recall_fscore_support(y_true, y_pred, labels=labs, average="macro", zero_division=0)[k]
    per = precision_recall_fscore_support(y_true, y_pred, labels=labs, average=None, zero_division=0)[k]
    out: Scores = {f"{which}_macro": (100.0 * float(macro), correct)}
    for lab, v in zip(labs, per):
        out[f"{which}_{lab}"] = (100.0 * float(v), correct)
    return out


@METRICS.register("precision")
def precision(preds: list[str], refs: list, labels=None, **_) -> Scores:
    """Macro precision and precision per label (scikit-learn), labels parsed from the generations."""
    return _precision_recall(preds, refs, labels, "precision")


@METRICS.register("recall")
def recall(preds: list[str], refs: list, labels=None, **_) -> Scores:
    """Macro recall and recall per label (scikit-learn), labels parsed from the generations."""
    return _precision_recall(preds, refs, labels, "recall")
