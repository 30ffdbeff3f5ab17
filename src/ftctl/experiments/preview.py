"""`ftctl data preview`: rendered examples with trained and masked tokens told apart, then stats."""
from __future__ import annotations

from ftctl.core.console import markup_safe, printable
from ftctl.data import pipeline
from ftctl.data.tokenize import IGNORE_INDEX, n_trained
from ftctl.models import load as models
from ftctl.tasks.classify import build_data

OPEN, CLOSE = "⟦", "⟧"  # around trained tokens when the output is not a terminal


def runs(tokenizer, ids: list[int], labels: list[int]) -> list[tuple[str, bool]]:
    """The example as (text, trained) runs: consecutive tokens with the same mask, decoded together."""
    out: list[tuple[str, bool]] = []
    start = 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or (labels[i] != IGNORE_INDEX) != (labels[start] != IGNORE_INDEX):
            out.append((tokenizer.decode(ids[start:i]), labels[start] != IGNORE_INDEX))
            start = i
    return out


def marked(parts: list[tuple[str, bool]]) -> str:
    """Plain text with trained runs between ⟦ and ⟧."""
    return "".join(f"{OPEN}{t}{CLOSE}" if trained else t for t, trained in parts)


def show(cfg, console, n: int = 3, split: str = "train") -> None:
    tokenizer = models.load_tokenizer(models.resolve(cfg.model.path, cfg.model.revision))
    if cfg.get("task", "generate") == "classify":
        return _show_classify(cfg, tokenizer, console, n, split)
    with console.status("rendering and tokenizing the data"):
        bundle = pipeline.build(cfg, tokenizer)
    sd = bundle.split(split)
    examples = sd.unpacked if sd.unpacked is not None else sd.examples
    legend = ("trained tokens in [bold green]green[/], masked tokens [dim]dimmed[/]" if console.is_terminal else
              f"trained tokens are between {OPEN} and {CLOSE}; everything else is masked")
    console.print(f"[bold]{markup_safe(cfg.data.path)}[/] ({split}) with template={markup_safe(cfg.template.name)}, "
                  f"data.train_on={cfg.data.train_on}: {legend}", highlight=False)
    for i, ex in enumerate(examples[:n]):
        _print_example(console, tokenizer, i, ex)
    if not examples:
        console.print(f"(no {split} rows)")
    _print_stats(cfg, bundle, console)


def _print_example(console, tokenizer, i: int, ex: dict) -> None:
    """One example, its trained tokens marked: the text (seq2seq: source, then target), or both answers of a pair."""
    from rich.text import Text

    seqs = [("", ex["input_ids"], ex["labels"])]
    if len(ex["labels"]) != len(ex["input_ids"]):  # model.kind=seq2seq: the source, then the target
        seqs = [("source + target", ex["input_ids"] + ex["labels"], [IGNORE_INDEX] * len(ex["input_ids"]) + ex["labels"])]
    if "rejected_input_ids" in ex:
        seqs = [("chosen", ex["input_ids"], ex["labels"]),
                ("rejected", ex["rejected_input_ids"], ex["rejected_labels"])]
    for label, ids, labels in seqs:
        n_train = n_trained(labels)
        title = f"── example {i + 1}{' ' + label if label else ''}: {len(ids)} tokens, {n_train} trained "
        console.print(title + "─" * max(0, 60 - len(title)), highlight=False, markup=False)
        # control characters from the data are shown escaped (\x1b), never sent to the terminal
        parts = [(printable(t), trained) for t, trained in runs(tokenizer, ids, labels)]
        if console.is_terminal:
            text = Text()
            for t, trained in parts:
                text.append(t, style="bold green" if trained else "dim")
            console.print(text)
        else:
            console.print(marked(parts), highlight=False, markup=False)


def _print_stats(cfg, bundle, console) -> None:
    """Rows, drops, tokens, length percentiles and packing per split; then what was skipped and why."""
    from rich.table import Table

    table = Table(title="data", show_header=True, header_style="bold")
    table.add_column("")
    splits = [s for s in (bundle.train, bundle.validation, bundle.test) if s.rows or s is bundle.train]
    for s in splits:
        table.add_column(s.name, justify="right")

    def row(label, fn):
        table.add_row(label, *[fn(s) for s in splits])

    row("rows", lambda s: f"{s.rows:,}")
    row("kept", lambda s: f"{s.kept:,}")
    row("bad rows skipped", lambda s: f"{s.skipped_bad:,}")
    row("too long, dropped", lambda s: f"{s.dropped_too_long:,}")
    row("truncated", lambda s: f"{s.truncated:,}")
    if bundle.train.mixed_in:
        row("mixed in", lambda s: f"{s.mixed_in:,}")
    row("tokens", lambda s: f"{s.tokens:,}")
    row("trained tokens", lambda s: f"{s.target_tokens:,}")
    for q in (50, 90, 99):
        row(f"length p{q}", lambda s, q=q: f"{s.percentile(q):,}")
    row("length max", lambda s: f"{max(s.lengths, default=0):,}")
    if cfg.data.packing:
        row("packed rows", lambda s: f"{s.packed_rows:,}" if s.packing_efficiency is not None else "-")
        row("packing efficiency", lambda s: f"{100 * s.packing_efficiency:.1f}%" if s.packing_efficiency is not None
            else "-")
    console.print(table)
    for line in bundle.train.mix_reports:
        console.print(printable(line), highlight=False, markup=False)
    for s in splits:
        for bad in s.bad_examples:
            console.print(printable(f"skipped ({s.name}): {bad}"), highlight=False, markup=False)
    console.print(f"max_length={cfg.data.max_length}, overlong={cfg.data.overlong}, bad_rows={cfg.data.bad_rows}; "
                  f"tokenized data {'from the cache' if bundle.cache_misses == 0 else 'cached for next time'}",
                  highlight=False)


def _show_classify(cfg, tokenizer, console, n: int, split: str) -> None:
    """task=classify: the first rows' text as the model sees it (decoded tokens) and their label, then counts."""

    with console.status("reading and tokenizing the data"):
        bundle = build_data(cfg, tokenizer)
    sd = bundle.split(split)
    examples = bundle.train_unbalanced if split == "train" else sd.examples
    console.print(f"[bold]{markup_safe(cfg.data.path)}[/] ({split}), task=classify, labels "
                  f"{markup_safe(bundle.labels)}", highlight=False)
    for i, ex in enumerate(examples[:n]):
        console.print(printable(f"── example {i + 1}: {len(ex['input_ids'])} tokens, label "
                                f"{bundle.labels[ex['label']]} ──"), highlight=False, markup=False)
        console.print(printable(tokenizer.decode(ex["input_ids"])), highlight=False, markup=False)
    for s in (bundle.train, bundle.validation, bundle.test):
        counts = {lab: sum(1 for e in (bundle.train_unbalanced if s is bundle.train else s.examples)
                           if e["label"] == k) for k, lab in enumerate(bundle.labels)}
        console.print(printable(f"{s.name}: {pipeline.describe(s)}; rows per label {counts}; tokens p50 "
                                f"{s.percentile(50)}, p95 {s.percentile(95)}, max {s.percentile(100)}"),
                      highlight=False, markup=False)
    if bundle.balance_report:
        console.print(printable(f"data.balance={cfg.data.balance}: {bundle.balance_report}"), highlight=False,
                      markup=False)
