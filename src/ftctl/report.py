"""Plots of a run's metrics (``<run>/plots/*.png``, written when a run ends) and ``ftctl report``: one
self-contained ``report.html`` for a run directory or a sweep folder (the PNGs inlined as data URIs,
inline CSS, no scripts, nothing fetched), which opens in any browser without a server or network.

Plots (matplotlib's Agg renderer; each written atomically, only those the run has data for):

    loss.png         training and validation loss against steps and against tokens seen
    lr.png           the learning rate
    throughput.png   tokens/s against steps, and tokens seen against wall-clock time
    grad_norm.png    the gradient norm before clipping, with the clipping threshold
    preference.png   preference runs: implicit rewards and their margin, preference accuracy
    eval.png         the scores of every eval/<name>.json (tuned, base, k-shot side by side)
"""
from __future__ import annotations

import base64
import contextlib
import html
import io
import json
import logging
import math
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Optional

from ftctl import __version__
from ftctl.core import lock
from ftctl.core.atomic import atomic_file, atomic_write_text, output_file
from ftctl.core.console import printable
from ftctl.core.errors import ConfigError, RunDirError

log = logging.getLogger("ftctl")

PLOTS = ("loss", "lr", "grad_norm", "throughput", "preference", "eval")  # page order: the two narrow ones side by side
TITLES = {"loss": "Loss", "lr": "Learning rate", "throughput": "Throughput", "grad_norm": "Gradient norm",
          "preference": "Preference: rewards and accuracy", "eval": "Evaluation scores"}
COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
          "#17becf"]


@dataclass
class ReportConfig:
    run: Optional[str] = None  # a run directory, or a sweep folder (multirun/<recipe>/<time>)
    output: Optional[str] = None  # default <run>/report.html (and plots/); a file elsewhere: that file alone
    overwrite: bool = False  # replace an existing output= file
    examples: int = 5  # example predictions shown per eval result


# ----------------------------------------------------------------------------- reading a run (untrusted files)
TEXT, NUMBER, OBJECT = (str,), (int, float), (dict,)
# the manifest's fields that ftctl reads, and their JSON types (null is allowed for each)
MANIFEST_TYPES = {
    **dict.fromkeys(("status", "recipe", "peft_method", "error", "started", "finished", "mixed_precision",
                     "git_commit", "ftctl_version", "device", "objective"), TEXT),
    **dict.fromkeys(("trainable_params", "total_params", "trainable_percent", "total_steps", "train_rows",
                     "val_rows", "seed", "final_train_loss", "final_val_loss", "train_tokens_per_s",
                     "peak_memory_bytes", "wall_time_s"), NUMBER),
    **dict.fromkeys(("eval", "final_val", "classify"), OBJECT),
}
JSON_KINDS = {dict: "an object", list: "a list", str: "text", bool: "a boolean", int: "a number", float: "a number",
              type(None): "null"}


def _kind(v) -> str:
    return JSON_KINDS.get(type(v), type(v).__name__)


def _short(v) -> str:
    text = json.dumps(v, ensure_ascii=False, default=str)
    return printable(text if len(text) <= 40 else text[:37] + "...")


def _manifest_problem(man) -> str | None:
    if not isinstance(man, dict):
        return f"manifest.json holds a JSON {_kind(man).split()[-1]}, not an object"
    for key, types in MANIFEST_TYPES.items():
        v = man.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, types)):
            want = {TEXT: "text", NUMBER: "a number", OBJECT: "an object"}[types]
            return f"manifest.json: {key} is {_short(v)} ({_kind(v)}), expected {want}"
    return None


def _read_text(run: Path, name: str) -> str:
    try:
        return (run / name).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UnreadableRun(run, f"{name} is not UTF-8 text") from None
    except OSError as e:
        raise UnreadableRun(run, f"{name} cannot be read ({e.strerror or e})") from None


class UnreadableRun(RunDirError):
    """A run directory whose files ftctl cannot make sense of; ``reason`` says what is wrong, without the path."""

    def __init__(self, run: Path, reason: str):
        super().__init__(f"{printable(run)}: unreadable run ({printable(reason)})")
        self.reason = printable(reason)


def check_run(run: Path) -> tuple[dict, list[dict]]:
    """(manifest, metrics rows) of a run directory, read as untrusted files: UnreadableRun (a RunDirError, exit 2)
    naming the run and what is wrong when manifest.json is not a JSON object with the types ftctl writes, or a
    line of metrics.jsonl is not an object. An undecodable line (the torn last line a killed run leaves) is skipped."""
    run = Path(run)
    man, rows = {}, []
    if (run / "manifest.json").is_file():
        try:
            man = json.loads(_read_text(run, "manifest.json"))
        except ValueError as e:
            raise UnreadableRun(run, f"manifest.json is not valid JSON ({e})") from None
        problem = _manifest_problem(man)
        if problem:
            raise UnreadableRun(run, problem)
    if (run / "metrics.jsonl").is_file():
        for n, line in enumerate(_read_text(run, "metrics.jsonl").splitlines(), 1):
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if not isinstance(row, dict):
                raise UnreadableRun(run, f"metrics.jsonl line {n} is {_kind(row)}, not an object")
            rows.append(row)
    return man, rows


# ----------------------------------------------------------------------------- data
def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def split_rows(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """(training step rows, validation rows) of metrics.jsonl."""
    rows = [r for r in rows if isinstance(r, dict)]
    return [r for r in rows if "loss" in r and "step" in r], [r for r in rows if "val_loss" in r and "step" in r]


def _xy(rows: list[dict], key: str, x: str = "step") -> tuple[list, list]:
    pts = [(r[x], r[key]) for r in rows if _num(r.get(key)) and _num(r.get(x))]
    return [p[0] for p in pts], [p[1] for p in pts]


def _tokens_at(train: list[dict], steps: list) -> list:
    """Tokens seen at each of ``steps``, interpolated between logged training steps."""
    xs, ts = _xy(train, "tokens")
    if not xs:
        return []
    out = []
    for s in steps:
        if s <= xs[0]:
            out.append(ts[0] * s / xs[0] if xs[0] else ts[0])
            continue
        for (x0, t0), (x1, t1) in zip(zip(xs, ts), zip(xs[1:], ts[1:])):
            if x0 <= s <= x1:
                out.append(t0 + (t1 - t0) * (s - x0) / max(x1 - x0, 1e-9))
                break
        else:
            out.append(ts[-1])
    return out


def _ema(values: list, span: int) -> list:
    a, out, m = 2 / (span + 1), [], None
    for v in values:
        m = v if m is None else a * v + (1 - a) * m
        out.append(m)
    return out


def read_evals(run: Path) -> list[tuple[str, dict]]:
    """(name, report) of every eval/<name>.json, oldest first."""
    d = Path(run) / "eval"
    found = []
    for f in sorted(d.glob("*.json"), key=lambda p: (p.stat().st_mtime, p.name)) if d.is_dir() else []:
        try:
            rep = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, ValueError):  # ValueError: not JSON, or not UTF-8
            continue
        if isinstance(rep, dict) and isinstance(rep.get("results"), dict):
            results = {k: v for k, v in rep["results"].items() if isinstance(v, dict)}
            settings = rep.get("settings") if isinstance(rep.get("settings"), dict) else {}
            found.append((f.stem, {**rep, "results": results, "settings": settings}))
    return found


def _predictions(run: Path, name: str, n: int) -> list[dict]:
    f = Path(run) / "eval" / f"{name}.predictions.jsonl"
    rows = []
    if n <= 0 or not f.is_file():
        return rows
    with open(f, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict):
                rows.append(row)
            if len(rows) >= n:
                break
    return rows


def _config(run: Path) -> dict:
    f = Path(run) / "config.yaml"
    if not f.is_file():
        return {}
    import yaml

    try:
        cfg = yaml.safe_load(f.read_text(encoding="utf-8"))
    except (yaml.YAMLError, OSError, UnicodeDecodeError):
        return {}
    return cfg if isinstance(cfg, dict) else {}


def _get(d: dict, dotted: str, default=None):
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return default
        d = d[part]
    return d


# ----------------------------------------------------------------------------- figures
def new_figure(ncols: int = 1, width: float | None = None, height: float = 3.6):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width or (5.6 if ncols == 1 else 5.2 * ncols), height), dpi=110, layout="constrained")
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    from matplotlib.ticker import MaxNLocator

    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps and tokens are whole numbers
        ax.grid(True, color="#e4e4e4", linewidth=0.8)
        ax.set_axisbelow(True)
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
    return fig, list(axes)


def _line(ax, xs, ys, label, color, many_points_smooth=True, **kw):
    if not xs:
        return
    few = len(xs) <= 40
    if many_points_smooth and len(xs) >= 20:
        ax.plot(xs, ys, color=color, alpha=0.3, linewidth=1)
        ax.plot(xs, _ema(ys, max(3, len(xs) // 20)), color=color, linewidth=1.8, label=f"{label} (smoothed)", **kw)
    else:
        ax.plot(xs, ys, color=color, linewidth=1.6, marker="o" if few else None, markersize=3.5, label=label, **kw)


def _legend(ax, **kw) -> None:
    """The axes' legend, when something on them has a label (matplotlib warns on an empty one)."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(**kw)


def _tokens_fmt(ax, axis: str = "x"):
    """1k, 20k, 1.5M instead of 1500000 (or 1.5e6 in the corner)."""
    from matplotlib.ticker import EngFormatter

    getattr(ax, f"{axis}axis").set_major_formatter(EngFormatter(sep=""))


def _loss_figure(train, val, with_tokens: bool = True):
    fig, axes = new_figure(2 if with_tokens else 1)
    for ax, x in zip(axes, ("step", "tokens")):
        xs, ys = _xy(train, "loss")
        if x == "tokens":
            xs = [r["tokens"] for r in train if _num(r.get("loss")) and _num(r.get("tokens"))]
            ys = [r["loss"] for r in train if _num(r.get("loss")) and _num(r.get("tokens"))]
        _line(ax, xs, ys, "training loss", COLORS[0])
        vx, vy = _xy(val, "val_loss")
        if x == "tokens":
            vx = _tokens_at(train, vx)
            vy = vy[:len(vx)]
        if vx:
            ax.plot(vx, vy, color=COLORS[1], marker="s", markersize=4.5, linewidth=1.6, label="validation loss")
        ax.set_xlabel("step" if x == "step" else "tokens seen")
        ax.set_ylabel("loss")
        if x == "tokens":
            _tokens_fmt(ax)
        _legend(ax, frameon=False, fontsize=8, loc="best")
    axes[0].set_title("loss against steps", fontsize=10)
    if with_tokens:
        axes[1].set_title("loss against tokens seen", fontsize=10)
    return fig


def _lr_figure(train):
    xs, ys = _xy(train, "lr")
    fig, (ax,) = new_figure(1)
    ax.plot(xs, ys, color=COLORS[2], linewidth=1.8, marker="o" if len(xs) <= 40 else None, markersize=3.5)
    ax.set_xlabel("step")
    ax.set_ylabel("learning rate")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    ax.set_title("learning rate", fontsize=10)
    return fig


def _throughput_figure(train):
    fig, (a, b) = new_figure(2)
    xs, ys = _xy(train, "tokens_per_s")
    _line(a, xs, ys, "tokens/s", COLORS[4], many_points_smooth=len(xs) >= 20)
    a.set_xlabel("step")
    a.set_ylabel("tokens / s")
    a.set_ylim(bottom=0)
    a.set_title("training throughput", fontsize=10)
    _legend(a, frameon=False, fontsize=8)
    pts = [(r["time"], r["tokens"]) for r in train if _num(r.get("time")) and _num(r.get("tokens"))]
    unit, div = "seconds", 1
    if pts:
        t0 = pts[0][0]
        span = pts[-1][0] - t0
        unit, div = ("hours", 3600) if span > 3 * 3600 else ("minutes", 60) if span > 180 else ("seconds", 1)
        from matplotlib.ticker import AutoLocator

        b.xaxis.set_major_locator(AutoLocator())
        b.plot([(t - t0) / div for t, _ in pts], [k for _, k in pts], color=COLORS[5], linewidth=1.8,
               marker="o" if len(pts) <= 40 else None, markersize=3.5)
        _tokens_fmt(b, "y")
    b.set_xlabel(f"{unit} since the first logged step")
    b.set_ylabel("tokens seen")
    b.set_title("tokens seen against time", fontsize=10)
    return fig


def _grad_figure(train, clip):
    xs, ys = _xy(train, "grad_norm")
    fig, (ax,) = new_figure(1)
    _line(ax, xs, ys, "gradient norm", COLORS[3])
    if _num(clip) and clip > 0:
        ax.axhline(clip, color="#555", linestyle="--", linewidth=1, label=f"clipped at {clip:g}")
    ax.set_xlabel("step")
    ax.set_ylabel("norm (before clipping)")
    ax.set_title("gradient norm", fontsize=10)
    _legend(ax, frameon=False, fontsize=8, loc="best")
    return fig


def _preference_figure(train, val):
    fig, (a, b) = new_figure(2)
    for key, label, color in (("rewards_chosen", "reward, chosen", COLORS[2]),
                              ("rewards_rejected", "reward, rejected", COLORS[3]),
                              ("margin", "margin (chosen − rejected)", COLORS[0])):
        xs, ys = _xy(train, key)
        _line(a, xs, ys, label, color)
    vx, vy = _xy(val, "val_margin")
    if vx:
        a.plot(vx, vy, color=COLORS[1], marker="s", markersize=4.5, linewidth=1.6, label="validation margin")
    a.axhline(0, color="#999", linewidth=0.8)
    a.set_xlabel("step")
    a.set_ylabel("implicit reward (β × log-ratio)")
    a.set_title("rewards and margin", fontsize=10)
    _legend(a, frameon=False, fontsize=8)
    xs, ys = _xy(train, "accuracy")
    _line(b, xs, ys, "training accuracy", COLORS[0])
    vx, vy = _xy(val, "val_accuracy")
    if vx:
        b.plot(vx, vy, color=COLORS[1], marker="s", markersize=4.5, linewidth=1.6, label="validation accuracy")
    b.axhline(0.5, color="#999", linestyle="--", linewidth=0.8, label="chance (0.5)")
    b.set_ylim(-0.02, 1.02)
    b.set_xlabel("step")
    b.set_ylabel("preference accuracy")
    b.set_title("preference accuracy", fontsize=10)
    _legend(b, frameon=False, fontsize=8)
    return fig


def _eval_table(evals) -> tuple[list[str], list[str], dict]:
    """(series labels, metrics, {(series, metric): value}) of eval reports; a series is name:label."""
    series, metrics, values = [], [], {}
    for name, rep in evals:
        for label, scores in rep["results"].items():
            if not isinstance(scores, dict):
                continue
            s = f"{name}: {label}" if len(evals) > 1 else label
            series.append(s)
            for k, v in scores.items():
                if k == "seconds" or not _num(v):
                    continue
                if k not in metrics:
                    metrics.append(k)
                values[(s, k)] = v
    return series, metrics, values


def _eval_figure(evals):
    series, metrics, values = _eval_table(evals)
    metrics = metrics[:8]
    if not metrics:
        return None
    ncols = min(4, len(metrics))
    nrows = math.ceil(len(metrics) / ncols)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(5.6, 3.2 * ncols), 2.9 * nrows + 0.4), dpi=110, layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, m in zip(axes, metrics):
        ss = [s for s in series if (s, m) in values]
        vs = [values[(s, m)] for s in ss]
        bars = ax.bar(range(len(ss)), vs, color=[COLORS[series.index(s) % len(COLORS)] for s in ss])
        ax.bar_label(bars, labels=[f"{v:.3g}" for v in vs], fontsize=8, padding=2)
        ax.set_xticks(range(len(ss)), ss, rotation=20 if len(ss) > 2 else 0, ha="right" if len(ss) > 2 else "center",
                      fontsize=8)
        ax.set_title(m, fontsize=10)
        top = max(vs + [0])
        ax.set_ylim(0, top * 1.18 if top > 0 else 1)
        ax.grid(True, axis="y", color="#e4e4e4")
        ax.set_axisbelow(True)
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
    for ax in axes[len(metrics):]:
        ax.set_visible(False)
    return fig


def save_figure(fig, path: Path) -> None:
    atomic_file(path, lambda tmp: fig.savefig(tmp, format="png"))


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def run_figures(run: Path) -> dict:
    """{name: matplotlib Figure} for what the run has data for."""
    train, val = split_rows(check_run(run)[1])
    figs = {}
    if train or val:
        figs["loss"] = _loss_figure(train, val)
    if any(_num(r.get("lr")) for r in train):
        figs["lr"] = _lr_figure(train)
    if any(_num(r.get("tokens_per_s")) for r in train):
        figs["throughput"] = _throughput_figure(train)
    if any(_num(r.get("grad_norm")) for r in train):
        figs["grad_norm"] = _grad_figure(train, _get(_config(run), "trainer.max_grad_norm"))
    if any(k in r for r in train for k in ("margin", "accuracy")) or any("val_accuracy" in r for r in val):
        figs["preference"] = _preference_figure(train, val)
    evals = read_evals(run)
    if evals:
        fig = _eval_figure(evals)
        if fig is not None:
            figs["eval"] = fig
    return figs


def write_plots(run, figs: dict | None = None) -> list[Path]:
    """Write <run>/plots/<name>.png for every plot the run has data for; returns the files."""
    run = Path(run)
    if not run.is_dir():
        raise RunDirError(f"run={run}: no such folder")
    figs = run_figures(run) if figs is None else figs
    if not figs:
        return []
    d = run / "plots"
    d.mkdir(exist_ok=True)
    written = []
    for name in PLOTS:
        if name in figs:
            save_figure(figs[name], d / f"{name}.png")
            written.append(d / f"{name}.png")
    return written


def plots_after_run(run: Path, console=None) -> list[Path]:
    """write_plots at the end of training: a failure is one warning line, never a failed run."""
    try:
        files = write_plots(run)
        log.info("plots: %s", ", ".join(p.name for p in files) or "none")
        return files
    except Exception as e:  # noqa: BLE001 - the run is finished whatever happens here
        first = (str(e).strip().splitlines() or [""])[0][:200]
        msg = f"warning: could not write plots to {Path(run) / 'plots'} ({type(e).__name__}: {first})"
        log.warning("%s", msg)
        if console is not None:
            from rich.markup import escape

            console.print(f"[yellow]{escape(msg)}[/]", highlight=False)
        return []


# ----------------------------------------------------------------------------- HTML
CSS = """
:root { --fg:#1d232b; --muted:#5f6b7a; --line:#dfe3e8; --bg:#f6f7f9; --card:#fff; --accent:#1f6feb; }
* { box-sizing: border-box; }
body { margin:0; background:var(--bg); color:var(--fg);
  font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 1240px; margin: 0 auto; padding: 24px 28px 48px; }
h1 { font-size: 22px; margin: 0 0 4px; }
h2 { font-size: 17px; margin: 28px 0 10px; padding-bottom: 4px; border-bottom: 1px solid var(--line); }
h3 { font-size: 14px; margin: 18px 0 8px; }
.sub { color: var(--muted); margin: 0 0 16px; word-break: break-all; }
.card { background: var(--card); border: 1px solid var(--line); border-radius: 8px; padding: 14px 16px; }
.kv { display: grid; grid-template-columns: repeat(auto-fill, minmax(270px, 1fr)); gap: 6px 22px; }
.kv div { display:flex; gap:8px; border-bottom: 1px dotted var(--line); padding: 3px 0; min-width:0; }
.kv b { color: var(--muted); font-weight: 500; white-space: nowrap; }
.kv span { margin-left:auto; text-align:right; overflow-wrap:anywhere; }
.badge { display:inline-block; padding: 1px 8px; border-radius: 10px; font-size: 12px; font-weight: 600; }
.ok { background:#dcf5e3; color:#146c2e; } .bad { background:#fde2e1; color:#a1201a; }
.other { background:#fff1cc; color:#7a5300; }
.plots { display:grid; grid-template-columns: repeat(auto-fit, minmax(540px, 1fr)); gap: 14px; align-items: start; }
.plots .wide { grid-column: 1 / -1; }
figure { margin:0; background: var(--card); border:1px solid var(--line); border-radius: 8px; padding: 8px; }
figure img { max-width:100%; height:auto; display:block; margin: 0 auto; }
figcaption { color: var(--muted); font-size: 12px; padding: 4px 4px 0; }
table { border-collapse: collapse; width: 100%; background: var(--card); }
th, td { border: 1px solid var(--line); padding: 5px 8px; text-align: left; vertical-align: top; }
th { background: #eef1f4; font-weight: 600; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tr.best td { background: #eefaf1; }
.txt { white-space: pre-wrap; overflow-wrap: anywhere; max-height: 13em; overflow: auto;
  font: 12px/1.4 ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }
.scores { color: var(--muted); font-size: 11px; margin-top: 4px; }
details { margin: 10px 0; } summary { cursor: pointer; font-weight: 600; }
pre.block { background: var(--card); border: 1px solid var(--line); border-radius: 6px; padding: 10px; overflow:auto;
  font: 12px/1.45 ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; max-height: 520px; }
.muted { color: var(--muted); }
.empty { color: var(--muted); font-style: italic; }
footer { color: var(--muted); font-size: 12px; margin-top: 36px; }
"""


def _e(x) -> str:
    return html.escape("" if x is None else str(x), quote=True)


def _fmt(v, digits: int = 4) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return f"{v:.{digits}g}" if abs(v) < 1e5 else f"{v:.3e}"
    return str(v)


def _figure_html(fig, caption: str, anchor: str | None = None) -> str:
    """A figure card; figures more than twice as wide as tall take the whole row."""
    w, h = fig.get_size_inches()
    cls = ' class="wide"' if w / h > 2 else ""
    ident = f' id="{_e(anchor)}"' if anchor else ""
    return f"<figure{ident}{cls}>{_img(_png(fig), caption)}<figcaption>{_e(caption)}</figcaption></figure>"


def _img(png: bytes, alt: str) -> str:
    """A PNG inlined as a data URI: the page needs no other file."""
    data = base64.b64encode(png).decode("ascii")
    return f'<img alt="{_e(alt)}" src="data:image/png;base64,{data}">'


def _page(title: str, body: str) -> str:
    stamp = datetime.now().strftime("%Y-%m-%d %H:%M")

    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            # an empty icon: the browser asks for no favicon
            f'<link rel="icon" href="data:,">\n<title>{_e(title)}</title>\n<style>{CSS}</style>\n</head>\n'
            f"<body>\n<main>\n{body}\n<footer>written by ftctl {_e(__version__)} report, {_e(stamp)}; "
            f"self-contained (no scripts, nothing loaded from elsewhere)</footer>\n</main>\n</body>\n</html>\n")


def _status(s) -> str:
    cls = "ok" if s == "finished" else "bad" if s in ("failed",) else "other"
    return f'<span class="badge {cls}">{_e(s or "unknown")}</span>'


def _kv(pairs) -> str:
    return '<div class="card kv">' + "".join(
        f"<div><b>{_e(k)}</b><span>{v}</span></div>" for k, v in pairs if v not in (None, "", "–")) + "</div>"


def _summary_pairs(run: Path, man: dict, cfg: dict, train: list, val: list) -> list:
    method = _get(cfg, "peft.method")
    if method and method != "full" and _get(cfg, "peft.r") is not None:
        method = f"{method} (r={_get(cfg, 'peft.r')}, alpha={_get(cfg, 'peft.alpha')})"
    quant = _get(cfg, "quant.method")
    if quant and quant != "none":
        method = f"{method}, base quantized {quant}"
    objective = _get(cfg, "objective", "sft")
    if objective == "dpo":
        objective = f"dpo ({_get(cfg, 'dpo.loss')}, beta={_get(cfg, 'dpo.beta')})"
    last = train[-1] if train else {}
    final_loss = man.get("final_train_loss", last.get("loss"))
    final_val = man.get("final_val_loss", val[-1]["val_loss"] if val else None)
    best_val = min((r["val_loss"] for r in val if _num(r.get("val_loss"))), default=None)
    steps = f"{_fmt(last.get('step'))} of {_fmt(man.get('total_steps'))}" if last else _fmt(man.get("total_steps"))
    tp, tt = man.get("trainable_params"), man.get("total_params")
    params = f"{tp:,} of {tt:,} ({100 * tp / tt:.2f}%)" if _num(tp) and _num(tt) and tt else None
    status = _status(man.get("status"))
    if man.get("error"):
        status += f' <span class="muted">{_e(man["error"][:300])}</span>'
    tps = [r["tokens_per_s"] for r in train if _num(r.get("tokens_per_s"))]
    pairs = [
        ("status", status),
        ("recipe", _e(man.get("recipe") or "–")),
        ("model", _e(_get(cfg, "model.name") or man.get("model_path"))),
        ("method", _e(method)),
        ("objective", _e(objective)),
        ("data", _e(f"{_get(cfg, 'data.path', man.get('data_path'))} ({_get(cfg, 'template.name', '?')})")),
        ("train / validation rows", _e(f"{_fmt(man.get('train_rows'))} / {_fmt(man.get('val_rows'))}")),
        ("steps", _e(steps)),
        ("tokens seen", _e(_fmt(last.get("tokens")))),
        ("mean tokens/s", _e(_fmt(sum(tps) / len(tps), 3) if tps else None)),
        ("final training loss", _e(_fmt(final_loss))),
        ("final validation loss", _e(_fmt(final_val))),
        ("best validation loss", _e(_fmt(best_val)) if val and len(val) > 1 else None),
        ("learning rate", _e(_fmt(_get(cfg, "trainer.lr")))),
        ("batch × accumulation", _e(f"{_get(cfg, 'trainer.batch_size')} × {_get(cfg, 'trainer.grad_accum')}")
         if cfg else None),
        ("trainable parameters", _e(params)),
        ("device / precision", _e(f"{man.get('device', '?')} / "
                                  f"{ {'no': 'fp32'}.get(man.get('mixed_precision'), man.get('mixed_precision', '?'))}")),
        ("seed", _e(man.get("seed"))),
        ("started", _e(man.get("started"))),
        ("finished", _e(man.get("finished"))),
        ("wall time", _e(f"{man['wall_time_s']:.0f} s" if _num(man.get("wall_time_s")) else None)),
        ("ftctl / git commit", _e(f"{man.get('ftctl_version', '?')} / {(man.get('git_commit') or '-')[:12]}")),
    ]
    return [(k, v) for k, v in pairs if v]


def _predictions_table(preds: list[dict], labels: list[str]) -> str:
    """The first rows of a predictions file: prompt, reference(s), each model's prediction with its row scores
    (only the scores for metrics that generate nothing, e.g. perplexity)."""
    generated = [lab for lab in labels if any(f"prediction_{lab}" in p for p in preds)]
    shown = generated or labels
    cols = "".join(f"<th>{'prediction' if generated else 'scores'}: {_e(lab)}</th>" for lab in shown)
    rows = []
    for i, p in enumerate(preds, 1):
        ref = p.get("reference")
        ref_txt = "\n— or —\n".join(map(str, ref)) if isinstance(ref, list) else ref
        cells = []
        for lab in shown:
            sc = p.get(f"scores_{lab}") if isinstance(p.get(f"scores_{lab}"), dict) else {}
            sc_txt = " · ".join(f"{k} {_fmt(v, 3)}" for k, v in sc.items() if _num(v))
            pred = p.get(f"prediction_{lab}")
            txt = ("" if not generated else f'<div class="txt">{_e(pred)}</div>' if pred and str(pred).strip()
                   else '<div class="txt empty">(empty)</div>')
            cells.append(f'<td>{txt}<div class="scores">{_e(sc_txt)}</div></td>')
        rows.append(f'<tr><td class="num">{i}</td><td><div class="txt">{_e(p.get("prompt"))}</div></td>'
                    f'<td><div class="txt">{_e(ref_txt)}</div></td>{"".join(cells)}</tr>')
    return (f'<p class="muted">The first {len(preds)} rows, predictions beside their references:</p>'
            f"<table><tr><th>#</th><th>prompt</th><th>reference</th>{cols}</tr>{''.join(rows)}</table>")


def _eval_section(run: Path, evals, examples: int) -> str:
    parts = []
    for name, rep in evals:
        labels = [k for k, v in rep["results"].items() if isinstance(v, dict)]
        metrics = []
        for label in labels:
            for k in rep["results"][label]:
                if k != "seconds" and k not in metrics:
                    metrics.append(k)
        st = rep.get("settings") or {}
        info = ", ".join(f"{k} {_fmt(v)}" for k, v in (("rows", rep.get("rows")), ("split", st.get("split")),
                                                      ("decoding", st.get("decoding")),
                                                      ("max_new_tokens", st.get("max_new_tokens"))) if v is not None)
        head = "".join(f'<th class="num">{_e(lab)}</th>' for lab in labels)
        delta = len(labels) == 2
        if delta:
            head += f'<th class="num">Δ {_e(labels[0])} − {_e(labels[1])}</th>'
        body = []
        for m in metrics:
            vals = [rep["results"][lab].get(m) for lab in labels]
            cells = "".join(f'<td class="num">{_e(_fmt(v))}</td>' for v in vals)
            if delta:
                d = vals[0] - vals[1] if all(_num(v) for v in vals) else None
                cells += f'<td class="num">{_e("–" if d is None else f"{d:+.4g}")}</td>'
            body.append(f"<tr><td>{_e(m)}</td>{cells}</tr>")
        parts.append(f'<h3>{_e(name)} <span class="muted">({_e(info)})</span></h3>'
                     f'<table><tr><th>metric</th>{head}</tr>{"".join(body)}</table>')
        preds = _predictions(run, name, examples)
        if preds:
            parts.append(_predictions_table(preds, labels))
    return "".join(parts)


def run_report_html(run: Path, examples: int = 5, figs: dict | None = None) -> str:
    run = Path(run)
    man, rows = check_run(run)
    cfg = _config(run)
    train, val = split_rows(rows)
    figs = run_figures(run) if figs is None else figs
    title = f"ftctl run {run.name}"
    body = [f"<h1>{_e(cfg.get('description') or title)}</h1>",
            f'<p class="sub">{_e(run.resolve())}</p>', "<h2>Summary</h2>",
            _kv(_summary_pairs(run, man, cfg, train, val))]
    body.append("<h2>Curves</h2>")
    if figs:
        body.append('<div class="plots">' + "".join(_figure_html(figs[n], TITLES[n]) for n in PLOTS if n in figs)
                    + "</div>")
    else:
        body.append('<p class="muted">No metrics logged yet (metrics.jsonl is empty or missing).</p>')
    evals = read_evals(run)
    if evals:
        body.append("<h2>Evaluation</h2>" + _eval_section(run, evals, examples))
    body.append("<h2>Run details</h2>")
    if (run / "config.yaml").is_file():
        body.append(f'<details><summary>config.yaml</summary><pre class="block">'
                    f'{_e((run / "config.yaml").read_text(encoding="utf-8", errors="replace"))}</pre></details>')
    if man:
        body.append(f'<details><summary>manifest.json</summary><pre class="block">'
                    f'{_e(json.dumps(man, indent=2, default=str))}</pre></details>')
    return _page(title, "\n".join(body))


# ----------------------------------------------------------------------------- sweeps
def find_trials(folder: Path, depth: int = 3) -> list[Path]:
    """Run directories (with a manifest.json) under a sweep folder, in natural order."""
    folder = Path(folder)
    found = []

    def walk(d: Path, level: int):
        for child in sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith(".")):
            if (child / "manifest.json").is_file():
                found.append(child)
            elif level < depth:
                walk(child, level + 1)
    walk(folder, 1)

    def key(p: Path):
        return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(p.relative_to(folder)))]
    return sorted(found, key=key)


def trial_overrides(trial: Path) -> list[str]:
    f = trial / ".hydra" / "overrides.yaml"
    if f.is_file():
        import yaml

        try:
            value = yaml.safe_load(f.read_text(encoding="utf-8"))
        except (yaml.YAMLError, OSError, UnicodeDecodeError):
            return []
        return [str(o) for o in value if isinstance(o, (str, int, float))] if isinstance(value, list) else []
    return []


# ----------------------------------------------------------------------------- the best trial of a sweep
TRIAL_FILE = "trial.json"  # a trial's record, written by `ftctl train -m` (experiments/sweep.py)
LOWER_IS_BETTER = ("loss", "perplexity", "peak_memory", "time")


def metric_direction(metric: str, direction: str = "auto") -> str:
    """min or max: ``direction`` when it says, else min for losses, perplexity, memory and time, max otherwise."""
    if direction in ("min", "max"):
        return direction
    return "min" if any(w in metric for w in LOWER_IS_BETTER) else "max"


def trial_value(man: dict, metric: str):
    """The value of ``metric`` in a run's manifest: val_loss, train_loss, tokens_per_s, peak_memory,
    wall_time, a validation figure (val_accuracy, ...) or an eval.after_train score (rougeL, ...)."""
    direct = {"val_loss": "final_val_loss", "train_loss": "final_train_loss", "tokens_per_s": "train_tokens_per_s",
              "peak_memory": "peak_memory_bytes", "wall_time": "wall_time_s"}
    if metric in direct:
        v = man.get(direct[metric])
    elif metric in (man.get("final_val") or {}):
        v = man["final_val"][metric]
    else:
        v = (man.get("eval") or {}).get(metric)
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _trial_record(d: Path) -> dict:
    """trial.json, with only the fields of the types ftctl writes (status, error, metric, direction: text;
    overrides: a list of text)."""
    record = _read_json(d / TRIAL_FILE)
    out = {k: v for k, v in record.items() if k not in ("status", "error", "metric", "direction", "overrides")}
    out.update({k: record[k] for k in ("status", "error", "metric", "direction") if isinstance(record.get(k), str)})
    if isinstance(record.get("overrides"), list):
        out["overrides"] = [str(o) for o in record["overrides"] if isinstance(o, (str, int, float))]
    return out


def read_trial(d: Path) -> dict:
    """One trial folder of a sweep: dir, manifest, record (its trial.json), overrides, status and error. The
    status is the manifest's, unless trial.json says the trial failed, was preempted or never ran (e.g.
    eval.after_train failed after training finished); a trial whose files cannot be read (check_run) is
    "unreadable", with the reason as its error."""
    d = Path(d)
    record = _trial_record(d)
    try:
        man = check_run(d)[0]
    except UnreadableRun as e:
        return {"dir": d, "manifest": {}, "record": record, "overrides": record.get("overrides") or
                trial_overrides(d), "status": "unreadable", "error": e.reason}
    status = man.get("status") or record.get("status") or "unknown"
    if record.get("status") in ("failed", "preempted", "not run") and status in ("finished", "running"):
        status = record["status"]
    return {"dir": d, "manifest": man, "record": record, "overrides": record.get("overrides") or trial_overrides(d),
            "status": status, "error": record.get("error") or man.get("error")}


def best_trial(trials: list[dict], metric: str | None = None, direction: str | None = None):
    """The one rule for a sweep's best trial, used by ``ftctl sweep report`` and the sweep page of ``ftctl report``.

    ``trials`` are read_trial dicts. The metric is ``metric``, else the sweep.metric recorded in trial.json, else
    val_loss; the direction is ``direction``, else the sweep.direction recorded with that metric, else
    metric_direction's. The best is the finished trial with the best value (the first of equal ones).
    Returns (metric, direction, each trial's value or None, the best trial's index or None)."""
    recorded = next((t["record"] for t in trials if t["record"].get("metric")), {})
    metric = metric or recorded.get("metric") or "val_loss"
    if direction is None:
        direction = recorded.get("direction", "auto") if metric == recorded.get("metric") else "auto"
    direction = metric_direction(metric, direction)
    values = [trial_value(t["manifest"], metric) if t["status"] == "finished" else None for t in trials]
    done = [i for i, v in enumerate(values) if v is not None]
    best = (min if direction == "min" else max)(done, key=lambda i: values[i]) if done else None
    return metric, direction, values, best


def sweep_loss_figure(trials: list[dict]):
    """Every trial's training loss (lines) and validation loss (squares) overlaid. trials: dicts with train,
    val, label and (optionally) best. Line styles cycle with the colours so that trials with identical curves
    stay distinguishable; the loss axis is logarithmic when the loss falls tenfold."""
    fig, (a, b) = new_figure(2, height=4.0)
    styles = ["-", (0, (4, 2)), (0, (1, 1.5)), (0, (6, 2, 1, 2))]
    for i, t in enumerate(trials):
        c, ls = COLORS[i % len(COLORS)], styles[(i // len(COLORS) + i) % len(styles)]
        best = bool(t.get("best"))
        for ax, x in ((a, "step"), (b, "tokens")):
            xs, ys = _xy(t["train"], "loss", x)
            if xs:
                ax.plot(xs, ys if len(xs) < 20 else _ema(ys, max(3, len(xs) // 20)), color=c, linestyle=ls,
                        linewidth=2.4 if best else 1.6, label=t["label"] + (" (best)" if best else ""))
            vx, vy = _xy(t["val"], "val_loss")
            if x == "tokens":
                vx = _tokens_at(t["train"], vx)
                vy = vy[:len(vx)]
            if vx:
                ax.plot(vx, vy, color=c, linestyle="none", marker="s", markersize=4, alpha=0.8)
    ys = [y for ax in (a, b) for line in ax.get_lines() for y in line.get_ydata()]
    log_y = bool(ys) and min(ys) > 0 and max(ys) / min(ys) >= 10  # the end of the curves, where trials differ
    for ax, x in ((a, "step"), (b, "tokens seen")):
        ax.set_xlabel(x)
        ax.set_ylabel("loss (log scale)" if log_y else "loss")
        if log_y:
            ax.set_yscale("log")
    _tokens_fmt(b)
    a.set_title("training loss (lines) and validation loss (squares)", fontsize=10)
    b.set_title("against tokens seen", fontsize=10)
    if trials:
        _legend(a, frameon=False, fontsize=7, loc="upper right")
    return fig


def _sweep_trials(trial_dirs: list[Path]) -> tuple[list[dict], list[str]]:
    """read_trial of each folder with its metrics, eval scores and label; and the overrides that vary."""
    trials = []
    for d in trial_dirs:
        t = read_trial(d)
        try:
            train, val = split_rows(check_run(d)[1])
        except UnreadableRun:
            train, val = [], []
        evals = read_evals(d)
        scores = dict(t["manifest"].get("eval") or {})
        if not scores and evals:
            first = next(iter(evals[-1][1]["results"].values()), {})
            scores = dict(first) if isinstance(first, dict) else {}
        scores.pop("seconds", None)
        trials.append({**t, "man": t["manifest"], "train": train, "val": val, "overrides": trial_overrides(d),
                       "scores": {k: v for k, v in scores.items() if _num(v)}})
    # the overrides that differ between trials are what the sweep varies
    keyed = [dict(o.split("=", 1) for o in t["overrides"] if "=" in o) for t in trials]
    all_keys = list(dict.fromkeys(k for kv in keyed for k in kv))
    varying = [k for k in all_keys if len({kv.get(k) for kv in keyed}) > 1]
    for t, kv in zip(trials, keyed):
        shown = [f"{k}={kv[k]}" for k in varying if k in kv]
        t["label"] = " ".join(shown) or t["dir"].name
    return trials, varying


def _sweep_table(folder: Path, trials: list[dict], varying: list[str], metric: str) -> str:
    """One row per trial, the best (t["best"]) highlighted; a column for the metric when no other shows it."""
    metrics = list(dict.fromkeys(k for t in trials for k in t["scores"]))
    own = metric not in ("val_loss", "train_loss", *metrics)
    head = ("<tr><th>trial</th><th>overrides</th><th>status</th><th class=num>steps</th>"
            "<th class=num>final train loss</th><th class=num>final val loss</th>"
            + "".join(f"<th class=num>{_e(m)}</th>" for m in metrics)
            + (f"<th class=num>{_e(metric)}</th>" if own else "") + "</tr>")
    rows = []
    for t in trials:
        man = t["man"]
        ov = " ".join(f"<b>{_e(o)}</b>" if o.split("=", 1)[0] in varying else _e(o) for o in t["overrides"])
        last = t["train"][-1]["step"] if t["train"] else None
        cls = ' class="best"' if t["best"] else ""
        why = f' <span class="muted">{_e(t["error"])}</span>' if t["status"] == "unreadable" else ""
        rows.append(f"<tr{cls}><td><a href=\"#trial-{_e(t['dir'].name)}\">{_e(t['dir'].relative_to(folder))}</a></td>"
                    f"<td>{ov or '<span class=muted>(defaults)</span>'}</td><td>{_status(t['status'])}{why}</td>"
                    f"<td class=num>{_e(_fmt(last))}</td><td class=num>{_e(_fmt(man.get('final_train_loss')))}</td>"
                    f"<td class=num>{_e(_fmt(man.get('final_val_loss')))}</td>"
                    + "".join(f"<td class=num>{_e(_fmt(t['scores'].get(m)))}</td>" for m in metrics)
                    + (f"<td class=num>{_e(_fmt(t['value']))}</td>" if own else "") + "</tr>")
    return f"<table>{head}{''.join(rows)}</table>"


def sweep_report_html(folder: Path, trial_dirs: list[Path]) -> tuple[str, dict]:
    trials, varying = _sweep_trials(trial_dirs)
    metric, direction, values, best = best_trial(trials)  # the same rule as ftctl sweep report
    for i, (t, v) in enumerate(zip(trials, values)):
        t["value"], t["best"] = v, i == best
    figs = {"sweep_loss": sweep_loss_figure(trials)}
    body = [f"<h1>ftctl sweep {_e(folder.name)}</h1>", f'<p class="sub">{_e(folder.resolve())} — {len(trials)} '
            f"trials{', varying ' + _e(', '.join(varying)) if varying else ''}</p>",
            "<h2>Trials</h2>",
            _sweep_table(folder, trials, varying, metric),
            f'<p class="muted">Bold: the overrides that differ between trials. Highlighted: the best finished trial '
            f"by {_e(metric)} ({'lowest' if direction == 'min' else 'highest'}), as in ftctl sweep report.</p>",
            "<h2>Loss curves</h2>",
            f'<figure>{_img(_png(figs["sweep_loss"]), "loss of every trial")}<figcaption>every trial\'s loss; '
            "colours and line styles follow the legend</figcaption></figure>",
            "<h2>Each trial</h2>", '<div class="plots">']
    for t in trials:
        if not (t["train"] or t["val"]):
            thumb = '<p class="muted">no metrics</p>'
        else:
            fig = _loss_figure(t["train"], t["val"], with_tokens=False)
            fig.axes[0].set_title(f"trial {t['dir'].name}: {t['label']}", fontsize=10)
            thumb = _img(_png(fig), f"loss of trial {t['dir'].name}")
        body.append(f'<figure id="trial-{_e(t["dir"].name)}">{thumb}<figcaption>trial {_e(t["dir"].relative_to(folder))}'
                    f": {_e(t['label'])} — {_e(t['status'])}</figcaption></figure>")
    body.append("</div>")
    return _page(f"ftctl sweep {folder.name}", "\n".join(body)), figs


# ----------------------------------------------------------------------------- the command
def _output(rcfg: ReportConfig) -> Path | None:
    """output=, checked before any work (core.atomic.output_file)."""
    return output_file(rcfg.output, rcfg.overwrite, "report.html")


def _inside(path: Path, folder: Path) -> bool:
    return path.resolve().is_relative_to(folder.resolve())


@contextlib.contextmanager
def _writing_into(target: Path, run_dir: bool):
    """Writing into ``target``: a run directory's lock held (one writer per run), and one line, exit 2, when it
    is in use or cannot be written, suggesting output= elsewhere."""
    hint = "pass output=FILE outside it to write the report elsewhere"
    with contextlib.ExitStack() as stack:
        if run_dir:
            try:
                stack.enter_context(lock.hold(target, "ftctl report"))
            except RunDirError as e:  # another process holds the run, or its lock file cannot be made
                if lock.holder(target) is None:
                    raise RunDirError(f"run={target}: cannot write there ({e.message})", hint=hint) from None
                raise RunDirError(e.message, hint=f"it is being written; {hint}") from None
        try:
            yield
        except OSError as e:
            where = e.filename or target
            raise RunDirError(f"run={target}: cannot write there ({where}: {e.strerror or e})", hint=hint) from None


def _write_output(out: Path, page: str) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, page)


def report(rcfg: ReportConfig, console=None) -> Path:
    """``ftctl report run=DIR``: plots/ and report.html in a run directory or a sweep folder (a run directory's
    lock held while they are written), or with output=FILE that one file alone, nothing written into DIR."""
    if not rcfg.run:
        raise ConfigError("ftctl report needs run=<run directory or sweep folder>")
    if rcfg.examples < 0:
        raise ConfigError(f"examples={rcfg.examples} must be >= 0")
    target = Path(rcfg.run).expanduser()
    if not target.is_dir():
        raise RunDirError(f"run={target}: no such folder")
    out = _output(rcfg)
    run_dir = (target / "manifest.json").is_file()
    if run_dir:
        figs = run_figures(target)
        page = run_report_html(target, rcfg.examples, figs=figs)
        what = f"{len(figs)} plots" + (f" in {target / 'plots'}" if out is None else "")
    else:
        trials = find_trials(target)
        if not trials:
            raise RunDirError(f"run={target}: not a run directory or a sweep folder (no manifest.json in it or "
                              "in its sub-folders)")
        page, figs = sweep_report_html(target, trials)
        what = f"{len(trials)} trials"
    if out is None or _inside(out, target):
        with _writing_into(target, run_dir):
            if out is None:
                out = target / "report.html"
                if run_dir:
                    write_plots(target, figs)
                else:
                    (target / "plots").mkdir(exist_ok=True)
                    for name, fig in figs.items():
                        save_figure(fig, target / "plots" / f"{name}.png")
            _write_output(out, page)
    else:
        try:
            _write_output(out, page)
        except OSError as e:
            where = e.filename or out.parent
            raise RunDirError(f"output={out}: cannot write there ({where}: {e.strerror or e})") from None
    if console is not None:
        console.print(f"wrote {out} ({what}); open it in a browser: file://{out.resolve()}", highlight=False,
                      markup=False)
    return out
