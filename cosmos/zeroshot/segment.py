"""Training-free zero-shot segmentation with the SCLIP protocol (COSMOS section 5), and its evaluation (mIoU).

The protocol, in order:
1. Class embeddings from a prompt ensemble, one per class NAME ("person;people" = two names, max over names).
2. Resize the image so its short side is 336 px, unless its long side would then exceed 2048 px (mmseg's
   keep-ratio Resize with scale (2048, 336)). Bilinear, half-pixel centres, no antialiasing, on the 8-bit image,
   as cv2.resize does in mmseg.
3. Slide windows of 224 px with stride 112 over it (the last row / column moved back to end at the edge; an image
   smaller than the window gets one clipped window on that axis). A window whose size is not a multiple of the
   patch size is zero-padded evenly on both sides (SCLIP's compute_padsize) and its logits are cropped back.
   Each window gives dense features from the last block (plain, CSA, ClearCLIP or MaskCLIP, see
   cosmos/model/transformer.py) -> ln_post -> proj -> L2 normalize, and per-name cosine logits at patch
   resolution, bilinearly upsampled to the window ONE window at a time. Overlapping windows are averaged into an
   accumulator of the RESIZED image size (small, whatever the photo's size).
   For a model whose input size is not 224, all these sizes scale with it: window = image_size,
   stride = window / 2, short side = 336 * image_size / 224, long-side cap = 2048 * image_size / 224.
4. Bilinear upsample to the original image, x logit scale (40), softmax over names, max over each class's
   names, optional background threshold (pixels whose best probability is below it become background),
   argmax. Step 4 runs in bands of rows, so a large photo never holds a [classes, H, W] tensor at once.
Evaluation accumulates a confusion matrix over the dataset (ignore index 255): per-class IoU and mIoU over
the classes that occur in ground truth or prediction.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from ..device import autocast
from ..errors import CosmosError
from ..images import IMAGE_EXTENSIONS, open_image
from ..transforms import CLIP_MEAN, CLIP_STD
from ..model.transformer import DENSE_METHODS
from .classify import ClassEmbeddings, Progress, check_finite, model_device

IGNORE_INDEX = 255
REFERENCE_INPUT, REFERENCE_SHORT_SIDE, REFERENCE_LONG_SIDE = 224, 336, 2048  # SCLIP's sizes for a 224 px model
METHODS = DENSE_METHODS
PRECISIONS = ("auto", "fp32", "bf16")


# ---------------------------------------------------------------------------------------------------------------
# 1. Protocol sizes, background class and the sliding windows
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class SegmentConfig:
    """The protocol's options; None sizes are derived from the model's input size (see the module docstring).
    Invalid values raise CosmosError when the config is made, before any model is loaded."""

    method: str = "csa"
    short_side: int | None = None
    window: int | None = None
    stride: int | None = None
    logit_scale: float = 40.0
    bg_threshold: float | None = None
    batch_size: int = 16
    precision: str = "fp32"
    long_side: int | None = None
    area_threshold: float | None = None  # SCLIP's area_thd (VOC21: 0.1)
    reference_short_side: int = REFERENCE_SHORT_SIDE  # the short side for a 224 px model when short_side is None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise CosmosError(f"unknown segmentation method {self.method!r}; choose --method "
                              f"{', '.join(METHODS[:-1])} or {METHODS[-1]}")
        if self.bg_threshold is not None and not 0 <= self.bg_threshold <= 1:
            raise CosmosError(f"--bg-threshold must be a probability between 0 and 1, got {self.bg_threshold}")
        if self.precision not in PRECISIONS:
            raise CosmosError(f"--precision must be auto, fp32 or bf16, got {self.precision!r}")
        if self.batch_size < 1:
            raise CosmosError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.area_threshold is not None and not 0 <= self.area_threshold < 1:
            raise CosmosError(f"--area-threshold must be a fraction in [0, 1), got {self.area_threshold}")
        if not self.logit_scale > 0 or self.logit_scale != self.logit_scale:
            raise CosmosError(f"--logit-scale must be a positive number (SCLIP uses 40), got {self.logit_scale}")

    def sizes(self, image_size: int, patch_size: int = 1) -> tuple[int, int, int]:
        """(short side, window, stride) for a model with input size `image_size` and patches of `patch_size`."""
        window = self.window or image_size
        if window % patch_size:
            low, high = window // patch_size * patch_size, (window // patch_size + 1) * patch_size
            choices = f"{low} or {high}" if low else str(high)
            raise CosmosError(f"window {window} px (--window) is not a multiple of the model's {patch_size} px "
                              f"patches; use {choices}")
        stride = self.stride or max(1, window // 2)
        short = self.short_side or round(self.reference_short_side * image_size / REFERENCE_INPUT)
        if short < window:
            raise CosmosError(f"short side {short} px is smaller than the {window} px window; use a short side >= {window}")
        if stride > window:
            raise CosmosError(f"stride {stride} is larger than the window {window}; windows would leave gaps")
        return short, window, stride

    def long_cap(self, image_size: int) -> int:
        """The long-side cap of the resize: 2048 px for a 224 px model, whatever the short side (as SCLIP)."""
        return self.long_side or round(REFERENCE_LONG_SIDE * image_size / REFERENCE_INPUT)


def with_background(
    classes: Sequence[Sequence[str]], bg_threshold: float | None, index: int | None = None, prompt: bool = True
) -> tuple[list[list[str]], list[str], int | None]:
    """Where thresholded pixels go -> (classes to prompt, a title per class, background index or None).

    With a threshold the background is class `index` (datasets: 0 by convention) or, when `index` is None, the
    class named 'background', or else a new prompt-less 'background' class put first (index 0, as in VOC masks).
    `prompt=False` keeps the background class out of the prompts: only the threshold assigns it."""
    classes = [list(names) for names in classes]
    if bg_threshold is None:
        if not prompt:
            raise CosmosError("an unprompted background (--no-bg-prompt) needs --bg-threshold: it could never be predicted "
                              "otherwise")
        return classes, class_titles(classes), None
    if index is None:
        index = next((i for i, names in enumerate(classes) if names and names[0].lower() == "background"), None)
        if index is None:
            classes, index = [[]] + classes, 0
    if not 0 <= index < len(classes):
        raise CosmosError(f"background class {index} does not exist: there are {len(classes)} classes")
    titles = class_titles(classes)
    if not prompt:
        classes[index] = []
    return classes, titles, index


def class_titles(classes: Sequence[Sequence[str]]) -> list[str]:
    """A display name per class: its names joined by ';', 'background' for a prompt-less class."""
    return [";".join(names) if names else "background" for names in classes]


def resized_shape(height: int, width: int, short_side: int, long_side: int = REFERENCE_LONG_SIDE) -> tuple[int, int]:
    """Keep-ratio resize (mmseg's rule): the short side -> short_side, unless the long side would exceed long_side."""
    scale = min(short_side / min(height, width), long_side / max(height, width))
    return max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5))


def sliding_windows(height: int, width: int, window: int, stride: int) -> list[tuple[int, int, int, int]]:
    """Windows (top, left, bottom, right) of size `window` every `stride` px; the last row/column of windows is
    moved back to end at the image edge, so every pixel is covered. An image smaller than the window in one
    dimension gets a single, clipped window in that dimension."""
    rows = max(height - window + stride - 1, 0) // stride + 1
    cols = max(width - window + stride - 1, 0) // stride + 1
    boxes = []
    for r in range(rows):
        for c in range(cols):
            bottom, right = min(r * stride + window, height), min(c * stride + window, width)
            top, left = max(bottom - window, 0), max(right - window, 0)
            boxes.append((top, left, bottom, right))
    return boxes


def patch_padding(height: int, width: int, patch_size: int) -> tuple[int, int, int, int]:
    """(left, right, top, bottom) zero padding that makes a crop a multiple of the patch size, split evenly
    (the odd pixel on the right / bottom), as SCLIP's compute_padsize."""
    pad_w, pad_h = -width % patch_size, -height % patch_size
    return pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2


# ---------------------------------------------------------------------------------------------------------------
# 2. Window logits, averaged over overlaps at the resized size
# ---------------------------------------------------------------------------------------------------------------
DenseFn = Callable[[torch.Tensor], torch.Tensor]  # windows [b, 3, w, w] -> normalized features [b, gh, gw, E]


def to_model_input(image: Image.Image, size: tuple[int, int]) -> torch.Tensor:
    """PIL RGB -> resized and CLIP-normalized tensor [3, h, w]. The resize is bilinear with half-pixel centres and
    no antialiasing, on the 8-bit image (like cv2.resize in SCLIP's mmseg pipeline, unlike PIL's resize)."""
    x = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)[None]  # [1, 3, H, W] uint8
    if tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=False)  # [1, 3, h, w]
    x = x[0].float() / 255.0  # [3, h, w]
    mean = torch.tensor(CLIP_MEAN)[:, None, None]
    std = torch.tensor(CLIP_STD)[:, None, None]
    return (x - mean) / std


@torch.no_grad()
def window_logits(
    dense: DenseFn,
    image: torch.Tensor,
    queries: torch.Tensor,
    window: int,
    stride: int,
    batch_size: int = 16,
    progress: Callable[[int, int], None] | None = None,
    patch_size: int = 1,
) -> torch.Tensor:
    """Average of the per-window cosine logits: image [3, H, W], queries [Q, E] -> [Q, H, W] (float32).

    Windows run through `dense` in batches of `batch_size`, each zero-padded to a multiple of `patch_size`
    (see patch_padding); each window's patch logits [Q, gh, gw] are then bilinearly upsampled to its padded size
    on their own (never a whole batch at window resolution), cropped back and added into the accumulator.
    """
    _, height, width = image.shape
    boxes = sliding_windows(height, width, window, stride)
    device = queries.device
    total = torch.zeros(queries.shape[0], height, width, device=device)  # [Q, H, W]
    count = torch.zeros(1, height, width, device=device)  # [1, H, W]
    for start in range(0, len(boxes), batch_size):
        batch = boxes[start : start + batch_size]
        crops = torch.stack([image[:, t:b, l:r] for t, l, b, r in batch]).to(device)  # [b, 3, wh, ww]
        crop_h, crop_w = crops.shape[-2:]
        left, right, top, bottom = patch_padding(crop_h, crop_w, patch_size)
        if left or right or top or bottom:
            crops = F.pad(crops, (left, right, top, bottom))  # [b, 3, ph, pw], zeros = the mean colour
        features = dense(crops).float()  # [b, gh, gw, E]
        logits = torch.einsum("bhwe,qe->bqhw", features, queries)  # [b, Q, gh, gw]
        for (t, l, b, r), window_logit in zip(batch, logits):
            up = F.interpolate(window_logit[None], size=crops.shape[-2:], mode="bilinear", align_corners=False)
            total[:, t:b, l:r] += up[0, :, top : top + crop_h, left : left + crop_w]  # [Q, wh, ww]
            count[:, t:b, l:r] += 1
        if progress:
            progress(start + len(batch), len(boxes))
    return total / count


# ---------------------------------------------------------------------------------------------------------------
# 3. Upsample to the image, softmax, max over names, background threshold, argmax (in bands of rows)
# ---------------------------------------------------------------------------------------------------------------
def bilinear_matrix(n_out: int, n_in: int, device=None) -> torch.Tensor:
    """[n_out, n_in] weights of 1-D bilinear resizing with align_corners=False, as F.interpolate computes it:
    source coordinate (i + 0.5) * n_in / n_out - 0.5, clamped at 0, between its two neighbours."""
    src = ((torch.arange(n_out, dtype=torch.float64, device=device) + 0.5) * (n_in / n_out) - 0.5).clamp(min=0)
    low = src.floor().long().clamp(max=n_in - 1)
    high = (low + 1).clamp(max=n_in - 1)
    frac = (src - low).float()
    weights = torch.zeros(n_out, n_in, device=device)  # [n_out, n_in]
    rows = torch.arange(n_out, device=device)
    weights.index_put_((rows, low), 1 - frac, accumulate=True)
    weights.index_put_((rows, high), frac, accumulate=True)
    return weights


@torch.no_grad()
def predict_mask(
    logits: torch.Tensor,
    classifier: ClassEmbeddings,
    out_size: tuple[int, int],
    logit_scale: float = 40.0,
    bg_threshold: float | None = None,
    background_index: int | None = None,
    band_pixels: int = 1 << 21,
    area_threshold: float | None = None,
) -> torch.Tensor:
    """Per-name cosine logits at the resized size [Q, h, w] -> class index mask [H, W] (long) at `out_size`.

    area_threshold (SCLIP's area_thd): a class other than class 0 whose predicted area is no more than this fraction
    of all pixels predicted as a class other than 0 has its probabilities zeroed before the final argmax and the
    background threshold (a first pass over the image counts the areas)."""
    if bg_threshold is not None and background_index is None:
        raise CosmosError("a background threshold needs a background class; add one (e.g. 'background') to the labels")
    height, width = out_size
    ry = bilinear_matrix(height, logits.shape[1], logits.device)  # [H, h]
    rx = bilinear_matrix(width, logits.shape[2], logits.device)  # [W, w]
    band = max(1, band_pixels // max(1, width * max(1, logits.shape[0])))

    def class_probs(top: int) -> torch.Tensor:
        rows = torch.einsum("yh,qhw->qyw", ry[top : top + band], logits)  # [Q, r, w]
        upsampled = torch.einsum("qyw,xw->qyx", rows, rx)  # [Q, r, W]
        probs = (upsampled * logit_scale).softmax(dim=0)  # [Q, r, W]
        return classifier.class_scores(probs.permute(1, 2, 0))  # [r, W, C]

    keep = None
    if area_threshold is not None:
        area = torch.zeros(classifier.num_classes, dtype=torch.long)
        for top in range(0, height, band):
            area += torch.bincount(class_probs(top).argmax(dim=-1).flatten().cpu(), minlength=classifier.num_classes)
        foreground = area[1:]
        keep = torch.ones(classifier.num_classes, dtype=torch.bool)
        keep[1:] = foreground > area_threshold * foreground.sum()
    mask = torch.empty(height, width, dtype=torch.long)
    for top in range(0, height, band):
        scores = class_probs(top)
        if keep is not None:
            scores = scores * keep.to(scores.device, scores.dtype)
        best, index = scores.max(dim=-1)  # [r, W]
        if bg_threshold is not None:
            index[best < bg_threshold] = background_index
        mask[top : top + band] = index.cpu()
    return mask


# ---------------------------------------------------------------------------------------------------------------
# 4. The segmenter: one image in, one index mask out
# ---------------------------------------------------------------------------------------------------------------
class Segmenter:
    """Zero-shot segmentation of PIL images with a model (or a hand-made `dense` function, `image_size` and
    `patch_size`)."""

    def __init__(
        self,
        model,
        classifier: ClassEmbeddings,
        config: SegmentConfig | None = None,
        background_index: int | None = None,
        dense: DenseFn | None = None,
        image_size: int | None = None,
        patch_size: int | None = None,
    ):
        self.config = config or SegmentConfig()
        if classifier.embeddings.shape[0] == 0:
            raise CosmosError("no class has a name to prompt; give at least one label")
        if self.config.bg_threshold is not None and background_index is None:
            raise CosmosError("a background threshold needs a background class; add 'background' to the labels")
        self.classifier, self.background_index = classifier, background_index
        self.model = model
        self.image_size = image_size or model.image_size
        self.patch_size = patch_size or (model.patch_size if model is not None else 1)
        self.short_side, self.window, self.stride = self.config.sizes(self.image_size, self.patch_size)
        self.long_side = self.config.long_cap(self.image_size)
        self.dense = dense or self._model_dense

    def _model_dense(self, windows: torch.Tensor) -> torch.Tensor:
        """Normalized dense features [b, gh, gw, E] in float32: the L2 normalization runs after autocast, so
        bf16 features still give unit vectors to float32 precision."""
        device = model_device(self.model)
        with autocast(device, self.config.precision):
            features = self.model.encode_dense(windows.to(device), method=self.config.method, normalize=False)
        return check_finite(F.normalize(features.float(), dim=-1), "dense features", self.config.precision)

    def resized_shape(self, image: Image.Image) -> tuple[int, int]:
        return resized_shape(image.height, image.width, self.short_side, self.long_side)

    def logits(self, image: Image.Image, progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
        """Window-averaged per-name cosine logits [Q, h, w] at the resized size."""
        x = to_model_input(image, self.resized_shape(image))  # [3, h, w]
        queries = self.classifier.embeddings.float()  # [Q, E]
        return window_logits(self.dense, x, queries, self.window, self.stride, self.config.batch_size, progress,
                             self.patch_size)

    def __call__(self, image: Image.Image, progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
        """Class index mask [H, W] (long) at the image's own size."""
        return predict_mask(
            self.logits(image, progress), self.classifier, (image.height, image.width), self.config.logit_scale,
            self.config.bg_threshold, self.background_index, area_threshold=self.config.area_threshold,
        )

    def count_windows(self, image: Image.Image) -> int:
        return len(sliding_windows(*self.resized_shape(image), self.window, self.stride))


def pixel_shares(mask: torch.Tensor, num_classes: int) -> list[float]:
    """Fraction of the pixels of each class."""
    counts = torch.bincount(mask.flatten(), minlength=num_classes)[:num_classes].double()
    return (counts / max(1, mask.numel())).tolist()


# ---------------------------------------------------------------------------------------------------------------
# 5. Writing masks and overlays
# ---------------------------------------------------------------------------------------------------------------
def palette(n: int = 256) -> list[tuple[int, int, int]]:
    """The PASCAL VOC colour map: the bits of the class index spread over the high bits of R, G and B."""
    colours = []
    for index in range(n):
        r = g = b = 0
        c = index
        for bit in range(8):
            r |= ((c >> 0) & 1) << (7 - bit)
            g |= ((c >> 1) & 1) << (7 - bit)
            b |= ((c >> 2) & 1) << (7 - bit)
            c >>= 3
        colours.append((r, g, b))
    return colours


def save_mask(mask: torch.Tensor, path: str | Path) -> None:
    """An 8-bit palette PNG whose pixel values are the class indices (the VOC convention)."""
    if mask.numel() and int(mask.max()) > 254:
        raise CosmosError(f"{path}: {int(mask.max()) + 1} classes do not fit an 8-bit mask (255 is 'ignore')")
    image = Image.fromarray(mask.to(torch.uint8).numpy(), mode="P")
    image.putpalette([v for colour in palette() for v in colour])
    image.save(path)


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def overlay(image: Image.Image, mask: torch.Tensor, titles: Sequence[str], alpha: float = 0.5) -> Image.Image:
    """The image blended with the class colours, and a legend strip below it naming the classes present
    (largest first) with their pixel share. Works in 8-bit images throughout (3 bytes per pixel)."""
    colours = palette()
    coloured = Image.fromarray(mask.to(torch.uint8).numpy(), mode="P")
    coloured.putpalette([v for colour in colours for v in colour])
    picture = Image.blend(image.convert("RGB"), coloured.convert("RGB"), alpha)
    del coloured
    shares = pixel_shares(mask, len(titles))
    present = sorted((i for i, s in enumerate(shares) if s > 0), key=lambda i: -shares[i])
    size = max(12, image.width // 60)
    font = _font(size)
    entries = [f"{titles[i]} {100 * shares[i]:.1f}%" for i in present]
    pad, swatch = size // 2, size
    draw = ImageDraw.Draw(picture)
    widths = [swatch + pad + int(draw.textlength(text, font=font)) + 2 * pad for text in entries]
    lines, x = 1, pad
    for w in widths:
        if x + w > image.width and x > pad:
            lines, x = lines + 1, pad
        x += w
    line_height = size + pad
    canvas = Image.new("RGB", (image.width, image.height + lines * line_height + pad), (255, 255, 255))
    canvas.paste(picture, (0, 0))
    draw = ImageDraw.Draw(canvas)
    x, y = pad, image.height + pad
    for index, text, w in zip(present, entries, widths):
        if x + w > image.width and x > pad:
            x, y = pad, y + line_height
        draw.rectangle([x, y, x + swatch, y + swatch], fill=colours[index], outline=(0, 0, 0))
        draw.text((x + swatch + pad, y), text, fill=(0, 0, 0), font=font)
        x += w
    return canvas


# ---------------------------------------------------------------------------------------------------------------
# 6. Evaluation: datasets, confusion matrix, IoU
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class SegmentationSet:
    root: Path
    images: list[Path]
    masks: list[Path]
    classnames_file: Path | None
    split: str | None = None  # the VOC split evaluated (None: every mask)


CLASSNAME_FILES = ("classnames.txt", "classes.txt", "labels.txt")


def read_segmentation_set(root: str | Path, split: str | None = None) -> SegmentationSet:
    """Our synth layout (images/ + masks/ + classnames.txt) or VOC's (JPEGImages/ + SegmentationClass/ +
    ImageSets/Segmentation/<split>.txt). Images and masks pair by file stem; every mask needs its image.

    Split: `split` reads ImageSets/Segmentation/<split>.txt, which must exist. Without one, a folder that has
    ImageSets/Segmentation/val.txt evaluates the val split (VOC's masks folder also holds the train masks);
    otherwise every mask."""
    root = Path(root)
    if not root.is_dir():
        raise CosmosError(f"{root}: not a directory; give images/ + masks/ (synth) or JPEGImages/ + SegmentationClass/ (VOC)")
    if (root / "images").is_dir() and (root / "masks").is_dir():
        image_dir, mask_dir = root / "images", root / "masks"
    elif (root / "JPEGImages").is_dir() and (root / "SegmentationClass").is_dir():
        image_dir, mask_dir = root / "JPEGImages", root / "SegmentationClass"
    else:
        raise CosmosError(f"{root}: expected images/ + masks/ (synth layout) or JPEGImages/ + SegmentationClass/ (VOC layout)")
    images = {p.stem: p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS}
    masks = {p.stem: p for p in mask_dir.iterdir() if p.suffix.lower() == ".png"}
    split_dir = root / "ImageSets" / "Segmentation"
    if split is None and (split_dir / "val.txt").is_file():
        split = "val"
    if split is not None:
        list_file = split_dir / f"{split}.txt"
        if not list_file.is_file():
            present = sorted(p.stem for p in split_dir.glob("*.txt")) if split_dir.is_dir() else []
            hint = f"splits present: {', '.join(present)}" if present else "this folder has no split files"
            raise CosmosError(f"{list_file}: split file not found ({hint}); choose another --split or leave it out")
        stems = [line.strip() for line in list_file.read_text().splitlines() if line.strip()]
    else:
        stems = sorted(masks)
    for stem in stems:
        if stem not in masks:
            raise CosmosError(f"{mask_dir / (stem + '.png')}: mask not found")
        if stem not in images:
            raise CosmosError(f"{mask_dir / masks[stem].name}: no image with the same name in {image_dir}")
    if not stems:
        raise CosmosError(f"{mask_dir}: no PNG masks" + (f" in split {split!r}" if split else ""))
    names_file = next((root / n for n in CLASSNAME_FILES if (root / n).is_file()), None)
    return SegmentationSet(root, [images[s] for s in stems], [masks[s] for s in stems], names_file, split)


def read_mask(path: Path, size: tuple[int, int], num_classes: int) -> torch.Tensor:
    """An 8-bit index mask [H, W] (long); errors for colour masks, a size unlike the image's, unknown indices."""
    try:
        with Image.open(path) as m:
            m.load()
            mode, mask_size = m.mode, m.size
            array = np.asarray(m)
    except (OSError, SyntaxError, ValueError) as e:
        raise CosmosError(f"{path}: cannot read mask ({e})") from None
    if mode not in ("P", "L", "I", "I;16"):
        raise CosmosError(f"{path}: mask has mode {mode}; expected an 8-bit index PNG (mode P or L) of class indices")
    if mask_size != size:
        raise CosmosError(
            f"{path}: mask is {mask_size[0]}x{mask_size[1]} but its image is {size[0]}x{size[1]}; masks must match their images"
        )
    mask = torch.from_numpy(array.astype(np.int64))
    bad = (mask != IGNORE_INDEX) & ((mask < 0) | (mask >= num_classes))
    if bad.any():
        raise CosmosError(
            f"{path}: class index {int(mask[bad][0])} but only {num_classes} class names; "
            f"check the class-name file (255 is 'ignore')"
        )
    return mask


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """[C, C] counts, rows = ground truth, columns = prediction; target pixels equal to 255 are ignored."""
    keep = target != IGNORE_INDEX
    index = target[keep] * num_classes + pred[keep]
    return torch.bincount(index, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def iou_from_confusion(matrix: torch.Tensor) -> list[float | None]:
    """IoU = TP / (TP + FP + FN) per class; None for a class absent from both truth and prediction."""
    matrix = matrix.double()
    tp = matrix.diag()
    union = matrix.sum(0) + matrix.sum(1) - tp
    return [None if u == 0 else (t / u).item() for t, u in zip(tp, union)]


@torch.no_grad()
def evaluate_segmentation(
    segmenter: Segmenter,
    dataset: SegmentationSet,
    titles: Sequence[str],
    progress: Progress | None = None,
) -> dict:
    """mIoU and per-class IoU over `dataset` (confusion matrix accumulated over all its pixels). Per-class IoU is
    a list in class-index order, so two classes with the same title stay apart."""
    num_classes = segmenter.classifier.num_classes
    matrix = torch.zeros(num_classes, num_classes, dtype=torch.long)
    for done, (image_path, mask_path) in enumerate(zip(dataset.images, dataset.masks), 1):
        image = open_image(image_path)
        target = read_mask(mask_path, image.size, num_classes)
        matrix += confusion_matrix(segmenter(image), target, num_classes)
        if progress:
            progress(done, len(dataset.images))
    ious = iou_from_confusion(matrix)
    present = [v for v in ious if v is not None]
    labelled = int(matrix.sum())
    return {
        "task": "segmentation",
        "data": str(dataset.root),
        "images": len(dataset.images),
        "classes": num_classes,
        "method": segmenter.config.method,
        "mIoU": sum(present) / len(present) if present else None,
        "pixel_accuracy": (int(matrix.diag().sum()) / labelled) if labelled else None,
        "split": dataset.split,
        "per_class_iou": [{"index": i, "class": title, "iou": iou} for i, (title, iou) in enumerate(zip(titles, ious))],
        "short_side": segmenter.short_side,
        "long_side": segmenter.long_side,
        "window": segmenter.window,
        "stride": segmenter.stride,
        "logit_scale": segmenter.config.logit_scale,
        "bg_threshold": segmenter.config.bg_threshold,
        "area_threshold": segmenter.config.area_threshold,
    }
