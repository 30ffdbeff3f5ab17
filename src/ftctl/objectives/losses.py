"""The math the objectives share: preference losses, sequence log-probabilities, pair batches and their
statistics, and SFT's loss with logits at the target positions only. Pure functions of tensors.

``sft`` is the next-token loss on the template's targets. ``dpo`` covers the preference losses of the
DPO family, on the log-probabilities of each pair's chosen and rejected answers (summed over the answer's
tokens; averaged per token where a loss asks for it). ``reward`` trains a Bradley-Terry reward model: a
scalar head scores both answers and the loss is -log sigmoid(r_chosen - r_rejected).

The loss formulas follow the papers and TRL's trainers (checked against TRL in tests/test_dpo.py):
  sigmoid  DPO (Rafailov et al., 2023)        -log s(b * d)
  robust   rDPO (Chowdhury et al., 2024)       ((1-e) * -log s(b d) - e * -log s(-b d)) / (1 - 2e)
  hinge    SLiC (Zhao et al., 2023)            max(0, 1 - b d)
  ipo      IPO (Azar et al., 2023)             (d_avg - 1 / (2b))^2, log-ratios averaged per token
  simpo    SimPO (Meng et al., 2024)           -log s(b (avg_c - avg_r) - gamma), no reference
  orpo     ORPO (Hong et al., 2024)            NLL(chosen) - b log s(log odds_c - log odds_r), no reference
where d = (log pi_c - log ref_c) - (log pi_r - log ref_r), s is the logistic function and
avg is the per-token average log-probability of an answer.
"""
from __future__ import annotations

from dataclasses import dataclass

from ftctl.data.tokenize import collate
from ftctl.methods.spec import adapter_spec

IGNORE_INDEX = -100
REFERENCE_FREE = ("simpo", "orpo")


# ----------------------------------------------------------------------------- losses
def _log1mexp(x):
    """log(1 - exp(x)) for x < 0, computed stably (Maechler, 2012)."""
    import math

    import torch

    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def preference_losses(kind: str, chosen_logps, rejected_logps, ref_chosen_logps=None, ref_rejected_logps=None, *,
                      chosen_tokens=None, rejected_tokens=None, beta: float = 0.1, label_smoothing: float = 0.0,
                      simpo_gamma: float = 0.5):
    """Per-pair losses and the implicit rewards of the chosen and rejected answers.

    ``*_logps`` are summed log-probabilities of each answer (shape [pairs]); ``*_tokens`` the number of
    answer tokens (for ipo, simpo and orpo, which work per token). For orpo the returned loss is only
    the odds-ratio term; the caller adds the chosen answers' NLL.
    """
    import torch.nn.functional as F

    b = beta
    if kind in ("sigmoid", "robust", "hinge", "ipo"):
        chosen_ratio = chosen_logps - ref_chosen_logps
        rejected_ratio = rejected_logps - ref_rejected_logps
        d = chosen_ratio - rejected_ratio
        if kind == "sigmoid":
            losses = -F.logsigmoid(b * d)
        elif kind == "robust":
            e = label_smoothing
            losses = (-(1 - e) * F.logsigmoid(b * d) + e * F.logsigmoid(-b * d)) / (1 - 2 * e)
        elif kind == "hinge":
            losses = (1 - b * d).clamp(min=0)
        else:
            d_avg = chosen_ratio / chosen_tokens.clamp(min=1) - rejected_ratio / rejected_tokens.clamp(min=1)
            losses = (d_avg - 1 / (2 * b)) ** 2
        return losses, b * chosen_ratio.detach(), b * rejected_ratio.detach()
    avg_c = chosen_logps / chosen_tokens.clamp(min=1)
    avg_r = rejected_logps / rejected_tokens.clamp(min=1)
    if kind == "simpo":
        z = avg_c - avg_r - simpo_gamma / b
        e = label_smoothing
        losses = -F.logsigmoid(b * z) * (1 - e) - F.logsigmoid(-b * z) * e
    elif kind == "orpo":
        avg_c, avg_r = avg_c.float(), avg_r.float()
        log_odds = (avg_c - avg_r) - (_log1mexp(avg_c) - _log1mexp(avg_r))
        losses = -b * F.logsigmoid(log_odds)
    else:
        raise ValueError(f"unknown preference loss {kind!r}")
    return losses, b * avg_c.detach(), b * avg_r.detach()


def bradley_terry_losses(chosen_scores, rejected_scores):
    """Reward-model loss: -log sigmoid(r_chosen - r_rejected) per pair."""
    import torch.nn.functional as F

    return -F.logsigmoid(chosen_scores - rejected_scores)


# ----------------------------------------------------------------------------- log-probabilities
def sequence_logps(logits, labels):
    """Summed log-probabilities of the labelled tokens of each row, and how many there are.

    logits [B, T, V] predict labels [B, T] shifted by one; positions labelled -100 do not count.
    Computed as gathered logit minus logsumexp, which never materialises a [B, T, V] log-softmax.
    """
    import torch

    logits = logits[:, -labels.shape[1]:-1].float()  # prompt-learning adapters prepend virtual positions
    target = labels[:, 1:]
    mask = target != IGNORE_INDEX
    picked = logits.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    token_logps = (picked - torch.logsumexp(logits, dim=-1)) * mask
    return token_logps.sum(-1), mask.sum(-1)


# ----------------------------------------------------------------------------- batches
def pair_collate(examples: list[dict], pad_id: int) -> dict:
    """Chosen rows then rejected rows in one right-padded batch of 2 x pairs rows."""

    rows = ([{"input_ids": e["input_ids"], "labels": e["labels"]} for e in examples]
            + [{"input_ids": e["rejected_input_ids"], "labels": e["rejected_labels"]} for e in examples])
    batch = collate(rows, pad_id)
    if "ref_chosen" in examples[0]:
        import torch

        batch["ref_chosen"] = torch.tensor([e["ref_chosen"] for e in examples], dtype=torch.float32)
        batch["ref_rejected"] = torch.tensor([e["ref_rejected"] for e in examples], dtype=torch.float32)
    return batch


# reward margins closer than this count as a tie: a policy scored against precomputed reference
# log-probabilities differs from them by float noise (other padding, other batch) before it has moved
TIE = 1e-4


def pair_credit(margin: float) -> float:
    """1 when the chosen answer's reward is higher, 0.5 for a tie (within TIE), 0 otherwise."""
    return 0.5 if abs(margin) <= TIE else float(margin > 0)


@dataclass
class StepStats:
    """Sums over the pairs of a step (or of a validation pass), turned into means for the log. Accuracy:
    the share of pairs whose chosen answer has the higher reward, a tie counting one half (so a DPO policy
    that has not moved from its reference scores 0.5, not 0)."""
    pairs: int = 0
    loss: float = 0.0
    chosen: float = 0.0
    rejected: float = 0.0
    correct: float = 0.0

    def add(self, losses, chosen, rejected) -> None:
        self.pairs += int(losses.numel())
        self.loss += float(losses.detach().sum())
        self.chosen += float(chosen.sum())
        self.rejected += float(rejected.sum())
        self.correct += sum(pair_credit(m) for m in (chosen - rejected).detach().float().tolist())

    def means(self, prefix: str = "") -> dict:
        n = max(self.pairs, 1)
        return {f"{prefix}rewards_chosen": round(self.chosen / n, 6), f"{prefix}rewards_rejected": round(self.rejected / n, 6),
                f"{prefix}margin": round((self.chosen - self.rejected) / n, 6), f"{prefix}accuracy": round(self.correct / n, 6)}


# ----------------------------------------------------------------------------- logits at the targets only
# model types whose causal-LM loss is exactly cross-entropy over lm_head(final hidden state): no logit
# scaling or soft-capping between the two (Gemma 2, Granite, Cohere have some and keep the full forward)
TARGETS_ONLY_MODELS = ("llama", "mistral", "qwen2", "qwen3", "phi3", "olmo2", "smollm3")
TARGET_CHUNK = 1024  # target positions per chunk of the output head: at most [1024, vocab] logits at once


def targets_only_model_config(config) -> bool:
    """Whether a transformers config's causal-LM loss is plain cross-entropy over lm_head(hidden)."""
    return (config is not None and getattr(config, "model_type", None) in TARGETS_ONLY_MODELS
            and not getattr(config, "is_encoder_decoder", False)
            and not getattr(config, "final_logit_softcapping", None) and not getattr(config, "logits_scaling", None))


def targets_only_parts(model):
    """(decoder, output head) of ``model`` (a causal LM, or a peft model around one that injects its
    layers in place) when the loss may be computed from the final hidden states at the target positions
    alone; None where the model's own forward must run (prompt-learning adapters, other heads)."""
    lm = model
    if hasattr(lm, "peft_config") and hasattr(lm, "get_base_model"):

        peft_cfg, spec = getattr(lm, "active_peft_config", None), adapter_spec(lm)
        # the method's traits: virtual tokens, or a loss term added by the forward (AdaLoRA's), keep the model's own
        if peft_cfg is None or peft_cfg.is_prompt_learning or (spec is not None and not spec.targets_only):
            return None
        lm = lm.get_base_model()
    if not targets_only_model_config(getattr(lm, "config", None)):
        return None
    decoder, head = lm.get_decoder(), lm.get_output_embeddings()
    if decoder is None or head is None or decoder is lm:
        return None
    return decoder, head


def _chunk_ce(head, hidden, target):
    import torch.nn.functional as F

    return F.cross_entropy(head(hidden).float(), target, reduction="sum")


def targets_only_loss(decoder, head, batch, n_items, chunk: int = TARGET_CHUNK):
    """The causal-LM loss (summed cross-entropy of the labelled next tokens / ``n_items``) with the output
    head applied only where a label is trained, a chunk of positions at a time; chunks after the first are
    recomputed in the backward pass, so no [tokens, vocab] logits tensor is ever held. Equal to
    ``model(**batch, num_items_in_batch=n_items).loss`` (tests/test_performance.py)."""
    from torch.utils.checkpoint import checkpoint

    inputs = {k: v for k, v in batch.items() if k != "labels"}
    hidden = decoder(**inputs, use_cache=False).last_hidden_state
    target = batch["labels"][:, 1:]
    keep = target != IGNORE_INDEX
    h, t = hidden[:, :-1][keep], target[keep]
    if t.numel() <= chunk:
        return _chunk_ce(head, h, t) / n_items
    total = _chunk_ce(head, h[:chunk], t[:chunk])
    for s in range(chunk, t.numel(), chunk):
        total = total + checkpoint(_chunk_ce, head, h[s:s + chunk], t[s:s + chunk], use_reentrant=False)
    return total / n_items


class Preference:
    """Shared by DPO and the reward model: batches of pairs, a loss averaged over the pairs of a step."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def collate(self, examples):
        return pair_collate(examples, self.pad_id)

    def count(self, batches) -> int:
        return sum(b["input_ids"].shape[0] // 2 for b in batches)

    def tokens(self, examples) -> int:
        return sum(len(e["input_ids"]) + len(e["rejected_input_ids"]) for e in examples)

    def validate(self, model, examples, batch_size, device) -> dict:
        import torch

        stats = StepStats()
        with torch.no_grad():
            for i in range(0, len(examples), batch_size):
                batch = {k: v.to(device) for k, v in self.collate(examples[i:i + batch_size]).items()}
                self.loss(model, batch, 1, stats)
        return {"val_loss": stats.loss / max(stats.pairs, 1), **stats.means("val_")}


