"""The command table and check_command: every command parses its arguments in one place, so that the check
(used on the docs' commands) and the run cannot drift apart."""
from __future__ import annotations

import shlex
import subprocess
import sys
import time

import pytest

from ftctl.cli import COMMANDS, check_command, main
from ftctl.cli.usage import USAGE
from ftctl.core.errors import ConfigError

GOOD = [
    "train recipe=lora_smollm2 trainer.max_steps=50 output_dir=outputs/try",
    "train -m recipe=lora_smollm2 peft.r=4,8,16,32",
    "train recipe=qlora_llama peft.r=8 --cfg job",
    "train --dry-run recipe=lora_smollm2 distributed=ddp launcher.nproc_per_node=2",
    "train config_file=outputs/try/config.yaml trainer.max_steps=3",
    "eval exact_match rougeL run=outputs/try compare=base",
    "eval rouge run=outputs/try data.path=other.jsonl limit=10",
    "eval rouge model=outputs/try/merged recipe=lora_smollm2",
    "merge run=outputs/try dtype=bfloat16 overwrite=true",
    "quantize model=outputs/try/merged method=nf4 recipe=lora_smollm2",
    "generate run=outputs/try 'prompt=What is 2+2? #math: [x]' max_new_tokens=8",
    "chat run=outputs/try system=terse do_sample=true",
    "report outputs/try examples=3",
    "sweep report multirun/lora/2024 metric=rougeL",
    "runs outputs status=finished",
    "runs compare outputs/a outputs/b",
    "plan recipe=lora_smollm2 devices=2 strategy=zero3 peft.r=8",
    "plan run=outputs/try",
    "data preview recipe=lora_smollm2 n=2 split=validation",
    "recipes",
    "methods",
    "--help",
    "train --help",
]

# (command line, what the one-line message must name)
BAD = [
    ("train recipe=lora_smollm2 trainer.lrr=0.1", "trainer.lrr"),
    ("train -m recipe=lora_smollm2 peft.rr=4,8", "peft.rr"),
    ("train config_file=outputs/try/config.yaml trainer.lrr=3", "trainer.lrr"),
    ("train recipe=lora_smollm2 trainer.optimizer=adamm", "trainer.optimizer"),
    ("train --cfg hydra", "--cfg hydra"),
    ("train --fast", "--fast"),
    ("eval rouge run=outputs/try shotz=3", "shotz=3"),
    ("eval rouge run=outputs/try data.pth=x", "data.pth"),
    ("eval rouge model=outputs/m peft.rr=4", "peft.rr"),
    ("eval rouge run=outputs/try limit=many", "limit"),
    ("eval rogue run=outputs/try", "rogue"),
    ("merge run=outputs/try dtyp=bfloat16", "dtyp"),
    ("quantize model=m method=nf4 data.pth=x", "data.pth"),
    ("quantize model=m method=nf5", "nf5"),
    ("generate run=outputs/try promt=hi", "promt"),
    ("generate run=outputs/try max_new_tokens=abc", "max_new_tokens"),
    ("chat run=outputs/try sytem=hi", "sytem"),
    ("report outputs/try exampels=3", "exampels"),
    ("sweep report multirun/a/b metrc=rougeL", "metrc"),
    ("sweep reprot multirun/a/b", "reprot"),
    ("sweep", "sweep"),
    ("runs stauts=finished", "stauts"),
    ("runs compare outputs/a", "runs compare"),
    ("plan recipe=lora_smollm2 peft.rr=3", "peft.rr"),
    ("plan recipe=lora_smollm2 strategy=zero4", "zero4"),
    ("plan recipe=lora_smollm2 devicez=2", "devicez"),
    ("data preview data.pth=x", "data.pth"),
    ("data preview n=x", "n=x"),
    ("data review", "review"),
    ("recipes foo=1", "foo=1"),
    ("methods lora", "lora"),
    ("trian recipe=lora_smollm2", "trian"),
]


@pytest.mark.parametrize("line", GOOD)
def test_check_command_accepts(line, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    check_command(shlex.split(line))
    assert list(tmp_path.iterdir()) == []  # nothing written, no run directory made


@pytest.mark.parametrize("line,named", BAD)
def test_check_command_refuses_naming_the_key(line, named):
    with pytest.raises(ConfigError) as e:
        check_command(shlex.split(line))
    msg = str(e.value)
    assert named in msg and "\n" not in msg, msg


def test_every_command_kind_is_checked_both_ways():
    kinds = {line.split()[0] for line in GOOD} & {line.split()[0] for line, _ in BAD}
    assert set(COMMANDS) <= kinds


def test_the_run_parses_with_the_same_parser(capsys):
    """A key the parse step refuses stops the run with the check's message and exit status, before anything loads;
    a train or plan config that does not compose stops the run with the check's message too."""
    from ftctl.cli.args import ShowUsage

    for line, _ in BAD:
        argv = shlex.split(line)
        if argv[0] not in COMMANDS:
            continue
        try:
            parsed = COMMANDS[argv[0]].parse(argv[1:])
        except ShowUsage:
            continue
        except ConfigError as e:
            assert main(argv) == e.exit_code == 2
            assert capsys.readouterr().err.strip() == f"ftctl: error: {e}", line
            continue
        if "config_file=" in line:  # the run reads the file first
            continue
        if argv[0] in ("train", "data") or (argv[0] == "plan" and "strategy=" not in line):
            with pytest.raises(ConfigError) as e:
                COMMANDS[argv[0]].check(parsed)
            assert main(argv) == 2
            assert capsys.readouterr().err.strip() == f"ftctl: error: {e.value}", line


def test_usage_and_unknown_command(capsys):
    assert main([]) == 2 and capsys.readouterr().out.strip() == USAGE.strip()
    assert main(["--help"]) == 0 and capsys.readouterr().out.strip() == USAGE.strip()
    assert main(["sweep"]) == 2 and capsys.readouterr().out.strip() == USAGE.strip()
    assert main(["eval", "--help"]) == 0 and capsys.readouterr().out.strip() == USAGE.strip()
    assert main(["--debug", "trian"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ftctl: error: unknown command 'trian' (commands: train, eval, report, sweep, runs, plan, "
                          "merge, quantize, generate, chat, data, recipes, methods; see ftctl --help)")
    assert main(["--debug", "train", "--fast"]) == 2  # a command line that cannot be read: no traceback
    assert capsys.readouterr().err.strip() == "ftctl: error: train: unknown option --fast"


def test_help_is_fast_and_imports_nothing_heavy():
    code = ("import sys, time; t = time.perf_counter(); import ftctl.cli; "
            "heavy = [m for m in ('torch', 'transformers', 'omegaconf', 'hydra', 'rich') if m in sys.modules]; "
            "print(heavy, time.perf_counter() - t)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == "[]", out
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "ftctl.cli", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "usage: ftctl" in r.stdout
    assert time.perf_counter() - t < 2.0  # the interpreter's own start dominates; 0.06 s on a quiet machine
