"""Hardening of the training run: a limit on skipped NaN steps, strict JSON (no bare NaN), a full disk, and
adapters (model.adapter) that are pickles or garbage. Each case: one line, a documented exit status, and the
last good checkpoint kept."""
import json
import math
import os
import pickle
import shutil
import subprocess

import pytest
from conftest import compose, run_cli

from ftctl.rundir import read_metrics
from ftctl.train import checkpoint
from ftctl.train.loop import train

TINY = ["model=tiny_llama", "data.limit=16", "trainer.batch_size=4", "trainer.eval_every=0", "logging.plots=false"]
# step 1 is finite and makes the weights huge; every later loss is NaN (as in test_reliability)
BLOW_UP = ["trainer.lr=1e30", "trainer.max_grad_norm=0", "trainer.warmup_steps=0", "trainer.scheduler=constant"]


def _one_line(r):
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    return lines[0]


def _strict_json(text: str):
    """json.loads that refuses NaN, Infinity and -Infinity (as strict JSON readers do)."""
    def refuse(name):
        raise ValueError(f"bare {name} in JSON")
    return json.loads(text, parse_constant=refuse)


# ---------------------------------------------------------------------------- 1. trainer.max_skipped_steps
def test_max_skipped_steps_default_is_a_small_count():
    cfg, _ = compose(*TINY)
    assert cfg.trainer.max_skipped_steps == 10


def test_on_nan_skip_stops_once_skipped_steps_exceed_the_limit(tmp_path):
    out = tmp_path / "run"
    r = run_cli("train", *TINY, *BLOW_UP, "trainer.on_nan=skip", "trainer.max_skipped_steps=2", "trainer.max_steps=8",
                "trainer.save_every=1", "trainer.keep_checkpoints=10", f"output_dir={out}")
    assert r.returncode == 3, r.stderr[-2000:]
    line = _one_line(r)
    # steps 2, 3 and 4 are skipped: the third skip is over the limit of 2
    assert "3 of 4 steps skipped" in line and "trainer.max_skipped_steps=2" in line, line
    assert "last good checkpoint" in line
    man = json.loads((out / "manifest.json").read_text())
    assert man["status"] == "failed" and not (out / "adapter").exists()
    kept = checkpoint.complete_checkpoints(out / "checkpoints")
    assert [p.name for p in kept] == ["step-000001", "step-000002", "step-000003"]
    assert json.loads((kept[-1] / "state.json").read_text())["skipped_steps"] == 2
