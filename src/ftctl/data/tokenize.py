"""Tokenize (prompt, completion) pairs with a label mask, and pad batches. Pure functions."""
from __future__ import annotations

from dataclasses import dataclass, field

IGNORE_INDEX = -100


@dataclass
class TokenStats:
    rows: int = 0
    kept: int = 0
    dropped_too_long: int = 0
    truncated: int = 0
    dropped_no_target: int = 0
    tokens: int = 0
    target_tokens: int = 0
    examples: list = field(default_factory=list, repr=False)


def encode_pair(tokenizer, prompt: str, completion: str) -> tuple[list[int], list[int]]:
    """input_ids = prompt tokens + completion tokens + EOS; labels mask the prompt with -100.

    Prompt and completion are tokenized separately, so the prompt tokens are exactly those that
    generation is conditioned on at evaluation time.
    """
    p = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    c = tokenizer(completion, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        c = c + [tokenizer.eos_token_id]
    return p + c, [IGNORE_INDEX] * len(p) + c


def encode_rows(tokenizer, pairs, max_length: int, truncation: str = "drop", where: str = "data") -> TokenStats:
    """Encode every pair; rows longer than max_length are dropped, truncated or refused, and counted."""
    from ..errors import DataError

    st = TokenStats()
    for i, (prompt, completion) in enumerate(pairs):
        st.rows += 1
        ids, labels = encode_pair(tokenizer, prompt, completion)
        if len(ids) > max_length:
            if truncation == "error":
                raise DataError(f"{where}: row {i} has {len(ids)} tokens > data.max_length={max_length} "
                                "(raise data.max_length, or set data.truncation=drop|truncate)")
            if truncation == "drop":
                st.dropped_too_long += 1
                continue
            ids, labels = ids[:max_length], labels[:max_length]
            st.truncated += 1
        n_target = sum(1 for x in labels if x != IGNORE_INDEX)
        if n_target == 0:
            st.dropped_no_target += 1
            continue
        st.kept += 1
        st.tokens += len(ids)
        st.target_tokens += n_target
        st.examples.append({"input_ids": ids, "labels": labels})
    return st


def collate(examples: list[dict], pad_id: int, pad_to_multiple_of: int | None = None):
    """Right-pad a list of examples into tensors input_ids, attention_mask, labels."""
    import torch

    n = max(len(e["input_ids"]) for e in examples)
    if pad_to_multiple_of:
        n = -(-n // pad_to_multiple_of) * pad_to_multiple_of
    ids = torch.full((len(examples), n), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), n), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), n), dtype=torch.long)
    for i, e in enumerate(examples):
        k = len(e["input_ids"])
        ids[i, :k] = torch.tensor(e["input_ids"])
        labels[i, :k] = torch.tensor(e["labels"])
        mask[i, :k] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
