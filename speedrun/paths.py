"""Where speedrun keeps its files: ``$SPEEDRUN_HOME`` (default ``~/.speedrun``)."""
from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    return Path(os.environ.get("SPEEDRUN_HOME", Path.home() / ".speedrun")).expanduser()


def cache_dir() -> Path:
    """Prepared datasets and measured hardware peaks."""
    return home() / "cache"


def datasets_dir() -> Path:
    """Downloaded raw datasets."""
    return home() / "datasets"


def default_store() -> Path:
    return Path(os.environ.get("SPEEDRUN_STORE", home() / "runs.sqlite")).expanduser()
