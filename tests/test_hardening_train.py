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


# ---------------------------------------------------------------------------- 2. no bare NaN in JSON
def test_json_safe_writes_null_and_lists_the_keys(tmp_path):
    import numpy as np

    from ftctl.core.atomic import atomic_write_json, json_safe

    obj = {"loss": float("nan"), "lr": 1e-4, "steps": 3, "ok": True, "none": None,
           "val": {"val_loss": float("inf")}, "curve": [1.0, -float("inf")], "np": np.float32("nan")}
    clean = json_safe(obj)
    json.dumps(clean, allow_nan=False)
    assert clean["loss"] is None and clean["val"]["val_loss"] is None and clean["curve"] == [1.0, None]
    assert clean["np"] is None and clean["lr"] == 1e-4 and clean["steps"] == 3 and clean["ok"] is True
    assert clean["nonfinite"] == ["loss", "val.val_loss", "curve.1", "np"]
    assert math.isnan(obj["loss"])  # the caller's object is not changed
    assert json_safe({"loss": 1.0}) == {"loss": 1.0}  # nothing to flag: no key added
    atomic_write_json(tmp_path / "x.json", obj)
    assert _strict_json((tmp_path / "x.json").read_text())["nonfinite"] == clean["nonfinite"]


def test_a_run_with_nan_losses_writes_strict_json_everywhere(tmp_path):
    cfg, choices = compose(*TINY, *BLOW_UP, "trainer.on_nan=skip", "trainer.max_steps=3", "trainer.save_every=1",
                           "trainer.log_every=1", f"output_dir={tmp_path / 'run'}")
    out = train(cfg, choices)
    files = [p for p in out.rglob("*") if p.suffix in (".json", ".jsonl") and p.parent.name != "adapter"]
    assert out / "manifest.json" in files and out / "metrics.jsonl" in files
    for f in files:
        for text in f.read_text().splitlines() if f.suffix == ".jsonl" else [f.read_text()]:
            _strict_json(text)
    rows = read_metrics(out)
    nan_rows = [m for m in rows if m.get("loss", 0) is None]
    assert nan_rows and all(m["nonfinite"] == ["loss"] for m in nan_rows)
    val = [m for m in rows if "val_loss" in m]
    assert val[-1]["val_loss"] is None and val[-1]["nonfinite"] == ["val_loss"]
    man = _strict_json((out / "manifest.json").read_text())
    assert man["status"] == "finished" and man["final_train_loss"] is None
    assert "final_train_loss" in man["nonfinite"] and "final_val_loss" in man["nonfinite"]


# ---------------------------------------------------------------------------- 3. a full disk
@pytest.fixture(scope="module")
def one_step_run(tmp_path_factory):
    """A finished one-step LoRA run (a 0.4 MB checkpoint, a 3.7 MB adapter/ with its tokenizer)."""
    out = tmp_path_factory.mktemp("disk") / "run"
    r = run_cli("train", *TINY, "trainer.max_steps=1", f"output_dir={out}")
    assert r.returncode == 0, r.stderr[-2000:]
    return out


@pytest.fixture
def small_disk(tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)], capture_output=True)
    if ok.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to simulate a full disk here: {ok.stderr.decode().strip()}")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=False)


def _fill(mnt, leave: int) -> None:
    st = os.statvfs(mnt)
    free = st.f_bavail * st.f_frsize
    with open(mnt / "filler", "wb") as f:
        f.write(b"\0" * max(free - leave, 0))


@pytest.mark.parametrize("free_kb, where", [
    (40, "checkpoints/step-000002"),    # the checkpoint's trainable.safetensors does not fit
    (200, "checkpoints/step-000002"),   # its weights fit; optimizer.pt (torch.save) does not
    (1500, "adapter"),                  # the checkpoint fits; the final adapter with its tokenizer does not
    (0, "config.yaml"),                 # full from the start (train.log's lines are dropped without a traceback)
])
def test_full_disk_one_line_naming_the_path_and_the_last_checkpoint_kept(one_step_run, small_disk, free_kb, where):
    out = small_disk / "run"
    shutil.copytree(one_step_run, out)
    _fill(small_disk, free_kb * 1024)
    r = run_cli("train", *TINY, "trainer.max_steps=2", f"output_dir={out}", "resume=true")
    assert r.returncode == 2, r.stderr[-2000:]
    line = _one_line(r)
    assert "no space left on device" in line.lower() and str(out / where) in line, line
    kept = checkpoint.complete_checkpoints(out / "checkpoints")  # verified: sizes and sha256
    assert kept and kept[-1].name == ("step-000002" if where == "adapter" else "step-000001")
    if where != "config.yaml":
        assert f"last complete checkpoint {kept[-1]}" in line, line
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".tmp")]
    assert not [p for p in out.iterdir() if p.name.startswith(".adapter.tmp")]
    if where != "config.yaml":  # a set-up that fails on a full disk cannot write it either
        assert json.loads((out / "manifest.json").read_text())["status"] == "failed"


# ---------------------------------------------------------------------------- 4. model.adapter that is not weights
@pytest.fixture(scope="module")
def adapter_config(tmp_path_factory):
    cfg, choices = compose(*TINY, "trainer.max_steps=1", f"output_dir={tmp_path_factory.mktemp('a') / 'run'}")
    return train(cfg, choices) / "adapter"


def _adapter_folder(tmp_path, adapter_config, name: str, content: bytes):
    folder = tmp_path / "adapter"
    folder.mkdir()
    shutil.copy(adapter_config / "adapter_config.json", folder)
    (folder / name).write_bytes(content)
    return folder


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickled_adapter_is_refused_without_unpickling(tmp_path, adapter_config):
    marker = tmp_path / "pwned"
    folder = _adapter_folder(tmp_path, adapter_config, "adapter_model.bin",
                             pickle.dumps({"base_model.model.x": _Evil(marker)}, protocol=2))
    r = run_cli("train", *TINY, "trainer.max_steps=1", f"model.adapter={folder}", f"output_dir={tmp_path / 'run'}")
    assert r.returncode == 2, r.stderr[-2000:]
    line = _one_line(r)
    assert str(folder / "adapter_model.bin") in line and "posix.system" in line, line
    assert not marker.exists()


def test_garbage_safetensors_adapter_is_one_line(tmp_path, adapter_config):
    folder = _adapter_folder(tmp_path, adapter_config, "adapter_model.safetensors", b"not a safetensors file" * 8)
    r = run_cli("train", *TINY, "trainer.max_steps=1", f"model.adapter={folder}", f"output_dir={tmp_path / 'run'}")
    assert r.returncode == 2, r.stderr[-2000:]
    line = _one_line(r)
    assert str(folder / "adapter_model.safetensors") in line and "not a safetensors file" in line, line


def test_adapter_without_weights_is_one_line(tmp_path, adapter_config):
    folder = tmp_path / "adapter"
    folder.mkdir()
    shutil.copy(adapter_config / "adapter_config.json", folder)
    r = run_cli("train", *TINY, "trainer.max_steps=1", f"model.adapter={folder}", f"output_dir={tmp_path / 'run'}")
    assert r.returncode == 2, r.stderr[-2000:]
    assert "no adapter_model.safetensors or adapter_model.bin" in _one_line(r)


def test_adapter_bin_of_plain_tensors_still_trains(tmp_path, adapter_config):
    import torch
    from safetensors.torch import load_file

    weights = load_file(str(adapter_config / "adapter_model.safetensors"))
    folder = tmp_path / "adapter"
    folder.mkdir()
    shutil.copy(adapter_config / "adapter_config.json", folder)
    torch.save(weights, folder / "adapter_model.bin")
    cfg, choices = compose(*TINY, "trainer.max_steps=1", f"model.adapter={folder}", f"output_dir={tmp_path / 'run'}")
    out = train(cfg, choices)
    assert json.loads((out / "manifest.json").read_text())["status"] == "finished"
