"""One rule for a sweep's best trial: `ftctl sweep report` (report.csv, report.md, the console line) and the
sweep page of `ftctl report` (the highlighted row) name the same trial, by the sweep's metric and direction."""
import io
import json
import re
from pathlib import Path

import pytest


def _trial(d: Path, r: int, val: float, scores: dict, metric: str, status: str = "finished",
           trial_status: str | None = None, direction: str | None = None) -> Path:
    """A trial run directory as `ftctl train -m` leaves it: manifest.json, metrics.jsonl, trial.json, .hydra/."""
    d.mkdir(parents=True)
    overrides = ["model=tiny_llama", f"peft.r={r}"]
    man = {"status": status, "recipe": "demo", "total_steps": 3, "final_train_loss": val + 0.1,
           "final_val_loss": val, "eval": {**scores, "seconds": 2}, "trainable_params": 1024 * r,
           "train_tokens_per_s": 100.0 + r, "peak_memory_bytes": 2 ** 20 * r, "wall_time_s": 10.0}
    (d / "manifest.json").write_text(json.dumps(man))
    (d / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": val + 1 / s, "tokens": 100 * s}) + "\n"
                                             for s in (1, 2, 3)) + json.dumps({"step": 3, "val_loss": val}) + "\n")
    record = {"overrides": overrides, "job": r, "metric": metric, "status": trial_status or status,
              **({"direction": direction} if direction else {})}
    if trial_status in ("failed", "preempted"):
        record["error"] = "eval.after_train failed after training"
    (d / "trial.json").write_text(json.dumps(record))
    (d / ".hydra").mkdir()
    (d / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    return d


def _both_views(sweep: Path) -> tuple[str, str, str, str]:
    """(best in report.csv, best in report.md, best on the console, highlighted row of report.html)."""
    from rich.console import Console

    from ftctl.experiments.sweep import sweep_report
    from ftctl.report import ReportConfig, report

    buf = io.StringIO()
    rows = sweep_report(sweep, console=Console(file=buf, width=250))
    csv_best = [r["trial"] for r in rows if r["best"]]
    assert len(csv_best) == 1, rows
    md = (sweep / "report.md").read_text()
    md_best = re.findall(r"^\| \*\*(\w+)\*\* \|", md, re.M)
    said = re.findall(r"best by \S+: trial (\w+)", buf.getvalue())
    page = report(ReportConfig(run=str(sweep))).read_text()
    html_best = re.findall(r'<tr class="best"><td><a href="#trial-(\w+)">', page)
    assert len(md_best) == len(said) == len(html_best) == 1, (md_best, said, html_best)
    return csv_best[0], md_best[0], said[0], html_best[0]


@pytest.mark.parametrize("case", ["metric_is_an_eval_score", "the_lowest_val_loss_failed_after_training"])
def test_sweep_report_and_the_sweep_page_name_the_same_best_trial(tmp_path, case):
    sweep = tmp_path / "multirun" / "demo" / "20260101-120000"
    if case == "metric_is_an_eval_score":  # sweep.metric=exact_match: highest wins; trial 0 has the lowest val loss
        _trial(sweep / "0", 2, 1.0, {"exact_match": 0.2}, "exact_match")
        _trial(sweep / "1", 4, 1.5, {"exact_match": 0.9}, "exact_match")
        _trial(sweep / "2", 8, 1.2, {"exact_match": 0.5}, "exact_match")
        want = "1"
    else:  # sweep.metric=val_loss, but trial 0's eval.after_train failed after training: it is not a finished trial
        _trial(sweep / "0", 2, 1.0, {}, "val_loss", trial_status="failed")
        _trial(sweep / "1", 4, 1.5, {}, "val_loss")
        _trial(sweep / "2", 8, 1.2, {}, "val_loss")
        want = "2"
    assert _both_views(sweep) == (want, want, want, want)


def test_the_recorded_direction_is_the_rule_for_its_metric(tmp_path):
    """sweep.direction=max on a loss (written to trial.json) wins over the automatic direction, in both views;
    another metric asked for afterwards takes its own automatic direction."""
    from ftctl.report import best_trial, read_trial

    sweep = tmp_path / "sweep"
    for i, val in enumerate((1.0, 1.5, 1.2)):
        _trial(sweep / str(i), 2 ** (i + 1), val, {}, "val_loss", direction="max")
    assert _both_views(sweep) == ("1", "1", "1", "1")
    trials = [read_trial(sweep / str(i)) for i in range(3)]
    assert best_trial(trials)[:2] == ("val_loss", "max")
    metric, direction, values, best = best_trial(trials, "train_loss")
    assert (metric, direction, best) == ("train_loss", "min", 0)
    assert values == pytest.approx([1.1, 1.6, 1.3])
