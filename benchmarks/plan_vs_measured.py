"""ftctl plan's peak-memory estimate against the measured peak of real runs.

    python benchmarks/plan_vs_measured.py --train outputs/plan-check   # train LoRA, QLoRA and full (2 steps each)
    python benchmarks/plan_vs_measured.py RUN_DIR [RUN_DIR ...]        # or compare runs you have

Each run is batch 4 x 256 packed tokens on the embedded SmolLM2-135M, so every batch is as long as the
plan assumes (data.max_length). Prints a Markdown table: estimate, measured, ratio.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

RUNS = {"LoRA r=16": ["recipe=lora_smollm2"], "QLoRA (nf4) r=16": ["recipe=qlora_llama"],
        "full fine-tune": ["recipe=full_smollm2"]}
COMMON = ["trainer.max_steps=2", "trainer.batch_size=4", "data.max_length=256", "data.packing=true",
          "trainer.eval_every=0", "trainer.save_every=0", "logging.plots=false", "overwrite=true"]


def main(argv: list[str]) -> int:
    from omegaconf import OmegaConf
    from rich.console import Console

    from ftctl.experiments import plan

    if argv[:1] == ["--train"]:
        root = Path(argv[1] if len(argv) > 1 else "outputs/plan-check")
        runs = []
        for i, (name, args) in enumerate(RUNS.items()):
            out = root / str(i)
            print(f"training {name} -> {out}", file=sys.stderr, flush=True)
            subprocess.run([sys.executable, "-m", "ftctl.cli", "train", *args, *COMMON, f"output_dir={out}"], check=True)
            runs.append((name, out))
    else:
        runs = [(Path(a).name, Path(a)) for a in argv]
    rows = []
    for name, run in runs:
        man = json.loads((run / "manifest.json").read_text())
        cfg = OmegaConf.load(run / "config.yaml")
        est = plan.estimate(cfg, plan.PlanConfig(device="cpu"))
        p = est["parts"]
        rows.append((name, est, p, man["peak_memory_bytes"]))
    gib = 2 ** 30
    print("| run | weights | grads + optimizer | activations + logits | runtime | estimate | measured (training loop RSS) | estimate / measured |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, est, p, measured in rows:
        print(f"| {name} | {p['weights'] / gib:.2f} | {(p['gradients'] + p['optimizer']) / gib:.2f} | "
              f"{(p['activations'] + p['logits']) / gib:.2f} | {p['runtime'] / gib:.2f} | {est['peak_bytes'] / gib:.2f} GiB | "
              f"{measured / gib:.2f} GiB | {est['peak_bytes'] / measured:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
