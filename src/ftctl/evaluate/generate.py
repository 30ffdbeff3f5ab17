"""Batched generation: left padding, the KV cache, greedy by default or sampling, stop strings."""
from __future__ import annotations


def cut_at_stop(text: str, stop: list[str]) -> str:
    """``text`` up to the first occurrence of any stop string."""
    cut = len(text)
    for s in stop:
        i = text.find(s)
        if s and i != -1:
            cut = min(cut, i)
    return text[:cut]


def generate(model, tokenizer, prompts: list[str], *, max_new_tokens: int = 32, batch_size: int = 16,
             do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
             stop: list[str] | None = None, seed: int = 0, add_special_tokens: bool = True,
             progress=None) -> list[str]:
    """Completions of ``prompts``. ``add_special_tokens`` as in training: true for plain templates (the
    tokenizer's BOS), false for prompts rendered by a chat template (which writes its own)."""
    import torch

    stop = [s for s in (stop or []) if s]
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    model.eval()
    kwargs = {"do_sample": do_sample}
    if do_sample:
        kwargs.update(temperature=temperature, top_p=top_p, top_k=top_k)
    else:  # greedy: clear sampling settings a model's generation_config may carry
        kwargs.update(temperature=None, top_p=None, top_k=None)
    if stop:
        kwargs.update(stop_strings=stop, tokenizer=tokenizer)
    try:
        # longest prompts first: batches hold similar lengths, so little compute goes to padding
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        results: dict[int, str] = {}
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            enc = tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True,
                            add_special_tokens=add_special_tokens).to(device)
            torch.manual_seed(seed + s)  # sampling is reproducible batch by batch
            with torch.no_grad():
                gen = model.generate(**enc, max_new_tokens=max_new_tokens, use_cache=True,
                                     pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                                     **kwargs)
            # a decoder-only model returns prompt + answer; an encoder-decoder, the answer alone
            new = gen if model.config.is_encoder_decoder else gen[:, enc["input_ids"].shape[1]:]
            texts = tokenizer.batch_decode(new, skip_special_tokens=True)
            for i, t in zip(idx, texts):
                results[i] = cut_at_stop(t, stop)
            if progress:
                progress(len(results))
        return [results[i] for i in range(len(prompts))]
    finally:
        tokenizer.padding_side = old_side
