"""`ftctl train -m ...`: Hydra's multirun over the same composition, and the sweep report.

Each trial gets its own run directory under multirun/<recipe>/<time>/<n> with a ``trial.json`` (its
overrides, status, error, the sweep metric with its direction, and its value); a failed trial is recorded and the sweep goes on;
Ctrl-C (or SIGTERM) saves the running trial's checkpoint and stops, the finished trials intact. Hydra's
sweeper and launcher plugins work as they do in any Hydra app: ``hydra/sweeper=optuna`` (search over
``interval(a,b)``, ``choice(...)`` and ``range(...)`` with ``hydra.sweeper.n_trials``),
``hydra/launcher=joblib`` (trials side by side on this machine) and ``hydra/launcher=submitit_slurm``
(one SLURM job per trial). Each trial returns the sweep metric (``sweep.metric``), which is what Optuna
optimises.

``ftctl sweep report DIR`` (also printed when a sweep ends): one row per trial with the swept values,
trainable parameters, final train and validation loss, the eval.after_train metrics, tokens/s, peak memory
and wall time, the best trial marked (report.best_trial, the rule of ``ftctl report``'s sweep page too); written as DIR/report.md and DIR/report.csv, with
DIR/plots/sweep_metric.png (the metric against each swept value) and DIR/plots/sweep_loss.png (every
trial's loss curves overlaid).
"""
from __future__ import annotations

import csv
import io
import json
import math
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

from ftctl.config.compose import (
    compose,
    first_trial,
    prepare_overrides,
    recipe_search_path,
)
from ftctl.config.schema import register_schemas
from ftctl.config.validate import validate
from ftctl.core.atomic import atomic_write_json, atomic_write_text
from ftctl.core.console import make_console, markup_safe, table_console
from ftctl.core.errors import ConfigError, Preempted, RunDirError
from ftctl.core.paths import config_dir
from ftctl.report import (
    COLORS,
    TRIAL_FILE,
    best_trial,
    metric_direction,
    new_figure,
    read_trial,
    save_figure,
    split_rows,
    sweep_loss_figure,
    trial_value,
)
from ftctl.report import find_trials as with_manifest
from ftctl.rundir import read_metrics
from ftctl.train.loop import train


# ----------------------------------------------------------------------------- the sweep
def _sweeper(overrides: list[str]) -> str | None:
    return next((o.split("=", 1)[1] for o in overrides if o.startswith(("hydra/sweeper=", "+hydra/sweeper="))), None)


def _sweep_metric(overrides: list[str]) -> tuple[str, str]:
    """(sweep.metric, its direction) from the composition without the swept values; val_loss, min if it fails
    for another reason than the config."""

    plain = [o for o in overrides if not o.startswith(("hydra", "+hydra")) and "(" not in o]
    try:

        scfg, _ = compose("train", first_trial(plain))
        return str(scfg.sweep.metric), metric_direction(str(scfg.sweep.metric), str(scfg.sweep.direction))
    except ConfigError:
        raise
    except Exception:
        return "val_loss", "min"


def _hydra_argv(overrides: list[str], sweep_dir: Path, direction: str) -> list[str]:
    """Hydra's command line for the multirun: the overrides, Optuna's direction (unless given), the sweep folder."""

    extra = []
    if _sweeper(overrides) == "optuna" and not any(o.startswith("hydra.sweeper.direction=") for o in overrides):
        extra.append(f"hydra.sweeper.direction={'minimize' if direction == 'min' else 'maximize'}")
    return ["ftctl-train", "-m", *overrides, *extra, recipe_search_path(),
            f"hydra.sweep.dir={sweep_dir}", "hydra.sweep.subdir=${hydra.job.num}",
            "hydra/job_logging=none", "hydra/hydra_logging=none"]


def _run_trial(cfg, metric: str, direction: str, stopped: list, debug: bool) -> float:
    """One trial, inside Hydra's job: train into the trial's folder and record it in trial.json; returns the
    sweep metric (NaN when the trial failed, was preempted or did not run)."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    hc = HydraConfig.get()
    trial_dir = Path(hc.runtime.output_dir)
    label = " ".join(hc.overrides.task) or "(defaults)"
    record = {"overrides": list(hc.overrides.task), "job": hc.job.num, "metric": metric, "direction": direction,
              "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    if stopped:
        _write_trial(trial_dir, {**record, "status": "not run", "error": "the sweep was stopped"})
        return math.nan
    _write_trial(trial_dir, {**record, "status": "running"})
    try:
        validate(cfg)
        with open_dict(cfg):
            if not cfg.output_dir:
                cfg.output_dir = str(trial_dir)

        out = train(cfg, {k: v for k, v in hc.runtime.choices.items() if not k.startswith("hydra") and v},
                    debug=debug)
        value = trial_value(json.loads((Path(out) / "manifest.json").read_text()), metric)
        _write_trial(trial_dir, {**record, "status": "finished", "value": value, "run": str(out)})
        return value if value is not None else math.nan
    except Preempted as e:  # SIGTERM/SIGINT stops the whole sweep; the finished trials stay
        stopped.append(e)
        _write_trial(trial_dir, {**record, "status": "preempted", "error": str(e)})
        return math.nan
    except Exception as e:  # one failed trial must not end the sweep
        if debug:
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"ftctl: trial [{label}] failed: {msg}", file=sys.stderr)
        _write_trial(trial_dir, {**record, "status": "failed", "error": msg})
        return math.nan  # Optuna records a NaN as a failed trial and goes on


def _sweep_exit(sweep_dir: Path, interrupted: bool, stopped: list) -> int:
    """The report of what ran, and the exit status: 0 all finished, 1 a trial failed, 130 Ctrl-C, or the stop's."""
    if not sweep_dir.is_dir():
        return 130 if interrupted else 1

    rows = sweep_report(sweep_dir, console=make_console())
    if interrupted:
        return 130
    if stopped:
        print(f"ftctl: sweep stopped: {stopped[0]}; finished trials are in {sweep_dir}", file=sys.stderr)
        return stopped[0].exit_code
    failed = [r for r in rows if r["status"] != "finished"]
    print(f"sweep {sweep_dir}: {len(rows) - len(failed)} finished, {len(failed)} failed")
    return 1 if failed else 0


def multirun(overrides: list[str], debug: bool = False) -> int:
    import hydra

    register_schemas()
    overrides = prepare_overrides(overrides)
    sweep_dir = _sweep_dir(overrides)
    overrides = [o for o in overrides if not o.startswith("hydra.sweep.dir=")]
    metric, direction = _sweep_metric(overrides)
    stopped: list[Exception] = []

    @hydra.main(config_path=str(config_dir()), config_name="train", version_base="1.3")
    def job(cfg):
        return _run_trial(cfg, metric, direction, stopped, debug)

    argv = sys.argv
    sys.argv = _hydra_argv(overrides, sweep_dir, direction)
    interrupted = False
    try:
        job()
    except KeyboardInterrupt:
        interrupted = True
        print(f"ftctl: sweep interrupted; finished trials are in {sweep_dir}", file=sys.stderr)
    finally:
        sys.argv = argv
    return _sweep_exit(sweep_dir, interrupted, stopped)


def _sweep_dir(overrides: list[str]) -> Path:
    """hydra.sweep.dir= from the command line (a new or empty folder), else multirun/<recipe>/<time>."""
    given = next((o.split("=", 1)[1] for o in overrides if o.startswith("hydra.sweep.dir=")), None)
    if given is None:
        recipe = next((o.split("=", 1)[1] for o in overrides if o.startswith("recipe=")), "train")
        return Path(f"multirun/{recipe.replace(',', '+')}/{datetime.now():%Y%m%d-%H%M%S}")
    if not given.strip() or "${" in given:
        raise ConfigError(f"hydra.sweep.dir={given}: give a plain folder (no interpolation)")
    folder = Path(given).expanduser()
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise RunDirError(f"hydra.sweep.dir={given}: {folder} already exists and is not an empty folder",
                          hint="choose a new folder; a sweep's trials are numbered from 0 and would mix with what is there")
    return folder


def _write_trial(trial_dir: Path, record: dict) -> None:

    trial_dir.mkdir(parents=True, exist_ok=True)
    if record.get("status") != "running":
        record["ended"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    atomic_write_json(trial_dir / TRIAL_FILE, record)


# ----------------------------------------------------------------------------- a sweep's trials
def find_trials(folder: Path, depth: int = 3) -> list[Path]:
    """Trial folders (with trial.json, a manifest.json or Hydra's .hydra/) under a sweep folder, in natural order."""

    found = set(with_manifest(folder, depth))
    for marker in (TRIAL_FILE, ".hydra"):
        for f in Path(folder).glob(f"**/{marker}"):
            if len(f.relative_to(folder).parts) <= depth + 1 and f.parent != Path(folder):
                found.add(f.parent)
    import re

    def key(p: Path):
        return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(p.relative_to(folder)))]
    return sorted(found, key=key)


def collect(folder: Path, metric: str | None = None) -> tuple[list[dict], list[str], str, str]:
    """(rows, swept keys, metric, direction) for the trials of a sweep folder; the best trial by
    report.best_trial, the rule the sweep page of ``ftctl report`` follows too."""
    folder = Path(folder)
    rows = []
    for d in find_trials(folder):
        t = read_trial(d)
        rows.append({"trial": str(d.relative_to(folder)), **t, "metric_name": t["record"].get("metric")})
    keyed = [dict(o.split("=", 1) for o in r["overrides"] if "=" in o) for r in rows]
    all_keys = list(dict.fromkeys(k for kv in keyed for k in kv))
    swept = [k for k in all_keys if len({kv.get(k) for kv in keyed}) > 1]
    metric, direction, values, best = best_trial(rows, metric)
    for i, (r, kv, value) in enumerate(zip(rows, keyed, values)):
        man = r["manifest"]
        r["swept"] = {k: kv.get(k) for k in swept}
        r["value"] = value
        r["scores"] = {k: v for k, v in (man.get("eval") or {}).items()
                       if k != "seconds" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        r["best"] = i == best
    return rows, swept, metric, direction


# ----------------------------------------------------------------------------- the report
COLUMNS = ("trainable_params", "trainable_percent", "final_train_loss", "final_val_loss")


def _table(rows: list[dict], swept: list[str], metric: str) -> tuple[list[str], list[list]]:
    """Header and rows (raw values) shared by the markdown, CSV and terminal tables."""
    scores = list(dict.fromkeys(k for r in rows for k in r["scores"]))
    own = metric not in ("val_loss", "train_loss", "tokens_per_s", "peak_memory", "wall_time", *scores)
    head = (["trial", *swept, "status", "trainable params", "trainable %", "train loss", "val loss", *scores,
             "tokens/s", "peak MiB", "wall s", *([metric] if own else []), "best"])
    out = []
    for r in rows:
        m = r["manifest"]
        peak = m.get("peak_memory_bytes")
        out.append([r["trial"], *[r["swept"].get(k) for k in swept], r["status"], m.get("trainable_params"),
                    m.get("trainable_percent"), m.get("final_train_loss"), m.get("final_val_loss"),
                    *[r["scores"].get(k) for k in scores], m.get("train_tokens_per_s"),
                    None if peak is None else round(peak / 2 ** 20, 1), m.get("wall_time_s"),
                    *([r["value"]] if own else []), "best" if r["best"] else ""])
    return head, out


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, str) and len(v) > 8 and _as_number(v) is not None:  # Optuna's 0.0054943435116692795
        return f"{float(v):.4g}"
    if isinstance(v, float):
        if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
            return f"{v:.3e}"
        return f"{v:.5g}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return str(v)


def _markdown(folder: Path, rows, swept, metric, direction, head, table) -> str:
    lines = [f"# Sweep {folder}", "",
             f"{len(rows)} trials; swept: {', '.join(swept) or '(nothing varies)'}; "
             f"best by {metric} ({'lowest' if direction == 'min' else 'highest'}), marked **best**.", ""]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "|".join("---" if i < len(swept) + 2 else "---:" for i in range(len(head))) + "|")
    for r, row in zip(rows, table):
        cells = [_fmt(v) for v in row]
        if r["best"]:
            cells = [f"**{c}**" for c in cells]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    errors = [(r["trial"], r["error"]) for r in rows if r["status"] != "finished" and r["error"]]
    if errors:
        lines += ["", "## Trials that did not finish", ""] + [f"- trial {t}: {e}" for t, e in errors]
    lines += ["", f"![{metric} against each swept value](plots/sweep_metric.png)", "",
              "![loss curves of every trial](plots/sweep_loss.png)", ""]
    return "\n".join(lines)


def _csv(head, table) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(head)
    for row in table:
        w.writerow(["" if v is None else v for v in row])
    return buf.getvalue()


def _as_number(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def metric_figure(rows, swept, metric, direction):
    """The metric against each swept value: one panel per swept key (log scale for wide numeric ranges)."""

    keys = swept or ["trial"]
    fig, axes = new_figure(len(keys), width=max(5.2, 4.4 * len(keys)), height=3.6)
    for ax, key in zip(axes, keys):
        pts = [(r["swept"].get(key) if key != "trial" else r["trial"], r["value"], r["best"]) for r in rows
               if r["value"] is not None]
        nums = [_as_number(p[0]) for p in pts]
        if pts and all(n is not None for n in nums):
            order = sorted(range(len(pts)), key=lambda i: nums[i])
            xs, ys = [nums[i] for i in order], [pts[i][1] for i in order]
            ax.plot(xs, ys, color=COLORS[0], marker="o", linewidth=1.5)
            if min(xs) > 0 and max(xs) / min(xs) >= 8:
                ax.set_xscale("log", base=2)
            ax.set_xticks(sorted(set(xs)), [_fmt(x) if x != int(x) else str(int(x)) for x in sorted(set(xs))])
            bx = [nums[i] for i in range(len(pts)) if pts[i][2]]
            by = [pts[i][1] for i in range(len(pts)) if pts[i][2]]
        else:  # categorical values (methods, schedulers...)
            labels = [str(p[0]) for p in pts]
            ax.bar(range(len(pts)), [p[1] for p in pts], color=[COLORS[1] if p[2] else COLORS[0] for p in pts])
            ax.set_xticks(range(len(pts)), labels, rotation=30 if len(pts) > 4 else 0, ha="right" if len(pts) > 4 else "center")
            bx = [i for i, p in enumerate(pts) if p[2]]
            by = [p[1] for p in pts if p[2]]
        if bx:
            ax.plot(bx, by, linestyle="none", marker="*", markersize=14, color=COLORS[3], label="best", zorder=5)
            ax.legend(frameon=False, fontsize=8)
        ax.set_xlabel(key)
        ax.set_ylabel(metric)
        ax.yaxis.get_major_formatter().set_useOffset(False)  # 10.698, not 1.07e1 + 0.002
        ax.set_title(f"{metric} ({'lower' if direction == 'min' else 'higher'} is better) against {key}", fontsize=10)
    return fig


def loss_figure(rows):
    """Every trial's loss curves overlaid (report.sweep_loss_figure, as on ftctl report's sweep page)."""

    trials = []
    for r in rows:
        steps, val = split_rows(read_metrics(r["dir"])) if (r["dir"] / "metrics.jsonl").is_file() else ([], [])
        trials.append({"train": steps, "val": val, "best": r["best"],
                       "label": " ".join(f"{k}={v}" for k, v in r["swept"].items()) or r["trial"]})
    return sweep_loss_figure(trials)


def sweep_report(folder, metric: str | None = None, console=None) -> list[dict]:
    """Write report.md, report.csv and the two plots for a sweep folder; print the table. Returns the rows."""

    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise RunDirError(f"{folder}: no such sweep folder")
    rows, swept, metric, direction = collect(folder, metric)
    if not rows:
        raise RunDirError(f"{folder}: no trials in it (no sub-folder with trial.json, manifest.json or .hydra/)")
    head, table = _table(rows, swept, metric)
    atomic_write_text(folder / "report.md", _markdown(folder, rows, swept, metric, direction, head, table))
    atomic_write_text(folder / "report.csv", _csv(head, table))
    (folder / "plots").mkdir(exist_ok=True)
    save_figure(metric_figure(rows, swept, metric, direction), folder / "plots" / "sweep_metric.png")
    save_figure(loss_figure(rows), folder / "plots" / "sweep_loss.png")
    if console is not None:
        from rich.table import Table

        t = Table(show_header=True, header_style="bold", title=f"sweep {markup_safe(str(folder))}")
        for i, h in enumerate(head):
            t.add_column(h, justify="left" if i < len(swept) + 2 else "right")
        for r, row in zip(rows, table):
            t.add_row(*[markup_safe(_fmt(v)) for v in row], style="bold green" if r["best"] else None)

        table_console(console, len(head)).print(t)
        best = next((r for r in rows if r["best"]), None)
        if best is not None:
            values = " ".join(f"{k}={_fmt(v)}" for k, v in best["swept"].items()) or " ".join(best["overrides"])
            console.print(f"best by {metric}: trial {best['trial']} ({values}) = {best['value']:.6g}", highlight=False,
                          markup=False)
        console.print(f"wrote {folder / 'report.md'}, {folder / 'report.csv'}, {folder / 'plots' / 'sweep_metric.png'}, "
                      f"{folder / 'plots' / 'sweep_loss.png'}", highlight=False, markup=False)
    return rows


@dataclass
class SweepReportConfig:
    dir: Optional[str] = None  # the sweep folder (multirun/<recipe>/<time>)
    metric: Optional[str] = None  # default: the sweep's own sweep.metric (val_loss)
