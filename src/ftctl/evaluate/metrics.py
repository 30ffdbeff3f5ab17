"""Metrics over (prediction, references) pairs. Each returns (corpus score, per-row scores), 0..100."""
from __future__ import annotations

from ..registry import METRICS


def _refs(r) -> list[str]:
    return [r] if isinstance(r, str) else list(r)


@METRICS.register("exact_match")
def exact_match(preds: list[str], refs: list) -> tuple[float, list[float]]:
    """100 when the prediction, stripped of surrounding whitespace, equals a reference exactly."""
    rows = [100.0 * any(p.strip() == r.strip() for r in _refs(ref)) for p, ref in zip(preds, refs)]
    return sum(rows) / max(len(rows), 1), rows


@METRICS.register("rougeL")
def rouge_l(preds: list[str], refs: list) -> tuple[float, list[float]]:
    """ROUGE-L F1 (rouge-score, with stemming); several references score as the best match."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    rows = [100.0 * max(scorer.score(r, p)["rougeL"].fmeasure for r in _refs(ref)) for p, ref in zip(preds, refs)]
    return sum(rows) / max(len(rows), 1), rows
