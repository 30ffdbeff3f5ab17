"""Read rows from a data source: a local file (.json, .jsonl, .csv, .tsv, .parquet; the text ones also
gzipped), a ``datasets`` save_to_disk folder, a hub dataset name, or a built-in generator.

Problems with the whole source raise :class:`DataError` (one line naming the config key and the path).
Problems with one record do not raise: the record comes back as ``Record(loc, None, error)`` so the
caller can apply its bad-rows policy. Heavy imports (datasets, pyarrow) stay inside the functions that
need them.
"""
from __future__ import annotations

import contextlib
import csv
import gzip
import hashlib
import io
import json
import os
import re
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

from ftctl.core.errors import DataError
from ftctl.core.registry import DATASETS


@dataclass
class Record:
    loc: str  # "path.jsonl:17", "path.parquet: row 3", "hub:name[train]: row 3", ...
    row: dict | None  # the row, or None when the record itself is bad
    error: str | None  # None for a good record; else a short reason


@dataclass
class Source:
    records: list[Record]
    fingerprint: str  # sha256 hex; changes whenever the content changes
    where: str  # display name (the path or name as given)


# inner format by suffix; the text ones may also end in .gz
_FORMATS = {".json": "json", ".jsonl": "jsonl", ".csv": "csv", ".tsv": "tsv", ".parquet": "parquet"}
_GZ_OK = ("json", "jsonl", "csv", "tsv")
SUPPORTED = ".json, .jsonl, .csv, .tsv, .parquet, .json.gz, .jsonl.gz, .csv.gz, .tsv.gz"
# suffixes that mark a spec as meant to be a file (so a missing one is "no such file", not a hub name)
_FILE_LIKE = (".json", ".jsonl", ".csv", ".tsv", ".parquet", ".gz", ".txt", ".arrow", ".xlsx", ".xls",
              ".zip", ".bz2", ".xz", ".zst", ".tar", ".yaml", ".yml", ".md", ".ndjson", ".feather")
_HUB_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?")
_SURROGATE = re.compile("[\udc80-\udcff]")  # what surrogateescape makes of bytes that are not UTF-8
_UNDECODABLE = "undecodable bytes (not UTF-8)"
_BOM = b"\xef\xbb\xbf"
_JSON_WS = " \t\n\r"
_CHUNK = 1 << 20


# ---------------------------------------------------------------- public API


def read_source(spec: str, key: str = "data.path", split: str | None = None, subset: str | None = None) -> Source:
    """All records of ``spec`` with their locations, and the content fingerprint."""
    kind, target = _classify(spec, key)
    if kind == "builtin":
        rows = _builtin_rows(target)
        records = [_obj_record(f"builtin:{target}: row {i}", r) for i, r in enumerate(rows, 1)]
        fp = _builtin_fingerprint(rows)
    elif kind == "file":
        fmt, gz = _file_format(target, key)
        if fmt == "parquet":
            data = _read_bytes(target, key)
            records = _parse_parquet(target, data, key)
        else:
            data = _read_bytes(target, key, gz)
            text = _decode(data)
            if not text.strip():
                raise DataError(f"{key}: {target} holds no rows")
            records = {"jsonl": _parse_jsonl, "json": _parse_json, "csv": _parse_csv, "tsv": _parse_tsv}[fmt](
                target, text, key)
        fp = _digest(fmt, [data])
    elif kind == "folder":
        folder, split_name = _disk_split(target, key, split)
        fp = _disk_fingerprint(folder, split_name, key)
        rows = _load_disk(folder, key).to_list()
        records = [_obj_record(f"{target}: row {i}", r) for i, r in enumerate(rows, 1)]
    else:  # hub
        s = split or "train"
        ds = _load_hub(target, s, key, subset)
        fp = _hub_fingerprint(target, s, ds, subset)
        records = [_obj_record(f"hub:{target}[{s}]: row {i}", r) for i, r in enumerate(ds.to_list(), 1)]
    if not records:
        raise DataError(f"{key}: {target} holds no rows")
    return Source(records, fp, spec)


def source_fingerprint(spec: str, key: str = "data.path", split: str | None = None,
                       subset: str | None = None) -> str:
    """The fingerprint ``read_source(spec, key, split)`` would give, without parsing any rows."""
    kind, target = _classify(spec, key)
    if kind == "builtin":
        return _builtin_fingerprint(_builtin_rows(target))
    if kind == "file":
        fmt, gz = _file_format(target, key)
        return _digest(fmt, _iter_bytes(target, key, gz and fmt != "parquet"))
    if kind == "folder":
        folder, split_name = _disk_split(target, key, split)
        return _disk_fingerprint(folder, split_name, key)
    s = split or "train"
    return _hub_fingerprint(target, s, _load_hub(target, s, key, subset), subset)


def read_rows(spec: str, key: str = "data.path") -> tuple[list[dict], str]:
    """Rows and fingerprint of ``spec``; the first bad record raises DataError (transition wrapper)."""
    src = read_source(spec, key)
    for rec in src.records:
        if rec.error is not None:
            raise DataError(f"{rec.loc}: {rec.error}")
    return [rec.row for rec in src.records], src.fingerprint


# ---------------------------------------------------------------- what a spec names


def _classify(spec: str, key: str) -> tuple[str, object]:
    """("builtin", name) | ("file", Path) | ("folder", Path) | ("hub", name)."""
    if spec.startswith("builtin:"):
        return "builtin", spec.split(":", 1)[1]
    if spec.startswith("hub:"):
        return "hub", spec[4:]
    path = Path(spec).expanduser()
    if path.is_dir():
        return "folder", path
    if path.is_file():
        return "file", path
    if path.exists():
        raise DataError(f"{key}: {path} is not a regular file or folder")
    if _looks_like_path(spec) or not _HUB_NAME.fullmatch(spec):
        raise DataError(f"{key}: no such file: {path}")
    return "hub", spec


def _looks_like_path(spec: str) -> bool:
    """A spec meant as a local path, never sent to the hub (a hub dataset is ``name`` or ``owner/name``):
    it starts with ., / or ~, has a backslash or more than one /, ends in a file suffix, or its first
    component is a folder here (``data/rows`` beside a ``data/`` folder is a mistyped file, not a hub id)."""
    return (spec.startswith((".", "/", "~")) or "\\" in spec or spec.count("/") > 1
            or spec.lower().endswith(_FILE_LIKE) or "/" in spec and Path(spec.split("/", 1)[0]).is_dir())


def _file_format(path: Path, key: str) -> tuple[str, bool]:
    name = path.name.lower()
    gz = name.endswith(".gz")
    inner = name[:-3] if gz else name
    fmt = next((f for suf, f in _FORMATS.items() if inner.endswith(suf)), None)
    if fmt is None or (gz and fmt not in _GZ_OK):
        suffix = "".join(path.suffixes[-2:]) if gz else path.suffix
        raise DataError(f"{key}: {path}: unsupported file type {suffix or '(no suffix)'!r} "
                        f"(supported: {SUPPORTED}, or a datasets save_to_disk folder)")
    return fmt, gz


# ---------------------------------------------------------------- bytes, text, fingerprints


def _digest(fmt: str, chunks) -> str:
    h = hashlib.sha256(fmt.encode() + b"\0")
    for c in chunks:
        h.update(c)
    return h.hexdigest()


def _iter_bytes(path: Path, key: str, gz: bool = False):
    """The file's content in chunks (decompressed for .gz), for hashing without holding it all."""
    try:
        with (gzip.open(path, "rb") if gz else open(path, "rb")) as f:
            while chunk := f.read(_CHUNK):
                yield chunk
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise DataError(f"{key}: {path}: not a valid gzip file ({e})") from None
    except OSError as e:
        raise DataError(f"{key}: cannot read {path}: {e.strerror or e}") from None


def _read_bytes(path: Path, key: str, gz: bool = False) -> bytes:
    return b"".join(_iter_bytes(path, key, gz))


def _decode(data: bytes) -> str:
    if data.startswith(_BOM):
        data = data[len(_BOM):]
    return data.decode("utf-8", errors="surrogateescape")


def _builtin_rows(name: str) -> list:
    return DATASETS.get(name)()


def _builtin_fingerprint(rows: list) -> str:
    return hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()


def _type_name(v) -> str:
    return {dict: "object", list: "list", str: "string", bool: "boolean", int: "number", float: "number",
            type(None): "null"}.get(type(v), type(v).__name__)


def _obj_record(loc: str, value) -> Record:
    if isinstance(value, dict):
        return Record(loc, value, None)
    return Record(loc, None, f"not a JSON object (got {_type_name(value)})")


# ---------------------------------------------------------------- text formats


def _parse_jsonl(path: Path, text: str, key: str) -> list[Record]:
    records = []
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        loc = f"{path}:{n}"
        if _SURROGATE.search(line):
            records.append(Record(loc, None, _UNDECODABLE))
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            records.append(Record(loc, None, f"not valid JSON ({e.msg}, column {e.colno})"))
            continue
        records.append(_obj_record(loc, value))
    return records


def _skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in _JSON_WS:
        i += 1
    return i


def _parse_json(path: Path, text: str, key: str) -> list[Record]:
    m = _SURROGATE.search(text)
    if m:
        raise DataError(f"{key}: {path}:{text.count(chr(10), 0, m.start()) + 1}: {_UNDECODABLE}")
    try:
        top = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{key}: {path}:{e.lineno}: not valid JSON ({e.msg})") from None
    if isinstance(top, dict) and isinstance(top.get("data"), list):
        start = _data_value_offset(text)
    elif isinstance(top, list):
        start = _skip_ws(text, 0)
    else:
        got = "an object without a 'data' list" if isinstance(top, dict) else _type_name(top)
        raise DataError(f'{key}: {path}: expected a JSON list of objects (or {{"data": [...]}}), got {got}')
    return [_obj_record(f"{path}:{line}", v) for line, v in _array_elements(text, start)]


def _data_value_offset(text: str) -> int:
    """Offset of the value of the (last, as json.loads keeps) "data" key of the top-level object."""
    dec = json.JSONDecoder()
    i, found = _skip_ws(text, 0) + 1, None  # past "{"
    while True:
        i = _skip_ws(text, i)
        if text[i] == "}":
            return found
        k, i = dec.raw_decode(text, i)
        i = _skip_ws(text, _skip_ws(text, i) + 1)  # past ":"
        if k == "data":
            found = i
        _, i = dec.raw_decode(text, i)
        i = _skip_ws(text, i)
        if text[i] == ",":
            i += 1


def _array_elements(text: str, i: int):
    """(1-based start line, value) for each element of the JSON array at ``text[i] == "["``; the text is
    already known to be valid JSON."""
    dec = json.JSONDecoder()
    i, line, counted = i + 1, 1, 0
    while True:
        i = _skip_ws(text, i)
        if text[i] == "]":
            return
        if text[i] == ",":
            i = _skip_ws(text, i + 1)
        line += text.count("\n", counted, i)
        counted = i
        value, i = dec.raw_decode(text, i)
        yield line, value


@contextlib.contextmanager
def _csv_field_limit():
    old = csv.field_size_limit()
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # long text fields are normal in training data
    try:
        yield
    finally:
        csv.field_size_limit(old)


def _parse_tsv(path: Path, text: str, key: str) -> list[Record]:
    return _parse_csv(path, text, key, delimiter="\t")


def _parse_csv(path: Path, text: str, key: str, delimiter: str = ",") -> list[Record]:
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    header, records = None, []
    with _csv_field_limit():
        while True:
            start = reader.line_num + 1
            try:
                fields = next(reader)
            except StopIteration:
                break
            except csv.Error as e:
                raise DataError(f"{key}: {path}:{start}: cannot parse {'TSV' if delimiter == chr(9) else 'CSV'} "
                                f"({e})") from None
            if not fields:  # blank line
                continue
            if header is None:
                header = fields
                _check_header(path, start, header, key)
                continue
            loc = f"{path}:{start}"
            if any(_SURROGATE.search(f) for f in fields):
                records.append(Record(loc, None, _UNDECODABLE))
            elif len(fields) != len(header):
                records.append(Record(loc, None, f"expected {len(header)} fields (header: {', '.join(header)}), "
                                                 f"got {len(fields)}"))
            else:
                records.append(Record(loc, dict(zip((h.strip() for h in header), fields)), None))
    return records


def _check_header(path: Path, line: int, header: list[str], key: str) -> None:
    where = f"{key}: {path}:{line}"
    if any(_SURROGATE.search(h) for h in header):
        raise DataError(f"{where}: header has {_UNDECODABLE}")
    names = [h.strip() for h in header]
    dupes = sorted({h for h in names if names.count(h) > 1})
    if "" in names or dupes:
        why = "an empty column name" if "" in names else f"duplicate column names ({', '.join(dupes)})"
        raise DataError(f"{where}: header row has {why}; the first line must name the columns")


# ---------------------------------------------------------------- parquet, save_to_disk, hub


def _parse_parquet(path: Path, data: bytes, key: str) -> list[Record]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(pa.BufferReader(data)).to_pylist()
    except (pa.ArrowException, OSError, ValueError) as e:
        raise DataError(f"{key}: {path}: cannot read parquet ({_first_line(e)})") from None
    return [_obj_record(f"{path}: row {i}", r) for i, r in enumerate(rows, 1)]


def _disk_split(folder: Path, key: str, split: str | None) -> tuple[Path, str | None]:
    """The Dataset folder to load (a DatasetDict's split subfolder) and the split name (None for a Dataset)."""
    if (folder / "dataset_dict.json").is_file():
        try:
            splits = json.loads((folder / "dataset_dict.json").read_text())["splits"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DataError(f"{key}: {folder}: unreadable dataset_dict.json ({_first_line(e)})") from None
        s = split or "train"
        if s not in splits:
            raise DataError(f"{key}: {folder}: no split {s!r} (available: {', '.join(splits)})")
        return folder / s, s
    if (folder / "state.json").is_file():
        return folder, None
    raise DataError(f"{key}: {folder} is a folder but not a datasets save_to_disk folder "
                    f"(no dataset_dict.json or state.json)")


def _disk_fingerprint(folder: Path, split: str | None, key: str) -> str:
    try:
        state = json.loads((folder / "state.json").read_text())
        fp = state["_fingerprint"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{key}: {folder}: unreadable state.json ({_first_line(e)})") from None
    return hashlib.sha256(f"save_to_disk\0{split or ''}\0{fp}".encode()).hexdigest()


def _load_disk(folder: Path, key: str):
    import datasets

    try:
        return datasets.load_from_disk(str(folder))
    except Exception as e:  # noqa: BLE001 - any failure here is a bad folder, reported in one line
        raise DataError(f"{key}: {folder}: cannot load save_to_disk folder ({_first_line(e)})") from None


def _hub_fingerprint(name: str, split: str, ds, subset: str | None = None) -> str:
    return hashlib.sha256(f"hub\0{name}\0{subset or ''}\0{split}\0{ds._fingerprint}".encode()).hexdigest()


def _env_true(name: str) -> bool | None:
    v = os.environ.get(name)
    return None if v is None else v.upper() in {"1", "ON", "YES", "TRUE"}


@contextlib.contextmanager
def _offline_as_env_says():
    """datasets and huggingface_hub read HF_DATASETS_OFFLINE / HF_HUB_OFFLINE when imported; if the
    environment asks for offline mode now but they were imported before it was set, honour it for the
    length of this load (and put their flags back after), so an offline run never waits on retries."""
    import datasets.config as dcfg
    import huggingface_hub.constants as hcst

    want = _env_true("HF_DATASETS_OFFLINE")
    if want is None:
        want = bool(_env_true("HF_HUB_OFFLINE") or _env_true("TRANSFORMERS_OFFLINE"))
    if not want or (dcfg.HF_HUB_OFFLINE and hcst.HF_HUB_OFFLINE):
        yield
        return
    saved = dcfg.HF_HUB_OFFLINE, dcfg.HF_DATASETS_OFFLINE, hcst.HF_HUB_OFFLINE
    dcfg.HF_HUB_OFFLINE = dcfg.HF_DATASETS_OFFLINE = hcst.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        dcfg.HF_HUB_OFFLINE, dcfg.HF_DATASETS_OFFLINE, hcst.HF_HUB_OFFLINE = saved


def _load_hub(name: str, split: str, key: str, subset: str | None = None):
    import datasets

    try:
        from huggingface_hub.errors import HfHubHTTPError
    except ImportError:  # pragma: no cover - older huggingface_hub
        HfHubHTTPError = OSError
    try:
        with _offline_as_env_says():
            return datasets.load_dataset(name, subset, split=split)
    except (OSError, HfHubHTTPError) as e:  # ConnectionError, DatasetNotFoundError (a FileNotFoundError), ...
        raise DataError(f"{key}: cannot load hub dataset {name!r} (offline or not found: {_first_line(e)}); "
                        f"use a local file or a save_to_disk folder") from None
    except Exception as e:  # noqa: BLE001 - e.g. an unknown split; one line, not a traceback
        raise DataError(f"{key}: cannot load hub dataset {name!r} split {split!r} ({_first_line(e)})") from None


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return s.splitlines()[0] if s else type(e).__name__
