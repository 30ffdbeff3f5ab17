"""``ftctl plan``: memory and compute of a composed training config, estimated without loading weights.

The model is built from its ``config.json`` on PyTorch's meta device (shapes and dtypes, no storage) and
wrapped with the same adaptation method the run would use, so parameter counts are exact. Bytes per
part of a training step:

    weights       every parameter at its load dtype; bitsandbytes 4-bit linears at 4 bits plus their
                  block scales (64-weight blocks; with double quantization 8-bit scales and a float32
                  scale per 256 blocks), 8-bit linears at 1 byte plus a float32 scale per output row;
                  peft's k-bit preparation (QLoRA) casts the other weights to float32, which counts
    gradients     the trainable parameters, at their dtype
    optimizer     AdamW: 2 states per trainable parameter at its dtype; 8-bit AdamW: 2 bytes (+ block
                  scales); SGD (momentum): 1 state; Adafactor: factored second moment (rows + columns)
    activations   what autograd keeps for the backward pass of one micro-batch, per layer and token, in
                  units of the activation dtype: 8h + 4i + 2kv for a full fine-tune of a Llama-style
                  block (h hidden, i MLP width, kv the key/value width), 6h + 4i + 2kv + r per adapted
                  linear with frozen base weights (LoRA family), and about 10h + i more with adapter
                  dropout (each dropout keeps its output); h per layer with gradient checkpointing, plus
                  one layer recomputed. Measured with torch.autograd.graph.saved_tensors_hooks on
                  Llama blocks of three shapes (tests/test_plan.py checks it on a tiny model).
    logits        the LM head's output, its float32 log-softmax and its gradient: tokens x vocab x
                  (dtype + 8) bytes at the peak of the backward pass; with trainer.logits=targets (SFT,
                  one process, a model the targets-only path covers) one chunk of at most 1,024 target
                  positions at a time: min(tokens, 1024) x vocab x (dtype + 8), an upper bound
    runtime       CPU: the resident memory of a Python process with torch, transformers, peft,
                  accelerate and datasets imported, measured in this process; CUDA: not counted in max_allocated

Per device, for N devices: DDP replicates all of it; ZeRO-1 shards optimizer states, ZeRO-2 also the
gradients, ZeRO-3 and FSDP also the weights (one layer gathered at a time); ZeRO-3 offload keeps weights,
gradients and optimizer states in CPU memory. Compute: about 6 x N FLOPs per token for a full fine-tune,
4 x N with a frozen base (forward, and the backward pass to the inputs only) plus 6 x the trainable
parameters, plus the attention scores (12 x layers x length x hidden per token).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ftctl.config.choices import STRATEGIES  # distributed.strategy
from ftctl.config.compose import compose
from ftctl.core.device import pick_device
from ftctl.core.errors import ConfigError, RunDirError
from ftctl.core.memory import rss_bytes
from ftctl.methods.spec import method_spec
from ftctl.models import load as models
from ftctl.objectives.losses import TARGET_CHUNK, targets_only_model_config
from ftctl.rundir import read_manifest

GiB = 2 ** 30
MiB = 2 ** 20

# config.json of the hub models ftctl's own configs name, for planning where the hub cannot be reached
KNOWN_CONFIGS = {
    "meta-llama/Llama-3.1-8B-Instruct": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
        "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
        "vocab_size": 128256, "max_position_embeddings": 131072, "rms_norm_eps": 1e-05, "rope_theta": 500000.0,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "bos_token_id": 128000, "eos_token_id": 128009,
        "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    },
}
KNOWN_CONFIGS["meta-llama/Llama-3.1-8B"] = KNOWN_CONFIGS["meta-llama/Llama-3.1-8B-Instruct"]



@dataclass
class PlanConfig:
    run: Optional[str] = None  # a run directory: plan its config.yaml and show its measured figures beside
    devices: Optional[int] = None  # devices for the per-device table (default: distributed settings, else 1)
    strategy: Optional[str] = None  # single | ddp | zero1 | zero2 | zero3 | zero3_offload | fsdp (default: the config's)
    seq_len: Optional[int] = None  # tokens per sequence (default data.max_length: the longest batch)
    tokens_per_s: Optional[float] = None  # throughput for the time estimate (default: measured, see docs)
    device: str = "auto"  # cpu | cuda: where the run would train (auto: cuda when available)


# ----------------------------------------------------------------------------- the model on meta
def model_config(cfg):
    """The transformers config of ``model.path``, without weights: a local folder, ftctl's built-in model,
    the local hub cache or the hub, else ftctl's table of known configs."""
    from transformers import AutoConfig

    path = str(cfg.model.path)
    if path.startswith("builtin:") or Path(path).expanduser().is_dir():
        return AutoConfig.from_pretrained(models.resolve(path, cfg.model.revision)), "config.json"
    try:  # the local hub cache first, then ftctl's copy of a known config, then the hub
        return AutoConfig.from_pretrained(path, revision=cfg.model.revision, local_files_only=True), "config.json"
    except Exception:
        pass
    if path in KNOWN_CONFIGS:
        c = dict(KNOWN_CONFIGS[path])
        return AutoConfig.for_model(c.pop("model_type"), **c), "ftctl's copy of its config.json"
    try:
        return AutoConfig.from_pretrained(path, revision=cfg.model.revision), "config.json"
    except Exception as e:
        raise ConfigError(f"model.path={path}: no config.json to plan from ({str(e).splitlines()[0][:120]}); "
                          "pass model.path=<a local model folder>") from e


def meta_model(cfg, mconf, quantized: bool):
    """The model with the run's adaptation method, on the meta device, and the method actually applied."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = _load_dtype(cfg, mconf)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(mconf, dtype=dtype)
        method = cfg.peft.method
        # these initialise from the weights (SVD, quantization error); their shapes are LoRA's
        applied = method_spec(method).shapes_as or method
        from omegaconf import OmegaConf

        peft_cfg = OmegaConf.merge(cfg.peft, {"method": applied, "prompt_init": "random"})
        fn = method_spec(applied).wrap
        model = fn(model, peft_cfg, quantized=False, gradient_checkpointing=False, steps=max(1, cfg.trainer.max_steps),
                   model_path=None)
    return model, applied


def kbit_upcast(model) -> None:
    """What peft's prepare_model_for_kbit_training does to a quantized model: every weight bitsandbytes left
    in 16 bits (embeddings, head, norms) goes to float32."""
    import torch

    for name, p in model.named_parameters():
        if p.dtype in (torch.float16, torch.bfloat16) and not _is_quantized_linear(model, name):
            p.data = torch.empty_like(p, dtype=torch.float32, device="meta")


def _load_dtype(cfg, mconf):
    import torch

    if cfg.model.dtype == "auto":  # as models.torch_dtype decides on the machine that trains
        return torch.bfloat16 if _device_type(cfg) == "cuda" else torch.float32
    return getattr(torch, cfg.model.dtype)


_DEVICE = {"type": None}


def _device_type(cfg) -> str:
    if _DEVICE["type"]:
        return _DEVICE["type"]

    return pick_device().type


def _linear_names(model) -> set:
    """Names of the nn.Linear modules bitsandbytes would quantize: all but the output head."""
    import torch

    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = set()
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and mod is not out_emb and "lora_" not in name \
                and not name.endswith(("lm_head", "score")) and "modules_to_save" not in name:
            names.add(name)
    return names


_QLIN: dict = {}


def _is_quantized_linear(model, param_name: str) -> bool:
    key = id(model)
    if key not in _QLIN:
        _QLIN[key] = _linear_names(model)
    mod = param_name.rsplit(".", 1)[0].replace(".base_layer", "")
    return param_name.endswith("weight") and (mod in _QLIN[key] or param_name.rsplit(".", 1)[0] in _QLIN[key])


def weight_bytes(model, quant: str, double_quant: bool) -> dict:
    """Bytes of every weight as it sits in memory: {"quantized": .., "other": .., "total": ..}."""
    q = other = 0
    for name, p in model.named_parameters():
        n = p.numel()
        if quant != "none" and _is_quantized_linear(model, name):
            if quant in ("nf4", "fp4"):
                # one absmax per 64 weights: float32, or (double quantization) 8-bit with a float32 per 256
                scales = n / 64 + n / 64 / 256 * 4 if double_quant else n / 64 * 4
                q += n / 2 + scales
            elif quant == "int8":
                q += n + p.shape[0] * 4
        else:
            other += n * p.element_size()
    return {"quantized": int(q), "other": int(other), "total": int(q + other)}


def optimizer_bytes(name: str, trainable: list) -> int:
    total = 0
    for p in trainable:
        n, e = p.numel(), p.element_size()
        if name in ("adamw", "paged_adamw_32bit"):
            total += 2 * n * 4 if name == "paged_adamw_32bit" else 2 * n * e
        elif name in ("adamw_8bit", "paged_adamw_8bit"):
            total += 2 * n * 4 if n < 4096 else 2 * n + 2 * math.ceil(n / 256) * 4  # small tensors stay 32-bit
        elif name == "sgd":
            total += n * e
        elif name == "adafactor":
            total += (sum(p.shape[-2:]) if p.ndim >= 2 else n) * 4
    return int(total)


# ----------------------------------------------------------------------------- activations
def _dims(mconf) -> dict:
    h = mconf.hidden_size
    heads = mconf.num_attention_heads
    kv_heads = getattr(mconf, "num_key_value_heads", None) or heads
    head_dim = getattr(mconf, "head_dim", None) or h // heads
    return {"h": h, "i": getattr(mconf, "intermediate_size", 4 * h), "kv": kv_heads * head_dim,
            "layers": mconf.num_hidden_layers, "vocab": mconf.vocab_size}


def _adapted_linears_per_layer(model) -> tuple[int, float]:
    """(number of adapted linears per layer, their mean rank), for the LoRA family."""
    ranks = []
    for name, mod in model.named_modules():
        if name.endswith("lora_A.default") and hasattr(mod, "out_features"):
            ranks.append(mod.out_features)
    layers = max(1, getattr(getattr(model, "config", None), "num_hidden_layers", 1))
    return (len(ranks) / layers, (sum(ranks) / len(ranks)) if ranks else 0.0)


def targets_only_logits(cfg, mconf, method: str, strategy: str) -> bool:
    """Whether the run computes logits at the target positions only (train/objectives.py)."""

    return (str(cfg.trainer.get("logits", "all")) == "targets" and cfg.objective == "sft" and strategy == "single"
            and method_spec(method).targets_only and targets_only_model_config(mconf))


def activation_bytes(cfg, mconf, model, method: str, tokens: int, seq_len: int, act_bytes: int,
                     targets_only: bool = False) -> dict:
    """Autograd's saved tensors for one micro-batch of ``tokens`` tokens, and the logits' peak."""
    d = _dims(mconf)
    h, i, kv, L = d["h"], d["i"], d["kv"], d["layers"]
    n_adapted, rank = _adapted_linears_per_layer(model)
    # with weights frozen (every method but full and freeze), a PEFT method's adapted activations
    frozen = not method_spec(method).trains_base_weights
    if not frozen:
        per_layer = 8 * h + 4 * i + 2 * kv
    else:
        per_layer = 6 * h + 4 * i + 2 * kv + n_adapted * rank
        if cfg.peft.dropout > 0 and n_adapted:
            per_layer += (10 * h + i) * min(1.0, n_adapted / 7)
    if method == "freeze":  # only the last trainable_layers keep a full block's activations
        k = min(L, max(0, cfg.peft.trainable_layers))
        layers = k * (8 * h + 4 * i + 2 * kv)
    elif cfg.trainer.gradient_checkpointing:
        layers = L * h + per_layer  # each layer's input, and one layer recomputed during the backward pass
    else:
        layers = L * per_layer

    logit_rows = min(tokens, TARGET_CHUNK) if targets_only else tokens
    return {"layers": int(layers * tokens * act_bytes),
            "logits": int(logit_rows * d["vocab"] * (act_bytes + 8))}


def runtime_bytes() -> int:
    """Resident memory of this process once what a training run imports is imported (torch, transformers,
    peft, accelerate, datasets with pyarrow)."""
    import accelerate  # noqa: F401
    import datasets  # noqa: F401
    import peft  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401

    return rss_bytes() or 0


# ----------------------------------------------------------------------------- the plan
def per_device(parts: dict, strategy: str, n: int) -> dict:
    """Bytes on each of ``n`` devices for a distributed strategy. parts: weights, gradients, optimizer,
    activations, logits, layer (one layer's weights, gathered under ZeRO-3/FSDP), runtime."""
    w, g, o = parts["weights"], parts["gradients"], parts["optimizer"]
    out = dict(parts)
    if strategy in ("zero1",):
        out["optimizer"] = o / n
    elif strategy == "zero2":
        out.update(gradients=g / n, optimizer=o / n)
    elif strategy in ("zero3", "fsdp"):
        out.update(weights=w / n + parts["layer"], gradients=g / n, optimizer=o / n)
    elif strategy == "zero3_offload":
        out.update(weights=parts["layer"], gradients=0, optimizer=0)
        out["cpu_offload"] = w + g + o
    out.pop("layer", None)
    return {k: int(v) for k, v in out.items()}


def estimate(cfg, pcfg: PlanConfig) -> dict:
    if pcfg.device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"device={pcfg.device}: must be auto, cpu or cuda")
    _DEVICE["type"] = None if pcfg.device == "auto" else pcfg.device
    device_type = _device_type(cfg)
    strategy = pcfg.strategy or str(cfg.distributed.strategy)
    if strategy not in STRATEGIES:
        raise ConfigError(f"strategy={strategy}: must be one of {', '.join(STRATEGIES)}")
    n = pcfg.devices or _devices_from(cfg)
    if n < 1:
        raise ConfigError(f"devices={n}: must be >= 1")
    if cfg.get("task", "generate") == "classify" or cfg.model.get("kind", "causal") != "causal":
        raise ConfigError("ftctl plan estimates decoder (causal LM) training; task=classify and model.kind="
                          f"{cfg.model.get('kind', 'causal')} are not covered yet")
    mconf, source = model_config(cfg)
    quant = str(cfg.quant.method)
    model, applied = meta_model(cfg, mconf, quantized=quant != "none")
    loaded = weight_bytes(model, quant, bool(cfg.quant.double_quant))  # as bitsandbytes loads it
    if quant != "none":
        kbit_upcast(model)
    params = list(model.parameters())
    trainable = [p for p in params if p.requires_grad]
    n_total = sum(p.numel() for p in params)
    n_train = sum(p.numel() for p in trainable)
    wb = weight_bytes(model, quant, bool(cfg.quant.double_quant))
    seq = pcfg.seq_len or int(cfg.data.max_length)
    micro = max(1, math.ceil(cfg.trainer.batch_size / n)) if strategy != "single" else cfg.trainer.batch_size
    pair = 2 if cfg.objective in ("dpo", "reward") else 1  # chosen and rejected in one forward pass
    tokens = micro * seq * pair
    mixed = {"bf16": 2, "fp16": 2}.get(str(cfg.precision.name))
    if mixed is None:
        mixed = 2 if (device_type == "cuda" and str(cfg.precision.name) == "auto") else \
            (params[0].element_size() if params else 4)
    act = activation_bytes(cfg, mconf, model, applied, tokens, seq, mixed,
                           targets_only=targets_only_logits(cfg, mconf, applied, strategy))
    d = _dims(mconf)
    layer_w = wb["total"] / max(1, d["layers"]) if d["layers"] else 0
    parts = {"weights": wb["total"], "gradients": sum(p.numel() * p.element_size() for p in trainable),
             "optimizer": optimizer_bytes(str(cfg.trainer.optimizer), trainable),
             "activations": act["layers"], "logits": act["logits"], "layer": layer_w,
             "runtime": runtime_bytes() if device_type == "cpu" else 0}
    dev = per_device(parts, strategy, n)
    peak = sum(v for k, v in dev.items() if k != "cpu_offload")
    # FLOPs per token: forward 2N, backward 4N (full) or 2N (inputs only, frozen base), adapters 6x theirs
    n_dense = n_total - (d["vocab"] * d["h"] if not getattr(mconf, "tie_word_embeddings", False) else 0)
    frozen = not method_spec(applied).trains_base_weights
    flops_tok = (4 * n_dense + 6 * n_train) if frozen else 6 * n_dense
    flops_tok += 12 * d["layers"] * seq * d["h"]
    steps = int(cfg.trainer.max_steps) if cfg.trainer.max_steps > 0 else None
    step_tokens = cfg.trainer.batch_size * cfg.trainer.grad_accum * seq * pair
    return {"model": str(cfg.model.path), "config_source": source, "method": cfg.peft.method, "quant": quant,
            "optimizer": str(cfg.trainer.optimizer), "strategy": strategy, "devices": n, "device": device_type,
            "total_params": n_total, "trainable_params": n_train, "weights_quantized_bytes": wb["quantized"],
            "weights_loaded_bytes": loaded["total"],
            "weights_other_bytes": wb["other"], "parts": dev, "peak_bytes": int(peak),
            "seq_len": seq, "micro_batch": micro, "tokens_per_micro_batch": tokens,
            "gradient_checkpointing": bool(cfg.trainer.gradient_checkpointing), "act_dtype_bytes": mixed,
            "flops_per_token": int(flops_tok), "tokens_per_step": step_tokens, "steps": steps}


def _devices_from(cfg) -> int:
    launcher = cfg.get("launcher") if hasattr(cfg, "get") else None
    if launcher is not None:
        try:
            return int(launcher.get("nproc_per_node", 1) or 1) * int(launcher.get("nnodes", 1) or 1)
        except (TypeError, ValueError):
            return 1
    return 1


def matmul_flops(dtype: str = "float32", n: int = 2048, seconds: float = 1.0) -> float:
    """This machine's measured dense matrix-multiply rate (FLOP/s) on the CPU."""
    import time

    import torch

    a = torch.randn(n, n, dtype=getattr(torch, dtype))
    b = torch.randn(n, n, dtype=getattr(torch, dtype))
    a @ b
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        reps += 1
    return 2 * n ** 3 * reps / (time.perf_counter() - t0)


# ----------------------------------------------------------------------------- the command
def _gib(b) -> str:
    return "-" if b is None else (f"{b / GiB:.2f} GiB" if b >= GiB else f"{b / MiB:.1f} MiB")


def plan(pcfg: PlanConfig, overrides: list[str], console) -> dict:
    from omegaconf import OmegaConf

    man = None
    if pcfg.run:
        run = Path(pcfg.run).expanduser()
        man = read_manifest(run)
        if man is None or not (run / "config.yaml").is_file():
            raise RunDirError(f"run={run}: not a run directory (no manifest.json and config.yaml)")
        if overrides:
            raise ConfigError(f"plan run={run}: plans the run's own config; drop {' '.join(overrides)}")
        cfg = OmegaConf.load(run / "config.yaml")
        if pcfg.device == "auto":
            pcfg.device = "cuda" if str(man.get("device", "cpu")).startswith("cuda") else "cpu"
    else:
        cfg, _ = compose("train", overrides)
    est = estimate(cfg, pcfg)
    tps, tps_from = pcfg.tokens_per_s, "given"
    if tps is None and man and man.get("train_tokens_per_s"):
        tps, tps_from = float(man["train_tokens_per_s"]), "measured in the run"
    if tps is None and est["device"] == "cpu":
        rate = matmul_flops()
        tps, tps_from = rate * 0.5 / est["flops_per_token"], \
            f"50% of this CPU's measured float32 matmul rate ({rate / 1e9:.0f} GFLOP/s)"
    est["tokens_per_s"], est["tokens_per_s_from"] = tps, tps_from
    if man:
        est["measured_peak_bytes"] = man.get("peak_memory_bytes")
        est["measured_peak_kind"] = man.get("peak_memory_kind")
    _print(est, console)
    return est


def _print(est: dict, console) -> None:
    from rich.table import Table

    console.print(f"[bold]ftctl plan[/] {est['model']} ({est['config_source']}): method={est['method']} "
                  f"quant={est['quant']} optimizer={est['optimizer']} strategy={est['strategy']} "
                  f"devices={est['devices']} device={est['device']}", highlight=False)
    console.print(f"parameters: {est['total_params']:,} total, {est['trainable_params']:,} trainable "
                  f"({100 * est['trainable_params'] / max(est['total_params'], 1):.4g}%)", highlight=False)
    t = Table(show_header=True, header_style="bold", title="memory per device (estimate)")
    t.add_column("part")
    t.add_column("bytes", justify="right")
    t.add_column("what")
    p = est["parts"]
    wq, wo = est["weights_quantized_bytes"], est["weights_other_bytes"]
    notes = {
        "weights": (f"{_gib(wq)} quantized linears + {_gib(wo)} other (as loaded: {_gib(est['weights_loaded_bytes'])}; "
                    "peft's k-bit preparation casts the other weights to float32)") if wq
        else "every parameter at its dtype",
        "gradients": "trainable parameters", "optimizer": est["optimizer"],
        "activations": f"micro-batch {est['micro_batch']} x {est['seq_len']} tokens"
                       + (", gradient checkpointing" if est["gradient_checkpointing"] else ""),
        "logits": "LM head output, log-softmax, gradient", "runtime": "Python + torch + libraries (CPU resident set)",
        "cpu_offload": "in CPU memory, not on the device",
    }
    for k in ("weights", "gradients", "optimizer", "activations", "logits", "runtime", "cpu_offload"):
        if k in p and (p[k] or k not in ("runtime", "cpu_offload")):
            t.add_row(k, _gib(p[k]), notes[k])
    t.add_row("[bold]peak[/]", f"[bold]{_gib(est['peak_bytes'])}[/]", "")
    if est.get("measured_peak_bytes"):
        m = est["measured_peak_bytes"]
        t.add_row("measured", _gib(m), f"{est['measured_peak_kind']}; estimate / measured = "
                                       f"{est['peak_bytes'] / m:.2f}")
    console.print(t)
    line = f"compute: {est['flops_per_token'] / 1e9:.3g} GFLOP per token, {est['tokens_per_step']:,} tokens per step"
    if est.get("tokens_per_s"):
        line += f"; at {est['tokens_per_s']:.4g} tokens/s ({est['tokens_per_s_from']}) a step takes " \
                f"{est['tokens_per_step'] / est['tokens_per_s']:.3g} s"
        if est["steps"]:
            line += f", {est['steps']} steps {_duration(est['steps'] * est['tokens_per_step'] / est['tokens_per_s'])}"
    console.print(line, highlight=False)


def _duration(s: float) -> str:
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"
