"""Batched greedy generation with left padding and the KV cache."""
from __future__ import annotations


def generate(model, tokenizer, prompts: list[str], *, max_new_tokens: int = 32, batch_size: int = 16,
             progress=None) -> list[str]:
    import torch

    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    out: list[str] = []
    model.eval()
    try:
        # longest prompts first: batches hold similar lengths, so little compute goes to padding
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        results: dict[int, str] = {}
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            enc = tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True).to(device)
            with torch.no_grad():
                gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                                     pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            texts = tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            for i, t in zip(idx, texts):
                results[i] = t
            if progress:
                progress(len(results))
        out = [results[i] for i in range(len(prompts))]
    finally:
        tokenizer.padding_side = old_side
    return out
