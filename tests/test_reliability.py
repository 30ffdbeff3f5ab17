"""Kill -9 anywhere, SIGTERM at a step boundary, NaN guards. Marked slow; run alone with
`pytest -m reliability`. Each kill starts a real `ftctl train ... resume=true` process."""
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
from conftest import compose, run_cli
from safetensors.torch import load_file

from ftctl.rundir import read_metrics
from ftctl.train import checkpoint
from ftctl.train.loop import train

pytestmark = [pytest.mark.slow, pytest.mark.reliability]
# 60 steps, 10 SIGKILLs and 5 SIGTERMs: each signal costs a process start (about 7 s on 2 cores), so these
# counts keep the two tests near 2.5 minutes together while still landing kills in start-up, steps and saves
STEPS = 60

ARGS = ["model=tiny_llama", "data.limit=64", "data.max_length=128", "trainer.batch_size=4", "trainer.grad_accum=2",
        f"trainer.max_steps={STEPS}", "trainer.save_every=1", "trainer.keep_checkpoints=2", "trainer.eval_every=0",
        "trainer.log_every=1", "trainer.lr=5e-3", "peft.dropout=0.1", "peft.r=32", "trainer.warmup_steps=5"]


def _popen(out, *extra):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "ftctl.cli", "train", *ARGS, f"output_dir={out}", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _adapter(out):
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def _same(a, b):
    assert a.keys() == b.keys() and a
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run, and how long its start-up and its training took."""
    out = tmp_path_factory.mktemp("ref") / "run"
    t0 = time.time()
    p = _popen(out)
    p.communicate(timeout=600)
    assert p.returncode == 0
    total = time.time() - t0
    metrics = read_metrics(out)
    first_step = min(m["time"] for m in metrics) - t0
    return out, first_step, total


def _wait_for_save(p, ck, timeout=120):
    """Return as soon as a checkpoint save is under way (its temporary folder exists)."""
    end = time.time() + timeout
    while time.time() < end and p.poll() is None:
        if ck.is_dir() and any(e.name.startswith(".tmp-step-") for e in os.scandir(ck)):
            return
        time.sleep(0.0005)


def _interrupt_until_done(out, sig, times, reference, seed, after_start=False, in_save_every=0):
    """Start `resume=true` runs and signal them until ``times`` signals were sent, then let one finish.
    Moments are random (start-up, steps, saves, the final save); every ``in_save_every``-th signal is
    sent while a checkpoint is being written."""
    _, first_step, total = reference
    rng = random.Random(seed)
    sent, mid_save, exit_codes = 0, 0, []
    ck = out / "checkpoints"
    for _ in range(times * 4):
        p = _popen(out, "resume=true")
        if sent < times:
            if in_save_every and sent % in_save_every == in_save_every - 1:
                _wait_for_save(p, ck)
            else:
                # up to half the run's steps go by in all the attempts together, so every signal lands
                # before the end: in start-up, in a step, in a save
                low = first_step if after_start else 0.6 * first_step
                try:
                    p.communicate(timeout=rng.uniform(low, first_step + (total - first_step) / (2 * times)))
                except subprocess.TimeoutExpired:
                    pass
            if p.poll() is None:
                p.send_signal(sig)
                sent += 1
                try:
                    p.communicate(timeout=120)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.communicate()
                exit_codes.append(p.returncode)
                if ck.is_dir() and any(x.name.startswith(".tmp-step-") for x in ck.iterdir()):
                    mid_save += 1
                continue
        p.communicate(timeout=600)
        assert p.returncode == 0, p.returncode
        if sent >= times:
            assert json.loads((out / "manifest.json").read_text())["status"] == "finished"
            return sent, mid_save, exit_codes
    raise AssertionError(f"run did not finish after {sent} signals")


def test_sigkill_anywhere_then_resume_gives_the_same_adapter(tmp_path, reference):
    out = tmp_path / "killed"
    kills, mid_save, codes = _interrupt_until_done(out, signal.SIGKILL, 10, reference, seed=1, in_save_every=3)
    assert kills >= 10 and codes.count(-signal.SIGKILL) == kills
    print(f"\n{kills} SIGKILLs, {mid_save} of them inside a checkpoint save")
    assert mid_save >= 3  # the half-written folders were there, and were never used
    assert _same(_adapter(reference[0]), _adapter(out)) < 1e-6
    steps = [m["step"] for m in read_metrics(out) if "loss" in m]
    assert steps == sorted(set(steps)) and steps[-1] == STEPS  # no step logged twice, none after the end


def test_sigterm_saves_at_a_step_boundary_then_resume_gives_the_same_adapter(tmp_path, reference):
    out = tmp_path / "termed"
    n, _, codes = _interrupt_until_done(out, signal.SIGTERM, 5, reference, seed=2, after_start=True)
    # once the loop runs, SIGTERM ends the run with status 75 and a checkpoint; before that, the default action
    assert n >= 5 and set(codes) <= {75, -signal.SIGTERM, 0} and 75 in codes, codes
    assert _same(_adapter(reference[0]), _adapter(out)) < 1e-6


def test_sigterm_message_says_how_to_resume(tmp_path, reference):
    out = tmp_path / "one"
    p = _popen(out)
    while not (out / "checkpoints").is_dir():
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 75, err
    assert "stopped by SIGTERM at step" in err and f"output_dir={out} resume=true" in err
    man = json.loads((out / "manifest.json").read_text())
    step = int(err.split("at step ")[1].split("/")[0])
    assert man["status"] == "preempted" and checkpoint.find_resume(out, True).name == f"step-{step:06d}"


TINY = ["model=tiny_llama", "data.limit=32", "trainer.batch_size=4", "trainer.eval_every=0", "trainer.log_every=1"]


def test_nan_stop_names_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    out = tmp_path / "nan"
    r = run_cli("train", *TINY, "trainer.max_steps=6", "trainer.save_every=1", "trainer.lr=1e30",
                "trainer.max_grad_norm=0", "trainer.warmup_steps=0", "trainer.scheduler=constant", f"output_dir={out}")
    assert r.returncode == 3, r.stderr[-2000:]
    assert "non-finite loss/gradient at step" in r.stderr and "training rows [" in r.stderr
    bad_step = int(r.stderr.split("at step ")[1].split(" ")[0])
    assert json.loads((out / "manifest.json").read_text())["status"] == "failed"
    assert not (out / "adapter").exists()
    good = checkpoint.find_resume(out, True)
    assert good is not None and int(good.name.split("-")[1]) == bad_step - 1
    import torch

    assert all(torch.isfinite(t).all() for t in load_file(str(good / "trainable.safetensors")).values())


def test_nan_skip_goes_on_and_counts(tmp_path):
    cfg, choices = compose(*TINY, "trainer.max_steps=5", "trainer.lr=1e30", "trainer.max_grad_norm=0",
                           "trainer.warmup_steps=0", "trainer.scheduler=constant", "trainer.on_nan=skip",
                           "trainer.save_every=1", "trainer.keep_checkpoints=5", f"output_dir={tmp_path / 'skip'}")
    out = train(cfg, choices)
    m = [x for x in read_metrics(out) if "loss" in x]
    # step 1 is finite and makes the weights huge; every later loss is NaN and its update is dropped
    assert m[0]["skipped_steps"] == 0 and m[-1]["skipped_steps"] == 4
    import torch

    final = _adapter(out)
    after_step_1 = load_file(str(out / "checkpoints" / "step-000001" / "trainable.safetensors"))
    assert all(torch.isfinite(t).all() for t in final.values())
    assert sum(t.numel() for t in final.values()) == sum(t.numel() for t in after_step_1.values())
    for a, b in zip(sorted(final), sorted(after_step_1)):  # peft's names differ from named_parameters'
        assert torch.equal(final[a], after_step_1[b]), (a, b)
