"""Views throughput: our MultiViewTransform against the DINO-style torchvision pipeline, and `cosmos synth` speed.

    python bench/bench_views.py [--samples 200] [--repeats 5] [--synth 4000]

Views: for the default (224 / 96 px) and tiny (64 / 32 px) recipes, time one sample's 8 image views + 8 tokenized
text views, ours against a reference built the way DINO builds it (torchvision transforms on PIL: RandomResizedCrop,
flip, RandomApply(ColorJitter), RandomGrayscale, PIL GaussianBlur, solarize, ToTensor, Normalize, per crop; the
same text crops through the same tokenizer), like for like: the same config's sizes, scales, flip probability, blur
sigma range and context length, and the same captions dicts as input. Both run in this process, one thread,
interleaved (ours, reference, ...) so machine load hits both alike; the medians and the ratio ours / reference are
printed.
Synth: scenes per second of `write_synth` with 1 and 2 workers, PNG and JPEG training images (ratios against the
1-worker PNG run).
"""
from __future__ import annotations

import argparse
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps
from torchvision import transforms as T

from cosmos.data.synth import make_scene, scene_rng, write_synth
from cosmos.data.views import MultiViewTransform, ViewConfig, text_crops
from cosmos.tokenizer import Tokenizer
from cosmos.transforms import CLIP_MEAN, CLIP_STD


class PilBlur:
    def __init__(self, p: float, sigma: tuple[float, float]):
        self.p, self.sigma = p, sigma

    def __call__(self, img):
        if random.random() < self.p:
            return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(*self.sigma)))
        return img


class PilSolarize:
    def __init__(self, p: float):
        self.p = p

    def __call__(self, img):
        return ImageOps.solarize(img) if random.random() < self.p else img


class DinoReference:
    """DINO's DataAugmentationDINO recipe with torchvision transforms, plus text crops through the tokenizer, with
    the config's sizes, scales, flip probability, blur range and context length (like for like with ours)."""

    def __init__(self, cfg: ViewConfig, tokenizer):
        flip_jitter = T.Compose([T.RandomHorizontalFlip(cfg.hflip_p),
                                 T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
                                 T.RandomGrayscale(0.2)])
        norm = T.Compose([T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)])
        bicubic = T.InterpolationMode.BICUBIC
        self.g1 = T.Compose([T.RandomResizedCrop(cfg.global_size, cfg.global_scale, interpolation=bicubic),
                             flip_jitter, PilBlur(1.0, cfg.blur_sigma), norm])
        self.g2 = T.Compose([T.RandomResizedCrop(cfg.global_size, cfg.global_scale, interpolation=bicubic),
                             flip_jitter, PilBlur(0.1, cfg.blur_sigma), PilSolarize(0.2), norm])
        self.local = T.Compose([T.RandomResizedCrop(cfg.local_size, cfg.local_scale, interpolation=bicubic),
                                flip_jitter, PilBlur(0.5, cfg.blur_sigma), norm])
        self.cfg, self.tokenizer = cfg, tokenizer

    def __call__(self, image, captions):
        g = torch.stack([self.g1(image), self.g2(image)])  # [2, 3, G, G]
        l = torch.stack([self.local(image) for _ in range(self.cfg.n_local)])  # [6, 3, L, L]
        gt, lt = text_crops(captions, self.cfg, random.Random(random.getrandbits(64)))
        ctx = self.cfg.context_length
        return g, l, self.tokenizer(gt, context_length=ctx), self.tokenizer(lt, context_length=ctx)


def time_views(fn, images, captions) -> float:
    start = time.perf_counter()
    for i, image in enumerate(images):
        fn(image, captions[i])
    return len(images) / (time.perf_counter() - start)  # samples/s


def bench_views(samples: int, repeats: int, tokenizer) -> None:
    print(f"views: one process, 1 thread, {samples} samples per timing, median of {repeats}")
    print(f"{'recipe':<10} {'image':>9} {'ours samples/s':>15} {'reference':>10} {'ratio':>6}")
    for name, cfg, side in (("default", ViewConfig(), 320), ("tiny", ViewConfig.tiny(), 128)):
        images, captions = [], []
        for i in range(samples):
            scene = make_scene(scene_rng(0, "bench", i), 128)
            images.append(scene.image.resize((side, side), Image.BICUBIC))
            captions.append(scene.captions)  # the captions dict, as the loader hands it over
        ours, ref = MultiViewTransform(cfg, tokenizer, seed=0), DinoReference(cfg, tokenizer)
        ours_t, ref_t = [], []
        for _ in range(repeats):
            ours_t.append(time_views(ours, images, captions))
            ref_t.append(time_views(ref, images, captions))
        o, r = statistics.median(ours_t), statistics.median(ref_t)
        print(f"{name:<10} {side:>6} px {o:>15.1f} {r:>10.1f} {o / r:>6.2f}")


def bench_synth(n: int) -> None:
    print(f"synth: write_synth --n {n} --size 128 --n-eval 0")
    print(f"{'format':<6} {'workers':>7} {'scenes/s':>9} {'ratio':>6}")
    base = None
    for image_format, workers in (("png", 1), ("png", 2), ("jpg", 2)):
        out = Path(tempfile.mkdtemp(prefix="bench_synth_"))
        try:
            start = time.perf_counter()
            write_synth(out / "d", n=n, seed=0, size=128, n_eval=0, image_format=image_format, workers=workers)
            rate = n / (time.perf_counter() - start)
        finally:
            shutil.rmtree(out)
        base = base or rate
        print(f"{image_format:<6} {workers:>7} {rate:>9.0f} {rate / base:>6.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--synth", type=int, default=4000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    np.random.seed(0), random.seed(0), torch.manual_seed(0)
    bench_views(args.samples, args.repeats, Tokenizer.clip())
    bench_synth(args.synth)


if __name__ == "__main__":
    main()
