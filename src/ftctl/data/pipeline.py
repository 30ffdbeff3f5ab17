"""From a config's ``data`` and ``template`` sections to train/validation examples."""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

from ..errors import DataError
from ..registry import TEMPLATES
from .sources import read_rows
from .tokenize import TokenStats, encode_rows

SPLIT_SEED = 1234  # the validation split does not move when the training seed does


@dataclass
class Splits:
    train_rows: list[dict]
    val_rows: list[dict]
    fingerprint: str


def load_splits(data_cfg) -> Splits:
    rows, fp = read_rows(data_cfg.path)
    if data_cfg.limit:
        rows = rows[: data_cfg.limit]
    if data_cfg.val_path:
        val_rows, vfp = read_rows(data_cfg.val_path, key="data.val_path")
        fp = hashlib.sha256((fp + vfp).encode()).hexdigest()
        return Splits(rows, val_rows, fp)
    order = list(range(len(rows)))
    random.Random(SPLIT_SEED).shuffle(order)
    n_val = int(round(len(rows) * data_cfg.val_fraction))
    if data_cfg.val_fraction > 0 and n_val == 0 and len(rows) > 1:
        n_val = 1
    val_idx = set(order[len(rows) - n_val:]) if n_val else set()
    return Splits([r for i, r in enumerate(rows) if i not in val_idx],
                  [r for i, r in enumerate(rows) if i in val_idx], fp)


def render(rows: list[dict], template_name: str, where: str) -> list[tuple[str, str]]:
    tpl = TEMPLATES.get(template_name)
    out = []
    for i, row in enumerate(rows):
        try:
            out.append(tpl(row))
        except DataError as e:
            import json

            snippet = json.dumps(row, ensure_ascii=False)
            snippet = snippet if len(snippet) <= 80 else snippet[:77] + "..."
            raise DataError(f"{where}: row {snippet}: {e.message}") from None
    return out


def build(data_cfg, template_name: str, tokenizer) -> tuple[TokenStats, TokenStats, Splits]:
    splits = load_splits(data_cfg)
    train = encode_rows(tokenizer, render(splits.train_rows, template_name, data_cfg.path),
                        data_cfg.max_length, data_cfg.truncation, where=data_cfg.path)
    val = encode_rows(tokenizer, render(splits.val_rows, template_name, data_cfg.val_path or data_cfg.path),
                      data_cfg.max_length, data_cfg.truncation, where=data_cfg.val_path or data_cfg.path)
    if train.kept == 0:
        raise DataError(f"{data_cfg.path}: no training rows left after tokenization "
                        f"({train.dropped_too_long} longer than data.max_length={data_cfg.max_length}, "
                        f"{train.dropped_no_target} with an empty target)")
    return train, val, splits
