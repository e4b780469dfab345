"""Tar shards in img2dataset's webdataset layout: write them, list them, stream their samples.

A shard is a plain tar file. A sample is a run of consecutive members sharing a key (the member name up to the
first '.' of its basename, as webdataset groups them):

    000000123.jpg    the image (or .png / .webp ...)
    000000123.txt    the raw caption
    000000123.json   {"key": "000000123", "captions": {"raw": [...], "short": [...], "long": [...]}, ...}

Every caption field is a LIST of sentences, split offline. A field that is a plain string is refused
(`validate_captions`): sampling sentences from a string picks single characters and training silently
collapses (COSMOS_METHOD.md section 4). Shards written by other tools, with only `KEY.txt`, read as
captions {"raw": split_sentences(txt)}.

Beside the shards: `sizes.json` (shard name -> sample count) and `manifest.json` (what was written, what was
skipped and why, checksums, the command). Every file gets its final name only once it is complete.

Streaming (`iter_shard`, `iter_samples`) yields one dict per sample:

    {"__key__": str, "__url__": shard path, "image": bytes, "image_ext": "jpg", "captions": {field: [str]},
     "meta": {the rest of KEY.json}}

A corrupt member or sample is skipped and counted in a `ReadStats`, never fatal, and so is a sample whose
captions are well typed but unusable (an empty sentence, no sentence, not UTF-8); a caption structure of the
wrong type (a field that is a string or not a list: a data-preparation bug, not corruption) raises CosmosError.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

from ..paths import json_safe
from ..errors import CosmosError

SIZES_FILE = "sizes.json"
MANIFEST_FILE = "manifest.json"
# Image members, in the order we look for them when a sample carries more than one.
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
_KEY_RE = re.compile(r"^[^.]+$")
_BRACE_RE = re.compile(r"\{(\d+)\.\.(\d+)\}")
_SURROGATE = re.compile("[\ud800-\udfff]")  # code points that cannot be encoded as UTF-8


# --- Captions: the one rule every file must follow ------------------------------------------------------------


class CaptionContentError(CosmosError):
    """A caption structure that is well formed but unusable in this one sample. Readers skip such a sample
    (counted); only wrong TYPES are fatal. `kind`: "empty-caption" (an empty sentence, or no sentence at all)
    or "caption-not-utf8" (text that cannot be encoded as UTF-8)."""

    def __init__(self, message: str, kind: str):
        super().__init__(message)
        self.kind = kind

    def __reduce__(self):  # keep `kind` through pickling (pool and DataLoader workers)
        return type(self), (str(self), self.kind)


def validate_captions(captions: Any, where: str) -> dict[str, list[str]]:
    """Check that `captions` maps each field name to a LIST of non-empty strings; return a clean copy.

    `where` names the file or sample in the error message. A field holding a plain string is the FLAIR collapse
    (a sentence sampler would pick characters), so it is refused with a message that says exactly that. Wrong
    types (not an object, a field that is not a list, an item that is not a string) raise CosmosError: that is a
    bug in how the data was made. Bad content in an otherwise well-typed sample (an empty sentence, no sentence in
    any field, a lone surrogate that is not valid UTF-8) raises its subclass CaptionContentError. Empty lists are
    allowed for a field, but the sample must have at least one sentence in total.
    """
    if not isinstance(captions, dict):
        raise CosmosError(
            f"{where}: 'captions' is a {type(captions).__name__}, not an object mapping field names to lists of "
            "sentences; write it as {\"raw\": [\"sentence\", ...], ...}"
        )
    clean: dict[str, list[str]] = {}
    for field, value in captions.items():
        if isinstance(value, str):
            raise CosmosError(
                f"{where}: caption field {field!r} is a string, not a list of sentences; split it into a list "
                "(cosmos.data.preprocess.split_sentences, or rerun `cosmos preprocess`): sampling sentences from "
                "a string picks single characters and training silently collapses"
            )
        if not isinstance(value, list):
            raise CosmosError(
                f"{where}: caption field {field!r} is a {type(value).__name__}, not a list of sentences; "
                "write it as a JSON list of strings"
            )
        for i, sentence in enumerate(value):
            if not isinstance(sentence, str):
                raise CosmosError(
                    f"{where}: caption field {field!r} item {i} is a {type(sentence).__name__}, not a string; "
                    "every sentence must be a string"
                )
            if not sentence.strip():
                raise CaptionContentError(
                    f"{where}: caption field {field!r} item {i} is an empty sentence; drop empty sentences "
                    "(cosmos.data.preprocess.split_sentences does)", "empty-caption"
                )
            if _SURROGATE.search(sentence):
                raise CaptionContentError(
                    f"{where}: caption field {field!r} item {i} is not valid UTF-8 (it holds a lone surrogate such "
                    "as \\ud800); fix the text encoding of this caption", "caption-not-utf8"
                )
        clean[str(field)] = list(value)
    if not any(clean.values()):
        raise CaptionContentError(f"{where}: no caption sentences in any field; every sample needs at least one",
                                  "empty-caption")
    return clean


def sample_files(
    key: str,
    image_bytes: bytes,
    image_ext: str,
    captions: dict[str, list[str]],
    raw_caption: str,
    meta: dict | None = None,
) -> dict[str, bytes]:
    """The members of one sample: {"<image_ext>": image, "txt": raw caption, "json": key + captions + meta}.

    Captions are validated first, so a shard can never carry a string where a list of sentences belongs.
    """
    image_ext = image_ext.lower().lstrip(".")
    if image_ext not in IMAGE_EXTS:
        raise CosmosError(f"sample {key!r}: image extension {image_ext!r} is not one of {', '.join(IMAGE_EXTS)}")
    captions = validate_captions(captions, where=f"sample {key!r}")
    extra = dict(meta or {})
    for reserved in ("key", "captions"):
        if reserved in extra:
            raise CosmosError(f"sample {key!r}: meta may not use the reserved name {reserved!r}")
    record = {"key": key, "captions": captions, **extra}
    try:
        txt = raw_caption.encode("utf-8")
    except UnicodeEncodeError:
        raise CaptionContentError(f"sample {key!r}: the raw caption is not valid UTF-8 (it holds a lone "
                                  "surrogate); fix the text encoding of this caption", "caption-not-utf8") from None
    try:
        record_json = json.dumps(json_safe(record), ensure_ascii=False, sort_keys=True).encode("utf-8")
    except UnicodeEncodeError:
        raise CaptionContentError(f"sample {key!r}: a metadata value is not valid UTF-8 (it holds a lone "
                                  "surrogate); fix the text encoding of this sample's metadata",
                                  "caption-not-utf8") from None
    except (TypeError, ValueError) as e:
        raise CosmosError(f"sample {key!r}: metadata cannot be stored as JSON ({e}); pass only JSON types") from None
    return {image_ext: image_bytes, "txt": txt, "json": record_json}


# --- Writing: atomic files, shards, sizes.json, manifest.json -------------------------------------------------


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file and a rename, so `path` is never half-written."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise CosmosError(f"{path}: cannot write ({e.strerror or e}); check the free space and permissions "
                          "of this folder") from None
    finally:
        tmp.unlink(missing_ok=True)  # gone already after a successful rename


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(json_safe(obj), indent=2, ensure_ascii=False) + "\n").encode("utf-8"))


def write_manifest(out_dir: str | Path, manifest: dict) -> None:
    """Write `out_dir/manifest.json` atomically."""
    atomic_write_json(Path(out_dir) / MANIFEST_FILE, manifest)


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class ShardWriter:
    """Write samples into tar shards of at most `maxcount` samples each, named by `pattern`.

    Each shard is written as NAME.tar.tmp and renamed to NAME.tar when full (or at close); `close()` writes
    sizes.json (shard name -> sample count) and returns that mapping. Members get a fixed mtime and mode, so
    the same samples give byte-identical shards. Use as a context manager: on an exception the unfinished
    shard is deleted and no sizes.json is written.
    """

    def __init__(self, out_dir: str | Path, maxcount: int = 1000, pattern: str = "{:05d}.tar"):
        if maxcount < 1:
            raise CosmosError(f"ShardWriter: maxcount must be at least 1, got {maxcount}")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.maxcount = maxcount
        self.pattern = pattern
        self.sizes: dict[str, int] = {}
        self.checksums: dict[str, str] = {}  # shard name -> sha256, filled as shards are finished
        self._index = 0
        self._tar: tarfile.TarFile | None = None
        self._name = ""
        self._count = 0
        self._keys_in_shard: set[str] = set()
        self._closed = False

    def write(self, key: str, files: dict[str, bytes]) -> None:
        """Add one sample: members KEY.ext for each (ext, bytes) in `files`.

        Everything is checked before the first member is added, so a refused sample leaves nothing in the shard.
        """
        if self._closed:
            raise CosmosError("ShardWriter: write() after close()")
        if not isinstance(key, str) or not key or not _KEY_RE.match(key) or key.startswith("/"):
            raise CosmosError(f"ShardWriter: sample key {key!r} must be non-empty and contain no '.'")
        if not files:
            raise CosmosError(f"ShardWriter: sample {key!r} has no files")
        members: dict[str, bytes] = {}
        for ext, data in files.items():
            name = ext.lstrip(".") if isinstance(ext, str) else ""
            if not name or "/" in name:
                raise CosmosError(f"ShardWriter: sample {key!r} has a bad member extension {ext!r}")
            if name in members:
                raise CosmosError(f"ShardWriter: sample {key!r} names the member {key}.{name} twice")
            if not isinstance(data, (bytes, bytearray)):
                raise CosmosError(f"ShardWriter: member {key}.{name} must be bytes, got {type(data).__name__}")
            members[name] = bytes(data)
        if self._tar is not None and self._count < self.maxcount and key in self._keys_in_shard:
            raise CosmosError(f"ShardWriter: sample key {key!r} written twice in {self._name}; keys must be unique")
        if self._tar is None or self._count >= self.maxcount:
            self._finish_shard()
            self._open_shard()
        self._keys_in_shard.add(key)
        for name, data in members.items():
            info = tarfile.TarInfo(f"{key}.{name}")
            info.size = len(data)
            info.mtime = 0
            info.mode = 0o644
            info.uname = info.gname = "cosmos"
            self._tar.addfile(info, io.BytesIO(data))
        self._count += 1

    def close(self) -> dict[str, int]:
        """Finish the last shard, write sizes.json, return {shard name: sample count}."""
        if not self._closed:
            self._finish_shard()
            atomic_write_json(self.out_dir / SIZES_FILE, self.sizes)
            self._closed = True
        return dict(self.sizes)

    def abort(self) -> None:
        """Drop the unfinished shard (its .tmp file); finished shards stay, no sizes.json is written."""
        if self._tar is not None:
            self._tar.close()
            (self.out_dir / (self._name + ".tmp")).unlink(missing_ok=True)
            self._tar = None
        self._closed = True

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def _open_shard(self) -> None:
        self._name = self.pattern.format(self._index)
        self._index += 1
        self._tar = tarfile.open(self.out_dir / (self._name + ".tmp"), mode="w")
        self._count = 0
        self._keys_in_shard = set()

    def _finish_shard(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        self._tar = None
        tmp = self.out_dir / (self._name + ".tmp")
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        self.checksums[self._name] = file_sha256(tmp)
        os.replace(tmp, self.out_dir / self._name)
        self.sizes[self._name] = self._count


# --- Listing shards: directories, brace patterns, "::" lists --------------------------------------------------


def _expand_braces(pattern: str) -> list[str]:
    """'a/{00..02}.tar' -> ['a/00.tar', 'a/01.tar', 'a/02.tar']; several ranges give their product, in order."""
    match = _BRACE_RE.search(pattern)
    if match is None:
        return [pattern]
    lo, hi = match.group(1), match.group(2)
    if int(hi) < int(lo):
        raise CosmosError(f"shard pattern {pattern!r}: range {{{lo}..{hi}}} is empty (end before start)")
    width = len(lo)
    head, tail = pattern[: match.start()], pattern[match.end():]
    out: list[str] = []
    for i in range(int(lo), int(hi) + 1):
        out.extend(_expand_braces(f"{head}{i:0{width}d}{tail}"))
    return out


def expand_sources(spec: str) -> list[str]:
    """Shard paths named by `spec`: a directory (its *.tar files, sorted), a brace pattern
    "dir/{00000..00099}.tar", a single .tar file, or several of these joined by "::". Every path must exist."""
    if not spec or not spec.strip():
        raise CosmosError("no shard source given; pass a directory of .tar shards, a pattern like "
                          "'shards/{00000..00009}.tar', or several joined by '::'")
    shards: list[str] = []
    for part in spec.split("::"):
        part = part.strip()
        if not part:
            continue
        path = Path(part).expanduser()
        if _BRACE_RE.search(part):
            paths = _expand_braces(str(path))
            missing = [p for p in paths if not Path(p).is_file()]
            if missing:
                raise CosmosError(f"shard pattern {part!r}: {len(missing)} of {len(paths)} shards are missing, "
                                  f"first {missing[0]}; check the range")
            shards.extend(paths)
        elif path.is_dir():
            found = sorted(str(p) for p in path.glob("*.tar") if p.is_file())
            if not found:
                raise CosmosError(f"{path}: no .tar shards in this directory; make some with `cosmos preprocess`")
            shards.extend(found)
        elif path.is_file():
            shards.append(str(path))
        else:
            raise CosmosError(f"{path}: no such shard file or directory")
    if not shards:
        raise CosmosError(f"shard source {spec!r} names no shards")
    seen: set[str] = set()
    for s in shards:
        real = os.path.realpath(s)
        if real in seen:
            raise CosmosError(f"shard {s} is listed twice in {spec!r}; each shard may appear once per epoch")
        seen.add(real)
    return shards


def known_sizes(shards: Iterable[str]) -> dict[str, int]:
    """Sample counts recorded in the sizes.json beside each shard (shards without a record are left out)."""
    cache: dict[Path, dict] = {}
    sizes: dict[str, int] = {}
    for shard in shards:
        folder = Path(shard).parent
        if folder not in cache:
            try:
                record = json.loads((folder / SIZES_FILE).read_text(encoding="utf-8"))
            except (OSError, ValueError):
                record = {}
            cache[folder] = record if isinstance(record, dict) else {}
        count = cache[folder].get(Path(shard).name)
        if isinstance(count, int):
            sizes[shard] = count
    return sizes


def shard_sizes(shards: Iterable[str]) -> dict[str, int] | None:
    """Sample counts from the sizes.json beside each shard; None if any shard has no recorded count."""
    shards = list(shards)
    sizes = known_sizes(shards)
    return sizes if len(sizes) == len(shards) else None


# --- Streaming: tar members -> grouped samples -> sample dicts ------------------------------------------------


@dataclass
class ReadStats:
    """What reading skipped. `corrupt_shards`: shards whose tar stream broke (the rest of that shard is lost);
    `bad_samples`: samples dropped for a missing/undecodable member (no image, no caption, bad JSON or UTF-8);
    `bad_images`: images that failed to decode when the loader decoded them; `samples`: samples yielded."""

    samples: int = 0
    bad_samples: int = 0
    corrupt_shards: int = 0
    bad_images: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def split_key(name: str) -> tuple[str, str] | None:
    """'dir/000123.seg.png' -> ('dir/000123', 'seg.png'): the key is everything up to the first '.' of the
    basename, as webdataset groups members. None for names without an extension."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    if not dot or not stem:
        return None
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def iter_members(url: str, stats: ReadStats, expected: int | None = None,
                 share: tuple[int, int] = (1, 0)) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Stream a tar file and yield (key, {ext: bytes}) for each run of consecutive members sharing a key.

    `share=(k, t)`: yield only the sample groups whose index j in the tar (counting every group) has j % k == t;
    the bytes of the other groups are never read (the stream skips over them), so k readers splitting one shard
    each read only their own part.

    If the tar stream breaks, the sample being read is dropped, the shard is counted in
    `stats.corrupt_shards`, and iteration moves on (the rest of that shard cannot be found in a stream).
    A tar cut exactly between two members reads as a shorter valid archive; `expected` (the count in
    sizes.json) catches that: fewer samples than expected also counts the shard as corrupt.
    """
    k, t = share
    key, files = None, {}
    groups = 0  # sample groups started so far; the current one has index groups - 1
    try:
        with tarfile.open(url, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                parts = split_key(member.name)
                if parts is None:
                    continue
                member_key, ext = parts
                if member_key != key:  # the previous sample is complete: hand it out before reading on
                    if key is not None and (groups - 1) % k == t:
                        yield key, files
                    key, files = member_key, {}
                    groups += 1
                if (groups - 1) % k == t:
                    files[ext] = tar.extractfile(member).read()
    except (tarfile.TarError, EOFError, OSError, zlib.error):
        stats.corrupt_shards += 1
        return
    if key is not None and (groups - 1) % k == t:
        yield key, files
    if expected is not None and groups < expected:
        stats.corrupt_shards += 1


class BadSample(Exception):
    """A sample that cannot be used (missing or undecodable member, unusable caption content): skipped and
    counted, never fatal."""


def decode_sample(key: str, files: dict[str, bytes], url: str) -> dict:
    """Turn grouped members into the sample dict. Raises BadSample for a missing or undecodable member or unusable
    caption content (an empty sentence, no sentence, not UTF-8), and CosmosError for a caption structure of the
    wrong type (a field that is a string or not a list ...): that is a bug in how the shards were made."""
    from .preprocess import split_sentences  # preprocess imports this module

    image_ext = next((ext for ext in IMAGE_EXTS if ext in files), None)
    if image_ext is None:
        raise BadSample(f"{url}: sample {key!r} has no image member ({', '.join(sorted(files)) or 'no members'})")
    meta: dict = {}
    captions = None
    where = f"{url}: {key}.json"
    if "json" in files:
        try:
            record = json.loads(files["json"].decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            raise BadSample(f"{where}: not valid UTF-8 JSON ({e})") from None
        if not isinstance(record, dict):
            raise BadSample(f"{where}: is a {type(record).__name__}, not a JSON object")
        meta = {k: v for k, v in record.items() if k not in ("captions", "key")}
        if "captions" in record:
            try:
                captions = validate_captions(record["captions"], where=where)
            except CaptionContentError as e:
                raise BadSample(str(e)) from None
    if captions is None:
        if "txt" not in files:
            raise BadSample(f"{url}: sample {key!r} has no caption (no .txt member and no 'captions' in .json)")
        try:
            text = files["txt"].decode("utf-8")
        except UnicodeDecodeError:
            raise BadSample(f"{url}: {key}.txt is not UTF-8") from None
        sentences = split_sentences(text)
        if not sentences:
            raise BadSample(f"{url}: {key}.txt is an empty caption")
        captions = {"raw": sentences}
    return {
        "__key__": key,
        "__url__": url,
        "image": files[image_ext],
        "image_ext": image_ext,
        "captions": captions,
        "meta": meta,
    }


def iter_shard(url: str, stats: ReadStats | None = None, expected: int | None = None) -> Iterator[dict]:
    """Yield the sample dicts of one shard in file order; bad samples are skipped and counted in `stats`
    (`expected`: the shard's recorded sample count, to notice a shard cut between two members)."""
    stats = stats if stats is not None else ReadStats()
    for key, files in iter_members(url, stats, expected):
        try:
            sample = decode_sample(key, files, url)
        except BadSample:
            stats.bad_samples += 1
            continue
        stats.samples += 1
        yield sample


def iter_samples(spec: str, stats: ReadStats | None = None) -> Iterator[dict]:
    """Every sample of every shard named by `spec`, in listing order (no shuffling, no splitting)."""
    stats = stats if stats is not None else ReadStats()
    shards = expand_sources(spec)
    sizes = known_sizes(shards)
    for url in shards:
        yield from iter_shard(url, stats, sizes.get(url))
