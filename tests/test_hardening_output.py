"""A file on disk is untrusted data, and a run has one writer: ftctl runs, report and sweep report with
malformed run folders; terminal escape sequences from data or a model; report and generate output= that is a
folder, cannot be written or already exists; eval and report against a run another process holds."""
import json
import os
from pathlib import Path

import pytest
from conftest import run_cli, write_jsonl

from ftctl.core import lock
from ftctl.core.console import printable

WIDE = {"COLUMNS": "1000"}  # the tables are not folded, so a cell reads as one string
TINY = ["model=tiny_llama", "data.limit=16", "trainer.batch_size=4", "trainer.eval_every=0", "trainer.max_steps=1"]


def _run(d: Path, manifest, metrics=None, config=True) -> Path:
    d.mkdir(parents=True)
    (d / "manifest.json").write_text(manifest if isinstance(manifest, str) else json.dumps(manifest))
    if metrics is not None:
        (d / "metrics.jsonl").write_text(metrics)
    if config:
        (d / "config.yaml").write_text("model:\n  name: tiny_llama\ntrainer:\n  lr: 0.001\n")
    return d


GOOD = {"status": "finished", "recipe": "demo", "total_steps": 1, "final_train_loss": 1.5, "peft_method": "lora"}


def _malformed(root: Path) -> dict:
    """One good run and one of each kind of malformed run under root; {name: folder}."""
    return {
        "good": _run(root / "good", GOOD, '{"step": 1, "loss": 1.5}\n'),
        "list": _run(root / "list", "[1, 2, 3]"),
        "types": _run(root / "types", {"status": 5, "trainable_params": "x", "total_params": 10, "eval": "zz"}),
        "metrics": _run(root / "metrics", {"status": "finished"}, '[1, 2]\n3\n{"step": 1, "loss": 2}\n'),
        "notjson": _run(root / "notjson", "{not json"),
        "markup": _run(root / "markup", {**GOOD, "recipe": "a[/x]b", "peft_method": "[bold red]loud",
                                         "error": "boom [/x]"}),
    }


# ----------------------------------------------------------------------------- printable
def test_printable_shows_control_characters_escaped():
    assert printable("say \x1b]0;pwned\x07 hi \x1b[2J") == "say \\x1b]0;pwned\\x07 hi \\x1b[2J"
    assert printable("a\nb\tc") == "a\nb\tc"  # newlines and tabs stay
    assert printable("\r\x7f\x9b\x00") == "\\x0d\\x7f\\x9b\\x00"  # carriage return, DEL, the C1 CSI, NUL
    assert printable("ünïcödé 🙂 [b]") == "ünïcödé 🙂 [b]"
    assert printable(5) == "5"


# ----------------------------------------------------------------------------- 1. malformed run folders
def test_runs_lists_a_malformed_run_as_unreadable_and_the_others_as_usual(tmp_path):
    runs = _malformed(tmp_path / "runs")
    r = run_cli("runs", tmp_path / "runs", env=WIDE)
    assert r.returncode == 0, r.stderr
    assert "6 runs" in r.stdout
    lines = {name: next(ln for ln in r.stdout.splitlines() if str(d) + " " in ln) for name, d in runs.items()}
    assert "finished" in lines["good"] and "1/1" in lines["good"] and "1.5" in lines["good"]
    assert "unreadable" in lines["list"] and "manifest.json holds a JSON list, not an object" in lines["list"]
    assert "unreadable" in lines["types"] and "status is 5" in lines["types"]
    assert "unreadable" in lines["metrics"] and "metrics.jsonl line 1" in lines["metrics"]
    assert "unreadable" in lines["notjson"] and "not valid JSON" in lines["notjson"]
    # markup in a value is shown as written, not read as markup
    assert "a[/x]b" in lines["markup"] and "[bold red]loud" in lines["markup"]
    r = run_cli("runs", tmp_path / "runs", "status=finished", env=WIDE)
    assert r.returncode == 0, r.stderr
    assert "2 runs" in r.stdout  # good and markup; the unreadable ones have no status


def test_runs_compare_with_a_malformed_run_is_one_line(tmp_path):
    runs = _malformed(tmp_path / "runs")
    r = run_cli("runs", "compare", runs["good"], runs["list"])
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "manifest.json holds a JSON list" in r.stderr
    (runs["types"] / "config.yaml").write_text("model: [unclosed\n")
    r = run_cli("runs", "compare", runs["good"], runs["types"])
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    r = run_cli("runs", "compare", runs["good"], runs["markup"], env=WIDE)
    assert r.returncode == 0, r.stderr
    assert "a[/x]b" in r.stdout and "[bold red]loud" in r.stdout


@pytest.mark.parametrize("name, says", [("list", "manifest.json holds a JSON list, not an object"),
                                        ("types", "status is 5"), ("metrics", "metrics.jsonl line 1"),
                                        ("notjson", "not valid JSON")])
def test_report_of_a_malformed_run_is_one_line(tmp_path, name, says):
    runs = _malformed(tmp_path / "runs")
    r = run_cli("report", f"run={runs[name]}")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert says in r.stderr and "Traceback" not in r.stderr


def test_report_escapes_markup_and_html_of_values(tmp_path):
    runs = _malformed(tmp_path / "runs")
    r = run_cli("report", f"run={runs['markup']}")
    assert r.returncode == 0, r.stderr
    assert "a[/x]b" in (runs["markup"] / "report.html").read_text()


def test_sweep_report_and_sweep_page_with_malformed_trials(tmp_path):
    sweep = tmp_path / "multirun" / "demo" / "t"
    _malformed(sweep)
    (sweep / "good" / "trial.json").write_text(json.dumps({"status": "finished", "overrides": ["peft.r=4"]}))
    (sweep / "list" / "trial.json").write_text(json.dumps({"status": 3, "overrides": "peft.r=8", "metric": 7}))
    r = run_cli("sweep", "report", sweep, env=WIDE)
    assert r.returncode == 0, r.stderr
    assert "unreadable" in r.stdout and "finished" in r.stdout
    md = (sweep / "report.md").read_text()
    assert "manifest.json holds a JSON list" in md
    r = run_cli("report", f"run={sweep}", f"output={tmp_path / 'sweep.html'}")
    assert r.returncode == 0, r.stderr
    page = (tmp_path / "sweep.html").read_text()
    assert "unreadable" in page and "metrics.jsonl line 1" in page


# ----------------------------------------------------------------------------- 2. escape sequences
def test_data_preview_shows_escape_sequences_escaped(tmp_path):
    row = {"instruction": "say \x1b]0;pwned\x07 hi \x1b[2J", "input": "", "output": "ok \x1b[31mred\x9b"}
    data = write_jsonl(tmp_path / "esc.jsonl", [row] * 5)
    r = run_cli("data", "preview", "model=tiny_llama", f"data.path={data}", "n=1")
    assert r.returncode == 0, r.stderr
    assert "\x1b" not in r.stdout and "\x07" not in r.stdout and "\x9b" not in r.stdout
    assert "say \\x1b]0;pwned\\x07 hi \\x1b[2J" in r.stdout and "ok \\x1b[31mred\\x9b" in r.stdout


def test_data_preview_in_a_terminal_shows_escape_sequences_escaped(tmp_path):
    import io

    from conftest import compose
    from rich.console import Console

    from ftctl.experiments.preview import show

    row = {"instruction": "[/x] say \x1b]0;pwned\x07", "input": "", "output": "ok \x1b[2J"}
    data = write_jsonl(tmp_path / "esc.jsonl", [row] * 5)
    cfg, _ = compose("model=tiny_llama", f"data.path={data}")
    buf = io.StringIO()
    show(cfg, Console(file=buf, force_terminal=True, width=200, color_system="standard"), n=1)
    out = buf.getvalue()
    assert "]0;pwned" in out and "\x1b]0" not in out and "\x07" not in out and "\x1b[2J" not in out
    assert "\\x1b]0;pwned\\x07" in out and "[/x] say" in out


# ----------------------------------------------------------------------------- 3. report output= and read-only runs
def test_report_output_that_is_a_folder_is_one_line(tmp_path):
    runs = _malformed(tmp_path / "runs")
    r = run_cli("report", f"run={runs['good']}", f"output={tmp_path}")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert f"output={tmp_path}" in r.stderr and "folder" in r.stderr


def test_report_output_whose_parent_is_a_file_is_one_line(tmp_path):
    runs = _malformed(tmp_path / "runs")
    (tmp_path / "afile").write_text("")
    r = run_cli("report", f"run={runs['good']}", f"output={tmp_path / 'afile' / 'report.html'}")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "cannot write" in r.stderr and str(tmp_path / "afile") in r.stderr


def test_report_into_a_run_folder_it_cannot_write_is_one_line(tmp_path):
    """As root chmod cannot stop a write: plots/ that is a file stands in for a folder report cannot write in."""
    run = _malformed(tmp_path / "runs")["good"]
    (run / "plots").write_text("not a folder")
    r = run_cli("report", f"run={run}")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "cannot write" in r.stderr and "output=" in r.stderr
    r = run_cli("report", f"run={run}", f"output={tmp_path / 'elsewhere.html'}")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "elsewhere.html").is_file()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only folder; covered above by plots/ as a file")
def test_report_of_a_read_only_run_folder_is_one_line(tmp_path):
    run = _malformed(tmp_path / "runs")["good"]
    run.chmod(0o555)
    try:
        r = run_cli("report", f"run={run}")
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert "cannot write" in r.stderr and "output=" in r.stderr
        r = run_cli("report", f"run={run}", f"output={tmp_path / 'elsewhere.html'}")
        assert r.returncode == 0, r.stderr
    finally:
        run.chmod(0o755)


# ----------------------------------------------------------------------------- 4. existing output files
def test_report_refuses_to_replace_an_existing_output_file(tmp_path):
    run = _malformed(tmp_path / "runs")["good"]
    out = tmp_path / "mine.html"
    out.write_text("my notes")
    r = run_cli("report", f"run={run}", f"output={out}")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert str(out) in r.stderr and "overwrite=true" in r.stderr
    assert out.read_text() == "my notes"
    r = run_cli("report", f"run={run}", f"output={out}", "overwrite=true")
    assert r.returncode == 0, r.stderr
    assert out.read_text().startswith("<!DOCTYPE html>")
    # the report's own page in the run folder is replaced as before
    assert run_cli("report", f"run={run}").returncode == 0
    assert run_cli("report", f"run={run}").returncode == 0


def test_generate_refuses_to_replace_an_existing_output_file(tmp_path):
    run = _malformed(tmp_path / "runs")["good"]
    out = tmp_path / "gen.jsonl"
    out.write_text("keep me\n")
    r = run_cli("generate", f"run={run}", "prompt=hi", f"output={out}")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert str(out) in r.stderr and "overwrite=true" in r.stderr
    assert out.read_text() == "keep me\n"
    r = run_cli("generate", f"run={run}", "prompt=hi", f"output={tmp_path}")
    assert r.returncode == 2 and "folder" in r.stderr, r.stderr


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A real run whose model answers "hi" with escape sequences: 15 steps on rows whose answer is
    ESC[2J (clear the screen) four times, enough for tiny_llama to learn it (tens of seconds)."""
    tmp = tmp_path_factory.mktemp("hardening")
    data = write_jsonl(tmp / "esc.jsonl", [{"instruction": "hi", "input": "", "output": "\x1b[2J" * 4}] * 32)
    out = tmp / "run"
    r = run_cli("train", "model=tiny_llama", f"data.path={data}", "data.limit=16", "trainer.batch_size=4",
                "trainer.eval_every=0", "trainer.max_steps=15", "trainer.lr=0.01", "trainer.warmup_steps=0",
                f"output_dir={out}")
    assert r.returncode == 0, r.stderr[-2000:]
    return out


@pytest.mark.slow
def test_generate_overwrite_true_replaces_the_file_and_prints_model_output_escaped(trained, tmp_path):
    out = tmp_path / "gen.jsonl"
    out.write_text("old\n")
    r = run_cli("generate", f"run={trained}", "prompt=hi", "max_new_tokens=8", f"output={out}", "overwrite=true")
    assert r.returncode == 0, r.stderr[-2000:]
    row = json.loads(out.read_text().splitlines()[0])
    assert row["prompt"] == "hi" and "\x1b[2J" in row["output"]  # the file keeps the model's text as it is
    r = run_cli("generate", f"run={trained}", "prompt=hi", "max_new_tokens=8")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "\x1b" not in r.stdout and r.stdout.strip() == printable(row["output"].strip())


@pytest.mark.slow
def test_chat_prints_model_output_escaped(trained):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "ftctl.cli", "chat", f"run={trained}", "max_new_tokens=8"],
                       input="hi\n", capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "\x1b" not in r.stdout and "\\x1b[2J" in r.stdout


# ----------------------------------------------------------------------------- 5. one writer per run
@pytest.fixture
def held(tmp_path):
    run = _malformed(tmp_path / "runs")["good"]
    lock.acquire(run, "test")
    yield run
    lock.release(run)


def test_eval_refuses_a_run_another_process_holds(held):
    r = run_cli("eval", "exact_match", f"run={held}")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert f"in use by pid {os.getpid()}" in r.stderr
    assert not (held / "eval").exists()


def test_report_refuses_to_write_into_a_run_another_process_holds(held, tmp_path):
    r = run_cli("report", f"run={held}")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert f"in use by pid {os.getpid()}" in r.stderr and "output=" in r.stderr
    assert not (held / "report.html").exists() and not (held / "plots").exists()
    r = run_cli("report", f"run={held}", f"output={tmp_path / 'watch.html'}")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "watch.html").is_file()
    assert not (held / "report.html").exists() and not (held / "plots").exists()  # nothing written into the run


def test_runs_shows_who_holds_a_run(held):
    r = run_cli("runs", held.parent, env=WIDE)
    assert r.returncode == 0, r.stderr
    line = next(ln for ln in r.stdout.splitlines() if str(held) + " " in ln)
    assert f"pid {os.getpid()} (test)" in line
    assert ".ftctl.lock" not in r.stdout


@pytest.mark.slow
def test_eval_and_report_of_a_real_run_leave_no_lock_held(trained):
    r = run_cli("eval", "exact_match", f"run={trained}", "limit=2", "max_new_tokens=2")
    assert r.returncode == 0, r.stderr[-2000:]
    assert (trained / "eval" / "exact_match.json").is_file()
    r = run_cli("report", f"run={trained}")
    assert r.returncode == 0, r.stderr[-2000:]
    assert lock.holder(trained) is None
