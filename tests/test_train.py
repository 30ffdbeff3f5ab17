"""Training on tiny_llama: loss goes down, exact resume, run-directory rules, checkpoints."""
import json
import shutil

import pytest
from conftest import compose
from safetensors.torch import load_file

from ftctl.core.errors import RunDirError
from ftctl.rundir import read_metrics
from ftctl.train import checkpoint
from ftctl.data.batches import batch_indices
from ftctl.train.loop import train

TINY = ["model=tiny_llama", "data.limit=64", "data.max_length=128", "trainer.batch_size=4",
        "trainer.log_every=1", "trainer.eval_every=0", "trainer.warmup_steps=0"]


def _train(out, *extra):
    cfg, choices = compose(*TINY, f"output_dir={out}", *extra)
    return train(cfg, choices)


@pytest.mark.parametrize("method, lr, drop", [("full", 5e-3, 1.0), ("lora", 3e-2, 0.1)])
def test_loss_goes_down(tmp_path, method, lr, drop):
    out = _train(tmp_path / "run", "trainer.max_steps=30", f"trainer.lr={lr}", "trainer.scheduler=constant",
                 f"peft={method}")
    losses = [m["loss"] for m in read_metrics(out) if "loss" in m]
    assert len(losses) == 30
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - drop, (first, last)
    if method == "full":
        assert (out / "model" / "config.json").is_file() and not (out / "adapter").exists()
        return
    man = json.loads((out / "manifest.json").read_text())
    assert man["status"] == "finished" and man["model_path"].endswith("tiny-llama-v1")
    assert man["seed"] == 42 and len(man["data_fingerprint"]) == 64 and man["versions"]["torch"]
    assert (out / "config.yaml").is_file() and (out / "train.log").is_file()
    # the adapter is a PEFT folder that peft loads back, with the tokenizer beside it
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(man["model_path"])
    model = PeftModel.from_pretrained(base, out / "adapter")
    assert sum(p.numel() for n, p in model.named_parameters() if "lora_" in n) == man["trainable_params"]
    AutoTokenizer.from_pretrained(out / "adapter")


def test_packed_training_runs_and_counts_real_tokens(tmp_path):
    out = _train(tmp_path / "run", "trainer.max_steps=8", "trainer.lr=3e-2", "trainer.scheduler=constant",
                 "data.packing=true", "data.max_length=256", "trainer.batch_size=2", "data.val_fraction=0.25")
    man = json.loads((out / "manifest.json").read_text())
    assert man["status"] == "finished" and "packed into" in man["data"]["train"]
    # 48 training rows of ~75 tokens packed 3 to a row: 16 rows; 8 steps x 2 rows = one epoch
    assert man["train_rows"] < 48
    rows = read_metrics(out)
    losses = [m["loss"] for m in rows if "loss" in m]
    assert len(losses) == 8 and losses[-1] < losses[0]
    assert rows[-2 if "val_loss" in rows[-1] else -1]["epoch"] == pytest.approx(16 / man["train_rows"], abs=0.01)
    assert any("val_loss" in m for m in rows)


def test_batch_positions_cover_each_epoch_once():
    n, bs = 10, 4
    epoch0 = [i for k in range(3) for i in batch_indices(n, bs, 7, True, k)]
    epoch1 = [i for k in range(3, 6) for i in batch_indices(n, bs, 7, True, k)]
    assert sorted(epoch0) == list(range(10)) and sorted(epoch1) == list(range(10)) and epoch0 != epoch1


def test_resume_equals_uninterrupted_run(tmp_path):
    steps = ["trainer.max_steps=8", "trainer.save_every=4", "trainer.keep_checkpoints=3", "trainer.lr=5e-3",
             "trainer.grad_accum=2", "peft.dropout=0.1"]
    straight = _train(tmp_path / "straight", *steps)
    # a second run is stopped after step 4: keep only its step-4 checkpoint, then resume in a new process state
    half = tmp_path / "half"
    shutil.copytree(straight, half)
    shutil.rmtree(half / "adapter")
    shutil.rmtree(half / "checkpoints" / "step-000008")
    _train(half, *steps, "resume=true")
    a = load_file(str(straight / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(half / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        assert (a[k] - b[k]).abs().max().item() < 1e-6, k
    # the metrics of the resumed run continue the first half without repeating steps
    steps_logged = [m["step"] for m in read_metrics(half) if "loss" in m]
    assert steps_logged == list(range(1, 9))
    # and a resume from a named checkpoint works the same way
    ck = straight / "checkpoints" / "step-000004"
    assert checkpoint.is_complete(ck)


def test_finished_run_is_not_overwritten(tmp_path):
    out = _train(tmp_path / "run", "trainer.max_steps=1")
    (out / "my_notes.txt").write_text("mine")
    with pytest.raises(RunDirError, match="already holds a finished run"):
        _train(out, "trainer.max_steps=1")
    _train(out, "trainer.max_steps=1", "overwrite=true")
    assert (out / "my_notes.txt").read_text() == "mine"  # never deletes what it did not create


def test_incomplete_checkpoint_is_skipped(tmp_path):
    out = _train(tmp_path / "run", "trainer.max_steps=4", "trainer.save_every=2", "trainer.keep_checkpoints=2")
    ck = out / "checkpoints"
    assert [p.name for p in checkpoint.complete_checkpoints(ck)] == ["step-000002", "step-000004"]
    # a checkpoint whose file was cut short (a crash in the middle of a save) is not used
    f = ck / "step-000004" / "optimizer.pt"
    f.write_bytes(f.read_bytes()[:100])
    assert checkpoint.find_resume(out, True).name == "step-000002"
    # a half-written temporary folder is ignored too
    (ck / ".tmp-step-000006-1").mkdir()
    assert checkpoint.find_resume(out, True).name == "step-000002"
    with pytest.raises(RunDirError, match="incomplete"):
        checkpoint.find_resume(out, str(ck / "step-000004"))


@pytest.mark.parametrize("recipe, path", [("hh_rlhf_pairs", "hh_rlhf/harmless_base.jsonl.gz"),
                                          ("sms_spam", "sms_spam/sms_spam.csv")])
def test_shared_data_recipes_train_on_tiny_llama(tmp_path, recipe, path):
    from conftest import SHARED_DATA

    f = SHARED_DATA / path
    if not f.is_file():
        pytest.skip(f"{f} is absent (the shared datasets live beside the repository, in ../shared/data)")
    cfg, choices = compose(f"recipe={recipe}", "model=tiny_llama", f"data.path={f}", "data.limit=60",
                           "trainer.max_steps=2", "trainer.batch_size=2", f"output_dir={tmp_path / 'run'}")
    out = train(cfg, choices)
    man = json.loads((out / "manifest.json").read_text())
    assert man["status"] == "finished" and man["recipe"] == recipe and man["train_rows"] > 0
    assert len([m for m in read_metrics(out) if "loss" in m]) >= 1


def test_a_cold_model_cache_trains_as_a_warm_one(tmp_path, tiny_model_path):
    """Building a built-in model draws from torch's generator; the run is seeded after the model folder is
    resolved, so the first run on a machine (cold cache) trains exactly as the next ones (warm cache)."""
    from conftest import run_cli

    real = tiny_model_path.parent  # the cache's models/ folder, with the converted SmolLM2 the tiny tokenizer comes from
    cache = tmp_path / "cache"
    (cache / "models").mkdir(parents=True)
    for f in real.iterdir():
        if f.is_dir() and f.name != tiny_model_path.name:
            (cache / "models" / f.name).symlink_to(f, target_is_directory=True)
    args = [*TINY, "trainer.max_steps=3", "trainer.lr=1e-2", "logging.plots=false", "trainer.num_threads=1"]
    losses = []
    for name in ("cold", "warm"):
        r = run_cli("train", *args, f"output_dir={tmp_path / name}", env={"FTCTL_CACHE": str(cache)})
        assert r.returncode == 0, r.stderr
        losses.append([m["loss"] for m in read_metrics(tmp_path / name) if "loss" in m])
    assert (cache / "models" / tiny_model_path.name / "config.json").is_file()  # the first run built it
    assert losses[0] == losses[1] and len(losses[0]) == 3


def test_a_failed_setup_leaves_no_log_handler_behind(tmp_path):
    """A run that fails after its train.log is open (here: an adapter folder that is not there) closes the log,
    so the next run in the same process (a sweep's next trial) does not also write into it."""
    import logging

    from ftctl.core.errors import ConfigError

    before = list(logging.getLogger("ftctl").handlers)
    with pytest.raises(ConfigError, match="model.adapter="):
        _train(tmp_path / "run", "trainer.max_steps=1", f"model.adapter={tmp_path / 'no-such-adapter'}")
    assert (tmp_path / "run" / "train.log").is_file()
    assert logging.getLogger("ftctl").handlers == before
