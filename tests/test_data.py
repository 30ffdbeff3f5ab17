"""Alpaca rendering and label masking against hand-written strings; sources; truncation."""
import gzip
import json

import pytest
from conftest import write_jsonl

from ftctl.data.builtin import demo_dates
from ftctl.data.pipeline import load_splits
from ftctl.data.sources import read_rows
from ftctl.data.templates import alpaca
from ftctl.data.tokenize import IGNORE_INDEX, collate, encode_pair, encode_rows
from ftctl.errors import DataError


def test_alpaca_with_input_exact_text():
    prompt, completion = alpaca({"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"})
    assert prompt == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nAdd the numbers.\n\n### Input:\n2 and 3\n\n### Response:\n"
    )
    assert completion == "5"


@pytest.mark.parametrize("row", [
    {"instruction": "Say hi.", "output": "Hi!"},
    {"instruction": "Say hi.", "input": "", "output": "Hi!"},
    {"instruction": "Say hi.", "input": "   ", "output": "Hi!"},
])
def test_alpaca_without_input_exact_text(row):
    prompt, completion = alpaca(row)
    assert prompt == (
        "Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nSay hi.\n\n### Response:\n"
    )
    assert completion == "Hi!"


def test_alpaca_missing_field():
    with pytest.raises(DataError, match="'output'"):
        alpaca({"instruction": "x"})


def test_label_mask_covers_exactly_the_response(tokenizer):
    prompt, completion = alpaca({"instruction": "Convert this date to ISO 8601 format (YYYY-MM-DD).",
                                 "input": "March 5, 2021", "output": "2021-03-05"})
    ids, labels = encode_pair(tokenizer, prompt, completion)
    assert len(ids) == len(labels)
    n_prompt = sum(1 for x in labels if x == IGNORE_INDEX)
    # everything up to the response is masked; what is trained on is the answer and then EOS
    assert tokenizer.decode(ids[:n_prompt]) == prompt
    assert all(x == IGNORE_INDEX for x in labels[:n_prompt])
    target = [x for x in labels if x != IGNORE_INDEX]
    assert target == ids[n_prompt:]
    assert tokenizer.decode(target) == "2021-03-05<|im_end|>"
    assert target[-1] == tokenizer.eos_token_id


def test_truncation_modes_are_counted(tokenizer):
    pairs = [("short prompt\n", "ok"), ("a much longer prompt " * 20, "answer"), ("p", "")]
    st = encode_rows(tokenizer, pairs, max_length=30, truncation="drop")
    # an empty output still trains EOS (stop at once), so it is kept
    assert (st.kept, st.dropped_too_long, st.dropped_no_target) == (2, 1, 0)
    st = encode_rows(tokenizer, pairs, max_length=30, truncation="truncate")
    # the long row's prompt alone fills max_length: cut to 30 tokens no target is left, so it is dropped
    assert (st.truncated, st.kept, st.dropped_no_target) == (1, 2, 1)
    assert all(len(e["input_ids"]) <= 30 for e in st.examples)
    with pytest.raises(DataError, match="row 1 has .* tokens > data.max_length=30"):
        encode_rows(tokenizer, pairs, max_length=30, truncation="error")


def test_collate_pads_right_and_masks(tokenizer):
    ex = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    b = collate(ex, pad_id=0)
    assert b["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert b["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]


def test_demo_dataset_is_deterministic_and_correct():
    import datetime

    rows = demo_dates()
    assert rows == demo_dates() and len(rows) == 1200
    isos = [r["output"] for r in rows]
    assert len(set(isos)) == len(isos)  # every date distinct: held-out rows are new dates
    for r in rows[:200]:
        datetime.date.fromisoformat(r["output"])  # valid dates
    assert any(r["input"] for r in rows) and any(not r["input"] for r in rows)


def test_split_is_stable_and_disjoint():
    class D:  # the fields load_splits reads
        path, val_path, val_fraction, limit = "builtin:demo_dates", None, 0.1, None
    a, b = load_splits(D), load_splits(D)
    assert a.val_rows == b.val_rows and len(a.val_rows) == 120 and len(a.train_rows) == 1080
    assert not {r["output"] for r in a.val_rows} & {r["output"] for r in a.train_rows}


def test_sources_json_jsonl_gz(tmp_path):
    rows = [{"instruction": "a", "output": "b"}, {"instruction": "c", "input": "d", "output": "e"}]
    write_jsonl(tmp_path / "x.jsonl", rows)
    (tmp_path / "x.json").write_text(json.dumps(rows))
    (tmp_path / "x.jsonl.gz").write_bytes(gzip.compress((tmp_path / "x.jsonl").read_bytes()))
    for name in ("x.jsonl", "x.json", "x.jsonl.gz"):
        got, fp = read_rows(str(tmp_path / name))
        assert got == rows and len(fp) == 64


def test_sources_errors_name_file_and_line(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        read_rows(str(tmp_path / "missing.jsonl"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{not json}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: not valid JSON"):
        read_rows(str(bad))


def test_cli_data_errors_exit_2_and_leave_no_run(tmp_path):
    from conftest import run_cli

    bad = write_jsonl(tmp_path / "rows.jsonl", [{"instruction": "a", "output": "b"}, {"instruction": "no output"}])
    for path, expect in ((tmp_path / "missing.jsonl", "no such file"), (bad, "no string field 'output'")):
        out = tmp_path / "run"
        r = run_cli("train", "model=tiny_llama", "data=alpaca_file", f"data.path={path}", f"output_dir={out}")
        assert r.returncode == 2 and expect in r.stderr and str(path) in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and not out.exists()
    r = run_cli("train", "data=alpaca_file")
    assert r.returncode == 2 and "data.path: required but not set" in r.stderr
