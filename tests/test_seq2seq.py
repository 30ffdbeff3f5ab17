"""model.kind=seq2seq on a tiny random T5: source and target from the same templates, labels on the
target, the loss against T5's own, LoRA on q and v, then train -> eval (generation) -> merge."""
import json

import pytest
import torch
from conftest import compose

from ftctl.core.errors import ConfigError

T5 = ["model=tiny_t5", "peft.target_modules=[q,v]", "data.limit=40", "data.max_length=128", "trainer.batch_size=4",
      "trainer.log_every=1", "trainer.eval_every=0", "trainer.warmup_steps=0"]


@pytest.fixture(scope="module")
def t5_path():
    from ftctl.models import load as models

    return models.resolve("builtin:tiny_t5")


def test_source_is_the_prompt_and_labels_are_the_target(t5_path):
    from ftctl.models import load as models
    from ftctl.data.pipeline import build

    tok = models.load_tokenizer(t5_path)
    cfg, _ = compose(*T5)
    b = build(cfg, tok)
    for ex, prompt, ref in zip(b.train.examples[:5], b.train.prompts, b.train.references):
        assert tok.decode(ex["input_ids"]) == prompt  # the template's prompt, alone
        assert ex["labels"][-1] == tok.eos_token_id and tok.decode(ex["labels"][:-1]) == ref  # target + EOS
        assert all(x != -100 for x in ex["labels"])
    # the same rows and split as a decoder run of the recipe
    dec, _ = compose(*[o for o in T5 if not o.startswith(("model=", "peft."))], "model=tiny_llama")
    assert build(dec, tok).validation.references == b.validation.references


def test_loss_is_t5s_own_cross_entropy(t5_path):
    from transformers import AutoModelForSeq2SeqLM

    from ftctl.models import load as models
    from ftctl.data.pipeline import build
    from ftctl.objectives.sft import Seq2SeqSFT

    tok = models.load_tokenizer(t5_path)
    cfg, _ = compose(*T5)
    ex = build(cfg, tok).train.examples[:6]
    model = AutoModelForSeq2SeqLM.from_pretrained(t5_path).eval()
    obj = Seq2SeqSFT(tok.pad_token_id)
    batches = [obj.collate(ex[:2]), obj.collate(ex[2:])]  # two micro-batches of a step, different lengths
    n = obj.count(batches)
    with torch.no_grad():
        ours = sum(float(obj.loss(model, b, n)) for b in batches)
        whole = obj.collate(ex)
        assert whole["labels"].shape[1] == max(len(e["labels"]) for e in ex)
        theirs = float(model(**whole).loss)  # transformers' mean over the target tokens of the batch
    assert ours == pytest.approx(theirs, rel=1e-5)


def test_train_eval_merge(tmp_path, t5_path):
    from peft import PeftModel
    from rich.console import Console
    from transformers import AutoModelForSeq2SeqLM

    from ftctl.evaluate.run import EvalConfig, run_eval
    from ftctl.post.merge import MergeConfig, merge
    from ftctl.rundir import read_metrics
    from ftctl.train.loop import train

    cfg, choices = compose(*T5, "trainer.max_steps=12", "trainer.lr=1e-2", "trainer.scheduler=constant",
                           f"output_dir={tmp_path / 'run'}")
    out = train(cfg, choices)
    m = json.loads((out / "manifest.json").read_text())
    assert m["status"] == "finished" and (out / "adapter" / "adapter_config.json").is_file()
    adapter_cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter_cfg["task_type"] == "SEQ_2_SEQ_LM" and sorted(adapter_cfg["target_modules"]) == ["q", "v"]
    assert {p["pattern"].split(".")[0] for p in m["trainable_modules"]} == {"encoder", "decoder"}
    losses = [r["loss"] for r in read_metrics(out) if "loss" in r]
    assert len(losses) == 12 and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.5, losses

    report = run_eval(EvalConfig(run=str(out), metrics=["rouge", "exact_match"], max_new_tokens=6, limit=4),
                      console=Console())
    assert set(report["results"]["tuned"]) >= {"rouge1", "rougeL", "exact_match"}
    rows = [json.loads(line) for line in (out / "eval" / "rouge_exact_match.predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(isinstance(r["prediction_tuned"], str) for r in rows)
    with pytest.raises(ConfigError, match="not available for model.kind=seq2seq"):
        run_eval(EvalConfig(run=str(out), metrics=["perplexity"]))

    merged_dir = merge(MergeConfig(run=str(out)), Console())
    merged = AutoModelForSeq2SeqLM.from_pretrained(merged_dir).eval()
    assert not any("lora" in k for k in merged.state_dict())
    tuned = PeftModel.from_pretrained(AutoModelForSeq2SeqLM.from_pretrained(t5_path), out / "adapter").eval()
    ids = torch.tensor([[5, 6, 7, 8, 2]])
    with torch.no_grad():
        a = tuned(input_ids=ids, decoder_input_ids=ids).logits
        b = merged(input_ids=ids, decoder_input_ids=ids).logits
    assert (a - b).abs().max() < 1e-3
    gen_a = tuned.generate(input_ids=ids, max_new_tokens=5, do_sample=False)
    assert torch.equal(gen_a, merged.generate(input_ids=ids, max_new_tokens=5, do_sample=False))


def test_seq2seq_config_errors():
    with pytest.raises(ConfigError, match="data.packing=true does not apply to model.kind=seq2seq"):
        compose(*T5, "data.packing=true")
    with pytest.raises(ConfigError, match="objective=dpo is not available for model.kind=seq2seq"):
        compose(*T5, "objective=dpo", "data=demo_date_pairs", "template=preference")
    with pytest.raises(ConfigError, match="model.kind='decoder' is not allowed"):
        compose(*T5, "model.kind=decoder")


def test_flan_t5_recipe_composes_for_the_hub_model():
    cfg, _ = compose("recipe=dialogsum_flan_t5")
    assert cfg.model.path == "google/flan-t5-base" and cfg.model.kind == "seq2seq"
    assert list(cfg.peft.target_modules) == ["q", "v"] and cfg.peft.r == 32 and cfg.template.name == "flan"
