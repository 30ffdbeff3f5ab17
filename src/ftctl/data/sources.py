"""Read rows from local files (json list, jsonl; .gz too) or a built-in generator."""
from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path

from ..errors import DataError
from ..registry import DATASETS


def _open_text(path: Path) -> str:
    raw = path.read_bytes()
    if path.suffix == ".gz":
        raw = gzip.decompress(raw)
    return raw.decode("utf-8")


def read_rows(spec: str, key: str = "data.path") -> tuple[list[dict], str]:
    """Rows and a fingerprint (sha256 of the bytes the rows came from) for ``spec``."""
    if spec.startswith("builtin:"):
        rows = DATASETS.get(spec.split(":", 1)[1])()
        blob = json.dumps(rows, sort_keys=True).encode()
        return rows, hashlib.sha256(blob).hexdigest()
    path = Path(spec).expanduser()
    if not path.is_file():
        raise DataError(f"{key}: no such file: {path}")
    try:
        text = _open_text(path)
    except (OSError, UnicodeDecodeError, gzip.BadGzipFile) as e:
        raise DataError(f"{key}: cannot read {path}: {e}") from e
    fingerprint = hashlib.sha256(text.encode()).hexdigest()
    name = path.name[:-3] if path.suffix == ".gz" else path.name
    if name.endswith(".jsonl"):
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: not valid JSON ({e.msg})") from e
            if not isinstance(row, dict):
                raise DataError(f"{path}:{n}: each line must be a JSON object")
            rows.append(row)
    elif name.endswith(".json"):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from e
        if isinstance(rows, dict) and isinstance(rows.get("data"), list):
            rows = rows["data"]
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise DataError(f"{path}: expected a JSON list of objects")
    else:
        raise DataError(f"{key}: {path}: unsupported file type (use .json or .jsonl, optionally .gz)")
    if not rows:
        raise DataError(f"{key}: {path} holds no rows")
    return rows, fingerprint
