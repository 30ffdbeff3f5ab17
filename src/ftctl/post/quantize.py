"""`ftctl quantize`: write a smaller copy of a model folder and report what it cost.

Methods: ``nf4`` and ``int8`` (bitsandbytes; the folder reloads with ``from_pretrained``),
``int8_weight_only`` and ``int4_weight_only`` (torchao), and ``bitdelta`` (Liu et al., 2024: keep the
base model; store the fine-tune's difference of every linear layer in the transformer blocks as one
sign bit per weight and one scale per matrix, the scale initialised as the mean absolute difference
and optionally refined by distillation on a few calibration batches). The report: size on disk
before and after, the compression factor, and perplexity on held-out rows before and after.
"""
from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from ftctl.config.compose import compose
from ftctl.core import lock
from ftctl.core.atomic import atomic_write_json, replace_folder
from ftctl.core.device import pick_device
from ftctl.core.errors import ConfigError
from ftctl.core.registry import Registry
from ftctl.data import pipeline
from ftctl.data.tokenize import collate
from ftctl.evaluate.generate import generate
from ftctl.evaluate.run import perplexity
from ftctl.models import load as models
from ftctl.models.bitdelta import BITDELTA_FILE
from ftctl.rundir import bare_config, check_output_folder, load_folder, run_containing

QUANTIZERS = Registry("quantize method", "ftctl.post.quantize")
QUANTIZE_FILE = "ftctl-quantize.json"  # what ftctl quantize writes into its output folder (its proof of authorship)


@dataclass
class QuantizeConfig:
    model: Optional[str] = None  # the model folder to quantize (e.g. <run>/merged, or <run>/model)
    method: Optional[str] = None
    output: Optional[str] = None  # default: <model>-<method>
    base: Optional[str] = None  # bitdelta: the base model the fine-tune started from
    group_size: int = 64  # int4_weight_only: weights per scale
    calibration_steps: int = 0  # bitdelta: steps of scale distillation on training rows (0: mean |delta| only)
    calibration_lr: float = 1e-4
    eval_rows: int = 64  # held-out rows for the perplexity before and after
    overwrite: bool = False


def weight_bytes(folder: Path) -> int:
    """Bytes of a model folder's weight files (the tokenizer and configs are not counted)."""
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file() and f.suffix in (".safetensors", ".bin"))


# ----------------------------------------------------------------------------- methods
def _bnb(kind: str):
    def run(src: Path, dst: Path, qcfg, console):
        import torch
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        device = pick_device()
        qc = (BitsAndBytesConfig(load_in_8bit=True) if kind == "int8" else
              BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                 bnb_4bit_compute_dtype=torch.bfloat16 if device.type == "cuda" else torch.float32))
        model = AutoModelForCausalLM.from_pretrained(src, quantization_config=qc, device_map={"": device},
                                                     use_safetensors=True)
        model.save_pretrained(dst, safe_serialization=True)
    return run


QUANTIZERS.register("nf4")(_bnb("nf4"))
QUANTIZERS.register("int8")(_bnb("int8"))


def _torchao(kind: str):
    def run(src: Path, dst: Path, qcfg, console):
        import torch
        from transformers import AutoModelForCausalLM, TorchAoConfig

        try:
            from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig
        except ImportError as e:
            raise ConfigError(f"method={kind} needs torchao: pip install torchao ({e})") from None
        conf = Int8WeightOnlyConfig() if kind == "int8" else Int4WeightOnlyConfig(group_size=qcfg.group_size)
        device = pick_device()
        dtype = torch.bfloat16 if kind == "int4" else None
        try:  # a probe on one small layer first: a missing kernel is reported before the model loads
            from torchao.quantization import quantize_

            quantize_(torch.nn.Sequential(torch.nn.Linear(256, 256, dtype=dtype or torch.float32, device=device)), conf)
            model = AutoModelForCausalLM.from_pretrained(src, quantization_config=TorchAoConfig(conf),
                                                         device_map={"": device}, use_safetensors=True,
                                                         **({"dtype": dtype} if dtype else {}))
        except (ImportError, NotImplementedError, AssertionError, RuntimeError, ValueError) as e:
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            raise ConfigError(f"method={kind}_weight_only: torchao cannot quantize on {device} here ({first}); "
                             "int4 weight-only kernels need a CUDA GPU: use int8_weight_only or nf4 on a CPU") from None
        model.save_pretrained(dst, safe_serialization=True)
    return run


QUANTIZERS.register("int8_weight_only")(_torchao("int8"))
QUANTIZERS.register("int4_weight_only")(_torchao("int4"))


# ----------------------------------------------------------------------------- bitdelta
def _delta_linears(model) -> list[str]:
    """The linear layers BitDelta compresses: every nn.Linear inside the decoder blocks (not the
    embeddings or the output head)."""
    import torch

    layers = getattr(getattr(model, "model", model), "layers", None)
    if layers is None:
        raise ConfigError("method=bitdelta supports decoder models with model.layers (Llama, Mistral, Qwen, ...)")
    prefix = "model.layers."
    return [f"{prefix}{name}" for name, m in layers.named_modules() if isinstance(m, torch.nn.Linear)]


@QUANTIZERS.register("bitdelta")
def bitdelta(src: Path, dst: Path, qcfg, console, calibration=None):
    import numpy as np
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    if not qcfg.base:
        raise ConfigError("method=bitdelta needs base=<the base model folder the fine-tune started from>")

    base_path = Path(models.resolve(qcfg.base, None)).resolve()  # a folder, builtin:<name> or a hub id
    if not (base_path / "config.json").is_file():
        raise ConfigError(f"base={base_path}: not a model folder (no config.json)")
    ft = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32, use_safetensors=True)
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32, use_safetensors=True)
    fsd, bsd = ft.state_dict(), base.state_dict()
    if fsd.keys() != bsd.keys() or any(fsd[k].shape != bsd[k].shape for k in fsd):
        raise ConfigError(f"base={base_path} does not have the fine-tuned model's parameter names and shapes")
    linears = _delta_linears(ft)
    signs, scales = {}, {}
    for name in linears:
        delta = fsd[f"{name}.weight"] - bsd[f"{name}.weight"]
        signs[name] = delta >= 0
        scales[name] = delta.abs().mean()
    if qcfg.calibration_steps > 0 and calibration:
        scales = _distil_scales(ft, base, signs, scales, calibration, qcfg, console)
    tensors, full = {}, []
    for name in linears:
        bits = np.packbits(signs[name].flatten().numpy())
        tensors[f"{name}.sign"] = torch.from_numpy(bits)
        tensors[f"{name}.scale"] = scales[name].reshape(1).float()
    covered = {f"{n}.weight" for n in linears}
    for k, v in fsd.items():  # anything else the fine-tune changed (biases, norms, embeddings) is kept whole
        if k not in covered and not torch.equal(v, bsd[k]):
            tensors[f"{k}.full"] = v.contiguous()
            full.append(k)
    dst.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(dst / "bitdelta.safetensors"))
    ft.config.save_pretrained(dst)
    shapes = {n: list(fsd[f"{n}.weight"].shape) for n in linears}
    atomic_write_json(dst / BITDELTA_FILE, {"format": "ftctl-bitdelta-1", "base": str(base_path), "linears": shapes,
                                            "full": full, "calibration_steps": qcfg.calibration_steps})


def _distil_scales(ft, base, signs, scales, batches, qcfg, console):
    """Refine the per-matrix scales so the compressed model's logits match the fine-tune's (BitDelta's
    scale distillation): only the scales train; the signs and the base stay fixed."""
    import torch
    from torch.func import functional_call

    params = {n: torch.nn.Parameter(s.clone()) for n, s in scales.items()}
    opt = torch.optim.AdamW(params.values(), lr=qcfg.calibration_lr, weight_decay=0.0)
    bsd = {k: v.detach() for k, v in base.state_dict().items()}
    ft.eval()
    base.eval()
    with console.status("distilling BitDelta scales") as status:
        for step in range(qcfg.calibration_steps):
            batch = batches[step % len(batches)]
            with torch.no_grad():
                target = ft(**batch).logits
            weights = {}  # only the compressed linears; every other parameter is the base module's own
            for n, s in params.items():
                weights[f"{n}.weight"] = bsd[f"{n}.weight"] + s * (signs[n].float() * 2 - 1)
            logits = functional_call(base, weights, args=(), kwargs=batch).logits
            mask = batch["attention_mask"].unsqueeze(-1).bool()
            loss = ((logits - target) ** 2).masked_select(mask).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            status.update(f"distilling BitDelta scales: step {step + 1}/{qcfg.calibration_steps}, logit MSE {float(loss.detach()):.4g}")
    return {n: p.detach() for n, p in params.items()}


# ----------------------------------------------------------------------------- command
def _load_any(folder: Path):
    """A model folder as ftctl quantize measures it: in float32, unless the folder says how it loads
    (quantized, or bitdelta)."""
    cfg = bare_config("float32")
    return load_folder(folder, pick_device(), cfg.model, cfg.quant)


def _check(qcfg: QuantizeConfig) -> tuple[Path, Path]:
    """(source folder, output folder); ConfigError or RunDirError for settings that cannot work."""
    if not qcfg.model:
        raise ConfigError("ftctl quantize needs model=<model folder> (e.g. a run's merged/ folder from ftctl merge)")
    if not qcfg.method:
        raise ConfigError(f"ftctl quantize needs method=; choose one of: {', '.join(QUANTIZERS.names())}")
    QUANTIZERS.get(qcfg.method)
    src = Path(qcfg.model).expanduser().resolve()
    if not (src / "config.json").is_file():
        raise ConfigError(f"model={src}: not a model folder (no config.json)")
    if qcfg.method == "int4_weight_only" and pick_device().type != "cuda":  # said before any model loads
        raise ConfigError("method=int4_weight_only needs a CUDA GPU (torchao's int4 weight-only kernels); on "
                          f"{pick_device().type} use method=int8_weight_only or method=nf4")
    if qcfg.method == "bitdelta" and not qcfg.base:
        raise ConfigError("method=bitdelta needs base=<the base model folder the fine-tune started from>")
    if qcfg.eval_rows <= 0 or qcfg.group_size <= 0 or qcfg.calibration_steps < 0:
        raise ConfigError("eval_rows and group_size must be > 0, calibration_steps >= 0")
    out = Path(qcfg.output).expanduser() if qcfg.output else src.with_name(f"{src.name}-{qcfg.method}")
    sources = [src] + [Path(p) for p in [qcfg.base] if p] + [r for r in [run_containing(src)] if r]
    return src, check_output_folder(out, sources, QUANTIZE_FILE, qcfg.overwrite)


@dataclass
class HeldOut:
    """The config's data for the quality check: held-out rows for perplexity, a prompt for a sample, and
    training rows for BitDelta's calibration."""
    cfg: Any
    tokenizer: Any
    rows: list[dict]
    prompt: list[str]
    calibration: Optional[list[dict]]  # bitdelta with calibration_steps: a few training batches (inputs only)


def _held_out(qcfg: QuantizeConfig, src: Path, overrides: list[str]) -> HeldOut:

    # held-out rows for the quality check: the config's data (a recipe=/data= override picks it)
    cfg, _ = compose("train", list(overrides) + [f"model.path={src}", "quant=none"])
    tokenizer = models.load_tokenizer(src)
    bundle = pipeline.build(cfg, tokenizer)
    held = (bundle.validation.examples or bundle.train.examples)[:qcfg.eval_rows]
    prompt = (bundle.validation.prompts or bundle.train.prompts)[:1]
    calibration = None
    if qcfg.method == "bitdelta" and qcfg.calibration_steps:
        train = bundle.train.unpacked if bundle.train.unpacked is not None else bundle.train.examples
        calibration = [{k: v for k, v in collate(train[i:i + 4], tokenizer.pad_token_id).items() if k != "labels"}
                       for i in range(0, min(len(train), 4 * 8), 4)]
    return HeldOut(cfg, tokenizer, held, prompt, calibration)


def _quantize_into(folder: Path, src: Path, qcfg: QuantizeConfig, held: HeldOut, console) -> dict:
    """Quantize ``src`` into ``folder`` with its tokenizer, reload it, and measure it: perplexity on the
    held-out rows and a sample generation."""

    fn = QUANTIZERS.get(qcfg.method)
    with console.status(f"quantizing with {qcfg.method}"):
        if qcfg.method == "bitdelta":
            fn(src, folder, qcfg, console, calibration=held.calibration)
        else:
            fn(src, folder, qcfg, console)
        held.tokenizer.save_pretrained(folder)
    with console.status("reloading the quantized model"):
        model = _load_any(folder)
        ppl = perplexity(model, held.rows, held.tokenizer.pad_token_id, 8)[0]
        sample = generate(model, held.tokenizer, held.prompt, max_new_tokens=24)[0] if held.prompt else ""
    return {"perplexity_after": ppl, "sample": sample, "bytes_after": weight_bytes(folder)}


def _print_table(console, src: Path, out: Path, qcfg: QuantizeConfig, report: dict) -> None:
    from rich.table import Table

    before, after = report["bytes_before"], report["bytes_after"]
    table = Table(title=f"{src.name} → {out.name} ({qcfg.method})")
    table.add_column("")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    table.add_row("weights on disk", f"{before / 2**20:,.1f} MiB", f"{after / 2**20:,.1f} MiB")
    table.add_row("compression", "", f"{before / max(after, 1):.2f}×")
    table.add_row(f"perplexity ({report['eval_rows']} held-out rows)", f"{report['ppl_before']:.3f}",
                  f"{report['ppl_after']:.3f}")
    console.print(table)
    console.print(f"sample: {report['sample_output'][:200]!r}", highlight=False, markup=False)
    console.print(f"[green]wrote[/] {out}", highlight=False)


def _run_lock(out: Path):
    """The lock of the run directory ``out`` is written into (one writer per run), or nothing outside a run."""
    run_dir = run_containing(Path(out).parent)
    return lock.hold(run_dir, "ftctl quantize") if run_dir else contextlib.nullcontext()


def quantize(qcfg: QuantizeConfig, overrides: list[str], console) -> Path:
    """Write a quantized copy of a model folder, with ftctl-quantize.json: sizes and perplexity before and after."""

    src, out = _check(qcfg)
    run_dir = run_containing(Path(out).parent)
    if run_dir:  # refused at once, before the slow part, while another process writes that run
        lock.check_free(run_dir)
    held = _held_out(qcfg, src, overrides)
    t0 = time.time()
    with console.status(f"perplexity of {src.name} on {len(held.rows)} held-out rows"):
        ppl_before = perplexity(_load_any(src), held.rows, held.tokenizer.pad_token_id, 8)[0]
    shown = {}

    def build(folder: Path) -> None:
        got = _quantize_into(folder, src, qcfg, held, console)
        before, after = weight_bytes(src), got["bytes_after"]
        report = {"model": str(src), "method": qcfg.method, "output": str(out), "bytes_before": before,
                  "bytes_after": after, "compression": round(before / max(after, 1), 2),
                  "perplexity_before": round(ppl_before, 4), "perplexity_after": round(got["perplexity_after"], 4),
                  "eval_rows": len(held.rows), "data": held.cfg.data.path, "seconds": round(time.time() - t0, 1),
                  "sample_prompt": held.prompt[0] if held.prompt else "", "sample_output": got["sample"]}
        if qcfg.method == "bitdelta":
            report["base"] = json.loads((folder / BITDELTA_FILE).read_text())["base"]
            report["calibration_steps"] = qcfg.calibration_steps
        atomic_write_json(folder / QUANTIZE_FILE, report)
        shown.update(report, ppl_before=ppl_before, ppl_after=got["perplexity_after"])

    with _run_lock(out):
        replace_folder(out, build)
    _print_table(console, src, out, qcfg, shown)
    return out
