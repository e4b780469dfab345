"""Where the project's shipped files (weights/, the BPE merges) and its download cache live."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from .errors import CosmosError

REPO_ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "cosmos.weights"  # weights/ installed as package data, so it travels with every kind of install


def weights_dirs() -> list[Path]:
    """Folders that may hold shipped files: the installed package `cosmos.weights` (a wheel, `pip install .`,
    `--user`, `--target`, editable), then the repository's weights/ (a source checkout used without installing)."""
    folders = []
    try:
        from importlib.resources import files

        folders.append(Path(str(files(PACKAGE))))
    except (ImportError, ModuleNotFoundError, TypeError):
        pass
    folders.append(REPO_ROOT / "weights")
    return folders


def find_shipped(name: str) -> Path:
    """Path of a file shipped in weights/; a clear error if it is in none of the places an install puts it."""
    for folder in weights_dirs():
        path = folder / name
        if path.is_file():
            return path
    places = ", ".join(str(d) for d in weights_dirs())
    raise CosmosError(f"shipped file {name!r} not found (looked in {places}); the installation is incomplete: "
                      f"reinstall with `pip install --force-reinstall cosmos-vlp` (or `pip install .` from a "
                      f"checkout)")


def cache_dir() -> Path:
    """Download cache: $COSMOS_CACHE, else $XDG_CACHE_HOME/cosmos, else ~/.cache/cosmos."""
    if os.environ.get("COSMOS_CACHE"):
        return Path(os.environ["COSMOS_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "cosmos"


def printable(text: str) -> str:
    """`text` with the bytes of a non-UTF-8 file name (held by Python as lone surrogates, e.g. a Latin-1 'café.jpg'
    listed on a UTF-8 system) written as \\xNN escapes: safe to print and to store in UTF-8 JSON, and readable."""
    if not isinstance(text, str):
        return text
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def json_safe(obj):
    """A copy of a JSON-able object with every string (keys too) passed through `printable`."""
    if isinstance(obj, str):
        return printable(obj)
    if isinstance(obj, dict):
        return {json_safe(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def file_mode() -> int:
    """The permissions a new file gets under this process's umask (mkstemp would make it 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write(path: str | Path, write: Callable[[str], None], suffix: str = ".tmp") -> Path:
    """Write a file atomically: `write(tmp)` fills a temporary file in the same folder, which gets the umask's
    permissions (not mkstemp's 0600) and is renamed over `path`; nothing is left behind if writing fails."""
    import tempfile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, file_mode())
        with open(tmp, "rb+") as f:  # on disk before the rename: a power cut leaves the old file or the new one
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def claim_out_folder(out: Path, overwrite: bool, not_empty: str, clear: Callable[[Path], None]) -> bool:
    """Make `out` ready for a command's outputs: refuse a file, or a non-empty folder without `overwrite` (the error
    is `{out}: {not_empty}`); with `overwrite`, `clear(out)` removes the command's own earlier outputs (only those).
    True when the folder had to be created."""
    if out.exists() and not out.is_dir():
        raise CosmosError(f"{out}: exists and is not a folder; choose another --out")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise CosmosError(f"{out}: {not_empty}")
        clear(out)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    return created
