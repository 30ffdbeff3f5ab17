import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


def run_cli(*args, env=None, cwd=None, timeout=600):
    """Run the real `ftctl` entry point in a subprocess; returns CompletedProcess (text)."""
    e = dict(os.environ)
    e.pop("FTCTL_DEBUG", None)
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "ftctl.cli", *map(str, args)], capture_output=True, text=True,
                          env=e, cwd=cwd or ROOT, timeout=timeout)


@pytest.fixture(scope="session", autouse=True)
def tiny_model_path():
    """Materialise the built-in models once, before any test, so that CLI tests in subprocesses do not
    each print the one-time conversion of the embedded model (which also makes tiny_llama's tokenizer)."""
    from ftctl.models import load as models

    return models.resolve("builtin:tiny_llama")


@pytest.fixture(scope="session")
def tokenizer(tiny_model_path):
    from ftctl.models.load import load_tokenizer

    return load_tokenizer(tiny_model_path)


def compose(*overrides):
    from ftctl.config.compose import compose as _compose

    return _compose("train", list(overrides))


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
