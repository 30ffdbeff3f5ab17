"""ftctl plan: parameter counts, weight bytes and activation estimates checked against the real thing
(a real tiny model with the same adapter, real bitsandbytes 4-bit weights, autograd's saved tensors)."""
import json

import pytest
import torch

from conftest import compose, run_cli
from ftctl.experiments import plan
from ftctl.experiments.plan import PlanConfig


@pytest.mark.parametrize("method", ["lora", "dora", "ia3", "prompt_tuning", "freeze", "full", "bitfit"])
def test_plan_counts_parameters_like_the_real_adapted_model(method):
    from ftctl.methods import peft as adapters
    from ftctl.models import load as models
    from ftctl.methods.spec import method_spec

    cfg, _ = compose("model=tiny_llama", f"peft={method}")
    est = plan.estimate(cfg, PlanConfig(device="cpu"))
    path = models.resolve(cfg.model.path)
    real = models.load_model(path, cfg.model, cfg.quant, torch.device("cpu"))
    real = method_spec(method).wrap(real, cfg.peft, quantized=False, gradient_checkpointing=False, steps=10, model_path=path)
    rep = adapters.parameter_report(real)
    assert (est["total_params"], est["trainable_params"]) == (rep["total_params"], rep["trainable_params"])
    # full: weights, gradients and two AdamW states, all float32
    if method == "full":
        p = est["parts"]
        assert p["weights"] == p["gradients"] == rep["total_params"] * 4
        assert p["optimizer"] == 2 * p["weights"]


def test_plan_nf4_weight_bytes_match_bitsandbytes():
    from ftctl.models import load as models

    cfg, _ = compose("model=tiny_llama", "quant=nf4")
    est = plan.estimate(cfg, PlanConfig(device="cpu"))
    real = models.load_model(models.resolve(cfg.model.path), cfg.model, cfg.quant, torch.device("cpu"))
    quantized = other = 0
    for p in real.parameters():
        if type(p).__name__ == "Params4bit":
            qs = p.quant_state
            # packed 4-bit weights, the 8-bit absmax per block and the float32 absmax of the absmax blocks
            quantized += p.numel() * p.element_size() + qs.absmax.numel() * qs.absmax.element_size() \
                + qs.state2.absmax.numel() * qs.state2.absmax.element_size()
        else:
            other += p.numel() * p.element_size()
    # the plan's weights include the LoRA matrices (float32) the real base does not have yet
    assert est["weights_loaded_bytes"] - 4 * est["trainable_params"] == pytest.approx(quantized + other, rel=0.002)
    assert est["weights_quantized_bytes"] == pytest.approx(quantized, rel=0.02)


@pytest.mark.parametrize("mode", ["full", "lora", "lora_dropout", "lora_checkpointing"])
def test_plan_activation_estimate_matches_autograd_saved_tensors(mode):
    """What autograd keeps for the backward pass of a Llama block, measured with saved_tensors_hooks,
    against plan's per-layer formula (the difference of a 3-layer and a 1-layer model: per layer)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from ftctl.methods.spec import method_spec

    method = "full" if mode == "full" else "lora"
    cfg, _ = compose("model=tiny_llama", f"peft={method}", f"peft.dropout={0.1 if mode == 'lora_dropout' else 0.0}",
                     f"trainer.gradient_checkpointing={mode == 'lora_checkpointing'}")
    b, s = 2, 64

    def saved_bytes(layers: int) -> tuple[int, object, object]:
        torch.manual_seed(0)
        mconf = LlamaConfig(hidden_size=96, intermediate_size=320, num_hidden_layers=layers, num_attention_heads=6,
                            num_key_value_heads=2, vocab_size=512, max_position_embeddings=256)
        model = LlamaForCausalLM(mconf)
        model = method_spec(method).wrap(model, cfg.peft, quantized=False,
                                     gradient_checkpointing=cfg.trainer.gradient_checkpointing, steps=1)
        model.train()
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        seen = {}

        def pack(t):
            st = t.untyped_storage()
            if st.data_ptr() not in params:
                seen[st.data_ptr()] = st.nbytes()
            return t
        ids = torch.randint(0, 512, (b, s))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(input_ids=ids, labels=ids).loss.backward()
        return sum(seen.values()), mconf, model

    one, conf1, model1 = saved_bytes(1)
    three, conf3, model3 = saved_bytes(3)
    measured_per_layer = (three - one) / 2
    est1 = plan.activation_bytes(cfg, conf1, model1, method, b * s, s, 4)["layers"]
    est3 = plan.activation_bytes(cfg, conf3, model3, method, b * s, s, 4)["layers"]
    assert (est3 - est1) / 2 == pytest.approx(measured_per_layer, rel=0.15), (mode, est1, est3, measured_per_layer)


def test_plan_of_a_llama_8b_qlora_config_matches_published_figures():
    """Llama 3.1 8B in 4-bit: about 5.5-6 GB of weights as loaded (transformers' docs quote ~5.7 GB for
    8B-class models), 8.03 B parameters, and 42 M LoRA parameters at r=16 on all linear layers."""
    cfg, _ = compose("recipe=qlora_llama", "model=llama3_1_8b")
    est = plan.estimate(cfg, PlanConfig(device="cuda"))
    assert est["total_params"] - est["trainable_params"] == 8_030_261_248
    assert est["trainable_params"] == 41_943_040
    assert 5.0e9 < est["weights_loaded_bytes"] < 6.5e9
    assert 1.0 < est["weights_quantized_bytes"] / (6_979_321_856 / 2) < 1.05  # 4 bits + block scales
    # per device: ZeRO-3 on 8 devices shards weights, gradients and optimizer states
    z3 = plan.per_device({"weights": 8e9, "gradients": 1e9, "optimizer": 2e9, "activations": 0, "logits": 0,
                          "layer": 1e8, "runtime": 0}, "zero3", 8)
    assert z3["weights"] == int(1e9 + 1e8) and z3["gradients"] == int(1e9 / 8) and z3["optimizer"] == int(2e9 / 8)


def test_plan_command_and_plan_of_a_finished_run(tmp_path):
    r = run_cli("plan", "model=tiny_llama", "trainer.batch_size=2", "tokens_per_s=1000")
    assert r.returncode == 0, r.stderr
    assert "peak" in r.stdout and "GFLOP per token" in r.stdout and "1000 tokens/s (given)" in r.stdout
    out = tmp_path / "run"
    r = run_cli("train", "model=tiny_llama", "trainer.max_steps=2", "data.limit=16", "trainer.eval_every=0",
                f"output_dir={out}")
    assert r.returncode == 0, r.stderr[-2000:]
    man = json.loads((out / "manifest.json").read_text())
    assert man["peak_memory_kind"] == "cpu_rss" and man["peak_memory_bytes"] > 100 * 2 ** 20
    assert man["train_tokens_per_s"] > 0
    r = run_cli("plan", f"run={out}")
    assert r.returncode == 0, r.stderr
    assert "measured" in r.stdout and "estimate / measured" in r.stdout and "measured in the run" in r.stdout
    bad = run_cli("plan", "run=/nonexistent/run")
    assert bad.returncode != 0 and "not a run directory" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
