"""Where ftctl finds its configs and recipes, and where it caches models."""
from __future__ import annotations

import os
from pathlib import Path

_PKG = Path(__file__).resolve().parents[1]  # the ftctl package


def config_dir() -> Path:
    """The built-in Hydra config tree: the repository's configs/ (editable install) or the copy in the wheel."""
    packaged = _PKG / "_configs"
    return packaged if packaged.is_dir() else _PKG.parents[1] / "configs"


def recipes_dir() -> Path:
    """The built-in recipes: the repository's recipes/ or the copy in the wheel."""
    packaged = _PKG / "_recipes"
    return packaged if packaged.is_dir() else _PKG.parents[1] / "recipes"


def cache_dir() -> Path:
    """ftctl's model cache: $FTCTL_CACHE, else $XDG_CACHE_HOME/ftctl, else ~/.cache/ftctl."""
    if os.environ.get("FTCTL_CACHE"):
        return Path(os.environ["FTCTL_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "ftctl"
