"""Preference objectives: each loss against TRL's own code on identical log-probabilities, gradient
directions on a toy case, and DPO / reward-model runs on tiny_llama."""
import json
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from conftest import compose

from ftctl.rundir import read_metrics
from ftctl.objectives.losses import bradley_terry_losses, preference_losses, sequence_logps
from ftctl.train.loop import train

trl = pytest.importorskip("trl", reason="TRL is the reference implementation (pip install -e '.[test]')")

PAIRS, T = 6, 9


def _logps_setup(seed=0):
    """Per-token log-probabilities of 2 x PAIRS answers (chosen rows first) with ragged completion masks."""
    g = torch.Generator().manual_seed(seed)
    per_token = -torch.rand(2 * PAIRS, T - 1, generator=g, dtype=torch.float64) * 2
    mask = torch.zeros(2 * PAIRS, T, dtype=torch.long)
    for i in range(2 * PAIRS):
        start = int(torch.randint(1, 4, (1,), generator=g))
        end = int(torch.randint(start + 2, T + 1, (1,), generator=g))
        mask[i, start:end] = 1
    per_token = per_token * mask[:, 1:]
    ref = -torch.rand(2 * PAIRS, generator=g, dtype=torch.float64) * 10
    return per_token, mask, ref


def _trl_dpo_loss(loss_type, per_token, mask, ref, beta, label_smoothing):
    """TRL's DPOTrainer._compute_loss, run on a stand-in model whose per-token log-probabilities are given."""
    from trl.trainer.dpo_trainer import DPOTrainer

    n = per_token.shape[0]

    def model(**kwargs):
        z = torch.zeros_like(per_token)
        return SimpleNamespace(log_probs=per_token, entropy=z, mean_logits=z, is_top1=z.bool(), aux_loss=None)

    acc = SimpleNamespace(device="cpu", gather_for_metrics=lambda x: x, gather=lambda x: x)
    fake = SimpleNamespace(
        model=SimpleNamespace(training=True), accelerator=acc, aux_loss_enabled=False, ld_alpha=None,
        precompute_ref_logps=True, f_divergence_type="reverse_kl", loss_types=[loss_type], loss_weights=[1.0],
        beta=beta, label_smoothing=label_smoothing, use_weighting=False,
        _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1)
    inputs = {"input_ids": torch.ones(n, T, dtype=torch.long), "attention_mask": torch.ones(n, T, dtype=torch.long),
              "completion_mask": mask, "ref_chosen_logps": ref[:n // 2], "ref_rejected_logps": ref[n // 2:]}
    loss = DPOTrainer._compute_loss(fake, model, inputs, False)
    return loss, fake._metrics["train"]


@pytest.mark.parametrize("kind, beta, ls", [("sigmoid", 0.1, 0.0), ("sigmoid", 0.5, 0.0), ("ipo", 0.1, 0.0),
                                            ("hinge", 0.3, 0.0), ("robust", 0.1, 0.2)])
def test_dpo_losses_equal_trl(kind, beta, ls):
    per_token, mask, ref = _logps_setup()
    expected, trl_metrics = _trl_dpo_loss(kind, per_token, mask, ref, beta, ls)
    logps = per_token.sum(1)
    n_tok = mask[:, 1:].sum(1)
    losses, chosen_r, rejected_r = preference_losses(
        kind, logps[:PAIRS], logps[PAIRS:], ref[:PAIRS], ref[PAIRS:], chosen_tokens=mask[:PAIRS].sum(1),
        rejected_tokens=mask[PAIRS:].sum(1), beta=beta, label_smoothing=ls)
    assert abs(float(losses.mean()) - float(expected)) < 1e-6, (float(losses.mean()), float(expected))
    assert abs(float(chosen_r.mean()) - trl_metrics["rewards/chosen"][0]) < 1e-6
    assert abs(float((chosen_r - rejected_r).mean()) - trl_metrics["rewards/margins"][0]) < 1e-6
    assert int(n_tok.sum()) == int(mask[:, 1:].sum())


def test_simpo_equals_trl_cpo_trainer():
    from trl.experimental.cpo.cpo_trainer import CPOTrainer

    per_token, mask, _ = _logps_setup(1)
    n_tok = mask.sum(1)
    logps = per_token.sum(1)
    avg = logps / n_tok
    fake = SimpleNamespace(alpha=0.0, loss_type="simpo", simpo_gamma=0.7, beta=2.0, label_smoothing=0.1,
                           accelerator=SimpleNamespace(device="cpu"))
    expected, c_exp, r_exp = CPOTrainer.cpo_loss(fake, avg[:PAIRS], avg[PAIRS:])
    losses, c, r = preference_losses("simpo", logps[:PAIRS], logps[PAIRS:], chosen_tokens=n_tok[:PAIRS],
                                     rejected_tokens=n_tok[PAIRS:], beta=2.0, label_smoothing=0.1, simpo_gamma=0.7)
    assert torch.allclose(losses, expected, atol=1e-6, rtol=0)
    assert torch.allclose(c, c_exp, atol=1e-6, rtol=0) and torch.allclose(r, r_exp, atol=1e-6, rtol=0)


def test_orpo_odds_ratio_equals_trl_orpo_trainer():
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    per_token, mask, _ = _logps_setup(2)
    n_tok = mask.sum(1)
    logps = per_token.sum(1)
    avg = logps / n_tok
    fake = SimpleNamespace(beta=0.25, accelerator=SimpleNamespace(device="cpu"))
    trl_terms, c_exp, _, _, _ = ORPOTrainer.odds_ratio_loss(fake, avg[:PAIRS], avg[PAIRS:])
    losses, c, _ = preference_losses("orpo", logps[:PAIRS], logps[PAIRS:], chosen_tokens=n_tok[:PAIRS],
                                     rejected_tokens=n_tok[PAIRS:], beta=0.25)
    # TRL's loss is nll - mean(terms): the odds-ratio part of ours is -terms
    assert torch.allclose(losses, -trl_terms, atol=1e-6, rtol=0)
    assert torch.allclose(c, c_exp, atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", ["sigmoid", "ipo", "hinge", "robust", "simpo", "orpo"])
def test_gradient_raises_chosen_and_lowers_rejected(kind):
    chosen = torch.tensor([-12.0, -30.0], requires_grad=True)
    rejected = torch.tensor([-11.0, -29.0], requires_grad=True)
    n = torch.tensor([6, 10])
    losses, _, _ = preference_losses(kind, chosen, rejected, torch.tensor([-12.0, -30.0]), torch.tensor([-11.0, -29.0]),
                                     chosen_tokens=n, rejected_tokens=n, beta=0.1, label_smoothing=0.1)
    losses.sum().backward()
    assert (chosen.grad < 0).all() and (rejected.grad > 0).all(), (chosen.grad, rejected.grad)
    # a gradient step in that direction lowers the loss
    with torch.no_grad():
        after, _, _ = preference_losses(kind, chosen - 0.1 * chosen.grad, rejected - 0.1 * rejected.grad,
                                        torch.tensor([-12.0, -30.0]), torch.tensor([-11.0, -29.0]), chosen_tokens=n,
                                        rejected_tokens=n, beta=0.1, label_smoothing=0.1)
    assert float(after.sum()) < float(losses.sum())


def test_bradley_terry_and_sequence_logps():
    c, r = torch.tensor([2.0, -1.0]), torch.tensor([0.5, 1.0])
    assert torch.allclose(bradley_terry_losses(c, r), -torch.log(torch.sigmoid(c - r)))
    logits = torch.randn(2, 5, 11, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([[-100, -100, 3, 4, 5], [-100, 7, 8, -100, -100]])
    logps, n = sequence_logps(logits, labels)
    lsm = logits.log_softmax(-1)
    want0 = lsm[0, 1, 3] + lsm[0, 2, 4] + lsm[0, 3, 5]
    want1 = lsm[1, 0, 7] + lsm[1, 1, 8]
    assert torch.allclose(logps, torch.stack([want0, want1]), atol=1e-5) and n.tolist() == [3, 2]


TINY = ["model=tiny_llama", "data=demo_date_pairs", "template=preference", "data.limit=100", "data.val_fraction=0.2",
        "trainer.batch_size=4",
        "trainer.log_every=1", "trainer.warmup_steps=0", "trainer.scheduler=constant"]


def test_dpo_run_on_tiny_llama_learns_the_preference(tmp_path):
    cfg, choices = compose(*TINY, "objective=dpo", "trainer.max_steps=40", "trainer.lr=5e-3", "trainer.eval_every=40",
                           f"output_dir={tmp_path / 'run'}")
    out = train(cfg, choices)
    rows = read_metrics(out)
    steps = [m for m in rows if "loss" in m]
    assert len(steps) == 40 and abs(steps[0]["loss"] - 0.6931) < 1e-3  # log 2: policy == reference at step 1
    assert steps[0]["margin"] == 0 and steps[0]["accuracy"] == 0.5
    for key in ("rewards_chosen", "rewards_rejected", "margin", "accuracy"):
        assert all(key in m for m in steps)
    val = [m for m in rows if "val_accuracy" in m][-1]
    # 20 held-out pairs; the policy starts at accuracy 0.5 and loss log 2 (0.693); here it ends at 0.8 / 0.50
    assert val["val_accuracy"] >= 0.7 and val["val_margin"] > 0.2 and val["val_loss"] < 0.6, val
    man = json.loads((out / "manifest.json").read_text())
    assert man["final_val"]["val_accuracy"] == val["val_accuracy"]
    assert man["objective"] == "dpo" and man["reference"] == "base model (adapter disabled)"


def test_reference_by_disabled_adapter_equals_the_base_model(tmp_path):
    """The online reference (adapter disabled) gives the base model's log-probabilities, and precomputed
    references reproduce the same first-step loss."""
    from ftctl.models import load as models
    from ftctl.data import pipeline
    from ftctl.evaluate.run import pair_scores

    a = train(*compose(*TINY, "objective=dpo", "trainer.max_steps=3", "trainer.lr=1e-2", "trainer.eval_every=0",
                       f"output_dir={tmp_path / 'online'}"))
    b = train(*compose(*TINY, "objective=dpo", "trainer.max_steps=3", "trainer.lr=1e-2", "trainer.eval_every=0",
                       "dpo.precompute_ref=true", f"output_dir={tmp_path / 'pre'}"))
    la = [m["loss"] for m in read_metrics(a) if "loss" in m]
    lb = [m["loss"] for m in read_metrics(b) if "loss" in m]
    assert la == pytest.approx(lb, abs=1e-5)
    # before the first update the policy is its reference: every pair a tie, also against the cached
    # log-probabilities (which differ from the policy's by float noise)
    assert [m["accuracy"] for m in read_metrics(b) if "loss" in m][0] == 0.5
    cfg, _ = compose(*TINY)
    tok = models.load_tokenizer(models.resolve("builtin:tiny_llama"))
    examples = pipeline.build(cfg, tok).validation.examples
    base = models.load_model(models.resolve("builtin:tiny_llama"), cfg.model, cfg.quant, torch.device("cpu"))
    from peft import PeftModel

    tuned = PeftModel.from_pretrained(models.load_model(models.resolve("builtin:tiny_llama"), cfg.model, cfg.quant,
                                                        torch.device("cpu")), a / "adapter")
    with tuned.disable_adapter():
        off = pair_scores(tuned, examples, tok.pad_token_id, 4)
    assert off == pair_scores(base, examples, tok.pad_token_id, 4)
    assert off != pair_scores(tuned, examples, tok.pad_token_id, 4)


def test_reward_model_run_and_eval(tmp_path):
    from ftctl.evaluate.run import EvalConfig, run_eval

    out = train(*compose(*TINY, "objective=reward", "trainer.max_steps=8", "trainer.lr=1e-2", "trainer.eval_every=8",
                         f"output_dir={tmp_path / 'rm'}"))
    val = [m for m in read_metrics(out) if "val_accuracy" in m][-1]
    report = run_eval(EvalConfig(run=str(out), metrics=["reward_accuracy"]))
    assert report["results"]["tuned"]["reward_accuracy"] == pytest.approx(val["val_accuracy"], abs=1e-4)
    assert val["val_accuracy"] > 0.7
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert "score" in cfg["modules_to_save"] and cfg["task_type"] == "SEQ_CLS"


def test_preference_objective_refuses_single_examples(tmp_path):
    from ftctl.core.errors import ConfigError

    with pytest.raises(ConfigError, match="objective=dpo needs preference pairs"):
        train(*compose("model=tiny_llama", "data.limit=20", "objective=dpo", f"output_dir={tmp_path / 'x'}"))
    assert not (tmp_path / "x").exists()


def test_two_stage_sft_then_dpo_continues_the_adapter(tmp_path):
    """SFT on the chosen answers, then DPO from that adapter: the reference is the SFT policy (precomputed),
    so the first DPO step sits exactly at log 2, and the adapter keeps training from where SFT left it."""
    from safetensors.torch import load_file

    from ftctl.core.errors import ConfigError

    sft = train(*compose(*TINY, "trainer.max_steps=4", "trainer.lr=1e-2", "trainer.eval_every=0",
                         f"output_dir={tmp_path / 'sft'}"))
    dpo = train(*compose(*TINY, "objective=dpo", "trainer.max_steps=3", "trainer.lr=1e-2", "trainer.eval_every=0",
                         f"model.adapter={sft}", f"output_dir={tmp_path / 'dpo'}"))
    first = next(m for m in read_metrics(dpo) if "loss" in m)
    assert abs(first["loss"] - 0.693147) < 1e-4 and first["margin"] == pytest.approx(0, abs=1e-5)
    man = json.loads((dpo / "manifest.json").read_text())
    assert man["reference"] == "precomputed from the starting policy" and man["continued_from"].endswith("sft/adapter")
    a = load_file(str(sft / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(dpo / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and any(not torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ConfigError, match="model.adapter=.*no adapter_config.json"):
        train(*compose(*TINY, "objective=dpo", f"model.adapter={tmp_path}", f"output_dir={tmp_path / 'bad'}"))


@pytest.mark.parametrize("override, message", [
    ("dpo.loss=kto", "dpo.loss='kto' is not allowed; choose one of: sigmoid, ipo, hinge, robust, simpo, orpo"),
    ("dpo.label_smoothing=0.5", r"dpo.label_smoothing=0.5 must be in \[0, 0.5\)"),
    ("objective=ppo", "objective='ppo' is not allowed; choose one of: sft, dpo, reward"),
    ("dpo.beta=0", "dpo.beta=0.0 must be > 0"),
])
def test_bad_preference_settings_are_one_line_errors(override, message):
    from ftctl.core.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        compose(*TINY, override)


def test_pair_credit_counts_float_noise_as_a_tie():
    from ftctl.evaluate.run import reward_accuracy
    from ftctl.objectives.losses import StepStats, pair_credit

    assert [pair_credit(m) for m in (0.3, -0.3, 0.0, 3e-6, -3e-6)] == [1.0, 0.0, 0.5, 0.5, 0.5]
    stats = StepStats()
    stats.add(torch.zeros(3), torch.tensor([1.0, 0.2, 0.5 + 1e-7]), torch.tensor([0.0, 0.7, 0.5]))
    assert stats.means()["accuracy"] == pytest.approx(0.5)
    assert reward_accuracy(([1.0, 2.0], [1.0 - 1e-6, 3.0]))[1] == [0.5, 0.0]
