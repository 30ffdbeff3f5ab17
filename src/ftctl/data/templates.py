"""Prompt templates: each a pure function of a row (and the tokenizer, for chat templates) that
returns the row's text as segments, every segment marked with what it is, so the label mask is
decided by ``data.train_on`` rather than by the template:

- ``target``: part of the row's designated answer (the completion; in a chat row, every assistant
  turn, or the ``completion`` messages when the row gives prompt and completion separately);
- ``assistant``: an assistant turn (in a non-chat template the completion counts as one);
- ``last``: the last assistant turn (or the completion).

``prompt`` and ``reference`` are what generation is conditioned on at evaluation and what it is
scored against. Templates raise DataError naming the field for a missing, mistyped or empty field.

Each template is a ``Template``: ``render`` (a row to its training text), ``prompt`` (a row to the text
generation is conditioned on: the training text minus the answer; ``render`` takes its prompt from
there), ``inference_prompt`` (a user's message, for ``ftctl chat`` and ``generate``, to the prompt of a
row that asks it) and ``plain`` (whether that text takes the tokenizer's special tokens, as training
gives them). So training, ``ftctl eval``, ``chat`` and ``generate`` condition on the same text.
"""
from __future__ import annotations

import hashlib
import json
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

from ftctl.core.errors import ConfigError, DataError
from ftctl.core.registry import TEMPLATES
from ftctl.data import jinja


@dataclass
class Segment:
    text: str
    target: bool = False
    assistant: bool = False
    last: bool = False


@dataclass
class Rendered:
    segments: list[Segment]
    prompt: str
    reference: str
    # plain templates: the first segment gets the tokenizer's special tokens (BOS) and an EOS follows
    # the answer; a chat template writes its own special and end-of-turn tokens
    plain: bool = True

    @property
    def text(self) -> str:
        return "".join(s.text for s in self.segments)


@dataclass
class Pair:
    """A preference row: the same prompt with a chosen and a rejected answer."""
    chosen: Rendered
    rejected: Rendered


@dataclass
class Context:
    """What a template may look at besides the row: its config section, the tokenizer, the seed."""
    cfg: Any = None
    tokenizer: Any = None
    seed: int = 0

    def get(self, key: str, default=None):
        if self.cfg is None:
            return default
        value = self.cfg.get(key, default) if hasattr(self.cfg, "get") else getattr(self.cfg, key, default)
        return default if value is None else value


def _str_field(row: dict, key: str, required: bool = True, allow_empty: bool = False) -> str:
    if key not in row or row[key] is None:
        if required:
            raise DataError(f"field '{key}' is missing")
        return ""
    value = row[key]
    if not isinstance(value, str):
        raise DataError(f"field '{key}' must be a string (got {type(value).__name__})")
    if not allow_empty and required and not value.strip():
        raise DataError(f"field '{key}' is empty")
    return value


def _answer(prompt: str, completion: str) -> Rendered:
    return Rendered([Segment(prompt), Segment(completion, target=True, assistant=True, last=True)],
                    prompt=prompt, reference=completion)


class Template(ABC):
    """A registered template. Called like a function, it renders a row for training: ``alpaca(row)``."""

    def __call__(self, row: dict, ctx: Context | None = None) -> Rendered | Pair:
        return self.render(row, ctx)

    @abstractmethod
    def render(self, row: dict, ctx: Context | None = None) -> Rendered | Pair:
        """The row's training text, in segments (its ``prompt`` is ``self.prompt(row, ctx)``)."""

    @abstractmethod
    def prompt(self, row: dict, ctx: Context | None = None) -> str:
        """The text generation is conditioned on for this row: its training text minus the answer."""

    def question(self, text: str, ctx: Context | None, system: str | None, history: list | None) -> dict:
        """A row that asks ``text`` (after ``history``, a list of user/assistant messages), as training saw rows;
        what the default ``inference_prompt`` renders (a template that overrides that need not say)."""
        raise NotImplementedError(f"{type(self).__name__} renders its inference prompt itself")

    def inference_prompt(self, text: str, ctx: Context | None = None, system: str | None = None,
                         history: list | None = None) -> str:
        """What ``ftctl chat`` and ``generate`` send for a user's message: the prompt of the row asking it."""
        return self.prompt(self.question(text, ctx, system, history), ctx)

    def plain(self, ctx: Context | None = None) -> bool:
        """Whether the prompt takes the tokenizer's special tokens (BOS), as plain training text does;
        a chat template writes its own."""
        return True


# ----------------------------------------------------------------------------- alpaca
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


class Alpaca(Template):
    """Alpaca rows: ``instruction``, optional ``input``, ``output``. An empty input uses the no-input prompt."""

    def render(self, row: dict, ctx: Context | None = None) -> Rendered:
        _str_field(row, "instruction")  # the fields are checked in this order: instruction, output, input
        output = _str_field(row, "output")
        return _answer(self.prompt(row, ctx), output)

    def prompt(self, row: dict, ctx: Context | None = None) -> str:
        instruction = _str_field(row, "instruction")
        inp = _str_field(row, "input", required=False)
        if inp.strip():
            return ALPACA_PROMPT_INPUT.format(instruction=instruction, input=inp)
        return ALPACA_PROMPT_NO_INPUT.format(instruction=instruction)

    def question(self, text, ctx=None, system=None, history=None) -> dict:
        return {"instruction": text}


alpaca = TEMPLATES.register("alpaca")(Alpaca())


# ----------------------------------------------------------------------------- flan
def pick(seed: int, row: dict, n: int) -> int:
    """A phrasing index that depends only on the seed and the row's content."""
    blob = json.dumps(row, sort_keys=True, ensure_ascii=False, default=str)
    return int(hashlib.sha256(f"{seed}\x00{blob}".encode()).hexdigest()[:12], 16) % n


def flan_prompt(text: str) -> str:
    """A flan prompt as the model sees it: stripped, then one newline."""
    return text.strip() + "\n"


class Flan(Template):
    """A set of Jinja phrasings, each ``prompt ||| target`` (promptsource style); one per row, chosen
    from the seed and the row. The prompt ends with a newline; the target is stripped."""

    def render(self, row: dict, ctx: Context) -> Rendered:
        prompt, target = self._phrased(row, ctx)
        return _answer(prompt, target)

    def prompt(self, row: dict, ctx: Context) -> str:
        return self._phrased(row, ctx)[0]

    def inference_prompt(self, text, ctx=None, system=None, history=None) -> str:
        """The user's message is the phrased question itself (no phrasing applies to free text)."""
        return flan_prompt(text)

    @staticmethod
    def _phrased(row: dict, ctx: Context) -> tuple[str, str]:
        """(prompt, target) of the row's phrasing."""
        phrasings = list(ctx.get("phrasings", []) or [])
        if not phrasings:
            raise DataError("template=flan needs template.phrasings (a list of 'prompt ||| target' Jinja strings)")
        i = pick(ctx.seed, row, len(phrasings))
        source = phrasings[i]
        values = dict(ctx.get("vars", {}) or {})
        values.update({k: v for k, v in row.items() if v is not None})  # a null field is missing, never "None"
        text = jinja.render(source, values, where=f"template.phrasings[{i}]")
        if text.count("|||") != 1:
            raise DataError(f"template.phrasings[{i}] must contain '|||' exactly once (prompt ||| target)")
        prompt, target = text.split("|||")
        if not target.strip():
            raise DataError(f"template.phrasings[{i}] renders an empty target for this row")
        return flan_prompt(prompt), target.strip()


flan = TEMPLATES.register("flan")(Flan())


# ----------------------------------------------------------------------------- completion
class Completion(Template):
    """``prompt`` + ``completion`` (loss on the completion), or ``text`` alone (continued pre-training:
    every token is a target)."""

    def render(self, row: dict, ctx: Context | None = None) -> Rendered:
        prompt = self.prompt(row, ctx)
        if "completion" in row or "prompt" in row:
            return _answer(prompt, _str_field(row, "completion"))
        text = _str_field(row, "text")
        return Rendered([Segment(text, target=True, assistant=True, last=True)], prompt=prompt, reference=text)

    def prompt(self, row: dict, ctx: Context | None = None) -> str:
        if "completion" in row or "prompt" in row:
            return _str_field(row, "prompt", allow_empty=True)
        if "text" in row:
            return ""  # continued pre-training: the whole text is the answer
        raise DataError("field 'completion' is missing (completion rows need prompt + completion, or text)")

    def question(self, text, ctx=None, system=None, history=None) -> dict:
        return {"prompt": text}


completion = TEMPLATES.register("completion")(Completion())


# ----------------------------------------------------------------------------- chat
_TRANSCRIPT = re.compile(r"\n\n(Human|Assistant):")


def parse_transcript(text: str) -> list[dict]:
    """HH-RLHF style ``\\n\\nHuman: ... \\n\\nAssistant: ...`` into OpenAI-style messages."""
    parts = _TRANSCRIPT.split(text)
    if parts[0].strip() or len(parts) < 3:
        raise DataError("a transcript string must be '\\n\\nHuman: ... \\n\\nAssistant: ...' turns")
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[parts[i]], "content": parts[i + 1].strip()} for i in range(1, len(parts), 2)]


_ROLES = ("system", "user", "assistant", "tool")


def _messages(value, key: str) -> list[dict]:
    if isinstance(value, str):
        return parse_transcript(value)
    if not isinstance(value, list) or not value:
        raise DataError(f"field '{key}' must be a non-empty list of messages (or a Human/Assistant transcript)")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise DataError(f"field '{key}[{i}]' must be an object with role and content")
        role = m.get("role")
        if role not in _ROLES:
            raise DataError(f"field '{key}[{i}].role' is {role!r}; allowed: {', '.join(_ROLES)}")
        content = m.get("content")
        if content is None and role == "assistant" and m.get("tool_calls"):
            m = {**m, "content": ""}
        elif not isinstance(content, str):
            raise DataError(f"field '{key}[{i}].content' must be a string (got {type(content).__name__})")
        out.append(m)
    return out


class ChatRenderer:
    """Render messages with the tokenizer's chat template, or with ``template.chat_template`` (Jinja,
    sandboxed). Turn boundaries come from rendering growing prefixes of the conversation."""

    def __init__(self, ctx: Context):
        self.ctx = ctx
        self.source = ctx.get("chat_template")
        self.where = "template.chat_template" if self.source else "the tokenizer's chat template"
        tok = ctx.tokenizer
        if tok is None:
            raise DataError("a chat template needs the model's tokenizer")
        if not self.source and not getattr(tok, "chat_template", None):
            raise DataError("the model's tokenizer has no chat template; set template.chat_template (Jinja)")

    def __call__(self, messages: list[dict], generation_prompt: bool = False, tools=None) -> str:
        if not messages and not generation_prompt:
            return ""
        tok = self.ctx.tokenizer
        kwargs = {"tools": tools} if tools else {}
        if self.source:  # rendered the way transformers renders every chat template: in its Jinja sandbox
            kwargs["chat_template"] = self.source
        try:
            with jinja.time_limit(self.where):  # a recipe's template that loops for ever stops (ConfigError)
                return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt,
                                               **kwargs)
        except ConfigError:
            raise
        except Exception as e:  # whatever the template or the row did wrong is this row's problem
            from jinja2.exceptions import SecurityError

            if isinstance(e, SecurityError):
                raise DataError(f"{self.where}: refused by the template sandbox ({e})") from e
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise DataError(f"{self.where} failed on this row: {type(e).__name__}: {first[:200]}") from e

    def segments(self, messages: list[dict], n_prompt: int = 0, tools=None) -> list[Segment]:
        """Segments of the whole conversation. Assistant turns at index >= n_prompt are targets
        (n_prompt=0: every assistant turn). The text between turns (role headers) is context."""
        eos = self.ctx.tokenizer.eos_token or ""
        asst = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        segs: list[Segment] = []
        done = ""
        if asst and asst[0] == 0:
            raise DataError("message 0 is an assistant turn; a conversation starts with a system or user message")
        for k in asst:
            before = self(messages[:k], generation_prompt=True, tools=tools)
            upto = self(messages[:k + 1], tools=tools)
            if not before.startswith(done) or not upto.startswith(before):
                raise DataError("the chat template does not render turns incrementally (a later turn rewrites an "
                                "earlier one), so assistant turns cannot be located; use template.chat_template")
            if len(before) > len(done):
                segs.append(Segment(before[len(done):]))
            turn = upto[len(before):]
            tail = ""
            if eos and eos in turn:  # train up to and including the end-of-turn token, not what follows it
                cut = turn.rindex(eos) + len(eos)
                turn, tail = turn[:cut], turn[cut:]
            target = k >= n_prompt
            segs.append(Segment(turn, target=target, assistant=True, last=k == asst[-1]))
            if tail:
                segs.append(Segment(tail))
            done = upto
        full = self(messages, tools=tools)
        if not full.startswith(done):
            raise DataError("the chat template does not render turns incrementally; use template.chat_template")
        if len(full) > len(done):
            segs.append(Segment(full[len(done):]))
        return segs


def _system(messages: list[dict], ctx: Context) -> list[dict]:
    system = ctx.get("system")
    if system and messages[0]["role"] != "system":
        return [{"role": "system", "content": system}] + messages
    return messages


def _conversation(row: dict, ctx: Context) -> tuple[list[dict], int, int]:
    """(messages with the template's system message, n_prompt, the answer's index: the last assistant turn
    at or after n_prompt) of a chat row."""
    if "messages" in row:
        messages, n_prompt = _system(_messages(row["messages"], "messages"), ctx), 0
    elif "prompt" in row and "completion" in row:
        prompt = row["prompt"]
        prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else _messages(prompt, "prompt")
        comp = row["completion"]
        comp = [{"role": "assistant", "content": comp}] if isinstance(comp, str) else _messages(comp, "completion")
        messages = _system(prompt + comp, ctx)
        n_prompt = len(messages) - len(comp)
    else:
        raise DataError("field 'messages' is missing (chat rows need messages, or prompt + completion)")
    asst = [i for i, m in enumerate(messages) if m["role"] == "assistant" and i >= n_prompt]
    if not asst:
        raise DataError("the conversation has no assistant turn to train on")
    return messages, n_prompt, asst[-1]


class Chat(Template):
    """OpenAI-style ``messages`` (system, user, assistant, tool; tool calls kept), or ``prompt`` and
    ``completion`` message lists; a Human/Assistant transcript string works as ``messages`` too."""

    def render(self, row: dict, ctx: Context) -> Rendered:
        render = ChatRenderer(ctx)
        messages, n_prompt, last = _conversation(row, ctx)
        if not (messages[last]["content"].strip() or messages[last].get("tool_calls")):
            raise DataError(f"the last assistant turn (message {last}) is empty")
        segs = render.segments(messages, n_prompt=n_prompt, tools=row.get("tools"))
        return Rendered(segs, prompt=self._before(render, messages, last, row), reference=messages[last]["content"],
                        plain=False)

    def prompt(self, row: dict, ctx: Context) -> str:
        messages, _, last = _conversation(row, ctx)
        return self._before(ChatRenderer(ctx), messages, last, row)

    @staticmethod
    def _before(render: ChatRenderer, messages: list[dict], last: int, row: dict) -> str:
        """The conversation up to the answer, with the generation prompt (the answer's header)."""
        return render(messages[:last], generation_prompt=True, tools=row.get("tools"))

    def question(self, text, ctx=None, system=None, history=None) -> dict:
        """The conversation so far and the user's message, with an empty answer to be written."""
        head = [{"role": "system", "content": system}] if system else []
        return {"messages": head + list(history or []) + [{"role": "user", "content": text},
                                                           {"role": "assistant", "content": ""}]}

    def plain(self, ctx: Context | None = None) -> bool:
        return False


chat = TEMPLATES.register("chat")(Chat())


# ----------------------------------------------------------------------------- preference
def split_transcripts(chosen: str, rejected: str) -> tuple[str, str, str]:
    """Two HH-RLHF transcripts that share all but the last assistant turn -> (prompt, chosen, rejected);
    the prompt ends with the last shared ``\\n\\nAssistant:``."""
    n = 0
    for a, b in zip(chosen, rejected):
        if a != b:
            break
        n += 1
    marker = "\n\nAssistant:"
    cut = chosen.rfind(marker, 0, n)
    if cut < 0:
        raise DataError("chosen and rejected share no prompt ending in '\\n\\nAssistant:'")
    cut += len(marker)
    if "\n\nHuman:" in chosen[cut:] or "\n\nHuman:" in rejected[cut:]:
        raise DataError("chosen and rejected differ before their last assistant turn")
    return chosen[:cut], chosen[cut:], rejected[cut:]


def _pair_fields(row: dict) -> None:
    if "chosen" not in row or "rejected" not in row:
        raise DataError(f"field '{'chosen' if 'chosen' not in row else 'rejected'}' is missing "
                        "(preference rows need chosen and rejected, and a prompt unless they are full transcripts)")


def _plain_pair(row: dict) -> tuple[str, str, str]:
    """(prompt, chosen, rejected) of a plain preference row."""
    c = _str_field(row, "chosen")
    r = _str_field(row, "rejected")
    if "prompt" in row:
        return _str_field(row, "prompt", allow_empty=True), c, r
    return split_transcripts(c, r)


def _answered(row: dict, key: str) -> list[dict]:
    """The conversation of a chat-style preference row that ends in its ``key`` answer."""
    if "prompt" not in row:
        return _messages(row[key], key)
    p, v = row["prompt"], row[key]
    prompt = [{"role": "user", "content": p}] if isinstance(p, str) else _messages(p, "prompt")
    return prompt + ([{"role": "assistant", "content": v}] if isinstance(v, str) else _messages(v, key))


class Preference(Template):
    """``prompt``/``chosen``/``rejected``, or two full transcripts (``chosen``, ``rejected``; HH-RLHF)
    from which the shared prompt is split off. ``template.style``: plain (text as is) or chat
    (rendered with the chat template)."""

    def render(self, row: dict, ctx: Context) -> Pair:
        style = ctx.get("style", "plain")
        _pair_fields(row)
        if style == "plain":
            p, c, r = _plain_pair(row)
            if not c.strip() or not r.strip():
                raise DataError(f"field '{'chosen' if not c.strip() else 'rejected'}' has an empty answer")
            if c == r:
                raise DataError("chosen and rejected answers are identical")
            chosen_r, rejected_r = _answer(p, c), _answer(p, r)
            chosen_r.reference, rejected_r.reference = c.strip(), r.strip()
            return Pair(chosen_r, rejected_r)
        if style != "chat":
            raise DataError(f"template.style={style!r}; allowed: plain, chat")
        return self._chat_pair(row, ctx)

    def _chat_pair(self, row: dict, ctx: Context) -> Pair:
        render = ChatRenderer(ctx)
        cm, rm = _answered(row, "chosen"), _answered(row, "rejected")
        if "prompt" not in row and (cm[:-1] != rm[:-1] or cm[-1]["role"] != "assistant"
                                    or rm[-1]["role"] != "assistant"):
            raise DataError("chosen and rejected must be the same conversation up to a different last assistant turn")
        if cm[-1] == rm[-1]:
            raise DataError("chosen and rejected answers are identical")
        out = []
        for msgs, key in ((_system(cm, ctx), "chosen"), (_system(rm, ctx), "rejected")):
            if not msgs[-1]["content"].strip():
                raise DataError(f"field '{key}' has an empty answer")
            n_prompt = len(msgs) - 1
            segs = render.segments(msgs, n_prompt=n_prompt)
            for s in segs:
                s.assistant = s.assistant and s.target
                s.last = s.last and s.target
            out.append(Rendered(segs, prompt=render(msgs[:-1], generation_prompt=True),
                                reference=msgs[-1]["content"], plain=False))
        return Pair(*out)

    def prompt(self, row: dict, ctx: Context) -> str:
        """The prompt both answers share."""
        if ctx.get("style", "plain") != "chat":
            return _str_field(row, "prompt", allow_empty=True) if "prompt" in row else _plain_pair(row)[0]
        return ChatRenderer(ctx)(_system(_answered(row, "chosen"), ctx)[:-1], generation_prompt=True)

    def question(self, text, ctx=None, system=None, history=None) -> dict:
        if ctx is None or ctx.get("style", "plain") != "chat":
            return {"prompt": text}  # plain text as is, as training saw the prompts
        head = [{"role": "system", "content": system}] if system else []
        return {"prompt": head + list(history or []) + [{"role": "user", "content": text}], "chosen": ""}

    def plain(self, ctx: Context | None = None) -> bool:
        return ctx is None or ctx.get("style", "plain") != "chat"


preference = TEMPLATES.register("preference")(Preference())


def from_config(cfg, tokenizer=None) -> tuple[Template, Context]:
    """The template a run's config names, and the context it renders in (the config's template section,
    the tokenizer, the seed), as the data pipeline renders the run's rows."""
    tcfg = cfg.template
    return TEMPLATES.get(tcfg.get("name", "alpaca")), Context(cfg=tcfg, tokenizer=tokenizer, seed=cfg.get("seed", 0))
