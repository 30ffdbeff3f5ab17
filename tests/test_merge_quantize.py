"""ftctl merge, quantize, generate and chat on tiny_llama runs (real models, files and processes)."""
import io
import json

import pytest
import torch
from conftest import compose, run_cli

from ftctl.train.loop import train

TINY = ["model=tiny_llama", "data.limit=40", "trainer.max_steps=3", "trainer.eval_every=0", "trainer.lr=5e-2",
        "trainer.batch_size=4"]


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("lora") / "run"
    cfg, choices = compose(*TINY, "peft.dropout=0", f"output_dir={out}")
    return train(cfg, choices)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def _adapter_logits(run, ids):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    man = json.loads((run / "manifest.json").read_text())
    base = AutoModelForCausalLM.from_pretrained(man["model_path"], dtype=torch.float32)
    return _logits(PeftModel.from_pretrained(base, run / "adapter").eval(), ids)


@pytest.fixture(scope="module")
def merged(tmp_path_factory, lora_run):
    out = tmp_path_factory.mktemp("merged") / "merged"
    r = run_cli("merge", f"run={lora_run}", f"output={out}")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "max |logit difference| merged vs base + adapter" in r.stdout
    return out


def _console():
    from rich.console import Console

    return Console(file=io.StringIO())


@pytest.mark.parametrize("method, extra", [("lora", []), ("dora", []), ("qlora", ["quant=nf4"])])
def test_merge_matches_the_adapter_and_reloads_with_plain_transformers(tmp_path, lora_run, merged, method, extra):
    from transformers import AutoModelForCausalLM

    from ftctl.core.errors import RunDirError
    from ftctl.post.merge import MergeConfig, merge

    run, out = lora_run, merged
    if method != "lora":
        cfg, choices = compose(*TINY, "peft.dropout=0", f"peft.method={'dora' if method == 'dora' else 'lora'}",
                               *extra, f"output_dir={tmp_path / 'run'}")
        run = train(cfg, choices)
        out = merge(MergeConfig(run=str(run), output=str(tmp_path / f"merged-{method}")), _console())
    report = json.loads((out / "ftctl-merge.json").read_text())
    assert report["max_logit_diff"] <= 1e-3 and report["quantized_training_base"] == (method == "qlora")
    assert report["peft_type"] == "LORA"
    merged_model = AutoModelForCausalLM.from_pretrained(out)  # plain transformers, no peft, no ftctl
    ids = torch.tensor([[1, 200, 300, 400, 500, 600]])
    assert float((_logits(merged_model, ids) - _adapter_logits(run, ids)).abs().max()) < 1e-3
    # the adapter changed the model: the merged logits are not the base's
    man = json.loads((run / "manifest.json").read_text())
    base = AutoModelForCausalLM.from_pretrained(man["model_path"], dtype=torch.float32)
    assert float((_logits(merged_model, ids) - _logits(base, ids)).abs().max()) > 1e-2
    # a second merge into the same folder is refused unless overwrite=true
    with pytest.raises(RunDirError, match="already exists"):
        merge(MergeConfig(run=str(run), output=str(out)), _console())


def test_merge_refuses_prompt_tuning_and_full_runs(tmp_path, lora_run):
    import shutil

    from peft import PromptTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    run = tmp_path / "pt"
    shutil.copytree(lora_run, run)
    shutil.rmtree(run / "adapter")
    man = json.loads((run / "manifest.json").read_text())
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(man["model_path"]),
                           PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    model.save_pretrained(run / "adapter")
    r = run_cli("merge", f"run={run}")
    assert r.returncode == 2 and "prompt_tuning adapters cannot be merged" in r.stderr
    assert not (run / "merged").exists()
    shutil.rmtree(run / "adapter")
    (run / "model").mkdir()
    r = run_cli("merge", f"run={run}")
    assert r.returncode == 2 and "is a full fine-tune" in r.stderr


@pytest.mark.parametrize("method", ["nf4", "int8", "int8_weight_only"])
def test_quantize_writes_a_folder_that_reloads_and_generates(tmp_path, merged, method):
    from transformers import AutoModelForCausalLM

    from ftctl.post.quantize import QuantizeConfig, quantize

    out = tmp_path / method
    console = _console()
    quantize(QuantizeConfig(model=str(merged), method=method, output=str(out), eval_rows=4), ["data.limit=40"],
             console)
    text = console.file.getvalue()
    assert "weights on disk" in text and "perplexity" in text
    rep = json.loads((out / "ftctl-quantize.json").read_text())
    assert rep["bytes_after"] < rep["bytes_before"] and rep["perplexity_after"] > 0
    # within a few percent of the float model's perplexity on the same rows
    assert abs(rep["perplexity_after"] / rep["perplexity_before"] - 1) < 0.05
    model = AutoModelForCausalLM.from_pretrained(out, device_map={"": "cpu"})
    assert "quantization_config" in json.loads((out / "config.json").read_text())
    gen = model.generate(torch.tensor([[1, 200, 300]]), max_new_tokens=3, do_sample=False)
    assert gen.shape == (1, 6)


def test_quantize_int4_weight_only_says_why_it_cannot_run_here(tmp_path, merged):
    if torch.cuda.is_available():
        pytest.skip("this test is about machines without a CUDA GPU")
    r = run_cli("quantize", f"model={merged}", "method=int4_weight_only", f"output={tmp_path / 'q'}", "data.limit=40")
    # exit 2 (the hardening issue: a clear line for a setting that cannot work here, said before any model loads)
    assert r.returncode == 2 and "method=int4_weight_only needs a CUDA GPU" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "q").exists()


def test_bitdelta_stores_signs_and_scales_and_rebuilds_the_model(tmp_path, merged, lora_run):
    import math

    import numpy as np
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from ftctl.models.bitdelta import load_bitdelta

    base_path = json.loads((lora_run / "manifest.json").read_text())["model_path"]
    out = tmp_path / "bd"
    r = run_cli("quantize", f"model={merged}", "method=bitdelta", f"base={base_path}", f"output={out}",
                "data.limit=40", "eval_rows=4", "calibration_steps=2")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "compression" in r.stdout
    rep = json.loads((out / "ftctl-quantize.json").read_text())
    ft = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    # one bit per linear weight in the blocks, plus a scale each
    meta = json.loads((out / "bitdelta.json").read_text())
    n_bits = sum(math.prod(s) for s in meta["linears"].values())
    assert (out / "bitdelta.safetensors").stat().st_size < n_bits / 8 * 1.1 + 4096
    assert rep["compression"] == pytest.approx(rep["bytes_before"] / rep["bytes_after"], rel=0.01)
    # the rebuilt weights are base + scale x sign(fine-tune - base)
    name = "model.layers.0.self_attn.q_proj"
    t = load_file(str(out / "bitdelta.safetensors"))
    delta = ft.state_dict()[f"{name}.weight"] - base.state_dict()[f"{name}.weight"]
    bits = np.unpackbits(t[f"{name}.sign"].numpy())[:delta.numel()].reshape(delta.shape)
    assert (torch.from_numpy(bits).bool() == (delta >= 0)).all()
    rebuilt = load_bitdelta(out).state_dict()[f"{name}.weight"]
    scale = float(t[f"{name}.scale"])
    assert torch.allclose(rebuilt, base.state_dict()[f"{name}.weight"] + scale * (2 * (delta >= 0).float() - 1))
    # ftctl eval reads the folder like any model folder
    r = run_cli("eval", "perplexity", f"model={out}", "data.limit=40", "limit=2", f"output={tmp_path / 'ev'}")
    assert r.returncode == 0, r.stderr[-2000:]


def test_generate_and_chat_commands(tmp_path, lora_run):
    import subprocess
    import sys

    f = tmp_path / "prompts.txt"
    f.write_text("Write May 5, 2020 as YYYY-MM-DD.\nWrite 1 Jan 1999 as YYYY-MM-DD.\n")
    out = tmp_path / "gen.jsonl"
    r = run_cli("generate", f"run={lora_run}", f"prompts={f}", "max_new_tokens=3", f"output={out}")
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [json.loads(ln) for ln in out.read_text().splitlines()]
    assert [x["prompt"] for x in rows] == f.read_text().splitlines() and all("output" in x for x in rows)
    p = subprocess.run([sys.executable, "-m", "ftctl.cli", "chat", f"run={lora_run}", "max_new_tokens=3"],
                       input="hello\nand again\n", capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert len(p.stdout.splitlines()) == 2  # one streamed answer per user line
    r = run_cli("generate", f"run={lora_run}")
    assert r.returncode == 2 and 'needs prompt="..." or prompts=<file>' in r.stderr
    # a prompt is taken literally: no YAML reading of '#', ':' or brackets
    text = "#Person1#: Are you coming? [yes/no]\n#Person2#: No: busy."
    r = run_cli("generate", f"run={lora_run}", f"prompt={text}", "max_new_tokens=2", f"output={out}", "overwrite=true")
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(out.read_text().splitlines()[0])["prompt"] == text


def test_merge_overwrite_replaces_the_output_folder_whole(tmp_path, lora_run):
    from ftctl.core.errors import RunDirError
    from ftctl.post.merge import MergeConfig, merge

    foreign = tmp_path / "mine"  # a folder ftctl did not write is refused, even with overwrite=true
    foreign.mkdir()
    (foreign / "notes.txt").write_text("the user's")
    with pytest.raises(RunDirError, match="was not written by ftctl"):
        merge(MergeConfig(run=str(lora_run), output=str(foreign), overwrite=True), _console())
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]  # nothing touched
    out = tmp_path / "merged"
    merge(MergeConfig(run=str(lora_run), output=str(out)), _console())
    (out / "stale.txt").write_text("from before")
    with pytest.raises(RunDirError, match="already exists; choose another output= or pass overwrite=true"):
        merge(MergeConfig(run=str(lora_run), output=str(out)), _console())
    assert (out / "stale.txt").is_file()  # refused: nothing touched
    merge(MergeConfig(run=str(lora_run), output=str(out), overwrite=True), _console())
    assert (out / "config.json").is_file() and not (out / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged", "mine"]  # no temporary folder left beside it
