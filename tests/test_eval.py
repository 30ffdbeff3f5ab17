"""`ftctl eval` on a tiny run: files, table, base comparison; metrics against rouge-score."""
import json

import pytest
from conftest import compose, run_cli

from ftctl.evaluate.metrics import exact_match, rouge_l
from ftctl.train.runner import train


def test_exact_match_and_rouge_l():
    score, rows = exact_match([" 2021-03-05\n", "2021-03-06", "x"], ["2021-03-05", "2021-03-05", ["y", "x"]])
    assert rows == [100.0, 0.0, 100.0] and score == pytest.approx(200 / 3)
    from rouge_score import rouge_scorer

    ref = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    preds, refs = ["the cat sat on the mat", "dogs run"], [["a cat sat on a mat", "the cat is on the mat"], "dog runs"]
    score, rows = rouge_l(preds, refs)
    expect0 = max(ref.score(r, preds[0])["rougeL"].fmeasure for r in refs[0]) * 100
    assert rows[0] == pytest.approx(expect0) and rows[1] == pytest.approx(100.0)  # stemming: dogs run == dog runs


def test_eval_run_writes_scores_and_predictions(tmp_path):
    cfg, choices = compose("model=tiny_llama", "data.limit=40", "trainer.max_steps=2", "trainer.eval_every=0",
                           f"output_dir={tmp_path / 'run'}")
    run = train(cfg, choices)
    r = run_cli("eval", "exact_match", "rougeL", f"run={run}", "compare=base", "limit=3", "max_new_tokens=4")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "exact_match" in r.stdout and "Δ tuned − base" in r.stdout
    rep = json.loads((run / "eval" / "exact_match_rougeL.json").read_text())
    assert rep["rows"] == 3 and set(rep["results"]) == {"tuned", "base"}
    assert set(rep["results"]["base"]) >= {"exact_match", "rougeL"}
    preds = [json.loads(ln) for ln in (run / "eval" / "exact_match_rougeL.predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 3 and all({"prompt", "reference", "prediction_tuned", "prediction_base"} <= p.keys()
                                   for p in preds)
    r = run_cli("eval", "bleuu", f"run={run}")
    assert r.returncode == 2 and "bleuu" in r.stderr and "exact_match" in r.stderr
