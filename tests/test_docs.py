"""The documentation's commands: every pasteable `ftctl ...` command in README.md and docs/*.md parses and
composes (`ftctl.cli.check_command`), so a renamed key or option cannot leave a stale example behind.

Commands come from shell code blocks (```bash, ```sh, ```console or a bare ```: lines starting with
`ftctl `, after an optional `$ ` prompt, with `\\` continuations joined and `# comments` dropped) and from
inline code spans (`ftctl train ...` in tables and prose). Usage forms with metavariables (`run=DIR`,
`[key=value ...]`, `<time>`, `...`, `a|b`, `$(...)`) are not pasteable and are skipped, counted.
"""
from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# the first word after `ftctl` that makes a span or a line a command (not `ftctl --help`, not prose)
COMMAND_WORDS = {"train", "eval", "merge", "quantize", "generate", "chat", "report", "sweep", "runs", "plan",
                 "data", "recipes", "methods"}
SHELL_FENCES = {"", "bash", "sh", "shell", "console"}
# the second word of two-word commands, and the commands complete without arguments; in prose, `ftctl eval`
# or `ftctl sweep report` alone names a command rather than showing one
SUBCOMMANDS = {"data": "preview", "sweep": "report", "runs": "compare"}
NO_ARGUMENTS = {"recipes", "methods"}

# commands that name the reader's own files: they are right as documented, and cannot compose here
READER_SPECIFIC = {
    "ftctl train recipe=path/to/my_recipe.yaml": "the reader's own recipe file",
    "ftctl train recipe=my_recipe": "a recipe in the reader's FTCTL_RECIPES folder",
}

# the docs hold 65 pasteable commands (and 33 usage forms); a floor near that, so that a broken extraction (or a
# docs move that hides the commands from it) fails rather than checking nothing
MIN_CHECKED = 60

_METAVAR = re.compile(r"^[A-Z][A-Z0-9_]*$")  # DIR, NAME, FILE, N, RUN_A ...


@dataclass(frozen=True)
class DocCommand:
    file: str  # relative to the repository root
    line: int
    text: str  # as written (continuations joined, comment dropped)
    argv: tuple[str, ...]  # after `ftctl`; empty when skipped
    skip: str | None  # why it is not checked

    def where(self) -> str:
        return f"{self.file}:{self.line}"


def _placeholder(text: str, argv: list[str]) -> str | None:
    """Why ``text`` is usage syntax rather than a pasteable command, or None."""
    if "..." in text or "…" in text:
        return "'...'"
    if re.search(r"<[^<>\s]+>", text):
        return "<placeholder>"
    if "$" in text:
        return "shell expansion"
    lex = shlex.shlex(text, posix=True, punctuation_chars="|")
    lex.whitespace_split = True
    if "|" in list(lex):
        return "'a|b' alternatives"
    for a in argv:
        if a.startswith("["):
            return "[optional] usage"
        value = a.split("=", 1)[1] if "=" in a else a
        if _METAVAR.match(value):
            return f"metavariable {value}"
    return None


def _without_comment(text: str, words: list[str]) -> str:
    """``text`` up to its trailing ``# comment`` (the shortest prefix that splits into ``words``)."""
    for m in re.finditer(r"\s#", text):
        try:
            if shlex.split(text[:m.start()]) == words:
                return text[:m.start()]
        except ValueError:  # the `#` is inside quotes
            continue
    return text


def _command(file: str, line: int, text: str, inline: bool = False) -> DocCommand | None:
    """The command ``text`` (after `ftctl`), skipped with a reason, or None when it is not a command."""
    text = " ".join(text.split())
    try:
        words = shlex.split(text, comments=True)
    except ValueError as e:  # unbalanced quotes
        return DocCommand(file, line, text, (), f"unparsable: {e}")
    if len(words) < 2 or words[0] != "ftctl" or words[1] not in COMMAND_WORDS:
        return None
    name = words[1:3] if len(words) > 2 and SUBCOMMANDS.get(words[1]) == words[2] else words[1:2]
    if inline and len(words) == 1 + len(name) and words[1] not in NO_ARGUMENTS:
        return None  # a command's name in prose
    text = _without_comment(text, words)
    argv = words[1:]
    skip = _placeholder(text, argv)
    if skip is None and text in READER_SPECIFIC:
        skip = READER_SPECIFIC[text]
    return DocCommand(file, line, text, () if skip else tuple(argv), skip)


def extract(path: Path) -> list[DocCommand]:
    """The `ftctl` commands of one Markdown file, in order."""
    file = str(path.relative_to(ROOT))
    lines = path.read_text().split("\n")
    found: list[DocCommand] = []
    prose = list(lines)  # the file with fenced blocks blanked, for inline spans
    fence: str | None = None  # the open fence's language
    i = 0
    while i < len(lines):
        m = re.match(r"^\s*(```+|~~~+)\s*([\w+-]*)", lines[i])
        if m:
            fence = None if fence is not None else m.group(2).lower()
            prose[i] = ""
            i += 1
            continue
        if fence is None:
            i += 1
            continue
        prose[i] = ""
        start, text = i, lines[i]
        while text.endswith("\\") and i + 1 < len(lines):  # a `\` continuation
            i += 1
            prose[i] = ""
            text = text[:-1] + " " + lines[i]
        i += 1
        if fence not in SHELL_FENCES:
            continue
        text = text.strip()
        if text.startswith("$ "):
            text = text[2:].lstrip()
        if text.startswith("ftctl "):
            cmd = _command(file, start + 1, text)
            if cmd:
                found.append(cmd)
    body = "\n".join(prose)
    for m in re.finditer(r"(?<!`)`(ftctl [^`]+)`(?!`)", body):
        text = m.group(1).replace("\\|", "|")  # `\|` is a pipe escaped for a Markdown table
        cmd = _command(file, body.count("\n", 0, m.start()) + 1, text, inline=True)
        if cmd:
            found.append(cmd)
    return sorted(found, key=lambda c: c.line)


def all_commands() -> list[DocCommand]:
    return [c for f in DOC_FILES for c in extract(f)]


def _summary(cmds: list[DocCommand]) -> str:
    checked = [c for c in cmds if not c.skip]
    return f"{len(checked)} documented commands checked, {len(cmds) - len(checked)} skipped as usage syntax"


# ----------------------------------------------------------------------------- extraction (no ftctl needed)
def test_extraction_finds_the_documented_commands():
    cmds = all_commands()
    checked = [c for c in cmds if not c.skip]
    print(_summary(cmds))
    assert len(checked) >= MIN_CHECKED, _summary(cmds)
    by_text = {c.text: c for c in cmds}
    # a quoted list survives as one argument
    assert ("train", "recipe=lora_smollm2", "trainer.max_steps=20", "output_dir=outputs/tracked", "overwrite=true",
            "logging.report_to=[tensorboard,mlflow]") in {c.argv for c in checked}
    # a `\` continuation is joined and the quotes are removed
    assert any(c.argv[-2:] == ("trainer.lr=interval(1e-4,2e-3)", "peft.r=choice(4,8,16)") for c in checked)
    # a trailing `# comment` is dropped
    assert ("eval", "exact_match", "rouge", "run=outputs/try", "compare=base") in {c.argv for c in checked}
    # inline spans in prose and tables are found; usage forms are skipped
    assert by_text["ftctl train recipe=dialogsum_flan data.path=/data/dialogsum.test.jsonl"].skip is None
    assert by_text["ftctl sweep report DIR [metric=NAME]"].skip
    assert by_text["ftctl recipes"].skip is None
    # every README and docs page that has commands is read; the reader-specific ones are still documented
    assert {c.file for c in checked} >= {"README.md", "docs/distributed.md", "docs/after-training.md"}
    assert set(READER_SPECIFIC) <= set(by_text), set(READER_SPECIFIC) - set(by_text)


def test_placeholders_are_recognised():
    def skip(text):
        c = _command("x.md", 1, text)
        return c.skip if c else "not a command"

    assert skip("ftctl eval METRIC... run=DIR") and skip("ftctl merge run=DIR") and skip("ftctl runs [DIR ...]")
    assert skip("ftctl eval rouge run=outputs/x/<time>") and skip("ftctl plan strategy=ddp|zero1")
    assert skip("ftctl report run=multirun/x/$(ls multirun/x | tail -1)") and skip("ftctl --help")
    assert skip("ftctl train recipe=lora_smollm2 trainer.max_steps=10 # a comment") is None
    assert skip("ftctl train 'peft.target_modules=\".*(28|29)\\..*\"'") is None  # a quoted | is a value


# ----------------------------------------------------------------------------- the commands compose
def _ftctl_error() -> type[Exception]:
    from ftctl.core.errors import FtctlError

    return FtctlError


def test_documented_commands_compose(monkeypatch):
    from ftctl.cli import check_command

    FtctlError = _ftctl_error()
    monkeypatch.chdir(ROOT)  # relative paths in the docs are relative to where ftctl runs
    monkeypatch.delenv("FTCTL_RECIPES", raising=False)
    cmds = all_commands()
    checked = [c for c in cmds if not c.skip]
    assert len(checked) >= MIN_CHECKED, _summary(cmds)
    output_dirs = {a.split("=", 1)[1] for c in checked for a in c.argv if a.startswith("output_dir=")}
    new_dirs = {d for d in output_dirs if not Path(d).exists()}
    failures = []
    for c in checked:
        try:
            check_command(list(c.argv))
        except FtctlError as e:
            failures.append(f"{c.where()}: {c.text}\n    -> {e}")
        except Exception as e:  # noqa: BLE001 - report every command, whatever broke
            failures.append(f"{c.where()}: {c.text}\n    -> {type(e).__name__}: {e}")
    print(_summary(cmds))
    assert not failures, f"{len(failures)} of {len(checked)} documented commands fail:\n" + "\n".join(failures)
    written = sorted(d for d in new_dirs if Path(d).exists())
    assert not written, f"check_command wrote output directories: {written}"


@pytest.mark.parametrize("argv, words", [
    (["train", "recipe=lora_smollm2", "trainer.no_such_key=1"], "no_such_key"),
    (["train", "recipe=lora_smollm2", "peft=no_such_method"], "no_such_method"),
    (["train", "recipe=no_such_recipe"], "no_such_recipe"),
    (["eval", "exact_match", "run=outputs/try", "no_such_option=1"], "no_such_option"),
    (["no_such_command"], "no_such_command"),
])
def test_check_command_rejects_a_stale_command(argv, words):
    from ftctl.cli import check_command

    with pytest.raises(_ftctl_error(), match=words):
        check_command(argv)


# ----------------------------------------------------------------------------- links between the pages
def _anchors(path: Path) -> set[str]:
    """GitHub's anchors for the headings of a Markdown file (outside code blocks)."""
    out, seen, fence = set(), {}, False
    for line in path.read_text().split("\n"):
        if re.match(r"^\s*(```|~~~)", line):
            fence = not fence
        m = None if fence else re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def test_links_between_pages_resolve():
    broken = []
    for f in DOC_FILES:
        for i, line in enumerate(f.read_text().split("\n"), 1):
            for target in re.findall(r"\]\(([^)\s]+)\)", line):
                if re.match(r"^[a-z]+:", target):  # http:, https:, mailto:
                    continue
                file, _, anchor = target.partition("#")
                dest = (f.parent / file).resolve() if file else f
                if not dest.exists():
                    broken.append(f"{f.relative_to(ROOT)}:{i}: {target} (no such file)")
                elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                    broken.append(f"{f.relative_to(ROOT)}:{i}: {target} (no such heading)")
    assert not broken, "broken links:\n" + "\n".join(broken)
