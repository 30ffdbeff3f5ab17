"""A template renders the inference prompt too: what `ftctl eval`, `chat` and `generate` condition on is
the training text minus the answer, token for token, for every registered template."""
import io

import pytest
from conftest import compose

from ftctl.core.registry import TEMPLATES
from ftctl.data.templates import Context, Pair
from ftctl.data.tokenize import IGNORE_INDEX, encode
from ftctl.train.loop import train

HISTORY = [{"role": "user", "content": "Hello!"}, {"role": "assistant", "content": "Hi. How can I help?"}]
Q = "Write May 5, 2020 as YYYY-MM-DD."
# template name -> cases of (template config, a training row, and the question (text, system, history) a user
# of ftctl chat / generate asks to get that row's prompt, or None where free text has no row)
CASES = {
    "alpaca": [
        ({}, {"instruction": Q, "output": "2020-05-05"}, (Q, None, None)),
        ({}, {"instruction": "Translate.", "input": "Bonjour", "output": "Hello"}, None),
    ],
    "completion": [({}, {"prompt": Q + "\n", "completion": "2020-05-05"}, (Q + "\n", None, None))],
    "flan": [
        ({"phrasings": ["{{question}} ||| {{answer}}"]}, {"question": Q, "answer": "2020-05-05"}, (Q, None, None)),
        ({"phrasings": ["Q: {{question}}\nA: ||| {{answer}}", "{{question}}\nAnswer: ||| {{answer}}"]},
         {"question": Q, "answer": "2020-05-05"}, None),
    ],
    "chat": [
        ({}, {"messages": [{"role": "user", "content": Q}, {"role": "assistant", "content": "2020-05-05"}]},
         (Q, None, None)),
        ({"system": "Answer with a date."}, {"messages": [*HISTORY, {"role": "user", "content": Q},
                                                          {"role": "assistant", "content": "2020-05-05"}]},
         (Q, None, HISTORY)),
        ({}, {"messages": [{"role": "system", "content": "Be brief."}, *HISTORY, {"role": "user", "content": Q},
                           {"role": "assistant", "content": "2020-05-05"}]}, (Q, "Be brief.", HISTORY)),
        ({}, {"prompt": Q, "completion": "2020-05-05"}, (Q, None, None)),
    ],
    "preference": [
        ({"style": "plain"}, {"prompt": Q + "\n", "chosen": "2020-05-05", "rejected": "2020-5-5"},
         (Q + "\n", None, None)),
        ({"style": "plain"}, {"chosen": "\n\nHuman: " + Q + "\n\nAssistant: 2020-05-05",
                              "rejected": "\n\nHuman: " + Q + "\n\nAssistant: May 5"}, None),
        ({"style": "chat"}, {"prompt": Q, "chosen": "2020-05-05", "rejected": "2020-5-5"}, (Q, None, None)),
        ({"style": "chat", "system": "Answer with a date."},
         {"prompt": [*HISTORY, {"role": "user", "content": Q}], "chosen": "2020-05-05", "rejected": "May 5"},
         (Q, None, HISTORY)),
    ],
}


def test_every_registered_template_has_prompt_cases():
    assert sorted(CASES) == TEMPLATES.names()


@pytest.mark.parametrize("name, i", [(n, i) for n in CASES for i in range(len(CASES[n]))])
def test_inference_prompt_is_the_training_text_minus_the_answer(tokenizer, name, i):
    """Token for token: the prompt eval generates from (the rendered row's ``prompt``, the template's
    ``prompt``), and the one chat/generate send for the same question, tokenized as they are (special
    tokens for plain templates only), are the training row's tokens up to its answer."""
    extra, row, question = CASES[name][i]
    template = TEMPLATES.get(name)
    ctx = Context(cfg={"name": name, **extra}, tokenizer=tokenizer, seed=0)
    rendered = template.render(row, ctx)
    r = rendered.chosen if isinstance(rendered, Pair) else rendered
    assert template(row, ctx) == rendered  # called like a function, as the data pipeline calls it
    ids, labels = encode(tokenizer, r, "last")
    k = next(j for j, lab in enumerate(labels) if lab != IGNORE_INDEX)  # the answer's first token
    prompt = template.prompt(row, ctx)
    assert prompt == r.prompt  # what ftctl eval generates from
    assert template.plain(ctx) == r.plain
    assert tokenizer(prompt, add_special_tokens=template.plain(ctx))["input_ids"] == ids[:k]
    assert r.text.startswith(prompt) and r.text[len(prompt):].strip().startswith(r.reference.strip())
    if question is not None:
        text, system, history = question
        assert template.inference_prompt(text, ctx, system, history) == prompt


def _console():
    from rich.console import Console

    return Console(file=io.StringIO())


def test_generate_on_a_plain_preference_run_sends_the_plain_text(tmp_path, monkeypatch, tokenizer):
    """template=preference style: plain trains on the prompt as is (no chat template), so `ftctl generate`
    must send the prompt as is too, with the tokenizer's special tokens (BOS), as training and eval do."""
    assert tokenizer.chat_template, "the tiny model's tokenizer has a chat template; without one this proves nothing"
    run = train(*compose("model=tiny_llama", "data=demo_date_pairs", "template=preference", "data.limit=20",
                         "trainer.max_steps=1", "trainer.eval_every=0", f"output_dir={tmp_path / 'run'}"))
    seen = {}

    def spy(model, tok, texts, **kwargs):
        seen.update(texts=list(texts), add_special_tokens=kwargs.get("add_special_tokens"))
        return ["" for _ in texts]

    monkeypatch.setattr("ftctl.post.chat.generate", spy)
    from ftctl.post.chat import GenerateConfig, generate_cmd

    prompt = "Write May 5, 2020 as YYYY-MM-DD.\n"
    generate_cmd(GenerateConfig(run=str(run), prompt=prompt, max_new_tokens=1), _console())
    assert seen["texts"] == [prompt]
    assert seen["add_special_tokens"] is True
