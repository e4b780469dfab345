"""Multi-modal augmentation ("views", COSMOS section 3.1): image multi-crop + text cropping, one class per sample.

COSMOS trains on several views of every image-text pair:

- Image views, DINO's multi-crop recipe: 2 global crops (RandomResizedCrop, scale 0.4-1.0, bicubic) and 6 local
  crops (scale 0.05-0.4). Every crop is flipped (p `hflip_p`, 0.5), colour-jittered (0.4, 0.4, 0.2, 0.1 with
  p 0.8, the four ops in a random order) and greyed (p 0.2); global #1 is always blurred, global #2 is blurred with
  p 0.1 and solarized (threshold 128) with p 0.2, locals are blurred with p 0.5; then CLIP mean/std normalization.
  Order: [g1, g2, l1 .. l6].
- Text views: a sample's captions (a dict of caption fields, each a list of pre-split sentences) are pooled into
  one list of sentences (`sentence_pool`). Each of the 2 global text crops joins n ~ Uniform{1..5} distinct
  sentences in random order with ". "; each of the 6 local text crops is one sentence (distinct, the pool
  repeated when it is too small). The tokenizer truncates a long crop and forces end-of-text at the last position.
- Image and text crops are sampled independently (no region correspondence).

`mode="clip"` gives the plain CLIP baseline, one image view and one caption: one OpenCLIP-style training crop
(RandomResizedCrop scale 0.9-1.0, no other augmentation) and, by `clip_text`, one caption FIELD of the sample
(its sentences joined with ". "; "caption": a random field, "raw": the `raw` alt-text field only) or one sentence
of the pool ("sentence": the text-crop baseline). CLIP mode fixes the view counts to 1 / 0 / 1 / 0.

Randomness is explicit: every random choice comes from one `random.Random` per call, so views are reproducible
from a seed and never touch the global torch RNG. The image ops are PIL operations with the sampled parameters
(the same functional ops torchvision's transforms apply), each crop is resized from the decoded image with one
bicubic resample, and the float conversion + normalization runs once per resolution. The transform is a plain
picklable object (no lambdas), ready for DataLoader workers.
"""
from __future__ import annotations

import hashlib
import math
import numbers
import random
from dataclasses import dataclass, fields
from typing import Callable, Sequence, Union

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps
from torch.utils.data import get_worker_info
from torchvision.transforms import functional as TF

from ..errors import CosmosError
from ..transforms import CLIP_MEAN, CLIP_STD
from .shards import validate_captions

MODES = ("cosmos", "clip")
CLIP_TEXTS = ("caption", "raw", "sentence")

# Fixed order in which caption fields are pooled; fields not listed follow in sorted order.
FIELD_ORDER = ("raw", "short", "long")

# What the transform accepts as a sample's text: the captions dict, or a list of sentences (one pooled field).
Captions = Union[dict, Sequence[str]]
LIST_FIELD = "sentences"  # the field name a plain list of sentences takes


# ---------------------------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------------------------

# CLIP mode: one image view, one caption, no local views.
CLIP_COUNTS = {"n_global": 1, "n_local": 0, "n_global_text": 1, "n_local_text": 0}


@dataclass
class ViewConfig:
    """How many views of which size; the defaults are the paper's ViT-B/16 recipe.

    mode="clip" fixes n_global, n_local, n_global_text, n_local_text to 1, 0, 1, 0; a count set to anything but
    its cosmos default or that value is refused (it would be silently ignored).
    """

    global_size: int = 224
    local_size: int = 96
    n_global: int = 2
    n_local: int = 6
    global_scale: tuple[float, float] = (0.4, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.4)
    n_global_text: int = 2
    n_local_text: int = 6
    max_global_sentences: int = 5
    context_length: int = 77
    mode: str = "cosmos"
    # CLIP mode: OpenCLIP's training crop (its default aug scale), no flip / jitter / blur.
    clip_scale: tuple[float, float] = (0.9, 1.0)
    # CLIP mode's caption: "caption" (a random caption field), "raw" (the raw field only), "sentence" (one sentence).
    clip_text: str = "caption"
    # Gaussian blur sigma range in output pixels (DINO's PIL radius 0.1-2.0).
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    # Horizontal flip probability of every cosmos-mode crop; 0 keeps "left" / "right" in captions true.
    hflip_p: float = 0.5

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise CosmosError(f"view mode {self.mode!r} is unknown; use one of {', '.join(MODES)}")
        if self.clip_text not in CLIP_TEXTS:
            raise CosmosError(f"view config: clip_text={self.clip_text!r} is unknown; use one of "
                              f"{', '.join(CLIP_TEXTS)}")
        for name in ("global_size", "local_size", "context_length", "max_global_sentences"):
            if _integer(self, name) < 1:
                raise CosmosError(f"view config: {name}={getattr(self, name)!r} must be a positive integer")
        for name in ("n_global", "n_local", "n_global_text", "n_local_text"):
            if _integer(self, name) < 0:
                raise CosmosError(f"view config: {name}={getattr(self, name)!r} must be an integer >= 0")
        if self.mode == "clip":  # the CLIP baseline: one image view, one caption
            defaults = {f.name: f.default for f in fields(self)}
            for name, fixed in CLIP_COUNTS.items():
                if getattr(self, name) not in (fixed, defaults[name]):
                    raise CosmosError(
                        f"view config: mode='clip' uses one image view and one caption ({name}={fixed}), but "
                        f"{name}={getattr(self, name)} was set; leave {name} unset or use mode='cosmos'")
                setattr(self, name, fixed)
        for name in ("global_scale", "local_scale", "clip_scale"):
            lo, hi = _pair(self, name)
            if not 0.0 < lo <= hi <= 1.0:
                raise CosmosError(f"view config: {name}=({lo}, {hi}) must satisfy 0 < low <= high <= 1")
        lo, hi = _pair(self, "blur_sigma")
        if not 0.0 < lo <= hi:
            raise CosmosError(f"view config: blur_sigma=({lo}, {hi}) must satisfy 0 < low <= high (pixels)")
        p = self.hflip_p
        if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0.0 <= p <= 1.0:
            raise CosmosError(f"view config: hflip_p={p!r} must be a probability between 0 and 1")
        self.hflip_p = float(p)

    @classmethod
    def tiny(cls, mode: str = "cosmos", context_length: int = 77, **overrides) -> "ViewConfig":
        """The CPU-sized recipe for the tiny model and the synthetic scenes: 64 px global, 32 px local crops.

        The blur range shrinks with the crops so a 32 px local crop is not wiped out. `overrides` set any other
        field (e.g. hflip_p=0.0, clip_text="raw").
        """
        settings = dict(global_size=64, local_size=32, blur_sigma=(0.1, 0.6))
        settings.update(overrides)
        return cls(mode=mode, context_length=context_length, **settings)


def _integer(cfg: ViewConfig, name: str) -> int:
    """The field `name` as an int; a float, bool or string is refused (2.0 crops is a typo, not a count)."""
    value = getattr(cfg, name)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise CosmosError(f"view config: {name}={value!r} must be an integer, not a {type(value).__name__}")
    setattr(cfg, name, int(value))
    return int(value)


def _pair(cfg: ViewConfig, name: str) -> tuple[float, float]:
    """The field `name` as a (low, high) pair of floats, stored back as a tuple."""
    value = getattr(cfg, name)
    try:
        lo, hi = value
        if any(isinstance(v, bool) or not isinstance(v, numbers.Real) for v in (lo, hi)):
            raise TypeError
    except (TypeError, ValueError):
        raise CosmosError(f"view config: {name}={value!r} must be a pair of numbers (low, high)") from None
    setattr(cfg, name, (float(lo), float(hi)))
    return float(lo), float(hi)


# ---------------------------------------------------------------------------------------------------------------
# Sentences: the pool a sample's text crops are drawn from
# ---------------------------------------------------------------------------------------------------------------


def caption_fields(captions: Captions, where: str = "sample") -> dict[str, list[str]]:
    """A sample's captions as {field: [sentence, ...]} in the fixed field order ("raw", "short", "long", then the
    rest sorted), sentences stripped. A plain list of sentences is one field, named "sentences".

    The captions are checked by the shard format's rule first (`validate_captions`): a field that is a plain string
    instead of a list of sentences is refused, since sampling from it would pick characters and training silently
    collapses."""
    if isinstance(captions, (list, tuple)):
        captions = {LIST_FIELD: list(captions)}
    captions = validate_captions(captions, where)
    order = [f for f in FIELD_ORDER if f in captions] + sorted(f for f in captions if f not in FIELD_ORDER)
    return {f: [sentence.strip() for sentence in captions[f]] for f in order}


def sentence_pool(captions: Captions, where: str = "sample") -> list[str]:
    """All caption fields' sentences in one list, fields in the fixed order of `caption_fields` (which validates)."""
    return [sentence for sentences in caption_fields(captions, where).values() for sentence in sentences]


def clip_caption(captions: Captions, cfg: ViewConfig, rng: random.Random, where: str = "sample") -> str:
    """CLIP mode's one caption, by `cfg.clip_text`:
    "caption": a random non-empty field of the sample, its sentences joined with ". ";
    "raw": the `raw` field (the alt-text), joined the same way; refused when the sample has none;
    "sentence": one sentence of the pool (a one-sentence text crop)."""
    by_field = caption_fields(captions, where)
    if cfg.clip_text == "sentence":
        pool = [sentence for sentences in by_field.values() for sentence in sentences]
        return pool[rng.randrange(len(pool))]
    if cfg.clip_text == "raw":
        if not by_field.get("raw"):
            given = "a plain list of sentences" if isinstance(captions, (list, tuple)) else \
                f"fields {', '.join(by_field)}"
            raise CosmosError(f"{where}: clip_text='raw' needs a non-empty 'raw' caption field, got {given}; "
                              "use clip_text='caption' or data whose captions have a 'raw' field")
        return ". ".join(by_field["raw"])
    non_empty = [f for f, sentences in by_field.items() if sentences]
    return ". ".join(by_field[non_empty[rng.randrange(len(non_empty))]])


def text_crops(captions: Captions, cfg: ViewConfig, rng: random.Random,
               where: str = "sample") -> tuple[list[str], list[str]]:
    """Sample the text views of one sample as strings: (global crops, local crops).

    `captions`: the captions dict, or a list of sentences (one pooled field).
    Global crop: n ~ Uniform{1 .. min(max_global_sentences, pool size)} distinct sentences, random order, ". ".
    Local crops: one sentence each, distinct; the pool is repeated (reshuffled) when it holds fewer sentences.
    CLIP mode: one caption (`clip_caption`), no local crops.
    """
    if cfg.mode == "clip":
        return [clip_caption(captions, cfg, rng, where)], []
    sentences = sentence_pool(captions, where)
    global_crops = []
    for _ in range(cfg.n_global_text):
        n = rng.randint(1, min(cfg.max_global_sentences, len(sentences)))
        global_crops.append(". ".join(rng.sample(sentences, n)))
    local_crops: list[str] = []
    while len(local_crops) < cfg.n_local_text:
        take = min(cfg.n_local_text - len(local_crops), len(sentences))
        local_crops.extend(rng.sample(sentences, take))
    return global_crops, local_crops


# ---------------------------------------------------------------------------------------------------------------
# Image ops with explicit randomness (parameters drawn as torchvision / DINO draw them)
# ---------------------------------------------------------------------------------------------------------------


def crop_box(width: int, height: int, scale: tuple[float, float], rng: random.Random,
             ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """RandomResizedCrop's box (left, top, w, h): area fraction ~ U(scale), log aspect ~ U(log ratio); ten tries,
    then the largest central crop within the ratio range (torchvision's algorithm)."""
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, width - w), rng.randint(0, height - h), w, h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def resized_crop(image: Image.Image, box: tuple[int, int, int, int], size: int) -> Image.Image:
    """Crop `box` (left, top, w, h) and resize it to size x size with one bicubic resample."""
    left, top, w, h = box
    return image.resize((size, size), Image.BICUBIC, box=(left, top, left + w, top + h))


def color_jitter(image: Image.Image, rng: random.Random, brightness: float = 0.4, contrast: float = 0.4,
                 saturation: float = 0.2, hue: float = 0.1) -> Image.Image:
    """ColorJitter: factors ~ U(1 - x, 1 + x) (hue ~ U(-x, x)) applied in a random order."""
    factors = [rng.uniform(1 - brightness, 1 + brightness), rng.uniform(1 - contrast, 1 + contrast),
               rng.uniform(1 - saturation, 1 + saturation), rng.uniform(-hue, hue)]
    order = [0, 1, 2, 3]
    rng.shuffle(order)
    for op in order:
        if op == 0:
            image = TF.adjust_brightness(image, factors[0])
        elif op == 1:
            image = TF.adjust_contrast(image, factors[1])
        elif op == 2:
            image = TF.adjust_saturation(image, factors[2])
        else:
            image = TF.adjust_hue(image, factors[3])
    return image


def augment_crop(image: Image.Image, rng: random.Random, blur_p: float, solarize_p: float,
                 blur_sigma: tuple[float, float], flip_p: float = 0.5) -> Image.Image:
    """DINO's per-crop chain: flip `flip_p`, jitter 0.8, grayscale 0.2, blur `blur_p`, solarize `solarize_p`
    (pixels >= 128 inverted). One draw per decision, whatever the probabilities."""
    if rng.random() < flip_p:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    if rng.random() < 0.8:
        image = color_jitter(image, rng)
    if rng.random() < 0.2:
        image = image.convert("L").convert("RGB")
    if rng.random() < blur_p:
        image = image.filter(ImageFilter.GaussianBlur(radius=rng.uniform(*blur_sigma)))
    if rng.random() < solarize_p:
        image = ImageOps.solarize(image, threshold=128)
    return image


_MEAN = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1) * 255.0
_STD = torch.tensor(CLIP_STD).view(1, 3, 1, 1) * 255.0


def to_normalized_tensor(crops: list[Image.Image], size: int) -> torch.Tensor:
    """Equal-size RGB crops -> one CLIP-normalized float tensor [n, 3, size, size] (empty when n = 0)."""
    if not crops:
        return torch.empty(0, 3, size, size)
    pixels = torch.from_numpy(np.stack([np.asarray(c, dtype=np.uint8) for c in crops]))  # [n, S, S, 3] uint8
    pixels = pixels.permute(0, 3, 1, 2).float()  # [n, 3, S, S]
    return (pixels - _MEAN) / _STD


# ---------------------------------------------------------------------------------------------------------------
# The augmentation: one call -> every view of one sample
# ---------------------------------------------------------------------------------------------------------------


def _hashed_rng(text: str) -> random.Random:
    """A generator seeded from `text` by SHA-256 (stable across processes and Python runs)."""
    return random.Random(int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little"))


class MultiViewTransform:
    """(image, captions) -> {"global_crops", "local_crops", "global_text", "local_text"} for one sample.

    captions: the sample's captions dict ({field: [sentence, ...]}), or a list of sentences (one pooled field).
    tokenizer: callable `tokenizer(list[str], context_length=...) -> LongTensor [N, ctx]` (cosmos.tokenizer).
    seed: makes views reproducible. Pass `key=` (the sample key) to draw from a generator derived from
    (seed, epoch, key), which is independent of worker count and order (use this in DataLoader workers).
    Without a key the transform advances its own seeded stream of generators; inside a DataLoader worker that
    stream is derived from (seed, epoch, worker id), so workers do not repeat each other's views (the order in
    which samples reach a worker then decides their views). Without a seed (and no `rng`), each call draws a fresh
    generator from Python's global `random`, which PyTorch reseeds in every DataLoader worker.
    """

    def __init__(self, cfg: ViewConfig, tokenizer: Callable[..., torch.Tensor], seed: int | None = None) -> None:
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.seed = seed
        self.epoch = 0
        self._stream = random.Random(seed) if seed is not None else None
        self._stream_owner: tuple[int, int] | None = None  # (worker id, epoch) of a worker's stream

    def set_epoch(self, epoch: int) -> None:
        """Different (still reproducible) keyed views in every epoch."""
        self.epoch = int(epoch)

    def rng_for(self, key: str) -> random.Random:
        """The generator for sample `key` under this transform's seed and epoch."""
        return _hashed_rng(f"{self.seed}/{self.epoch}/{key}")

    def _rng(self, rng: random.Random | None, key: str | None) -> random.Random:
        if rng is not None:
            return rng
        if self.seed is None:
            return random.Random(random.getrandbits(64))
        if key is not None:
            return self.rng_for(key)
        worker = get_worker_info()
        if worker is not None and self._stream_owner != (worker.id, self.epoch):
            # Every worker holds a copy of this object: give each its own stream (and a new one per epoch, since
            # non-persistent workers start again from a fresh copy).
            self._stream = _hashed_rng(f"{self.seed}/{self.epoch}/worker-{worker.id}/stream")
            self._stream_owner = (worker.id, self.epoch)
        return random.Random(self._stream.getrandbits(64))

    def __call__(self, image: Image.Image, captions: Captions, rng: random.Random | None = None,
                 key: str | None = None) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        rng = self._rng(rng, key)
        if image.mode != "RGB":
            image = image.convert("RGB")
        width, height = image.size

        # Image views: [g1, g2, l1 .. l6]; DINO's blur / solarize probabilities per view.
        global_crops, local_crops = [], []
        if cfg.mode == "clip":
            global_crops.append(resized_crop(image, crop_box(width, height, cfg.clip_scale, rng), cfg.global_size))
        else:
            for i in range(cfg.n_global):
                crop = resized_crop(image, crop_box(width, height, cfg.global_scale, rng), cfg.global_size)
                blur_p, solarize_p = (1.0, 0.0) if i == 0 else (0.1, 0.2)
                global_crops.append(augment_crop(crop, rng, blur_p, solarize_p, cfg.blur_sigma, cfg.hflip_p))
            for _ in range(cfg.n_local):
                crop = resized_crop(image, crop_box(width, height, cfg.local_scale, rng), cfg.local_size)
                local_crops.append(augment_crop(crop, rng, 0.5, 0.0, cfg.blur_sigma, cfg.hflip_p))

        # Text views, sampled independently of the image crops.
        where = f"sample {key!r}" if key is not None else "sample"
        global_text, local_text = text_crops(captions, cfg, rng, where)
        return {
            "global_crops": to_normalized_tensor(global_crops, cfg.global_size),  # [n_global, 3, G, G]
            "local_crops": to_normalized_tensor(local_crops, cfg.local_size),  # [n_local, 3, L, L]
            "global_text": self._tokenize(global_text),  # [n_global_text, ctx]
            "local_text": self._tokenize(local_text),  # [n_local_text, ctx]
        }

    def _tokenize(self, texts: list[str]) -> torch.Tensor:
        if not texts:
            return torch.zeros(0, self.cfg.context_length, dtype=torch.long)
        tokens = self.tokenizer(texts, context_length=self.cfg.context_length)  # [N, ctx]
        return torch.as_tensor(tokens, dtype=torch.long)


# ---------------------------------------------------------------------------------------------------------------
# Batching
# ---------------------------------------------------------------------------------------------------------------

VIEW_KEYS = ("global_crops", "local_crops", "global_text", "local_text")


def collate_views(samples: list[dict]) -> dict:
    """Stack the samples' views: each view key -> [B, n, ...]; "keys" -> the samples' "key" (or "__key__")."""
    if not samples:
        raise CosmosError("collate_views got an empty batch")
    batch: dict = {}
    for name in VIEW_KEYS:
        if name in samples[0]:
            batch[name] = torch.stack([s[name] for s in samples])  # [B, n, ...]
    batch["keys"] = [str(s.get("key", s.get("__key__", ""))) for s in samples]
    return batch
