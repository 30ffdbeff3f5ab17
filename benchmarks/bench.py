"""ftctl against TRL's `trl sft`, side by side on this machine (`make bench`).

    python benchmarks/bench.py [--rows 48] [--repeats 2] [--out outputs/bench] [--skip-trl] [--only train,...]

Training: the embedded SmolLM2-135M-Instruct, DialogSum rows from ../shared/data as chat prompt/completion
messages (rows whose chat fits in 512 tokens, so neither tool truncates), LoRA r=8 alpha=16 dropout 0 on all
linear layers, batch 4, max length 512, one epoch, lr 2e-4 decaying linearly without warm-up, float32, seed 42.
The two tools run alternately, ``--repeats`` times each, every run in a fresh process whose peak RSS is taken
from the kernel (getrusage of the waited child). TRL runs with OMP_NUM_THREADS set to the core count (its
faster setting: `trl sft` is otherwise single-threaded here), once with its default gradient checkpointing
and once without it; each ratio is taken against the peer's better figure. Both adapters are then scored
by this script's own loss evaluator (base + peft adapter, completion tokens of held-out rows), so the final
losses are comparable.

Also measured: data preparation (rows/s from the file to training-ready examples), CLI start-up, `ftctl merge`
against copying the model files, batched generation against one prompt at a time, and the machine's float32
matmul rate (for model FLOP utilisation, counted as 4 x parameters x real tokens for adapter training).

Writes OUT/results.json and OUT/results.md, and prints the tables.
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DIALOGSUM = ROOT.parent / "shared" / "data" / "dialogsum" / "dialogsum.test.jsonl"
VENV_BIN = Path(sys.executable).parent
CORES = os.cpu_count() or 1
SEED, LR, RANK, ALPHA, BATCH, MAX_LEN = 42, 2e-4, 8, 16, 4, 512
HELD_OUT = 32
PROMPT = "Summarize the following dialogue in one or two sentences.\n\n{dialogue}"


# ----------------------------------------------------------------------------- helpers
def run_measured(cmd: list[str], env: dict | None = None, log: Path | None = None, timeout: int = 3600) -> dict:
    """Run ``cmd`` in a fresh process; wall time, exit code, output, and the peak RSS of its process tree's
    largest process (the kernel's ru_maxrss of the waited child, read by a one-shot wrapper process)."""
    wrapper = ("import resource,subprocess,sys,json;"
               "r=subprocess.run(sys.argv[1:]);"
               "print('BENCH_RSS_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, flush=True);"
               "sys.exit(r.returncode)")
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", wrapper, *cmd], env=env, capture_output=True, text=True,
                       timeout=timeout)
    wall = time.perf_counter() - t0
    out = p.stdout + p.stderr
    if log:
        log.write_text(out)
    m = re.search(r"BENCH_RSS_KB (\d+)", out)
    if p.returncode != 0:
        tail = "\n".join(out.strip().splitlines()[-15:])
        raise SystemExit(f"bench: {' '.join(cmd[:3])} ... failed with status {p.returncode}:\n{tail}")
    return {"wall_s": wall, "peak_rss_bytes": int(m.group(1)) * 1024 if m else None, "output": out}


def thread_env(extra: dict | None = None) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(CORES), MKL_NUM_THREADS=str(CORES), TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_DISABLED="true",
               PYTHONUNBUFFERED="1")
    env.pop("RANK", None)
    env.update(extra or {})
    return env


def spread(values: list[float]) -> str:
    if len(values) < 2:
        return "-"
    return f"±{100 * (max(values) - min(values)) / 2 / statistics.mean(values):.1f}%"


# ----------------------------------------------------------------------------- data
def chat_row(r: dict) -> dict:
    """A DialogSum row as chat prompt/completion messages (both tools read this format)."""
    return {"prompt": [{"role": "user", "content": PROMPT.format(dialogue=r["dialogue"])}],
            "completion": [{"role": "assistant", "content": r["summary1"]}]}


def chat_ids(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> list[int]:
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def prepare_data(root: Path, rows: int, tokenizer) -> dict:
    """DialogSum as chat prompt/completion rows: the first ``rows`` that fit for training, the next
    HELD_OUT for the loss evaluation. Token counts come from the chat template, as both tools render it."""
    if not DIALOGSUM.is_file():
        raise SystemExit(f"bench: {DIALOGSUM} not found: the benchmark needs the shared DialogSum data")
    train, held, lengths = [], [], []
    for line in DIALOGSUM.read_text().splitlines():
        row = chat_row(json.loads(line))
        n = len(chat_ids(tokenizer, row["prompt"] + row["completion"]))
        if n > MAX_LEN - 8:  # leave room for an EOS a tool may add
            continue
        if len(train) < rows:
            train.append(row)
            lengths.append(n)
        elif len(held) < HELD_OUT:
            held.append(row)
        else:
            break
    data = root / "data"
    data.mkdir(parents=True, exist_ok=True)
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
    (root / "held_out.jsonl").write_text("".join(json.dumps(r) + "\n" for r in held))
    padded = sum(max(lengths[i:i + BATCH]) * len(lengths[i:i + BATCH]) for i in range(0, len(lengths), BATCH))
    return {"train_rows": len(train), "held_out_rows": len(held), "real_tokens": sum(lengths),
            "mean_tokens": sum(lengths) / len(lengths), "max_tokens": max(lengths),
            "fill_in_file_order": sum(lengths) / padded, "dir": str(data), "file": str(data / "train.jsonl")}


# ----------------------------------------------------------------------------- the two tools
def ftctl_train_args(data: dict, out: Path, extra: list[str]) -> list[str]:
    """The benchmark's settings; ``extra`` overrides (key=value) replace the ones they name."""
    keys = {e.split("=", 1)[0] for e in extra}
    return [a for a in _FTCTL_BASE(data, out) if a.split("=", 1)[0] not in keys] + list(extra)


def _FTCTL_BASE(data: dict, out: Path) -> list[str]:
    return ["model=smollm2_135m", "template=chat", f"data.path={data['file']}", "data.name=bench_dialogsum",
            "data.val_fraction=0", f"data.max_length={MAX_LEN}", "precision=fp32", "peft=lora", f"peft.r={RANK}",
            f"peft.alpha={ALPHA}", "peft.dropout=0", "peft.target_modules=all-linear",
            f"trainer.batch_size={BATCH}", "trainer.epochs=1", f"trainer.lr={LR}", "trainer.scheduler=linear",
            "trainer.warmup_steps=0", "trainer.eval_every=0", "trainer.save_every=0", "trainer.log_every=1",
            f"seed={SEED}", "logging.plots=false", f"output_dir={out}", "overwrite=true"]


def run_ftctl(data: dict, out: Path, extra: list[str]) -> dict:
    from ftctl.rundir import read_metrics

    res = run_measured([str(VENV_BIN / "ftctl"), "train", *ftctl_train_args(data, out, extra)], env=thread_env(),
                       log=out.parent / f"{out.name}.log")
    man = json.loads((out / "manifest.json").read_text())
    steps = [r for r in read_metrics(out) if "loss" in r]
    return {**res, "train_s": man["train_time_s"], "tokens": steps[-1]["tokens"], "steps": man["total_steps"],
            "train_loss": [r["loss"] for r in steps], "adapter": str(out / "adapter")}


def run_trl(data: dict, model_dir: str, out: Path, checkpointing: bool, precision: str) -> dict:
    cmd = [str(VENV_BIN / "trl"), "sft", "--model_name_or_path", model_dir, "--dataset_name", data["dir"],
           "--output_dir", str(out), "--use_peft", "--lora_r", str(RANK), "--lora_alpha", str(ALPHA),
           "--lora_dropout", "0", "--lora_target_modules", "all-linear", "--per_device_train_batch_size", str(BATCH),
           "--max_length", str(MAX_LEN), "--num_train_epochs", "1", "--learning_rate", str(LR),
           "--lr_scheduler_type", "linear", "--warmup_steps", "0", "--bf16", str(precision == "bf16"), "--dtype", "float32",
           "--logging_steps", "1", "--save_strategy", "no", "--report_to", "none", "--seed", str(SEED),
           "--disable_tqdm", "True", "--gradient_checkpointing", str(checkpointing)]
    if not _cuda():
        cmd += ["--use_cpu", "True"]  # transformers refuses bf16 without it on a machine with no GPU
    if out.exists():
        shutil.rmtree(out)
    res = run_measured(cmd, env=thread_env(), log=out.parent / f"{out.name}.log")
    logs = []
    for line in res["output"].splitlines():
        line = line.strip()
        if line.startswith("{") and ("'loss'" in line or "'train_runtime'" in line):
            try:
                logs.append(ast.literal_eval(line))
            except (ValueError, SyntaxError):
                pass
    steps = [d for d in logs if "loss" in d]
    final = next(d for d in logs if "train_runtime" in d)
    return {**res, "train_s": float(final["train_runtime"]), "tokens": int(float(steps[-1]["num_tokens"])),
            "steps": len(steps), "train_loss": [float(d["loss"]) for d in steps], "adapter": str(out)}


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


# ----------------------------------------------------------------------------- the common loss evaluator
def held_out_loss(model_dir: str, adapter: str, held: Path) -> float:
    """Mean cross-entropy on the completion tokens of the held-out rows, base model + adapter (peft)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, adapter).eval()
    total, count = 0.0, 0
    for line in held.read_text().splitlines():
        r = json.loads(line)
        p = chat_ids(tok, r["prompt"], add_generation_prompt=True)
        f = chat_ids(tok, r["prompt"] + r["completion"])
        ids = torch.tensor([f])
        labels = ids.clone()
        labels[0, :len(p)] = -100
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, :-1].float()
        tgt = labels[0, 1:]
        keep = tgt != -100
        total += float(torch.nn.functional.cross_entropy(logits[keep], tgt[keep], reduction="sum"))
        count += int(keep.sum())
    return total / count


# ----------------------------------------------------------------------------- the other measurements
def matmul_rate(n: int = 2048, reps: int = 10, dtype: str = "float32") -> float:
    """Best matmul FLOP/s of an n x n by n x n product on all cores."""
    import torch

    torch.set_num_threads(CORES)
    a, b = torch.randn(n, n, dtype=getattr(torch, dtype)), torch.randn(n, n, dtype=getattr(torch, dtype))
    for _ in range(3):
        a @ b
    best = 0.0
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        best = max(best, 2 * n ** 3 / (time.perf_counter() - t0))
    return best


def startup(repeats: int = 5) -> dict:
    res = {}
    for name, cmd in {"ftctl --help": [str(VENV_BIN / "ftctl"), "--help"],
                      "ftctl train recipe=qlora_llama --cfg job": [str(VENV_BIN / "ftctl"), "train",
                                                                   "recipe=qlora_llama", "--cfg", "job"],
                      "trl sft --help (peer)": [str(VENV_BIN / "trl"), "sft", "--help"]}.items():
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            subprocess.run(cmd, capture_output=True, check=True, env=thread_env())
            times.append(time.perf_counter() - t0)
        res[name] = {"median_s": statistics.median(times), "min_s": min(times)}
    return res


def data_prep(data: dict, repeats: int = 3) -> dict:
    """Rows/s from the file to training-ready (tokenized, masked, batched) examples, cold and cached."""
    from ftctl.models import load as models
    from ftctl.config.compose import compose
    from ftctl.data import pipeline
    from ftctl.data.tokenize import collate

    tok = models.load_tokenizer(models.resolve("builtin:smollm2_135m"))
    full = Path(data["dir"]).parent / "prep.jsonl"  # every DialogSum row, as chat
    rows = [chat_row(json.loads(line)) for line in DIALOGSUM.read_text().splitlines()]
    full.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = {}
    for label, cache in (("cold (tokenize)", False), ("cached", True)):
        times = []
        for _ in range(repeats):
            cfg, _ = compose("train", ["template=chat", f"data.path={full}", "data.name=prep", "data.val_fraction=0",
                                       f"data.max_length={MAX_LEN}", "data.overlong=drop",
                                       f"data.cache={str(cache).lower()}"])
            t0 = time.perf_counter()
            bundle = pipeline.build(cfg, tok)
            ex = bundle.train.examples
            for i in range(0, len(ex), BATCH):
                collate(ex[i:i + BATCH], tok.pad_token_id)
            times.append(time.perf_counter() - t0)
        out[label] = {"rows": len(rows), "rows_per_s": len(rows) / statistics.median(times)}
    return out


def merge_vs_copy(model_dir: str, run: Path, root: Path) -> dict:
    merged = root / "merged"
    if merged.exists():
        shutil.rmtree(merged)
    res = run_measured([str(VENV_BIN / "ftctl"), "merge", f"run={run}", f"output={merged}"], env=thread_env())
    copy = root / "copy"
    if copy.exists():
        shutil.rmtree(copy)
    t0 = time.perf_counter()
    shutil.copytree(model_dir, copy)
    os.sync()
    floor = time.perf_counter() - t0
    size = sum(f.stat().st_size for f in Path(model_dir).rglob("*") if f.is_file())
    # the process start-up (Python, torch, transformers imports) is part of the merge command's time
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch, transformers, peft"], check=True, env=thread_env())
    imports = time.perf_counter() - t0
    return {"merge_s": res["wall_s"], "copy_s": floor, "imports_s": imports, "model_bytes": size,
            "merge_peak_rss_bytes": res["peak_rss_bytes"]}


def generation(model_dir: str, data: dict, n: int = 16, max_new_tokens: int = 32) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from ftctl.models import load as models
    from ftctl.evaluate.generate import generate

    torch.set_num_threads(CORES)
    tok = models.load_tokenizer(Path(model_dir))
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    rows = [json.loads(x) for x in (Path(data["dir"]).parent / "held_out.jsonl").read_text().splitlines()][:n]
    prompts = [tok.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=False) for r in rows]
    out = {}
    for label, bs in (("batched (16)", n), ("one at a time", 1)):
        t0 = time.perf_counter()
        texts = generate(model, tok, prompts, max_new_tokens=max_new_tokens, batch_size=bs, add_special_tokens=False)
        dt = time.perf_counter() - t0
        toks = sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts)
        out[label] = {"s": dt, "tokens": toks, "tokens_per_s": toks / dt, "texts": texts}
    # the floor that batching cannot lower: one forward pass over every prompt (the prefill's compute)
    t0 = time.perf_counter()
    with torch.no_grad():
        for p in prompts:
            model(**tok(p, return_tensors="pt", add_special_tokens=False), use_cache=False, logits_to_keep=1)
    out["prefill_s"] = time.perf_counter() - t0
    same = sum(a == b for a, b in zip(out["batched (16)"]["texts"], out["one at a time"]["texts"]))
    for v in out.values():
        if isinstance(v, dict):
            v.pop("texts")
    out["same_text"] = f"{same}/{n}"
    return out


# each optimisation of issue 10 added in turn to the state before it (ftctl only, same data)
ABLATION = [
    ("before: full logits, random batches", ["precision=fp32", "trainer.logits=all", "data.group_by_length=false"]),
    ("+ length-grouped batches", ["precision=fp32", "trainer.logits=all"]),
    ("+ logits at the targets only (the defaults)", ["precision=fp32"]),
    ("+ trainer.cpu_allocator=default", ["precision=fp32", "trainer.cpu_allocator=default"]),
    ("+ precision=bf16", ["precision=bf16", "trainer.cpu_allocator=default"]),
    # the memory end of the trade-off, from the defaults
    ("defaults + trainer.gradient_checkpointing=true", ["precision=fp32", "trainer.gradient_checkpointing=true"]),
    ("defaults + precision=bf16 + gradient checkpointing", ["precision=bf16", "trainer.gradient_checkpointing=true"]),
]


def ablation(data: dict, root: Path, repeats: int, model_dir: str) -> list[dict]:
    rows = []
    for k, (label, extra) in enumerate(ABLATION):
        runs = []
        for i in range(repeats):
            r = run_ftctl(data, root / f"ablation-{k}-{i}", extra)
            r.pop("output")
            runs.append(r)
            print(f"  ablation {label} run {i + 1}: {r['tokens'] / r['train_s']:.1f} tokens/s, "
                  f"peak RSS {r['peak_rss_bytes'] / 2**30:.2f} GiB", flush=True)
        rows.append({"label": label, "args": extra,
                     "tokens_per_s": statistics.median(r["tokens"] / r["train_s"] for r in runs),
                     "spread": spread([r["tokens"] / r["train_s"] for r in runs]),
                     "peak_rss_bytes": statistics.median(r["peak_rss_bytes"] for r in runs),
                     "train_loss": runs[0]["train_loss"][-1], "wall_s": statistics.median(r["wall_s"] for r in runs),
                     "held_out_loss": held_out_loss(model_dir, runs[0]["adapter"], root / "held_out.jsonl")})
    return rows


# ----------------------------------------------------------------------------- main
def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=32, help="DialogSum training rows (one epoch; rows / 4 steps)")
    ap.add_argument("--repeats", type=int, default=2, help="runs of each tool (alternating)")
    ap.add_argument("--out", default="outputs/bench")
    ap.add_argument("--skip-trl", action="store_true", help="ftctl only (no peer, no ratios)")
    ap.add_argument("--no-trl-checkpointing-variant", action="store_true",
                    help="run TRL only with its default gradient checkpointing")
    ap.add_argument("--precision", default="fp32,bf16",
                    help="training precisions, each run by both tools: fp32 and/or bf16 (autocast; TRL's default)")
    ap.add_argument("--only", default="train,ablation,startup,prep,merge,generate",
                    help="comma-separated sections: train, ablation, startup, prep, merge, generate")
    ap.add_argument("--ftctl-args", default="", help="extra ftctl overrides, space-separated (for before/after)")
    args = ap.parse_args(argv)
    sections = set(args.only.split(","))
    root = Path(args.out).resolve()
    root.mkdir(parents=True, exist_ok=True)

    import torch

    from ftctl.models import load as models

    model_dir = str(models.resolve("builtin:smollm2_135m"))
    tok = models.load_tokenizer(Path(model_dir))
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        n_params = sum(p.numel() for p in AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir)).parameters())
    data = prepare_data(root, args.rows, tok)
    rate = matmul_rate()
    results: dict = {"machine": {"cores": CORES, "torch": torch.__version__, "cpu": _cpu_name(),
                                 "fp32_matmul_flops": rate, "bf16_matmul_flops": matmul_rate(dtype="bfloat16")},
                     "data": {k: v for k, v in data.items() if k not in ("dir", "file")}, "params": n_params,
                     "settings": {"rank": RANK, "alpha": ALPHA, "batch": BATCH, "max_length": MAX_LEN, "lr": LR,
                                  "rows": data["train_rows"]}}
    earlier = root / "results.json"
    if earlier.is_file():  # a partial re-run (--only) keeps the other sections of the same benchmark
        before = json.loads(earlier.read_text())
        if before.get("settings") == results["settings"]:
            results = before  # its machine figures (the matmul rates of its training runs) included
    print(f"machine: {CORES} cores, float32 matmul {rate / 1e9:.1f} GFLOP/s; data: {data['train_rows']} DialogSum "
          f"rows, {data['real_tokens']} real tokens (mean {data['mean_tokens']:.0f}, max {data['max_tokens']})",
          flush=True)

    if "train" in sections:
        held = root / "held_out.jsonl"
        results["base_held_out_loss"] = _base_loss(model_dir, held)
        results["train"] = {}
        extra = args.ftctl_args.split()
        for precision in args.precision.split(","):
            p = [f"precision={precision}"]
            # ftctl's defaults, and its faster CPU allocator setting (trainer.cpu_allocator=default)
            tools = {"ftctl": lambda i, p=p: run_ftctl(data, root / f"{p[0][10:]}-ftctl-{i}", p + extra),
                     "ftctl (cpu_allocator=default)": lambda i, p=p: run_ftctl(
                         data, root / f"{p[0][10:]}-ftctl-alloc-{i}", p + ["trainer.cpu_allocator=default"] + extra)}
            if not args.skip_trl:
                tools["trl (checkpointing, its default)"] = lambda i, pr=precision: run_trl(
                    data, model_dir, root / f"{pr}-trl-gc-{i}", True, pr)
                if not args.no_trl_checkpointing_variant:
                    tools["trl (no checkpointing)"] = lambda i, pr=precision: run_trl(
                        data, model_dir, root / f"{pr}-trl-nogc-{i}", False, pr)
            runs: dict[str, list[dict]] = {k: [] for k in tools}
            for i in range(args.repeats):
                for name, fn in tools.items():
                    r = fn(i)
                    r.pop("output")
                    r["tokens_per_s"] = r["tokens"] / r["train_s"]
                    runs[name].append(r)
                    print(f"  {precision} {name} run {i + 1}: {r['tokens']} tokens in {r['train_s']:.1f} s "
                          f"({r['tokens_per_s']:.1f} tokens/s), wall {r['wall_s']:.1f} s, peak RSS "
                          f"{r['peak_rss_bytes'] / 2**30:.2f} GiB, last loss {r['train_loss'][-1]:.4f}", flush=True)
            for name, rs in runs.items():
                rs[0]["held_out_loss"] = held_out_loss(model_dir, rs[0]["adapter"], held)
            results["train"][precision] = runs
            print(f"  {precision} held-out loss: base {results['base_held_out_loss']:.4f}, " + ", ".join(
                f"{k} {v[0]['held_out_loss']:.4f}" for k, v in runs.items()), flush=True)
            (root / "results.json").write_text(json.dumps(results, indent=2, default=str))
    if "ablation" in sections:
        results["ablation"] = ablation(data, root, args.repeats, model_dir)
    if "startup" in sections:
        results["startup"] = startup()
    if "prep" in sections:
        results["prep"] = data_prep(data)
    merge_run = root / f"{args.precision.split(',')[0]}-ftctl-0"
    if "merge" in sections and (merge_run / "adapter").is_dir():
        results["merge"] = merge_vs_copy(model_dir, merge_run, root)
    if "generate" in sections:
        results["generate"] = generation(model_dir, data)
    (root / "results.json").write_text(json.dumps(results, indent=2, default=str))
    md = report(results)
    (root / "results.md").write_text(md)
    print(md)
    return 0


def _base_loss(model_dir: str, held: Path) -> float:
    """The base model's held-out loss (an adapter that does nothing: LoRA B starts at zero)."""
    import tempfile

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as d:
        m = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
                           LoraConfig(r=RANK, target_modules="all-linear"))
        m.save_pretrained(d)
        return held_out_loss(model_dir, d, held)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "?"


def report(res: dict) -> str:
    lines = [f"machine: {res['machine']['cores']} cores ({res['machine']['cpu']}), torch {res['machine']['torch']}, "
             f"matmul (2048 x 2048) float32 {res['machine']['fp32_matmul_flops'] / 1e9:.1f} GFLOP/s, bfloat16 "
             f"{res['machine']['bf16_matmul_flops'] / 1e9:.1f} GFLOP/s", ""]
    params = res["params"]
    for precision, runs in res.get("train", {}).items():
        s = res["settings"]
        rate = res["machine"]["bf16_matmul_flops" if precision == "bf16" else "fp32_matmul_flops"]
        lines += [f"## Training, {precision}: LoRA r={s['rank']} all-linear, batch {s['batch']}, max length "
                  f"{s['max_length']}, {s['rows']} DialogSum chat rows (one epoch)", "",
                  "| tool | real tokens/s | spread | train loop s | wall s | peak RSS GiB | MFU | steps | "
                  "held-out loss |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        summary = {}
        for name, rs in runs.items():
            tps = [r["tokens_per_s"] for r in rs]
            med = {"tps": statistics.median(tps), "train_s": statistics.median(r["train_s"] for r in rs),
                   "wall": statistics.median(r["wall_s"] for r in rs),
                   "rss": statistics.median(r["peak_rss_bytes"] for r in rs), "loss": rs[0]["held_out_loss"]}
            summary[name] = med
            mfu = 4 * params * med["tps"] / rate
            lines.append(f"| {name} | {med['tps']:.1f} | {spread(tps)} | {med['train_s']:.1f} | {med['wall']:.1f} | "
                         f"{med['rss'] / 2**30:.2f} | {100 * mfu:.1f}% | {rs[0]['steps']} | {med['loss']:.4f} |")
        lines.append(f"\nbase model's held-out loss: {res['base_held_out_loss']:.4f}; MFU: 4 x {params / 1e6:.1f} M "
                     f"parameters x real tokens/s over the {precision} matmul rate")
        peers = {k: v for k, v in summary.items() if not k.startswith("ftctl")}
        if not peers:
            continue
        best_tps = max(peers.items(), key=lambda kv: kv[1]["tps"])
        best_rss = min(peers.items(), key=lambda kv: kv[1]["rss"])
        best_wall = min(peers.items(), key=lambda kv: kv[1]["wall"])
        lines += ["", f"| {precision}: ftctl / the peer's best | " + " | ".join(
                      k for k in summary if k.startswith("ftctl")) + " | peer run | target |",
                  "|---|" + "---:|" * sum(k.startswith("ftctl") for k in summary) + "---|---|"]
        mine = [v for k, v in summary.items() if k.startswith("ftctl")]
        lines += [f"| real tokens/s | " + " | ".join(f"{f['tps'] / best_tps[1]['tps']:.2f}x" for f in mine)
                  + f" | {best_tps[0]} | >= 4x |",
                  f"| peak RSS | " + " | ".join(f"{f['rss'] / best_rss[1]['rss']:.2f}x" for f in mine)
                  + f" | {best_rss[0]} | <= 0.6x |",
                  f"| wall time | " + " | ".join(f"{f['wall'] / best_wall[1]['wall']:.2f}x" for f in mine)
                  + f" | {best_wall[0]} | |",
                  f"| held-out loss | " + " | ".join(f"{f['loss']:.4f}" for f in mine)
                  + f" | {best_tps[0]}: {best_tps[1]['loss']:.4f} | equal within noise |",
                  f"| MFU | " + " | ".join(f"{100 * 4 * params * f['tps'] / rate:.1f}%" for f in mine) + " | | >= 50% |"]
    if "ablation" in res:
        base = res["ablation"][0]
        lines += ["", "## What each optimisation bought (ftctl, the same job, each step added to the one above)", "",
                  "| configuration | real tokens/s | spread | vs before | peak RSS GiB | wall s | last train loss | "
                  "held-out loss |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for a in res["ablation"]:
            lines.append(f"| {a['label']} | {a['tokens_per_s']:.1f} | {a['spread']} | "
                         f"{a['tokens_per_s'] / base['tokens_per_s']:.2f}x | {a['peak_rss_bytes'] / 2**30:.2f} | "
                         f"{a['wall_s']:.1f} | {a['train_loss']:.4f} | {a['held_out_loss']:.4f} |")
    if "startup" in res:
        lines += ["", "## CLI start-up (median of 5)", "", "| command | median s | min s | target |", "|---|---:|---:|---|"]
        targets = {"ftctl --help": "< 0.5 s", "ftctl train recipe=qlora_llama --cfg job": "< 2 s"}
        for k, v in res["startup"].items():
            lines.append(f"| `{k}` | {v['median_s']:.3f} | {v['min_s']:.3f} | {targets.get(k, '')} |")
    if "prep" in res:
        lines += ["", "## Data preparation (DialogSum, all rows, chat template, to collated batches)", "",
                  "| pass | rows | rows/s |", "|---|---:|---:|"]
        for k, v in res["prep"].items():
            lines.append(f"| {k} | {v['rows']} | {v['rows_per_s']:.0f} |")
    if "merge" in res:
        m = res["merge"]
        lines += ["", "## Merge", "", "| step | s |", "|---|---:|",
                  f"| `ftctl merge` (whole command) | {m['merge_s']:.2f} |",
                  f"| copying the model files ({m['model_bytes'] / 2**20:.0f} MiB), the floor | {m['copy_s']:.2f} |",
                  f"| importing torch, transformers, peft (part of any command) | {m['imports_s']:.2f} |",
                  f"| ratio merge / copy | {m['merge_s'] / max(m['copy_s'], 1e-9):.1f}x |"]
    if "generate" in res:
        g = res["generate"]
        b, o = g["batched (16)"], g["one at a time"]
        lines += ["", "## Generation (16 DialogSum prompts, 32 new tokens, greedy)", "",
                  "| mode | s | tokens | tokens/s |", "|---|---:|---:|---:|",
                  f"| batched (16) | {b['s']:.1f} | {b['tokens']} | {b['tokens_per_s']:.1f} |",
                  f"| one at a time | {o['s']:.1f} | {o['tokens']} | {o['tokens_per_s']:.1f} |",
                  f"| prefill alone (one forward pass per prompt, no new tokens) | {g['prefill_s']:.1f} | | |",
                  f"| ratio batched / one at a time | {b['tokens_per_s'] / o['tokens_per_s']:.1f}x | same text: "
                  f"{g['same_text']} | target >= 4x |"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
