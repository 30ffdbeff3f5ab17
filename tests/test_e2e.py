"""End to end on the embedded SmolLM2-135M through the real CLI (slow: tens of seconds each)."""
import json

import pytest
from conftest import run_cli

pytestmark = pytest.mark.slow


def test_qlora_llama_recipe_end_to_end(tmp_path):
    out = tmp_path / "qlora"
    r = run_cli("train", "recipe=qlora_llama", "trainer.max_steps=3", "trainer.batch_size=2", "data.limit=40",
                "trainer.eval_every=0", "trainer.eval_max_rows=4", "trainer.log_every=1", f"output_dir={out}")
    assert r.returncode == 0, r.stderr[-3000:]
    man = json.loads((out / "manifest.json").read_text())
    assert man["status"] == "finished" and man["recipe"] == "qlora_llama"
    assert man["choices"]["quant"] == "nf4" and man["model_path"].endswith("smollm2-135m-instruct")
    assert [m["step"] for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in m] \
        == [1, 2, 3]
    assert "step 3/3" in r.stdout  # progress lines stay readable when stdout is not a terminal
    # the base really was 4-bit, and the adapter covers every linear layer of every block
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert set(cfg["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                           "down_proj"}
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(man["model_path"]), out / "adapter")
    assert any("lora_A" in n for n, _ in model.named_parameters())
    # 4-bit weights: far below the ~540 MB the float32 base takes
    assert man["base_memory_bytes"] < 300e6, man["base_memory_bytes"]
