"""Rendered rows -> token ids with a label mask; packing; batches. Pure functions."""
from __future__ import annotations

import bisect

from ftctl.data.templates import Rendered, Segment

IGNORE_INDEX = -100
TRAIN_ON = ("completion", "all", "assistant", "last")


def is_trained(seg: Segment, train_on: str) -> bool:
    if train_on == "all":
        return True
    if train_on == "completion":
        return seg.target
    if train_on == "assistant":
        return seg.assistant
    if train_on == "last":
        return seg.last
    raise ValueError(f"data.train_on={train_on!r}; allowed: {', '.join(TRAIN_ON)}")


def encode(tokenizer, rendered: Rendered, train_on: str = "completion") -> tuple[list[int], list[int]]:
    """input_ids and labels (-100 where not trained) for a rendered row.

    The prompt's tokens are exactly those of the prompt tokenized alone (what generation is conditioned
    on at evaluation). Plain templates get the tokenizer's special tokens (BOS) at the start and an EOS
    after the answer; chat templates write their own.
    """
    ids: list[int] = []
    labels: list[int] = []
    last_trained = False
    text = ""
    for seg in rendered.segments:
        if not seg.text:
            continue
        text += seg.text
        # the text so far, tokenized whole: where that extends the tokens so far, the new segment's tokens
        # are exactly what tokenizing the full text gives (SentencePiece tokenizers would add a word-start
        # marker to a segment tokenized on its own); otherwise the segment is tokenized by itself
        whole = tokenizer(text, add_special_tokens=rendered.plain)["input_ids"]
        if whole[:len(ids)] == ids:
            toks = whole[len(ids):]
        else:
            toks = tokenizer(seg.text, add_special_tokens=False)["input_ids"]
        last_trained = is_trained(seg, train_on)
        ids += toks
        labels += toks if last_trained else [IGNORE_INDEX] * len(toks)
    if rendered.plain and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
        labels.append(tokenizer.eos_token_id if last_trained else IGNORE_INDEX)
    return ids, labels


def encode_seq2seq(tokenizer, rendered: Rendered) -> tuple[list[int], list[int]]:
    """model.kind=seq2seq: the source (the prompt, with the tokenizer's special tokens: T5 ends it with
    </s>) and the labels (the target's tokens, then EOS), two separate sequences."""
    target = "".join(s.text for s in rendered.segments if s.target)
    source = "".join(s.text for s in rendered.segments if not s.target)
    src = tokenizer(source, add_special_tokens=True)["input_ids"]
    tgt = tokenizer(target, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None and (not tgt or tgt[-1] != tokenizer.eos_token_id):
        tgt = tgt + [tokenizer.eos_token_id]
    return src, tgt


def encode_pair(tokenizer, prompt: str, completion: str) -> tuple[list[int], list[int]]:
    """A prompt/completion pair, trained on the completion and EOS."""
    return encode(tokenizer, Rendered([Segment(prompt), Segment(completion, target=True, assistant=True, last=True)],
                                      prompt=prompt, reference=completion))


def n_trained(labels: list[int]) -> int:
    """Labels the loss sees: the first position is never predicted (nothing comes before it)."""
    return sum(1 for x in labels[1:] if x != IGNORE_INDEX)


# ----------------------------------------------------------------------------- packing
def pack(lengths: list[int], max_length: int) -> list[list[int]]:
    """Best-fit decreasing: example indices grouped into rows of at most max_length tokens."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, bin number), sorted
    for i in order:
        n = lengths[i]
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            room, b = free.pop(k)
            bins[b].append(i)
            bisect.insort(free, (room - n, b))
        else:
            bins.append([i])
            bisect.insort(free, (max_length - n, len(bins) - 1))
    return bins


def packed_row(examples: list[dict]) -> dict:
    """Concatenate examples; position ids restart at each one, which makes the attention block-diagonal
    (transformers builds the mask from the position ids when no attention mask is given), and the first
    token of each example is not a target (it would be predicted from the previous example)."""
    ids, labels, pos = [], [], []
    for e in examples:
        ids += e["input_ids"]
        labels += [IGNORE_INDEX] + list(e["labels"][1:])
        pos += list(range(len(e["input_ids"])))
    return {"input_ids": ids, "labels": labels, "position_ids": pos}


# ----------------------------------------------------------------------------- batches
def collate(examples: list[dict], pad_id: int, pad_to_multiple_of: int | None = None):
    """Right-pad examples into tensors. Unpacked rows get an attention mask; packed rows (with
    position_ids) get position ids instead, the padding being one more short sequence with no targets."""
    import torch

    n = max(len(e["input_ids"]) for e in examples)
    if pad_to_multiple_of:
        n = -(-n // pad_to_multiple_of) * pad_to_multiple_of
    ids = torch.full((len(examples), n), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), n), IGNORE_INDEX, dtype=torch.long)
    packed = "position_ids" in examples[0]
    mask = torch.arange(n).repeat(len(examples), 1) if packed else torch.zeros((len(examples), n), dtype=torch.long)
    for i, e in enumerate(examples):
        k = len(e["input_ids"])
        ids[i, :k] = torch.tensor(e["input_ids"])
        labels[i, :k] = torch.tensor(e["labels"])
        if packed:
            mask[i, :k] = torch.tensor(e["position_ids"])
            mask[i, k:] = torch.arange(n - k)
        else:
            mask[i, :k] = 1
    if packed:
        return {"input_ids": ids, "position_ids": mask, "labels": labels}
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def seq2seq_collate(examples: list[dict], pad_id: int):
    """Encoder inputs right-padded with their attention mask; labels padded with -100 to their own length."""
    import torch

    n = max(len(e["input_ids"]) for e in examples)
    m = max(len(e["labels"]) for e in examples)
    ids = torch.full((len(examples), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), n), dtype=torch.long)
    labels = torch.full((len(examples), m), IGNORE_INDEX, dtype=torch.long)
    for i, e in enumerate(examples):
        ids[i, :len(e["input_ids"])] = torch.tensor(e["input_ids"])
        mask[i, :len(e["input_ids"])] = 1
        labels[i, :len(e["labels"])] = torch.tensor(e["labels"])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
