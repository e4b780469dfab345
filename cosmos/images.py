"""Opening images the way every command needs them: any common format, EXIF-rotated, as RGB, with clear errors."""
from __future__ import annotations

import io
import warnings
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import CosmosError, ImageDecodeError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def to_rgb(image: Image.Image) -> Image.Image:
    """Apply the EXIF orientation, then convert any mode (L, LA, P, RGBA, CMYK, I;16...) to RGB.

    Transparent pixels are composited on white, so an RGBA logo does not turn black.
    """
    image = ImageOps.exif_transpose(image)
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA"):
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image, mask=image.getchannel("A"))
        return background
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        image = image.point(lambda v: v / 256).convert("L")
    return image.convert("RGB")


def open_image(path: str | Path) -> Image.Image:
    """Read an image file fully into memory as RGB. Raises CosmosError naming the file when it cannot."""
    path = Path(path)
    if not path.exists():
        raise CosmosError(f"{path}: no such file")
    if path.is_dir():
        raise CosmosError(f"{path}: is a directory, not an image")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CosmosError(f"{path}: cannot read ({e.strerror or e})") from None
    return decode_image(data, name=str(path))


def decode_image(data: bytes, name: str = "<bytes>") -> Image.Image:
    """Decode image bytes to RGB; ImageDecodeError (a CosmosError naming `name`, with a `kind`) for empty,
    non-image, decompression-bomb, or truncated/corrupt data."""
    if not data:
        raise ImageDecodeError(f"{name}: empty file (0 bytes), not an image", "empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            image.load()
            return to_rgb(image)  # inside the try: a damaged EXIF block or palette fails here
    except UnidentifiedImageError:
        raise ImageDecodeError(f"{name}: not an image (unknown format)", "not-image") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageDecodeError(f"{name}: image too large, refused as a decompression bomb ({e})", "bomb") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageDecodeError(f"{name}: corrupt or truncated image ({e})", "corrupt") from None
