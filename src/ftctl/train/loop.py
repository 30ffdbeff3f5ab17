"""The training recipe, one for every task and objective, read top to bottom (in the spirit of torchtune's
single-device recipes; driven by Accelerate through an Engine, not the HF Trainer):

    train = setup (engine, data, model, method, optimizer, objective, run directory)
          → for each step: step (forward, backward, update) → log → validate → checkpoint
          → finish (final weights, manifest, after-train eval, plots, trackers)

What differs between tasks sits behind ``ftctl.tasks.Task``; what differs between objectives behind
``ftctl.objectives`` (a registry); what differs between one process and many behind ``Engine``."""
from __future__ import annotations

import logging
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ftctl import __version__, report
from ftctl.core import lock, memory
from ftctl.core.atomic import atomic_write_json, atomic_write_text, json_safe, replace_folder, writing
from ftctl.core.errors import ConfigError, FtctlError, NonFiniteError, Preempted
from ftctl.core.progress import TrainProgress
from ftctl.data import pipeline
from ftctl.data.batches import batch_indices, row_lengths, total_steps
from ftctl.evaluate.run import EvalConfig, run_eval
from ftctl.methods import peft
from ftctl.methods.peft import save_adapter
from ftctl.methods.spec import adapter_spec
from ftctl.models.load import keep_training_layout, load_tokenizer, resolve
from ftctl.models.load import load_model as load
from ftctl.objectives.losses import StepStats
from ftctl.objectives.spec import BuildContext, objective_spec
from ftctl.rundir import (
    Metrics,
    adapter_folder,
    default_output_dir,
    git_commit,
    library_versions,
    prepare_output_dir,
)
from ftctl.tasks import Task, task_for
from ftctl.train import checkpoint, distributed, launch, tracking
from ftctl.train.checkpoint import assert_finite, trainable_state
from ftctl.train.optim import make_optimizer

log = logging.getLogger("ftctl")


class _NoMetrics:
    """metrics.jsonl of the processes other than the main one: nothing is written."""

    def log(self, **row) -> None:
        pass

    def close(self) -> None:
        pass


class StopFlag:
    """SIGTERM/SIGINT handlers that only set a flag; the loop saves and exits at the next step boundary.
    A second signal stops at once (KeyboardInterrupt)."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        print(f"\nftctl: got {signal.Signals(signum).name}; saving a checkpoint at the end of this step "
              "(send it again to stop at once)", file=sys.stderr, flush=True)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, h in self._previous.items():
            signal.signal(s, h)


def _resume_command(out: Path) -> str:
    args = [a for a in sys.argv[1:] if not a.startswith(("resume=", "output_dir=", "overwrite="))]
    return " ".join(["ftctl", *args, f"output_dir={out}", "resume=true"])


def _stat_sums(stats) -> list[float]:
    return [] if stats is None else [stats.pairs, stats.loss, stats.chosen, stats.rejected, stats.correct]


def _stats_from(stats, sums: list[float]):
    """A step's preference statistics summed over the processes."""
    if stats is None:
        return None
    return StepStats(int(sums[0]), *sums[1:])


class _LogFile(logging.FileHandler):
    """train.log. A line that cannot be written (a full disk) is dropped without logging's traceback on stderr:
    the error that stops the run is reported as its one line."""

    def handleError(self, record) -> None:
        pass


def _setup_logging(out: Path, debug: bool) -> logging.Handler:
    handler = _LogFile(out / "train.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.propagate = False  # the run's log goes to train.log, not through handlers a library installed on the root
    log.setLevel(logging.DEBUG if debug else logging.INFO)
    return handler


def _validate(objective, model, examples, batch_size, device) -> dict | None:
    if not examples:
        return None
    was_training = model.training
    model.eval()
    try:
        return objective.validate(model, examples, batch_size, device)
    finally:
        if was_training:
            model.train()


def _trained_modules_line(modules: list[dict], shown: int = 6) -> str:
    """What trains, as name patterns (layer numbers as *), the largest first."""
    modules = sorted(modules, key=lambda m: -m["params"])
    parts = [f"{m['pattern']} ({m['params']:,})" for m in modules[:shown]]
    more = f", and {len(modules) - shown} more (manifest.json: trainable_modules)" if len(modules) > shown else ""
    return "trained: " + ", ".join(parts) + more


def save_final(model, tokenizer, out: Path, is_adapter: bool, state: dict | None = None) -> Path:
    """The final adapter (or model), written once; ``state``: weights gathered from sharded processes."""

    assert_finite(trainable_state(model) if state is None else state, "the final weights")
    weights = {} if state is None else {"state_dict": state}

    def write(tmp: Path) -> None:
        if is_adapter:
            save_adapter(model, tmp, **weights)
        else:
            model.save_pretrained(tmp, **weights)
        tokenizer.save_pretrained(tmp)

    target = out / ("adapter" if is_adapter else "model")
    with writing(target, hint=lambda: checkpoint.kept(out / "checkpoints")):
        return replace_folder(target, write)


def _after_train_eval(cfg, out: Path, manifest: dict, console) -> None:
    """eval.after_train: score the finished run; a failure here is reported, the trained run stays valid."""
    e = cfg.eval
    try:
        scored = run_eval(EvalConfig(run=str(out), metrics=list(e.after_train), split=e.split, limit=e.limit,
                                     max_new_tokens=e.max_new_tokens, batch_size=e.batch_size, name="after_train"),
                          console=console)
        manifest["eval"] = scored["results"].get("tuned")
    except FtctlError as err:
        console.print(f"[yellow]eval.after_train failed:[/] {err}", highlight=False)
        manifest["eval_error"] = str(err)
    atomic_write_json(out / "manifest.json", manifest)



@dataclass
class Run:
    """One training run: what setup made, and where the loop is. Read by every stage below."""
    cfg: DictConfig
    choices: dict
    console: Any
    debug: bool
    main: bool                      # only the main process writes and prints
    t_start: float
    out: Path
    resume: bool | str
    ckpt: Path | None               # the checkpoint to resume from
    engine: Any
    mixed: str
    task: Task
    model_path: Path | None = None
    tokenizer: Any = None
    bundle: Any = None
    model: Any = None
    base_bytes: int = 0             # the loaded base model's memory footprint
    is_adapter: bool = False
    step_hook: Any = None           # the adaptation method's work after each update (AdaLoRA's rank budget)
    params_report: dict = field(default_factory=dict)
    steps: int = 0
    lengths: tuple | None = None
    params: list = field(default_factory=list)
    optimizer: Any = None
    scheduler: Any = None
    objective: Any = None
    manifest: dict = field(default_factory=dict)
    metrics: Any = None
    trackers: Any = None
    handler: logging.Handler | None = None
    start_step: int = 0
    tokens_seen: int = 0
    skipped: int = 0
    last_loss: float | None = None
    val_loss: float | None = None
    last_val: dict = field(default_factory=dict)

    @property
    def n_rows(self) -> int:
        return len(self.bundle.train.examples)

    def rows(self, micro: int) -> list[int]:
        """Training rows of global micro-batch ``micro``."""
        tc = self.cfg.trainer
        return batch_indices(self.n_rows, tc.batch_size, self.cfg.seed, self.cfg.data.shuffle, micro, self.lengths)


@dataclass
class StepResult:
    done: int                       # steps finished, this one included
    loss: float
    grad_norm: Any
    tokens: int                     # real tokens of the step, over all processes
    stats: StepStats | None         # preference statistics of the step


def train(cfg: DictConfig, choices: dict, console=None, debug: bool = False) -> Path:
    """Run one training job described by a composed config. Returns the run directory."""
    run = start(cfg, choices, console, debug)
    try:
        try:
            load_data(run)
            load_model(run)
            if run.task.fits_without_steps(cfg):  # classify.strategy=features: no gradient steps
                return fit_without_steps(run)
            make_optimizer_and_objective(run)
            open_run_dir(run)
        except BaseException:
            _close_log(run)  # a failed set-up leaves train.log, and no handler behind (a sweep's next trial logs apart)
            raise
        loop_figures = fit(run)
        if run.main:
            finish(run, loop_figures)
        return run.out
    finally:
        lock.release(run.out)  # the kernel would at exit; a sweep's or a test's next run may want it sooner


# ----------------------------------------------------------------------------- setup
def start(cfg: DictConfig, choices: dict, console, debug: bool) -> Run:
    """Refuse what needs torchrun, choose the run directory and the checkpoint to resume, build the engine."""
    import torch
    from rich.console import Console

    if launch.needed(cfg):
        raise ConfigError(f"distributed={cfg.distributed.strategy} with {launch.world_size(cfg)} process(es) runs under "
                          "torchrun: start it with `ftctl train` (not in a sweep or from Python's train())")
    main = os.environ.get("RANK", "0") == "0"
    console = console if main and console is not None else Console(soft_wrap=True, quiet=not main)
    t_start = time.time()
    resume = checkpoint.resume_arg(cfg.resume)
    if resume is True and not cfg.output_dir:
        raise ConfigError("resume=true needs output_dir=<the run to continue>")
    out = Path(cfg.output_dir) if cfg.output_dir else default_output_dir(choices.get("recipe"))
    prepare_output_dir(out, overwrite=cfg.overwrite, resume=bool(resume), dry_run=True)
    ckpt = checkpoint.find_resume(out, resume) if resume else None  # before any slow work
    if cfg.trainer.num_threads:
        torch.set_num_threads(cfg.trainer.num_threads)
    if cfg.trainer.cpu_allocator == "release" and not torch.cuda.is_available():
        memory.release_freed_memory()
    mixed = distributed.mixed_precision(cfg)
    engine = distributed.make_engine(cfg, mixed, tracking.log_with(cfg, out, resume=bool(resume)) if main else None)
    if mixed == "fp16" and engine.device.type == "cpu":
        console.print("[yellow]precision=fp16 on CPU: no loss scaling (that needs a CUDA GPU); bf16 is the safer "
                      "choice[/]", highlight=False)
    return Run(cfg=cfg, choices=choices, console=console, debug=debug, main=main, t_start=t_start, out=out,
               resume=resume, ckpt=ckpt, engine=engine, mixed=mixed, task=task_for(cfg))


def load_data(run: Run) -> None:
    """The model folder, its tokenizer and the task's data; then the run directory is made (bad input
    leaves nothing behind)."""
    from accelerate.utils import set_seed

    cfg = run.cfg
    with run.engine.main_first():  # the main process fills the model and data caches; the others then read them
        run.model_path = resolve(cfg.model.path, cfg.model.revision)
        # seeded after the model folder is resolved: building a built-in model draws from torch's generator,
        # so a cold cache would otherwise start the run from another state than a warm one
        set_seed(cfg.seed)
        run.tokenizer = load_tokenizer(run.model_path)
        run.bundle = run.task.build_data(cfg, run.tokenizer)
    if objective_spec(cfg.objective).pairs and not run.bundle.preference:
        raise ConfigError(f"objective={cfg.objective} needs preference pairs (template=preference or preference_chat, "
                          f"rows with chosen and rejected); {cfg.data.path} gave single examples")
    if run.main:
        prepare_output_dir(run.out, overwrite=cfg.overwrite, resume=bool(run.resume))
        run.handler = _setup_logging(run.out, run.debug)
    else:
        run.handler = logging.NullHandler()
    _announce(run)


def _announce(run: Run) -> None:

    cfg, bundle, engine = run.cfg, run.bundle, run.engine
    where = f"device={engine.device}" if engine.world == 1 else \
        f"distributed={cfg.distributed.strategy} x{engine.world} ({engine.device.type})"
    run.console.print(f"[bold]ftctl train[/] recipe={run.choices.get('recipe', '-')} model={cfg.model.name} "
                      f"{run.task.method(cfg)} quant={cfg.quant.method} {where} → {run.out}", highlight=False)
    for sd in (bundle.train, bundle.validation):
        line = f"data ({sd.name}): {pipeline.describe(sd)}"
        log.info("%s (%s)", line, cfg.data.path)
        if sd.skipped_bad or sd.dropped_too_long or sd.truncated:
            run.console.print(f"[yellow]{line}[/]", highlight=False)
        for bad in sd.bad_examples:
            run.console.print(f"  skipped: {bad}", highlight=False, markup=False)
    log.info("data cache: %d hit(s), %d miss(es)", bundle.cache_hits, bundle.cache_misses)
    run.task.announce_data(cfg, bundle, run.console)


def load_model(run: Run) -> None:
    """The model with the task's head, wrapped by the adaptation method, then by the engine."""

    cfg, engine = run.cfg, run.engine
    quantized = cfg.quant.method != "none"
    model = load(run.model_path, cfg.model, cfg.quant, engine.device, head=run.task.head(cfg),
                 pad_id=run.tokenizer.pad_token_id, labels=run.task.labels(run.bundle))
    run.base_bytes = model.get_memory_footprint()
    keep_training_layout(model)
    run.lengths = row_lengths(cfg, run.bundle.train.examples)
    run.steps = total_steps(cfg.trainer, run.n_rows)
    model = run.task.adapt(model, cfg, quantized=quantized, steps=run.steps, model_path=run.model_path)
    if run.task.fits_without_steps(cfg):
        run.model = model
        return
    run.is_adapter = peft.is_adapter(model)
    spec = adapter_spec(model)
    run.step_hook = spec.step_hook if spec is not None else None
    run.params_report = peft.parameter_report(model)
    if run.params_report["trainable_params"] == 0:
        raise ConfigError(f"peft.method={cfg.peft.method} left no trainable parameters (check peft.target_modules)")
    run.model = engine.wrap(model)  # FSDP shards the parameters before the optimizer sees them


def make_optimizer_and_objective(run: Run) -> None:
    """Optimizer and schedule, prepared by the engine; the objective (with a DPO reference where it needs one);
    the state of the checkpoint being resumed."""
    from transformers import get_scheduler

    cfg, engine, tc = run.cfg, run.engine, run.cfg.trainer
    run.params = [p for p in run.model.parameters() if p.requires_grad]
    optimizer = make_optimizer(tc, cfg.peft, run.model, run.params)
    warmup = tc.warmup_steps if tc.warmup_steps >= 0 else int(tc.warmup_ratio * run.steps)
    scheduler = get_scheduler(tc.scheduler if tc.scheduler != "constant" else "constant_with_warmup",
                              optimizer, num_warmup_steps=warmup, num_training_steps=run.steps)
    run.model, run.optimizer = engine.prepare(run.model, optimizer, scheduler)
    run.scheduler = scheduler
    with engine.main_first():  # DPO's precomputed reference is cached on disk
        # logits at the target positions only: where one process holds the whole model (the sharded and
        # DDP engines need their own forward to run)
        one = engine.world == 1 and cfg.distributed.strategy == "single"
        run.objective = run.task.objective(BuildContext(
            cfg, engine.unwrap(run.model), run.tokenizer.pad_token_id, run.bundle, run.model_path, run.steps,
            run.console, autocast=engine.accelerator.autocast if one else None))
    _restore(run)


def _restore(run: Run) -> None:
    if run.resume and run.ckpt is None:
        run.console.print(f"resume=true: no complete checkpoint in {run.out / 'checkpoints'} yet; starting at step 0",
                          highlight=False)
    if run.ckpt is not None:
        state = run.engine.load(run.ckpt, run.model, run.optimizer, run.scheduler)
        run.start_step, run.tokens_seen = state["step"], state["tokens_seen"]
        run.skipped = state.get("skipped_steps", 0)
        run.console.print(f"resumed from {run.ckpt} at step {run.start_step}", highlight=False)
        log.info("resumed from %s at step %d", run.ckpt, run.start_step)


def open_run_dir(run: Run) -> None:
    """config.yaml, the manifest (status running), metrics.jsonl and the trackers."""

    cfg, engine, bundle, params = run.cfg, run.engine, run.bundle, run.params_report
    if run.main:
        atomic_write_text(run.out / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    run.manifest = _manifest(run)
    if run.main:
        atomic_write_json(run.out / "manifest.json", run.manifest)
    run.metrics = Metrics(run.out / "metrics.jsonl", resume_step=run.start_step if run.resume else None) \
        if run.main else _NoMetrics()
    run.trackers = tracking.Trackers(cfg, run.out, engine.accelerator, run.console, start_step=run.start_step)
    run.console.print(f"{run.n_rows} train rows, {bundle.validation.kept} validation rows, {run.steps} steps, "
                      f"{params['trainable_params']:,} trainable of {params['total_params']:,} parameters "
                      f"({params['trainable_percent']:.4g}%)", highlight=False)
    run.console.print(_trained_modules_line(params["trainable_modules"]), highlight=False, markup=False)


def _manifest(run: Run) -> dict:

    cfg, bundle = run.cfg, run.bundle
    return {
        "ftctl_version": __version__, "versions": library_versions(), "git_commit": git_commit(),
        "command": "train", "recipe": run.choices.get("recipe"), "choices": run.choices,
        "model_path": str(run.model_path), "data_path": cfg.data.path, "data_fingerprint": bundle.fingerprint,
        "seed": cfg.seed, "device": str(run.engine.device), "mixed_precision": run.mixed,
        "distributed": cfg.distributed.strategy, "world_size": run.engine.world,
        "train_rows": run.n_rows, "val_rows": bundle.validation.kept,
        "data": {sd.name: pipeline.describe(sd) for sd in (bundle.train, bundle.validation)}, "total_steps": run.steps,
        "objective": cfg.objective, "reference": getattr(run.objective, "reference_kind", None),
        "continued_from": str(adapter_folder(cfg.model.adapter)) if cfg.model.adapter else None,
        **run.params_report, "base_memory_bytes": run.base_bytes, "adapter": run.is_adapter,
        "optimizer": cfg.trainer.optimizer, **run.task.manifest(cfg),
        "status": "running", "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


# ----------------------------------------------------------------------------- a task fitted in one go
def fit_without_steps(run: Run) -> Path:
    """A task that fits without an optimizer (classify.strategy=features): the same run directory (config.yaml,
    manifest.json, train.log), the task's own fit in between."""
    if run.main:
        atomic_write_text(run.out / "config.yaml", OmegaConf.to_yaml(run.cfg, resolve=True))
    run.manifest = _manifest(run)
    run.manifest["data"]["test"] = pipeline.describe(run.bundle.test)
    atomic_write_json(run.out / "manifest.json", run.manifest)
    try:
        final, updates = run.task.fit_without_steps(run.cfg, run.model, run.bundle, run.tokenizer, run.out,
                                                    run.console)
    except BaseException as e:
        run.manifest.update(status="failed", error=f"{type(e).__name__}: {e}")
        atomic_write_json(run.out / "manifest.json", run.manifest)
        raise
    wall = round(time.time() - run.t_start, 1)
    run.manifest.update(**updates, train_time_s=wall, status="finished", output=final.name, wall_time_s=wall,
                        finished=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    atomic_write_json(run.out / "manifest.json", run.manifest)
    run.console.print(f"[green]done[/] in {wall:.0f}s: {final}", highlight=False)
    log.info("finished: %s", final)
    _close_log(run)
    return run.out


# ----------------------------------------------------------------------------- the loop
class _Window:
    """Throughput between two logged steps, and the loop's own time, memory and tokens/s."""

    def __init__(self, run: Run):
        self.t, self.tokens = time.time(), 0
        self.device = run.engine.device
        self.reset_ok = memory.reset_peak(self.device)  # the loop's peak memory, not the model load's
        self.t_loop, self.tokens_at_start = time.time(), run.tokens_seen

    def measured(self, run: Run) -> dict:
        loop_s = time.time() - self.t_loop
        return {**memory.peak(self.device, self.reset_ok), "train_time_s": round(loop_s, 2),
                "train_tokens_per_s": round((run.tokens_seen - self.tokens_at_start) / max(loop_s, 1e-9), 2)}


def fit(run: Run) -> dict:
    """Steps from the start (or the resumed) step to the last, each logged, validated and checkpointed on
    its schedule; then the final weights. Returns the loop's measured time, memory and throughput. On any
    exception the manifest records the status (failed, preempted, interrupted) before it propagates."""
    tc = run.cfg.trainer
    progress = TrainProgress(run.console, run.steps, run.start_step, tc.log_every)
    window, stop = _Window(run), StopFlag()
    run.model.train()
    try:
        with stop:
            for step in range(run.start_step, run.steps):
                result = train_step(run, step, stop)
                window.tokens += result.tokens
                log_step(run, result, window, progress)
                if (tc.eval_every and result.done % tc.eval_every == 0) or result.done == run.steps:
                    validate(run, result.done, progress)
                if (tc.save_every and result.done % tc.save_every == 0) or result.done == run.steps \
                        or stop.signum is not None:
                    save_checkpoint(run, result.done)
                if stop.signum is not None and result.done < run.steps:
                    raise Preempted(f"stopped by {signal.Signals(stop.signum).name} at step {result.done}/{run.steps} "
                                    f"with a checkpoint saved; resume with: {_resume_command(run.out)}")
        save_final_weights(run)
    except BaseException as e:
        progress.close()
        _record_failure(run, e, window.measured(run))
        raise
    progress.close()
    return window.measured(run)


def train_step(run: Run, step: int, stop: StopFlag) -> StepResult:
    """One optimizer step: grad_accum micro-batches (this process's share of each), forward and backward,
    then the update, skipped (or stopped) where the loss or a gradient is not finite."""
    engine, objective, tc, world = run.engine, run.objective, run.cfg.trainer, run.engine.world
    # this process's share of each micro-batch (all of it in one process; see distributed.Engine.shard)
    shards = [engine.shard([run.bundle.train.examples[i] for i in run.rows(step * tc.grad_accum + j)])
              for j in range(tc.grad_accum)]
    real = [is_real for _, is_real in shards]
    micro_batches = [objective.collate(exs) for exs, _ in shards]
    real_tokens = [objective.tokens(exs) if r else 0 for (exs, _), r in zip(shards, real)]
    # normalise by the targets (tokens, or pairs) of the whole step, so accumulation equals one big batch
    # (and N processes equal one: the count is summed over them)
    n_items = objective.count([b for b, r in zip(micro_batches, real) if r])
    if world > 1:
        n_items = int(engine.all_sum([n_items])[0])
    step_loss = 0.0
    stats = StepStats() if objective_spec(run.cfg.objective).pairs else None
    for j, batch in enumerate(micro_batches):
        batch = {k: v.to(engine.device) for k, v in batch.items()}
        sync = j == len(micro_batches) - 1
        with engine.accumulating(run.model, sync):
            loss = objective.loss(run.model, batch, n_items, stats if real[j] else None)
            # gradients are averaged over the processes: times N, they add up to the step's loss
            engine.backward(run.model, loss if world == 1 else loss * (world if real[j] else 0), sync)
        step_loss += float(loss.detach()) if real[j] else 0.0
    if world > 1:
        step_loss, *sums = engine.all_sum([step_loss, sum(real_tokens), stop.signum is not None, *_stat_sums(stats)])
        real_tokens, stats = [int(sums[0])], _stats_from(stats, sums[2:])
        if sums[1] and stop.signum is None:  # a signal to any process: all stop at this step
            stop.signum = signal.SIGTERM
    grad_norm = _update(run, step, step_loss)
    run.last_loss = step_loss
    run.tokens_seen += sum(real_tokens)
    return StepResult(step + 1, step_loss, grad_norm, sum(real_tokens), stats)


def _update(run: Run, step: int, step_loss: float):
    """Clip, then apply the update where the loss and the gradients are finite (trainer.on_nan otherwise);
    returns the gradient norm."""
    import torch

    engine, model, tc = run.engine, run.model, run.cfg.trainer
    grad_norm = engine.clip(model, run.params, tc.max_grad_norm)
    done = step + 1
    if grad_norm is not None:
        grads_ok = math.isfinite(float(grad_norm))
    else:
        grads_ok = all(bool(torch.isfinite(p.grad).all()) for p in run.params if p.grad is not None)
    if math.isfinite(step_loss) and grads_ok:
        engine_norm = engine.optimizer_step(model, run.optimizer)  # DeepSpeed measures it in its step
        grad_norm = grad_norm if engine_norm is None else engine_norm
        if run.step_hook is not None:
            run.step_hook(engine.unwrap(model), done)
    elif tc.on_nan == "stop":
        rows = [i for j in range(tc.grad_accum) for i in run.rows(step * tc.grad_accum + j)]
        raise NonFiniteError(
            f"non-finite loss/gradient at step {done} (loss {step_loss}, training rows {rows}); the update "
            "was not applied and the last good checkpoint is kept (trainer.on_nan=skip goes on instead)")
    else:
        _skip(run, done, step_loss)
    engine.finish_step(model, run.optimizer, run.scheduler)
    return grad_norm


def _skip(run: Run, done: int, step_loss: float) -> None:
    """trainer.on_nan=skip: count the dropped update; more than trainer.max_skipped_steps stops the run."""
    run.skipped += 1
    log.warning("step %d: non-finite loss/gradient (loss %s); update skipped", done, step_loss)
    limit = run.cfg.trainer.max_skipped_steps
    if 0 <= limit < run.skipped:
        raise NonFiniteError(
            f"{run.skipped} of {done} steps skipped for a non-finite loss/gradient, more than "
            f"trainer.max_skipped_steps={limit}; stopped at step {done}/{run.steps} and the last good checkpoint "
            "is kept (lower trainer.lr, or raise trainer.max_skipped_steps; < 0: no limit)")


def log_step(run: Run, r: StepResult, window: _Window, progress) -> None:
    """A metrics.jsonl row (and the trackers, train.log, the progress line) every trainer.log_every steps."""
    tc = run.cfg.trainer
    if not (r.done % tc.log_every == 0 or r.done == run.steps or r.done == run.start_step + 1):
        progress.update(r.done, None)
        return
    now = time.time()
    row = {"step": r.done, "loss": round(r.loss, 6), "lr": run.scheduler.get_last_lr()[0],
           "grad_norm": None if r.grad_norm is None else round(float(r.grad_norm), 6),
           "tokens": run.tokens_seen, "tokens_per_s": window.tokens / max(now - window.t, 1e-9),
           "epoch": round(r.done * tc.grad_accum * tc.batch_size / run.n_rows, 4),
           "skipped_steps": run.skipped, **(r.stats.means() if r.stats else {})}
    with writing(run.out / "metrics.jsonl"):
        run.metrics.log(**json_safe(row))  # a NaN loss as null, flagged: metrics.jsonl stays strict JSON
    run.trackers.log(row, r.done)
    log.info("step %d loss %.4f lr %.3e tok/s %.0f", r.done, r.loss, row["lr"], row["tokens_per_s"])
    progress.update(r.done, row)
    window.t, window.tokens = now, 0


def validate(run: Run, done: int, progress) -> None:
    """Validation loss (and the objective's other validation figures) on up to trainer.eval_max_rows rows."""
    tc = run.cfg.trainer
    val = _validate(run.objective, run.model, run.bundle.validation.examples[:tc.eval_max_rows], tc.batch_size,
                    run.engine.device)
    if val is None:
        return
    run.val_loss = val["val_loss"]
    with writing(run.out / "metrics.jsonl"):
        run.metrics.log(**json_safe({"step": done, **{k: round(v, 6) for k, v in val.items()}}))
    run.trackers.log({k: round(v, 6) for k, v in val.items()}, done)
    log.info("step %d %s", done, " ".join(f"{k} {v:.4f}" for k, v in val.items()))
    extra = f", preference accuracy {val['val_accuracy']:.3f}" if "val_accuracy" in val else \
        f", accuracy {val['val_acc']:.2f}%, macro F1 {val['val_f1_macro']:.2f}" if "val_acc" in val else ""
    progress.print(f"step {done}: validation loss {run.val_loss:.4f}{extra}")
    run.last_val = val


def save_checkpoint(run: Run, done: int) -> None:
    """A checkpoint of step ``done``; a full disk is one line naming the path and the checkpoint that is kept
    (checkpoint.save names the file; this, what a sharded engine's own writer failed on)."""
    root = run.out / "checkpoints"
    with writing(root / f"step-{done:06d}", hint=lambda: checkpoint.kept(root)):
        run.engine.save(root, done, run.model, run.optimizer, run.scheduler,
                        {"step": done, "tokens_seen": run.tokens_seen, "skipped_steps": run.skipped},
                        run.cfg.trainer.keep_checkpoints)


def save_final_weights(run: Run) -> None:
    """The final adapter (or model): every process takes part in gathering it; the main one writes it."""
    gathered = run.engine.final_state(run.model, run.is_adapter)
    if run.main:
        save_final(run.engine.unwrap(run.model), run.tokenizer, run.out, run.is_adapter, gathered)
    run.engine.barrier()


def _record_failure(run: Run, e: BaseException, measured: dict) -> None:
    status = {KeyboardInterrupt: "interrupted", Preempted: "preempted"}.get(type(e), "failed")
    run.manifest.update(status=status, error=f"{type(e).__name__}: {e}", **measured)
    if run.main:
        try:
            atomic_write_json(run.out / "manifest.json", run.manifest)
        except FtctlError as err:  # a disk still full: the error that stopped the run is the one to report
            log.warning("manifest.json not updated: %s", err)
    run.metrics.close()
    run.trackers.finish(status=status)
    _close_log(run)


def _close_log(run: Run) -> None:
    """train.log's handler off the ftctl logger, and closed."""
    if run.handler is not None:
        log.removeHandler(run.handler)
        run.handler.close()


# ----------------------------------------------------------------------------- finish
def finish(run: Run, loop_figures: dict) -> None:
    """The task's final scores, the finished manifest, then eval.after_train, plots and the trackers' end."""

    cfg, out, manifest = run.cfg, run.out, run.manifest
    run.task.finish(run.engine.accelerator.unwrap_model(run.model), run.bundle, run.tokenizer.pad_token_id,
                    manifest, run.console)
    final = out / ("adapter" if run.is_adapter else "model")
    manifest.update(status="finished", finished=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    **loop_figures, final_train_loss=run.last_loss, final_val_loss=run.val_loss,
                    final_val=run.last_val, output=final.name, wall_time_s=round(time.time() - run.t_start, 1))
    atomic_write_json(out / "manifest.json", manifest)
    run.metrics.close()
    run.console.print(f"[green]done[/] in {time.time() - run.t_start:.0f}s: {final}", highlight=False)
    if cfg.eval.after_train:
        _after_train_eval(cfg, out, manifest, run.console)
    if cfg.logging.plots:
        report.plots_after_run(out, run.console)  # a failure here is a warning line, the run stays finished
    run.trackers.finish(final, eval_scores=manifest.get("eval"))
    log.info("finished: %s", final)
    _close_log(run)
