"""Sweeps: the report (rows, CSV, Markdown, plots), Optuna, the joblib launcher, SLURM's composition,
Ctrl-C, and `ftctl runs` over run directories."""
import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import run_cli

TINY = ["model=tiny_llama", "trainer.max_steps=2", "data.limit=32", "trainer.eval_every=0", "logging.plots=false"]


def _sweep_dir(cwd: Path) -> Path:
    dirs = sorted((cwd / "multirun" / "train").glob("*"))
    assert len(dirs) == 1, dirs
    return dirs[0]


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def _csv_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_rank_sweep_writes_the_report_with_rows_files_and_plots(tmp_path):
    r = run_cli("train", "-m", *TINY, "peft.r=2,8,0", cwd=tmp_path)
    assert r.returncode == 1, r.stderr[-2000:]  # one trial fails; the sweep goes on and says so
    assert "2 finished, 1 failed" in r.stdout and "best by val_loss" in r.stdout
    sweep = _sweep_dir(tmp_path)
    rows = _csv_rows(sweep / "report.csv")
    assert [row["peft.r"] for row in rows] == ["2", "8", "0"]
    assert [row["status"] for row in rows] == ["finished", "finished", "failed"]
    mans = [json.loads((sweep / str(i) / "manifest.json").read_text()) for i in (0, 1)]
    for row, man in zip(rows, mans):
        assert int(row["trainable params"]) == man["trainable_params"]
        assert float(row["val loss"]) == pytest.approx(man["final_val_loss"])
        assert float(row["train loss"]) == pytest.approx(man["final_train_loss"])
        assert float(row["peak MiB"]) == pytest.approx(man["peak_memory_bytes"] / 2 ** 20, abs=0.1)
        assert float(row["tokens/s"]) == pytest.approx(man["train_tokens_per_s"])
        assert float(row["wall s"]) == pytest.approx(man["wall_time_s"])
    assert int(rows[1]["trainable params"]) == 4 * int(rows[0]["trainable params"])  # rank 8 vs rank 2
    best = min((0, 1), key=lambda i: mans[i]["final_val_loss"])
    assert [row["best"] for row in rows] == ["best" if i == best else "" for i in range(3)]
    failed = json.loads((sweep / "2" / "trial.json").read_text())
    assert failed["status"] == "failed" and "peft.r=0 must be > 0" in failed["error"]
    md = (sweep / "report.md").read_text()
    assert md.count("\n| ") == 4 and "peft.r=0 must be > 0" in md and "plots/sweep_metric.png" in md
    for name in ("sweep_metric", "sweep_loss"):
        w, h = _png_size(sweep / "plots" / f"{name}.png")
        assert w >= 500 and h >= 300
    # on demand, by another metric: the best trial follows it
    r = run_cli("sweep", "report", sweep, "metric=train_loss", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    rows = _csv_rows(sweep / "report.csv")
    best = min((0, 1), key=lambda i: mans[i]["final_train_loss"])
    assert [row["best"] for row in rows][:2] == ["best" if i == best else "" for i in (0, 1)]
    bad = run_cli("sweep", "report", tmp_path / "nothing", cwd=tmp_path)
    assert bad.returncode != 0 and "no such sweep folder" in bad.stderr


@pytest.mark.slow
def test_optuna_sweep_over_lr_and_rank_reports_its_best_trial(tmp_path):
    import yaml

    r = run_cli("train", "-m", *TINY, "hydra/sweeper=optuna", "hydra.sweeper.n_trials=3", "hydra.sweeper.sampler.seed=0",
                "trainer.lr=interval(1e-4,1e-2)", "peft.r=choice(2,4)", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    sweep = _sweep_dir(tmp_path)
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    rows = _csv_rows(sweep / "report.csv")
    assert len(rows) == 3 and all(row["status"] == "finished" for row in rows)
    lrs = [float(row["trainer.lr"]) for row in rows]
    assert all(1e-4 <= lr <= 1e-2 for lr in lrs) and len(set(lrs)) == 3
    best = next(row for row in rows if row["best"] == "best")
    assert float(best["val loss"]) == pytest.approx(results["best_value"])
    assert float(best["trainer.lr"]) == pytest.approx(results["best_params"]["trainer.lr"])
    assert float(best["val loss"]) == min(float(row["val loss"]) for row in rows)


@pytest.mark.slow
def test_joblib_launcher_runs_trials_side_by_side(tmp_path):
    r = run_cli("train", "-m", *TINY, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "peft.r=2,4", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    sweep = _sweep_dir(tmp_path)
    trials = [json.loads((sweep / str(i) / "trial.json").read_text()) for i in (0, 1)]
    assert [t["status"] for t in trials] == ["finished", "finished"]
    assert [json.loads((sweep / str(i) / "adapter" / "adapter_config.json").read_text())["r"] for i in (0, 1)] == [2, 4]
    # the two trials overlapped in time: the second started before the first ended
    assert trials[1]["started"] <= trials[0]["ended"]


def test_submitit_slurm_launcher_composes():
    """No cluster here: the SLURM launcher's config composes with ftctl's, with the user's settings."""
    import hydra

    from ftctl.config.compose import recipe_search_path
    from ftctl.config.schema import register_schemas
    from ftctl.core.paths import config_dir

    register_schemas()
    with hydra.initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = hydra.compose("train", overrides=["model=tiny_llama", "hydra/launcher=submitit_slurm",
                                                "hydra.launcher.partition=gpu", "hydra.launcher.gpus_per_node=8",
                                                "hydra.launcher.timeout_min=240", recipe_search_path()],
                            return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher.partition, launcher.gpus_per_node, launcher.timeout_min) == ("gpu", 8, 240)
    assert cfg.model.name == "tiny_llama"


@pytest.mark.slow
def test_ctrl_c_stops_the_sweep_with_finished_trials_intact(tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("FTCTL_DEBUG", None)
    p = subprocess.Popen([sys.executable, "-m", "ftctl.cli", "train", "-m", "model=tiny_llama", "data.limit=32",
                          "trainer.eval_every=0", "trainer.save_every=0", "logging.plots=false", "trainer.log_every=1",
                          "trainer.max_steps=3,400,400"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    second = None
    while time.time() < deadline:
        dirs = sorted((tmp_path / "multirun" / "train").glob("*/1"))
        if dirs and (dirs[0] / "metrics.jsonl").is_file() and (dirs[0] / "metrics.jsonl").read_text().count("\n") >= 2:
            second = dirs[0]
            break
        time.sleep(0.5)
    assert second is not None, "the second trial never started"
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=300)
    assert p.returncode != 0
    sweep = second.parent
    assert json.loads((sweep / "0" / "manifest.json").read_text())["status"] == "finished"
    assert (sweep / "0" / "adapter" / "adapter_config.json").is_file()
    assert json.loads((sweep / "1" / "manifest.json").read_text())["status"] == "preempted"
    assert any((sweep / "1" / "checkpoints").iterdir())  # resumable
    assert not (sweep / "2" / "manifest.json").exists()  # never started
    rows = _csv_rows(sweep / "report.csv")
    assert [row["status"] for row in rows[:2]] == ["finished", "preempted"]
    assert "finished trials are in" in err


def _run_dir(d: Path, r: int, status: str, val: float, metrics: dict | None = None) -> Path:
    d.mkdir(parents=True)
    (d / "manifest.json").write_text(json.dumps({"status": status, "recipe": "demo", "peft_method": "lora",
                                                 "total_steps": 4, "final_train_loss": val + 0.1,
                                                 "final_val_loss": val, "eval": metrics or {},
                                                 "trainable_params": 1024 * r, "started": "2026-12-01T10:00:00"}))
    (d / "config.yaml").write_text(f"model:\n  name: tiny_llama\npeft:\n  method: lora\n  r: {r}\ntrainer:\n  lr: 0.001\n")
    (d / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": val + 1 / s}) + "\n" for s in (1, 2, 3)))
    return d


def test_runs_lists_and_compares_run_directories(tmp_path):
    a = _run_dir(tmp_path / "outputs" / "a", 4, "finished", 1.25, {"rougeL": 0.31})
    b = _run_dir(tmp_path / "outputs" / "sub" / "b", 16, "failed", 1.5)
    (a / "checkpoints" / "step-2").mkdir(parents=True)  # not a run of its own
    r = run_cli("runs", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "2 runs" in r.stdout and "outputs/a" in r.stdout and "outputs/sub/b" in r.stdout
    assert "rougeL=0.31" in r.stdout and "3/4" in r.stdout and "failed" in r.stdout
    r = run_cli("runs", "outputs", "status=failed", cwd=tmp_path)
    assert "1 runs" in r.stdout and "outputs/sub/b" in r.stdout and "outputs/a " not in r.stdout
    r = run_cli("runs", "compare", a, b, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "1 keys differ" in r.stdout and "peft.r" in r.stdout and "model.name" not in r.stdout
    assert "16" in r.stdout and "1.25" in r.stdout and "eval rougeL" in r.stdout
    bad = run_cli("runs", "compare", a, cwd=tmp_path)
    assert bad.returncode != 0 and "two or more" in bad.stderr
    bad = run_cli("runs", "compare", a, tmp_path / "nope", cwd=tmp_path)
    assert bad.returncode != 0 and "not a run directory" in bad.stderr
