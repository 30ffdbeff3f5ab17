"""Training progress: a live rich bar on a terminal, plain log lines otherwise (CI logs, files)."""
from __future__ import annotations

import time


def _fmt_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _info(m: dict) -> str:
    pref = f"  margin {m['margin']:.3f}  acc {m['accuracy']:.2f}" if "accuracy" in m else ""
    return f"loss {m['loss']:.4f}{pref}  lr {m['lr']:.2e}  tok/s {m['tokens_per_s']:.0f}"


class TrainProgress:
    def __init__(self, console, total: int, start: int = 0, log_every: int = 10, enabled: bool = True):
        self.console, self.total, self.start, self.log_every = console, total, start, log_every
        self.enabled = enabled
        self.t0 = time.time()
        self.live = enabled and console.is_terminal
        self._progress = None
        if self.live:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                      TextColumn("{task.fields[info]}"), TextColumn("eta"), TimeRemainingColumn(),
                                      console=console, transient=False)
            self._task = self._progress.add_task("train", total=total, completed=start, info="")
            self._progress.start()

    def line(self, step: int, m: dict) -> str:
        done = step - self.start
        eta = (time.time() - self.t0) / done * (self.total - step) if done > 0 else 0
        return f"step {step}/{self.total}  {_info(m)}  eta {_fmt_eta(eta)}"

    def update(self, step: int, m: dict | None) -> None:
        if not self.enabled:
            return
        if self.live:
            info = "" if m is None else _info(m)
            self._progress.update(self._task, completed=step, **({"info": info} if m else {}))
        elif m is not None and (step % self.log_every == 0 or step == self.total or step == self.start + 1):
            self.console.print(self.line(step, m), highlight=False)

    def print(self, msg: str) -> None:
        if self.enabled:
            (self._progress.console if self.live else self.console).print(msg, highlight=False)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()


