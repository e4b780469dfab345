"""Image/caption sources -> tar shards: sentence splitting, caption validation, resizing, bad-sample triage.

COSMOS crops TEXT as well as images: every caption field (raw alt-text, short and long synthetic captions) is
split into sentences OFFLINE and stored as a list, so a text crop is a draw of whole sentences
(COSMOS_METHOD.md section 2). This module does that split once, when the shards are made:

1. List the source: a folder of images with sidecar KEY.txt / KEY.json captions (the output folder excluded when
   it lies inside), or a CSV / TSV / JSONL table with an image-path column and caption columns (paths relative to
   the table's folder). Every table row becomes a sample or a skipped entry: CSV follows RFC 4180 quoting, TSV has
   no quoting (one line, one row), a row with the wrong number of columns is skipped as `bad-row`.
2. For each sample (in a worker pool): read the caption(s), split into sentences, validate; read the image,
   decode it, shrink it so the shorter side is at most `max_size` (and no side exceeds JPEG's 65,500 pixels),
   re-encode as JPEG. Anything wrong (missing file, zero bytes, not an image, truncated, decompression bomb,
   empty caption, text that is not UTF-8, a caption field that is a string instead of a list) skips the sample
   with a kind and a reason; anything unforeseen in one sample skips it with kind `error` and the exception.
   Nothing else is lost, and one sample never stops the run.
3. Write good samples in source order with ShardWriter (keys = zero-padded source index, stable and sortable),
   then sizes.json and manifest.json (counts, skipped samples and reasons, checksums, settings, command).
"""
from __future__ import annotations

import codecs
import csv
import io
import json
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from PIL import Image

from ..errors import CosmosError, ImageDecodeError
from ..paths import claim_out_folder
from ..workers import imap_in_pool
from ..images import IMAGE_EXTENSIONS, decode_image
from .shards import (
    MANIFEST_FILE,
    SIZES_FILE,
    CaptionContentError,
    ShardWriter,
    sample_files,
    validate_captions,
    write_manifest,
)

_SENTENCE_SPLIT = re.compile(r"\n|</s>|\.")
KEY_DIGITS = 9
TABLE_SUFFIXES = (".csv", ".tsv", ".jsonl")


# --- 1. Sentences -----------------------------------------------------------------------------------------------


def split_sentences(text: str) -> list[str]:
    """Split a caption into sentences as the COSMOS release does: on newline, "</s>" and "."; strip each piece;
    drop empty ones. "A dog. It runs.\\nGrass" -> ["A dog", "It runs", "Grass"]."""
    return [piece.strip() for piece in _SENTENCE_SPLIT.split(text) if piece.strip()]


# --- 2. Listing a source as jobs ----------------------------------------------------------------------------------


@dataclass
class Job:
    """One sample to process. Captions come from sidecar files (`txt_path`, `json_path`) or from table cells
    (`columns`: column name -> cell value). `error` marks a sample already known to be bad while listing."""

    index: int
    image_path: str | None
    txt_path: str | None = None
    json_path: str | None = None
    columns: dict[str, Any] | None = None
    error: tuple[str, str] | None = None  # (kind, reason)
    where: str | None = None  # "data.csv: line 12", for a table row that has no usable image path

    @property
    def key(self) -> str:
        return f"{self.index:0{KEY_DIGITS}d}"

    @property
    def source(self) -> str:
        return self.image_path or self.txt_path or self.json_path or self.where or f"row {self.index}"


def list_folder(folder: Path, exclude: Path | None = None) -> list[Job]:
    """Images (any common format, recursively, sorted) with their same-stem .txt / .json sidecars.
    A sidecar without an image becomes a job that is skipped as a missing file. Hidden files are ignored, and so
    is everything under `exclude` (the output folder, when it lies inside the source)."""
    images: dict[Path, list[Path]] = {}
    sidecars: dict[Path, dict[str, Path]] = {}
    excluded = exclude.resolve() if exclude is not None else None
    for p in sorted(folder.rglob("*")):
        if not p.is_file() or any(part.startswith(".") for part in p.relative_to(folder).parts):
            continue
        if excluded is not None and p.resolve().is_relative_to(excluded):
            continue
        suffix, stem = p.suffix.lower(), p.with_suffix("")
        if suffix in IMAGE_EXTENSIONS:
            images.setdefault(stem, []).append(p)
        elif suffix in (".txt", ".json"):
            sidecars.setdefault(stem, {})[suffix] = p
    jobs: list[Job] = []
    for stem in sorted(set(images) | set(sidecars)):
        side = sidecars.get(stem, {})
        txt = str(side[".txt"]) if ".txt" in side else None
        js = str(side[".json"]) if ".json" in side else None
        if stem not in images:
            orphan = txt or js
            jobs.append(Job(len(jobs), None, txt, js, error=(
                "missing-file", f"{orphan}: caption without an image (no {stem.name}.jpg/.png/... beside it)")))
            continue
        for image in images[stem]:
            jobs.append(Job(len(jobs), str(image), txt, js))
    return jobs


def _check_columns(path: Path, header: list[str], image_column: str, caption_columns: list[str]) -> None:
    wanted = [image_column, *caption_columns]
    missing = [c for c in wanted if c not in header]
    if missing:
        raise CosmosError(
            f"{path}: no column {', '.join(repr(c) for c in missing)}; the columns are {', '.join(header) or '(none)'}"
            "; choose them with --image-column and --caption-columns"
        )


_SURROGATE = re.compile("[\ud800-\udfff]")  # lone surrogates: undecodable bytes, or a JSON "\\ud800" escape


def _not_utf8(value: Any) -> bool:
    """True if any string in `value` (nested lists and dicts too) cannot be encoded as UTF-8."""
    if isinstance(value, str):
        return _SURROGATE.search(value) is not None
    if isinstance(value, dict):
        return any(_not_utf8(k) or _not_utf8(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_not_utf8(v) for v in value)
    return False


def _check_encoding(path: Path) -> None:
    """Refuse a table in UTF-16 / UTF-32 (Excel's "Unicode text") as a whole, saying how to convert it."""
    with open(path, "rb") as f:
        head = f.read(4)
    for bom, name in ((codecs.BOM_UTF32_LE, "UTF-32"), (codecs.BOM_UTF32_BE, "UTF-32"), (codecs.BOM_UTF16_LE, "UTF-16"),
                      (codecs.BOM_UTF16_BE, "UTF-16")):
        if head.startswith(bom):
            raise CosmosError(f"{path}: line 1: the file is {name} text, not UTF-8; convert it from {name} to UTF-8 "
                              f"(e.g. `iconv -f {name} -t UTF-8 {path.name} > utf8.{path.suffix.lstrip('.')}`, or "
                              "save it as 'CSV UTF-8' in Excel)")


def _encoding_hint(raw: bytes) -> str:
    """What the non-UTF-8 bytes of a row probably are, and how to convert the file."""
    try:
        raw.decode("cp1252")
        guess = "Windows-1252 (Latin-1)"
        source = "CP1252"
    except UnicodeDecodeError:
        guess, source = "an 8-bit encoding", "ENCODING"
    return (f"; it looks like {guess}: convert the file from {guess.split(' ')[0]} to UTF-8 "
            f"(`iconv -f {source} -t UTF-8 FILE > FILE.utf8`)")


def list_table(path: Path, image_column: str, caption_columns: list[str]) -> list[Job]:
    """Rows of a CSV / TSV (header row) or JSONL file; image paths relative to the file's folder.

    Every row becomes a job: a row that cannot be used (not UTF-8, not JSON, the wrong number of columns,
    a malformed CSV record) is kept as a job that is skipped with that reason, so no row is lost silently and the
    rest still go through. Blank lines are not rows. CSV follows RFC 4180 (a quoted field may hold commas, quotes
    doubled, newlines); TSV has no quoting at all (one line is one row, a quote is an ordinary character).
    """
    root = path.parent
    jobs: list[Job] = []

    def bad(kind: str, where: str, reason: str) -> None:
        jobs.append(Job(len(jobs), None, error=(kind, f"{where}: {reason}"), where=where))

    def add_row(row: dict[str, Any], where: str) -> None:
        if _not_utf8(row):
            text = "".join(v for v in row.values() if isinstance(v, str))
            try:  # bytes the CSV reader could not decode come back as they were in the file
                hint = _encoding_hint(text.encode("utf-8", "surrogateescape"))
            except UnicodeEncodeError:  # a JSON \ud800-style escape: a lone surrogate, no encoding to convert from
                hint = "; it holds a lone UTF-16 surrogate (a \\uD800-\\uDFFF escape): fix or drop that text"
            bad("caption-not-utf8", where, f"not valid UTF-8{hint}")
            return
        image = row.get(image_column)
        if not isinstance(image, str) or not image.strip():
            bad("missing-file", where, f"no {image_column!r}")
            return
        image_path = Path(image.strip()).expanduser()
        image_path = image_path if image_path.is_absolute() else root / image_path
        jobs.append(Job(len(jobs), str(image_path), columns={c: row.get(c) for c in caption_columns}))

    _check_encoding(path)
    if path.suffix.lower() == ".jsonl":
        checked = False
        with open(path, "rb") as f:
            for line_no, raw in enumerate(f, start=1):
                if line_no == 1 and raw.startswith(codecs.BOM_UTF8):  # Excel and Notepad write one
                    raw = raw[len(codecs.BOM_UTF8):]
                if not raw.strip():
                    continue
                where = f"{path}: line {line_no}"
                try:
                    row = json.loads(raw.decode("utf-8"))
                except UnicodeDecodeError:
                    bad("caption-not-utf8", where, f"not UTF-8{_encoding_hint(raw)}")
                    continue
                except ValueError as e:
                    bad("bad-row", where, f"not JSON ({e})")
                    continue
                if not isinstance(row, dict):
                    bad("bad-row", where, f"a JSON {type(row).__name__}, not an object")
                    continue
                if not checked:
                    _check_columns(path, list(row), image_column, caption_columns)
                    checked = True
                add_row(row, where)
        return jobs

    tsv = path.suffix.lower() == ".tsv"
    with open(path, encoding="utf-8-sig", errors="surrogateescape", newline="") as f:  # -sig: drop a BOM
        if tsv:
            reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        else:
            reader = csv.reader(f, delimiter=",", strict=True)
        try:
            header = next(reader, [])
        except csv.Error as e:
            raise CosmosError(f"{path}: the header row is malformed ({e}); fix the first line") from None
        _check_columns(path, header, image_column, caption_columns)
        while True:
            first = reader.line_num + 1
            try:
                cells = next(reader)
            except StopIteration:
                break
            except csv.Error as e:  # the reader moves on to the next line
                lines = f"line {first}" if reader.line_num <= first else f"lines {first}-{reader.line_num}"
                hint = "" if tsv else ("; quote a field that holds a comma, a quote or a newline, and double the "
                                       "quotes inside it")
                bad("bad-row", f"{path}: {lines}", f"cannot be read as {'TSV' if tsv else 'CSV'} ({e}){hint}")
                continue
            if not cells:
                continue  # a blank line
            lines = f"line {first}" if reader.line_num <= first else f"lines {first}-{reader.line_num}"
            where = f"{path}: {lines}"
            if len(cells) != len(header):
                bad("bad-row", where, f"{len(cells)} columns, but the header has {len(header)}"
                    + ("; TSV has no quoting, so a tab inside a caption splits it" if tsv else ""))
                continue
            add_row(dict(zip(header, cells)), where)
    return jobs


def list_source(src: Path, image_column: str = "filepath", caption_columns: list[str] | None = None,
                exclude: Path | None = None) -> list[Job]:
    """The jobs of a folder (without anything under `exclude`) or a table file; CosmosError if `src` is neither."""
    if not src.exists():
        raise CosmosError(f"{src}: no such file or folder; pass a folder of images with .txt/.json captions, "
                          "or a .csv/.tsv/.jsonl file")
    if src.is_dir():
        jobs = list_folder(src, exclude)
    elif src.suffix.lower() in TABLE_SUFFIXES:
        jobs = list_table(src, image_column, caption_columns or ["title"])
    else:
        raise CosmosError(f"{src}: not a folder or a .csv/.tsv/.jsonl file; pass one of those")
    if not jobs:
        raise CosmosError(f"{src}: no samples found (no images or no rows)")
    return jobs


# --- 3. One sample: captions, then image -------------------------------------------------------------------------


class Skip(Exception):
    """A bad sample: `kind` is a short category for the summary, `reason` says what was wrong."""

    def __init__(self, kind: str, reason: str):
        super().__init__(reason)
        self.kind, self.reason = kind, reason


def _read_text(path: str) -> str:
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise Skip("unreadable", f"{path}: cannot read ({e.strerror or e})") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise Skip("caption-not-utf8", f"{path}: caption is not UTF-8") from None


def _split_field(value: Any, where: str, column: str) -> list[str]:
    """Cell value (a string, or a list of strings in JSONL) -> sentences."""
    if isinstance(value, str):
        return split_sentences(value)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return [s for v in value for s in split_sentences(v)]
    if value is None:
        return []
    raise Skip("caption-format", f"{where}: column {column!r} holds a {type(value).__name__}, not text")


def read_captions(job: Job) -> tuple[dict[str, list[str]], str, dict]:
    """(captions as lists of sentences, the raw caption for KEY.txt, extra metadata) of one job."""
    meta: dict = {}
    captions: dict[str, list[str]] = {}
    raw = ""
    if job.columns is not None:
        for column, value in job.columns.items():
            sentences = _split_field(value, job.source, column)
            if sentences:
                captions[column] = sentences
                if not raw:
                    raw = value if isinstance(value, str) else "\n".join(value)
    else:
        if job.json_path:
            text = _read_text(job.json_path)
            try:
                record = json.loads(text)
            except ValueError as e:
                raise Skip("caption-format", f"{job.json_path}: not valid JSON ({e})") from None
            if not isinstance(record, dict):
                raise Skip("caption-format", f"{job.json_path}: is a {type(record).__name__}, not a JSON object")
            if _not_utf8(record):
                raise Skip("caption-not-utf8", f"{job.json_path}: text that is not valid UTF-8 (a lone surrogate "
                                               "such as \\ud800); fix the encoding of this file")
            if "captions" in record:
                try:
                    fields = validate_captions(record["captions"], where=job.json_path)
                except CosmosError as e:
                    raise Skip("caption-format", str(e)) from None
                # Pre-split lists may still hold "a. b" or newlines: split each item again, drop empty fields.
                for name, sentences in fields.items():
                    pieces = [s for item in sentences for s in split_sentences(item)]
                    if pieces:
                        captions[name] = pieces
            meta = {k: v for k, v in record.items() if k not in ("captions", "key")}
        if job.txt_path:
            raw = _read_text(job.txt_path).strip()
            if "raw" not in captions and split_sentences(raw):
                captions = {"raw": split_sentences(raw), **captions}
        elif job.json_path is None:
            raise Skip("missing-file", f"{job.image_path}: no caption file (no .txt or .json beside it)")
    if not captions:
        if job.json_path and not job.txt_path and job.columns is None:
            raise Skip("empty-caption", f"{job.json_path}: no caption sentences (no non-empty 'captions' field "
                                        "and no .txt beside the image)")
        raise Skip("empty-caption", f"{job.source}: caption is empty")
    if not raw:
        raw = ". ".join(next(iter(captions.values())))
    try:
        captions = validate_captions(captions, where=job.source)
    except CaptionContentError as e:
        raise Skip(e.kind, str(e)) from None
    except CosmosError as e:
        raise Skip("caption-format", str(e)) from None
    return captions, raw, meta


# cosmos.images.ImageDecodeError.kind -> the skip kind reported in the manifest
_DECODE_KINDS = {"empty": "empty-file", "not-image": "unreadable", "bomb": "decompression-bomb",
                 "corrupt": "corrupt-image"}
JPEG_MAX_SIDE = 65500  # the largest width or height a JPEG can store


def read_image(path: str, max_size: int, quality: int) -> bytes:
    """Read, decode and shrink an image (shorter side <= max_size, aspect kept); JPEG bytes.

    A very elongated image whose longer side would still exceed what JPEG can store (65,500 pixels) is shrunk
    further, aspect kept, until it fits (its shorter side then ends up below max_size, at least 1 pixel)."""
    p = Path(path)
    if not p.is_file():
        raise Skip("missing-file", f"{path}: no such image file")
    try:
        data = p.read_bytes()
    except OSError as e:
        raise Skip("unreadable", f"{path}: cannot read ({e.strerror or e})") from None
    if not data:
        raise Skip("empty-file", f"{path}: empty file (0 bytes)")
    try:
        image = decode_image(data, name=path)
    except ImageDecodeError as e:
        raise Skip(_DECODE_KINDS[e.kind], str(e)) from None
    w, h = image.size
    scale = min(1.0, max_size / min(w, h), JPEG_MAX_SIDE / max(w, h))
    if scale < 1.0:
        size = (min(JPEG_MAX_SIDE, max(1, round(w * scale))), min(JPEG_MAX_SIDE, max(1, round(h * scale))))
        image = image.resize(size, Image.BICUBIC, reducing_gap=3.0)  # [h', w'], min <= max_size, max <= 65500
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=quality)
    return out.getvalue()


@dataclass
class _Settings:
    max_size: int
    quality: int


def process_job(job: Job, settings: _Settings) -> tuple[str, str, Any]:
    """("ok", key, {ext: bytes}) or ("skip", key, {"kind", "reason", "source"}). Runs in pool workers.

    Metadata: the sidecar JSON's own keys are kept as they are; "source" (the image's file name) is added only
    when the JSON does not already have one. Anything unforeseen that goes wrong in one sample skips that sample
    with kind "error" (its reason names the file and the exception) instead of stopping the whole run.
    """
    try:
        if job.error is not None:
            raise Skip(*job.error)
        captions, raw, meta = read_captions(job)
        image = read_image(job.image_path, settings.max_size, settings.quality)
        if job.image_path and "source" not in meta:
            meta = {**meta, "source": Path(job.image_path).name}
        try:
            files = sample_files(job.key, image, "jpg", captions, raw, meta)
        except CaptionContentError as e:
            raise Skip(e.kind, str(e)) from None
        except CosmosError as e:
            raise Skip("caption-format", str(e)) from None
        return "ok", job.key, files
    except Skip as s:
        return "skip", job.key, {"key": job.key, "source": job.source, "kind": s.kind, "reason": s.reason}
    except Exception as e:  # one bad sample must not stop the run: record it, with the exception
        reason = f"{job.source}: {e} ({type(e).__name__})"
        return "skip", job.key, {"key": job.key, "source": job.source, "kind": "error", "reason": reason}


def _process_star(args: tuple[Job, _Settings]) -> tuple[str, str, Any]:
    return process_job(*args)


# --- 4. The whole run --------------------------------------------------------------------------------------------


@dataclass
class PreprocessResult:
    out_dir: str
    total: int
    written: int
    skipped: list[dict] = field(default_factory=list)
    shards: dict[str, int] = field(default_factory=dict)

    def skipped_by_kind(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for s in self.skipped:
            counts[s["kind"]] = counts.get(s["kind"], 0) + 1
        return dict(sorted(counts.items()))


_OUR_FILES = ("*.tar", "*.tar.tmp", SIZES_FILE, MANIFEST_FILE, SIZES_FILE + ".tmp", MANIFEST_FILE + ".tmp")


def prepare_out_dir(out: Path, overwrite: bool, src: Path | None = None) -> None:
    """Refuse a non-empty `out` unless `overwrite`; with it, remove earlier shards, sizes.json and manifest.json
    (only those) so no stale shard survives."""
    if src is not None and src.is_dir() and out.resolve() == src.resolve():
        raise CosmosError(f"{out}: the output folder is the source folder; choose another --out")
    def clear(folder: Path) -> None:
        for pattern in _OUR_FILES:
            for p in folder.glob(pattern):
                p.unlink()

    claim_out_folder(out, overwrite, "output folder is not empty; pass --overwrite to replace its shards, or choose "
                     "an empty folder", clear)


def preprocess(
    src: str | Path,
    out: str | Path,
    *,
    max_size: int = 256,
    quality: int = 95,
    workers: int = 2,
    shard_size: int = 1000,
    image_column: str = "filepath",
    caption_columns: list[str] | None = None,
    overwrite: bool = False,
    command: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> PreprocessResult:
    """Turn `src` into shards in `out` (see the module docstring). `progress(done, total)` is called as samples
    finish. Returns what was written and what was skipped; the same facts go to out/manifest.json."""
    src, out = Path(src).expanduser(), Path(out).expanduser()
    if max_size < 1:
        raise CosmosError(f"--max-size must be a positive number of pixels, got {max_size}")
    if not 1 <= quality <= 100:
        raise CosmosError(f"--quality must be between 1 and 100, got {quality}")
    if workers < 1:
        raise CosmosError(f"--workers must be at least 1, got {workers}")
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise CosmosError(f"--shard-size must be at least 1 sample per shard, got {shard_size}")
    jobs = list_source(src, image_column, caption_columns, exclude=out)
    created = not out.exists()
    prepare_out_dir(out, overwrite, src)
    try:
        result = _write_shards(src, out, jobs, max_size, quality, workers, shard_size, image_column, caption_columns,
                               command, progress)
    except BaseException:  # interrupted (Ctrl-C, SIGTERM) or failed: leave no partial output, so a rerun just works
        for pattern in _OUR_FILES:
            for p in out.glob(pattern):
                p.unlink(missing_ok=True)
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        raise
    if result.written == 0:  # the manifest stays: it says why every sample was skipped
        first = result.skipped[0]["reason"] if result.skipped else "no samples"
        raise CosmosError(f"{src}: no good samples, all {len(jobs)} were skipped (first: {first}); "
                          f"see {out / MANIFEST_FILE}")
    return result


def _write_shards(src: Path, out: Path, jobs: list, max_size: int, quality: int, workers: int, shard_size: int,
                  image_column: str, caption_columns: list[str] | None, command: str | None,
                  progress: Callable[[int, int], None] | None) -> PreprocessResult:
    settings = _Settings(max_size=max_size, quality=quality)
    result = PreprocessResult(out_dir=str(out), total=len(jobs), written=0)
    started = time.time()
    with ShardWriter(out, maxcount=shard_size) as writer:
        for done, (status, key, payload) in enumerate(_run(jobs, settings, workers), start=1):
            if status == "ok":
                writer.write(key, payload)
                result.written += 1
            else:
                result.skipped.append(payload)
            if progress is not None:
                progress(done, len(jobs))
    result.shards = dict(writer.sizes)
    _write_manifest(out, src, result, writer, settings, workers, shard_size, image_column, caption_columns, command,
                    started)
    return result


def _run(jobs: list[Job], settings: _Settings, workers: int) -> Iterator[tuple[str, str, Any]]:
    """Process jobs in source order, in a pool of `workers` processes (in-process for 1 worker)."""
    if workers == 1 or len(jobs) < 2:
        for job in jobs:
            yield process_job(job, settings)
        return
    chunk = max(1, min(16, len(jobs) // (workers * 8)))
    yield from imap_in_pool(_process_star, ((job, settings) for job in jobs), workers, chunksize=chunk)


def _write_manifest(out: Path, src: Path, result: PreprocessResult, writer: ShardWriter, settings: _Settings,
                    workers: int, shard_size: int, image_column: str, caption_columns: list[str] | None,
                    command: str | None, started: float) -> None:
    write_manifest(out, {
        "format": "cosmos-shards/1",
        "source": str(src),
        "command": command,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "seconds": round(time.time() - started, 2),
        "settings": {**asdict(settings), "workers": workers, "shard_size": shard_size, "image_format": "jpg",
                     "image_column": image_column, "caption_columns": caption_columns or ["title"]},
        "counts": {"total": result.total, "written": result.written, "skipped": len(result.skipped),
                   "skipped_by_kind": result.skipped_by_kind()},
        "shards": [{"name": name, "count": count, "sha256": writer.checksums.get(name)}
                   for name, count in result.shards.items()],
        "skipped": result.skipped,
    })
