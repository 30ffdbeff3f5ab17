"""Every adaptation method has one spec (ftctl.methods.spec), and each trait the spec declares agrees with what
the method really does to builtin:tiny_llama: adapter (a peft model of that peft type), merges (peft's
merge_and_unload gives the same logits), virtual tokens (peft's prompt learning), a loss term in the forward,
the per-step hook, base weights rewritten at initialisation or trained, the meta-device stand-in, the
optimizer, and the quantized bases it trains over (the others refused by config validation, and really
failing without that refusal)."""
import copy
import functools
import re

import pytest
import torch
import torch.nn.functional as F
from conftest import compose

from ftctl.core.errors import ConfigError
from ftctl.core.paths import config_dir
from ftctl.core.registry import QUANT
from ftctl.methods.peft import is_adapter
from ftctl.methods.spec import (ANY_BASE, METHODS, adapter_spec, method_spec, peft_type_merges,
                                spec_for_peft_type)

NAMES = METHODS.names()
IDS = torch.tensor([[1, 5, 9, 22, 7, 3, 14, 2]])


def test_every_method_has_one_spec_whose_traits_are_consistent():
    assert NAMES == sorted(METHODS.names()) and len(NAMES) == 22
    assert sorted(p.stem for p in (config_dir() / "peft").glob("*.yaml")) == NAMES
    assert sorted(ANY_BASE) == sorted(QUANT.names())
    for name in NAMES:
        spec = method_spec(name)
        assert spec.name == name and spec.wrap is METHODS.get(name).wrap and spec.description, name
        assert set(spec.base_quant) <= set(ANY_BASE) and spec.base_quant, name
        assert bool(spec.quant_reason) == (set(spec.base_quant) != set(ANY_BASE)), name
        if not spec.adapter:  # the adapter's own traits
            assert not (spec.merges or spec.virtual_tokens or spec.forward_adds_loss or spec.step_hook), name
        assert not (spec.adapter and spec.trains_base_weights), name
        assert not (spec.virtual_tokens and spec.merges), name
        if spec.mutates_base_init:
            assert spec.base_quant == ("none",), name
        if spec.shapes_as:
            stand_in = method_spec(spec.shapes_as)
            assert stand_in.peft_type == spec.peft_type and stand_in.shapes_as is None and "none" in stand_in.base_quant
        if spec.adapter:  # methods sharing a peft type share what the adapter file decides
            same = spec_for_peft_type(spec.peft_type)
            assert (same.merges, same.virtual_tokens, same.forward_adds_loss, same.step_hook) == \
                (spec.merges, spec.virtual_tokens, spec.forward_adds_loss, spec.step_hook), name
            assert peft_type_merges(spec.peft_type) == spec.merges
    assert spec_for_peft_type("LORA").name == "lora" and spec_for_peft_type("HRA") is None
    assert peft_type_merges("HRA") and not peft_type_merges("PROMPT_TUNING")
    with pytest.raises(ConfigError, match="peft.method='nope' is not known; choose one of: adalora"):
        method_spec("nope")


@pytest.fixture(scope="module")
def tiny(tiny_model_path):
    from ftctl.models import load as models

    cfg, _ = compose("model=tiny_llama")
    return models.load_model(tiny_model_path, cfg.model, cfg.quant, torch.device("cpu")).eval()


@functools.lru_cache(maxsize=None)
def _cfg(name):
    """The method's config (composed with a base it allows: validation refuses the others)."""
    return compose("model=tiny_llama", f"peft={name}", f"quant={method_spec(name).base_quant[0]}")[0]


def _wrap(name, model, path, quantized=False, raw=False):
    cfg = _cfg(name)
    fn = method_spec(name).wrap
    return (fn.__wrapped__ if raw else fn)(model, cfg.peft, quantized=quantized, steps=10, model_path=path)


def _base_name(n: str) -> str:
    return n.removeprefix("base_model.model.").removeprefix("base_model.").replace(".base_layer", "")


def _check_adapter_traits(spec, wrapped):
    """peft type, virtual tokens, the step hook and the loss term in the forward, against the wrapped model."""
    peft_cfg = wrapped.peft_config["default"]
    assert str(getattr(peft_cfg.peft_type, "value", peft_cfg.peft_type)) == spec.peft_type
    assert adapter_spec(wrapped).peft_type == spec.peft_type
    assert spec.virtual_tokens == peft_cfg.is_prompt_learning
    assert (spec.step_hook is not None) == hasattr(wrapped.base_model, "update_and_allocate")
    wrapped.train()
    out = wrapped(input_ids=IDS, labels=IDS)
    if not spec.virtual_tokens:  # the logits line up with the input: compare the loss with their cross-entropy
        ce = F.cross_entropy(out.logits[0, :-1].float(), IDS[0, 1:])
        assert (abs(float(out.loss - ce)) > 1e-6) == spec.forward_adds_loss, (float(out.loss), float(ce))
    out.loss.backward()
    if spec.step_hook is not None:
        spec.step_hook(wrapped, 1)  # what the runner calls after the optimizer step


def _check_merge(spec, wrapped):
    if not spec.adapter:
        return
    if not spec.merges:
        with pytest.raises((AttributeError, ValueError, NotImplementedError)):
            wrapped.merge_and_unload()
        return
    torch.manual_seed(0)
    with torch.no_grad():  # a trained-looking adapter: zero-initialised parts (LoRA's B) would merge trivially
        for p in wrapped.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    wrapped.eval()
    with torch.no_grad():
        before = wrapped(input_ids=IDS).logits
        merged = wrapped.merge_and_unload()
        after = merged(input_ids=IDS).logits
    assert not is_adapter(merged) and not any("lora_" in n or "base_layer" in n for n, _ in merged.named_parameters())
    assert torch.allclose(before, after, atol=1e-4, rtol=0), float((before - after).abs().max())


@pytest.mark.parametrize("name", NAMES)
def test_each_trait_matches_what_the_method_does_to_tiny_llama(name, tiny, tiny_model_path):
    spec = method_spec(name)
    model = copy.deepcopy(tiny)
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    if "none" not in spec.base_quant:  # LoftQ: refused on a float base, and peft's initialisation fails there
        with pytest.raises(ConfigError, match=f"peft.method={name} "):
            _wrap(name, model, tiny_model_path)
        with pytest.raises(Exception):
            _wrap(name, copy.deepcopy(tiny), tiny_model_path, raw=True)
        return
    wrapped = _wrap(name, model, tiny_model_path)
    assert is_adapter(wrapped) == spec.adapter
    params = {_base_name(n): p for n, p in wrapped.named_parameters()}
    # the base's own weight matrices train (full, freeze) or stay frozen (adapters; BitFit trains biases)
    assert any(p.requires_grad and p.ndim >= 2 for n, p in params.items() if n in original) == spec.trains_base_weights
    # the initialisation rewrote base weights (PiSSA, OLoRA: W - B·A) or left every one as loaded
    changed = [n for n, p in params.items() if n in original and not torch.equal(p.detach(), original[n])]
    assert bool(changed) == spec.mutates_base_init, changed[:3]
    if spec.shapes_as:  # ftctl plan wraps the stand-in on the meta device: the same trainable shapes
        stand_in = _wrap(spec.shapes_as, copy.deepcopy(tiny), tiny_model_path)
        shapes = {n: p.shape for n, p in wrapped.named_parameters() if p.requires_grad}
        assert shapes == {n: p.shape for n, p in stand_in.named_parameters() if p.requires_grad}
    if spec.optimizer is not None:
        cfg = _cfg(name)
        opt = spec.optimizer(wrapped, torch.optim.AdamW, cfg.trainer, cfg.peft)
        assert len({g["lr"] for g in opt.param_groups}) > 1
    if spec.adapter:
        _check_adapter_traits(spec, wrapped)
    _check_merge(spec, wrapped)


# refused though peft would wrap it: OLoRA re-quantizes the residual W - B·A, so its adapter converted to plain
# LoRA against the original base would not give the trained model back
REFUSED_BY_CHOICE = {("olora", "nf4")}


def _quant_cases():
    """nf4 for every method; int8 where a method's answer for it differs from nf4's (LoHa, LoKr, LoftQ)."""
    for name in NAMES:
        base = method_spec(name).base_quant
        yield name, "nf4"
        if ("int8" in base) != ("nf4" in base):
            yield name, "int8"


@pytest.fixture(scope="module")
def quantized(tiny_model_path):
    from ftctl.models import load as models

    def load(quant):
        cfg, _ = compose("model=tiny_llama", f"quant={quant}", "quant.double_quant=false")
        return models.load_model(tiny_model_path, cfg.model, cfg.quant, torch.device("cpu"))

    return {q: load(q) for q in ("nf4", "int8")}


@pytest.mark.parametrize("name,quant", list(_quant_cases()))
def test_quantized_bases_the_spec_allows_train_and_the_others_are_refused_at_validation(
        name, quant, quantized, tiny_model_path):
    spec = method_spec(name)
    model = copy.deepcopy(quantized[quant])
    if quant in spec.base_quant:
        compose("model=tiny_llama", f"peft={name}", f"quant={quant}")  # valid
        wrapped = _wrap(name, model, tiny_model_path, quantized=True)
    else:
        with pytest.raises(ConfigError, match=re.escape(f"peft.method={name} {spec.quant_reason}")):
            compose("model=tiny_llama", f"peft={name}", f"quant={quant}")
        with pytest.raises(ConfigError, match=f"peft.method={name} "):  # Python callers of the wrap too
            _wrap(name, model, tiny_model_path, quantized=True)
        if (name, quant) in REFUSED_BY_CHOICE:
            return
        # and the refusal is real: without it, peft or torch fails while wrapping or training
        with pytest.raises(Exception):
            wrapped = _wrap(name, copy.deepcopy(quantized[quant]), tiny_model_path, quantized=True, raw=True).train()
            wrapped(input_ids=IDS).logits.float().sum().backward()
            assert all(p.grad is not None for p in wrapped.parameters() if p.requires_grad)
            assert torch.isfinite(wrapped(input_ids=IDS).logits).all()
        return
    # training mode: bitsandbytes 0.50 repacks a 4-bit weight for CPU inference on an eval-mode forward, after
    # which no gradient flows through it
    wrapped.train()(input_ids=IDS).logits.float().sum().backward()
    grads = [p.grad for p in wrapped.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


def test_validation_leaves_the_base_alone_where_peft_method_wraps_nothing():
    """task=classify has its own strategies, and its own refusal of a quantized base."""
    with pytest.raises(ConfigError, match="quant=nf4 is not available with task=classify"):
        compose("model=tiny_bert", "task=classify", "peft=full", "quant=nf4")
