"""Small charts drawn with PIL (no matplotlib): training curves and grouped bar charts, written as PNG files."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

from PIL import Image, ImageDraw, ImageFont

from .paths import atomic_write

COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if not math.isfinite(lo) or not math.isfinite(hi) or hi <= lo:
        return [lo]
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = min((m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw), default=raw)
    start = math.ceil(lo / step) * step
    return [start + i * step for i in range(int((hi - start) / step) + 1)]


def _label(v: float) -> str:
    return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.2e}"


def save_png(image: Image.Image, path: str | Path) -> Path:
    """Write atomically (a temporary file in the same folder, then a rename)."""
    return atomic_write(path, lambda tmp: image.save(tmp, format="PNG"), suffix=".tmp.png")


def line_chart(series: dict[str, Sequence[tuple[float, float]]], title: str = "", xlabel: str = "step",
               size: tuple[int, int] = (800, 450), log_y: bool = False) -> Image.Image:
    """One line per named series of (x, y) points; non-finite points are skipped."""
    width, height = size
    font, small = _font(16), _font(12)
    left, right, top, bottom = 70, 20 + 150 * (len(series) > 1), 40, 50
    points = {name: [(x, math.log10(y) if log_y else y) for x, y in pts
                     if math.isfinite(x) and math.isfinite(y) and (y > 0 or not log_y)]
              for name, pts in series.items()}
    xs = [x for pts in points.values() for x, _ in pts]
    ys = [y for pts in points.values() for _, y in pts]
    image = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(image)
    draw.text((left, 10), title, fill=(0, 0, 0), font=font)
    if not xs:
        draw.text((left, height // 2), "no data yet", fill=(120, 120, 120), font=font)
        return image
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    if x1 == x0:
        x1 = x0 + 1
    if y1 == y0:
        y0, y1 = y0 - 0.5, y1 + 0.5
    pad = (y1 - y0) * 0.05
    y0, y1 = y0 - pad, y1 + pad
    plot_w, plot_h = width - left - right, height - top - bottom

    def to_px(x: float, y: float) -> tuple[float, float]:
        return left + (x - x0) / (x1 - x0) * plot_w, top + (1 - (y - y0) / (y1 - y0)) * plot_h

    draw.rectangle([left, top, left + plot_w, top + plot_h], outline=(0, 0, 0))
    for t in _nice_ticks(y0, y1):
        _, py = to_px(x0, t)
        draw.line([left, py, left + plot_w, py], fill=(230, 230, 230))
        draw.text((5, py - 7), _label(10 ** t if log_y else t), fill=(0, 0, 0), font=small)
    for t in _nice_ticks(x0, x1):
        px, _ = to_px(t, y0)
        draw.line([px, top + plot_h, px, top + plot_h + 4], fill=(0, 0, 0))
        draw.text((px - 10, top + plot_h + 8), _label(t), fill=(0, 0, 0), font=small)
    draw.text((left + plot_w // 2 - 15, height - 22), xlabel, fill=(0, 0, 0), font=small)
    for k, (name, pts) in enumerate(points.items()):
        colour = COLOURS[k % len(COLOURS)]
        pixels = [to_px(x, y) for x, y in sorted(pts)]
        if len(pixels) > 1:
            draw.line(pixels, fill=colour, width=2)
        elif pixels:
            px, py = pixels[0]
            draw.ellipse([px - 2, py - 2, px + 2, py + 2], fill=colour)
        if len(series) > 1:
            ly = top + 18 * k
            draw.line([width - right + 10, ly + 7, width - right + 30, ly + 7], fill=colour, width=3)
            draw.text((width - right + 35, ly), name, fill=(0, 0, 0), font=small)
    return image


def bar_chart(groups: Sequence[str], series: dict[str, Sequence[float]], errors: dict[str, Sequence[float]] | None = None,
              title: str = "", ylabel: str = "", size: tuple[int, int] = (1000, 480), ymax: float | None = None) -> Image.Image:
    """Grouped bars: for each group (x position) one bar per series, with optional +- error whiskers."""
    width, height = size
    font, small = _font(16), _font(12)
    left, right, top, bottom = 60, 20, 60, 70
    values = [v for vs in series.values() for v in vs if v is not None and math.isfinite(v)]
    top_value = ymax if ymax is not None else (max(values) * 1.1 if values else 1.0)
    top_value = top_value or 1.0
    image = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(image)
    draw.text((left, 10), title, fill=(0, 0, 0), font=font)
    plot_w, plot_h = width - left - right, height - top - bottom
    draw.rectangle([left, top, left + plot_w, top + plot_h], outline=(0, 0, 0))
    for t in _nice_ticks(0, top_value):
        py = top + (1 - t / top_value) * plot_h
        draw.line([left, py, left + plot_w, py], fill=(230, 230, 230))
        draw.text((5, py - 7), _label(t), fill=(0, 0, 0), font=small)
    draw.text((5, top - 18), ylabel, fill=(0, 0, 0), font=small)
    n_series = max(1, len(series))
    group_w = plot_w / max(1, len(groups))
    bar_w = group_w * 0.8 / n_series
    for g, group in enumerate(groups):
        gx = left + g * group_w + group_w * 0.1
        for s, (name, vs) in enumerate(series.items()):
            v = vs[g]
            if v is None or not math.isfinite(v):
                continue
            x_left = gx + s * bar_w
            py = top + (1 - min(v, top_value) / top_value) * plot_h
            draw.rectangle([x_left, py, x_left + bar_w - 2, top + plot_h], fill=COLOURS[s % len(COLOURS)])
            err = (errors or {}).get(name)
            if err and err[g]:
                e = err[g] / top_value * plot_h
                cx = x_left + bar_w / 2 - 1
                draw.line([cx, py - e, cx, py + e], fill=(0, 0, 0), width=1)
                draw.line([cx - 3, py - e, cx + 3, py - e], fill=(0, 0, 0))
                draw.line([cx - 3, py + e, cx + 3, py + e], fill=(0, 0, 0))
        text_w = draw.textlength(group, font=small)
        draw.text((left + g * group_w + (group_w - text_w) / 2, top + plot_h + 8), group, fill=(0, 0, 0), font=small)
    x = left
    for s, name in enumerate(series):
        draw.rectangle([x, top - 22, x + 12, top - 10], fill=COLOURS[s % len(COLOURS)])
        draw.text((x + 16, top - 24), name, fill=(0, 0, 0), font=small)
        x += 30 + int(draw.textlength(name, font=small))
    return image
