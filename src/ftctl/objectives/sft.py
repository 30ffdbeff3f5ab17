"""objective=sft: next-token cross-entropy on the template's targets (encoder-decoder models: on the
target's tokens)."""
from __future__ import annotations

from ftctl.data.tokenize import collate, seq2seq_collate
from ftctl.objectives.losses import IGNORE_INDEX, targets_only_loss, targets_only_parts
from ftctl.objectives.spec import BuildContext, ObjectiveSpec, register


class SFT:
    """Next-token cross-entropy on the labelled tokens, normalised by the target tokens of the whole step.
    ``targets_only``: (decoder, head, autocast context) to compute logits only at the target positions
    (trainer.logits=targets); None: the model's own forward computes logits everywhere."""
    name = "sft"

    def __init__(self, pad_id: int, targets_only=None):
        self.pad_id = pad_id
        self.targets_only = targets_only

    def collate(self, examples):

        return collate(examples, self.pad_id)

    def count(self, batches) -> int:
        return sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches)

    def tokens(self, examples) -> int:
        return sum(len(e["input_ids"]) for e in examples)

    def loss(self, model, batch, n_items, stats=None):
        if self.targets_only is not None:
            decoder, head, autocast = self.targets_only
            with autocast():
                return targets_only_loss(decoder, head, batch, n_items)
        return model(**batch, num_items_in_batch=n_items, use_cache=False).loss

    def validate(self, model, examples, batch_size, device) -> dict:
        import torch

        total, count = 0.0, 0
        with torch.no_grad():
            for i in range(0, len(examples), batch_size):
                batch = {k: v.to(device) for k, v in self.collate(examples[i:i + batch_size]).items()}
                n = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
                out = model(**batch, num_items_in_batch=n, use_cache=False)
                total += float(out.loss) * n
                count += n
        return {"val_loss": total / max(count, 1)}


class Seq2SeqSFT(SFT):
    """Encoder-decoder SFT (model.kind=seq2seq): the prompt is the encoder's input, the labels are the
    target's tokens (the decoder's inputs are the labels shifted right, made by the model); cross-entropy
    on every target token, normalised by the target tokens of the whole step."""
    name = "sft"

    def collate(self, examples):

        return seq2seq_collate(examples, self.pad_id)

    def count(self, batches) -> int:
        return sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in batches)

    def loss(self, model, batch, n_items, stats=None):
        import torch.nn.functional as F

        logits = model(**batch, use_cache=False).logits.float()
        return F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=IGNORE_INDEX,
                               reduction="sum") / n_items

    def validate(self, model, examples, batch_size, device) -> dict:
        import torch

        total, count = 0.0, 0
        with torch.no_grad():
            for i in range(0, len(examples), batch_size):
                batch = {k: v.to(device) for k, v in self.collate(examples[i:i + batch_size]).items()}
                n = int((batch["labels"] != IGNORE_INDEX).sum())
                total += float(self.loss(model, batch, 1))
                count += n
        return {"val_loss": total / max(count, 1)}


def build(ctx: BuildContext):
    """Seq2seq models train the decoder on the target; a causal model may compute its logits at the target
    positions only (trainer.logits=targets, where one process holds the whole model)."""
    if ctx.cfg.model.get("kind") == "seq2seq":
        return Seq2SeqSFT(ctx.pad_id)
    use = ctx.autocast is not None and ctx.cfg.trainer.logits == "targets"
    parts = targets_only_parts(ctx.model) if use else None
    return SFT(ctx.pad_id, None if parts is None else (*parts, ctx.autocast))


SPEC = register(ObjectiveSpec("sft", build, "supervised fine-tuning: cross-entropy on the answer tokens",
                              sharded=True))
