"""The hostile-input corpus of the hardening issue: a recipe file is untrusted data (no Hydra settings, no
resolvers, no foreign defaults), a folder the user points at is theirs (ftctl deletes only what it wrote), and
a run directory has one writer (an OS lock). Each case is a real command; each refusal is one line, exit 2."""
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import ROOT, compose, run_cli

from ftctl.core import lock
from ftctl.train.loop import train

TINY = ["model=tiny_llama", "data.limit=16", "trainer.batch_size=4", "trainer.eval_every=0", "trainer.max_steps=1",
        "logging.plots=false"]


def _one_line(r):
    lines = [ln for ln in r.stderr.splitlines() if ln.strip() and not ln.startswith("ftctl: note:")]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    return lines[0]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("hardening") / "run"
    cfg, choices = compose(*TINY, f"output_dir={out}")
    train(cfg, choices)
    return out


# ----------------------------------------------------------------------------- 1. recipe-borne Hydra settings
HOSTILE_RECIPES = {
    # the case: env_set (LD_PRELOAD), a callback Hydra's blocklist misses, an absolute output_subdir
    "hydra_section": ("""\
        # @package _global_
        trainer:
          max_steps: 1
        hydra:
          job:
            env_set:
              LD_PRELOAD: {d}/evil.so
          output_subdir: {d}/escaped
          callbacks:
            copy:
              _target_: shutil.copyfile
              src: /etc/hostname
              dst: {d}/copied
        """, "hydra: refused; a recipe may not set Hydra's settings"),
    "package_hydra": ("""\
        # @package hydra
        output_subdir: {d}/escaped
        """, "'# @package hydra' refused"),
    "defaults_hydra_group": ("""\
        # @package _global_
        defaults:
          - override /model: tiny_llama
          - override hydra/job_logging: default
        """, "defaults entry 'override hydra/job_logging: default' refused"),
    "defaults_other_file": ("""\
        # @package _global_
        defaults:
          - package_hydra
        """, "defaults entry 'package_hydra' refused"),
    "defaults_package": ("""\
        # @package _global_
        defaults:
          - /model@hydra.job: tiny_llama
        """, "refused; a recipe may choose only options of ftctl's groups"),
    "yaml_alias_bomb": ("""\
        # @package _global_
        a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]
        b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]
        c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]
        d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]
        e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]
        f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]
        g: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f]
        """, "YAML alias *a refused in a recipe"),
    "env_resolver": ("""\
        # @package _global_
        logging:
          run_name: ${{oc.env:FTCTL_TEST_SECRET}}
        """, "logging.run_name: '${oc.env:...}' refused"),
    "nested_resolver": ("""\
        # @package _global_
        logging:
          project: x-${{oc.select:a,${{oc.env:HOME}}}}
        """, "refused; a recipe file may not call resolvers"),
}


@pytest.mark.parametrize("name", sorted(HOSTILE_RECIPES))
def test_a_recipe_cannot_reach_hydra_or_the_environment(tmp_path, name):
    d = tmp_path / "shared"
    d.mkdir()
    for n, (text, _) in HOSTILE_RECIPES.items():
        (d / f"{n}.yaml").write_text(textwrap.dedent(text).format(d=d))
    _, expect = HOSTILE_RECIPES[name]
    for mode in (["-m"], []):
        r = run_cli("train", *mode, f"recipe={d / name}.yaml", *TINY, f"output_dir={tmp_path / 'run'}", cwd=tmp_path)
        line = _one_line(r)
        assert r.returncode == 2 and expect in line and f"{d / name}.yaml:" in line, line
    assert sorted(p.name for p in d.iterdir()) == sorted(f"{n}.yaml" for n in HOSTILE_RECIPES)  # nothing written
    assert not (tmp_path / "run").exists() and not (tmp_path / "multirun").exists()


@pytest.mark.parametrize("override", ["hydra.job.env_set.LD_PRELOAD=/tmp/x.so", "hydra.output_subdir=/tmp/x",
                                      "+hydra.callbacks.c._target_=shutil.rmtree", "hydra.searchpath=[file:///tmp]",
                                      "hydra.run.dir=/tmp/x", "~hydra.sweeper.params", "hydra/job_logging=default",
                                      "+unknown.key=1", "+trainer.lrr=1"])
def test_the_command_line_takes_only_the_allowed_hydra_settings_and_known_keys(override):
    from ftctl.cli import check_command
    from ftctl.core.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        check_command(["train", "-m", "model=tiny_llama", override])
    assert ("refused" in str(e.value) or "unknown key" in str(e.value)) and override in str(e.value)


def test_the_allowed_hydra_settings_still_compose():
    from ftctl.cli import check_command

    check_command(["train", "-m", "model=tiny_llama", "peft.r=2,4", "hydra/sweeper=optuna", "hydra.sweeper.n_trials=2",
                   "hydra/sweeper/sampler=random", "hydra/launcher=joblib", "hydra.launcher.n_jobs=1",
                   "hydra.sweep.dir=/tmp/somewhere", "+data.columns.instruction=q"])


def test_hydra_sweep_dir_is_honoured_and_must_be_new(tmp_path):
    d = tmp_path / "my sweep"
    r = run_cli("train", "-m", *TINY, "trainer.save_every=0", "peft.r=2", f"hydra.sweep.dir={d}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((d / "0" / "trial.json").read_text())["status"] == "finished"
    assert not (tmp_path / "multirun").exists()
    r = run_cli("train", "-m", *TINY, "peft.r=2", f"hydra.sweep.dir={d}", cwd=tmp_path)
    assert r.returncode == 2 and "already exists and is not an empty folder" in _one_line(r)


def test_a_network_address_from_a_recipe_is_said_before_the_run(tmp_path):
    from ftctl.config.compose import recipe_destinations

    (tmp_path / "uri.yaml").write_text(textwrap.dedent("""\
        # @package _global_
        logging:
          mlflow_tracking_uri: http://tracking.example:5000
          project: p
        """))
    found = recipe_destinations([f"recipe={tmp_path / 'uri.yaml'}"])
    assert len(found) == 1 and found[0].startswith("logging.mlflow_tracking_uri=http://tracking.example:5000 (set by")
    # given on the command line, the address is the user's: nothing to say
    assert recipe_destinations([f"recipe={tmp_path / 'uri.yaml'}", "logging.mlflow_tracking_uri=http://x:1"]) == []
    r = run_cli("train", f"recipe={tmp_path / 'uri.yaml'}", *TINY, "logging.report_to=[]", "trainer.save_every=0",
                f"output_dir={tmp_path / 'run'}")
    assert r.returncode == 0, r.stderr[-2000:]
    said = r.stdout.index("http://tracking.example:5000")
    assert said < r.stdout.index("ftctl train recipe=uri")  # before the run starts


# ----------------------------------------------------------------------------- 2. the user's folders
def test_a_folder_that_is_not_a_run_is_never_taken(tmp_path):
    mine = tmp_path / "mine"
    (mine / "adapter").mkdir(parents=True)
    (mine / "config.yaml").write_text("my own config\n")
    (mine / "adapter" / "notes.txt").write_text("mine")
    for extra in ([], ["overwrite=true"], ["resume=true"]):
        r = run_cli("train", *TINY, f"output_dir={mine}", *extra)
        assert r.returncode == 2 and "is not empty and is not an ftctl run (it holds adapter, config.yaml)" in \
            _one_line(r)
    assert (mine / "config.yaml").read_text() == "my own config\n" and (mine / "adapter" / "notes.txt").is_file()
    assert sorted(p.name for p in mine.iterdir()) == ["adapter", "config.yaml"]


def test_a_checkpoints_folder_does_not_make_a_run(tmp_path):
    f = tmp_path / "work"
    (f / "checkpoints" / "mine").mkdir(parents=True)
    (f / "model").mkdir()
    (f / "model" / "weights.bin").write_text("w")
    r = run_cli("train", *TINY, f"output_dir={f}", "overwrite=true")
    assert r.returncode == 2 and "is not an ftctl run" in _one_line(r)
    assert (f / "model" / "weights.bin").is_file() and (f / "checkpoints" / "mine").is_dir()


def test_overwrite_removes_only_what_ftctl_wrote_and_never_follows_a_link(tmp_path):
    out = tmp_path / "run"
    cfg, choices = compose(*TINY, "trainer.save_every=1", f"output_dir={out}")
    train(cfg, choices)
    (out / "notes.txt").write_text("the user's")
    (out / "checkpoints" / "my-copy").mkdir()  # not ftctl's: no checkpoint.json
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("outside the run")
    shutil.rmtree(out / "adapter")
    (out / "adapter").symlink_to(outside, target_is_directory=True)
    cfg, choices = compose(*TINY, "trainer.save_every=1", f"output_dir={out}", "overwrite=true")
    train(cfg, choices)
    assert (out / "notes.txt").read_text() == "the user's" and (out / "checkpoints" / "my-copy").is_dir()
    assert (outside / "keep.txt").is_file()  # the link was removed, not followed
    assert (out / "adapter").is_dir() and not (out / "adapter").is_symlink()
    assert json.loads((out / "manifest.json").read_text())["status"] == "finished"


def test_a_failed_set_up_leaves_a_folder_ftctl_can_take_again(tmp_path):
    out = tmp_path / "run"
    r = run_cli("train", *TINY, "peft.target_modules=[no_such_module]", f"output_dir={out}")
    assert r.returncode == 2 and not (out / "manifest.json").exists()  # nothing a later command would trust
    assert (out / "train.log").is_file() and (out / lock.LOCK_FILE).is_file()
    (out / "notes.txt").write_text("the user's")
    r = run_cli("train", *TINY, f"output_dir={out}")  # its own leftovers: no overwrite=true needed
    assert r.returncode == 0, r.stderr[-2000:]
    assert (out / "notes.txt").read_text() == "the user's"
    assert json.loads((out / "manifest.json").read_text())["status"] == "finished"


# ----------------------------------------------------------------------------- 3. merge and quantize outputs
def test_merge_and_quantize_never_write_over_their_source(finished_run, tmp_path):
    before = sorted(p.name for p in finished_run.iterdir())
    adapter = (finished_run / "adapter" / "adapter_model.safetensors").read_bytes()
    for output, what in [(finished_run, "is the folder it is made from"),
                         (finished_run / "adapter", "is inside the folder it is made from"),
                         (finished_run.parent, "contains the folder it is made from")]:
        r = run_cli("merge", f"run={finished_run}", f"output={output}", "overwrite=true")
        assert r.returncode == 2 and what in _one_line(r)
    model = json.loads((finished_run / "manifest.json").read_text())["model_path"]
    r = run_cli("quantize", f"model={model}", "method=int8_weight_only", f"output={Path(model).parent}",
                "overwrite=true")
    assert r.returncode == 2 and "contains the folder it is made from" in _one_line(r)
    assert sorted(p.name for p in finished_run.iterdir()) == before
    assert (finished_run / "adapter" / "adapter_model.safetensors").read_bytes() == adapter


# ----------------------------------------------------------------------------- 5. one writer per run
def test_a_second_writer_is_refused_naming_the_pid(finished_run):
    lock.acquire(finished_run, "a test holding the run")
    try:
        for args in (["train", *TINY, f"output_dir={finished_run}", "resume=true", "trainer.max_steps=2"],
                     ["train", *TINY, f"output_dir={finished_run}", "overwrite=true"],
                     ["merge", f"run={finished_run}"]):
            r = run_cli(*args)
            assert r.returncode == 2, r.stderr[-2000:]
            assert f"is in use by pid {os.getpid()} (a test holding the run)" in _one_line(r)
    finally:
        lock.release(finished_run)
    assert lock.holder(finished_run) is None


def test_a_live_run_has_one_writer_and_its_lock_dies_with_it(tmp_path):
    out = tmp_path / "live"
    args = [*TINY, "trainer.max_steps=400", "data.limit=64", "trainer.save_every=2", f"output_dir={out}"]
    env = {k: v for k, v in os.environ.items() if k != "FTCTL_DEBUG"}
    first = subprocess.Popen([sys.executable, "-m", "ftctl.cli", "train", *args], cwd=ROOT, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while not list((out / "checkpoints").glob("step-*/checkpoint.json")) and time.time() < deadline:
            assert first.poll() is None, "the first run ended early"
            time.sleep(0.5)
        r = run_cli("train", *args, "resume=true")
        assert r.returncode == 2 and f"is in use by pid {first.pid} (ftctl train)" in _one_line(r)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert lock.holder(out) is None  # the kernel released it with the process
    r = run_cli("train", *[a for a in args if not a.startswith("trainer.max_steps")], "trainer.max_steps=3",
                "resume=true")
    assert r.returncode == 0, r.stderr[-2000:]


# ----------------------------------------------------------------------------- 6. remote code
def test_merge_never_takes_trust_remote_code_from_the_saved_config(finished_run, tmp_path):
    manifest = json.loads((finished_run / "manifest.json").read_text())
    base = tmp_path / "base"
    shutil.copytree(manifest["model_path"], base)
    config = json.loads((base / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (base / "config.json").write_text(json.dumps(config))
    marker = tmp_path / "PWNED"
    (base / "evil.py").write_text(textwrap.dedent(f"""\
        import pathlib
        pathlib.Path({str(marker)!r}).write_text("remote code ran")
        from transformers import LlamaConfig, LlamaForCausalLM
        class EvilConfig(LlamaConfig):
            pass
        class EvilModel(LlamaForCausalLM):
            config_class = EvilConfig
        """))
    run = tmp_path / "run"
    shutil.copytree(finished_run, run, ignore=shutil.ignore_patterns(lock.LOCK_FILE))
    (run / "manifest.json").write_text(json.dumps({**manifest, "model_path": str(base)}))
    text = (run / "config.yaml").read_text()
    assert "trust_remote_code: false" in text
    (run / "config.yaml").write_text(text.replace("trust_remote_code: false", "trust_remote_code: true"))
    r = run_cli("merge", f"run={run}", f"output={tmp_path / 'merged'}")
    assert r.returncode == 0, r.stderr[-2000:]
    assert not marker.exists()
    assert "stays off here (a saved file does not turn it on)" in r.stderr


# ----------------------------------------------------------------------------- late failures, now one line
@pytest.mark.parametrize("kind", ["garbage", "pickle"])
def test_a_dummy_or_pickled_adapter_is_one_line_and_never_unpickled(finished_run, tmp_path, kind):
    import pickle

    run = tmp_path / "run"
    shutil.copytree(finished_run, run, ignore=shutil.ignore_patterns(lock.LOCK_FILE))
    marker = tmp_path / "PICKLED"
    if kind == "garbage":
        (run / "adapter" / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
        expect = "adapter_model.safetensors is not a safetensors file"
    else:
        (run / "adapter" / "adapter_model.safetensors").unlink()

        class Payload:
            def __reduce__(self):
                return (os.system, (f"touch {marker}",))
        (run / "adapter" / "adapter_model.bin").write_bytes(pickle.dumps(Payload()))
        expect = "adapter_model.bin holds pickled objects other than tensors and plain data"
    for args in (["merge", f"run={run}", f"output={tmp_path / 'merged'}"], ["eval", f"run={run}", "perplexity"]):
        r = run_cli(*args)
        assert r.returncode == 2 and expect in _one_line(r), r.stderr[-2000:]
    assert not marker.exists() and not (tmp_path / "merged").exists()


def test_a_chat_template_from_a_recipe_cannot_loop_for_ever(tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "yo"}]}) + "\n")
    (tmp_path / "bomb.yaml").write_text(textwrap.dedent("""\
        # @package _global_
        defaults:
          - override /template: chat
        template:
          chat_template: "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}"
        """))
    r = run_cli("train", f"recipe={tmp_path / 'bomb.yaml'}", *TINY, f"data.path={rows}", "data.val_fraction=0",
                "data.cache=false", f"output_dir={tmp_path / 'run'}", timeout=120)
    assert r.returncode == 2 and "template.chat_template: rendering stopped: took over 5 s" in _one_line(r)
