"""``ftctl runs``: the run directories under folders, one line each; ``ftctl runs compare A B ...``: their
configs' differences and their figures side by side. Reads manifest.json, config.yaml and metrics.jsonl
(with ``ftctl.rundir``'s readers); loads no model."""
from __future__ import annotations

import json
from pathlib import Path

from ftctl.core import lock
from ftctl.core.console import markup_safe, table_console
from ftctl.core.errors import ConfigError, RunDirError
from ftctl.report import UnreadableRun, check_run
from ftctl.rundir import read_config

DEFAULT_ROOTS = ("outputs", "multirun")
FIGURES = (("status", "status"), ("recipe", "recipe"), ("peft_method", "method"), ("trainable_params", "trainable params"),
           ("total_steps", "steps"), ("final_train_loss", "train loss"), ("final_val_loss", "val loss"),
           ("train_tokens_per_s", "tokens/s"), ("peak_memory_bytes", "peak memory"), ("wall_time_s", "wall time (s)"))


def find_runs(roots: list[Path], depth: int = 5) -> list[Path]:
    found = []

    def walk(d: Path, level: int):
        if (d / "manifest.json").is_file():
            found.append(d)
            return  # a run's checkpoints are not runs
        if level >= depth:
            return
        try:
            children = sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith("."))
        except OSError:
            return
        for c in children:
            walk(c, level + 1)
    for r in roots:
        walk(r, 0)
    return found


def _manifest(run: Path) -> dict:
    """The run's manifest, checked (report.check_run): UnreadableRun (exit 2) naming what is wrong."""
    return check_run(run)[0]


def _last_step(rows: list[dict]) -> int | None:
    steps = [r["step"] for r in rows if isinstance(r.get("step"), int) and "loss" in r]
    return steps[-1] if steps else None


def _status(run: Path) -> str | None:
    """The manifest's status, or None when the run cannot be read."""
    try:
        return _manifest(run).get("status")
    except UnreadableRun:
        return None


def _row(run: Path) -> list[str]:
    """One line of ftctl runs (markup-safe cells): the run's figures, or why it cannot be read."""
    name = markup_safe(run)
    try:
        m, rows = check_run(run)
    except UnreadableRun as e:
        return [name, "-", "-", markup_safe(f"unreadable: {e.reason}"), "-", "-", "-", "-", "-"]
    last, total = _last_step(rows), m.get("total_steps")
    status = str(m.get("status", "?"))
    who = lock.holder(run)
    if who:
        status = f"{status}, {who}"
    cells = [str(m.get("recipe") or "-"), str(m.get("peft_method") or "-"), status,
             f"{last if last is not None else '-'}/{total if total is not None else '-'}",
             _fmt("", m.get("final_train_loss")), _fmt("", m.get("final_val_loss")), _scores(m),
             str(m.get("started") or "-")]
    return [name, *map(markup_safe, cells)]


def _fmt(key: str, v) -> str:
    if v is None:
        return "-"
    if key == "peak_memory_bytes":
        return f"{v / 2 ** 30:.2f} GiB" if v >= 2 ** 30 else f"{v / 2 ** 20:.0f} MiB"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return str(v)


def _scores(man: dict) -> str:
    ev = {k: v for k, v in (man.get("eval") or {}).items() if k != "seconds" and isinstance(v, (int, float))}
    return " ".join(f"{k}={v:.4g}" for k, v in ev.items() if not isinstance(v, bool)) or "-"


def list_runs(args: list[str], console) -> list[Path]:
    status = None
    roots = []
    for a in args:
        if a.startswith("status="):
            status = a.split("=", 1)[1]
        elif "=" in a:
            raise ConfigError(f"runs: unknown argument {a!r}; give folders and optionally status=finished|failed|...")
        else:
            roots.append(Path(a).expanduser())
    for r in roots:
        if not r.is_dir():
            raise RunDirError(f"runs: {r}: no such folder")
    runs = find_runs(roots or [Path(p) for p in DEFAULT_ROOTS if Path(p).is_dir()])
    if status:
        runs = [r for r in runs if _status(r) == status]
    from rich.table import Table

    t = Table(show_header=True, header_style="bold", title=f"{len(runs)} runs")
    for h in ("run", "recipe", "method", "status", "steps", "train loss", "val loss", "metrics", "started"):
        t.add_column(h, justify="right" if h in ("steps", "train loss", "val loss") else "left")
    for r in runs:
        t.add_row(*_row(r))

    table_console(console, 12).print(t)
    if not runs:
        where = ", ".join(str(r) for r in roots) or " and ".join(DEFAULT_ROOTS) + " (here)"
        console.print(f"no run directories (with manifest.json) under {markup_safe(where)}", highlight=False)
    return runs


def _flat(d, prefix: str = "") -> dict:
    out = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}{k}."))
    else:
        out[prefix[:-1]] = d
    return out


def config_differences(runs: list[Path]) -> tuple[list[str], dict, int]:
    """(keys whose values differ, {run: flat config}, number of keys that agree)."""
    from omegaconf import OmegaConf

    flats = {}
    for r in runs:
        try:
            cfg = read_config(r)
        except Exception as e:  # noqa: BLE001 - OmegaConf's and YAML's errors: the file is not a config
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
            raise RunDirError(f"runs compare: {r}/config.yaml cannot be read ({first})") from None
        if cfg is None:
            raise RunDirError(f"runs compare: {r}: no config.yaml (not a run directory)")
        flats[r] = _flat(OmegaConf.to_container(cfg, resolve=False)) if OmegaConf.is_dict(cfg) else {}
    keys = list(dict.fromkeys(k for fl in flats.values() for k in fl))
    differ = [k for k in keys if len({json.dumps(fl.get(k), sort_keys=True, default=str) for fl in flats.values()}) > 1]
    return differ, flats, len(keys) - len(differ)


def compare_runs(args: list[str], console) -> dict:
    runs = [Path(a).expanduser() for a in args]
    if len(runs) < 2:
        raise ConfigError("runs compare needs two or more run directories: ftctl runs compare RUN RUN [...]")
    for r in runs:
        if not (r / "manifest.json").is_file():
            raise RunDirError(f"runs compare: {r}: not a run directory (no manifest.json)")
    mans = [_manifest(r) for r in runs]  # first: an unreadable run is one line
    differ, flats, same = config_differences(runs)
    from rich.table import Table

    names = [markup_safe(r) for r in runs]
    t = Table(show_header=True, header_style="bold", title=f"config: {len(differ)} keys differ, {same} agree")
    t.add_column("key")
    for n in names:
        t.add_column(n)
    for k in differ:
        t.add_row(markup_safe(k), *[markup_safe(_fmt("", flats[r].get(k))) for r in runs])

    console = table_console(console, 3 + 2 * len(runs))
    console.print(t)
    t2 = Table(show_header=True, header_style="bold", title="figures")
    t2.add_column("")
    for n in names:
        t2.add_column(n, justify="right")
    for key, label in FIGURES:
        t2.add_row(label, *[markup_safe(_fmt(key, m.get(key))) for m in mans])
    scores = list(dict.fromkeys(k for m in mans for k, v in (m.get("eval") or {}).items()
                                if k != "seconds" and isinstance(v, (int, float))))
    for s in scores:
        t2.add_row(markup_safe(f"eval {s}"), *[markup_safe(_fmt("", (m.get("eval") or {}).get(s))) for m in mans])
    console.print(t2)
    return {"differ": differ, "same": same}
