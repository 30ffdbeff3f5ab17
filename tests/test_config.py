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


# ----------------------------------------------------------------------------- the table of allowed values
def test_every_key_of_the_choices_table_is_in_the_schema_with_an_allowed_default():
    import dataclasses

    from ftctl.config.choices import CHOICES, allowed
    from ftctl.config.schema import TrainConfig

    defaults = compose()[0]
    for key, c in CHOICES.items():
        cls = TrainConfig
        for part in key.split(".")[:-1]:
            cls = {f.name: f for f in dataclasses.fields(cls)}[part].default_factory
        assert key.split(".")[-1] in {f.name for f in dataclasses.fields(cls)}, key
        value = defaults
        for part in key.split("."):
            value = value[part]
        values = list(value) if c.many else [value]
        assert all(v in allowed(key) for v in values), (key, value)
        assert c.meaning and "\n" not in c.meaning and "|" not in c.meaning, key


@pytest.mark.parametrize("key", [
    "model.dtype", "data.train_on", "template.style", "precision.name", "trainer.optimizer", "trainer.scheduler",
    "distributed.strategy", "logging.wandb_mode", "sweep.direction", "objective", "task", "classify.pooling",
    "dpo.loss", "peft.method", "quant.method", "template.name",
])
def test_validate_refuses_a_value_outside_the_table_and_lists_the_table(key):
    from ftctl.config.choices import allowed

    with pytest.raises(ConfigError) as e:
        compose(f"{key}=bogus")
    assert str(e.value) == f"{key}='bogus' is not allowed; choose one of: {', '.join(allowed(key))}"


def test_a_key_the_table_checks_only_under_a_condition():
    compose("classify.strategy=bogus")  # task=generate: classify.* is not read
    with pytest.raises(ConfigError, match=r"classify.strategy='bogus' is not allowed; choose one of: features, "):
        compose("recipe=sms_spam_classify", "classify.strategy=bogus")


def test_the_distributed_families_come_from_the_table():
    from ftctl.config import checks
    from ftctl.config.choices import DEEPSPEED, ENGINE, SHARDED, STRATEGIES, ZERO_STAGE, allowed
    from ftctl.experiments import plan

    assert STRATEGIES == allowed("distributed.strategy") == plan.STRATEGIES
    assert (checks.SHARDED, checks.DEEPSPEED) == (SHARDED, DEEPSPEED)
    assert SHARDED == ("fsdp", "zero1", "zero2", "zero3", "zero3_offload")
    assert ZERO_STAGE == {"zero1": 1, "zero2": 2, "zero3": 3, "zero3_offload": 3}
    assert set(ENGINE.values()) == {"single", "ddp", "fsdp", "deepspeed"}


def test_the_trackers_come_from_the_table():
    from ftctl.config.checks import PACKAGES
    from ftctl.config.choices import TRACKERS, allowed

    assert tuple(PACKAGES) == TRACKERS and allowed("logging.report_to") == ("none",) + TRACKERS


def test_the_docs_page_lists_exactly_the_allowed_values_of_each_key():
    """docs/config-values.md is rendered from the table: python -m ftctl.config.choices > docs/config-values.md"""
    import re
    from pathlib import Path

    from ftctl.config.choices import CHOICES, allowed, markdown

    page = (Path(__file__).resolve().parents[1] / "docs" / "config-values.md").read_text()
    rows = {}
    for line in page.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0].startswith("`"):
            rows[re.match(r"`([^`]+)`", cells[0]).group(1)] = tuple(re.findall(r"`([^`]+)`", cells[1]))
    assert rows == {key: allowed(key) for key in CHOICES}
    assert page == markdown(), "docs/config-values.md is stale: python -m ftctl.config.choices > docs/config-values.md"
