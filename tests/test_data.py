"""Templates and masks against hand-written strings; bad rows; splits; mixing; packing equivalence;
the tokenization cache. The tokenizer is the embedded model's (tiny_llama shares it)."""
import json
import re

import pytest
from conftest import compose, write_jsonl

from ftctl.data import pipeline
from ftctl.data.builtin import demo_dates
from ftctl.experiments.preview import marked, runs
from ftctl.data.templates import Context, alpaca, chat, completion, flan, parse_transcript, pick, preference
from ftctl.data.tokenize import IGNORE_INDEX, collate, encode, encode_pair, pack, packed_row
from ftctl.core.errors import DataError

SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"


def masked_runs(tokenizer, rendered, train_on="completion"):
    ids, labels = encode(tokenizer, rendered, train_on)
    return runs(tokenizer, ids, labels)


# ----------------------------------------------------------------------------- alpaca
def test_alpaca_with_input_exact_text_and_mask(tokenizer):
    r = alpaca({"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"})
    prompt = ("Below is an instruction that describes a task, paired with an input that provides further context. "
              "Write a response that appropriately completes the request.\n\n"
              "### Instruction:\nAdd the numbers.\n\n### Input:\n2 and 3\n\n### Response:\n")
    assert (r.prompt, r.reference) == (prompt, "5")
    assert masked_runs(tokenizer, r) == [(prompt, False), ("5<|im_end|>", True)]
    assert masked_runs(tokenizer, r, "all") == [(prompt + "5<|im_end|>", True)]


@pytest.mark.parametrize("row", [
    {"instruction": "Say hi.", "output": "Hi!"},
    {"instruction": "Say hi.", "input": "", "output": "Hi!"},
    {"instruction": "Say hi.", "input": "   ", "output": "Hi!"},
])
def test_alpaca_without_input_exact_text(row):
    r = alpaca(row)
    assert r.prompt == ("Below is an instruction that describes a task. "
                        "Write a response that appropriately completes the request.\n\n"
                        "### Instruction:\nSay hi.\n\n### Response:\n")
    assert r.text == r.prompt + "Hi!"


@pytest.mark.parametrize("row, expect", [
    ({"instruction": "x"}, "field 'output' is missing"),
    ({"instruction": "x", "output": 5}, "field 'output' must be a string (got int)"),
    ({"instruction": "x", "output": "  "}, "field 'output' is empty"),
    ({"instruction": ["x"], "output": "y"}, "field 'instruction' must be a string (got list)"),
])
def test_alpaca_bad_fields(row, expect):
    with pytest.raises(DataError, match=re.escape(expect)):
        alpaca(row)


def test_label_mask_covers_exactly_the_response(tokenizer):
    ids, labels = encode_pair(tokenizer, "### Response:\n", "2021-03-05")
    n_prompt = sum(1 for x in labels if x == IGNORE_INDEX)
    assert tokenizer.decode(ids[:n_prompt]) == "### Response:\n"
    assert [x for x in labels if x != IGNORE_INDEX] == ids[n_prompt:]
    assert ids[-1] == tokenizer.eos_token_id


# ----------------------------------------------------------------------------- flan
PHRASINGS = ["{{dialogue}}\n\nBriefly summarize that dialogue.|||{{summary}}",
             "Summarize this dialogue:\n{{dialogue}}|||{{summary}}"]


def test_flan_renders_the_chosen_phrasing(tokenizer):
    row = {"dialogue": "#Person1#: Hi.\n#Person2#: Hello.", "summary": "They greet."}
    ctx = Context(cfg={"phrasings": PHRASINGS}, tokenizer=tokenizer, seed=7)
    r = flan(row, ctx)
    expected_prompt = {0: "#Person1#: Hi.\n#Person2#: Hello.\n\nBriefly summarize that dialogue.\n",
                       1: "Summarize this dialogue:\n#Person1#: Hi.\n#Person2#: Hello.\n"}[pick(7, row, 2)]
    assert (r.prompt, r.reference) == (expected_prompt, "They greet.")
    assert masked_runs(tokenizer, r) == [(expected_prompt, False), ("They greet.<|im_end|>", True)]
    assert flan(row, ctx).prompt == r.prompt  # deterministic


def test_flan_phrasing_varies_across_rows_and_follows_the_seed():
    rows = [{"dialogue": f"d{i}", "summary": "s"} for i in range(40)]
    picks = [pick(1, r, 5) for r in rows]
    assert len(set(picks)) == 5  # every phrasing gets used
    assert picks != [pick(2, r, 5) for r in rows]


def test_flan_errors_name_the_problem(tokenizer):
    with pytest.raises(DataError, match="'summary' is undefined"):
        flan({"dialogue": "x"}, Context(cfg={"phrasings": PHRASINGS}, tokenizer=tokenizer))
    with pytest.raises(DataError, match=r"exactly once"):
        flan({"a": "x"}, Context(cfg={"phrasings": ["{{a}} no separator"]}))
    with pytest.raises(DataError, match="refused by the template sandbox"):
        flan({"a": "x"}, Context(cfg={"phrasings": ["{{ a.__class__.__mro__ }}|||x"]}))


# ----------------------------------------------------------------------------- chat
MSGS = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]


def test_chat_equals_apply_chat_template_text_and_tokens(tokenizer):
    ctx = Context(cfg={"name": "chat"}, tokenizer=tokenizer)
    r = chat({"messages": MSGS}, ctx)
    assert r.text == tokenizer.apply_chat_template(MSGS, tokenize=False)
    ids, _ = encode(tokenizer, r, "all")
    want = tokenizer.apply_chat_template(MSGS, tokenize=True)
    assert ids == list(want["input_ids"] if hasattr(want, "keys") else want)
    assert r.prompt == tokenizer.apply_chat_template(MSGS[:3], tokenize=False, add_generation_prompt=True)
    assert r.reference == "4"


def test_chat_masks_for_each_train_on(tokenizer):
    r = chat({"messages": MSGS}, Context(cfg={}, tokenizer=tokenizer))
    head = SYSTEM + "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    mid = "\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"
    every = [(head, False), ("Hello!<|im_end|>", True), (mid, False), ("4<|im_end|>", True), ("\n", False)]
    assert masked_runs(tokenizer, r, "completion") == every
    assert masked_runs(tokenizer, r, "assistant") == every
    assert masked_runs(tokenizer, r, "last") == [(head + "Hello!<|im_end|>" + mid, False), ("4<|im_end|>", True),
                                                 ("\n", False)]
    assert masked_runs(tokenizer, r, "all") == [(r.text, True)]


def test_chat_prompt_completion_rows_train_on_the_completion_only(tokenizer):
    row = {"prompt": MSGS[:3], "completion": [MSGS[3]]}
    r = chat(row, Context(cfg={}, tokenizer=tokenizer))
    assert r.text == tokenizer.apply_chat_template(MSGS, tokenize=False)
    assert [t for t, trained in masked_runs(tokenizer, r, "completion") if trained] == ["4<|im_end|>"]
    assert [t for t, trained in masked_runs(tokenizer, r, "assistant") if trained] == ["Hello!<|im_end|>",
                                                                                       "4<|im_end|>"]


def test_chat_system_tools_and_own_jinja_template(tokenizer):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {
                "name": "weather", "arguments": {"city": "Paris"}}}]},
            {"role": "tool", "content": "18C"}, {"role": "assistant", "content": "18C in Paris."}]
    own = ("{% for m in messages %}[{{ m.role }}]{% if m.tool_calls %}CALL {{ m.tool_calls[0].function.name }}"
           "{{ m.tool_calls[0].function.arguments | tojson }}{% else %}{{ m.content }}{% endif %}{{ eos_token }}"
           "{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}")
    r = chat({"messages": msgs}, Context(cfg={"chat_template": own}, tokenizer=tokenizer))
    assert r.text == ('[system]Be brief.<|im_end|>[user]Weather?<|im_end|>[assistant]CALL weather{"city": "Paris"}'
                      '<|im_end|>[tool]18C<|im_end|>[assistant]18C in Paris.<|im_end|>')
    assert [t for t, trained in masked_runs(tokenizer, r) if trained] == [
        'CALL weather{"city": "Paris"}<|im_end|>', "18C in Paris.<|im_end|>"]
    assert [t for t, trained in masked_runs(tokenizer, r, "last") if trained] == ["18C in Paris.<|im_end|>"]
    # the tokenizer's template with a system message from the config
    r = chat({"messages": MSGS[:2]}, Context(cfg={"system": "Be brief."}, tokenizer=tokenizer))
    assert r.text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi")


def test_chat_template_sandbox_and_bad_messages(tokenizer):
    evil = "{{ messages.__class__.__init__.__globals__ }}"
    with pytest.raises(DataError, match="refused by the template sandbox"):
        chat({"messages": MSGS}, Context(cfg={"chat_template": evil}, tokenizer=tokenizer))
    with pytest.raises(DataError, match=r"field 'messages\[0\].role' is 'robot'"):
        chat({"messages": [{"role": "robot", "content": "x"}]}, Context(cfg={}, tokenizer=tokenizer))
    with pytest.raises(DataError, match="no assistant turn"):
        chat({"messages": MSGS[:1]}, Context(cfg={}, tokenizer=tokenizer))
    with pytest.raises(DataError, match="is empty"):
        chat({"messages": MSGS[:3] + [{"role": "assistant", "content": " "}]}, Context(cfg={}, tokenizer=tokenizer))


def test_transcript_string_parses_to_messages():
    assert parse_transcript("\n\nHuman: Hi there\n\nAssistant: Hello.\n\nHuman: Bye\n\nAssistant: Bye!") == [
        {"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Bye!"}]
    with pytest.raises(DataError, match="transcript"):
        parse_transcript("no turns here")


# ----------------------------------------------------------------------------- completion
def test_completion_pairs_and_raw_text(tokenizer):
    r = completion({"prompt": "The capital of France is", "completion": " Paris."})
    assert masked_runs(tokenizer, r) == [("The capital of France is", False), (" Paris.<|im_end|>", True)]
    r = completion({"text": "Once upon a time."})
    assert masked_runs(tokenizer, r) == [("Once upon a time.<|im_end|>", True)]
    with pytest.raises(DataError, match="field 'completion' is empty"):
        completion({"prompt": "x", "completion": ""})


# ----------------------------------------------------------------------------- preference
HH_C = "\n\nHuman: What is up?\n\nAssistant: Not much.\n\nHuman: ok bye\n\nAssistant: Bye!"
HH_R = "\n\nHuman: What is up?\n\nAssistant: Not much.\n\nHuman: ok bye\n\nAssistant: Go away."


def test_preference_plain_transcripts_split_the_shared_prompt(tokenizer):
    p = preference({"chosen": HH_C, "rejected": HH_R}, Context(cfg={"style": "plain"}, tokenizer=tokenizer))
    prompt = "\n\nHuman: What is up?\n\nAssistant: Not much.\n\nHuman: ok bye\n\nAssistant:"
    assert p.chosen.prompt == p.rejected.prompt == prompt
    assert masked_runs(tokenizer, p.chosen) == [(prompt, False), (" Bye!<|im_end|>", True)]
    assert masked_runs(tokenizer, p.rejected) == [(prompt, False), (" Go away.<|im_end|>", True)]
    p = preference({"prompt": "Q: 1+1?\nA:", "chosen": " 2", "rejected": " 3"}, Context(cfg={}, tokenizer=tokenizer))
    assert (p.chosen.text, p.rejected.text) == ("Q: 1+1?\nA: 2", "Q: 1+1?\nA: 3")


def test_preference_chat_form_equals_the_chat_template(tokenizer):
    p = preference({"chosen": HH_C, "rejected": HH_R}, Context(cfg={"style": "chat"}, tokenizer=tokenizer))
    msgs = parse_transcript(HH_C)
    assert p.chosen.text == tokenizer.apply_chat_template(msgs, tokenize=False)
    # only the final answer is trained, not the earlier assistant turn of the shared prompt
    for train_on in ("completion", "assistant", "last"):
        assert [t for t, trained in masked_runs(tokenizer, p.rejected, train_on) if trained] == ["Go away.<|im_end|>"]
    with pytest.raises(DataError, match="identical"):
        preference({"chosen": HH_C, "rejected": HH_C}, Context(cfg={"style": "chat"}, tokenizer=tokenizer))


# ----------------------------------------------------------------------------- pipeline
def _cfg(tmp_path, path, *extra, template="alpaca"):
    return compose("model=tiny_llama", f"template={template}", f"data.path={path}", "data.val_fraction=0", *extra)[0]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FTCTL_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


ROWS = [{"instruction": f"Repeat {i}.", "output": f"{i}"} for i in range(8)]


@pytest.mark.parametrize("line, expect", [
    ('{"instruction": "a", "output": "b"', "rows.jsonl:3: not valid JSON"),
    ('{"instruction": "a"}', "rows.jsonl:3: field 'output' is missing"),
    ('{"instruction": "a", "output": 7}', "rows.jsonl:3: field 'output' must be a string (got int)"),
    ('{"instruction": "a", "output": ""}', "rows.jsonl:3: field 'output' is empty"),
    (b'{"instruction": "a", "output": "\xff"}', "rows.jsonl:3: undecodable bytes"),
])
def test_each_bad_row_kind_names_file_line_and_field_or_is_skipped(tmp_path, cache, tokenizer, line, expect):
    f = tmp_path / "rows.jsonl"
    good = "".join(json.dumps(r) + "\n" for r in ROWS[:2]).encode()
    f.write_bytes(good + (line if isinstance(line, bytes) else line.encode()) + b"\n" + good)
    with pytest.raises(DataError, match=re.escape(expect)):
        pipeline.build(_cfg(tmp_path, f), tokenizer)
    b = pipeline.build(_cfg(tmp_path, f, "data.bad_rows=skip"), tokenizer)
    assert (b.train.rows, b.train.kept, b.train.skipped_bad) == (5, 4, 1)
    assert b.train.bad_examples[0].startswith(str(f) + ":3: ")


def test_all_masked_rows_never_reach_the_loss(tmp_path, cache, tokenizer):
    rows = [{"messages": MSGS}, {"messages": [{"role": "user", "content": "a" * 400}, MSGS[1]]}]
    f = write_jsonl(tmp_path / "chat.jsonl", rows)
    cfg = _cfg(tmp_path, f, "data.max_length=60", "data.overlong=truncate", template="chat")
    with pytest.raises(DataError, match=r"chat.jsonl:2: data.max_length=60 cut every trained token"):
        pipeline.build(cfg, tokenizer)
    b = pipeline.build(_cfg(tmp_path, f, "data.max_length=60", "data.overlong=truncate", "data.bad_rows=skip",
                            template="chat"), tokenizer)
    assert b.train.kept == 1 and b.train.skipped_bad == 1
    assert all(any(x != IGNORE_INDEX for x in e["labels"][1:]) for e in b.train.examples)


def test_overlong_policies_are_counted(tmp_path, cache, tokenizer):
    rows = ROWS[:3] + [{"instruction": "long " * 100, "output": "x"}]
    f = write_jsonl(tmp_path / "rows.jsonl", rows)
    b = pipeline.build(_cfg(tmp_path, f, "data.max_length=64"), tokenizer)
    assert (b.train.kept, b.train.dropped_too_long, b.train.truncated) == (3, 1, 0)
    with pytest.raises(DataError, match=r"rows.jsonl:4: \d+ tokens > data.max_length=64"):
        pipeline.build(_cfg(tmp_path, f, "data.max_length=64", "data.overlong=error"), tokenizer)
    b = pipeline.build(_cfg(tmp_path, f, "data.max_length=64", "data.overlong=truncate", "data.train_on=all"), tokenizer)
    assert (b.train.kept, b.train.truncated) == (4, 1) and max(b.train.lengths) == 64


def test_column_mapping_fits_any_file(tmp_path, cache, tokenizer):
    f = write_jsonl(tmp_path / "qa.jsonl", [{"q": "Capital of France?", "a": "Paris"}])
    b = pipeline.build(_cfg(tmp_path, f, "+data.columns.instruction=q", "+data.columns.output=a"), tokenizer)
    assert b.train.references == ["Paris"] and "### Instruction:\nCapital of France?" in b.train.prompts[0]
    with pytest.raises(DataError, match=r"field 'answer' is missing \(data.columns.output=answer\)"):
        pipeline.build(_cfg(tmp_path, f, "+data.columns.instruction=q", "+data.columns.output=answer"), tokenizer)


def test_splits_by_ratio_are_seeded_disjoint_and_stable(tmp_path, cache, tokenizer):
    cfg = compose("model=tiny_llama", "data.val_fraction=0.1", "data.test_fraction=0.2")[0]
    a, b = pipeline.build(cfg, tokenizer), pipeline.build(cfg, tokenizer)
    assert (a.train.rows, a.validation.rows, a.test.rows) == (840, 120, 240)
    assert a.validation.references == b.validation.references
    sets = [set(s.references) for s in (a.train, a.validation, a.test)]  # every demo date is distinct
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    c = pipeline.build(compose("model=tiny_llama", "data.val_fraction=0.1", "data.test_fraction=0.2",
                               "data.split_seed=5")[0], tokenizer)
    assert set(c.validation.references) != sets[1]


def test_splits_given_as_files(tmp_path, cache, tokenizer):
    tr = write_jsonl(tmp_path / "train.jsonl", ROWS[:6])
    va = write_jsonl(tmp_path / "val.jsonl", ROWS[6:7])
    te = write_jsonl(tmp_path / "test.jsonl", ROWS[7:])
    b = pipeline.build(_cfg(tmp_path, tr, f"data.val_path={va}", f"data.test_path={te}"), tokenizer)
    assert (b.train.kept, b.validation.references, b.test.references) == (6, ["6"], ["7"])


def test_mixing_adds_weighted_replay_rows(tmp_path, cache, tokenizer):
    task = write_jsonl(tmp_path / "task.jsonl", ROWS)
    general = write_jsonl(tmp_path / "general.jsonl", [{"q": f"general {i}", "a": "ok"} for i in range(3)])
    b = pipeline.build(_cfg(tmp_path, task, f"+data.mix=[{{path:{general},weight:0.5,columns:{{instruction:q,output:a}}}}]"),
                       tokenizer)
    assert b.train.kept == 8 and b.train.mixed_in == 4 and len(b.train.examples) == 12
    texts = [tokenizer.decode(e["input_ids"]) for e in b.train.examples[8:]]
    assert sum("general" in t for t in texts) == 4


def test_tokenization_cache_is_reused_and_invalidated(tmp_path, cache, tokenizer, tiny_model_path):
    f = write_jsonl(tmp_path / "rows.jsonl", ROWS)
    first = pipeline.build(_cfg(tmp_path, f), tokenizer)
    again = pipeline.build(_cfg(tmp_path, f), tokenizer)
    assert (first.cache_misses, again.cache_hits, again.cache_misses) == (1, 1, 0)
    assert again.train.examples == first.train.examples
    # the bad-row policy and the split come after the cache
    assert pipeline.build(_cfg(tmp_path, f, "data.bad_rows=skip", "data.val_fraction=0.25"), tokenizer).cache_hits == 1
    # a change to the data, the template, the masking or the tokenizer is a miss
    write_jsonl(f, ROWS[:7] + [{"instruction": "Repeat 7.", "output": "seven"}])
    changed = pipeline.build(_cfg(tmp_path, f), tokenizer)
    assert changed.cache_misses == 1 and changed.train.references[-1] == "seven"
    assert pipeline.build(_cfg(tmp_path, f, "data.train_on=all"), tokenizer).cache_misses == 1
    g = write_jsonl(tmp_path / "c.jsonl", [{"prompt": r["instruction"], "completion": r["output"]} for r in ROWS])
    assert pipeline.build(_cfg(tmp_path, g, template="completion"), tokenizer).cache_misses == 1
    assert pipeline.build(_cfg(tmp_path, g, template="completion"), tokenizer).cache_hits == 1
    from ftctl.models.load import load_tokenizer

    other = load_tokenizer(tiny_model_path)
    other.add_tokens(["<new-token>"])
    assert pipeline.build(_cfg(tmp_path, g, template="completion"), other).cache_misses == 1
    # a damaged cache entry is rebuilt, not trusted
    for entry in cache.glob("data/*/data-*.arrow"):
        entry.write_bytes(b"garbage")
    rebuilt = pipeline.build(_cfg(tmp_path, f), tokenizer)
    assert rebuilt.cache_misses == 1 and rebuilt.train.references[-1] == "seven"


# ----------------------------------------------------------------------------- packing
def test_pack_fits_rows_and_restarts_positions():
    bins = pack([5, 3, 4, 2, 6, 1], 8)
    assert sorted(i for b in bins for i in b) == list(range(6))
    assert all(sum([5, 3, 4, 2, 6, 1][i] for i in b) <= 8 for b in bins) and len(bins) == 3
    row = packed_row([{"input_ids": [1, 2, 3], "labels": [1, 2, 3]}, {"input_ids": [4, 5], "labels": [-100, 5]}])
    assert row == {"input_ids": [1, 2, 3, 4, 5], "labels": [-100, 2, 3, -100, 5], "position_ids": [0, 1, 2, 0, 1]}
    b = collate([row, {"input_ids": [7], "labels": [7], "position_ids": [0]}], pad_id=0)
    assert "attention_mask" not in b and b["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 0, 1, 2, 3]]


def test_packed_and_unpacked_give_the_same_loss_and_gradients(tokenizer, tiny_model_path):
    import torch
    from transformers import AutoModelForCausalLM

    rows = [alpaca({"instruction": f"Convert {d} to ISO.", "output": o}) for d, o in
            [("March 5, 2021", "2021-03-05"), ("1 Jan 1999", "1999-01-01"), ("the 3rd of May, 2000", "2000-05-03"),
             ("Dec 9, 1987", "1987-12-09"), ("7 July 2011", "2011-07-07")]]
    exs = [dict(zip(("input_ids", "labels"), encode(tokenizer, r, "all"))) for r in rows]
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, torch_dtype=torch.float32)
    model.train()

    def loss_and_grads(batch):
        model.zero_grad()
        n = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        loss = model(**batch, num_items_in_batch=n, use_cache=False).loss
        loss.backward()
        return float(loss.detach()), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    # the same targets the packed row trains: each example's first token is never predicted
    unpacked = collate(exs, tokenizer.pad_token_id)
    bins = pack([len(e["input_ids"]) for e in exs], 3 * max(len(e["input_ids"]) for e in exs))
    assert len(bins) < len(exs)
    packed = collate([packed_row([exs[i] for i in b]) for b in bins], tokenizer.pad_token_id)
    l1, g1 = loss_and_grads(unpacked)
    l2, g2 = loss_and_grads(packed)
    assert abs(l1 - l2) < 1e-5, (l1, l2)
    assert max(float((a - b).abs().max()) for a, b in zip(g1, g2)) < 1e-5
    # without restarting positions (one long sequence) the loss differs: the test can fail
    wrong = {k: v for k, v in packed.items() if k != "position_ids"}
    assert abs(loss_and_grads(wrong)[0] - l1) > 1e-4


def test_packing_in_the_pipeline_reports_efficiency(tmp_path, cache, tokenizer):
    b = pipeline.build(compose("model=tiny_llama", "data.packing=true", "data.max_length=256")[0], tokenizer)
    assert b.train.packed_rows == len(b.train.examples) < b.train.kept
    assert b.train.packing_efficiency == pytest.approx(b.train.tokens / (256 * b.train.packed_rows))
    assert b.train.packing_efficiency > 0.85
    assert sum(len(e["input_ids"]) for e in b.train.examples) == b.train.tokens


# ----------------------------------------------------------------------------- preview and demo data
def test_preview_marks_trained_tokens(tokenizer):
    r = alpaca({"instruction": "Say hi.", "output": "Hi!"})
    assert marked(masked_runs(tokenizer, r)) == r.prompt + "⟦Hi!<|im_end|>⟧"


def test_demo_dataset_is_deterministic_and_correct():
    import datetime

    rows = demo_dates()
    assert rows == demo_dates() and len(rows) == 1200
    isos = [r["output"] for r in rows]
    assert len(set(isos)) == len(isos)  # every date distinct: held-out rows are new dates
    for r in rows[:200]:
        datetime.date.fromisoformat(r["output"])  # valid dates
    assert any(r["input"] for r in rows) and any(not r["input"] for r in rows)


def test_cli_data_errors_exit_2_and_leave_no_run(tmp_path):
    from conftest import run_cli

    bad = write_jsonl(tmp_path / "rows.jsonl", [{"instruction": "a", "output": "b"}, {"instruction": "no output"}])
    for path, expect in ((tmp_path / "missing.jsonl", "no such file"), (bad, ":2: field 'output' is missing")):
        out = tmp_path / "run"
        r = run_cli("train", "model=tiny_llama", "data=alpaca_file", f"data.path={path}", f"output_dir={out}")
        assert r.returncode == 2 and expect in r.stderr and str(path) in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and not out.exists()
    r = run_cli("train", "data=alpaca_file")
    assert r.returncode == 2 and "data.path: required but not set" in r.stderr


# ----------------------------------------------------------------------------- awkward input
def test_awkward_rows_become_bad_rows_not_crashes(tmp_path, cache, tokenizer):
    lines = ['{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}',
             '{"messages": [{"role": "user", "content": "\\ud83d"}, {"role": "assistant", "content": "x"}]}',
             '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], "tools": "x"}',
             '{"messages": [{"role": "assistant", "content": "first"}, {"role": "user", "content": "hi"}, '
             '{"role": "assistant", "content": "yo"}]}']
    f = tmp_path / "chat.jsonl"
    f.write_text("\n".join(lines) + "\n")
    b = pipeline.build(_cfg(tmp_path, f, "data.bad_rows=skip", template="chat"), tokenizer)
    assert (b.train.kept, b.train.skipped_bad) == (1, 3)
    msgs = "\n".join(b.train.bad_examples)
    assert "chat.jsonl:2: undecodable text" in msgs and "chat.jsonl:3: the tokenizer's chat template failed" in msgs
    assert "chat.jsonl:4: message 0 is an assistant turn" in msgs


def test_parquet_dates_nested_columns_and_mapped_field_names(tmp_path, cache, tokenizer):
    import datetime

    import pyarrow as pa
    import pyarrow.parquet as pq

    f = tmp_path / "qa.parquet"
    pq.write_table(pa.table({"when": [datetime.date(2024, 1, 2)] * 2, "q": ["Capital of France?", "2+2?"],
                             "answers": [{"text": ["Paris", "paris"]}, {"text": []}]}), f)
    cfg = _cfg(tmp_path, f, "+data.columns.instruction=q", "+data.columns.output=answers.text.0", "data.bad_rows=skip")
    b = pipeline.build(cfg, tokenizer)
    assert b.train.references == ["Paris"]
    assert b.train.bad_examples == [f"{f}: row 2: field 'answers.text.0' is missing "
                                    "(data.columns.output=answers.text.0)"]
    g = write_jsonl(tmp_path / "typed.jsonl", [{"q": "x", "a": 5}])
    with pytest.raises(DataError, match=re.escape("typed.jsonl:1: field 'a' (data.columns.output) must be a string")):
        pipeline.build(_cfg(tmp_path, g, "+data.columns.instruction=q", "+data.columns.output=a"), tokenizer)


def test_mixed_sources_report_their_own_counts(tmp_path, cache, tokenizer):
    task = write_jsonl(tmp_path / "task.jsonl", ROWS)
    extra = write_jsonl(tmp_path / "extra.jsonl", ROWS[:2] + [{"instruction": "long " * 200, "output": "x"}])
    b = pipeline.build(_cfg(tmp_path, task, "data.max_length=64", f"+data.mix=[{{path:{extra},weight:0.25}}]"), tokenizer)
    assert b.train.mixed_in == 2
    assert b.train.mix_reports == [f"data.mix[0] {extra}: 2 of 3 rows kept, 1 too long dropped; 2 rows added (weight 0.25)"]
    assert "mixed in" in pipeline.describe(b.train)


def test_template_config_errors_are_config_errors():
    from ftctl.core.errors import ConfigError

    with pytest.raises(ConfigError, match=r"template.phrasings\[0\]: no '\|\|\|'"):
        compose("template=flan_summarize", "template.phrasings=[just a prompt]")
    with pytest.raises(ConfigError, match=r"template.phrasings\[1\]: template line 1"):
        compose("template=flan_summarize", "template.phrasings=['{{a}}|||{{b}}','{{a|||b']")
    with pytest.raises(ConfigError, match="template.vars.options: required but not set|template.vars.options"):
        compose("template=flan_classify")


def test_preference_transcripts_differing_before_the_last_turn_are_refused():
    c = "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: Bye\n\nAssistant: Bye!"
    r = "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: See you\n\nAssistant: Go."
    with pytest.raises(DataError, match="differ before their last assistant turn"):
        preference({"chosen": c, "rejected": r}, Context(cfg={"style": "plain"}))
