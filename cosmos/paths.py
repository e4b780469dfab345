"""Where the project's shipped files (weights/, the BPE merges) and its download cache live."""
from __future__ import annotations

import os
import sys
from pathlib import Path

from .errors import CosmosError

REPO_ROOT = Path(__file__).resolve().parent.parent


def weights_dirs() -> list[Path]:
    """Folders that may hold shipped files: the repository's weights/ (editable install, source checkout) and
    the copy a regular install puts under <prefix>/share/cosmos-vlp/weights."""
    return [REPO_ROOT / "weights", Path(sys.prefix) / "share" / "cosmos-vlp" / "weights"]


def find_shipped(name: str) -> Path:
    """Path of a file shipped in weights/; a clear error if it is in none of the places an install puts it."""
    for folder in weights_dirs():
        path = folder / name
        if path.is_file():
            return path
    places = ", ".join(str(d) for d in weights_dirs())
    raise CosmosError(f"shipped file {name!r} not found in {places}; reinstall the package (pip install .)")


def cache_dir() -> Path:
    """Download cache: $COSMOS_CACHE, else $XDG_CACHE_HOME/cosmos, else ~/.cache/cosmos."""
    if os.environ.get("COSMOS_CACHE"):
        return Path(os.environ["COSMOS_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "cosmos"
