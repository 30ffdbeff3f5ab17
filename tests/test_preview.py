"""`ftctl data preview` for every shipped recipe, piped and in a terminal; the shared-data recipes
read ../shared/data (skipped, saying so, when it is absent)."""
import io
import re

import pytest
from conftest import SHARED_DATA, compose, run_cli

from ftctl.config.compose import list_recipes

# recipe -> the file under ../shared/data it reads (None: the built-in demo data)
SHARED = {"dialogsum_flan": "dialogsum/dialogsum.test.jsonl", "hh_rlhf_chat": "hh_rlhf/harmless_base.jsonl.gz",
          "hh_rlhf_pairs": "hh_rlhf/harmless_base.jsonl.gz",
          "hh_rlhf_dpo": "hh_rlhf/harmless_base.jsonl.gz", "gsm8k_alpaca": "alpaca_format/gsm8k_alpaca.json",
          "sms_spam": "sms_spam/sms_spam.csv"}
# recipes with their own preview tests below: a classifier (text and label, no trained tokens) and a
# hub model that cannot be fetched here (previewed with the tiny T5's tokenizer instead)
OWN = {"sms_spam_classify": "sms_spam/sms_spam.csv", "dialogsum_flan_t5": "dialogsum/dialogsum.test.jsonl"}
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _preview(recipe, terminal=False, n=2, extra=()):
    from rich.console import Console

    from ftctl.experiments.preview import show

    overrides = [f"recipe={recipe}", *extra]
    if SHARED.get(recipe) or OWN.get(recipe):
        path = SHARED_DATA / (SHARED.get(recipe) or OWN[recipe])
        if not path.is_file():
            pytest.skip(f"{path} is absent (the shared datasets live beside the repository, in ../shared/data)")
        overrides.append(f"data.path={path}")
    cfg, _ = compose(*overrides)
    buf = io.StringIO()
    console = Console(file=buf, force_terminal=terminal, width=120, color_system="standard" if terminal else None)
    show(cfg, console, n=n)
    return cfg, buf.getvalue()


def test_every_shipped_recipe_is_covered():
    shipped = {name for name, _, f in list_recipes() if f.parent.name == "recipes"}
    assert shipped == set(SHARED) | set(OWN) | {"qlora_llama", "lora_smollm2", "full_smollm2"}


def test_preview_classify_recipe():
    _, out = _preview("sms_spam_classify", n=2, extra=["data.balance=oversample"])
    assert out.count("── example ") == 2 and ("label ham" in out or "label spam" in out)
    assert "train: 3201 of 3201 rows kept" in out and "test: 915 of 915 rows kept" in out
    assert "oversample: rows per class" in out


def test_preview_seq2seq_shows_source_then_target():
    cfg, out = _preview("dialogsum_flan_t5", n=1, extra=["model=tiny_t5"])
    assert cfg.model.kind == "seq2seq" and out.count("── example 1 source + target") == 1
    example = out.split("── example 1")[1]
    assert example.count("⟦") == 1 and example.split("⟦")[1].split("⟧")[0].strip()  # the summary, trained
    assert "Person1" in example.split("⟦")[0]  # the dialogue: the source, not trained


@pytest.mark.parametrize("recipe", sorted(set(SHARED) | {"lora_smollm2", "qlora_llama", "full_smollm2"}))
def test_preview_every_recipe_piped(recipe):
    cfg, out = _preview(recipe)
    assert not ANSI.search(out)
    assert out.count("── example ") == (4 if cfg.template.name == "preference" else 2)
    assert "⟦" in out and "⟧" in out and out.count("⟦") == out.count("⟧")
    stats = {m.group(1).strip(): m.group(2) for m in re.finditer(r"│ ([a-z0-9, ]+?)\s+│\s+([\d,]+) │", out)}
    assert int(stats["rows"].replace(",", "")) > 0 and int(stats["trained tokens"].replace(",", "")) > 0
    for key in ("kept", "bad rows skipped", "too long, dropped", "truncated", "length p50", "length p90", "length p99"):
        assert key in stats, key
    if cfg.data.packing:
        assert re.search(r"packing efficiency\s+│\s+\d+\.\d%", out)
    if recipe == "hh_rlhf_chat":  # multi-turn: several trained spans in one example
        first = out.split("── example 2")[0]
        assert first.count("⟦") >= 1 and "<|im_start|>assistant" in first


def test_preview_in_a_terminal_uses_colour_not_markers():
    _, out = _preview("lora_smollm2", terminal=True, n=1)
    assert ANSI.search(out) and "⟦" not in out
    plain = ANSI.sub("", out)
    assert "### Response:" in plain and "rows" in plain


def test_preview_cli_piped_and_bad_input():
    r = run_cli("data", "preview", "recipe=lora_smollm2", "n=1", "split=validation")
    assert r.returncode == 0, r.stderr
    assert "(validation)" in r.stdout and "⟦" in r.stdout and r.stdout.count("── example ") == 1
    r = run_cli("data", "preview", "recipe=lora_smollm2", "data.train_on=everything")
    assert r.returncode == 2 and "data.train_on='everything' is not allowed" in r.stderr
    r = run_cli("data", "preview", "recipe=lora_smollm2", "split=dev", env={"NO_COLOR": "1"})
    assert r.returncode == 2 and "split='dev'; choose train, validation or test" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
