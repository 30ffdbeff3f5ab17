"""Which rows make up each micro-batch: a pure function of the position in the run, so a resumed run sees
exactly the batches an uninterrupted run would have seen; optional length grouping."""
from __future__ import annotations

import functools
import math
import random

GROUP = 50  # length grouping: rows are sorted by length within windows of GROUP batches (as HF's group_by_length)


@functools.lru_cache(maxsize=4)
def _epoch_order(n_rows: int, batch_size: int, seed: int, shuffle: bool, epoch: int,
                 lengths: tuple[int, ...] | None) -> tuple[int, ...]:
    order = list(range(n_rows))
    rng = random.Random(seed * 1_000_003 + epoch)
    if shuffle:
        rng.shuffle(order)
    if lengths is None:
        return tuple(order)
    # length-grouped: a shuffled epoch cut into windows of GROUP batches, each sorted by length, so a batch
    # holds rows of similar length (little padding); then the batches of the epoch in a shuffled order
    window = batch_size * GROUP
    grouped = []
    for s in range(0, n_rows, window):
        grouped += sorted(order[s:s + window], key=lambda i: -lengths[i])
    full = n_rows - n_rows % batch_size
    batches = [grouped[k:k + batch_size] for k in range(0, full, batch_size)]
    if shuffle:
        rng.shuffle(batches)  # the short batch stays last: every slice of batch_size stays one batch
    return tuple([i for b in batches for i in b] + grouped[full:])


def batch_indices(n_rows: int, batch_size: int, seed: int, shuffle: bool, micro: int,
                  lengths: tuple[int, ...] | None = None) -> list[int]:
    """Row indices of global micro-batch number ``micro``. A pure function of the position, so a
    resumed run sees exactly the batches an uninterrupted run would have seen. ``lengths``: the rows'
    token counts, for length-grouped batches (data.group_by_length)."""
    per_epoch = math.ceil(n_rows / batch_size)
    epoch, k = divmod(micro, per_epoch)
    order = _epoch_order(n_rows, batch_size, seed, shuffle, epoch, lengths)
    return list(order[k * batch_size:(k + 1) * batch_size])


def row_lengths(cfg, examples: list[dict]) -> tuple[int, ...] | None:
    """What length grouping sorts by (pairs: both answers), or None where it is off or does not apply
    (packed rows are already full)."""
    if not cfg.data.get("group_by_length", False) or cfg.data.packing or not examples:
        return None
    return tuple(len(e["input_ids"]) + len(e.get("rejected_input_ids", ())) for e in examples)


def total_steps(tcfg, n_rows: int) -> int:
    if tcfg.max_steps > 0:
        return tcfg.max_steps
    per_epoch = math.ceil(n_rows / tcfg.batch_size)
    return max(1, math.ceil(tcfg.epochs * per_epoch / tcfg.grad_accum))
