"""The adaptation methods: ``peft.method`` -> a function that makes a model trainable, with its traits.

Each function carries ``@method(name, **traits)``, which makes its MethodSpec (ftctl.methods.spec): the traits
the rest of ftctl reads (saves an adapter? merges? which quantized bases? virtual tokens? a per-step hook?).
Each function takes (model, peft_cfg, quantized, gradient_checkpointing, steps=, model_path=) and returns
the model to train, with exactly the parameters to update set to ``requires_grad``. Everything peft
implements goes through peft (LoRA and its variants, the LyCORIS and orthogonal families, IA3, VeRA,
AdaLoRA, LN tuning, the soft prompts); ``bitfit``, ``freeze`` and ``full`` choose parameters of the
plain model and save a whole model folder.
"""
from __future__ import annotations

import atexit
import re
import shutil
import tempfile

from omegaconf import OmegaConf

from ftctl.core.errors import ConfigError
from ftctl.methods.spec import FLOAT_BASE, FOUR_BIT_BASE, method

# the traits every LoRA-shaped method shares: a LORA adapter that folds into the base weights
LORA = {"peft_type": "LORA", "merges": True}
# PiSSA and OLoRA: the residual base W - B·A is written at initialisation; the saved adapter is converted to plain
# LoRA against the original base (peft's path_initial_model_for_weight_conversion); plan them as LoRA
MUTATING_INIT = {**LORA, "mutates_base_init": True, "shapes_as": "lora", "base_quant": FLOAT_BASE,
                 "quant_reason": "rewrites the base weights at initialisation (W - B·A), which needs them unquantized: "
                                 "use quant=none, or peft.method=loftq for a 4-bit base"}
# peft's LoHa and LoKr layers read the base weight's shape, which bitsandbytes packs in 4-bit layers
NOT_FOUR_BIT = {"base_quant": ("none", "int8"),
                "quant_reason": "does not work over a 4-bit base (peft's LyCORIS layers cannot wrap bitsandbytes 4-bit "
                                "weights): use quant=int8 or quant=none, or peft.method=lora"}
# soft prompts: trained virtual tokens before the input (peft's prompt learning); nothing to merge
PROMPT = {"virtual_tokens": True}


def _list(value):
    if value is None:
        return None
    if OmegaConf.is_config(value):
        return OmegaConf.to_container(value)
    return value if isinstance(value, str) else list(value)


def _target_modules(peft_cfg):
    """all-linear, a list of module names, a regular expression over full module names (per-layer
    patterns, e.g. '.*layers\\.(10|11)\\..*(q_proj|v_proj)'), or null (the method's default)."""
    return _list(peft_cfg.target_modules)


def prepare(model, quantized: bool, gradient_checkpointing: bool):
    """k-bit training preparation (norms in float32, input grads) or gradient checkpointing, before an adapter."""
    if quantized:
        from peft import prepare_model_for_kbit_training

        # casts norms and other non-quantized weights to float32, enables input grads for checkpointing
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    elif gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    return model


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__


def _wrap(model, config, peft_cfg, quantized, gradient_checkpointing):
    from peft import get_peft_model

    model = prepare(model, quantized, gradient_checkpointing)
    try:
        wrapped = get_peft_model(model, config)
    except (ValueError, TypeError, KeyError, RuntimeError, AttributeError) as e:
        tm = f" peft.target_modules={_target_modules(peft_cfg)}:" if peft_cfg.target_modules is not None else ""
        raise ConfigError(f"peft.method={peft_cfg.method}:{tm} {_first_line(e)}") from e
    check_rank(wrapped, config)
    return wrapped


# the peft types whose `r` (AdaLoRA: init_r) is peft.r, a rank of a low-rank factor of each target weight
# (not VeRA: its r is the width of random projections shared by all layers, often above the hidden size)
_RANKED = {"LORA": "r", "ADALORA": "init_r", "LOHA": "r", "LOKR": "r"}


def check_rank(model, config) -> None:
    """peft.r no larger than the smaller dimension of any weight the adapter wraps (a larger rank adds
    parameters that cannot add anything): a ConfigError naming the module and its shape, before any step."""
    field = _RANKED.get(str(getattr(config.peft_type, "value", config.peft_type)))
    r = getattr(config, field, None) if field else None
    if not r:
        return
    shapes = []
    for name, module in model.named_modules():
        base = module.get_base_layer() if hasattr(module, "get_base_layer") and hasattr(module, "r") else None
        if base is not None and base is not module and hasattr(base, "in_features"):
            shapes.append((name.removeprefix("base_model.model."), base.out_features, base.in_features))
    if not shapes:
        return
    name, out_f, in_f = min(shapes, key=lambda s: min(s[1], s[2]))
    if r > min(out_f, in_f):
        raise ConfigError(f"peft.r={r} is larger than {name}'s smaller dimension ({min(out_f, in_f)}; its weight "
                          f"is {out_f}x{in_f}); choose peft.r <= {min(out_f, in_f)}")


def _peft_config(cls, peft_cfg, extra, **kwargs):
    try:
        return cls(**{"task_type": "CAUSAL_LM", **kwargs, **extra})
    except (ValueError, TypeError) as e:
        raise ConfigError(f"peft.method={peft_cfg.method}: {_first_line(e)}") from e


def _common(peft_cfg) -> dict:
    """Keys every injected-adapter method takes: targets, extra trained modules, layers."""
    return {"target_modules": _target_modules(peft_cfg), "modules_to_save": _list(peft_cfg.modules_to_save),
            "layers_to_transform": _list(peft_cfg.layers_to_transform)}


def _lora(model, peft_cfg, quantized, gradient_checkpointing, extra, **kwargs):
    from peft import LoraConfig

    config = _peft_config(LoraConfig, peft_cfg, extra, r=peft_cfg.r, lora_alpha=peft_cfg.alpha,
                          lora_dropout=peft_cfg.dropout, bias=peft_cfg.bias, **_common(peft_cfg), **kwargs)
    return _wrap(model, config, peft_cfg, quantized, gradient_checkpointing)


@method("lora", **LORA)
def lora(model, peft_cfg, quantized=False, gradient_checkpointing=False, steps=None, model_path=None,
         **extra):
    """LoRA (Hu et al., 2021): a trained low-rank update B·A beside each target weight; over a 4/8-bit base, QLoRA."""
    return _lora(model, peft_cfg, quantized, gradient_checkpointing, extra)


@method("rslora", **LORA)
def rslora(model, peft_cfg, quantized=False, gradient_checkpointing=False, steps=None, model_path=None,
           **extra):
    """rsLoRA (Kalajdzievski, 2023): LoRA scaled by alpha/sqrt(r) instead of alpha/r, so high ranks keep learning."""
    return _lora(model, peft_cfg, quantized, gradient_checkpointing, extra, use_rslora=True)


@method("dora", **LORA)
def dora(model, peft_cfg, quantized=False, gradient_checkpointing=False, steps=None, model_path=None,
         **extra):
    """DoRA (Liu et al., 2024): LoRA on the direction of each weight plus a trained magnitude vector."""
    return _lora(model, peft_cfg, quantized, gradient_checkpointing, extra, use_dora=True)


def loraplus_optimizer(model, optimizer_cls, trainer_cfg, peft_cfg, **kwargs):
    """LoRA+'s optimizer: the B matrices' learning rate is peft.loraplus_lr_ratio times trainer.lr (peft's
    create_loraplus_optimizer); ``kwargs`` go to the optimizer class."""
    from peft.optimizers import create_loraplus_optimizer

    return create_loraplus_optimizer(model, optimizer_cls=optimizer_cls, lr=trainer_cfg.lr,
                                     loraplus_lr_ratio=peft_cfg.loraplus_lr_ratio,
                                     weight_decay=trainer_cfg.weight_decay, **kwargs)


@method("loraplus", **LORA, optimizer=loraplus_optimizer)
def loraplus(model, peft_cfg, quantized=False, gradient_checkpointing=False, steps=None, model_path=None,
             **extra):
    """LoRA+ (Hayou et al., 2024): LoRA whose B matrices learn peft.loraplus_lr_ratio times faster than A."""
    return _lora(model, peft_cfg, quantized, gradient_checkpointing, extra)


def _mutating_init(kind, model, peft_cfg, quantized, gradient_checkpointing, extra):
    model = _lora(model, peft_cfg, quantized, gradient_checkpointing, extra, init_lora_weights=kind)
    # keep the initial adapter, so that the final one is saved as plain LoRA against the original base
    init_dir = tempfile.mkdtemp(prefix=f"ftctl-{kind}-init-")
    atexit.register(shutil.rmtree, init_dir, True)
    model.peft_config["default"].init_lora_weights = True  # save as is, do not redo the decomposition
    model.save_pretrained(init_dir)
    model.peft_config["default"].init_lora_weights = kind
    model._ftctl_initial_adapter = init_dir
    return model


@method("pissa", **MUTATING_INIT)
def pissa(model, peft_cfg, quantized=False, gradient_checkpointing=False, steps=None, model_path=None, **extra):
    """PiSSA (Meng et al., 2024): LoRA initialised from each weight's principal singular vectors, the base keeping the residual."""
    return _mutating_init("pissa", model, peft_cfg, quantized, gradient_checkpointing, extra)


@method("olora", **MUTATING_INIT)
def olora(model, peft_cfg, quantized=False, gradient_checkpointing=False, steps=None, model_path=None, **extra):
    """OLoRA (Büyükakyüz, 2024): LoRA initialised from an orthonormal (QR) basis of each weight, the base keeping the residual."""
    return _mutating_init("olora", model, peft_cfg, quantized, gradient_checkpointing, extra)


@method("loftq", **LORA, shapes_as="lora", base_quant=FOUR_BIT_BASE,
        quant_reason="initialises LoRA against a 4-bit base's quantization error: use it with quant=nf4 (or fp4)")
def loftq(model, peft_cfg, quantized=False, gradient_checkpointing=False, steps=None, model_path=None, **extra):
    """LoftQ (Li et al., 2023): LoRA over a 4-bit base, initialised so that base + B·A is closest to the float weights."""
    model = _lora(model, peft_cfg, quantized, gradient_checkpointing, extra)
    try:
        loftq_init(model, model_path)
    except (ValueError, TypeError, KeyError, OSError) as e:
        raise ConfigError(f"peft.method=loftq: {_first_line(e)} (it reads the float weights from the model's "
                          "safetensors files)") from e
    return model


def loftq_init(model, model_path) -> int:
    """peft's ``replace_lora_weights_loftq`` on any device: for every 4-bit LoRA layer, A and B become the
    rank-r SVD of (float weight - dequantized 4-bit weight), read from the model's safetensors files.
    peft's own function computes on CUDA or XPU only; this is the same computation where the weights are.
    Returns the number of layers initialised."""
    import bitsandbytes as bnb
    import torch
    from peft.tuners.lora import Linear4bit
    from peft.utils.loftq_utils import _low_rank_decomposition, _SafetensorLoader

    loader = _SafetensorLoader(model, str(model_path) if model_path else None)
    prefix, done = "base_model.model.", 0
    with torch.no_grad():
        for name, module in model.named_modules():
            if not isinstance(module, Linear4bit):
                continue
            weight = loader.get_tensor(name[len(prefix):] + ".weight").to(module.weight.device, torch.float32)
            deq = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state).float()
            out = _low_rank_decomposition(weight - deq, reduced_rank=module.r["default"])
            a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
            a.data = out["R"].to(a.dtype)
            b.data = (out["L"] / module.scaling["default"]).to(b.dtype)  # so that scaling x B·A is the SVD
            done += 1
    if not done:
        raise ValueError("no 4-bit LoRA layer found")
    return done


@method("ia3", peft_type="IA3", merges=True)
def ia3(model, peft_cfg, quantized=False, gradient_checkpointing=False, steps=None, model_path=None,
        **extra):
    """IA3 (Liu et al., 2022): learned vectors rescaling the keys, values and feed-forward activations."""
    from peft import IA3Config

    c = _common(peft_cfg)
    config = _peft_config(IA3Config, peft_cfg, extra, target_modules=c["target_modules"],
                          feedforward_modules=_list(peft_cfg.feedforward_modules), modules_to_save=c["modules_to_save"])
    return _wrap(model, config, peft_cfg, quantized, gradient_checkpointing)


@method("loha", peft_type="LOHA", merges=True, **NOT_FOUR_BIT)
def loha(model, peft_cfg, quantized=False, gradient_checkpointing=False, steps=None, model_path=None,
         **extra):
    """LoHa (Hyeon-Woo et al., 2022; LyCORIS): the update is a Hadamard product of two low-rank products."""
    from peft import LoHaConfig

    config = _peft_config(LoHaConfig, peft_cfg, extra, r=peft_cfg.r, alpha=peft_cfg.alpha,
                          module_dropout=peft_cfg.dropout, **_common(peft_cfg))
    return _wrap(model, config, peft_cfg, quantized, gradient_checkpointing)


@method("lokr", peft_type="LOKR", merges=True, **NOT_FOUR_BIT)
def lokr(model, peft_cfg, quantized=False, gradient_checkpointing=False, steps=None, model_path=None,
         **extra):
    """LoKr (LyCORIS): the update is a Kronecker product of a small matrix and a low-rank one."""
    from peft import LoKrConfig

    config = _peft_config(LoKrConfig, peft_cfg, extra, r=peft_cfg.r, alpha=peft_cfg.alpha,
                          module_dropout=peft_cfg.dropout, **_common(peft_cfg))
    return _wrap(model, config, peft_cfg, quantized, gradient_checkpointing)


@method("vera", peft_type="VERA", merges=True)
def vera(model, peft_cfg, quantized=False, gradient_checkpointing=False, steps=None, model_path=None,
         **extra):
    """VeRA (Kopiczko et al., 2024): frozen random low-rank matrices shared by all layers, trained scaling vectors."""
    from peft import VeraConfig

    c = _common(peft_cfg)
    config = _peft_config(VeraConfig, peft_cfg, extra, r=peft_cfg.r, vera_dropout=peft_cfg.dropout,
                          target_modules=c["target_modules"], modules_to_save=c["modules_to_save"],
                          layers_to_transform=c["layers_to_transform"])
    return _wrap(model, config, peft_cfg, quantized, gradient_checkpointing)


def adalora_step(model, step: int) -> None:
    """AdaLoRA's rank allocation after an optimizer step (it reads the gradients, so before they are zeroed)."""
    model.base_model.update_and_allocate(step)


@method("adalora", peft_type="ADALORA", merges=True, forward_adds_loss=True, step_hook=adalora_step)
def adalora(model, peft_cfg, quantized=False, gradient_checkpointing=False, steps=None, model_path=None,
            **extra):
    """AdaLoRA (Zhang et al., 2023): SVD-shaped LoRA whose rank budget moves to the layers that matter (r -> target_r)."""
    from peft import AdaLoraConfig

    steps = steps or 1000
    if peft_cfg.target_r > peft_cfg.r:
        raise ConfigError(f"peft.target_r={peft_cfg.target_r} must be <= peft.r={peft_cfg.r} (AdaLoRA prunes from r)")
    # warm-up without pruning for the first 10% of steps, the final budget for the last 20%
    tinit, tfinal = int(0.1 * steps), int(0.2 * steps)
    if tinit >= steps - tfinal:
        tinit = tfinal = 0
    config = _peft_config(AdaLoraConfig, peft_cfg, extra, init_r=peft_cfg.r, target_r=peft_cfg.target_r,
                          lora_alpha=peft_cfg.alpha, lora_dropout=peft_cfg.dropout, total_step=steps,
                          tinit=tinit, tfinal=tfinal, deltaT=max(1, steps // 100), **_common(peft_cfg))
    return _wrap(model, config, peft_cfg, quantized, gradient_checkpointing)


@method("oft", peft_type="OFT", merges=True)
def oft(model, peft_cfg, quantized=False, gradient_checkpointing=False, steps=None, model_path=None,
        **extra):
    """OFT (Qiu et al., 2023): each weight multiplied by a trained block-diagonal orthogonal matrix."""
    from peft import OFTConfig

    config = _peft_config(OFTConfig, peft_cfg, extra, r=0, oft_block_size=peft_cfg.block_size,
                          module_dropout=peft_cfg.dropout, **_common(peft_cfg))
    return _wrap(model, config, peft_cfg, quantized, gradient_checkpointing)


@method("boft", peft_type="BOFT", merges=True)
def boft(model, peft_cfg, quantized=False, gradient_checkpointing=False, steps=None, model_path=None,
         **extra):
    """BOFT (Liu et al., 2024): OFT whose orthogonal matrix is a product of butterfly-structured factors."""
    from peft import BOFTConfig

    config = _peft_config(BOFTConfig, peft_cfg, extra, boft_block_size=peft_cfg.block_size,
                          boft_n_butterfly_factor=peft_cfg.n_butterfly_factor, boft_dropout=peft_cfg.dropout,
                          **_common(peft_cfg))
    return _wrap(model, config, peft_cfg, quantized, gradient_checkpointing)


@method("ln_tuning", peft_type="LN_TUNING", merges=True)
def ln_tuning(model, peft_cfg, quantized=False, gradient_checkpointing=False, steps=None, model_path=None,
              **extra):
    """LN tuning (Zhao et al., 2024): only the normalisation layers' weights are trained."""
    from peft import LNTuningConfig

    config = _peft_config(LNTuningConfig, peft_cfg, extra, target_modules=_target_modules(peft_cfg),
                          modules_to_save=_list(peft_cfg.modules_to_save))
    return _wrap(model, config, peft_cfg, quantized, gradient_checkpointing)


@method("prompt_tuning", peft_type="PROMPT_TUNING", **PROMPT)
def prompt_tuning(model, peft_cfg, quantized=False, gradient_checkpointing=False, steps=None, model_path=None,
                  **extra):
    """Prompt tuning (Lester et al., 2021): trained embeddings of num_virtual_tokens tokens put before the input."""
    from peft import PromptTuningConfig

    init = peft_cfg.prompt_init
    kwargs = {"prompt_tuning_init": init.upper()}
    if init == "text":
        if not peft_cfg.prompt_init_text:
            raise ConfigError("peft.prompt_init=text needs peft.prompt_init_text='...' (the words the prompt starts as)")
        kwargs.update(prompt_tuning_init_text=peft_cfg.prompt_init_text, tokenizer_name_or_path=str(model_path))
    config = _peft_config(PromptTuningConfig, peft_cfg, extra, num_virtual_tokens=peft_cfg.num_virtual_tokens, **kwargs)
    return _wrap(model, config, peft_cfg, quantized, gradient_checkpointing)


@method("prefix_tuning", peft_type="PREFIX_TUNING", **PROMPT)
def prefix_tuning(model, peft_cfg, quantized=False, gradient_checkpointing=False, steps=None, model_path=None,
                  **extra):
    """Prefix tuning (Li & Liang, 2021): trained keys and values of num_virtual_tokens positions in every layer."""
    from peft import PrefixTuningConfig

    config = _peft_config(PrefixTuningConfig, peft_cfg, extra, num_virtual_tokens=peft_cfg.num_virtual_tokens)
    return _wrap(model, config, peft_cfg, quantized, gradient_checkpointing)


@method("p_tuning", peft_type="P_TUNING", **PROMPT)
def p_tuning(model, peft_cfg, quantized=False, gradient_checkpointing=False, steps=None, model_path=None,
             **extra):
    """P-tuning (Liu et al., 2021): virtual-token embeddings produced by a small trained MLP prompt encoder."""
    from peft import PromptEncoderConfig

    config = _peft_config(PromptEncoderConfig, peft_cfg, extra, num_virtual_tokens=peft_cfg.num_virtual_tokens,
                          encoder_hidden_size=peft_cfg.encoder_hidden_size)
    return _wrap(model, config, peft_cfg, quantized, gradient_checkpointing)


@method("adaption_prompt", peft_type="ADAPTION_PROMPT")
def adaption_prompt(model, peft_cfg, quantized=False, gradient_checkpointing=False, steps=None, model_path=None,
                    **extra):
    """LLaMA-Adapter (Zhang et al., 2023): zero-gated trained prompts in the attention of the top layers."""
    from peft import AdaptionPromptConfig

    n_layers = getattr(model.config, "num_hidden_layers", None) or peft_cfg.adapter_layers
    config = _peft_config(AdaptionPromptConfig, peft_cfg, extra, adapter_len=peft_cfg.adapter_len,
                          adapter_layers=min(peft_cfg.adapter_layers, n_layers))
    return _wrap(model, config, peft_cfg, quantized, gradient_checkpointing)


# ----------------------------------------------------------------------------- plain-model methods
def head_modules(model):
    """The scalar head of a reward model (trained by every method: it is new)."""
    return [m for name, m in model.named_children() if name in ("score", "classifier")]


def _blocks(model):
    """The transformer blocks: the longest ModuleList in the model (model.layers for Llama, h for GPT-2)."""
    import torch

    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
    if not lists:
        raise ConfigError(f"peft.method=freeze: cannot find the transformer blocks of {type(model).__name__}")
    return max(lists, key=len)


@method("bitfit")
def bitfit(model, peft_cfg, quantized=False, gradient_checkpointing=False, steps=None, model_path=None,
           **extra):
    """BitFit (Ben Zaken et al., 2022): only the bias terms are trained; bias-free Llama-style layers get zero biases."""
    import torch

    model = prepare(model, quantized, gradient_checkpointing)
    for p in model.parameters():
        p.requires_grad_(False)
    biases = [m.bias for m in model.modules() if isinstance(m, torch.nn.Linear) and m.bias is not None]
    if not biases:
        # Llama, Mistral, SmolLM: no biases. Add zero ones (the model's outputs do not change) through the
        # config flags the architecture has, so that the saved model folder loads them back.
        flags = [f for f in ("attention_bias", "mlp_bias") if hasattr(model.config, f)]
        if not flags:
            raise ConfigError(f"peft.method=bitfit: {type(model).__name__} has no bias terms to train")
        names = {"attention_bias": ("q_proj", "k_proj", "v_proj", "o_proj"), "mlp_bias": ("gate_proj", "up_proj",
                                                                                            "down_proj")}
        wanted = {n for f in flags for n in names[f]}
        for name, m in model.named_modules():
            if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in wanted:
                w = m.weight
                m.bias = torch.nn.Parameter(torch.zeros(m.out_features, dtype=torch.float32 if quantized else w.dtype,
                                                        device=w.device))
                biases.append(m.bias)
        for f in flags:
            setattr(model.config, f, True)
    for b in biases:
        b.requires_grad_(True)
    for head in head_modules(model):
        head.requires_grad_(True)
    return model


@method("freeze", trains_base_weights=True, base_quant=FLOAT_BASE,
        quant_reason="trains whole blocks, which cannot be quantized: use quant=none, or an adapter method over the "
                     "quantized base")
def freeze(model, peft_cfg, quantized=False, gradient_checkpointing=False, steps=None, model_path=None,
           **extra):
    """Freeze all but the last peft.trainable_layers blocks, the final norm and the output head."""
    import torch

    model = prepare(model, False, gradient_checkpointing)
    blocks = _blocks(model)
    n = peft_cfg.trainable_layers
    if not 0 <= n <= len(blocks):
        raise ConfigError(f"peft.trainable_layers={n}: the model has {len(blocks)} blocks")
    for p in model.parameters():
        p.requires_grad_(False)
    for block in list(blocks)[len(blocks) - n:]:
        block.requires_grad_(True)
    inner = getattr(model, model.base_model_prefix, model)
    for name in ("norm", "final_layernorm", "ln_f"):
        if isinstance(getattr(inner, name, None), torch.nn.Module):
            getattr(inner, name).requires_grad_(True)
    out = model.get_output_embeddings()
    if out is not None:  # with tied embeddings this trains the input embeddings too (they are one tensor)
        out.requires_grad_(True)
    for head in head_modules(model):
        head.requires_grad_(True)
    return model


@method("full", trains_base_weights=True, base_quant=FLOAT_BASE,
        quant_reason="cannot train a quantized base; use quant=none, or an adapter method such as lora")
def full(model, peft_cfg, quantized=False, gradient_checkpointing=False, steps=None, model_path=None,
         **extra):
    """Full fine-tuning: every weight is trained."""
    model = prepare(model, False, gradient_checkpointing)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


# ----------------------------------------------------------------------------- helpers for the runner
def is_adapter(model) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def save_adapter(model, folder, **kwargs) -> None:
    """Save a peft model's adapter; PiSSA/OLoRA adapters are converted to plain LoRA against the original base.
    ``kwargs`` go to peft's save_pretrained (state_dict=: weights gathered from sharded processes)."""
    init = getattr(model, "_ftctl_initial_adapter", None)
    if init:
        model.save_pretrained(folder, path_initial_model_for_weight_conversion=init, **kwargs)
    else:
        model.save_pretrained(folder, **kwargs)


def _n(p) -> int:
    """Parameters in a tensor; a 4-bit bitsandbytes weight packs two (or more) per stored byte."""
    n = p.numel()
    if p.__class__.__name__ == "Params4bit":
        n *= 2 * (p.quant_storage.itemsize if hasattr(p, "quant_storage") else 1)
    return n


def parameter_report(model) -> dict:
    """Total and trainable parameters, and which modules train, as name patterns with layer numbers as '*'."""
    total = trainable = 0
    groups: dict[str, list[int]] = {}
    for name, p in model.named_parameters():
        n = _n(p)
        total += n
        if p.requires_grad:
            trainable += n
            key = re.sub(r"\.\d+(?=\.|$)", ".*", name.removeprefix("base_model.model.")).replace(".default", "")
            g = groups.setdefault(key, [0, 0])
            g[0] += 1
            g[1] += n
    modules = [{"pattern": k, "tensors": v[0], "params": v[1]} for k, v in groups.items()]
    return {"trainable_params": trainable, "total_params": total,
            "trainable_percent": round(100 * trainable / max(total, 1), 4), "trainable_modules": modules}
