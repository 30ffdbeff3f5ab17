"""The training loop: set up, loop, evaluate, checkpoint, save. One readable function, driven by
Accelerate (not the HF Trainer), in the spirit of torchtune's single-device recipes."""
from __future__ import annotations

import logging
import math
import os
import signal
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from ftctl import __version__
from ftctl.core.errors import ConfigError, NonFiniteError, Preempted
from ftctl.rundir import Metrics, default_output_dir, git_commit, library_versions, prepare_output_dir
from ftctl.core.atomic import atomic_write_json, atomic_write_text
from ftctl.objectives.losses import StepStats
from ftctl.data.batches import batch_indices, row_lengths, total_steps

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


def resume_arg(value) -> bool | str:
    """resume=true|false, or a checkpoint path."""
    if isinstance(value, bool):
        return value
    text = str(value).strip()
    if text.lower() in ("true", "yes", "1"):
        return True
    if text.lower() in ("false", "no", "0", ""):
        return False
    return text


def _setup_logging(out: Path, debug: bool) -> logging.Handler:
    handler = logging.FileHandler(out / "train.log")
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


def _save_final(model, tokenizer, out: Path, is_adapter: bool, state: dict | None = None) -> Path:
    """The final adapter (or model), written once; ``state``: weights gathered from sharded processes."""
    import shutil

    from ftctl.methods.peft import save_adapter
    from ftctl.train.checkpoint import assert_finite, trainable_state

    assert_finite(trainable_state(model) if state is None else state, "the final weights")

    name = "adapter" if is_adapter else "model"
    final = out / name
    tmp = out / f".{name}.tmp-{os.getpid()}"
    for stale in out.glob(f".{name}.tmp-*"):  # left by a save that was killed
        shutil.rmtree(stale, ignore_errors=True)
    if is_adapter:
        save_adapter(model, tmp, **({} if state is None else {"state_dict": state}))
    else:
        model.save_pretrained(tmp, **({} if state is None else {"state_dict": state}))
    tokenizer.save_pretrained(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    return final


def _after_train_eval(cfg, out: Path, manifest: dict, console) -> None:
    """eval.after_train: score the finished run; a failure here is reported, the trained run stays valid."""
    from ftctl.core.errors import FtctlError
    from ftctl.evaluate.run import EvalConfig, run_eval

    e = cfg.eval
    try:
        report = run_eval(EvalConfig(run=str(out), metrics=list(e.after_train), split=e.split, limit=e.limit,
                                     max_new_tokens=e.max_new_tokens, batch_size=e.batch_size, name="after_train"),
                          console=console)
        manifest["eval"] = report["results"].get("tuned")
    except FtctlError as err:
        console.print(f"[yellow]eval.after_train failed:[/] {err}", highlight=False)
        manifest["eval_error"] = str(err)
    atomic_write_json(out / "manifest.json", manifest)


def train(cfg: DictConfig, choices: dict, console=None, debug: bool = False) -> Path:
    """Run one training job described by a composed config. Returns the run directory."""
    import torch
    from accelerate.utils import set_seed
    from rich.console import Console
    from transformers import get_scheduler

    from ftctl.methods import peft as adapters
    from ftctl.train import launch, tracking
    from ftctl.core import memory
    from ftctl.models import load as models
    from ftctl import report
    from ftctl.data import pipeline
    from ftctl.core.progress import TrainProgress
    from ftctl.core.registry import ADAPTERS
    from ftctl.train import checkpoint, distributed
    from ftctl.train import setup as objectives_setup
    from ftctl.train.optim import make_optimizer

    if launch.needed(cfg):
        raise ConfigError(f"distributed={cfg.distributed.strategy} with {launch.world_size(cfg)} process(es) runs under "
                          "torchrun: start it with `ftctl train` (not in a sweep or from Python's train())")
    main = os.environ.get("RANK", "0") == "0"  # only the main process writes and prints
    console = console if main and console is not None else Console(soft_wrap=True, quiet=not main)
    t_start = time.time()
    resume = resume_arg(cfg.resume)
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
    accelerator, device, world = engine.accelerator, engine.device, engine.world
    if mixed == "fp16" and device.type == "cpu":
        console.print("[yellow]precision=fp16 on CPU: no loss scaling (that needs a CUDA GPU); bf16 is the safer "
                      "choice[/]", highlight=False)
    set_seed(cfg.seed)

    # -- model and data: resolved before the run directory is touched, so bad input leaves nothing behind
    with engine.main_first():  # the main process fills the model and data caches; the others then read them
        model_path = models.resolve(cfg.model.path, cfg.model.revision)
        tokenizer = models.load_tokenizer(model_path)
        classify_task = cfg.get("task", "generate") == "classify"
        if classify_task:
            from ftctl.tasks import classify

            bundle = classify.build_data(cfg, tokenizer)
        else:
            bundle = pipeline.build(cfg, tokenizer)
    train_data, val_data = bundle.train, bundle.validation
    if cfg.objective != "sft" and not bundle.preference:
        raise ConfigError(f"objective={cfg.objective} needs preference pairs (template=preference or preference_chat, "
                          f"rows with chosen and rejected); {cfg.data.path} gave single examples")
    if main:
        prepare_output_dir(out, overwrite=cfg.overwrite, resume=bool(resume))
        handler = _setup_logging(out, debug)
    else:
        handler = logging.NullHandler()
    where = f"device={device}" if world == 1 else f"distributed={cfg.distributed.strategy} x{world} ({device.type})"
    method = f"classify.strategy={cfg.classify.strategy}" if classify_task else f"method={cfg.peft.method}"
    console.print(f"[bold]ftctl train[/] recipe={choices.get('recipe', '-')} model={cfg.model.name} "
                  f"{method} quant={cfg.quant.method} {where} → {out}", highlight=False)
    for sd in (train_data, val_data):
        line = f"data ({sd.name}): {pipeline.describe(sd)}"
        log.info("%s (%s)", line, cfg.data.path)
        if sd.skipped_bad or sd.dropped_too_long or sd.truncated:
            console.print(f"[yellow]{line}[/]", highlight=False)
        for bad in sd.bad_examples:
            console.print(f"  skipped: {bad}", highlight=False, markup=False)
    log.info("data cache: %d hit(s), %d miss(es)", bundle.cache_hits, bundle.cache_misses)
    if bundle.preference and cfg.objective == "sft":
        console.print("preference pairs with the SFT objective: training on prompt + chosen answer", highlight=False)
    quantized = cfg.quant.method != "none"
    if classify_task and bundle.balance_report:
        console.print(f"data.balance={cfg.data.balance}: {bundle.balance_report}", highlight=False)
        log.info("data.balance=%s: %s", cfg.data.balance, bundle.balance_report)
    head = "classify" if classify_task else "score" if cfg.objective == "reward" else "lm"
    model = models.load_model(model_path, cfg.model, cfg.quant, device, head=head, pad_id=tokenizer.pad_token_id,
                              labels=bundle.labels if classify_task else None)
    base_bytes = model.get_memory_footprint()
    n_rows = len(train_data.examples)
    lengths = row_lengths(cfg, train_data.examples)
    steps = total_steps(cfg.trainer, n_rows)
    if classify_task:
        from ftctl.core.registry import CLASSIFY

        model = CLASSIFY.get(cfg.classify.strategy)(model, cfg, gradient_checkpointing=cfg.trainer.gradient_checkpointing,
                                                    steps=steps, model_path=model_path)
        if cfg.classify.strategy == "features":
            return classify.train_features(cfg, choices, model, tokenizer, bundle, out, console, t_start,
                                           model_path, str(device), handler)
    elif cfg.model.adapter:
        model = objectives_setup.continue_adapter(model, cfg.model.adapter, quantized, cfg.trainer.gradient_checkpointing)
    else:
        # a reward model's adapter also trains its new scalar head (peft's SEQ_CLS task saves "score")
        task = {"task_type": "SEQ_CLS"} if cfg.objective == "reward" else \
            {"task_type": "SEQ_2_SEQ_LM"} if cfg.model.get("kind") == "seq2seq" else {}
        model = ADAPTERS.get(cfg.peft.method)(model, cfg.peft, quantized=quantized,
                                              gradient_checkpointing=cfg.trainer.gradient_checkpointing,
                                              steps=steps, model_path=model_path, **task)
    is_adapter = adapters.is_adapter(model)
    params_report = adapters.parameter_report(model)
    n_trainable, n_total = params_report["trainable_params"], params_report["total_params"]
    if n_trainable == 0:
        raise ConfigError(f"peft.method={cfg.peft.method} left no trainable parameters (check peft.target_modules)")
    model = engine.wrap(model)  # FSDP shards the parameters before the optimizer sees them

    # -- optimizer and schedule
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(cfg.trainer, cfg.peft, model, params)
    warmup = cfg.trainer.warmup_steps if cfg.trainer.warmup_steps >= 0 else int(cfg.trainer.warmup_ratio * steps)
    scheduler = get_scheduler(cfg.trainer.scheduler if cfg.trainer.scheduler != "constant" else "constant_with_warmup",
                              optimizer, num_warmup_steps=warmup, num_training_steps=steps)
    model, optimizer = engine.prepare(model, optimizer, scheduler)
    with engine.main_first():  # DPO's precomputed reference is cached on disk
        # logits at the target positions only: where one process holds the whole model (the sharded and
        # DDP engines need their own forward to run)
        one = world == 1 and cfg.distributed.strategy == "single"
        objective = objectives_setup.make_objective(cfg, engine.unwrap(model), tokenizer.pad_token_id, bundle,
                                                    model_path, steps, console,
                                                    autocast=engine.accelerator.autocast if one else None)
    start_step, tokens_seen, skipped = 0, 0, 0
    if resume and ckpt is None:
        console.print(f"resume=true: no complete checkpoint in {out / 'checkpoints'} yet; starting at step 0",
                      highlight=False)
    if ckpt is not None:
        state = engine.load(ckpt, model, optimizer, scheduler)
        start_step, tokens_seen = state["step"], state["tokens_seen"]
        skipped = state.get("skipped_steps", 0)
        console.print(f"resumed from {ckpt} at step {start_step}", highlight=False)
        log.info("resumed from %s at step %d", ckpt, start_step)

    # -- run directory
    if main:
        atomic_write_text(out / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    manifest = {
        "ftctl_version": __version__, "versions": library_versions(), "git_commit": git_commit(),
        "command": "train", "recipe": choices.get("recipe"), "choices": choices,
        "model_path": str(model_path), "data_path": cfg.data.path, "data_fingerprint": bundle.fingerprint,
        "seed": cfg.seed, "device": str(device), "mixed_precision": mixed,
        "distributed": cfg.distributed.strategy, "world_size": world,
        "train_rows": len(train_data.examples), "val_rows": val_data.kept,
        "data": {sd.name: pipeline.describe(sd) for sd in (train_data, val_data)}, "total_steps": steps,
        "objective": cfg.objective, "reference": getattr(objective, "reference_kind", None),
        "continued_from": str(objectives_setup.adapter_folder(cfg.model.adapter)) if cfg.model.adapter else None,
        **params_report, "base_memory_bytes": base_bytes, "adapter": is_adapter,
        "peft_method": cfg.peft.method if not classify_task or cfg.classify.strategy == "lora" else None,
        "optimizer": cfg.trainer.optimizer,
        **({"task": "classify", "strategy": cfg.classify.strategy} if classify_task else {}),
        "status": "running", "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if main:
        atomic_write_json(out / "manifest.json", manifest)
    metrics = Metrics(out / "metrics.jsonl", resume_step=start_step if resume else None) if main else _NoMetrics()
    trackers = tracking.Trackers(cfg, out, accelerator, console, start_step=start_step)
    console.print(f"{n_rows} train rows, {val_data.kept} validation rows, {steps} steps, "
                  f"{n_trainable:,} trainable of {n_total:,} parameters ({params_report['trainable_percent']:.4g}%)",
                  highlight=False)
    console.print(_trained_modules_line(params_report["trainable_modules"]), highlight=False, markup=False)

    # -- loop
    progress = TrainProgress(console, steps, start_step, cfg.trainer.log_every)
    tc = cfg.trainer
    model.train()
    last_loss = val_loss = None
    last_val: dict = {}
    window_t, window_tokens = time.time(), 0
    stop = StopFlag()
    reset_ok = memory.reset_peak(device)  # the loop's peak memory, not the model load's
    t_loop, tokens_at_start = time.time(), tokens_seen

    def measured() -> dict:
        loop_s = time.time() - t_loop
        return {**memory.peak(device, reset_ok), "train_time_s": round(loop_s, 2),
                "train_tokens_per_s": round((tokens_seen - tokens_at_start) / max(loop_s, 1e-9), 2)}
    try:
        with stop:
            for step in range(start_step, steps):
                # this process's share of each micro-batch (all of it in one process; see distributed.Engine.shard)
                shards = [engine.shard([train_data.examples[i] for i in batch_indices(
                    n_rows, tc.batch_size, cfg.seed, cfg.data.shuffle, step * tc.grad_accum + j, lengths)])
                    for j in range(tc.grad_accum)]
                micro_examples = [exs for exs, _ in shards]
                real = [is_real for _, is_real in shards]
                micro_batches = [objective.collate(exs) for exs in micro_examples]
                real_tokens = [objective.tokens(exs) if r else 0 for exs, r in zip(micro_examples, real)]
                # normalise by the targets (tokens, or pairs) of the whole step, so accumulation equals one big batch
                # (and N processes equal one: the count is summed over them)
                n_items = objective.count([b for b, r in zip(micro_batches, real) if r])
                if world > 1:
                    n_items = int(engine.all_sum([n_items])[0])
                step_loss = 0.0
                stats = StepStats() if cfg.objective != "sft" else None
                for j, batch in enumerate(micro_batches):
                    batch = {k: v.to(device) for k, v in batch.items()}
                    sync = j == len(micro_batches) - 1
                    with engine.accumulating(model, sync):
                        loss = objective.loss(model, batch, n_items, stats if real[j] else None)
                        # gradients are averaged over the processes: times N, they add up to the step's loss
                        engine.backward(model, loss if world == 1 else loss * (world if real[j] else 0), sync)
                    step_loss += float(loss.detach()) if real[j] else 0.0
                if world > 1:
                    step_loss, *sums = engine.all_sum([step_loss, sum(real_tokens), stop.signum is not None,
                                                       *_stat_sums(stats)])
                    real_tokens, stats = [int(sums[0])], _stats_from(stats, sums[2:])
                    if sums[1] and stop.signum is None:  # a signal to any process: all stop at this step
                        stop.signum = signal.SIGTERM
                window_tokens += sum(real_tokens)
                grad_norm = engine.clip(model, params, tc.max_grad_norm)
                done = step + 1
                if grad_norm is not None:
                    grads_ok = math.isfinite(float(grad_norm))
                else:
                    grads_ok = all(bool(torch.isfinite(p.grad).all()) for p in params if p.grad is not None)
                if math.isfinite(step_loss) and grads_ok:
                    engine_norm = engine.optimizer_step(model, optimizer)  # DeepSpeed measures it in its step
                    grad_norm = grad_norm if engine_norm is None else engine_norm
                    adapters.after_step(engine.unwrap(model), done)  # AdaLoRA's rank budget
                elif tc.on_nan == "stop":
                    rows = [i for j in range(tc.grad_accum) for i in batch_indices(
                        n_rows, tc.batch_size, cfg.seed, cfg.data.shuffle, step * tc.grad_accum + j, lengths)]
                    raise NonFiniteError(
                        f"non-finite loss/gradient at step {done} (loss {step_loss}, training rows {rows}); the update "
                        "was not applied and the last good checkpoint is kept (trainer.on_nan=skip goes on instead)")
                else:
                    skipped += 1
                    log.warning("step %d: non-finite loss/gradient (loss %s); update skipped", done, step_loss)
                engine.finish_step(model, optimizer, scheduler)
                last_loss = step_loss
                tokens_seen += sum(real_tokens)
                if done % tc.log_every == 0 or done == steps or done == start_step + 1:
                    now = time.time()
                    row = {"step": done, "loss": round(step_loss, 6), "lr": scheduler.get_last_lr()[0],
                           "grad_norm": None if grad_norm is None else round(float(grad_norm), 6),
                           "tokens": tokens_seen, "tokens_per_s": window_tokens / max(now - window_t, 1e-9),
                           "epoch": round(done * tc.grad_accum * tc.batch_size / n_rows, 4),
                           "skipped_steps": skipped, **(stats.means() if stats else {})}
                    metrics.log(**row)
                    trackers.log(row, done)
                    log.info("step %d loss %.4f lr %.3e tok/s %.0f", done, step_loss, row["lr"], row["tokens_per_s"])
                    progress.update(done, row)
                    window_t, window_tokens = now, 0
                else:
                    progress.update(done, None)
                if (tc.eval_every and done % tc.eval_every == 0) or done == steps:
                    val = _validate(objective, model, val_data.examples[:tc.eval_max_rows], tc.batch_size, device)
                    if val is not None:
                        val_loss = val["val_loss"]
                        metrics.log(step=done, **{k: round(v, 6) for k, v in val.items()})
                        trackers.log({k: round(v, 6) for k, v in val.items()}, done)
                        log.info("step %d %s", done, " ".join(f"{k} {v:.4f}" for k, v in val.items()))
                        extra = f", preference accuracy {val['val_accuracy']:.3f}" if "val_accuracy" in val else \
                            f", accuracy {val['val_acc']:.2f}%, macro F1 {val['val_f1_macro']:.2f}" if "val_acc" in val else ""
                        progress.print(f"step {done}: validation loss {val_loss:.4f}{extra}")
                        last_val = val
                if (tc.save_every and done % tc.save_every == 0) or done == steps or stop.signum is not None:
                    engine.save(out / "checkpoints", done, model, optimizer, scheduler,
                                {"step": done, "tokens_seen": tokens_seen, "skipped_steps": skipped}, tc.keep_checkpoints)
                if stop.signum is not None and done < steps:
                    raise Preempted(f"stopped by {signal.Signals(stop.signum).name} at step {done}/{steps} with a "
                                    f"checkpoint saved; resume with: {_resume_command(out)}")
        gathered = engine.final_state(model, is_adapter)  # every process takes part; the main one saves
        final = out / ("adapter" if is_adapter else "model")
        if main:
            final = _save_final(engine.unwrap(model), tokenizer, out, is_adapter, gathered)
        engine.barrier()
    except BaseException as e:
        progress.close()
        status = {KeyboardInterrupt: "interrupted", Preempted: "preempted"}.get(type(e), "failed")
        manifest.update(status=status, error=f"{type(e).__name__}: {e}", **measured())
        if main:
            atomic_write_json(out / "manifest.json", manifest)
        metrics.close()
        trackers.finish(status=status)
        log.removeHandler(handler)
        raise
    progress.close()
    loop_figures = measured()  # the training loop's peak memory, time and throughput
    if not main:
        return out
    if classify_task:
        with console.status("scoring the classifier on the train, validation and test rows"):
            result = classify.final_scores(accelerator.unwrap_model(model), bundle, tokenizer.pad_token_id)
        manifest.update(classify=result, **classify.headline(result))
        console.print(classify.summary_line(result), highlight=False)
    manifest.update(status="finished", finished=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    **loop_figures, final_train_loss=last_loss, final_val_loss=val_loss, final_val=last_val, output=final.name,
                    wall_time_s=round(time.time() - t_start, 1))
    atomic_write_json(out / "manifest.json", manifest)
    metrics.close()
    console.print(f"[green]done[/] in {time.time() - t_start:.0f}s: {final}", highlight=False)
    if cfg.eval.after_train:
        _after_train_eval(cfg, out, manifest, console)
    if cfg.logging.plots:
        report.plots_after_run(out, console)  # a failure here is a warning line, the run stays finished
    trackers.finish(final, eval_scores=manifest.get("eval"))
    log.info("finished: %s", final)
    log.removeHandler(handler)
    handler.close()
    return out
