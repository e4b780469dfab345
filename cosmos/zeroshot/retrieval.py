"""Zero-shot image-text retrieval (COSMOS section 5): R@1/5/10 from global embeddings, image->text and text->image.

Datasets: the COCO captions JSON ({"images": [{"id", "file_name"}], "annotations": [{"image_id", "caption"}]})
and the Karpathy-style JSON used for Flickr30k and COCO ({"images": [{"filename", "split", "sentences":
[{"raw"}]}]}, filtered by split).

Metric and tie rule:
- image -> text: an image is a hit at k when ANY of its captions is in the top k. Its rank is the number of
  captions of OTHER images whose score is >= the best score among its own captions.
- text -> image: one right image per caption; its rank is the number of other images scoring >= it.
A tie with a wrong candidate counts against the model; hit at k means rank < k.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from ..errors import CosmosError
from .classify import Progress, encode_images, encode_texts, image_batches


# ---------------------------------------------------------------------------------------------------------------
# 1. Recall at k from embeddings
# ---------------------------------------------------------------------------------------------------------------
def retrieval_ranks(
    image_features: torch.Tensor, text_features: torch.Tensor, text_image: torch.Tensor, chunk: int = 1024
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ranks (0 = best) of the right answers: image->text [N] and text->image [M].

    image_features [N, E], text_features [M, E] (normalized), text_image [M] = index of each caption's image.
    Images without a caption get rank -1 (they only serve as distractors for text->image). Works in chunks so
    a 5k x 25k similarity matrix is never held at once.
    """
    n_images = image_features.shape[0]
    text_image = text_image.to(image_features.device)
    i2t = torch.empty(n_images, dtype=torch.long)
    for start in range(0, n_images, chunk):
        sims = image_features[start : start + chunk] @ text_features.T  # [n, M]
        own = text_image[None, :] == torch.arange(start, start + sims.shape[0], device=sims.device)[:, None]  # [n, M]
        best_own = sims.masked_fill(~own, float("-inf")).amax(dim=1, keepdim=True)  # [n, 1]
        rank = ((sims >= best_own) & ~own).sum(dim=1)  # [n]
        i2t[start : start + sims.shape[0]] = torch.where(own.any(dim=1), rank, -1).cpu()
    t2i = torch.empty(text_features.shape[0], dtype=torch.long)
    for start in range(0, text_features.shape[0], chunk):
        sims = text_features[start : start + chunk] @ image_features.T  # [m, N]
        right = sims.gather(1, text_image[start : start + sims.shape[0], None])  # [m, 1]
        t2i[start : start + sims.shape[0]] = ((sims >= right).sum(dim=1) - 1).cpu()
    return i2t, t2i


def recall_at_k(
    image_features: torch.Tensor, text_features: torch.Tensor, text_image: torch.Tensor, ks: Sequence[int] = (1, 5, 10)
) -> dict[str, float]:
    """{"i2t_R@1": ..., "t2i_R@1": ..., ...} as fractions (images without captions are left out of i2t).

    A recall that every query reaches whatever the model does is None (shown as '-', null in JSON), the rule top-k
    classification follows: text->image R@k when there are no more than k images; image->text R@k when no image
    has k or more wrong captions to compete with (e.g. retrieval over one image)."""
    i2t, t2i = retrieval_ranks(image_features, text_features, text_image)
    has_caption = i2t >= 0
    i2t = i2t[has_caption]
    if len(i2t) == 0 or len(t2i) == 0:
        raise CosmosError("retrieval needs at least one image with a caption")
    own = torch.bincount(text_image.cpu(), minlength=image_features.shape[0])[has_caption.cpu()]
    most_wrong = int((len(t2i) - own).max())  # wrong captions of the image with the most of them
    n_images = image_features.shape[0]
    out = {}
    for k in ks:
        out[f"i2t_R@{k}"] = (i2t < k).double().mean().item() if k <= most_wrong else None
    for k in ks:
        out[f"t2i_R@{k}"] = (t2i < k).double().mean().item() if k < n_images else None
    return out


# ---------------------------------------------------------------------------------------------------------------
# 2. Datasets
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class RetrievalSet:
    source: Path
    image_paths: list[Path]
    captions: list[str]
    text_image: list[int]  # caption i belongs to image text_image[i]


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise CosmosError(f"{path}: no such file; give a COCO captions JSON or a Karpathy-style JSON")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CosmosError(f"{path}: not valid JSON ({e}); give a COCO captions or Karpathy-style JSON") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise CosmosError(f"{path}: no 'images' list; expected COCO captions or Karpathy-style JSON")
    return data


def _image_root(path: Path, images: str | Path | None) -> Path:
    if images is not None:
        root = Path(images)
        if not root.is_dir():
            raise CosmosError(f"{root}: image folder not found; give --images DIR")
        return root
    beside = path.parent / "images"
    return beside if beside.is_dir() else path.parent


def load_retrieval_set(path: str | Path, images: str | Path | None = None, split: str = "test") -> RetrievalSet:
    """Read a COCO captions JSON or a Karpathy-style JSON; image files are resolved under `images` (default:
    an `images/` folder beside the JSON if it exists, else the JSON's folder)."""
    path = Path(path)
    data = _read_json(path)
    root = _image_root(path, images)
    image_paths: list[Path] = []
    captions: list[str] = []
    text_image: list[int] = []
    entries = data.get("images") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise CosmosError(f"{path}: no 'images' list; expected a COCO captions JSON (images + annotations) or a "
                          "Karpathy-style JSON (images[].filename / split / sentences)")
    coco_like = any(isinstance(e, dict) and "file_name" in e for e in entries)
    if coco_like and "annotations" not in data:
        raise CosmosError(f"{path}: a COCO-style file (images[].file_name) without 'annotations', so it holds no "
                          "captions; use the captions file (e.g. captions_val2017.json)")
    if "annotations" in data:  # COCO captions
        index_of = {}
        for entry in data["images"]:
            if "id" not in entry or "file_name" not in entry:
                raise CosmosError(f"{path}: an image entry lacks 'id' or 'file_name': {entry!r}")
            index_of[entry["id"]] = len(image_paths)
            image_paths.append(root / entry["file_name"])
        for ann in data["annotations"]:
            if ann.get("image_id") not in index_of:
                raise CosmosError(f"{path}: annotation {ann.get('id')!r} refers to unknown image_id {ann.get('image_id')!r}")
            if not isinstance(ann.get("caption"), str) or not ann["caption"].strip():
                raise CosmosError(f"{path}: annotation {ann.get('id')!r} has no caption text")
            captions.append(ann["caption"].strip())
            text_image.append(index_of[ann["image_id"]])
    else:  # Karpathy
        splits_seen = set()
        for entry in data["images"]:
            splits_seen.add(entry.get("split"))
            if split and entry.get("split") != split:
                continue
            if "filename" not in entry:
                raise CosmosError(f"{path}: an image entry lacks 'filename': {str(entry)[:200]}")
            folder = root / entry["filepath"] if entry.get("filepath") else root
            for sentence in entry.get("sentences", []):
                raw = sentence.get("raw") if isinstance(sentence, dict) else sentence
                if isinstance(raw, str) and raw.strip():
                    captions.append(raw.strip())
                    text_image.append(len(image_paths))
            image_paths.append(folder / entry["filename"])
        if not image_paths:
            found = ", ".join(sorted(str(s) for s in splits_seen))
            raise CosmosError(f"{path}: no images in split {split!r} (splits present: {found}); choose one with --split")
    if not image_paths or not captions:
        raise CosmosError(f"{path}: no images or no captions to evaluate")
    missing = [p for p in image_paths if not p.is_file()]
    if missing:
        raise CosmosError(
            f"{missing[0]}: image not found ({len(missing)} of {len(image_paths)} missing); give the image folder with --images"
        )
    return RetrievalSet(path, image_paths, captions, text_image)


# ---------------------------------------------------------------------------------------------------------------
# 3. Evaluation
# ---------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate_retrieval(
    model,
    preprocess: Callable,
    tokenizer,
    dataset: RetrievalSet,
    batch_size: int = 64,
    precision: str = "fp32",
    workers: int = 0,
    progress: Progress | None = None,
) -> dict:
    """R@1/5/10 image->text and text->image on a RetrievalSet (see load_retrieval_set)."""
    total = len(dataset.image_paths) + len(dataset.captions)
    done = 0

    def step(n: int) -> None:
        nonlocal done
        done += n
        if progress:
            progress(done, total)

    image_chunks = []
    for _, images in image_batches(dataset.image_paths, preprocess, batch_size, workers):
        image_chunks.append(encode_images(model, images, precision))  # [b, E]
        step(len(images))
    image_features = torch.cat(image_chunks)  # [N, E]
    text_features = encode_texts(model, tokenizer, dataset.captions, batch_size * 4, precision, step)  # [M, E]
    text_image = torch.tensor(dataset.text_image, dtype=torch.long)
    result = {"task": "retrieval", "data": str(dataset.source), "images": len(dataset.image_paths),
              "captions": len(dataset.captions)}
    result.update(recall_at_k(image_features, text_features, text_image))
    return result
