"""How the runner's processes work together (``distributed=``), on the established engines:

  single, ddp        Accelerate (one process; DistributedDataParallel under torchrun)
  fsdp               torch's FSDP2 (``fully_shard`` per decoder layer), sharded checkpoints via
                     torch.distributed.checkpoint
  zero1 .. zero3     DeepSpeed's engine, driven directly (Accelerate's DeepSpeed plugin counts one
  zero3_offload      process on a machine without GPUs); its config is written from ftctl's settings

An Accelerator is made in every case: it starts the process group (gloo on CPU, nccl on GPUs), picks
the device and drives the trackers. ``trainer.batch_size`` is the global micro-batch: each of N
processes takes its 1/N of the same rows (``Engine.shard``), and the loss is normalised by the target
count of the whole step across processes, so N processes train exactly as one does with the same batch.
Only the main process writes the run directory; every process takes part in collectives (checkpoints
and the final weights included).
"""
from __future__ import annotations

import json
import os
import shutil
from contextlib import nullcontext
from pathlib import Path

from ftctl.config.choices import ENGINE, ZERO_STAGE
from ftctl.core.atomic import atomic_write_json, fsync_dir
from ftctl.core.errors import ConfigError, RunDirError
from ftctl.train import checkpoint
from ftctl.train.checkpoint import prune_checkpoints, rng_state, set_rng_state, sha256_file


# ----------------------------------------------------------------------------- precision
def mixed_precision(cfg) -> str:
    """precision.name as Accelerate's mixed_precision; a clear error where the hardware lacks it."""
    import torch

    name, cuda = cfg.precision.name, torch.cuda.is_available()
    if name == "auto":
        return "bf16" if cuda and torch.cuda.is_bf16_supported() else "no"
    if name == "fp8":
        check_fp8()
    if name == "fp16" and not cuda and cfg.distributed.strategy not in ("single", "ddp"):
        raise ConfigError(f"precision=fp16 with distributed={cfg.distributed.strategy} needs a CUDA GPU (fp16 with "
                          "loss scaling); on CPU use precision=bf16 or fp32")
    return {"fp32": "no", "bf16": "bf16", "fp16": "fp16", "fp8": "fp8"}[name]


def fp8_backend() -> str | None:
    from importlib.util import find_spec

    return "torchao" if find_spec("torchao") else "te" if find_spec("transformer_engine") else None


def check_fp8() -> None:
    import torch

    need = "an NVIDIA GPU of compute capability >= 8.9 (Ada, Hopper or newer) and torchao or transformer-engine"
    if not torch.cuda.is_available():
        raise ConfigError(f"precision=fp8 needs {need}; this machine has no CUDA GPU (use precision=bf16 or fp32)")
    cc = torch.cuda.get_device_capability()
    if cc < (8, 9):
        raise ConfigError(f"precision=fp8 needs {need}; {torch.cuda.get_device_name()} has compute capability "
                          f"{cc[0]}.{cc[1]} (use precision=bf16)")
    if fp8_backend() is None:
        raise ConfigError(f"precision=fp8 needs {need}; neither is installed (pip install torchao)")


# ----------------------------------------------------------------------------- DeepSpeed's config
def deepspeed_config(cfg, world: int, mixed: str) -> dict:
    """The DeepSpeed config of ``distributed=zero*``, from trainer.* and the precision; a user's
    ``distributed.deepspeed_config`` JSON on top, whose batch, clipping, precision and stage keys must agree
    with ftctl's (or say "auto")."""
    tc, strategy = cfg.trainer, cfg.distributed.strategy
    stage = ZERO_STAGE[strategy]
    ours = {"train_batch_size": tc.batch_size * tc.grad_accum, "train_micro_batch_size_per_gpu": tc.batch_size // world,
            "gradient_accumulation_steps": tc.grad_accum, "gradient_clipping": float(tc.max_grad_norm)}
    precision = {"bf16": {"enabled": mixed == "bf16"}, "fp16": {"enabled": mixed == "fp16"}}
    zero = {"stage": stage}
    if strategy == "zero3_offload":
        zero.update(offload_param={"device": "cpu"}, offload_optimizer={"device": "cpu"})
    out = {**ours, **precision, "zero_optimization": zero, "steps_per_print": 10 ** 9, "wall_clock_breakdown": False,
           # ftctl's own optimizer (trainer.optimizer), given to DeepSpeed, also with ZeRO-offload
           "zero_allow_untested_optimizer": True, "zero_force_ds_cpu_optimizer": False}
    if mixed == "fp16":
        out["fp16"].update(loss_scale=0, initial_scale_power=16)  # dynamic loss scaling
    path = cfg.distributed.deepspeed_config
    if not path:
        return out
    where = f"distributed.deepspeed_config={path}"
    try:
        user = json.loads(Path(path).expanduser().read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{where}: cannot read it as JSON ({e})") from e
    if not isinstance(user, dict):
        raise ConfigError(f"{where}: not a JSON object")
    for key in ("optimizer", "scheduler"):
        if key in user:
            raise ConfigError(f"{where}: remove '{key}'; ftctl builds the optimizer and schedule from trainer.* "
                              "(trainer.optimizer, trainer.lr, trainer.scheduler)")
    why = {"train_batch_size": "trainer.batch_size x trainer.grad_accum",
           "train_micro_batch_size_per_gpu": f"trainer.batch_size / {world} processes",
           "gradient_accumulation_steps": "trainer.grad_accum", "gradient_clipping": "trainer.max_grad_norm"}
    for key, value in ours.items():
        theirs = user.get(key, "auto")
        if theirs != "auto" and theirs != value:
            raise ConfigError(f"{where}: {key}={theirs} disagrees with ftctl's {value} ({why[key]}); set it to "
                              "\"auto\" or remove it")
        user[key] = value
    for key, value in precision.items():
        theirs = (user.get(key) or {}).get("enabled", "auto")
        if theirs != "auto" and bool(theirs) != value["enabled"]:
            raise ConfigError(f"{where}: {key}.enabled={theirs} disagrees with precision={cfg.precision.name}; set it "
                              "to \"auto\" or remove it")
        user[key] = {**out[key], **(user.get(key) or {}), "enabled": value["enabled"]}
    theirs = (user.get("zero_optimization") or {}).get("stage", "auto")
    if theirs != "auto" and theirs != stage:
        raise ConfigError(f"{where}: zero_optimization.stage={theirs} disagrees with distributed={strategy} (stage "
                          f"{stage})")
    user["zero_optimization"] = {**zero, **(user.get("zero_optimization") or {}), "stage": stage}
    return {**out, **user}


# ----------------------------------------------------------------------------- engines
class Engine:
    """single and ddp, through Accelerate: exactly the calls a one-process run has always made."""

    format = "ftctl"  # checkpoints as train/checkpoint.py writes them

    def __init__(self, cfg, mixed: str, log_with):
        import torch
        from accelerate import Accelerator

        kwargs = []
        if mixed == "fp8":
            from accelerate.utils import AORecipeKwargs, TERecipeKwargs

            kwargs = [AORecipeKwargs() if fp8_backend() == "torchao" else TERecipeKwargs()]
        self.cfg = cfg
        self.accelerator = Accelerator(mixed_precision=mixed if self.format == "ftctl" else "no",
                                       cpu=not torch.cuda.is_available(), log_with=log_with, kwargs_handlers=kwargs)
        self.mixed = mixed
        self.device = self.accelerator.device
        self.rank, self.world = self.accelerator.process_index, self.accelerator.num_processes
        self.is_main = self.accelerator.is_main_process
        self.strategy = cfg.distributed.strategy

    # -- data
    def shard(self, examples: list) -> tuple[list, bool]:
        """This process's share of a global micro-batch, and whether it holds real rows (the short last
        batch of an epoch can leave a process none: it then runs one row with weight 0, so that every
        process takes part in the same collectives)."""
        if self.world == 1:
            return examples, True
        k = -(-len(examples) // self.world)
        mine = examples[self.rank * k:(self.rank + 1) * k]
        return (mine, True) if mine else (examples[:1], False)

    def all_sum(self, values: list[float]) -> list[float]:
        if self.world == 1:
            return values
        import torch
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def barrier(self) -> None:
        if self.world > 1:
            self.accelerator.wait_for_everyone()

    def main_first(self):
        return self.accelerator.main_process_first()

    # -- model
    def wrap(self, model):
        """Before the optimizer is made (FSDP shards the parameters here)."""
        return model

    def prepare(self, model, optimizer, scheduler):
        model, optimizer = self.accelerator.prepare(model, optimizer)
        self.optimizer = optimizer
        return model, optimizer

    def unwrap(self, model):
        return self.accelerator.unwrap_model(model)

    def accumulating(self, model, last: bool):
        return nullcontext() if last else self.accelerator.no_sync(model)

    def backward(self, model, loss, last: bool) -> None:
        self.accelerator.backward(loss)

    def clip(self, model, params, max_norm: float):
        return self.accelerator.clip_grad_norm_(params, max_norm) if max_norm > 0 else None

    def optimizer_step(self, model, optimizer):
        """Apply the step's update; returns the gradient norm where the engine measured it."""
        optimizer.step()
        return None

    def finish_step(self, model, optimizer, scheduler) -> None:
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

    # -- checkpoints and the final weights
    def save(self, root: Path, step: int, model, optimizer, scheduler, state: dict, keep: int) -> Path:

        final = root / f"step-{step:06d}"
        if self.is_main:
            final = checkpoint.save(root, step, self.unwrap(model), optimizer, scheduler, state, keep)
        self.barrier()
        return final

    def load(self, ckpt: Path, model, optimizer, scheduler) -> dict:

        self._check_format(ckpt)
        return checkpoint.load(ckpt, self.unwrap(model), optimizer, scheduler)

    def final_state(self, model, is_adapter: bool) -> dict | None:
        """The weights to save, gathered where they are sharded (collective); None: the model's own."""
        return None

    def _check_format(self, ckpt: Path) -> None:
        meta = json.loads((ckpt / "checkpoint.json").read_text())
        fmt = meta.get("format", "ftctl")
        if fmt != self.format:
            made = meta.get("strategy", "single or ddp")
            raise RunDirError(f"checkpoint {ckpt} was written by distributed={made}; resume it with that strategy "
                              f"(this run has distributed={self.strategy})")


class ShardedEngine(Engine):
    """What FSDP and DeepSpeed share: checkpoints written by every process into one folder, described
    by the main process's checkpoint.json (written last, so the folder is complete or absent)."""

    def _save_sharded(self, root: Path, step: int, write, state: dict, keep: int, scheduler=None) -> Path:
        import torch

        final, tmp = root / f"step-{step:06d}", root / f".tmp-step-{step:06d}-{self.strategy}"
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.barrier()
        write(tmp)  # every process writes its shards
        self.barrier()
        if self.is_main:
            if scheduler is not None:
                torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            torch.save(rng_state(), tmp / "rng.pt")
            (tmp / "state.json").write_text(json.dumps(state))
            files = {}
            for f in sorted(p for p in tmp.rglob("*") if p.is_file()):
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
                files[str(f.relative_to(tmp))] = {"bytes": f.stat().st_size, "sha256": sha256_file(f)}
            atomic_write_json(tmp / "checkpoint.json", {"step": step, "format": self.format, "strategy": self.strategy,
                                                        "world_size": self.world, "files": files})
            if final.exists():
                shutil.rmtree(final)
            os.rename(tmp, final)
            fsync_dir(root)
            prune_checkpoints(root, keep)
        self.barrier()
        return final

    def _load_common(self, ckpt: Path, scheduler=None) -> dict:
        import torch

        if scheduler is not None:
            scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", map_location="cpu", weights_only=True))
        set_rng_state(torch.load(ckpt / "rng.pt", map_location="cpu", weights_only=True))
        return json.loads((ckpt / "state.json").read_text())

    def clip(self, model, params, max_norm: float):
        import torch

        if max_norm <= 0:
            return None
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


class FSDPEngine(ShardedEngine):
    """torch's FSDP2: ``fully_shard`` on every decoder layer, then on the whole model."""

    format = "dcp"

    def wrap(self, model):
        import torch
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh(self.device.type, (self.world,))
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.mixed)
        policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32) if dtype else MixedPrecisionPolicy()
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        layers = set(getattr(base, "_no_split_modules", None) or [])
        for m in model.modules():
            if type(m).__name__ in layers:
                fully_shard(m, mesh=mesh, mp_policy=policy)
        fully_shard(model, mesh=mesh, mp_policy=policy)
        return model

    def prepare(self, model, optimizer, scheduler):
        self.optimizer = optimizer
        return model, optimizer

    def unwrap(self, model):
        return model

    def accumulating(self, model, last: bool):
        return nullcontext()  # gradients are reduce-scattered after every micro-batch

    def backward(self, model, loss, last: bool) -> None:
        loss.backward()

    def _options(self, **kw):
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        return StateDictOptions(ignore_frozen_params=True, **kw)

    def save(self, root, step, model, optimizer, scheduler, state, keep):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        def write(tmp):
            msd, osd = get_state_dict(model, optimizer, options=self._options())
            dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(tmp / "dcp"))

        return self._save_sharded(root, step, write, state, keep, scheduler)

    def load(self, ckpt, model, optimizer, scheduler):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        self._check_format(ckpt)
        msd, osd = get_state_dict(model, optimizer, options=self._options())
        sd = {"model": msd, "optim": osd}
        dcp.load(sd, checkpoint_id=str(ckpt / "dcp"))
        set_state_dict(model, optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"],
                       options=self._options(strict=False))
        return self._load_common(ckpt, scheduler)

    def final_state(self, model, is_adapter):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                                  ignore_frozen_params=is_adapter))
        # tied weights once (named_parameters lists a shared tensor under its first name), as save_pretrained does
        names = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
        return {k: v for k, v in sd.items() if k in names} if self.is_main else None


class DeepSpeedEngine(ShardedEngine):
    """DeepSpeed ZeRO (stage 1, 2, 3; 3 with CPU offload), its engine driven directly."""

    format = "deepspeed"

    def prepare(self, model, optimizer, scheduler):
        deepspeed = import_deepspeed()

        self.ds_config = deepspeed_config(self.cfg, self.world, self.mixed)
        # ZeRO drops empty parameter groups (ftctl's no-decay group is empty for LoRA): drop them here too,
        # with their entries in the (LambdaLR) schedule, so that the two keep the same groups
        keep = [i for i, g in enumerate(optimizer.param_groups) if g["params"]]
        optimizer.param_groups = [optimizer.param_groups[i] for i in keep]
        for attr in ("base_lrs", "lr_lambdas", "_last_lr"):
            if isinstance(getattr(scheduler, attr, None), list):
                setattr(scheduler, attr, [getattr(scheduler, attr)[i] for i in keep])
        engine, ds_optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                          config=self.ds_config, dist_init_required=False)
        self.optimizer = ds_optimizer
        return engine, ds_optimizer

    def unwrap(self, model):
        return model.module

    def accumulating(self, model, last: bool):
        return nullcontext()

    def backward(self, model, loss, last: bool) -> None:
        model.backward(loss, scale_wrt_gas=False)  # ftctl's loss is already normalised over the whole step
        if not last:
            model.step()  # DeepSpeed counts micro-steps; it updates at the accumulation boundary

    def clip(self, model, params, max_norm):
        return None  # DeepSpeed clips inside its step (gradient_clipping)

    def optimizer_step(self, model, optimizer):
        model.step()
        norm = model.get_global_grad_norm()
        return None if norm is None else float(norm)

    def finish_step(self, model, optimizer, scheduler) -> None:
        pass  # DeepSpeed's step also stepped the schedule and cleared the gradients

    def save(self, root, step, model, optimizer, scheduler, state, keep):
        def write(tmp):
            model.save_checkpoint(str(tmp / "deepspeed"), tag="state", save_latest=False,
                                  exclude_frozen_parameters=True)

        return self._save_sharded(root, step, write, state, keep)

    def load(self, ckpt, model, optimizer, scheduler):
        self._check_format(ckpt)
        path, _ = model.load_checkpoint(str(ckpt / "deepspeed"), tag="state", load_module_strict=False)
        if path is None:
            raise RunDirError(f"checkpoint {ckpt}: DeepSpeed could not load its state")
        return self._load_common(ckpt)

    def final_state(self, model, is_adapter):
        """The trained weights in full precision (DeepSpeed's fp32 master copy, as a one-process run keeps
        them under mixed precision); frozen ones, for a full model, gathered as they are."""
        deepspeed = import_deepspeed()
        from deepspeed.utils import safe_get_full_fp32_param

        module = model.module
        sd = {}
        for n, p in module.named_parameters():
            full = safe_get_full_fp32_param(p) if p.requires_grad else None  # collective under ZeRO-3
            if full is None and (p.requires_grad or not is_adapter):
                with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                    full = p.detach().clone()
            if full is not None:
                sd[n] = full.cpu()
        self.barrier()
        return sd if self.is_main else None


# config.choices.ENGINE says which family each distributed.strategy is; this, which class runs that family
ENGINES = {"single": Engine, "ddp": Engine, "fsdp": FSDPEngine, "deepspeed": DeepSpeedEngine}


def deepspeed_installed() -> bool:
    from importlib.metadata import PackageNotFoundError, version

    try:
        version("deepspeed")
        return True
    except PackageNotFoundError:
        return False


def import_deepspeed():
    """DeepSpeed, also where ftctl's command line kept Accelerate from importing it (sys.modules: None)."""
    import sys

    if "deepspeed" in sys.modules and sys.modules["deepspeed"] is None:
        del sys.modules["deepspeed"]
    import deepspeed

    return deepspeed


def make_engine(cfg, mixed: str, log_with) -> Engine:
    import torch

    if not torch.cuda.is_available():  # DeepSpeed's CPU accelerator (libraries import deepspeed when it is installed)
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    return ENGINES[ENGINE[cfg.distributed.strategy]](cfg, mixed, log_with)

