"""Composition of configs/ + recipes/ + overrides, and every kind of config error."""
import textwrap

import pytest
from conftest import compose, run_cli

from ftctl.core.errors import ConfigError


def test_recipe_picks_group_options_and_values():
    cfg, choices = compose("recipe=qlora_llama")
    assert choices["recipe"] == "qlora_llama"
    assert cfg.quant.method == "nf4" and cfg.peft.method == "lora"
    assert cfg.peft.target_modules == "all-linear"
    assert cfg.model.path == "builtin:smollm2_135m"
    assert cfg.trainer.max_steps == 60 and cfg.trainer.batch_size == 8


def test_overrides_win_over_recipe():
    cfg, choices = compose("recipe=qlora_llama", "model=tiny_llama", "peft.r=4", "trainer.lr=1e-3", "quant=none")
    assert choices["model"] == "tiny_llama" and cfg.model.path == "builtin:tiny_llama"
    assert cfg.peft.r == 4 and cfg.trainer.lr == pytest.approx(1e-3) and cfg.quant.method == "none"


def test_defaults_without_recipe():
    cfg, choices = compose()
    assert "recipe" not in choices
    assert cfg.model.name == "smollm2_135m" and cfg.template.name == "alpaca"


def test_llama_model_switch_is_a_hub_id():
    cfg, _ = compose("recipe=qlora_llama", "model=llama3_1_8b")
    assert cfg.model.path == "meta-llama/Llama-3.1-8B-Instruct" and cfg.quant.method == "nf4"


def test_target_modules_list():
    cfg, _ = compose("peft.target_modules=[q_proj,v_proj]")
    assert list(cfg.peft.target_modules) == ["q_proj", "v_proj"]


@pytest.mark.parametrize("override, expect", [
    ("trainer.lrr=1", "unknown key 'trainer.lrr'"),
    ("trainer.lr=abc", "trainer.lr"),
    ("peft.method=lorra", "peft.method='lorra' is not allowed"),
    ("model=tiny_lama", "no such option for 'model'"),
    ("recipe=nope", "recipe=nope"),
    ("trainer.batch_size=0", "trainer.batch_size=0 must be > 0"),
    ("quant.method=int3", "quant.method='int3' is not allowed"),
    ("data.overlong=cut", "data.overlong='cut' is not allowed"),
])
def test_config_errors_name_the_key(override, expect):
    with pytest.raises(ConfigError) as e:
        compose(override)
    assert expect in str(e.value)
    assert "\n" not in str(e.value)


def test_unknown_key_suggests_the_right_one():
    with pytest.raises(ConfigError) as e:
        compose("trainer.lrr=1")
    assert "did you mean trainer.lr?" in str(e.value)


def test_bad_group_option_lists_available():
    with pytest.raises(ConfigError) as e:
        compose("model=tiny_lama")
    assert str(e.value).endswith("available: flan_t5_base, llama3_1_8b, minilm_l6, smollm2_135m, tiny_bert, tiny_llama, "
                                 "tiny_t5")


def test_cli_config_error_is_one_line_exit_2():
    r = run_cli("train", "recipe=lora_smollm2", "trainer.lrr=0.1")
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    assert "trainer.lrr" in lines[0] and "Traceback" not in r.stderr


def test_cli_debug_shows_traceback():
    r = run_cli("--debug", "train", "trainer.lrr=0.1")
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_cli_cfg_job_prints_composed_config():
    r = run_cli("train", "recipe=qlora_llama", "peft.r=8", "--cfg", "job")
    assert r.returncode == 0, r.stderr
    assert "method: nf4" in r.stdout and "r: 8" in r.stdout


def test_cli_recipes_lists_descriptions():
    r = run_cli("recipes")
    assert r.returncode == 0
    for name in ("qlora_llama", "lora_smollm2", "full_smollm2"):
        assert name in r.stdout
    assert "QLoRA" in r.stdout


def _user_recipe(tmp_path, body):
    d = tmp_path / "my_recipes"
    d.mkdir()
    f = d / "mine.yaml"
    f.write_text(textwrap.dedent(body))
    return d, f


def test_user_recipe_folder_and_path(tmp_path, monkeypatch):
    d, f = _user_recipe(tmp_path, """\
        # @package _global_
        description: my own recipe
        defaults:
          - override /model: tiny_llama
        trainer:
          lr: 0.01
        """)
    monkeypatch.setenv("FTCTL_RECIPES", str(d))
    cfg, choices = compose("recipe=mine")
    assert cfg.model.name == "tiny_llama" and cfg.trainer.lr == 0.01 and choices["recipe"] == "mine"
    monkeypatch.delenv("FTCTL_RECIPES")
    cfg, _ = compose(f"recipe={f}")
    assert cfg.trainer.lr == 0.01
    r = run_cli("recipes", env={"FTCTL_RECIPES": str(d)})
    assert "mine" in r.stdout and "my own recipe" in r.stdout


def test_bad_key_in_recipe_file_names_file_and_line(tmp_path, monkeypatch):
    d, f = _user_recipe(tmp_path, """\
        # @package _global_
        description: typo inside
        trainer:
          lr: 0.01
          warmpu_steps: 3
        """)
    monkeypatch.setenv("FTCTL_RECIPES", str(d))
    with pytest.raises(ConfigError) as e:
        compose("recipe=mine")
    assert f"{f}:5" in str(e.value) and "warmpu_steps" in str(e.value)


def test_bad_value_in_recipe_file_names_file_and_line(tmp_path, monkeypatch):
    d, f = _user_recipe(tmp_path, """\
        # @package _global_
        description: bad value
        peft:
          method: loraa
        """)
    monkeypatch.setenv("FTCTL_RECIPES", str(d))
    with pytest.raises(ConfigError) as e:
        compose("recipe=mine")
    assert f"{f}:4" in str(e.value) and "loraa" in str(e.value)


def test_multirun_bad_key_is_one_line():
    r = run_cli("train", "-m", "model=tiny_llama", "peft.rr=4,8")
    assert r.returncode == 2 and "peft.rr" in r.stderr and "Traceback" not in r.stderr


def test_unknown_command_exit_2():
    r = run_cli("trian")
    assert r.returncode == 2 and "unknown command" in r.stderr
