"""The standard training-free segmentation benchmarks of SCLIP and COSMOS, as presets.

Class names (with the synonyms SCLIP's configs give; a class scores the best of its names) ship as data files in
cosmos/zeroshot/classnames/<name>.txt, one class per line, synonyms separated by ';'. VOC21's and COCO-Object's
background class is prompted with a list of stuff names, Context60's with the word 'background'.

Per benchmark, as SCLIP's configs set them (for a 224 px ViT-B/16; sizes scale with the model's input size):
logit scale (40 unless given), the background probability threshold (`prob_thd`), the area threshold (`area_thd`,
VOC21 only: a class predicted on no more than that fraction of the non-background pixels of an image is removed
from it) and the short side of the resize (336; Cityscapes 560, COCO-Stuff 448).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import CosmosError

CLASSNAMES_DIR = Path(__file__).resolve().parent / "classnames"


@dataclass(frozen=True)
class Benchmark:
    name: str
    classes: int
    logit_scale: float = 40.0
    bg_threshold: float | None = None
    area_threshold: float | None = None
    short_side: int = 336  # for a 224 px model

    @property
    def classnames_file(self) -> Path:
        return CLASSNAMES_DIR / f"{self.name}.txt"


BENCHMARKS = {b.name: b for b in (
    Benchmark("voc21", 21, logit_scale=65.0, bg_threshold=0.1, area_threshold=0.1),
    Benchmark("voc20", 20),
    Benchmark("context60", 60, logit_scale=50.0, bg_threshold=0.1),
    Benchmark("context59", 59),
    Benchmark("cityscapes", 19, short_side=560),
    Benchmark("ade20k", 150),
    Benchmark("coco-object", 81, logit_scale=50.0, bg_threshold=0.1),
    Benchmark("coco-stuff", 171, short_side=448),
)}


def get_benchmark(name: str) -> Benchmark:
    if name not in BENCHMARKS:
        raise CosmosError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
    return BENCHMARKS[name]


def classnames_source(value: str | Path) -> Path:
    """A --classnames value: a file path, or a benchmark name whose shipped list is used."""
    path = Path(value)
    if path.is_file() or str(value) not in BENCHMARKS:
        return path
    return BENCHMARKS[str(value)].classnames_file
