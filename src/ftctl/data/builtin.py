"""Datasets ftctl generates itself (deterministic, no download), selected as data.path=builtin:<name>."""
from __future__ import annotations

import random

from ftctl.core.registry import DATASETS

MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December"]
DAYS_IN_MONTH = [31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31]


def _ordinal(d: int) -> str:
    suffix = "th" if 10 <= d % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(d % 10, "th")
    return f"{d}{suffix}"


_FORMATS = [
    lambda y, m, d: f"{MONTHS[m - 1]} {d}, {y}",
    lambda y, m, d: f"{d} {MONTHS[m - 1]} {y}",
    lambda y, m, d: f"{MONTHS[m - 1][:3]} {d}, {y}",
    lambda y, m, d: f"the {_ordinal(d)} of {MONTHS[m - 1]}, {y}",
    lambda y, m, d: f"{d} {MONTHS[m - 1][:3]}. {y}",
]
_WITH_INPUT = [
    "Convert this date to ISO 8601 format (YYYY-MM-DD).",
    "Rewrite the date below as YYYY-MM-DD.",
    "Give the ISO 8601 form of the following date.",
]
_NO_INPUT = [
    "Write {date} in ISO 8601 format (YYYY-MM-DD).",
    "What is {date} as an ISO 8601 date (YYYY-MM-DD)?",
]


@DATASETS.register("demo_dates")
def demo_dates(n: int = 1200, seed: int = 20240501) -> list[dict]:
    """Date normalisation: a written date in, ``YYYY-MM-DD`` out. Alpaca rows, half with an input field.

    The embedded SmolLM2-135M-Instruct answers these in prose or with the wrong digits; a few minutes
    of LoRA teaches it the month table and the zero padding. Every date is distinct, so the held-out
    rows are dates the model never saw.
    """
    rng = random.Random(seed)
    seen: set[tuple[int, int, int]] = set()
    rows = []
    while len(rows) < n:
        y, m = rng.randint(1950, 2049), rng.randint(1, 12)
        d = rng.randint(1, DAYS_IN_MONTH[m - 1])
        if (y, m, d) in seen:
            continue
        seen.add((y, m, d))
        written = rng.choice(_FORMATS)(y, m, d)
        iso = f"{y:04d}-{m:02d}-{d:02d}"
        if rng.random() < 0.5:
            rows.append({"instruction": rng.choice(_WITH_INPUT), "input": written, "output": iso})
        else:
            rows.append({"instruction": rng.choice(_NO_INPUT).format(date=written), "input": "", "output": iso})
    return rows


@DATASETS.register("demo_date_pairs")
def demo_date_pairs(n: int = 1200, seed: int = 20240502) -> list[dict]:
    """Preference pairs on the date task: the prompt, the right ISO date (chosen), and a plausible wrong
    answer (rejected): month and day swapped, the date left as written, or a digit off by one year."""
    rng = random.Random(seed)
    rows = []
    for r in demo_dates(n, seed):
        prompt = r["instruction"] + (f"\n\n{r['input']}" if r["input"] else "")
        y, m, d = (int(x) for x in r["output"].split("-"))
        wrong = [f"{y:04d}-{d:02d}-{m:02d}" if d != m and d <= 12 else f"{y + 1:04d}-{m:02d}-{d:02d}",
                 f"{y - 1:04d}-{m:02d}-{d:02d}",
                 f"The date is {MONTHS[m - 1]} {d}, {y}."]
        rows.append({"prompt": prompt, "chosen": r["output"], "rejected": rng.choice(wrong)})
    return rows
