"""Encoder-decoder models (model.kind=seq2seq): the prompt is the encoder's input and the target the
decoder's; the objective (sft) computes cross-entropy on the target's tokens."""
from __future__ import annotations

from ftctl.tasks.causal import CausalTask


class Seq2SeqTask(CausalTask):
    name = "seq2seq"
    peft_task_type = "SEQ_2_SEQ_LM"
