"""Resolving model.path: builtin, local folder, hub id from a local hub cache, uncached offline."""
import json

import pytest
from conftest import compose, run_cli

from ftctl.models import load as models
from ftctl.core.errors import ModelNotFoundError


def test_local_folder_and_missing_folder(tmp_path, tiny_model_path):
    assert models.resolve(str(tiny_model_path)) == tiny_model_path.resolve()
    with pytest.raises(ModelNotFoundError, match="no such model folder"):
        models.resolve(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        models.resolve(str(tmp_path / "empty"))


def _fake_hub_cache(root, repo_id, files):
    """The layout huggingface_hub writes: models--org--name/{refs/main, snapshots/<rev>/...}."""
    rev = "0123456789abcdef0123456789abcdef01234567"
    d = root / ("models--" + repo_id.replace("/", "--"))
    (d / "refs").mkdir(parents=True)
    (d / "refs" / "main").write_text(rev)
    snap = d / "snapshots" / rev
    snap.mkdir(parents=True)
    for name, src in files.items():
        (snap / name).write_bytes(src.read_bytes())
    return snap


def test_hub_id_resolves_from_local_cache_offline(tmp_path, tiny_model_path):
    snap = _fake_hub_cache(tmp_path / "hub", "someorg/tiny-model",
                           {f.name: f for f in tiny_model_path.iterdir() if f.is_file()})
    code = ("from ftctl.models import load as models; from ftctl.models.load import load_tokenizer; "
            "p = models.resolve('someorg/tiny-model'); print(p); load_tokenizer(p)")
    import subprocess
    import sys
    import os

    env = dict(os.environ, HF_HUB_CACHE=str(tmp_path / "hub"), HF_HUB_OFFLINE="1")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(snap)


def test_uncached_hub_id_offline_says_how_to_fix(tmp_path):
    r = run_cli("train", "model=llama3_1_8b", f"output_dir={tmp_path / 'run'}",
                env={"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "empty-hub")})
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in r.stderr
    assert not (tmp_path / "run").exists()  # bad input leaves no half-made run directory
    assert "meta-llama/Llama-3.1-8B-Instruct" in lines[0] and "not in the local Hugging Face cache" in lines[0]
    assert "model.path=/path/to/folder" in lines[0]


def test_embedded_model_is_a_plain_safetensors_folder():
    path = models.resolve("builtin:smollm2_135m")
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["model_type"] == "llama" and "quantization_config" not in cfg
    assert (path / "model.safetensors").is_file() and (path / "tokenizer.json").is_file()
    tok = models.load_tokenizer(path)
    assert tok.eos_token == "<|im_end|>" and tok.pad_token_id is not None


def test_pickled_weights_are_not_loaded(tmp_path, tiny_model_path):
    d = tmp_path / "bin_model"
    d.mkdir()
    (d / "config.json").write_text((tiny_model_path / "config.json").read_text())
    (d / "pytorch_model.bin").write_bytes(b"pickled weights")
    with pytest.raises(ModelNotFoundError, match=r"no \.safetensors weights .* does not load pickled"):
        models.resolve(str(d))


def _lora_grads_before_and_after_an_eval_forward(tiny_model_path, keep: bool):
    import torch
    from omegaconf import OmegaConf

    from ftctl.methods.spec import method_spec
    from ftctl.models.load import keep_training_layout, load_model

    cfg = compose("model=tiny_llama", "quant=nf4", "peft=lora")[0]
    model = load_model(tiny_model_path, cfg.model, cfg.quant, torch.device("cpu"))
    if keep:
        assert keep_training_layout(model) > 0  # the 4-bit linear layers
    model = method_spec("lora").wrap(model, OmegaConf.merge(cfg.peft, {"dropout": 0.0}), quantized=True)
    torch.manual_seed(0)
    for p in model.parameters():  # B = 0 at init: give every adapter a non-zero path
        if p.requires_grad:
            p.data.normal_(0, 0.02)
    ids = torch.randint(0, 100, (2, 12))

    def grads():
        model.train()
        model.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    before = grads()
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)  # a validation pass
    return before, grads()


def test_a_4bit_base_passes_the_same_gradients_after_a_validation_pass(tiny_model_path):
    """bitsandbytes repacks 4-bit weights for CPU inference at the first eval-mode forward (on CPUs with
    AVX512-BF16), and the repacked weights pass no gradient back; a training model keeps its layout."""
    import torch

    before, after = _lora_grads_before_and_after_an_eval_forward(tiny_model_path, keep=True)
    assert before.keys() == after.keys() and len(before) > 4
    assert all(torch.equal(before[n], after[n]) for n in before)


def test_without_keeping_the_layout_the_gradients_change_where_bitsandbytes_repacks(tiny_model_path):
    import torch
    from bitsandbytes.functional import has_avx512bf16

    if not has_avx512bf16():
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes does not repack, there is nothing to keep")
    before, after = _lora_grads_before_and_after_an_eval_forward(tiny_model_path, keep=False)
    assert not all(torch.equal(before[n], after[n]) for n in before)
