"""CLIP's image normalization and evaluation transform (resize shortest side, center crop, normalize)."""
from __future__ import annotations

from torchvision import transforms as T

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ToRGB:
    """Convert a PIL image to RGB (a class, not a lambda, so DataLoader workers can pickle it)."""

    def __call__(self, image):
        return image.convert("RGB")


def normalize() -> T.Normalize:
    return T.Normalize(CLIP_MEAN, CLIP_STD)


def eval_transform(image_size: int) -> T.Compose:
    """PIL RGB image -> normalized float tensor [3, image_size, image_size], as OpenCLIP evaluates."""
    return T.Compose(
        [
            T.Resize(image_size, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(image_size),
            ToRGB(),
            T.ToTensor(),
            normalize(),
        ]
    )
