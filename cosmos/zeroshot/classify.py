"""Zero-shot classification (CLIP section 3.1.4, COSMOS section 5): class embeddings from a prompt ensemble,
probabilities = softmax(logit_scale.exp() * cosine), and top-k / per-class accuracy over an ImageFolder.

Several names per class are allowed ("dog;puppy"): every name gets its own template-averaged embedding and a
class scores the best of its names (max over names), as SCLIP does for segmentation.

Tie rule for top-k (also used by retrieval): the rank of the right answer is the number of WRONG candidates whose
score is >= its score, so a tie counts against the model; a hit at k means rank < k. A model that gives every
class the same score is therefore never right, instead of "right" by index order.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F

from ..device import autocast
from ..errors import CosmosError
from ..images import IMAGE_EXTENSIONS, open_image
from .templates import resolve_templates

Progress = Callable[[int, int], None]  # progress(done, total)


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


# ---------------------------------------------------------------------------------------------------------------
# 1. Class embeddings from a template ensemble
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class ClassEmbeddings:
    """Text-side classifier: one normalized embedding per class NAME, and which class each name belongs to."""

    embeddings: torch.Tensor  # [Q, E] L2-normalized, one row per name (Q >= number of classes with names)
    owner: torch.Tensor  # [Q] long, class index of each row
    num_classes: int
    classes: list[list[str]]  # the names of each class (an empty list: a class no prompt can predict)

    def class_scores(self, scores: torch.Tensor) -> torch.Tensor:
        """Per-name scores [..., Q] -> per-class scores [..., C] (max over a class's names; -inf if it has none)."""
        out = scores.new_full((*scores.shape[:-1], self.num_classes), float("-inf"))  # [..., C]
        index = self.owner.to(scores.device).expand(*scores.shape[:-1], -1)
        return out.scatter_reduce(-1, index, scores, reduce="amax", include_self=True)


def normalize_classes(classes: Sequence[str] | Sequence[Sequence[str]]) -> list[list[str]]:
    """["cat", "dog"] or [["cat"], ["dog", "puppy"]] -> list of name lists."""
    return [[c] if isinstance(c, str) else list(c) for c in classes]


@torch.no_grad()
def encode_texts(
    model, tokenizer, texts: Sequence[str], batch_size: int = 256, precision: str = "fp32",
    progress: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Texts -> L2-normalized float32 text embeddings [M, E], in batches; `progress(n)` after each batch of n.

    The features are normalized in float32 after autocast, so bf16 runs still give unit vectors to fp32 precision."""
    device = model_device(model)
    chunks = []
    for start in range(0, len(texts), batch_size):
        tokens = tokenizer(list(texts[start : start + batch_size])).to(device)  # [b, L]
        with autocast(device, precision):
            features = model.encode_text(tokens)  # [b, E]
        chunks.append(check_finite(F.normalize(features.float(), dim=-1), "text embeddings", precision))
        if progress:
            progress(len(tokens))
    return torch.cat(chunks)  # [M, E]


@torch.no_grad()
def build_class_embeddings(
    model,
    tokenizer,
    classes: Sequence[str] | Sequence[Sequence[str]],
    templates: str | Sequence[str] = "openai",
    batch_size: int = 256,
    precision: str = "fp32",
    progress: Progress | None = None,
) -> ClassEmbeddings:
    """Encode every template.format(name), L2-normalize, average over templates, renormalize (one row per name).

    `progress(done, total)` is called after each batch of prompts."""
    classes = normalize_classes(classes)
    if not classes:
        raise CosmosError("no class names given; pass at least one label")
    templates = resolve_templates(templates) if isinstance(templates, str) else resolve_templates(list(templates))
    names = [name for names in classes for name in names]
    owner = torch.tensor([i for i, names_ in enumerate(classes) for _ in names_], dtype=torch.long)  # [Q]
    device = model_device(model)
    if not names:
        embed_dim = getattr(model, "embed_dim", 1)
        return ClassEmbeddings(torch.zeros(0, embed_dim, device=device), owner, len(classes), classes)
    prompts = [template.format(name) for name in names for template in templates]
    done = 0

    def step(n: int) -> None:
        nonlocal done
        done += n
        if progress:
            progress(done, len(prompts))

    per_prompt = encode_texts(model, tokenizer, prompts, batch_size, precision, step)  # [Q * T, E]
    per_prompt = per_prompt.reshape(len(names), len(templates), -1)  # [Q, T, E]
    embeddings = F.normalize(per_prompt.mean(dim=1), dim=-1)  # [Q, E]
    return ClassEmbeddings(embeddings, owner.to(device), len(classes), classes)


# ---------------------------------------------------------------------------------------------------------------
# 2. Probabilities for a batch of images
# ---------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def encode_images(model, images: torch.Tensor, precision: str = "fp32") -> torch.Tensor:
    """[B, 3, S, S] -> L2-normalized float32 image embeddings [B, E]."""
    device = model_device(model)
    with autocast(device, precision):
        features = model.encode_image(images.to(device))  # [B, E]
    return check_finite(F.normalize(features.float(), dim=-1), "image embeddings", precision)


def check_finite(features: torch.Tensor, what: str, precision: str) -> torch.Tensor:
    """Refuse NaN / inf features with a message, so no table or JSON ever shows NaN scores."""
    if not torch.isfinite(features).all():
        hint = "; try --precision fp32" if precision != "fp32" else ""
        raise CosmosError(f"the model produced non-finite {what} (NaN or inf): the checkpoint's weights are damaged or "
                          f"overflow{hint}")
    return features


@torch.no_grad()
def class_logits(model, image_features: torch.Tensor, classifier: ClassEmbeddings) -> torch.Tensor:
    """logit_scale.exp() * cosine, per class: [B, E] normalized -> [B, C]."""
    cosine = image_features @ classifier.embeddings.T  # [B, Q]
    return model.logit_scale.exp().float() * classifier.class_scores(cosine)  # [B, C]


@torch.no_grad()
def classify_images(model, images: torch.Tensor, classifier: ClassEmbeddings, precision: str = "fp32") -> torch.Tensor:
    """Zero-shot class probabilities [B, C] = softmax(logit_scale.exp() * cosine) for preprocessed images [B, 3, S, S]."""
    return class_logits(model, encode_images(model, images, precision), classifier).softmax(dim=-1)


# ---------------------------------------------------------------------------------------------------------------
# 3. Metrics (tie rule in the module docstring)
# ---------------------------------------------------------------------------------------------------------------
def rank_of_target(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Number of wrong candidates scoring >= the target: scores [N, C], targets [N] -> ranks [N] (0 = best)."""
    target_score = scores.gather(1, targets[:, None])  # [N, 1]
    return (scores >= target_score).sum(dim=1) - 1


def topk_accuracy(scores: torch.Tensor, targets: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[int, float]:
    """Fraction of rows whose target ranks < k (ties count against), for each k."""
    ranks = rank_of_target(scores, targets)
    return {k: (ranks < k).double().mean().item() for k in ks}  # float64: 0.21 stays 0.21 in JSON


def per_class_accuracy(scores: torch.Tensor, targets: torch.Tensor, num_classes: int) -> list[float | None]:
    """Top-1 accuracy of each class (None for a class with no images); ties count against."""
    hits = (rank_of_target(scores, targets) < 1).double()
    counts = torch.bincount(targets, minlength=num_classes).double()
    correct = torch.zeros(num_classes, dtype=torch.float64).index_add_(0, targets.cpu(), hits.cpu())
    return [None if counts[c] == 0 else (correct[c] / counts[c]).item() for c in range(num_classes)]


# ---------------------------------------------------------------------------------------------------------------
# 4. Evaluation over an ImageFolder (class = sub-folder)
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class ImageFolderSet:
    root: Path
    paths: list[Path]
    targets: list[int]
    folders: list[str]  # sorted class folder names; folder i is class i


def read_image_folder(root: str | Path) -> ImageFolderSet:
    """ROOT/<class>/<image>: sorted class folders, every image file inside (recursively)."""
    root = Path(root)
    if not root.is_dir():
        raise CosmosError(f"{root}: not a directory; give an ImageFolder (one sub-folder of images per class)")
    folders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise CosmosError(f"{root}: no class sub-folders; expected ROOT/<class name>/<images>")
    paths, targets = [], []
    for index, folder in enumerate(folders):
        for path in sorted((root / folder).rglob("*")):
            if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS:
                paths.append(path)
                targets.append(index)
    if not paths:
        raise CosmosError(f"{root}: no images ({', '.join(IMAGE_EXTENSIONS)}) in the class folders")
    return ImageFolderSet(root, paths, targets, folders)


WORDNET_ID = re.compile(r"n\d{8}")


def folder_classes(dataset: ImageFolderSet, classes: Sequence[str] | Sequence[Sequence[str]] | None = None) -> list[list[str]]:
    """The class names of an ImageFolder: `classes` (one entry per sorted folder), or the folder names with '_'
    read as a space. Folders named by WordNet id (ImageNet's n01440764 ...) would make meaningless prompts, so
    they need explicit class names."""
    if classes is None:
        wnids = [folder for folder in dataset.folders if WORDNET_ID.fullmatch(folder)]
        if wnids:
            raise CosmosError(
                f"{dataset.root}: class folders are WordNet ids ({', '.join(wnids[:3])}, ...), not names to prompt "
                "with; give the class names with --classnames F (one per line, in sorted folder order)"
            )
        return [[folder.replace("_", " ")] for folder in dataset.folders]
    classes = normalize_classes(classes)
    if len(classes) != len(dataset.folders):
        raise CosmosError(
            f"{dataset.root}: {len(classes)} class names for {len(dataset.folders)} class folders; "
            "give one name per folder, in sorted folder order"
        )
    return classes


# Loading images in batches: an unreadable file is reported by index (worker processes included) instead of a
# worker traceback; the main process either skips it through `on_error` or raises one CosmosError line.
class _ImageDataset(torch.utils.data.Dataset):
    """Index -> (index, preprocessed tensor [3, S, S]) or (index, error message) for a file that cannot be read."""

    def __init__(self, paths: Sequence[Path], preprocess: Callable):
        self.paths, self.preprocess = list(paths), preprocess

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | str]:
        try:
            return index, self.preprocess(open_image(self.paths[index]))  # [3, S, S]
        except CosmosError as e:
            return index, str(e)
        except OSError as e:
            return index, f"{self.paths[index]}: cannot read ({e.strerror or e})"


def _collate(items: list[tuple[int, torch.Tensor | str]]):
    """-> (indices of the readable images, their tensors stacked [b, 3, S, S] or None, [(index, error), ...])."""
    good = [(i, x) for i, x in items if not isinstance(x, str)]
    errors = [(i, x) for i, x in items if isinstance(x, str)]
    images = torch.stack([x for _, x in good]) if good else None  # [b, 3, S, S]
    return [i for i, _ in good], images, errors


def image_batches(
    paths: Sequence[Path],
    preprocess: Callable,
    batch_size: int,
    workers: int = 0,
    on_error: Callable[[int, str], None] | None = None,
) -> Iterator[tuple[list[int], torch.Tensor]]:
    """Yield (indices, preprocessed images [b, 3, S, S]) in order, one batch at a time (only one batch per worker
    is ever decoded ahead). An unreadable file: `on_error(index, message)` and skipped, or without `on_error` a
    CosmosError naming it."""
    loader = torch.utils.data.DataLoader(
        _ImageDataset(paths, preprocess), batch_size=batch_size, shuffle=False, num_workers=workers,
        collate_fn=_collate, prefetch_factor=1 if workers else None,
    )
    for indices, images, errors in loader:
        for index, message in errors:
            if on_error is None:
                raise CosmosError(message)
            on_error(index, message)
        if images is not None:
            yield indices, images


@torch.no_grad()
def evaluate_classification(
    model,
    preprocess: Callable,
    tokenizer,
    data: str | Path | ImageFolderSet,
    classes: Sequence[str] | Sequence[Sequence[str]] | None = None,
    templates: str | Sequence[str] = "openai",
    batch_size: int = 64,
    precision: str = "fp32",
    workers: int = 0,
    progress: Progress | None = None,
) -> dict:
    """Top-1, top-5 and per-class top-1 accuracy of zero-shot classification on an ImageFolder.

    `data`: the folder or an ImageFolderSet from read_image_folder. `classes`: one entry per sorted class folder
    (default: the folder names, see folder_classes). Top-k is None when there are no more than k classes (it
    would be trivially 1). Per-class results are a list in folder order, so two classes of the same name stay
    apart.
    """
    dataset = data if isinstance(data, ImageFolderSet) else read_image_folder(data)
    classes = folder_classes(dataset, classes)
    classifier = build_class_embeddings(model, tokenizer, classes, templates, precision=precision, progress=progress)
    scores = []
    done, total = 0, len(dataset.paths)
    for _, images in image_batches(dataset.paths, preprocess, batch_size, workers):
        scores.append(class_logits(model, encode_images(model, images, precision), classifier).cpu())  # [b, C]
        done += len(images)
        if progress:
            progress(done, total)
    scores = torch.cat(scores)  # [N, C]
    targets = torch.tensor(dataset.targets, dtype=torch.long)  # [N]
    accuracy = topk_accuracy(scores, targets, (1, 5))
    per_class = per_class_accuracy(scores, targets, len(classes))
    counts = torch.bincount(targets, minlength=len(classes)).tolist()
    return {
        "task": "classification",
        "data": str(dataset.root),
        "images": total,
        "classes": len(classes),
        "top1": accuracy[1] if len(classes) > 1 else None,
        "top5": accuracy[5] if len(classes) > 5 else None,
        "per_class": [
            {"index": i, "folder": folder, "class": "/".join(names), "images": n, "top1": acc}
            for i, (folder, names, n, acc) in enumerate(zip(dataset.folders, classes, counts, per_class))
        ],
        "mean_per_class": _mean([a for a in per_class if a is not None]),
    }


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None
