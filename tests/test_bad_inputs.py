"""The bad-input corpus and the security cases: each gives one clear line and a non-zero status, and
leaves nothing behind that a later command would take for valid output."""
import json
import os
import pickle
import subprocess
import textwrap

import pytest
from conftest import compose, run_cli

from ftctl.train import checkpoint
from ftctl.train.loop import train

TINY = ["model=tiny_llama", "data.limit=16", "trainer.batch_size=4", "trainer.eval_every=0"]


def _one_line(r):
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    return lines[0]


@pytest.mark.parametrize("override, status, expect", [
    ("peft.r=0", 2, "peft.r=0 must be > 0"),
    ("trainer.lr=-1e-4", 2, "trainer.lr=-0.0001 must be > 0"),
    ("trainer.batch_size=0", 2, "trainer.batch_size=0 must be > 0"),
    ("trainer.grad_accum=-2", 2, "trainer.grad_accum=-2 must be > 0"),
    ("peft.dropout=1.5", 2, "peft.dropout=1.5 must be in [0, 1)"),
    ("data.val_fraction=2", 2, "data.val_fraction=2.0 must be in [0, 1)"),
    ("trainer.on_nan=ignore", 2, "trainer.on_nan='ignore' is not allowed; choose one of: stop, skip"),
    ("trainer.epochs=abc", 2, "trainer.epochs: Value 'abc' of type 'str' could not be converted to Float"),
    ("model.path=/no/such/model", 2, "model.path=/no/such/model: no such model folder"),
    ("data.path=/no/such/rows.jsonl", 2, "data.path: no such file: /no/such/rows.jsonl"),
    ("resume=/no/such/ckpt", 2, "resume=/no/such/ckpt: no such checkpoint folder"),
])
def test_bad_values_one_line_and_status(tmp_path, override, status, expect):
    out = tmp_path / "run"
    r = run_cli("train", *TINY, override, f"output_dir={out}")
    assert r.returncode == status and expect in _one_line(r)
    assert not (out / "manifest.json").exists()


@pytest.mark.parametrize("content, expect", [
    (b'{"instruction": "a", "output": "b"}\n{"instruction": "c", "output"', "rows.jsonl:2: not valid JSON"),
    (b'[{"instruction": "a", "output": "b"},', "rows.jsonl:1: not valid JSON"),
    (b'\xff\xfe\x00garbage', "rows.jsonl:1: undecodable bytes"),
    (b'{"instruction": "a", "output": 5}\n', "rows.jsonl:1: field 'output' must be a string (got int)"),
    (b'["just", "strings"]\n', "rows.jsonl:1: not a JSON object"),
    (b'', "holds no rows"),
])
def test_malformed_data_files(tmp_path, content, expect):
    f = tmp_path / "rows.jsonl"
    f.write_bytes(content)
    out = tmp_path / "run"
    r = run_cli("train", *TINY, "data=alpaca_file", f"data.path={f}", f"output_dir={out}")
    assert r.returncode == 2 and expect in _one_line(r)
    assert not out.exists()


def test_output_dir_that_cannot_be_written(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    r = run_cli("train", *TINY, "trainer.max_steps=1", f"output_dir={blocker / 'run'}")
    assert r.returncode == 2 and f"output_dir {blocker / 'run'}: cannot write there" in _one_line(r)


def test_full_disk_leaves_no_half_checkpoint(tmp_path):
    """A 1 MiB tmpfs as the output directory: the run fails cleanly when the disk fills up."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True)
    if ok.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to simulate a full disk here: {ok.stderr.decode().strip()}")
    try:
        out = mnt / "run"
        # full fine-tuning of tiny_llama writes ~40 MB per checkpoint: far over 1 MiB
        r = run_cli("train", *TINY, "peft=full", "trainer.max_steps=2", "trainer.save_every=1", f"output_dir={out}")
        assert r.returncode != 0
        line = _one_line(r)
        assert "No space left on device" in line, line
        ck = out / "checkpoints"
        leftovers = list(ck.iterdir()) if ck.is_dir() else []
        assert leftovers == [], leftovers  # no half-written checkpoint, not even a temporary folder
        assert not (out / "model").exists()
        assert json.loads((out / "manifest.json").read_text())["status"] == "failed"
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_checkpoint_of_another_model_is_refused(tmp_path):
    cfg, choices = compose(*TINY, "trainer.max_steps=1", "peft.r=4", f"output_dir={tmp_path / 'r4'}")
    out = train(cfg, choices)
    ck = out / "checkpoints" / "step-000001"
    r = run_cli("train", *TINY, "trainer.max_steps=2", "peft.r=8", f"output_dir={tmp_path / 'r8'}", f"resume={ck}")
    assert r.returncode == 2
    assert "does not match this model/method" in _one_line(r) and "of another shape" in r.stderr


# ---------------------------------------------------------------------------- security
def test_target_in_a_recipe_is_refused(tmp_path):
    d = tmp_path / "recipes"
    d.mkdir()
    (d / "evil.yaml").write_text(textwrap.dedent("""\
        # @package _global_
        description: tries to instantiate
        peft:
          target_modules:
            _target_: os.system
            command: touch /tmp/ftctl-pwned
        """))
    r = run_cli("train", "recipe=evil", env={"FTCTL_RECIPES": str(d)})
    assert r.returncode == 2
    assert f"{d / 'evil.yaml'}:5: peft.target_modules._target_: refused" in _one_line(r)
    r = run_cli("train", "+_target_=os.system")
    assert r.returncode == 2 and "_target_" in _one_line(r)


def test_pickled_code_in_a_checkpoint_is_not_run(tmp_path):
    cfg, choices = compose(*TINY, "trainer.max_steps=1", f"output_dir={tmp_path / 'run'}")
    out = train(cfg, choices)
    ck = out / "checkpoints" / "step-000001"
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (ck / "optimizer.pt").write_bytes(pickle.dumps(Evil(), protocol=2))  # the protocol torch.save writes
    # rewrite the sizes and checksums so the checkpoint looks complete: only the loader can refuse it
    meta = json.loads((ck / "checkpoint.json").read_text())
    meta["files"]["optimizer.pt"] = {"bytes": (ck / "optimizer.pt").stat().st_size,
                                     "sha256": checkpoint.sha256_file(ck / "optimizer.pt")}
    (ck / "checkpoint.json").write_text(json.dumps(meta))
    r = run_cli("train", *TINY, "trainer.max_steps=2", f"output_dir={tmp_path / 'next'}", f"resume={ck}")
    line = _one_line(r)
    assert r.returncode == 2 and "refusing to load pickled objects" in line and "it names posix.system" in line
    assert not marker.exists()


def test_trust_remote_code_is_off_by_default_and_warns_when_on(tmp_path):
    cfg, _ = compose(*TINY)
    assert cfg.model.trust_remote_code is False
    r = run_cli("train", *TINY, "trainer.max_steps=1", "model.trust_remote_code=true", f"output_dir={tmp_path / 'r'}")
    assert r.returncode == 0 and "model.trust_remote_code=true runs Python code" in r.stderr


def test_eval_names_cannot_leave_the_run_directory(tmp_path):
    cfg, choices = compose(*TINY, "trainer.max_steps=1", f"output_dir={tmp_path / 'run'}")
    out = train(cfg, choices)
    r = run_cli("eval", "exact_match", f"run={out}", "name=../../escape")
    assert r.returncode == 2 and "name='../../escape'" in _one_line(r)
    assert not (tmp_path / "escape.json").exists()


def test_jinja_templates_render_sandboxed():
    from ftctl.data.jinja import render
    from ftctl.core.errors import DataError

    assert render("Summarize: {{ dialogue }}", {"dialogue": "#Person1#: hi"}) == "Summarize: #Person1#: hi"
    # row fields named like render's own parameters are plain values
    assert render("{{ source }}/{{ where }}", {"source": "a", "where": "b"}) == "a/b"
    hostile = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(DataError, match="refused by the template sandbox"):
        render(hostile, {}, where="recipes/x.yaml")
    with pytest.raises(DataError, match="refused by the template sandbox"):
        render("{{ cycler.__init__.__globals__.os.system('touch /tmp/ftctl-pwned') }}", {})
    with pytest.raises(DataError, match="'summary' is undefined"):
        render("{{ summary }}", {})


def test_adapter_on_the_wrong_base_is_refused(tmp_path):
    from ftctl.models import load as models

    cfg, choices = compose(*TINY, "trainer.max_steps=1", f"output_dir={tmp_path / 'run'}")
    out = train(cfg, choices)
    man = json.loads((out / "manifest.json").read_text())
    man["model_path"] = str(models.resolve("builtin:smollm2_135m"))  # a base the adapter was not trained on
    (out / "manifest.json").write_text(json.dumps(man))
    r = run_cli("eval", "exact_match", f"run={out}", "limit=1")
    assert r.returncode == 2
    line = _one_line(r)
    assert f"adapter {out / 'adapter'} does not fit the base model {man['model_path']}" in line
    assert not (out / "eval").exists()
