"""Embedding collections: embed a folder of images or a list of texts to disk, and search them.

A collection is a folder:
    embeddings.npy   [N, E] L2-normalized rows (float16 by default, or float32), read memory-mapped
    index.jsonl      one line per row: {"path", "width", "height", "bytes", "mtime"} for images, {"text"} for texts
    meta.json        model, weights, which, digest (of the model's projections), precision, device, dim, count,
                     dtype, kind (image / text), the command, and the files skipped with the reason
Embedding again into the same folder adds what is new (and embeds changed files again); rows of earlier inputs stay,
except those whose file is gone, which are dropped with a message;
it is refused when the folder was made by another model. Everything is written to temporary files and renamed
into place at the end, so an interrupted run leaves the previous collection intact.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch

from .errors import CosmosError
from .images import IMAGE_EXTENSIONS
from .paths import file_mode, json_safe, printable

EMBEDDINGS, INDEX, META = "embeddings.npy", "index.jsonl", "meta.json"
DTYPES = {"float16": np.float16, "float32": np.float32}
CHUNK = 65536  # rows per block when copying or searching: memory stays bounded for any collection size


def describe(model) -> str:
    """The architecture in words, for meta.json and messages."""
    c = model.config
    return (f"ViT {c.vision.image_size}px/{c.vision.patch_size} width {c.vision.width} x {c.vision.layers}, text width "
            f"{c.text.width} x {c.text.layers}, embedding {c.embed_dim}")


def model_digest(model) -> str:
    """A short fingerprint of a model's weights (its two projections), to tell collections of different models."""
    digest = hashlib.sha256()
    for tensor in (model.visual.proj, model.text_projection):
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


# --- inputs -------------------------------------------------------------------------------------------------------
def list_images(inputs: Iterable[str | Path]) -> list[Path]:
    """Image files: folders are searched recursively (sorted), files are taken as given."""
    found: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found.extend(sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS))
        elif path.is_file():
            found.append(path)
        else:
            raise CosmosError(f"{printable(str(path))}: no such file or folder")
    if not found:
        raise CosmosError(f"no image files in {', '.join(printable(str(p)) for p in inputs)} (looked for "
                          f"{', '.join(sorted(IMAGE_EXTENSIONS))})")
    unique = list(dict.fromkeys(p.resolve() for p in found))
    return unique


def read_texts(path: str | Path) -> list[str]:
    """The non-blank lines of a UTF-8 text file (a BOM is dropped), each stripped; duplicates kept once."""
    path = Path(path)
    if not path.is_file():
        raise CosmosError(f"--texts {path}: no such file")
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError:
        raise CosmosError(f"--texts {path}: not UTF-8 text; give one text per line, saved as UTF-8") from None
    texts = list(dict.fromkeys(line.strip() for line in lines if line.strip()))
    if not texts:
        raise CosmosError(f"--texts {path}: no text in it (only blank lines); give one text per line")
    return texts


# --- the collection on disk ---------------------------------------------------------------------------------------
@dataclass
class Collection:
    root: Path
    meta: dict
    rows: list[dict]

    @property
    def kind(self) -> str:
        return self.meta["kind"]

    def matrix(self) -> np.ndarray:
        return np.load(self.root / EMBEDDINGS, mmap_mode="r")


def open_collection(root: str | Path) -> Collection:
    root = Path(root)
    if not (root / META).is_file():
        raise CosmosError(f"{root}: not an embedding folder (no {META}); make one with `cosmos embed ... --out {root}`")
    try:
        meta = json.loads((root / META).read_text(encoding="utf-8"))
        rows = [json.loads(line) for line in (root / INDEX).read_text(encoding="utf-8").splitlines() if line.strip()]
        shape = np.load(root / EMBEDDINGS, mmap_mode="r").shape
    except (OSError, ValueError) as e:
        raise CosmosError(f"{root}: a damaged embedding folder ({e}); embed again into an empty --out") from None
    if shape != (len(rows), meta.get("dim")) or meta.get("count") != len(rows):
        raise CosmosError(f"{root}: embeddings {shape}, {len(rows)} index rows and count {meta.get('count')} disagree; "
                          "embed again into an empty --out")
    return Collection(root, meta, rows)


@dataclass
class EmbedResult:
    count: int
    added: int
    kept: int
    dropped: list[str] = field(default_factory=list)  # rows of files that vanished
    skipped: list[dict] = field(default_factory=list)  # unreadable files: {"path", "reason"}


def _stat_row(path: Path) -> dict:
    st = path.stat()
    return {"path": printable(str(path)), "bytes": st.st_size, "mtime": st.st_mtime}


def embed(
    model,
    tokenizer,
    out: str | Path,
    images: list[Path] | None = None,
    texts: list[str] | None = None,
    meta: dict | None = None,
    batch_size: int = 64,
    workers: int = 0,
    precision: str = "fp32",
    dtype: str = "float16",
    progress: Callable[[int, int], None] | None = None,
) -> EmbedResult:
    """Embed `images` (paths) or `texts` into the collection at `out` (created, or extended with what is new)."""
    from .transforms import eval_transform
    from .zeroshot.classify import encode_images, encode_texts, image_batches

    if (images is None) == (texts is None):
        raise CosmosError("give images or texts to embed, not both")
    if dtype not in DTYPES:
        raise CosmosError(f"--dtype {dtype!r}: use float16 or float32")
    out = Path(out)
    kind = "image" if images is not None else "text"
    meta = dict(meta or {})
    meta.update({"kind": kind, "dim": int(model.embed_dim), "dtype": dtype, "digest": model_digest(model)})
    old = None
    if (out / META).exists():
        old = open_collection(out)
        for key, what in (("digest", "model"), ("kind", "kind of items"), ("dtype", "dtype")):
            if old.meta.get(key) != meta[key]:
                theirs = f"{old.meta.get('weights')} ({old.meta.get('which')})" if key == "digest" else old.meta.get(key)
                ours = f"{meta.get('weights')} ({meta.get('which')})" if key == "digest" else meta[key]
                raise CosmosError(f"{out}: made with another {what}: {theirs}, now {ours}; embed into another --out, "
                                  f"or use {theirs} again")
    elif out.exists() and any(out.iterdir()):
        raise CosmosError(f"{out}: not empty and not an embedding folder; choose an empty or new --out")

    # What is already there, what vanished, what is new. The collection grows: rows of earlier inputs that are not
    # given this time stay (a file that changed since is embedded again); only rows whose file is gone are dropped.
    kept_rows: list[tuple[int, dict]] = []
    dropped: list[str] = []
    if kind == "image":
        current = {printable(str(p)): p for p in images}
        if old is not None:
            for row in old.rows:  # earlier inputs not given now: still part of the collection while they exist
                if row["path"] not in current and os.path.isfile(row["path"]):
                    current[row["path"]] = Path(row["path"])
        stats = {key: _stat_row(p) for key, p in current.items()}
        todo_keys = list(current)
        if old is not None:
            for i, row in enumerate(old.rows):
                now = stats.get(row["path"])
                if now is None:
                    dropped.append(row["path"])
                elif now["bytes"] == row.get("bytes") and now["mtime"] == row.get("mtime"):
                    kept_rows.append((i, row))
            done = {row["path"] for _, row in kept_rows}
            todo_keys = [k for k in todo_keys if k not in done]
        todo = [current[k] for k in todo_keys]
    else:
        if old is not None:
            kept_rows = list(enumerate(old.rows))
        done = {row["text"] for _, row in kept_rows}
        todo = [t for t in texts if t not in done]

    out.mkdir(parents=True, exist_ok=True)
    capacity = len(kept_rows) + len(todo)
    tmp_matrix = out / (EMBEDDINGS + ".tmp.npy")
    matrix = np.lib.format.open_memmap(tmp_matrix, mode="w+", dtype=DTYPES[dtype], shape=(max(capacity, 1), meta["dim"]))
    rows: list[dict] = []
    filled = 0
    if kept_rows:  # copy the kept rows block by block
        previous = old.matrix()
        indices = [i for i, _ in kept_rows]
        for start in range(0, len(indices), CHUNK):
            block = indices[start:start + CHUNK]
            matrix[filled:filled + len(block)] = previous[block]
            filled += len(block)
        rows.extend(row for _, row in kept_rows)
        del previous
    skipped: list[dict] = []
    done_count = 0
    if kind == "image":
        from PIL import Image

        preprocess = eval_transform(model.image_size)

        def skip(index: int, message: str) -> None:
            skipped.append({"path": printable(str(todo[index])), "reason": printable(message)})

        for indices, batch in image_batches(todo, preprocess, batch_size, workers, on_error=skip):
            feats = encode_images(model, batch, precision).cpu().numpy()  # [b, E]
            matrix[filled:filled + len(feats)] = feats.astype(DTYPES[dtype])
            filled += len(feats)
            for index in indices:
                path = todo[index]
                with Image.open(path) as image:  # the header only
                    width, height = image.size
                rows.append({**stats[printable(str(path))], "width": width, "height": height})
            done_count = indices[-1] + 1
            if progress:
                progress(done_count, len(todo))
    else:
        for start in range(0, len(todo), batch_size * 4):
            chunk = todo[start:start + batch_size * 4]
            feats = encode_texts(model, tokenizer, chunk, batch_size * 4, precision).cpu().numpy()
            matrix[filled:filled + len(feats)] = feats.astype(DTYPES[dtype])
            filled += len(feats)
            rows.extend({"text": t} for t in chunk)
            if progress:
                progress(start + len(chunk), len(todo))
    matrix.flush()
    del matrix
    if filled == 0 and not rows:
        os.unlink(tmp_matrix)
        first = skipped[0]["reason"] if skipped else "nothing to embed"
        raise CosmosError(f"nothing could be embedded: all {len(todo)} file(s) were unreadable (first: {first})")
    if filled != capacity:  # unreadable files left rows unused: write the exact size, block by block
        source = np.load(tmp_matrix, mmap_mode="r")
        exact = out / (EMBEDDINGS + ".exact.tmp.npy")
        target = np.lib.format.open_memmap(exact, mode="w+", dtype=DTYPES[dtype], shape=(filled, meta["dim"]))
        for start in range(0, filled, CHUNK):
            stop = min(start + CHUNK, filled)
            target[start:stop] = source[start:stop]
        target.flush()
        del target, source
        os.replace(exact, tmp_matrix)
    meta.update({"count": len(rows), "skipped": skipped})
    _write_text(out / (INDEX + ".tmp"), "".join(json.dumps(json_safe(r), ensure_ascii=False) + "\n" for r in rows))
    _write_text(out / (META + ".tmp"), json.dumps(json_safe(meta), indent=2, ensure_ascii=False) + "\n")
    os.chmod(tmp_matrix, file_mode())
    os.replace(tmp_matrix, out / EMBEDDINGS)
    os.replace(out / (INDEX + ".tmp"), out / INDEX)
    os.replace(out / (META + ".tmp"), out / META)
    return EmbedResult(len(rows), len(rows) - len(kept_rows), len(kept_rows), dropped, skipped)


def _write_text(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


# --- search -------------------------------------------------------------------------------------------------------
def top_k(matrix: np.ndarray, query: np.ndarray, k: int) -> list[tuple[int, float]]:
    """Exact cosine top-k of `query` [E] against `matrix` [N, E] (normalized), in blocks of CHUNK rows; ties by row."""
    if k < 1:
        raise CosmosError(f"--top must be at least 1, got {k}")
    q = torch.from_numpy(np.asarray(query, dtype=np.float32))
    best_scores = torch.empty(0)
    best_rows = torch.empty(0, dtype=torch.long)
    for start in range(0, matrix.shape[0], CHUNK):
        block = torch.from_numpy(np.array(matrix[start:start + CHUNK], dtype=np.float32))  # a copy of the block
        scores = block @ q  # [b]
        scores = torch.cat([best_scores, scores])
        rows = torch.cat([best_rows, torch.arange(start, start + block.shape[0])])
        order = torch.sort(scores, descending=True, stable=True).indices[:k]  # equal scores keep row order
        best_scores, best_rows = scores[order], rows[order]
    return [(int(r), float(s)) for r, s in zip(best_rows, best_scores)]


def contact_sheet(hits: list[tuple[str, float]], thumb: int = 160, columns: int = 5):
    """A grid of the hit images with their rank and score under each."""
    from PIL import Image, ImageDraw

    from .images import open_image

    rows = max(1, -(-len(hits) // columns))
    sheet = Image.new("RGB", (columns * thumb, rows * (thumb + 18)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for i, (path, score) in enumerate(hits):
        x, y = (i % columns) * thumb, (i // columns) * (thumb + 18)
        try:
            image = open_image(path)
            image.thumbnail((thumb - 4, thumb - 4))
            sheet.paste(image, (x + (thumb - image.width) // 2, y + (thumb - image.height) // 2))
        except CosmosError:
            draw.text((x + 4, y + thumb // 2), "unreadable", fill=(200, 0, 0))
        draw.text((x + 4, y + thumb + 2), f"#{i + 1}  {score:.3f}", fill=(0, 0, 0))
    return sheet
