"""From a config's ``data`` and ``template`` sections to tokenized train / validation / test splits.

source rows -> column mapping -> template -> tokens and label mask -> length policy, in one batched
``datasets.map`` whose result is cached on disk under a key made of everything it depends on (the
source's bytes, the column mapping, the template settings, the tokenizer, train_on, max_length,
overlong), so a re-run skips the work and a change to any of them cannot reuse a stale result.
Splitting, the bad-row policy, mixing and packing come after the cache: they are cheap.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from ftctl.core.atomic import atomic_folder
from ftctl.core.errors import DataError, ModelNotFoundError
from ftctl.core.paths import cache_dir
from ftctl.core.registry import TEMPLATES
from ftctl.data.sources import read_source, source_fingerprint
from ftctl.data.templates import Context, Pair
from ftctl.data.tokenize import IGNORE_INDEX, encode, encode_seq2seq, n_trained, pack, packed_row

log = logging.getLogger("ftctl")

PIPELINE_VERSION = "7"  # bump when rendering or tokenization changes, so old caches are not reused
SHOW_BAD = 3  # how many skipped rows are named in the report
CACHE_DONE = "ftctl-done"  # written last into a cache entry: an entry without it is never read


@dataclass
class SplitData:
    name: str
    examples: list[dict] = field(default_factory=list, repr=False)  # what batches are made of
    prompts: list[str] = field(default_factory=list, repr=False)  # kept rows, for generation at eval
    references: list[str] = field(default_factory=list, repr=False)
    all_references: list[list[str]] = field(default_factory=list, repr=False)  # data.references, for eval
    rows: int = 0  # rows in the split before any policy
    kept: int = 0
    skipped_bad: int = 0
    dropped_too_long: int = 0
    truncated: int = 0
    mixed_in: int = 0  # rows added from data.mix sources (train split)
    tokens: int = 0
    target_tokens: int = 0
    lengths: list[int] = field(default_factory=list, repr=False)
    bad_examples: list[str] = field(default_factory=list)
    packed_rows: int = 0
    packing_efficiency: float | None = None
    unpacked: list[dict] | None = field(default=None, repr=False)  # the examples before packing
    mix_reports: list[str] = field(default_factory=list)  # one line per data.mix source (train split)

    def percentile(self, q: float) -> int:
        if not self.lengths:
            return 0
        s = sorted(self.lengths)
        return s[min(len(s) - 1, int(round(q / 100 * (len(s) - 1))))]


@dataclass
class DataBundle:
    train: SplitData
    validation: SplitData
    test: SplitData
    fingerprint: str
    cache_hits: int = 0
    cache_misses: int = 0
    preference: bool = False

    def split(self, name: str) -> SplitData:
        if name not in ("train", "validation", "test"):
            raise DataError(f"split={name!r}; choose train, validation or test")
        return getattr(self, name)


# ----------------------------------------------------------------------------- fingerprints
def tokenizer_fingerprint(tokenizer) -> str:
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is not None and hasattr(backend, "to_str"):
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    for attr in ("chat_template", "bos_token", "eos_token", "pad_token", "add_bos_token", "add_eos_token",
                 "special_tokens_map"):
        h.update(f"\x00{attr}={getattr(tokenizer, attr, None)}".encode())
    return h.hexdigest()


def _cache_root() -> Path:

    return cache_dir() / "data"


# ----------------------------------------------------------------------------- one source
def _lookup(row: dict, path: str):
    """A field, or a nested one: ``answers.text.0`` is row["answers"]["text"][0]."""
    value = row
    for part in path.split("."):
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, list) and part.lstrip("-").isdigit() and -len(value) <= int(part) < len(value):
            value = value[int(part)]
        else:
            raise KeyError(path)
    return value


def map_columns(row: dict, columns: dict) -> dict:
    if not columns:
        return row
    out = dict(row)
    for dst, src in columns.items():
        try:
            out[dst] = row[src] if src in row else _lookup(row, src)
        except KeyError:
            raise DataError(f"field '{src}' is missing (data.columns.{dst}={src})") from None
    return out


def _name_mapped(message: str, columns: dict) -> str:
    """Name the file's field in a template's message about a mapped field: 'answer (data.columns.output)'."""
    for dst, src in columns.items():
        message = message.replace(f"field '{dst}'", f"field '{src}' (data.columns.{dst})")
    return message


def _empty() -> dict:
    return {"status": "ok", "error": "", "input_ids": [], "labels": [], "rejected_input_ids": [],
            "rejected_labels": [], "prompt": "", "reference": "", "references": [], "length": 0, "truncated": False}


def _process(row: dict, tpl, ctx: Context, tokenizer, data_cfg, seq2seq: bool = False) -> dict:
    """One row -> a record of the cached table. Bad rows are marked, not raised: the policy comes later."""
    out = _empty()
    columns = dict(data_cfg.columns or {})
    try:
        row = map_columns(row, columns)
        rendered = tpl(row, ctx)
    except DataError as e:
        out.update(status="bad", error=_name_mapped(e.message, columns))
        return out
    return _encode(rendered, row, out, tokenizer, data_cfg, seq2seq)


def _encode(rendered, row: dict, out: dict, tokenizer, data_cfg, seq2seq: bool = False) -> dict:
    pair = isinstance(rendered, Pair)
    chosen = rendered.chosen if pair else rendered
    if seq2seq and (pair or not chosen.plain):
        out.update(status="bad", error="model.kind=seq2seq takes prompt/answer templates (alpaca, flan, completion), "
                                       "not preference pairs or chat templates")
        return out
    seqs = [encode_seq2seq(tokenizer, chosen) if seq2seq else encode(tokenizer, chosen, data_cfg.train_on)]
    if pair:
        seqs.append(encode(tokenizer, rendered.rejected, data_cfg.train_on))
    refs = [row[f] for f in (data_cfg.get("references") or []) if isinstance(row.get(f), str) and row[f].strip()]
    out.update(prompt=chosen.prompt, reference=chosen.reference, references=refs or [chosen.reference],
               length=max(len(s[0]) for s in seqs))
    if out["length"] > data_cfg.max_length:
        if data_cfg.overlong != "truncate":
            out.update(status="too_long")
            return out
        seqs = [(ids[:data_cfg.max_length], labels[:data_cfg.max_length]) for ids, labels in seqs]
        out["truncated"] = True
    for ids, labels in seqs:
        if (sum(x != IGNORE_INDEX for x in labels) if seq2seq else n_trained(labels)) == 0:
            why = (f"data.max_length={data_cfg.max_length} cut every trained token (data.overlong=truncate)"
                   if out["truncated"] else f"every label is masked (nothing to train on with data.train_on="
                                            f"{data_cfg.train_on})")
            out.update(status="bad", error=why)
            return out
    out.update(input_ids=seqs[0][0], labels=seqs[0][1])
    if pair:
        out.update(rejected_input_ids=seqs[1][0], rejected_labels=seqs[1][1])
    return out


def _where(spec: str) -> str:
    p = Path(spec).expanduser()
    return str(p.resolve()) if p.exists() else spec


def _cache_key(spec: str, key: str, split: str | None, data_cfg, tcfg: dict, tokenizer, seed: int,
               limit: int | None, tok_fp: str | None, subset: str | None, seq2seq: bool) -> tuple[dict, str]:
    """(what the tokenized table depends on, its digest): the cache entry's name and its ftctl-done record."""

    uses_seed = tcfg.get("name") == "flan"
    parts = {
        "version": PIPELINE_VERSION, "source": source_fingerprint(spec, key, split, subset), "limit": limit,
        "where": _where(spec),  # row locations (file:line) are part of the cached table
        "columns": dict(data_cfg.columns or {}), "template": tcfg, "seed": seed if uses_seed else None,
        "tokenizer": tok_fp or tokenizer_fingerprint(tokenizer), "train_on": data_cfg.train_on,
        "max_length": data_cfg.max_length, "overlong": data_cfg.overlong,
        "references": list(data_cfg.get("references") or []),
    }
    if seq2seq:  # source and target as two sequences (only then, so other caches keep their keys)
        parts["seq2seq"] = True
    return parts, hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _load_cached(folder: Path):
    """The finished cache entry in ``folder`` (one with its marker file), or None; a damaged one is removed."""
    import datasets

    if not (folder / CACHE_DONE).is_file():
        return None
    try:
        return datasets.load_from_disk(str(folder))
    except Exception as e:  # a damaged cache entry is rebuilt, never trusted
        log.warning("data cache %s unreadable (%s); rebuilding", folder, e)
        shutil.rmtree(folder, ignore_errors=True)
        return None


def _source_table(records):
    """The source's rows as a ``datasets.Dataset``: index, location, the row as JSON, and its read error."""
    import datasets

    return datasets.Dataset.from_dict({
        "idx": list(range(len(records))),
        "loc": [r.loc for r in records],
        # ASCII-escaped, and dates and the like as text, so any row survives the trip through Arrow
        "row": [json.dumps(r.row, default=str) if r.row is not None else "" for r in records],
        "read_error": [r.error or "" for r in records],
    })


def _row_mapper(tpl, ctx: Context, tokenizer, data_cfg, seq2seq: bool):
    """The batched function of ``datasets.map``: each source row to a record of the cached table."""
    def fn(batch):
        cols: dict[str, list] = {}
        for row_json, err in zip(batch["row"], batch["read_error"]):
            if err:
                rec = {**_empty(), "status": "bad", "error": err}
            else:
                row = json.loads(row_json)
                try:  # an escaped unpaired surrogate ("\ud83d") is valid JSON but not text
                    json.dumps(row, ensure_ascii=False).encode("utf-8")
                except UnicodeEncodeError:
                    rec = {**_empty(), "status": "bad", "error": "undecodable text (an unpaired UTF-16 surrogate)"}
                else:
                    rec = _process(row, tpl, ctx, tokenizer, data_cfg, seq2seq)
            for k, v in rec.items():
                cols.setdefault(k, []).append(v)
        return cols
    return fn


def _features():
    """The columns of the cached table, typed."""
    import datasets

    return datasets.Features({
        "idx": datasets.Value("int64"), "loc": datasets.Value("string"), "status": datasets.Value("string"),
        "error": datasets.Value("string"), "input_ids": datasets.Sequence(datasets.Value("int32")),
        "labels": datasets.Sequence(datasets.Value("int32")),
        "rejected_input_ids": datasets.Sequence(datasets.Value("int32")),
        "rejected_labels": datasets.Sequence(datasets.Value("int32")), "prompt": datasets.Value("string"),
        "reference": datasets.Value("string"), "references": datasets.Sequence(datasets.Value("string")),
        "length": datasets.Value("int64"), "truncated": datasets.Value("bool"),
    })


def tokenize_source(spec: str, key: str, split: str | None, data_cfg, template_cfg, tokenizer, seed: int,
                    limit: int | None = None, tok_fp: str | None = None, subset: str | None = None,
                    seq2seq: bool = False):
    """The cached, tokenized table of one source: a ``datasets.Dataset`` with one record per source
    row (bad ones marked), and whether it came from the cache."""
    import datasets

    tcfg = OmegaConf.to_container(template_cfg, resolve=True) if OmegaConf.is_config(template_cfg) else dict(template_cfg)
    parts, digest = _cache_key(spec, key, split, data_cfg, tcfg, tokenizer, seed, limit, tok_fp, subset, seq2seq)
    folder = _cache_root() / digest
    use_cache = data_cfg.get("cache", True) if hasattr(data_cfg, "get") else True
    cached = _load_cached(folder) if use_cache else None
    if cached is not None:
        return cached, True

    src = read_source(spec, key, split, subset)
    records = src.records[:limit] if limit else src.records
    table = _source_table(records)
    fn = _row_mapper(TEMPLATES.get(tcfg.get("name", "alpaca")), Context(cfg=tcfg, tokenizer=tokenizer, seed=seed),
                     tokenizer, data_cfg, seq2seq)
    show = len(records) >= 5000 and os.isatty(2)
    if not show:
        datasets.disable_progress_bars()
    try:
        out = table.map(fn, batched=True, batch_size=256, remove_columns=["row", "read_error"], features=_features(),
                        new_fingerprint=digest, desc=f"tokenizing {src.where}")
        if use_cache:
            _save(out, folder, parts)
    finally:
        if not show:
            datasets.enable_progress_bars()
    return out, False


def _save(table, folder: Path, parts: dict) -> None:
    """Write a cache entry with core.atomic's atomic_folder: the table and then, last, the marker file (what
    they were made from) into a temporary folder, renamed into place. A finished entry written meanwhile by
    another process is kept; an unfinished one (no marker) is replaced. A failure (a full disk, a read-only
    cache) is a warning: it costs speed next time, not this run."""

    def build(tmp: Path) -> None:
        table.save_to_disk(str(tmp))
        (tmp / CACHE_DONE).write_text(json.dumps(parts, sort_keys=True, default=str))

    if (folder / CACHE_DONE).is_file():
        return
    try:
        shutil.rmtree(folder, ignore_errors=True)  # an unfinished or damaged entry, never trusted
        atomic_folder(folder, build)
    except (OSError, ModelNotFoundError) as e:  # ModelNotFoundError: another writer's unfinished folder, meanwhile
        log.warning("could not write the data cache %s: %s", folder, e)


# ----------------------------------------------------------------------------- splits
def split_indices(n: int, val_fraction: float, test_fraction: float, seed: int,
                  has_val: bool, has_test: bool) -> tuple[list[int], list[int], list[int]]:
    """Row indices of train / validation / test; validation and test come from a seeded shuffle
    (a ratio > 0 always holds out at least one row)."""
    order = list(range(n))
    random.Random(seed).shuffle(order)

    def count(frac: float, given: bool) -> int:
        if given or frac <= 0:
            return 0
        return max(1, int(round(n * frac))) if n > 1 else 0

    n_val, n_test = count(val_fraction, has_val), count(test_fraction, has_test)
    if n_val + n_test >= n:
        raise DataError(f"data: {n} rows cannot give {n_val} validation and {n_test} test rows and still train")
    test = sorted(order[n - n_test:]) if n_test else []
    val = sorted(order[n - n_test - n_val:n - n_test]) if n_val else []
    held = set(val) | set(test)
    return [i for i in range(n) if i not in held], val, test


def _apply(name: str, table, indices: list[int], data_cfg, where: str) -> SplitData:
    """The bad-row and length policies over one split's rows of a tokenized table."""
    sd = SplitData(name=name, rows=len(indices))
    if not indices:
        return sd
    sub = table.select(indices)
    status, errors, locs = sub["status"], sub["error"], sub["loc"]
    status, errors, locs = list(status), list(errors), list(locs)
    keep = []
    for i, (st, err, loc) in enumerate(zip(status, errors, locs)):
        if st == "bad":
            if data_cfg.bad_rows == "error":
                raise DataError(f"{loc}: {err} (data.bad_rows=skip drops bad rows and reports them)")
            sd.skipped_bad += 1
            if len(sd.bad_examples) < SHOW_BAD:
                sd.bad_examples.append(f"{loc}: {err}")
        elif st == "too_long":
            if data_cfg.overlong == "error":
                length = sub[i]["length"]
                raise DataError(f"{loc}: {length} tokens > data.max_length={data_cfg.max_length} "
                                "(raise data.max_length, or set data.overlong=drop|truncate)")
            sd.dropped_too_long += 1
        else:
            keep.append(i)
    kept = sub.select(keep)
    cols = kept.select_columns(["input_ids", "labels", "rejected_input_ids", "rejected_labels", "prompt",
                                "reference", "references", "truncated"]).to_dict()
    sd.kept = len(keep)
    sd.truncated = sum(cols["truncated"])
    sd.prompts, sd.references, sd.all_references = cols["prompt"], cols["reference"], cols["references"]
    pref = any(cols["rejected_input_ids"])
    for j in range(sd.kept):
        ex = {"input_ids": cols["input_ids"][j], "labels": cols["labels"][j]}
        if pref:
            ex["rejected_input_ids"] = cols["rejected_input_ids"][j]
            ex["rejected_labels"] = cols["rejected_labels"][j]
        sd.examples.append(ex)
    _count(sd)
    return sd


def _count(sd: SplitData) -> None:
    sd.lengths = [len(e["input_ids"]) for e in sd.examples]
    sd.tokens = sum(sd.lengths)
    sd.target_tokens = sum(n_trained(e["labels"]) for e in sd.examples)


def _mix(train: SplitData, extra: SplitData, weight: float, seed: int) -> int:
    """Add round(weight x task rows) rows of ``extra`` to ``train`` (repeating it if it is smaller)."""
    want = int(round(weight * train.kept))
    if want <= 0 or not extra.examples:
        return 0
    rng = random.Random(seed)
    idx: list[int] = []
    while len(idx) < want:
        order = list(range(len(extra.examples)))
        rng.shuffle(order)
        idx += order[:want - len(idx)]
    train.examples += [extra.examples[i] for i in idx]
    return want


def build(cfg, tokenizer, console=None) -> DataBundle:
    """Every split of the config's data, tokenized. ``cfg`` is the whole run config (data, template, seed)."""
    data_cfg, seed = cfg.data, cfg.seed
    tok_fp = tokenizer_fingerprint(tokenizer)
    seq2seq = cfg.get("model", {}).get("kind", "causal") == "seq2seq"
    hits = misses = 0

    def load(spec, key, split, limit=None, columns=None, subset=None):
        nonlocal hits, misses
        dcfg = data_cfg if columns is None else _with_columns(data_cfg, columns)
        table, hit = tokenize_source(spec, key, split, dcfg, cfg.template, tokenizer, seed, limit=limit, tok_fp=tok_fp,
                                     subset=subset, seq2seq=seq2seq)
        hits, misses = hits + hit, misses + (not hit)
        return table

    table = load(data_cfg.path, "data.path", data_cfg.split, data_cfg.limit, subset=data_cfg.get("subset"))
    tr, va, te = split_indices(len(table), data_cfg.val_fraction, data_cfg.test_fraction, data_cfg.split_seed,
                               bool(data_cfg.val_path), bool(data_cfg.test_path))
    train = _apply("train", table, tr, data_cfg, data_cfg.path)
    fps = [table._fingerprint]

    def held_out(name: str, path, indices):
        """A held-out split: its own file when one is given, else its share of the main source."""
        if not path:
            return _apply(name, table, indices, data_cfg, data_cfg.path)
        t = load(path, f"data.{'val' if name == 'validation' else name}_path", None)
        fps.append(t._fingerprint)
        return _apply(name, t, list(range(len(t))), data_cfg, path)

    validation = held_out("validation", data_cfg.val_path, va)
    test = held_out("test", data_cfg.test_path, te)
    if train.kept == 0:
        raise DataError(f"{data_cfg.path}: no training rows left ({train.rows} rows: {train.skipped_bad} bad rows "
                        f"skipped, {train.dropped_too_long} longer than data.max_length={data_cfg.max_length} dropped)")
    for i, m in enumerate(data_cfg.mix or []):
        mt = load(m.path, f"data.mix[{i}].path", m.get("split"), columns=m.get("columns") or {})
        extra = _apply(f"mix[{i}]", mt, list(range(len(mt))), data_cfg, m.path)
        added = _mix(train, extra, float(m.weight), data_cfg.split_seed + i + 1)
        train.mixed_in += added
        train.mix_reports.append(f"data.mix[{i}] {m.path}: {describe(extra)}; {added} rows added (weight {m.weight})")
        train.bad_examples += extra.bad_examples[:max(0, SHOW_BAD - len(train.bad_examples))]
        fps.append(mt._fingerprint)
    if train.mixed_in:
        _count(train)
    preference = bool(train.examples and "rejected_input_ids" in train.examples[0])
    if data_cfg.packing:
        if preference:
            raise DataError("data.packing=true does not apply to preference pairs")
        _pack(train, data_cfg.max_length)
    fp = hashlib.sha256("".join(fps).encode()).hexdigest()
    return DataBundle(train, validation, test, fp, hits, misses, preference)


def _with_columns(data_cfg, columns):
    c = OmegaConf.create(OmegaConf.to_container(data_cfg, resolve=True)) if OmegaConf.is_config(data_cfg) else data_cfg
    c.columns = dict(columns)
    return c


def _pack(sd: SplitData, max_length: int) -> None:
    bins = pack([len(e["input_ids"]) for e in sd.examples], max_length)
    sd.unpacked = sd.examples
    sd.examples = [packed_row([sd.examples[i] for i in b]) for b in bins]
    sd.packed_rows = len(bins)
    sd.packing_efficiency = sd.tokens / (len(bins) * max_length) if bins else None


def describe(sd: SplitData) -> str:
    """One line of counts for logs and the console."""
    parts = [f"{sd.kept} of {sd.rows} rows kept"]
    if sd.skipped_bad:
        parts.append(f"{sd.skipped_bad} bad skipped")
    if sd.dropped_too_long:
        parts.append(f"{sd.dropped_too_long} too long dropped")
    if sd.truncated:
        parts.append(f"{sd.truncated} truncated")
    if sd.mixed_in:
        parts.append(f"{sd.mixed_in} mixed in ({'; '.join(sd.mix_reports)})")
    if sd.packing_efficiency is not None:
        parts.append(f"packed into {sd.packed_rows} rows ({100 * sd.packing_efficiency:.1f}% filled)")
    return ", ".join(parts)


__all__ = ["build", "DataBundle", "SplitData", "IGNORE_INDEX", "describe", "split_indices", "tokenize_source"]
