"""objective=reward: a Bradley-Terry reward model. A new scalar head scores both answers of a pair; the loss
is -log sigmoid(r_chosen - r_rejected)."""
from __future__ import annotations

from ftctl.objectives.losses import Preference, bradley_terry_losses
from ftctl.objectives.spec import BuildContext, ObjectiveSpec, register


class Reward(Preference):
    name = "reward"

    def loss(self, model, batch, n_items, stats=None):
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        scores = out.logits.squeeze(-1).float()
        pairs = scores.shape[0] // 2
        losses = bradley_terry_losses(scores[:pairs], scores[pairs:])
        if stats is not None:
            stats.add(losses, scores[:pairs].detach(), scores[pairs:].detach())
        return losses.sum() / n_items


def build(ctx: BuildContext):
    return Reward(ctx.pad_id)


SPEC = register(ObjectiveSpec("reward", build, "a reward model on preference pairs (Bradley-Terry)",
                              pairs=True, head="score"))
