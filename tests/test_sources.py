"""ftctl.data.sources: every format, record locations, bad records, whole-source errors, fingerprints.
Real files under tmp_path; only the hub path relies on offline mode instead of a network."""
import csv
import gzip
import io
import json
import time

import pytest

from ftctl.data.sources import Record, read_rows, read_source, source_fingerprint
from ftctl.core.errors import DataError

ROWS = [
    {"instruction": "Add 2, 3", "input": "", "output": "5"},
    {"instruction": "two\nlines", "input": 'say "hi"', "output": "café"},
    {"instruction": "tab\there", "input": "x", "output": "y"},
]


def _delimited(rows, delimiter):
    buf = io.StringIO()
    w = csv.writer(buf, delimiter=delimiter, lineterminator="\n")
    w.writerow(list(rows[0]))
    w.writerows([list(r.values()) for r in rows])
    return buf.getvalue().encode()


def _jsonl(rows):
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """spec -> split for the same ROWS in every supported form."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = tmp_path_factory.mktemp("formats")
    files = {
        "x.json": json.dumps(ROWS, indent=2).encode(),
        "wrapped.json": json.dumps({"meta": 1, "data": ROWS}).encode(),
        "x.jsonl": _jsonl(ROWS),
        "x.csv": _delimited(ROWS, ","),
        "x.tsv": _delimited(ROWS, "\t"),
    }
    for name, data in list(files.items()):
        if name != "wrapped.json":
            files[name + ".gz"] = gzip.compress(data)
    for name, data in files.items():
        (d / name).write_bytes(data)
    pq.write_table(pa.Table.from_pylist(ROWS), d / "x.parquet")
    datasets.Dataset.from_list(ROWS).save_to_disk(str(d / "ds"))
    other = [{"instruction": "o", "input": "", "output": "o"}]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(other),
                          "validation": datasets.Dataset.from_list(ROWS)}).save_to_disk(str(d / "dd"))
    out = {str(d / n): None for n in [*files, "x.parquet", "ds"]}
    out[str(d / "dd")] = "validation"
    return out


def test_every_format_gives_the_same_rows_and_cheap_fingerprint(sources):
    assert len(sources) == 12
    fps = set()
    for spec, split in sources.items():
        src = read_source(spec, split=split)
        assert [r.row for r in src.records] == ROWS, spec
        assert [r.error for r in src.records] == [None] * 3, spec
        assert src.where == spec
        assert len(src.fingerprint) == 64 and src.fingerprint == source_fingerprint(spec, split=split), spec
        fps.add(src.fingerprint)
    # .gz hashes the decompressed content, so x.jsonl and x.jsonl.gz agree; formats differ
    assert len(fps) == 12 - 4


def test_folder_and_parquet_locations(sources):
    for spec, split in sources.items():
        if spec.endswith(("ds", "dd", ".parquet")):
            assert [r.loc for r in read_source(spec, split=split).records] == [f"{spec}: row {i}" for i in (1, 2, 3)]


def test_datasetdict_default_split_is_train_and_missing_split_lists_available(sources):
    dd = next(s for s in sources if s.endswith("dd"))
    assert [r.row for r in read_source(dd).records] == [{"instruction": "o", "input": "", "output": "o"}]
    assert source_fingerprint(dd) == read_source(dd).fingerprint != read_source(dd, split="validation").fingerprint
    with pytest.raises(DataError) as e:
        read_source(dd, key="data.val_path", split="test")
    assert str(e.value) == f"data.val_path: {dd}: no split 'test' (available: train, validation)"


def test_builtin():
    src = read_source("builtin:demo_dates")
    assert len(src.records) == 1200 and src.records[0].loc == "builtin:demo_dates: row 1"
    assert src.records[-1].loc == "builtin:demo_dates: row 1200" and set(src.records[0].row) == {
        "instruction", "input", "output"}
    assert source_fingerprint("builtin:demo_dates") == src.fingerprint
    assert src.where == "builtin:demo_dates"


def test_jsonl_locations_and_bad_records(tmp_path):
    p = tmp_path / "r.jsonl"
    p.write_bytes(b'\xef\xbb\xbf{"a": "1"}\n'  # BOM stripped
                  b"\n"  # blank: skipped, not a record
                  b'{"a": 1 "b": 2}\n'
                  b"[1, 2]\n"
                  b'"text"\n'
                  b'{"a": "\xff\xfe"}\r\n'
                  b'{"a": "last"}')
    recs = read_source(str(p)).records
    assert recs == [
        Record(f"{p}:1", {"a": "1"}, None),
        Record(f"{p}:3", None, "not valid JSON (Expecting ',' delimiter, column 9)"),
        Record(f"{p}:4", None, "not a JSON object (got list)"),
        Record(f"{p}:5", None, "not a JSON object (got string)"),
        Record(f"{p}:6", None, "undecodable bytes (not UTF-8)"),
        Record(f"{p}:7", {"a": "last"}, None),
    ]
    with pytest.raises(DataError) as e:
        read_rows(str(p))
    assert str(e.value) == f"{p}:3: not valid JSON (Expecting ',' delimiter, column 9)"


def test_json_list_locations_pretty_printed(tmp_path):
    p = tmp_path / "r.json"
    p.write_text('[\n  {\n    "a": "1",\n    "b": "[x, {y}]"\n  },\n\n  [1],\n  {"a": "2"}, {"a": "3"}\n]\n')
    assert read_source(str(p)).records == [
        Record(f"{p}:2", {"a": "1", "b": "[x, {y}]"}, None),
        Record(f"{p}:7", None, "not a JSON object (got list)"),
        Record(f"{p}:8", {"a": "2"}, None),
        Record(f"{p}:8", {"a": "3"}, None),
    ]
    w = tmp_path / "w.json"
    w.write_text('{\n  "data": "not this",\n  "x": {"data": [5]},\n  "data": [\n    {"a": "1"},\n    7\n  ]\n}')
    assert read_source(str(w)).records == [Record(f"{w}:5", {"a": "1"}, None),
                                           Record(f"{w}:6", None, "not a JSON object (got number)")]


def test_csv_multiline_field_locations_and_bad_records(tmp_path):
    p = tmp_path / "r.csv"
    p.write_bytes(b'\xef\xbb\xbfa,b\n'
                  b'1,"two\nlines"\n'
                  b"\n"
                  b"3,4,5\n"
                  b"\xff\xfe,6\n"
                  b"7\n"
                  b"8,9")
    assert read_source(str(p)).records == [
        Record(f"{p}:2", {"a": "1", "b": "two\nlines"}, None),
        Record(f"{p}:5", None, "expected 2 fields (header: a, b), got 3"),
        Record(f"{p}:6", None, "undecodable bytes (not UTF-8)"),
        Record(f"{p}:7", None, "expected 2 fields (header: a, b), got 1"),
        Record(f"{p}:8", {"a": "8", "b": "9"}, None),
    ]
    t = tmp_path / "r.tsv"
    t.write_bytes(b"a\tb\nx,y\t\xc3\xa9\nz\t\xff\n")
    assert read_source(str(t)).records == [Record(f"{t}:2", {"a": "x,y", "b": "é"}, None),
                                           Record(f"{t}:3", None, "undecodable bytes (not UTF-8)")]


def _err(spec, **kw):
    with pytest.raises(DataError) as e:
        read_source(str(spec), **kw)
    return str(e.value)


def test_whole_source_errors(tmp_path):
    missing = tmp_path / "missing.jsonl"
    assert _err(missing) == f"data.path: no such file: {missing}"
    assert _err(missing, key="data.val_path") == f"data.val_path: no such file: {missing}"
    assert _err("./rel/none") == "data.path: no such file: rel/none"
    assert _err("a/b/c") == "data.path: no such file: a/b/c"
    assert _err("notes.txt") == "data.path: no such file: notes.txt"
    with pytest.raises(DataError, match="no such file"):
        source_fingerprint(str(missing))

    txt = tmp_path / "notes.txt"
    txt.write_text("hi")
    assert _err(txt) == (f"data.path: {txt}: unsupported file type '.txt' (supported: .json, .jsonl, .csv, .tsv, "
                         ".parquet, .json.gz, .jsonl.gz, .csv.gz, .tsv.gz, or a datasets save_to_disk folder)")
    pgz = tmp_path / "x.parquet.gz"
    pgz.write_bytes(b"x")
    assert "unsupported file type '.parquet.gz'" in _err(pgz)

    bad = tmp_path / "bad.json"
    bad.write_text('[\n  {"a": 1},\n  {"a": 2\n]\n')
    assert _err(bad) == f"data.path: {bad}:4: not valid JSON (Expecting ',' delimiter)"
    undec = tmp_path / "undec.json"
    undec.write_bytes(b'[\n {"a": 1},\n {"a": "\xff"}\n]')
    assert _err(undec) == f"data.path: {undec}:3: undecodable bytes (not UTF-8)"
    obj = tmp_path / "obj.json"
    obj.write_text('{"a": [1]}')
    assert _err(obj) == (f'data.path: {obj}: expected a JSON list of objects (or {{"data": [...]}}), '
                         "got an object without a 'data' list")
    num = tmp_path / "num.json"
    num.write_text("3")
    assert _err(num).endswith("got number")

    badgz = tmp_path / "bad.jsonl.gz"
    badgz.write_bytes(b"not gzip at all")
    assert _err(badgz).startswith(f"data.path: {badgz}: not a valid gzip file (")
    with pytest.raises(DataError, match="not a valid gzip file"):
        source_fingerprint(str(badgz))

    for name, content in [("e.jsonl", b""), ("e.json", b"  \n"), ("l.json", b"[]"), ("e.csv", b""),
                          ("h.csv", b"a,b\n"), ("b.jsonl", b"\n\n"), ("d.json", b'{"data": []}')]:
        p = tmp_path / name
        p.write_bytes(content)
        assert _err(p, key="data.val_path") == f"data.val_path: {p} holds no rows", name

    for head, why in [(b"a,,c\n1,2,3\n", "an empty column name"), (b"a,b,a\n1,2,3\n", "duplicate column names (a)")]:
        p = tmp_path / "head.csv"
        p.write_bytes(head)
        assert _err(p) == f"data.path: {p}:1: header row has {why}; the first line must name the columns"

    plain = tmp_path / "plain_folder"
    plain.mkdir()
    assert _err(plain) == (f"data.path: {plain} is a folder but not a datasets save_to_disk folder "
                           "(no dataset_dict.json or state.json)")
    badpq = tmp_path / "bad.parquet"
    badpq.write_bytes(b"PAR1 nope")
    assert _err(badpq).startswith(f"data.path: {badpq}: cannot read parquet (")


def test_hub_name_offline_fails_fast_in_one_line(monkeypatch):
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    before = datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE
    t0 = time.monotonic()
    with pytest.raises(DataError) as e:
        read_source("nosuch-owner/nosuch-dataset-xyz")
    assert time.monotonic() - t0 < 5
    msg = str(e.value)
    assert msg.startswith("data.path: cannot load hub dataset 'nosuch-owner/nosuch-dataset-xyz' (offline or not found: ")
    assert msg.endswith("); use a local file or a save_to_disk folder") and "\n" not in msg
    with pytest.raises(DataError, match="cannot load hub dataset 'plainname'"):
        source_fingerprint("plainname", key="data.val_path")
    # the library flags were only switched for the call
    assert (datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE) == before


def test_fingerprint_follows_content_not_name(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_bytes(_jsonl(ROWS))
    b.write_bytes(_jsonl(ROWS))
    fa = read_source(str(a)).fingerprint
    assert fa == read_source(str(b)).fingerprint == source_fingerprint(str(b))
    b.write_bytes(_jsonl(ROWS).replace(b'"5"', b'"6"'))
    assert read_source(str(b)).fingerprint == source_fingerprint(str(b)) != fa
    c = tmp_path / "c.csv"
    c.write_bytes(_delimited(ROWS, ","))
    fc = source_fingerprint(str(c))
    c.write_bytes(_delimited(ROWS, ",").replace(b"5", b"6"))
    assert source_fingerprint(str(c)) == read_source(str(c)).fingerprint != fc


def test_save_to_disk_fingerprint_follows_content(tmp_path):
    import datasets

    for name, rows in [("s1", ROWS), ("s2", ROWS), ("s3", ROWS[:2])]:
        datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / name))
    f1, f2, f3 = (source_fingerprint(str(tmp_path / n)) for n in ("s1", "s2", "s3"))
    assert f1 == f2 != f3 and f3 == read_source(str(tmp_path / "s3")).fingerprint


def test_read_rows_wrapper(sources, tmp_path):
    spec = next(s for s in sources if s.endswith("x.csv"))
    rows, fp = read_rows(spec)
    assert rows == ROWS and fp == read_source(spec).fingerprint
    p = tmp_path / "r.csv"
    p.write_text("a,b\n1,2\n3\n")
    with pytest.raises(DataError) as e:
        read_rows(str(p), key="data.val_path")
    assert str(e.value) == f"{p}:3: expected 2 fields (header: a, b), got 1"
