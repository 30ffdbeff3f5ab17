"""objective=dpo: the DPO family of preference losses (dpo.loss=sigmoid|robust|hinge|ipo|simpo|orpo; see
losses.py), and where the reference comes from.

The DPO reference is the policy as training starts, found the cheapest way that is exact:
  - a new adapter that starts as the identity (LoRA-style zero init): the same model with the adapter
    disabled, so there is no second copy in memory (checked on the first batch; otherwise precomputed);
  - ``model.adapter`` (continuing an SFT adapter) or ``dpo.precompute_ref=true``: log-probabilities
    computed once before the first step for every pair the run will see, cached under
    $FTCTL_CACHE/ref/ keyed by data, model, adapter and method;
  - full fine-tuning: a frozen copy of the starting weights (or precomputed, as above).
"""
from __future__ import annotations

import copy
import hashlib
import json
from contextlib import contextmanager, nullcontext
from pathlib import Path

from omegaconf import OmegaConf

from ftctl.core.atomic import atomic_file
from ftctl.core.errors import ConfigError
from ftctl.core.paths import cache_dir
from ftctl.data.batches import batch_indices, row_lengths
from ftctl.methods.peft import is_adapter
from ftctl.objectives.losses import REFERENCE_FREE, Preference, preference_losses, sequence_logps
from ftctl.objectives.spec import BuildContext, ObjectiveSpec, register
from ftctl.rundir import adapter_folder


class DPO(Preference):
    name = "dpo"

    def __init__(self, pad_id: int, dpo_cfg, reference=None):
        """``reference(batch) -> (ref_chosen, ref_rejected)`` for losses that need one, unless the batch
        carries precomputed ``ref_chosen`` / ``ref_rejected``."""
        super().__init__(pad_id)
        self.cfg = dpo_cfg
        self.reference = reference
        self.reference_kind: str | None = None  # what the reference is, for the manifest

    def policy_logps(self, model, batch):
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        logps, n_tok = sequence_logps(out.logits, batch["labels"])
        return logps, n_tok, out.logits

    def loss(self, model, batch, n_items, stats=None):
        c = self.cfg
        logps, n_tok, logits = self.policy_logps(model, batch)
        pairs = logps.shape[0] // 2
        ref_c = ref_r = None
        if c.loss not in REFERENCE_FREE:
            if "ref_chosen" in batch:
                ref_c, ref_r = batch["ref_chosen"], batch["ref_rejected"]
            else:
                ref_c, ref_r = self.reference(batch)
        losses, chosen_r, rejected_r = preference_losses(
            c.loss, logps[:pairs], logps[pairs:], ref_c, ref_r, chosen_tokens=n_tok[:pairs],
            rejected_tokens=n_tok[pairs:], beta=c.beta, label_smoothing=c.label_smoothing, simpo_gamma=c.simpo_gamma)
        if c.loss == "orpo":  # plus the SFT loss on the chosen answers (token-averaged per answer, as in ORPO)
            losses = losses - logps[:pairs] / n_tok[:pairs].clamp(min=1)
        if stats is not None:
            stats.add(losses, chosen_r, rejected_r)
        return losses.sum() / n_items


@contextmanager
def _eval_mode(model):
    was = model.training
    model.eval()
    try:
        yield
    finally:
        if was:
            model.train()


def _pair_logps(model, batch, ctx=nullcontext):
    import torch

    with torch.no_grad(), _eval_mode(model), ctx():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    logps, _ = sequence_logps(out.logits, batch["labels"])
    pairs = logps.shape[0] // 2
    return logps[:pairs], logps[pairs:]


def _stat(path: Path) -> list:
    """Identity of a model or adapter folder: its weight files' names, sizes and modification times."""
    path = Path(path)
    files = sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")) if path.is_dir() else [path]
    return [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files if f.exists()]


def _ref_cache_key(cfg, bundle, model_path) -> str:
    parts = {"v": 1, "data": bundle.fingerprint, "model": [str(model_path), _stat(model_path)],
             "adapter": [cfg.model.adapter, _stat(adapter_folder(cfg.model.adapter))] if cfg.model.adapter else None,
             "peft": OmegaConf.to_container(cfg.peft, resolve=True), "seed": cfg.seed, "dtype": cfg.model.dtype,
             "quant": OmegaConf.to_container(cfg.quant, resolve=True)}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def precompute_reference(cfg, model, objective, bundle, model_path, steps: int, console) -> None:
    """Reference log-probabilities of every pair the run will visit (training rows of its steps, and the
    validation rows it scores), stored on the examples as ref_chosen / ref_rejected; cached on disk."""
    import torch

    tc = cfg.trainer
    n_rows = len(bundle.train.examples)
    lengths = row_lengths(cfg, bundle.train.examples)
    visit = sorted({i for m in range(steps * tc.grad_accum)
                    for i in batch_indices(n_rows, tc.batch_size, cfg.seed, cfg.data.shuffle, m, lengths)})
    todo = {"train": visit, "validation": list(range(min(len(bundle.validation.examples), tc.eval_max_rows)))}
    key = _ref_cache_key(cfg, bundle, model_path)
    f = cache_dir() / "ref" / f"{key}.pt"
    cached = torch.load(f, weights_only=True) if f.is_file() and cfg.data.cache else {}
    device = next(model.parameters()).device
    for split, idx in todo.items():
        examples = getattr(bundle, split).examples
        have = cached.setdefault(split, {})
        missing = [i for i in idx if i not in have]
        if missing:
            console.print(f"dpo: reference log-probabilities for {len(missing)} {split} pairs", highlight=False)
        with console.status(f"dpo: reference log-probabilities of {split} pairs") as status:
            for k in range(0, len(missing), tc.batch_size):
                chunk = missing[k:k + tc.batch_size]
                batch = {n: v.to(device) for n, v in objective.collate([examples[i] for i in chunk]).items()}
                c, r = _pair_logps(model, batch)
                for i, a, b in zip(chunk, c.tolist(), r.tolist()):
                    have[i] = (a, b)
                status.update(f"dpo: reference log-probabilities of {split} pairs: {k + len(chunk)}/{len(missing)}")
        for i in idx:
            examples[i]["ref_chosen"], examples[i]["ref_rejected"] = have[i]
        if missing and cfg.data.cache:  # saved per split: an interrupted run keeps what it computed
            f.parent.mkdir(parents=True, exist_ok=True)
            atomic_file(f, lambda tmp: torch.save(cached, tmp))


def _identity_at_start(model, objective, examples) -> bool:
    """Does the new adapter leave the model's outputs unchanged (so disabling it gives the start policy)?"""
    batch = objective.collate(examples[:2])
    batch = {k: v.to(next(model.parameters()).device) for k, v in batch.items()}
    on = _pair_logps(model, batch)
    off = _pair_logps(model, batch, model.disable_adapter)
    return all(bool((a - b).abs().max() <= 1e-4 * (1 + b.abs().max())) for a, b in zip(on, off))


def _disable_dropout(model) -> None:
    import torch

    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0


def _frozen_reference(model, objective, console):
    frozen = copy.deepcopy(model).eval()
    for p in frozen.parameters():
        p.requires_grad_(False)
    console.print("dpo: reference = a frozen copy of the starting weights (dpo.precompute_ref=true avoids "
                  "the copy)", highlight=False)
    objective.reference = lambda batch: _pair_logps(frozen, batch)
    objective.reference_kind = "frozen copy of the starting weights"
    return objective


def _precomputed_reference(ctx: BuildContext, objective):
    cfg = ctx.cfg
    why = "model.adapter: the reference is the SFT policy" if cfg.model.adapter and not cfg.dpo.precompute_ref else \
        "dpo.precompute_ref=true"
    ctx.console.print(f"dpo: reference log-probabilities precomputed before the first step ({why})", highlight=False)
    precompute_reference(cfg, ctx.model, objective, ctx.bundle, ctx.model_path, ctx.steps, ctx.console)

    def missing(batch):
        raise ConfigError("dpo: a batch without precomputed reference log-probabilities (internal error)")

    objective.reference = missing
    objective.reference_kind = "precomputed from the starting policy"
    return objective


def build(ctx: BuildContext):
    """The DPO objective with its reference: none (reference-free losses), the base with the adapter
    disabled, a frozen copy, or log-probabilities precomputed once (the module docstring says when)."""
    cfg, model, console = ctx.cfg, ctx.model, ctx.console
    dcfg = cfg.dpo
    objective = DPO(ctx.pad_id, dcfg)
    if dcfg.disable_dropout:
        _disable_dropout(model)
    if dcfg.loss in REFERENCE_FREE:
        console.print(f"dpo: loss={dcfg.loss} needs no reference model", highlight=False)
        objective.reference_kind = "none"
        return objective
    adapter = is_adapter(model)
    if adapter and not cfg.model.adapter and not dcfg.precompute_ref:
        if _identity_at_start(model, objective, ctx.bundle.train.examples):
            console.print("dpo: reference = the base model with the adapter disabled (no second copy)",
                          highlight=False)
            objective.reference = lambda batch: _pair_logps(model, batch, model.disable_adapter)
            objective.reference_kind = "base model (adapter disabled)"
            return objective
        console.print(f"dpo: peft.method={cfg.peft.method} changes the model's outputs at initialisation; the "
                      "reference (the starting policy) is precomputed instead", highlight=False)
    if not adapter and not dcfg.precompute_ref:
        return _frozen_reference(model, objective, console)
    return _precomputed_reference(ctx, objective)


SPEC = register(ObjectiveSpec("dpo", build, "direct preference optimisation and its variants (dpo.loss=...)",
                              pairs=True, reference=True))
