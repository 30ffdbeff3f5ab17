"""Hardening: a recipe is untrusted input. Each bad value gets one line naming the key and the value, exit
status 2, before a model loads (the corpus of tests/test_bad_inputs.py, extended)."""
import time
from pathlib import Path

import pytest
from conftest import compose, run_cli

from ftctl.core.errors import ConfigError, DataError

TINY = ["model=tiny_llama", "data.limit=16", "trainer.batch_size=4", "trainer.eval_every=0", "trainer.max_steps=1"]
ROOT = Path(__file__).resolve().parents[1]


def _one_line(r):
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    return lines[0]


# ---------------------------------------------------------------------------- 1. values checked
@pytest.mark.parametrize("override, expect", [
    ("trainer.lr=nan", "trainer.lr=nan must be a finite number"),
    ("trainer.lr=inf", "trainer.lr=inf must be a finite number"),
    ("trainer.lr=-inf", "trainer.lr=-inf must be a finite number"),
    ("trainer.epochs=nan", "trainer.epochs=nan must be a finite number"),
    ("trainer.weight_decay=nan", "trainer.weight_decay=nan must be a finite number"),
    ("trainer.max_grad_norm=inf", "trainer.max_grad_norm=inf must be a finite number"),
    ("trainer.warmup_ratio=nan", "trainer.warmup_ratio=nan must be a finite number"),
    ("peft.dropout=nan", "peft.dropout=nan must be a finite number"),
    ("peft.loraplus_lr_ratio=inf", "peft.loraplus_lr_ratio=inf must be a finite number"),
    ("dpo.beta=nan", "dpo.beta=nan must be a finite number"),
    ("dpo.label_smoothing=nan", "dpo.label_smoothing=nan must be a finite number"),
    ("dpo.simpo_gamma=inf", "dpo.simpo_gamma=inf must be a finite number"),
    ("classify.C=nan", "classify.C=nan must be a finite number"),
    ("data.val_fraction=nan", "data.val_fraction=nan must be a finite number"),
    ("trainer.num_threads=-1", "trainer.num_threads=-1 must be >= 0"),
    ("data.limit=0", "data.limit=0 must be > 0 (null: all rows)"),
    ("data.limit=-5", "data.limit=-5 must be > 0 (null: all rows)"),
    ("trainer.eval_max_rows=0", "trainer.eval_max_rows=0 must be > 0"),
    ("trainer.eval_max_rows=-3", "trainer.eval_max_rows=-3 must be > 0"),
    ("eval.limit=0", "eval.limit=0 must be > 0 (null: all rows)"),
    ("trainer.warmup_ratio=2", "trainer.warmup_ratio=2.0 must be in [0, 1]"),
    ("trainer.warmup_ratio=-0.5", "trainer.warmup_ratio=-0.5 must be in [0, 1]"),
])
def test_bad_values_are_refused_at_composition(override, expect):
    with pytest.raises(ConfigError) as e:
        compose(*TINY, override)
    assert expect in str(e.value)
    assert "\n" not in str(e.value)


def test_values_that_stay_allowed():
    cfg, _ = compose(*TINY, "data.limit=null", "trainer.num_threads=0", "trainer.warmup_ratio=1",
                     "trainer.warmup_ratio=0", "eval.limit=null", "trainer.max_grad_norm=0")
    assert cfg.data.limit is None and cfg.trainer.num_threads == 0 and cfg.eval.limit is None


@pytest.mark.parametrize("override, expect", [
    ("trainer.lr=nan", "trainer.lr=nan must be a finite number"),
    ("data.limit=0", "data.limit=0 must be > 0"),
])
def test_bad_values_one_line_exit_2(tmp_path, override, expect):
    out = tmp_path / "run"
    r = run_cli("train", *TINY, override, f"output_dir={out}")
    assert r.returncode == 2 and expect in _one_line(r)
    assert not out.exists()


# ---------------------------------------------------------------------------- 2. ~ in paths
def test_tilde_is_expanded_in_every_path_key(tmp_path, monkeypatch):
    home = tmp_path / "home"
    (home / "ds").mkdir(parents=True)
    (home / "ds.json").write_text('{"train_batch_size": "auto"}')
    monkeypatch.setenv("HOME", str(home))
    cfg, _ = compose(*TINY, "output_dir=\"~/x\"", "data.path=\"~/rows.jsonl\"", "data.val_path=\"~/val.jsonl\"",
                     "data.test_path=\"~/test.jsonl\"", "model.adapter=\"~/run/adapter\"", "resume=\"~/ck\"",
                     "+data.mix=[{path: \"~/mix.jsonl\"}]")
    assert cfg.output_dir == f"{home}/x"
    assert cfg.data.path == f"{home}/rows.jsonl"
    assert cfg.data.val_path == f"{home}/val.jsonl" and cfg.data.test_path == f"{home}/test.jsonl"
    assert cfg.model.adapter == f"{home}/run/adapter"
    assert cfg.resume == f"{home}/ck"
    assert cfg.data.mix[0].path == f"{home}/mix.jsonl"
    cfg, _ = compose(*TINY, "model.path=\"~/ds\"", "distributed=zero2", "distributed.deepspeed_config=\"~/ds.json\"")
    assert cfg.model.path == f"{home}/ds" and cfg.distributed.deepspeed_config == f"{home}/ds.json"
    # names that are not paths stay as they are
    cfg, _ = compose(*TINY, "resume=true")
    assert cfg.resume is True and cfg.model.path == "builtin:tiny_llama"


# ---------------------------------------------------------------------------- 3. output_dir that is no run folder
@pytest.mark.parametrize("where", ["/", "home", "repo", "cwd", "cwd_dot"])
def test_output_dir_refuses_root_home_repo_and_cwd(tmp_path, monkeypatch, where):
    home = tmp_path / "home"
    home.mkdir()
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    value = {"/": "/", "home": str(home), "repo": str(ROOT), "cwd": str(cwd), "cwd_dot": "."}[where]
    with pytest.raises(ConfigError, match=r"output_dir=.*: refusing to write a run into"):
        compose(*TINY, f"output_dir={value}")
    # a subfolder of any of them is fine
    sub = {"/": "/tmp/ftctl-sub", "cwd_dot": "./sub"}.get(where, f"{value}/sub")
    cfg, _ = compose(*TINY, f"output_dir={sub}")
    assert cfg.output_dir == sub


def test_output_dir_home_via_tilde_is_refused_before_anything_is_written(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    r = run_cli("train", *TINY, "output_dir=\"~\"", env={"HOME": str(home)}, cwd=tmp_path)
    assert r.returncode == 2
    assert f"output_dir={home}: refusing to write a run into the home folder" in _one_line(r)
    assert sorted(p.name for p in home.iterdir() if p.name not in (".cache", ".config")) == []


# ---------------------------------------------------------------------------- 4. local-looking paths never go to the hub
@pytest.mark.parametrize("spec", ["mydata/rows", "./mydata/rows", "mydata/sub/rows", "~/rows", "mydata\\rows",
                                  "rows.jsonl"])
def test_mistyped_local_data_path_is_no_hub_lookup(tmp_path, monkeypatch, spec):
    from ftctl.data.sources import read_source

    (tmp_path / "mydata").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")  # were it sent to the hub, fail fast instead of retrying
    t = time.monotonic()
    with pytest.raises(DataError, match=r"^data\.path: no such file: "):
        read_source(spec, "data.path")
    assert time.monotonic() - t < 5


def test_hub_name_still_goes_to_the_hub(tmp_path, monkeypatch):
    from ftctl.data.sources import read_source

    monkeypatch.chdir(tmp_path)  # no folder named "owner" here: owner/name is a hub dataset
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError, match=r"cannot load hub dataset 'owner/name'"):
        read_source("owner/name", "data.path")


def test_mistyped_local_data_path_cli_one_line(tmp_path):
    (tmp_path / "mydata").mkdir()
    t = time.monotonic()
    r = run_cli("train", *TINY, "data=alpaca_file", "data.path=mydata/rows", f"output_dir={tmp_path / 'out'}",
                cwd=tmp_path, env={"HF_DATASETS_OFFLINE": "0"})
    assert r.returncode == 2 and "data.path: no such file: mydata/rows" in _one_line(r)
    assert time.monotonic() - t < 60  # a hub lookup retries for ~30 s before giving up


# ---------------------------------------------------------------------------- 5. templates have a render limit
NESTED = "{% for a in range(100000) %}{% for b in range(100000) %}x{% endfor %}{% endfor %}"


@pytest.mark.parametrize("source, why", [
    (NESTED, "rendering stopped"),
    ("{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}", "range() items"),
    (("{% set xs = range(1000)|list %}{% for a in xs %}{% for b in xs %}{% for c in xs %}{% endfor %}{% endfor %}"
      "{% endfor %}"), "took over"),
    ("{{ 'x' * 10000000000 }}", "over 1,000,000 characters"),
    ("{{ 10 ** 10000000000 }}", "too large a number"),
    ("{{ 'x'.center(10000000000) }}", "over 1,000,000 characters"),
    ("{% for i in range(20000) %}{{ 'y' * 100 }}{% endfor %}", "output over 1,000,000 characters"),
])
def test_template_render_is_bounded(source, why):
    from ftctl.data.jinja import render

    t = time.monotonic()
    with pytest.raises(ConfigError) as e:  # the template's fault: not skipped row by row with data.bad_rows=skip
        render(source, {}, where="template.phrasings[0]")
    assert time.monotonic() - t < 15
    msg = str(e.value)
    assert msg.startswith("template.phrasings[0]: rendering stopped: ") and why in msg and "\n" not in msg, msg


def test_time_limit_stops_slow_rendering():
    from ftctl.data.jinja import time_limit

    t = time.monotonic()
    with (pytest.raises(ConfigError, match=r"^template.chat_template: rendering stopped: took over 0.5 s"),
          time_limit("template.chat_template", 0.5)):
        while True:
            pass
    assert time.monotonic() - t < 5


def test_ordinary_templates_still_render():
    from ftctl.data.jinja import render

    assert render("{% for i in range(3) %}{{ i }}{% endfor %} {{ 'ab' * 2 }} {{ 2 ** 10 }}", {}) == "012 abab 1024"
    assert len(render("{{ text }}", {"text": "z" * 900_000})) == 900_000


def test_template_bomb_in_a_recipe_one_line(tmp_path):
    d = tmp_path / "recipes"
    d.mkdir()
    (d / "bomb.yaml").write_text(
        "# @package _global_\n"
        "template:\n  name: flan\n  phrasings:\n    - '" + NESTED + " {{ instruction }} ||| {{ output }}'\n")
    t = time.monotonic()
    r = run_cli("train", "recipe=bomb", *TINY, "data.path=builtin:demo_dates", "data.cache=false",
                f"output_dir={tmp_path / 'out'}", env={"FTCTL_RECIPES": str(d)}, timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    assert _one_line(r).startswith("ftctl: error: template.phrasings[0]: rendering stopped: loops over more than")
    assert time.monotonic() - t < 90
    r = run_cli("train", "recipe=bomb", *TINY, "data.path=builtin:demo_dates", "data.bad_rows=skip", "data.cache=false",
                f"output_dir={tmp_path / 'out'}", env={"FTCTL_RECIPES": str(d)}, timeout=120)
    assert r.returncode == 2 and "template.phrasings[0]: rendering stopped" in _one_line(r)


def test_template_bomb_folded_while_compiling_is_a_config_error():
    from ftctl.data.jinja import check

    with pytest.raises(ConfigError, match=r"^template.phrasings\[0\]: rendering stopped: a value over"):
        check("{{ 'x'|center(10000000000) }}|||y", "template.phrasings[0]")


# ---------------------------------------------------------------------------- 1b. peft.r against the model's shapes
def _tiny_model(cfg):
    import torch

    from ftctl.models import load

    return load.load_model(load.resolve(cfg.model.path), cfg.model, cfg.quant, torch.device("cpu"))


@pytest.mark.parametrize("method", ["lora", "loha", "adalora"])
def test_rank_larger_than_a_target_module_is_refused(method):
    from ftctl.methods.spec import method_spec

    cfg, _ = compose(*TINY, f"peft={method}", "peft.r=512")
    with pytest.raises(ConfigError) as e:
        method_spec(method).wrap(_tiny_model(cfg), cfg.peft, quantized=False, gradient_checkpointing=False)
    # tiny_llama's attention has grouped key/value heads: k_proj maps 64 -> 32
    assert str(e.value) == ("peft.r=512 is larger than model.layers.0.self_attn.k_proj's smaller dimension (32; "
                            "its weight is 32x64); choose peft.r <= 32")


@pytest.mark.parametrize("overrides", [["peft.r=32"], ["peft.r=64", "peft.target_modules=[q_proj,o_proj]"],
                                       ["peft=vera", "peft.r=256"]])  # VeRA's r: shared projections, no per-layer rank
def test_rank_up_to_the_smaller_dimension_is_fine(overrides):
    from ftctl.methods.spec import method_spec

    cfg, _ = compose(*TINY, *overrides)
    model = method_spec(cfg.peft.method).wrap(_tiny_model(cfg), cfg.peft, quantized=False,
                                              gradient_checkpointing=False)
    assert any(p.requires_grad for p in model.parameters())


def test_rank_too_large_cli_one_line_before_training(tmp_path):
    out = tmp_path / "run"
    r = run_cli("train", *TINY, "peft.r=512", f"output_dir={out}")
    assert r.returncode == 2
    assert "peft.r=512 is larger than model.layers.0.self_attn.k_proj's smaller dimension (32" in _one_line(r)
    assert not (out / "checkpoints").exists() and not (out / "adapter").exists()  # no step was taken
    assert not (out / "metrics.jsonl").exists() or "loss" not in (out / "metrics.jsonl").read_text()


def test_output_dir_names_the_repository_when_it_is_also_the_current_folder(monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(ConfigError, match=r"refusing to write a run into ftctl's repository itself"):
        compose(*TINY, f"output_dir={ROOT}")
