"""task=classify: data and its split, data.balance, the strategies on a tiny random BERT (and a decoder
with a head on its last token), the classification metrics against scikit-learn, `ftctl eval` and
`ftctl merge` of a classifier; one slow test on the real MiniLM with the shared SMS spam collection."""
import csv
import json
import random

import pytest
import torch
from conftest import SHARED_DATA, compose, run_cli

from ftctl.tasks.classify import Objective, balance, build_data, collate, features_predict, save_features, scores
from ftctl.core.errors import ConfigError
from ftctl.train.loop import train

SMS = SHARED_DATA / "sms_spam" / "sms_spam.csv"
HAM = ["see you at lunch", "ok i am on my way", "can you call mum later", "the meeting moved to noon",
       "thanks for dinner", "where are my keys", "good night sleep well", "running late sorry"]
SPAM = ["WIN a free prize now", "claim your cash reward txt WIN", "free entry WIN a holiday prize",
        "urgent you WIN cash call now"]


def _csv(path, n=120, spam_share=0.2, seed=0):
    rng = random.Random(seed)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["label", "text"])
        for i in range(n):
            spam = rng.random() < spam_share
            w.writerow(["spam" if spam else "ham", f"{rng.choice(SPAM if spam else HAM)} {i}"])
    return path


def _cfg(tmp_path, *extra, model="tiny_bert"):
    return compose("recipe=sms_spam_classify", f"model={model}", f"data.path={_csv(tmp_path / 'sms.csv')}",
                   "data.max_length=32", "trainer.log_every=1", "trainer.eval_every=5", f"output_dir={tmp_path / 'run'}",
                   *extra)


def _manifest(out):
    return json.loads((out / "manifest.json").read_text())


def test_split_is_the_generate_split_70_10_20(tmp_path, tokenizer):
    from ftctl.models import load as models
    from ftctl.data.pipeline import split_indices

    cfg, _ = _cfg(tmp_path)
    tok = models.load_tokenizer(models.resolve("builtin:tiny_bert"))
    b = build_data(cfg, tok)
    assert (b.train.kept, b.validation.kept, b.test.kept) == (84, 12, 24) and b.labels == ["ham", "spam"]
    rows = list(csv.DictReader(open(tmp_path / "sms.csv")))
    _, va, te = split_indices(len(rows), 0.1, 0.2, cfg.data.split_seed, False, False)
    assert b.validation.prompts == [rows[i]["text"] for i in va] and b.test.prompts == [rows[i]["text"] for i in te]
    assert b.test.references == [rows[i]["label"] for i in te]
    # the same rows as the generative recipe on that file (flan_classify prompts hold the text)
    gen, _ = compose("recipe=sms_spam", "model=tiny_llama", f"data.path={tmp_path / 'sms.csv'}")
    from ftctl.data.pipeline import build

    g = build(gen, tokenizer)
    assert g.test.references == b.test.references
    assert all(t in p for t, p in zip(b.test.prompts, g.test.prompts))
    ex = b.train.examples[0]
    assert tok.decode(ex["input_ids"], skip_special_tokens=True) == b.train.prompts[0].lower()


@pytest.mark.skipif(not SMS.is_file(), reason=f"{SMS} is absent (the shared datasets live in ../shared/data)")
def test_sms_spam_split_counts(tmp_path):
    from ftctl.models import load as models

    cfg, _ = compose("recipe=sms_spam_classify", f"data.path={SMS}")
    b = build_data(cfg, models.load_tokenizer(models.resolve("builtin:minilm_l6")))
    assert (b.train.kept, b.validation.kept, b.test.kept) == (3201, 457, 915)  # 70/10/20 of 4,573
    assert b.train.truncated > 0 and all(len(e["input_ids"]) <= 64 for e in b.train.examples)
    assert 0.1 < sum(e["label"] for e in b.train.examples) / b.train.kept < 0.16  # about 13% spam


def test_balance_modes():
    import numpy as np
    from sklearn.utils.class_weight import compute_class_weight

    rows = [{"input_ids": [i], "label": 0} for i in range(8)] + [{"input_ids": [i], "label": 1} for i in (8, 9)]
    over, w, report = balance(rows, "oversample", 2, 0)
    assert w is None and [sum(e["label"] == k for e in over) for k in (0, 1)] == [8, 8]
    assert {e["input_ids"][0] for e in over} == set(range(10)) and "8/2 -> 8/8" in report
    under, _, _ = balance(rows, "undersample", 2, 0)
    assert [sum(e["label"] == k for e in under) for k in (0, 1)] == [2, 2]
    same, w, _ = balance(rows, "class_weights", 2, 0)
    assert same == rows and w == pytest.approx([10 / (2 * 8), 10 / (2 * 2)])
    assert w == pytest.approx(list(compute_class_weight("balanced", classes=np.array([0, 1]), y=np.array([e["label"] for e in rows]))))
    assert balance(rows, "none", 2, 0) == (rows, None, "")


def test_weighted_loss_is_torch_weighted_mean_over_the_step():
    torch.manual_seed(0)
    head = torch.nn.Linear(4, 3)

    class M(torch.nn.Module):
        def forward(self, input_ids, attention_mask):
            return type("O", (), {"logits": head(torch.nn.functional.one_hot(input_ids[:, 0], 4).float())})

    ex = [{"input_ids": [i % 4, 1], "label": i % 3} for i in range(7)]
    w = [0.5, 2.0, 1.0]
    obj = Objective(0, ["a", "b", "c"], w)
    batches = [obj.collate(ex[:3]), obj.collate(ex[3:])]
    n = obj.count(batches)
    total = sum(obj.loss(M(), b, n) for b in batches)  # two micro-batches, as gradient accumulation does
    whole = obj.collate(ex)
    ref = torch.nn.functional.cross_entropy(M()(whole["input_ids"], None).logits, whole["labels"],
                                            weight=torch.tensor(w))
    assert float(total) == pytest.approx(float(ref), rel=1e-6)


@pytest.mark.parametrize("classes", [2, 3])
def test_saved_logistic_regression_predicts_as_sklearn(tmp_path, classes):
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(0)
    x = rng.normal(size=(90, 6)) * rng.uniform(0.5, 5, size=6) + 3
    y = (x[:, 0] + x[:, 1] > 6).astype(int) + (classes == 3) * (x[:, 2] > 3)
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=500)).fit(x, y)
    s, lr = clf.steps[0][1], clf.steps[1][1]
    save_features({"mean": s.mean_, "scale": s.scale_, "coef": lr.coef_, "intercept": lr.intercept_,
                   "classes": lr.classes_}, tmp_path, "mean", [str(k) for k in range(classes)])
    test = rng.normal(size=(50, 6)) * 3 + 3
    assert features_predict(tmp_path, test) == clf.predict(test).tolist()


def test_scores_per_class_and_confusion():
    sc = scores([0, 0, 0, 1, 1], [0, 1, 0, 1, 0], ["ham", "spam"])
    assert sc["accuracy"] == 60.0 and sc["confusion_matrix"] == [[2, 1], [1, 1]]
    assert sc["per_class"]["spam"] == {"precision": 50.0, "recall": 50.0, "f1": 50.0, "support": 2}
    assert sc["f1_macro"] == pytest.approx((50 + 100 * 2 * (2 / 3) * (2 / 3) / (4 / 3)) / 2, abs=1e-3)


def _expected_trainable(strategy: str) -> int:
    """Parameters each strategy trains, counted on a fresh tiny BERT classifier (2 blocks, width 32)."""
    from transformers import AutoModelForSequenceClassification

    from ftctl.models import load as models

    m = AutoModelForSequenceClassification.from_pretrained(models.resolve("builtin:tiny_bert"), num_labels=2)

    def n(mod):
        return sum(p.numel() for p in mod.parameters())

    head = n(m.classifier) + n(m.bert.pooler)
    return {"head": head, "last_block": head + n(m.bert.encoder.layer[1]),
            "lora": head + 2 * 2 * (8 * 32 + 32 * 8),  # r=8 on query and value of 2 blocks, head trained whole
            "full": n(m)}[strategy]


@pytest.mark.parametrize("strategy", ["features", "head", "last_block", "lora", "full"])
def test_strategies_train_what_they_say(tmp_path, strategy):
    cfg, choices = _cfg(tmp_path, f"classify.strategy={strategy}", "trainer.epochs=2", "trainer.lr=5e-3",
                        "data.balance=class_weights")
    out = train(cfg, choices)
    m = _manifest(out)
    assert m["status"] == "finished" and m["strategy"] == strategy and m["task"] == "classify"
    for key in ("train_accuracy", "val_accuracy", "test_accuracy", "test_f1_spam", "test_f1_macro", "train_time_s",
                "trainable_percent"):
        assert isinstance(m[key], (int, float)), key
    cm = m["classify"]["splits"]["test"]["confusion_matrix"]
    assert sum(map(sum, cm)) == 24 and m["classify"]["balance"].startswith("class weights")
    if strategy == "features":
        assert (out / "classifier" / "logreg.safetensors").is_file() and m["trainable_params"] == 33  # 32 + bias
        # the keyword separates the classes; a logistic regression on mean-pooled states finds it
        assert m["train_accuracy"] > 95 and m["test_f1_spam"] > 60
        return
    assert m["trainable_params"] == _expected_trainable(strategy)
    names = [p["pattern"] for p in m["trainable_modules"]]
    assert any("classifier" in n for n in names)
    if strategy == "lora":
        assert all("lora_" in n or "modules_to_save" in n for n in names), names
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("val_acc" in r and "val_f1_spam" in r for r in rows) and not any("val_accuracy" in r for r in rows)
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == m["total_steps"] == 12


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lora")
    cfg, choices = _cfg(tmp, "classify.strategy=lora", "trainer.epochs=1", "trainer.lr=5e-3")
    return train(cfg, choices)


def test_eval_cli_scores_a_classifier_as_the_manifest_says(lora_run):
    r = run_cli("eval", "accuracy", "f1", "precision", "recall", f"run={lora_run}", "split=test")
    assert r.returncode == 0, r.stderr
    assert "confusion matrix" in r.stdout and "f1_spam" in r.stdout
    rep = json.loads((lora_run / "eval" / "accuracy_f1_precision_recall.json").read_text())
    m = _manifest(lora_run)
    assert rep["results"]["tuned"]["accuracy"] == m["test_accuracy"]
    assert rep["results"]["tuned"]["f1_spam"] == m["test_f1_spam"]
    assert rep["scores"]["confusion_matrix"] == m["classify"]["splits"]["test"]["confusion_matrix"]
    preds = (lora_run / "eval" / "accuracy_f1_precision_recall.predictions.jsonl").read_text().splitlines()
    assert len(preds) == 24 and json.loads(preds[0])["prediction_tuned"] in ("ham", "spam")
    from ftctl.evaluate.run import EvalConfig, run_eval

    with pytest.raises(ConfigError, match="'rouge' does not apply to a classifier"):
        run_eval(EvalConfig(run=str(lora_run), metrics=["rouge"]))


def test_merge_a_lora_classifier(lora_run):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from ftctl.rundir import open_run
    from ftctl.tasks.classify import predict

    from rich.console import Console

    from ftctl.post.merge import MergeConfig, merge

    merge(MergeConfig(run=str(lora_run)), Console())
    merged = AutoModelForSequenceClassification.from_pretrained(lora_run / "merged")
    assert merged.config.id2label == {0: "ham", 1: "spam"}
    tok = AutoTokenizer.from_pretrained(lora_run / "merged")
    from omegaconf import OmegaConf

    run = open_run(lora_run)
    assert run.labels == ["ham", "spam"] and OmegaConf.load(lora_run / "config.yaml").task == "classify"
    tuned = run.load_model(torch.device("cpu"))
    ex = [{"input_ids": tok(t)["input_ids"], "label": 0} for t in HAM + SPAM]
    with torch.no_grad():
        a = tuned(**{k: v for k, v in collate(ex, 0).items() if k != "labels"}).logits
        b = merged(**{k: v for k, v in collate(ex, 0).items() if k != "labels"}).logits
    assert torch.allclose(a, b, atol=1e-4) and predict(merged, ex, 0)[0] == predict(tuned, ex, 0)[0]


def test_decoder_classifier_scores_the_last_token(tmp_path):
    cfg, choices = _cfg(tmp_path, "classify.strategy=head", "trainer.max_steps=3", model="tiny_llama")
    out = train(cfg, choices)
    m = _manifest(out)
    assert [p["pattern"] for p in m["trainable_modules"]] == ["score.weight"] and m["trainable_params"] == 64 * 2
    assert m["status"] == "finished" and "test_f1_spam" in m


@pytest.mark.parametrize("override, expect", [
    ("data.balance=smote", "data.balance='smote' is not allowed"),
    ("classify.strategy=adapters", "classify.strategy='adapters' is not allowed"),
    ("classify.pooling=max", "classify.pooling='max' is not allowed"),
    ("objective=dpo", "objective=dpo does not apply to task=classify"),
    ("classify.labels=[spam]", "classify.labels=['spam'] must be empty or at least two"),
    ("quant=nf4", "quant=nf4 is not available with task=classify"),
    ("model.adapter=outputs/x", "model.adapter (continuing an adapter) does not apply to task=classify"),
])
def test_classify_config_errors(override, expect):
    with pytest.raises(ConfigError) as e:
        compose("recipe=sms_spam_classify", override)
    assert expect in str(e.value) and "\n" not in str(e.value)


def test_generate_task_refuses_classify_only_settings():
    with pytest.raises(ConfigError, match="data.balance=oversample applies to task=classify"):
        compose("recipe=sms_spam", "data.balance=oversample")
    with pytest.raises(ConfigError, match="model.kind=encoder .* cannot generate text"):
        compose("model=minilm_l6")
    r = run_cli("train", "recipe=sms_spam_classify", "classify.strategy=svm")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "classify.strategy" in r.stderr


def test_unknown_label_is_a_bad_row(tmp_path):
    from ftctl.models import load as models
    from ftctl.core.errors import DataError

    tok = models.load_tokenizer(models.resolve("builtin:tiny_bert"))
    cfg, _ = _cfg(tmp_path, "classify.labels=[ham,junk]")
    with pytest.raises(DataError, match="label 'spam' is not one of classify.labels"):
        build_data(cfg, tok)
    cfg, _ = _cfg(tmp_path, "classify.labels=[ham,junk]", "data.bad_rows=skip")
    b = build_data(cfg, tok)
    assert b.train.skipped_bad > 0 and all(e["label"] == 0 for e in b.train.examples)


@pytest.mark.slow
@pytest.mark.skipif(not SMS.is_file(), reason=f"{SMS} is absent (the shared datasets live in ../shared/data)")
def test_minilm_features_on_sms_spam(tmp_path):
    """The real encoder: frozen all-MiniLM-L6-v2, mean-pooled, into a logistic regression, on 800 messages."""
    cfg, choices = compose("recipe=sms_spam_classify", "classify.strategy=features", f"data.path={SMS}",
                           "data.limit=800", f"output_dir={tmp_path / 'run'}")
    m = _manifest(train(cfg, choices))
    assert m["test_accuracy"] > 93 and m["test_f1_spam"] > 75, (m["test_accuracy"], m["test_f1_spam"])
    assert m["trainable_params"] == 384 + 1  # one weight per feature and the bias (two classes)


@pytest.mark.slow
def test_strategy_sweep_and_its_table(tmp_path):
    """A Hydra multirun over classify.strategy, then benchmarks/classify_table.py over the sweep folder."""
    import subprocess
    import sys

    from conftest import ROOT

    data = _csv(tmp_path / "sms.csv")
    r = run_cli("train", "-m", "recipe=sms_spam_classify", "model=tiny_bert", f"data.path={data}",
                "data.max_length=32", "trainer.max_steps=3", "classify.strategy=features,head", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    sweep = next((tmp_path / "multirun" / "sms_spam_classify").iterdir())
    runs = {json.loads(f.read_text())["strategy"]: json.loads(f.read_text()) for f in sweep.glob("*/manifest.json")}
    assert set(runs) == {"features", "head"}
    t = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "classify_table.py"), str(sweep), "--positive", "spam",
                        "--csv", str(tmp_path / "t.csv")], capture_output=True, text=True)
    assert t.returncode == 0, t.stderr
    lines = t.stdout.strip().splitlines()
    assert lines[0].startswith("| strategy |") and "test F1 spam" in lines[0] and len(lines) == 4
    assert lines[2].startswith("| features |") and lines[3].startswith("| head |")
    for line, m in zip(lines[2:], (runs["features"], runs["head"])):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[6] == f"{m['test_accuracy']:.2f}%" and cells[7] == f"{m['test_f1_spam']:.2f}"
    assert len((tmp_path / "t.csv").read_text().splitlines()) == 3
