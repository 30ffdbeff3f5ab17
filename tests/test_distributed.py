"""Several processes: the launcher (torchrun command, --dry-run, the README's example), the checks at
composition, DeepSpeed's config from ftctl's settings, and real 2-process CPU runs (gloo) of ddp, zero2,
zero3 and fsdp on tiny_llama: the same losses as one process with the same global batch, checkpoints,
resume, and the adapter in the one-process format."""
import json
import re
import shlex
import socket
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import ROOT, compose, run_cli, write_jsonl
from safetensors.torch import load_file

from ftctl.core.errors import ConfigError, RunDirError
from ftctl.rundir import read_metrics
from ftctl.train import distributed
from ftctl.train.loop import train

TINY = ["model=tiny_llama", "data.limit=64", "data.max_length=128", "trainer.batch_size=4", "trainer.log_every=1",
        "trainer.eval_every=0", "trainer.warmup_steps=0", "trainer.lr=3e-2", "trainer.scheduler=constant",
        "peft.dropout=0"]  # no dropout: each process draws its own masks


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(out, strategy, *extra):
    return run_cli("train", *TINY, f"output_dir={out}", f"distributed={strategy}", "launcher.nproc_per_node=2",
                   f"launcher.master_port={_port()}", *extra, timeout=300)


def _losses(out) -> list[float]:
    return [m["loss"] for m in read_metrics(out) if "loss" in m]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The reference: one process, 4 steps of the global batch of 4 rows. trainer.logits=all: the model's own
    forward, as the multi-process engines run it (at lr 3e-2, Adam turns the float rounding of another
    order of operations into 1e-3 weight differences; the targets-only path is checked against the model's
    own forward in tests/test_performance.py)."""
    cfg, choices = compose(*TINY, f"output_dir={tmp_path_factory.mktemp('single') / 'run'}", "trainer.max_steps=4",
                           "trainer.logits=all")
    return train(cfg, choices)


def _same_adapter(ref: Path, out: Path, tol=1e-4) -> None:
    a, b = ref / "adapter", out / "adapter"
    assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())
    ca, cb = (json.loads((d / "adapter_config.json").read_text()) for d in (a, b))
    ca["target_modules"], cb["target_modules"] = sorted(ca["target_modules"]), sorted(cb["target_modules"])  # a set
    assert ca == cb
    wa, wb = load_file(str(a / "adapter_model.safetensors")), load_file(str(b / "adapter_model.safetensors"))
    assert sorted(wa) == sorted(wb)
    # every tensor agrees to tol, but for at most 1 element in 1,000 that may be off by up to 50 x tol: at lr
    # 3e-2, Adam's g / sqrt(v) turns the reduction-order rounding of an element whose gradient is near zero
    # into a step of up to ~lr (measured: one element of a zero3 run, 8.5e-4, with the others under 2e-5);
    # a sharding or resume bug moves many elements
    for k in wa:
        assert wa[k].dtype == wb[k].dtype and wa[k].shape == wb[k].shape
        diff = (wa[k] - wb[k]).abs()
        assert float((diff > tol).float().mean()) <= 1e-3 and float(diff.max()) < 50 * tol, (k, float(diff.max()))


# ----------------------------------------------------------------------------- launcher, no processes
def test_dry_run_prints_the_readme_command():
    readme = (ROOT / "docs" / "distributed.md").read_text()
    m = re.search(r"```\n(ftctl train [^\n]*--dry-run)\n```\nprints[^\n]*\n```\n([^\n]+)\n```", readme)
    assert m, "docs/distributed.md: the multi-node --dry-run example"
    r = run_cli(*shlex.split(m.group(1))[1:])
    assert r.returncode == 0, r.stderr
    printed = r.stdout.strip().replace(sys.executable, "python", 1)
    assert printed == m.group(2)
    assert not Path("/shared/runs/lora").exists()  # a dry run writes nothing


def test_command_and_worker_environment():
    from ftctl.train import launch

    cfg, _ = compose(*TINY, "distributed=zero2", "launcher.nproc_per_node=2", "output_dir=/tmp/x")
    cmd = launch.command(cfg, Path("/tmp/x/launch/config.yaml"))
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"] and "--nproc_per_node=2" in cmd
    assert cmd[-3:] == ["ftctl.cli", "train", "config_file=/tmp/x/launch/config.yaml"]
    env = launch.worker_env(cfg)
    assert int(env["OMP_NUM_THREADS"]) >= 1 and env["PYTHONPATH"].split(":")[0].endswith("src")
    assert launch.needed(cfg)
    single, _ = compose(*TINY)
    assert not launch.needed(single)
    with pytest.raises(ConfigError, match="runs under torchrun"):  # in-process (a sweep's trial) it cannot run
        train(cfg, {})


@pytest.mark.parametrize("overrides, words", [
    (["distributed=ddp", "launcher.nproc_per_node=3"], "trainer.batch_size=4 must be divisible by the 3"),
    (["launcher.nproc_per_node=2"], "need a multi-process strategy"),
    (["distributed=ddp", "launcher.nnodes=2"], "set output_dir="),
    (["distributed=ddp", "launcher.nnodes=2", "launcher.node_rank=2", "output_dir=/tmp/x"], "launcher.node_rank=2"),
    (["distributed=zero2", "trainer.on_nan=skip"], "trainer.on_nan=skip is not supported"),
    (["distributed=fsdp", "objective=dpo", "data=demo_date_pairs", "template=preference"], "objective=dpo works"),
    (["distributed=ddp", "distributed.deepspeed_config=x.json"], "needs a DeepSpeed strategy"),
    (["distributed=zero3", "distributed.deepspeed_config=/nonexistent.json"], "no such file"),
    (["distributed=zero9"], "no such option"),
])
def test_bad_distributed_settings_fail_at_composition(overrides, words):
    with pytest.raises(ConfigError, match=re.escape(words)):
        compose(*TINY, *overrides)


def test_deepspeed_config_comes_from_ftctl_settings(tmp_path, monkeypatch):
    cfg, _ = compose(*TINY, "distributed=zero3_offload", "trainer.batch_size=8", "trainer.grad_accum=3",
                     "trainer.max_grad_norm=0.5", "launcher.nproc_per_node=2")
    ds = distributed.deepspeed_config(cfg, 2, "bf16")
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]) == (4, 3, 24)
    assert ds["gradient_clipping"] == 0.5 and ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert ds["zero_optimization"]["stage"] == 3 and ds["zero_optimization"]["offload_param"]["device"] == "cpu"
    # DeepSpeed's own reading of it agrees (its batch check: train = micro x accumulation x world)
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    import deepspeed.comm as dist
    from deepspeed.runtime.config import DeepSpeedConfig

    monkeypatch.setattr(dist, "get_rank", lambda *a, **k: 0)  # as one of 2 processes, without a process group
    monkeypatch.setattr(dist, "get_world_size", lambda *a, **k: 2)
    parsed = DeepSpeedConfig(dict(ds))
    assert parsed.train_batch_size == 24 and parsed.gradient_accumulation_steps == 3 and parsed.zero_optimization_stage == 3

    own = tmp_path / "ds.json"
    own.write_text(json.dumps({"train_batch_size": "auto", "gradient_accumulation_steps": 3,
                               "zero_optimization": {"stage": 3, "overlap_comm": True}, "activation_checkpointing": {}}))
    cfg.distributed.deepspeed_config = str(own)
    merged = distributed.deepspeed_config(cfg, 2, "bf16")
    assert merged["train_batch_size"] == 24 and merged["zero_optimization"]["overlap_comm"] is True
    assert "activation_checkpointing" in merged
    own.write_text(json.dumps({"train_batch_size": 64}))
    with pytest.raises(ConfigError, match=r"train_batch_size=64 disagrees with ftctl's 24"):
        distributed.deepspeed_config(cfg, 2, "bf16")
    own.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    with pytest.raises(ConfigError, match=r"zero_optimization.stage=2 disagrees with distributed=zero3_offload"):
        distributed.deepspeed_config(cfg, 2, "bf16")
    own.write_text(json.dumps({"optimizer": {"type": "Adam"}}))
    with pytest.raises(ConfigError, match="remove 'optimizer'"):
        distributed.deepspeed_config(cfg, 2, "bf16")


def test_each_process_takes_its_share_of_the_global_batch():
    rows = list(range(7))
    shares = [distributed.Engine.shard(SimpleNamespace(world=2, rank=r), rows) for r in (0, 1)]
    assert shares == [([0, 1, 2, 3], True), ([4, 5, 6], True)]
    # a short last batch can leave a process nothing: it runs one row with weight 0
    assert distributed.Engine.shard(SimpleNamespace(world=2, rank=1), [9]) == ([9], False)
    assert distributed.Engine.shard(SimpleNamespace(world=1, rank=0), rows) == (rows, True)


def test_fp8_without_a_capable_gpu_is_one_clear_line(tmp_path):
    import torch

    if torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9):
        pytest.skip("this machine has an FP8-capable GPU")
    r = run_cli("train", *TINY, "precision=fp8", f"output_dir={tmp_path / 'run'}", "trainer.max_steps=1")
    assert r.returncode == 2
    err = r.stderr.strip().splitlines()
    assert err[-1].startswith("ftctl: error: precision=fp8 needs an NVIDIA GPU of compute capability >= 8.9")
    assert "torchao or transformer-engine" in err[-1] and not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- real 2-process runs
@pytest.mark.slow
def test_ddp_two_processes_give_the_one_process_losses(tmp_path, one_process):
    out = tmp_path / "ddp"
    r = _launch(out, "ddp", "trainer.max_steps=4")
    assert r.returncode == 0, r.stderr[-3000:]
    assert _losses(out) == pytest.approx(_losses(one_process), rel=1e-5)
    assert len(_losses(out)) == 4  # one writer: each step logged once
    man = json.loads((out / "manifest.json").read_text())
    assert man["status"] == "finished" and man["distributed"] == "ddp" and man["world_size"] == 2
    assert man["total_steps"] == 4 and [m["tokens"] for m in read_metrics(out) if "tokens" in m] == \
        [m["tokens"] for m in read_metrics(one_process) if "tokens" in m]
    assert (out / "launch" / "config.yaml").is_file() and "torch.distributed.run" in (out / "launch" / "command.txt").read_text()
    assert r.stdout.count("done in") == 1  # progress and results from the main process only
    _same_adapter(one_process, out)


@pytest.mark.slow
@pytest.mark.parametrize("strategy, fmt", [("zero2", "deepspeed"), ("zero3", "deepspeed"), ("fsdp", "dcp")])
def test_sharded_run_checkpoints_and_resumes_to_the_one_process_result(tmp_path, one_process, strategy, fmt):
    out = tmp_path / strategy
    r = _launch(out, strategy, "trainer.max_steps=2")
    assert r.returncode == 0, r.stderr[-3000:]
    from ftctl.train.checkpoint import complete_checkpoints

    (ckpt,) = complete_checkpoints(out / "checkpoints")
    meta = json.loads((ckpt / "checkpoint.json").read_text())
    assert meta["format"] == fmt and meta["world_size"] == 2
    shards = "optim_states" if fmt == "deepspeed" else ".distcp"
    assert sum(shards in name for name in meta["files"]) == 2  # one optimizer shard per process
    # go on from the step-2 checkpoint to step 4: the same losses and adapter as 4 uninterrupted steps in one process
    r = _launch(out, strategy, "trainer.max_steps=4", "resume=true")
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resumed from {ckpt} at step 2" in r.stdout
    assert _losses(out) == pytest.approx(_losses(one_process), rel=1e-5)
    _same_adapter(one_process, out)
    if strategy != "fsdp":
        return
    # a checkpoint resumes only under the strategy that wrote it
    cfg, choices = compose(*TINY, f"output_dir={out}", "trainer.max_steps=6", "resume=true")
    with pytest.raises(RunDirError, match=f"written by distributed={strategy}"):
        train(cfg, choices)


@pytest.mark.slow
def test_a_failing_worker_surfaces_its_error(tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"instruction": "a", "output": "b"}, {"nothing": 1}])
    r = _launch(tmp_path / "run", "ddp", f"data.path={bad}", "trainer.max_steps=2")
    assert r.returncode != 0
    assert "ftctl: error:" in r.stderr and "bad.jsonl" in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("ftctl: error: a training process failed")
