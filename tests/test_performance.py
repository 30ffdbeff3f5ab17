"""The speed and memory measures of issue 10, checked for correctness (their speed is measured by
benchmarks/bench.py, not here): logits at the target positions only, and length-grouped batches."""
import random

import pytest
import torch

from ftctl.data.tokenize import IGNORE_INDEX, collate, packed_row
from ftctl.objectives.losses import targets_only_loss, targets_only_parts
from ftctl.objectives.sft import SFT
from ftctl.data.batches import batch_indices


def _model(tiny_model_path, method="lora"):
    from peft import LoraConfig, PromptTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)
    if method == "prompt_tuning":
        return get_peft_model(base, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    if method == "full":
        return base
    if method == "adalora":
        from peft import AdaLoraConfig

        return get_peft_model(base, AdaLoraConfig(r=4, target_modules="all-linear", total_step=10))
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0))
    for n, p in model.named_parameters():  # LoRA B starts at zero: give it values so every gradient is non-zero
        if "lora_B" in n:
            p.data.normal_(0, 0.02)
    return model


def _examples(vocab, n=4, seed=0):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        k, m = rng.randint(5, 20), rng.randint(3, 9)
        ids = [rng.randrange(3, vocab) for _ in range(k + m)]
        out.append({"input_ids": ids, "labels": [IGNORE_INDEX] * k + ids[k:]})
    return out


def _loss_and_grads(model, loss_fn):
    model.zero_grad(set_to_none=True)
    loss = loss_fn()
    loss.backward()
    return float(loss), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("chunk", [1024, 5])  # 5: the recomputed chunks (checkpoint) are exercised
@pytest.mark.parametrize("method", ["lora", "full"])
def test_targets_only_loss_equals_the_models_own_loss_and_gradients(tiny_model_path, packed, chunk, method):
    model = _model(tiny_model_path, method)
    examples = _examples(model.config.vocab_size)
    batch = collate([packed_row(examples[:2]), packed_row(examples[2:])] if packed else examples, pad_id=0)
    n_items = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    assert n_items > 2 * chunk or chunk == 1024
    decoder, head = targets_only_parts(model)
    ref_loss, ref_grads = _loss_and_grads(model, lambda: model(**batch, num_items_in_batch=n_items,
                                                               use_cache=False).loss)
    loss, grads = _loss_and_grads(model, lambda: targets_only_loss(decoder, head, batch, n_items, chunk=chunk))
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    assert grads.keys() == ref_grads.keys() and len(grads) > 0
    for n in grads:
        torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-4, atol=1e-6, msg=n)


def test_sft_objective_uses_the_targets_only_path_and_validates_the_same(tiny_model_path):
    from contextlib import nullcontext

    model = _model(tiny_model_path)
    examples = _examples(model.config.vocab_size, seed=1)
    fast, plain = SFT(0, (*targets_only_parts(model), nullcontext)), SFT(0)
    batch = fast.collate(examples)
    n = fast.count([batch])
    assert float(fast.loss(model, batch, n)) == pytest.approx(float(plain.loss(model, batch, n)), rel=1e-5)


def test_prompt_learning_and_other_heads_keep_the_full_forward(tiny_model_path):
    assert targets_only_parts(_model(tiny_model_path, "prompt_tuning")) is None
    assert targets_only_parts(_model(tiny_model_path, "adalora")) is None  # its forward adds a regulariser
    model = _model(tiny_model_path, "full")
    model.config.final_logit_softcapping = 30.0
    assert targets_only_parts(model) is None
    model.config.final_logit_softcapping = None
    model.config.model_type = "gemma2"
    assert targets_only_parts(model) is None


def test_trainer_logits_is_checked(tmp_path):
    from conftest import compose

    from ftctl.core.errors import ConfigError

    with pytest.raises(ConfigError, match="trainer.logits='some'"):
        compose("model=tiny_llama", "trainer.logits=some")


# ----------------------------------------------------------------------------- length-grouped batches
def _padding(lengths, batches):
    return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)


def test_length_grouped_batches_cover_each_epoch_once_and_cut_padding():
    rng = random.Random(3)
    n, bs = 403, 4
    lengths = tuple(rng.randint(20, 500) for _ in range(n))
    per_epoch = -(-n // bs)
    for epoch in range(2):
        grouped = [batch_indices(n, bs, 7, True, epoch * per_epoch + k, lengths) for k in range(per_epoch)]
        plain = [batch_indices(n, bs, 7, True, epoch * per_epoch + k) for k in range(per_epoch)]
        assert sorted(i for b in grouped for i in b) == list(range(n))
        assert _padding(lengths, grouped) < 0.2 * _padding(lengths, plain)
    # a pure function of the position (resume sees the same batches), and the epochs differ
    assert batch_indices(n, bs, 7, True, 5, lengths) == batch_indices(n, bs, 7, True, 5, lengths)
    assert [batch_indices(n, bs, 7, True, k, lengths) for k in range(per_epoch)] != \
        [batch_indices(n, bs, 7, True, per_epoch + k, lengths) for k in range(per_epoch)]
    # the longest rows do not all come first: the batches' order is shuffled
    first = [max(lengths[i] for i in batch_indices(n, bs, 7, True, k, lengths)) for k in range(10)]
    assert first != sorted(first, reverse=True)


def test_group_by_length_is_on_for_unpacked_rows_only():
    from conftest import compose

    from ftctl.data.batches import row_lengths

    rows = [{"input_ids": [1] * 3}, {"input_ids": [1] * 7, "rejected_input_ids": [1] * 2}]
    assert row_lengths(compose("model=tiny_llama")[0], rows) == (3, 9)
    assert row_lengths(compose("model=tiny_llama", "data.group_by_length=false")[0], rows) is None
    assert row_lengths(compose("model=tiny_llama", "data.packing=true")[0], rows) is None


def test_plan_counts_one_chunk_of_logits_with_targets_only():
    """ftctl plan follows trainer.logits: 4 x 2048 tokens of Llama 3.1 8B (vocabulary 128,256) hold
    8,192 rows of logits with logits=all, one chunk of 1,024 with logits=targets (bf16: 2 + 8 bytes each)."""
    from conftest import compose

    from ftctl.experiments import plan
    from ftctl.experiments.plan import PlanConfig

    common = ["recipe=qlora_llama", "model=llama3_1_8b", "trainer.batch_size=4", "data.max_length=2048"]
    fast = plan.estimate(compose(*common)[0], PlanConfig(device="cuda"))["parts"]["logits"]
    full = plan.estimate(compose(*common, "trainer.logits=all")[0], PlanConfig(device="cuda"))["parts"]["logits"]
    ddp = plan.estimate(compose(*common)[0], PlanConfig(device="cuda", strategy="ddp", devices=2))["parts"]["logits"]
    assert full == 8192 * 128_256 * 10 and fast == 1024 * 128_256 * 10
    assert ddp == 4096 * 128_256 * 10  # several processes keep the model's own forward
