"""`ftctl eval` on a tiny run: files, table, base comparison; metrics against rouge-score."""
import json

import pytest
from conftest import compose, run_cli

from ftctl.evaluate.metrics import accuracy, bleu, exact_match, f1, parse_label, rouge, rouge_l
from ftctl.train.loop import train


def test_exact_match_and_rouge_l():
    assert exact_match([" 2021-03-05\n", "2021-03-06", "x"], ["2021-03-05", "2021-03-05", ["y", "x"]]) == {
        "exact_match": (pytest.approx(200 / 3), [100.0, 0.0, 100.0])}
    from rouge_score import rouge_scorer

    ref = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    preds, refs = ["the cat sat on the mat", "dogs run"], [["a cat sat on a mat", "the cat is on the mat"], "dog runs"]
    score, rows = rouge_l(preds, refs)["rougeL"]
    expect0 = max(ref.score(r, preds[0])["rougeL"].fmeasure for r in refs[0]) * 100
    assert rows[0] == pytest.approx(expect0) and rows[1] == pytest.approx(100.0)  # stemming: dogs run == dog runs


def test_rouge_reproduces_the_worked_example_and_the_library():
    s = rouge(["It is very cold outside."], ["It is cold outside."])
    assert round(s["rouge1"][0] / 100, 2) == 0.89 and round(s["rouge2"][0] / 100, 2) == 0.57
    from rouge_score import rouge_scorer

    preds = ["Amanda baked cookies and will bring Jerry some.", "They meet at noon."]
    refs = [["Amanda baked cookies.", "Amanda will bring cookies to Jerry tomorrow."], "They will meet at 12."]
    got = rouge(preds, refs)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=True)
    for t in ("rouge1", "rouge2", "rougeL", "rougeLsum"):
        want = [100 * max(scorer.score(r, p)[t].fmeasure for r in ([r] if isinstance(r, str) else r))
                for p, r in zip(preds, refs)]
        assert got[t][1] == pytest.approx(want) and got[t][0] == pytest.approx(sum(want) / 2)


def test_bleu_equals_sacrebleu():
    import sacrebleu

    preds = ["the cat is on the mat", "there is a dog in the garden"]
    refs = [["the cat is on the mat", "a cat sits on the mat"], "a dog is in the garden"]
    got = bleu(preds, refs)["bleu"]
    want = sacrebleu.corpus_bleu(preds, [["the cat is on the mat", "a dog is in the garden"],
                                         ["a cat sits on the mat", "a dog is in the garden"]]).score
    assert got[0] == pytest.approx(want)
    assert got[1][1] == pytest.approx(sacrebleu.sentence_bleu(preds[1], ["a dog is in the garden"]).score)


def test_labels_parsed_from_generations_accuracy_and_f1():
    assert parse_label("Spam.", ["ham", "spam"]) == "spam"
    assert parse_label("this is ham, not spam", ["ham", "spam"]) == "ham"  # the earliest named label
    assert parse_label("hamster", ["ham", "spam"]) is None  # whole words only
    preds, refs = ["spam", "ham", "I think spam", "no idea", "ham"], ["spam", "ham", "ham", "spam", "ham"]
    assert accuracy(preds, refs)["accuracy"][0] == pytest.approx(60.0)
    from sklearn.metrics import f1_score

    y_pred = ["spam", "ham", "spam", "<none>", "ham"]
    got = f1(preds, refs)
    assert got["f1_macro"][0] == pytest.approx(100 * f1_score(refs, y_pred, labels=["ham", "spam"], average="macro"))
    assert got["f1_spam"][0] == pytest.approx(100 * 0.5)  # spam: 1 of 2 found, 1 of 2 predicted right


def test_perplexity_is_exp_of_the_model_loss(tokenizer, tiny_model_path):
    import math

    import torch
    from transformers import AutoModelForCausalLM

    from ftctl.data.tokenize import collate, encode_pair
    from ftctl.evaluate.run import perplexity

    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)
    ex = [dict(zip(("input_ids", "labels"), encode_pair(tokenizer, "Q: one plus one?\nA:", " two"))),
          dict(zip(("input_ids", "labels"), encode_pair(tokenizer, "Say hi:", " hello there")))]
    total, rows = perplexity(model, ex, tokenizer.pad_token_id, batch_size=2)
    for e, r in zip(ex, rows):
        b = collate([e], tokenizer.pad_token_id)
        with torch.no_grad():
            assert r == pytest.approx(math.exp(float(model(**b).loss)), rel=1e-4)
    n = [sum(1 for x in e["labels"][1:] if x != -100) for e in ex]
    assert total == pytest.approx(math.exp((n[0] * math.log(rows[0]) + n[1] * math.log(rows[1])) / sum(n)), rel=1e-4)


def test_stop_strings_cut_generations():
    from ftctl.evaluate.generate import cut_at_stop

    assert cut_at_stop("2021-03-05\n### Instruction", ["\n###", "\n\n"]) == "2021-03-05"
    assert cut_at_stop("no stop here", ["###"]) == "no stop here"


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
    # the base model with two random, then two similar training examples in front of each prompt
    r = run_cli("eval", "rouge", "perplexity", f"run={run}", "shots=2", "limit=2", "max_new_tokens=4", "name=icl")
    assert r.returncode == 0, r.stderr[-2000:]
    rep = json.loads((run / "eval" / "icl.json").read_text())
    assert set(rep["results"]) == {"base 2-shot"} and {"rouge1", "rougeLsum", "perplexity"} <= set(rep["results"]["base 2-shot"])
    rows = [json.loads(ln) for ln in (run / "eval" / "icl.predictions.jsonl").read_text().splitlines()]
    assert rows[0]["prompt"].count("### Response:") == 1  # the bare prompt is recorded; shots are in the settings
    r = run_cli("eval", "exact_match", f"run={run}", "shots=2", "shot_selection=similar", "limit=2",
                "max_new_tokens=2", "name=icl_similar")
    assert r.returncode == 0, r.stderr[-2000:]


def test_shot_selection_similar_picks_the_nearest_examples():
    from ftctl.evaluate.embed import nearest

    pool = ["How do I bake bread?", "What is the capital of France?", "Stock prices fell today.", "Rye bread recipe"]
    picks = nearest(pool, ["a recipe for sourdough bread", "Which city is France's capital?"], 2)
    assert picks[0][0] in (0, 3) and set(picks[0]) == {0, 3}  # both bread texts, before the others
    assert picks[1][0] == 1


def test_after_train_eval_is_stored_in_the_run(tmp_path):
    cfg, choices = compose("model=tiny_llama", "data.limit=40", "trainer.max_steps=1", "trainer.eval_every=0",
                           "eval.after_train=[exact_match,perplexity]", "eval.limit=2", "eval.max_new_tokens=2",
                           f"output_dir={tmp_path / 'run'}")
    run = train(cfg, choices)
    man = json.loads((run / "manifest.json").read_text())
    assert man["status"] == "finished" and set(man["eval"]) >= {"exact_match", "perplexity"}
    rep = json.loads((run / "eval" / "after_train.json").read_text())
    assert rep["rows"] == 2 and rep["results"]["tuned"]["perplexity"] == man["eval"]["perplexity"]
    with pytest.raises(Exception, match="eval.after_train: metric 'bleuu' is not known"):
        compose("model=tiny_llama", "eval.after_train=[bleuu]")

