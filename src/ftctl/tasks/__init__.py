"""Layer 6: what differs between tasks (causal generation, seq2seq, classification) behind one interface
(``base.Task``); ``task_for(cfg)`` picks one."""
from __future__ import annotations

from ftctl.tasks.base import Task
from ftctl.tasks.causal import CausalTask
from ftctl.tasks.classify import ClassifyTask
from ftctl.tasks.seq2seq import Seq2SeqTask


def task_for(cfg) -> Task:
    if cfg.get("task", "generate") == "classify":

        return ClassifyTask()
    if cfg.model.get("kind") == "seq2seq":

        return Seq2SeqTask()

    return CausalTask()
