"""Synthetic scenes: procedural image-text pairs with exact masks, to train and evaluate on a CPU.

A scene is a textured background and 1 to 4 non-overlapping objects. Each object has a shape, a colour, a size
(small / large) and a position named on a 3x3 grid ("top left" ... "bottom right"); each object sits inside its
own grid cell, so objects never overlap and every caption's position word is true of the whole object.

Captions imitate re-captioned web data (one list of sentences per field, as the shard format wants):
- `raw`: alt-text that names only the largest object ("red star icon"): a large one when the scene has one
  (the size its other captions state), the one with the most pixels among those;
- `short`: one sentence about the scene;
- `long`: one sentence per object plus a scene sentence, shuffled, from several templates and synonyms.

Ground truth: two index masks per scene, shape class and colour class (0 = background), drawn from the same
polygons as the image, so each mask pixel is exactly an object pixel of that class.

`write_synth` writes training shards and the evaluation sets (classification by shape and by colour, retrieval
with long captions, segmentation by shape and by colour; none when n_eval is 0) with a process pool. Every sample
draws from its own generator, seeded by (seed, stream, index), so the output is byte-identical for a seed whatever
the worker count, and the evaluation streams never share scenes with the training stream. All options are checked
before anything is written, and a run that fails part-way removes what it wrote, so it can simply be rerun.
"""
from __future__ import annotations

import io
import itertools
import json
import math
import multiprocessing
import os
import random
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
from PIL import Image, ImageDraw

from ..errors import CosmosError
from ..paths import claim_out_folder
from ..workers import imap_in_pool
from .shards import ShardWriter, atomic_write_bytes, sample_files, write_manifest

# ---------------------------------------------------------------------------------------------------------------
# The vocabulary of the scenes
# ---------------------------------------------------------------------------------------------------------------

SHAPES = ("circle", "square", "triangle", "star", "cross", "heart", "hexagon", "ring")
COLOURS = {  # name -> RGB; hues far apart, all readable on every background
    "red": (215, 35, 35),
    "orange": (245, 135, 20),
    "yellow": (240, 215, 30),
    "green": (40, 165, 60),
    "cyan": (30, 200, 215),
    "blue": (35, 70, 215),
    "purple": (135, 50, 175),
    "pink": (245, 120, 185),
}
SIZES = ("small", "large")
POSITIONS = (  # row-major over the 3x3 grid
    "top left", "top middle", "top right",
    "middle left", "center", "middle right",
    "bottom left", "bottom middle", "bottom right",
)
BACKGROUNDS = {  # name -> RGB; neutral, so no background shares a name or hue with an object colour
    "white": (238, 238, 232),
    "grey": (128, 128, 128),
    "beige": (215, 200, 165),
    "black": (30, 30, 34),
}
TEXTURES = ("plain", "striped", "checkered", "speckled")
SIZE_RADIUS = {"small": (0.18, 0.25), "large": (0.36, 0.44)}  # half-extent as a fraction of the cell side
MAX_OBJECTS = 4
MIN_SIZE = 32
MAX_SIZE = 4096
FORMATS = ("png", "jpg")

# ---------------------------------------------------------------------------------------------------------------
# Shapes: polygons inside the box [cx - r, cx + r] x [cy - r, cy + r]
# ---------------------------------------------------------------------------------------------------------------

Polygon = list[tuple[float, float]]


def _regular(cx: float, cy: float, r: float, n: int, phase: float) -> Polygon:
    return [(cx + r * math.cos(phase + 2 * math.pi * k / n), cy + r * math.sin(phase + 2 * math.pi * k / n))
            for k in range(n)]


def shape_polygons(shape: str, cx: float, cy: float, r: float) -> list[tuple[Polygon, bool]]:
    """The polygons of `shape` as (points, filled): filled polygons add pixels, unfilled ones cut holes."""
    up = -math.pi / 2
    if shape == "circle":
        return [(_regular(cx, cy, r, 40, 0.0), True)]
    if shape == "square":
        s = 0.9 * r
        return [([(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)], True)]
    if shape == "triangle":
        return [([(cx, cy - r), (cx + r, cy + 0.8 * r), (cx - r, cy + 0.8 * r)], True)]
    if shape == "star":
        outer, inner = _regular(cx, cy, r, 5, up), _regular(cx, cy, 0.42 * r, 5, up + math.pi / 5)
        return [([p for pair in zip(outer, inner) for p in pair], True)]
    if shape == "cross":
        a = 0.33 * r
        pts = [(-a, -r), (a, -r), (a, -a), (r, -a), (r, a), (a, a), (a, r), (-a, r), (-a, a), (-r, a), (-r, -a),
               (-a, -a)]
        return [([(cx + x, cy + y) for x, y in pts], True)]
    if shape == "heart":  # the classic parametric heart, scaled into the box (x in [-16, 16], y in [-17, 12])
        pts = []
        for k in range(48):
            t = 2 * math.pi * k / 48
            x = 16 * math.sin(t) ** 3
            y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
            pts.append((cx + r * x / 16, cy - r * (y + 2.5) / 14.5))
        return [(pts, True)]
    if shape == "hexagon":
        return [(_regular(cx, cy, r, 6, 0.0), True)]
    if shape == "ring":
        return [(_regular(cx, cy, r, 40, 0.0), True), (_regular(cx, cy, 0.55 * r, 40, 0.0), False)]
    raise CosmosError(f"unknown shape {shape!r}; known shapes: {', '.join(SHAPES)}")


# ---------------------------------------------------------------------------------------------------------------
# A scene
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class SceneObject:
    shape: str
    colour: str
    size: str  # "small" | "large"
    position: str  # one of POSITIONS
    bbox: tuple[int, int, int, int]  # (left, top, right, bottom) of its pixels, right/bottom exclusive
    area: int  # pixel count

    def as_dict(self) -> dict:
        return {"shape": self.shape, "colour": self.colour, "size": self.size, "position": self.position,
                "bbox": list(self.bbox), "area": self.area}


@dataclass
class Scene:
    image: Image.Image  # RGB, size x size
    shape_mask: np.ndarray  # [H, W] uint8, 0 = background, i = SHAPES[i - 1]
    colour_mask: np.ndarray  # [H, W] uint8, 0 = background, i = list(COLOURS)[i - 1]
    objects: list[SceneObject]
    background: str
    texture: str
    captions: dict[str, list[str]] = field(default_factory=dict)  # raw / short / long, lists of sentences

    @property
    def raw_caption(self) -> str:
        return self.captions["raw"][0]

    @property
    def long_caption(self) -> str:
        """The long caption as one text (sentences joined with ". "), as retrieval evaluates it."""
        return ". ".join(self.captions["long"]) + "."

    def meta(self) -> dict:
        return {"background": self.background, "texture": self.texture,
                "objects": [o.as_dict() for o in self.objects]}


def draw_background(rng: random.Random, size: int, colour: str, texture: str) -> np.ndarray:
    """A size x size RGB background of `colour` with `texture`: # [H, W, 3] uint8."""
    base = np.array(BACKGROUNDS[colour], dtype=np.int16)
    second = np.clip(base + (22 if base.mean() < 128 else -22), 0, 255).astype(np.uint8)  # the texture's 2nd tone
    pixels = np.empty((size, size, 3), dtype=np.uint8)  # [H, W, 3]
    pixels[:] = base.astype(np.uint8)
    if texture in ("striped", "checkered"):
        yy, xx = np.ogrid[0:size, 0:size]  # [H, 1], [1, W]
        if texture == "striped":
            period = rng.randint(max(4, size // 16), max(6, size // 6)) // 2 + 1
            lines = rng.choice((xx + yy, xx + 0 * yy, yy + 0 * xx))  # diagonal, vertical or horizontal stripes
            pattern = (lines // period) % 2 == 1  # [H, W]
        else:
            cell = rng.randint(max(4, size // 16), max(6, size // 8))
            pattern = ((xx // cell) + (yy // cell)) % 2 == 1  # [H, W]
        pixels[pattern] = second
    elif texture == "speckled":
        noise = np.random.default_rng(rng.getrandbits(64)).integers(-18, 19, size=(size, size, 1), dtype=np.int16)
        pixels = np.clip(base + noise, 0, 255).astype(np.uint8)  # [H, W, 3]
    return pixels


def make_scene(rng: random.Random, size: int = 128, n_objects: int | None = None, shape: str | None = None,
               colour: str | None = None) -> Scene:
    """Draw one scene from `rng`: background, 1-4 objects in distinct grid cells, masks, captions.

    `n_objects`, `shape` and `colour` fix those choices (eval sets use single-object scenes of a given class;
    `shape` / `colour` apply to the first object).
    """
    if size < MIN_SIZE:
        raise CosmosError(f"scene size {size} px is too small; use at least {MIN_SIZE} px")
    if shape is not None and shape not in SHAPES:
        raise CosmosError(f"unknown shape {shape!r}; known shapes: {', '.join(SHAPES)}")
    if colour is not None and colour not in COLOURS:
        raise CosmosError(f"unknown colour {colour!r}; known colours: {', '.join(COLOURS)}")
    n = n_objects if n_objects is not None else rng.randint(1, MAX_OBJECTS)
    if not 1 <= n <= 9:
        raise CosmosError(f"a scene holds 1 to 9 objects (one per grid cell), asked for {n}")

    background, texture = rng.choice(sorted(BACKGROUNDS)), rng.choice(TEXTURES)
    pixels = draw_background(rng, size, background, texture)  # [H, W, 3] uint8
    shape_mask = np.zeros((size, size), dtype=np.uint8)  # [H, W]
    colour_mask = np.zeros((size, size), dtype=np.uint8)  # [H, W]
    colour_names = list(COLOURS)

    objects = []
    for i, cell in enumerate(rng.sample(range(9), n)):
        obj_shape = shape if (i == 0 and shape is not None) else rng.choice(SHAPES)
        obj_colour = colour if (i == 0 and colour is not None) else rng.choice(colour_names)
        obj_size = rng.choice(SIZES)
        row, col = divmod(cell, 3)
        # The cell's pixel range; the object's box [c - r, c + r] stays one pixel inside it.
        x0, x1 = col * size / 3, (col + 1) * size / 3
        y0, y1 = row * size / 3, (row + 1) * size / 3
        r = min(rng.uniform(*SIZE_RADIUS[obj_size]) * (size / 3), size / 6 - 1.5)
        cx = rng.uniform(x0 + r + 1, x1 - r - 1)
        cy = rng.uniform(y0 + r + 1, y1 - r - 1)

        # One polygon set gives the object's pixels; image and both masks are painted through it. It is drawn
        # on a canvas covering the object's cell only (the object never leaves its cell).
        left, top = int(x0), int(y0)
        canvas = Image.new("L", (int(math.ceil(x1)) - left, int(math.ceil(y1)) - top), 0)
        draw = ImageDraw.Draw(canvas)
        for points, filled in shape_polygons(obj_shape, cx - left, cy - top, r):
            draw.polygon(points, fill=255 if filled else 0)
        inside = np.asarray(canvas) > 0  # [h, w] bool, the cell
        ys, xs = np.nonzero(inside)
        if len(xs) == 0:
            raise CosmosError(f"scene size {size} px draws an empty {obj_size} {obj_shape}; use a larger size")
        region = (slice(top, top + inside.shape[0]), slice(left, left + inside.shape[1]))
        pixels[region][inside] = COLOURS[obj_colour]
        shape_mask[region][inside] = SHAPES.index(obj_shape) + 1
        colour_mask[region][inside] = colour_names.index(obj_colour) + 1
        objects.append(SceneObject(obj_shape, obj_colour, obj_size, POSITIONS[cell],
                                   (left + int(xs.min()), top + int(ys.min()), left + int(xs.max()) + 1,
                                    top + int(ys.max()) + 1), int(len(xs))))

    scene = Scene(Image.fromarray(pixels, "RGB"), shape_mask, colour_mask, objects, background, texture)
    scene.captions = make_captions(rng, scene)
    return scene


# ---------------------------------------------------------------------------------------------------------------
# Captions: alt-text, a short sentence, a long description (sentences carry no final period)
# ---------------------------------------------------------------------------------------------------------------

SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big")}
TEXTURE_WORDS = {"plain": ("plain", "solid"), "striped": ("striped",), "checkered": ("checkered", "checked"),
                 "speckled": ("speckled", "grainy")}
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
RAW_TEMPLATES = ("{colour} {shape}", "{colour} {shape} icon", "{size} {colour} {shape} clipart",
                 "{shape} - {colour}", "stock image of a {colour} {shape}", "{colour} {shape} png",
                 "{colour} {shape} vector illustration")
OBJECT_TEMPLATES = (
    "There is a {size} {colour} {shape} {where}",
    "A {size} {colour} {shape} sits {where}",
    "{Where}, there is a {size} {colour} {shape}",
    "A {colour} {shape} appears {where}, and it is {size}",
    "The {shape} {where} is {colour} and {size}",
    "{Where} we see a {size} {shape} coloured {colour}",
    "A {size} {shape} in {colour} is placed {where}",
)
SCENE_TEMPLATES = (
    "The background is {texture} {background}",
    "The image shows {count} {objects} on a {texture} {background} background",
    "{Count} {objects} {appear} on a {texture} {background} background",
    "Everything is set against a {texture} {background} backdrop",
)
SHORT_TEMPLATES_FEW = ("{list} on a {texture} {background} background", "A picture of {list}",
                       "{list} against a {background} backdrop")
SHORT_TEMPLATES_MANY = ("{Count} {objects} on a {texture} {background} background",
                        "A {background} image with {count} {objects}", "{Count} colourful {objects} on {background}")


_A_BEFORE_VOWEL = re.compile(r"\b([Aa]) (?=[aeiouAEIOU])")


def _articles(text: str) -> str:
    """The one a/an rule: "a" before a vowel becomes "an" ("a orange star" -> "an orange star")."""
    return _A_BEFORE_VOWEL.sub(lambda m: m.group(1) + "n ", text)


def _object_phrase(obj: SceneObject) -> str:
    return f"a {obj.colour} {obj.shape}"  # _fill fixes the article


def _where(position: str, rng: random.Random) -> str:
    if position == "center":
        return rng.choice(("in the center", "at the center", "in the centre"))
    return rng.choice(("in the {}", "at the {}", "in the {} part", "in the {} of the image")).format(position)


def _capitalize(text: str) -> str:
    return text[:1].upper() + text[1:]


def _fill(template: str, **words: str) -> str:
    """Fill `template` ("{Where}" takes the capitalized word), fix "a" before a vowel, capitalize the start."""
    words.update({_capitalize(k): _capitalize(v) for k, v in list(words.items())})
    return _capitalize(_articles(template.format(**words)))


def make_captions(rng: random.Random, scene: Scene) -> dict[str, list[str]]:
    """The three caption fields of `scene`, each a list of sentences without a final period."""
    # The alt-text's object: a large one when there is one (a small circle can outnumber a large star in pixels,
    # and the other captions call the star large), then the most pixels.
    largest = max(scene.objects, key=lambda o: (o.size == "large", o.area))
    raw = _articles(rng.choice(RAW_TEMPLATES).format(colour=largest.colour, shape=largest.shape, size=largest.size))

    count = len(scene.objects)
    scene_words = {"texture": rng.choice(TEXTURE_WORDS[scene.texture]), "background": scene.background,
                   "count": NUMBER_WORDS[count],
                   "objects": rng.choice(("shape", "object")) + ("s" if count > 1 else ""),
                   "appear": "appear" if count > 1 else "appears"}
    if count <= 2:
        listing = " and ".join(_object_phrase(o) for o in scene.objects)
        short = _fill(rng.choice(SHORT_TEMPLATES_FEW), list=listing, **scene_words)
    else:
        short = _fill(rng.choice(SHORT_TEMPLATES_MANY), **scene_words)

    long = []
    for obj in scene.objects:
        size = rng.choice(SIZE_WORDS[obj.size])
        long.append(_fill(rng.choice(OBJECT_TEMPLATES), size=size, colour=obj.colour, shape=obj.shape,
                          where=_where(obj.position, rng)))
    long.append(_fill(rng.choice(SCENE_TEMPLATES), **scene_words))
    rng.shuffle(long)
    return {"raw": [raw], "short": [short], "long": long}


# ---------------------------------------------------------------------------------------------------------------
# Writing a data set: training shards + evaluation sets
# ---------------------------------------------------------------------------------------------------------------

EVAL_SETS = ("classify_shape", "classify_colour", "retrieval", "segment")


def scene_rng(seed: int, stream: str, index: int) -> random.Random:
    """The generator of sample `index` of `stream` ("train", "classify_shape", ...): independent per sample."""
    return random.Random(f"cosmos-synth/{seed}/{stream}/{index}")  # str seeds hash with SHA-512: stable


def encode_png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def encode_image(image: Image.Image, image_format: str) -> bytes:
    if image_format == "png":
        return encode_png(image)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


@dataclass
class _Job:
    stream: str
    index: int
    seed: int
    size: int
    image_format: str = "png"
    masks: bool = False


def _render(job: _Job) -> tuple[str, int, dict[str, bytes]]:
    """One sample, encoded: runs in a worker process. Returns (stream, index, {name: bytes})."""
    rng = scene_rng(job.seed, job.stream, job.index)
    if job.stream == "classify_shape":
        scene = make_scene(rng, job.size, n_objects=1, shape=SHAPES[job.index % len(SHAPES)])
    elif job.stream == "classify_colour":
        colours = list(COLOURS)
        scene = make_scene(rng, job.size, n_objects=1, colour=colours[job.index % len(colours)])
    else:
        scene = make_scene(rng, job.size)
    key = f"{job.index:08d}"
    if job.stream == "train":
        files = sample_files(key, encode_image(scene.image, job.image_format), job.image_format, scene.captions,
                             scene.raw_caption, meta=scene.meta())
        if job.masks:
            files["shape.png"] = encode_png(Image.fromarray(scene.shape_mask, "L"))
            files["colour.png"] = encode_png(Image.fromarray(scene.colour_mask, "L"))
        return job.stream, job.index, files
    files = {"image": encode_png(scene.image)}
    if job.stream == "retrieval":
        files["caption"] = scene.long_caption.encode("utf-8")
    elif job.stream == "segment":
        files["shape_mask"] = encode_png(Image.fromarray(scene.shape_mask, "L"))
        files["colour_mask"] = encode_png(Image.fromarray(scene.colour_mask, "L"))
    elif job.stream == "classify_shape":
        files["class"] = scene.objects[0].shape.encode()
    else:
        files["class"] = scene.objects[0].colour.encode()
    return job.stream, job.index, files


def _rendered(jobs: Iterable[_Job], workers: int) -> Iterator[tuple[str, int, dict[str, bytes]]]:
    """Render `jobs` in order, in `workers` processes (in this process when workers <= 1)."""
    if workers <= 1:
        yield from map(_render, jobs)
        return
    # Workers only run PIL and numpy, so fork (where the platform has it) is safe and spares each worker
    # re-importing the package; elsewhere spawn (the caller's script then needs an `if __name__ == "__main__"`).
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    yield from imap_in_pool(_render, jobs, workers, chunksize=64, start_method=method)


def default_workers() -> int:
    """One worker per CPU core this process may run on (its affinity mask, e.g. under taskset or a container's
    CPU set), else per core of the machine."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def _check_options(n: int, seed: int, size: int, n_eval: int, image_format: str, maxcount: int,
                   workers: int | None) -> None:
    """Refuse a bad option before anything touches the disk (a half-written --out would block the rerun)."""
    for option, value, low in (("--n", n, 1), ("--n-eval", n_eval, 0), ("--size", size, MIN_SIZE),
                               ("--maxcount", maxcount, 1), ("--seed", seed, None), ("--workers", workers, 0)):
        if option == "--workers" and value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise CosmosError(f"{option} {value!r}: must be an integer")
        if low is not None and value < low:
            raise CosmosError({
                "--n": f"--n {n}: the training set needs at least 1 scene",
                "--n-eval": f"--n-eval {n_eval}: must be >= 0 (0 writes no evaluation sets)",
                "--size": f"--size {size}: scenes need at least {MIN_SIZE} px",
                "--maxcount": f"--maxcount {maxcount}: each shard needs room for at least 1 sample",
                "--workers": f"--workers {workers}: must be >= 0 (0 = one per CPU core)",
            }[option])
    if size > MAX_SIZE:
        raise CosmosError(f"--size {size}: scenes are at most {MAX_SIZE} px (the generator holds several full-size "
                          "arrays per scene and worker); models train on 64-224 px crops, so 128-512 is plenty")
    if image_format not in FORMATS:
        raise CosmosError(f"image format {image_format!r} is not supported; use one of {', '.join(FORMATS)}")


OUTPUTS = ("train", "eval", "synth.json")  # what write_synth writes in --out, and all that --overwrite replaces


def _remove_outputs(out_dir: Path) -> None:
    for name in OUTPUTS:
        path = out_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def _prepare_out_dir(out_dir: Path, overwrite: bool) -> bool:
    """Make `out_dir` ready to write; True when it had to be created."""
    return claim_out_folder(out_dir, overwrite, "directory is not empty; pass --overwrite to replace its synthetic "
                            "data or choose an empty --out", _remove_outputs)


def _write_segment_set(folder: Path, classes: list[str]) -> None:
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "masks").mkdir(parents=True, exist_ok=True)
    (folder / "classnames.txt").write_text("\n".join(["background", *classes]) + "\n", encoding="utf-8")


def write_synth(out_dir: str | Path, n: int, seed: int = 0, size: int = 128, n_eval: int = 500,
                overwrite: bool = False, image_format: str = "png", masks: bool = False, maxcount: int = 1000,
                workers: int | None = None, progress: Callable[[int], None] | None = None) -> dict:
    """Write `n` training scenes as shards under out_dir/train and `n_eval` scenes per evaluation set under
    out_dir/eval (no out_dir/eval when n_eval is 0); return the settings written to out_dir/synth.json.

    `image_format` is the training images' format (eval images are always PNG); `masks` adds each training
    scene's masks as KEY.shape.png / KEY.colour.png members; `workers` processes render (None or 0: one per CPU
    core available, `default_workers()`); `progress(k)` is called as k more samples are done. Options are checked
    before anything is written; if writing fails part-way, what was written is removed again.
    """
    _check_options(n, seed, size, n_eval, image_format, maxcount, workers)
    out_dir = Path(out_dir)
    created = _prepare_out_dir(out_dir, overwrite)
    try:
        return _write(out_dir, n, seed, size, n_eval, image_format, masks, maxcount,
                      workers or default_workers(), progress or (lambda k: None))
    except BaseException:
        _remove_outputs(out_dir)
        if created and not any(out_dir.iterdir()):
            out_dir.rmdir()
        raise


def _write(out_dir: Path, n: int, seed: int, size: int, n_eval: int, image_format: str, masks: bool,
           maxcount: int, workers: int, progress: Callable[[int], None]) -> dict:
    eval_sets = EVAL_SETS if n_eval > 0 else ()
    settings = {
        "generator": "cosmos synth", "version": 1, "seed": seed, "n": n, "n_eval": n_eval, "size": size,
        "image_format": image_format, "train_masks": masks, "maxcount": maxcount,
        "shapes": list(SHAPES), "colours": list(COLOURS), "sizes": list(SIZES), "positions": list(POSITIONS),
        "backgrounds": list(BACKGROUNDS), "textures": list(TEXTURES), "max_objects": MAX_OBJECTS,
        "sample_rng": "random.Random('cosmos-synth/{seed}/{stream}/{index}')", "streams": ["train", *eval_sets],
    }

    # Training scenes, then each eval set's: rendered in parallel, received in this order whatever the worker
    # count, so shard contents and file bytes depend on the seed only.
    jobs = itertools.chain((_Job("train", i, seed, size, image_format, masks) for i in range(n)),
                           (_Job(stream, i, seed, size) for stream in eval_sets for i in range(n_eval)))
    eval_dir = out_dir / "eval"
    if eval_sets:
        _write_segment_set(eval_dir / "segment_shape", list(SHAPES))
        _write_segment_set(eval_dir / "segment_colour", list(COLOURS))
        (eval_dir / "retrieval" / "images").mkdir(parents=True, exist_ok=True)
        for name in SHAPES:
            (eval_dir / "classify_shape" / name).mkdir(parents=True, exist_ok=True)
        for name in COLOURS:
            (eval_dir / "classify_colour" / name).mkdir(parents=True, exist_ok=True)
    retrieval = {"images": [], "annotations": []}

    with ShardWriter(out_dir / "train", maxcount=maxcount) as writer:
        for stream, index, files in _rendered(jobs, workers):
            name = f"{index:06d}.png"
            if stream == "train":
                writer.write(f"{index:08d}", files)
            elif stream == "retrieval":
                (eval_dir / "retrieval" / "images" / name).write_bytes(files["image"])
                retrieval["images"].append({"id": index, "file_name": name})
                retrieval["annotations"].append({"id": index, "image_id": index,
                                                 "caption": files["caption"].decode("utf-8")})
            elif stream == "segment":
                for kind in ("shape", "colour"):
                    folder = eval_dir / f"segment_{kind}"
                    (folder / "images" / name).write_bytes(files["image"])
                    (folder / "masks" / name).write_bytes(files[f"{kind}_mask"])
            else:
                (eval_dir / stream / files["class"].decode() / name).write_bytes(files["image"])
            progress(1)
        sizes = writer.close()
    write_manifest(out_dir / "train", {"source": "cosmos synth", "samples": n, "shards": sizes,
                                       "checksums": writer.checksums, "settings": settings})
    if eval_sets:
        atomic_write_bytes(eval_dir / "retrieval" / "captions.json",
                           (json.dumps(retrieval, indent=1) + "\n").encode("utf-8"))
    atomic_write_bytes(out_dir / "synth.json", (json.dumps(settings, indent=2) + "\n").encode("utf-8"))
    return settings
