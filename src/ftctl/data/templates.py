"""Prompt templates: a pure function of a row that returns (prompt, completion).

Loss is computed on the completion only; the prompt is what generation is conditioned on at eval.
"""
from __future__ import annotations

from ..errors import DataError
from ..registry import TEMPLATES

# The Stanford Alpaca prompts (github.com/tatsu-lab/stanford_alpaca, train.py PROMPT_DICT), verbatim.
ALPACA_PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


@TEMPLATES.register("alpaca")
def alpaca(row: dict) -> tuple[str, str]:
    """Alpaca rows: ``instruction``, optional ``input``, ``output``. An empty input uses the no-input prompt."""
    for key in ("instruction", "output"):
        if not isinstance(row.get(key), str):
            raise DataError(f"row has no string field '{key}' (alpaca rows need instruction, output; input is optional)")
    inp = row.get("input") or ""
    if not isinstance(inp, str):
        raise DataError("field 'input' must be a string")
    if inp.strip():
        prompt = ALPACA_PROMPT_INPUT.format(instruction=row["instruction"], input=inp)
    else:
        prompt = ALPACA_PROMPT_NO_INPUT.format(instruction=row["instruction"])
    return prompt, row["output"]
