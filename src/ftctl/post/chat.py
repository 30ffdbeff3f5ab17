"""`ftctl chat` (talk to a tuned model in the terminal, streaming) and `ftctl generate` (one prompt, or
a file of prompts). A prompt is wrapped the way the run was trained, by the run's template
(``ftctl.data.templates``: ``inference_prompt``, the prompt of a training row that asks it): the chat
template for chat runs, the Alpaca prompt for Alpaca runs, the text as is for plain preference and
completion runs (``raw=true`` always sends it as is)."""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ftctl.core.atomic import atomic_write_text, output_file
from ftctl.core.console import printable
from ftctl.core.device import pick_device
from ftctl.core.errors import ConfigError, RunDirError
from ftctl.core.registry import TEMPLATES
from ftctl.data.templates import Context, from_config
from ftctl.evaluate.generate import generate
from ftctl.models import load as models
from ftctl.rundir import load_folder, open_run


@dataclass
class GenerateConfig:
    run: Optional[str] = None
    model: Optional[str] = None  # a model folder instead of a run
    prompt: Optional[str] = None
    prompts: Optional[str] = None  # a file: one prompt per line (.txt) or {"prompt": ...} per line (.jsonl)
    output: Optional[str] = None  # generate: write {"prompt", "output"} lines here (default: print)
    overwrite: bool = False  # generate: replace an existing output= file
    system: Optional[str] = None
    raw: bool = False
    max_new_tokens: int = 256
    do_sample: bool = False
    temperature: float = 0.7
    top_p: float = 0.9
    seed: int = 0
    batch_size: int = 8
    trust_remote_code: bool = False  # run=: run the model folder's Python code (never taken from the run's config)


def _load(gcfg: GenerateConfig):
    """(model, tokenizer, template, context) for a run directory or a model folder: the template the run
    trained with (a model folder: its tokenizer's chat template, or the text as is)."""

    if bool(gcfg.run) == bool(gcfg.model):
        raise ConfigError("give run=<run directory> or model=<model folder>")
    device = pick_device()
    if gcfg.model:
        folder = Path(gcfg.model).expanduser()
        if not (folder / "config.json").is_file():
            raise ConfigError(f"model={folder}: not a model folder (no config.json)")
        tok = models.load_tokenizer(folder)
        template = TEMPLATES.get("chat" if tok.chat_template else "completion")
        return load_folder(folder, device), tok, template, Context(tokenizer=tok)
    run = open_run(gcfg.run, trust_remote_code=gcfg.trust_remote_code)
    tok = run.tokenizer()
    template, ctx = from_config(run.config, tok)
    return run.load_model(device), tok, template, ctx


def _prompts(gcfg: GenerateConfig) -> list[str]:
    if bool(gcfg.prompt) == bool(gcfg.prompts):
        raise ConfigError("generate needs prompt=\"...\" or prompts=<file>")
    if gcfg.prompt:
        return [gcfg.prompt]
    f = Path(gcfg.prompts).expanduser()
    if not f.is_file():
        raise ConfigError(f"prompts={f}: no such file")
    out = []
    for n, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        if f.suffix == ".jsonl":
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{f}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
                raise ConfigError(f"{f}:{n}: each line needs a string field 'prompt'")
            out.append(row["prompt"])
        else:
            out.append(line)
    if not out:
        raise ConfigError(f"prompts={f}: no prompts in the file")
    return out


def _output(gcfg: GenerateConfig) -> Path | None:
    """output=, checked before the model loads (core.atomic.output_file)."""
    return output_file(gcfg.output, gcfg.overwrite, "generations.jsonl")


def _write(out: Path, prompts: list[str], outs: list[str]) -> None:
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out, "".join(json.dumps({"prompt": p, "output": o}, ensure_ascii=False) + "\n"
                                       for p, o in zip(prompts, outs)))
    except OSError as e:
        raise RunDirError(f"output={out}: cannot write there ({e.filename or out.parent}: {e.strerror or e})") from None


def generate_cmd(gcfg: GenerateConfig, console) -> list[str]:
    """Generate for prompt= or each line of prompts=: print the answers (control characters shown escaped, as
    \\x1b), or write them to output=."""
    prompts = _prompts(gcfg)
    out = _output(gcfg)
    model, tok, template, ctx = _load(gcfg)
    texts = [p if gcfg.raw else template.inference_prompt(p, ctx, gcfg.system) for p in prompts]
    outs = generate(model, tok, texts, max_new_tokens=gcfg.max_new_tokens, batch_size=gcfg.batch_size,
                    do_sample=gcfg.do_sample, temperature=gcfg.temperature, top_p=gcfg.top_p, seed=gcfg.seed,
                    add_special_tokens=gcfg.raw or template.plain(ctx))
    if out is not None:
        _write(out, prompts, outs)
        console.print(f"wrote {len(outs)} generations to {out}", highlight=False, markup=False)
    else:
        for o in outs:
            print(printable(o.strip()), flush=True)
    return outs


def chat_cmd(gcfg: GenerateConfig, console) -> None:
    """Read a user turn per line (a terminal prompt, or lines piped in), stream each answer."""
    import threading

    import torch
    from transformers import TextIteratorStreamer

    model, tok, template, ctx = _load(gcfg)
    model.eval()
    device = next(model.parameters()).device
    history: list[dict] = []
    interactive = sys.stdin.isatty()
    if interactive:
        console.print("[dim]chatting with the tuned model; an empty line or /exit ends, /reset forgets[/]")
    while True:
        try:
            line = input("you> " if interactive else "")
        except EOFError:
            break
        if line.strip() in ("/exit", "/quit") or (interactive and not line.strip()):
            break
        if line.strip() == "/reset":
            history = []
            continue
        if not line.strip():
            continue
        text = template.inference_prompt(line, ctx, gcfg.system, history)
        enc = tok(text, return_tensors="pt", add_special_tokens=template.plain(ctx)).to(device)
        streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
        kwargs = dict(**enc, max_new_tokens=gcfg.max_new_tokens, streamer=streamer, do_sample=gcfg.do_sample,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        if gcfg.do_sample:
            kwargs.update(temperature=gcfg.temperature, top_p=gcfg.top_p)
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        torch.manual_seed(gcfg.seed)
        worker = threading.Thread(target=lambda: model.generate(**kwargs), daemon=True)
        worker.start()
        answer = []
        print("model> " if interactive else "", end="", flush=True)
        for piece in streamer:
            answer.append(piece)
            print(printable(piece), end="", flush=True)  # control characters shown escaped (\x1b)
        worker.join()
        print(flush=True)
        history += [{"role": "user", "content": line}, {"role": "assistant", "content": "".join(answer).strip()}]
