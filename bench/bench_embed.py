"""`cosmos embed` throughput against the same model's encode_image in a plain loop, decoding included.

    python bench/bench_embed.py [--models tiny,ViT-B-16] [--n 512] [--precision auto] [--repeats 3]

A folder of N JPEG photos-like images (mixed sizes 320-640 px, random textures, written once) is embedded by
`cosmos.embeddings.embed` (the worker pool, the memory-mapped matrix, index.jsonl and meta.json written, as the CLI
does; with 0 and with 2 decoding workers) and by a plain loop: open each image with PIL, the same eval transform,
stack a batch, `model.encode_image` under no_grad and the same autocast, L2-normalize, to numpy. The two alternate
(plain, ours, plain, ...) and the medians are compared: ratio = our images/s / the plain loop's. `tiny` is the shipped
model; other names are built with random weights (no download). The rows are checked equal (within fp16 rounding).
"""
from __future__ import annotations

import argparse
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

import cosmos  # noqa: E402
from cosmos.checkpoint import SHIPPED_NAME  # noqa: E402
from cosmos.device import autocast, resolve_precision  # noqa: E402
from cosmos.embeddings import embed  # noqa: E402
from cosmos.model.cosmos import CosmosModel, get_config  # noqa: E402
from cosmos.transforms import eval_transform  # noqa: E402


def write_images(folder: Path, n: int) -> list[Path]:
    rng = random.Random(0)
    paths = []
    for i in range(n):
        w, h = rng.randint(320, 640), rng.randint(320, 640)
        base = np.random.default_rng(i).integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
        image = Image.fromarray(base).resize((w, h), Image.BICUBIC)  # smooth texture: JPEG sizes like photos
        path = folder / f"img_{i:05d}.jpg"
        image.save(path, quality=90)
        paths.append(path)
    return paths


def build(name: str):
    if name == "tiny":
        model, _, tokenizer = cosmos.load(SHIPPED_NAME, device="cpu")
        return model, tokenizer
    torch.manual_seed(0)
    return CosmosModel(get_config(name)).eval(), None


@torch.no_grad()
def plain_loop(model, paths: list[Path], batch: int, precision: str) -> np.ndarray:
    preprocess = eval_transform(model.image_size)
    out = []
    for start in range(0, len(paths), batch):
        images = []
        for p in paths[start:start + batch]:
            with Image.open(p) as im:
                images.append(preprocess(im.convert("RGB")))
        with autocast(torch.device("cpu"), precision):
            features = model.encode_image(torch.stack(images))
        out.append(torch.nn.functional.normalize(features.float(), dim=-1).numpy())
    return np.concatenate(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="tiny,ViT-B-16")
    parser.add_argument("--n", type=int, default=512)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(2)
    precision = resolve_precision(torch.device("cpu"), args.precision)
    tmp = Path(tempfile.mkdtemp(prefix="bench_embed_"))
    try:
        (tmp / "images").mkdir()
        paths = write_images(tmp / "images", args.n)
        print(f"{len(paths)} JPEGs, {sum(p.stat().st_size for p in paths) / len(paths) / 1024:.0f} KiB mean; "
              f"precision {precision}; batch {args.batch}; torch {torch.__version__}, {torch.get_num_threads()} threads")
        rows = []
        for name in args.models.split(","):
            model, tokenizer = build(name)
            reference = plain_loop(model, paths[:8], args.batch, precision)  # warm-up
            times: dict[str, list[float]] = {"plain": [], "embed w0": [], "embed w2": []}
            for r in range(args.repeats):
                t = time.perf_counter()
                reference = plain_loop(model, paths, args.batch, precision)
                times["plain"].append(time.perf_counter() - t)
                for workers in (0, 2):
                    out = tmp / f"emb_{name}_{workers}_{r}"
                    t = time.perf_counter()
                    embed(model, tokenizer, out, images=paths, batch_size=args.batch, workers=workers,
                          precision=precision)
                    times[f"embed w{workers}"].append(time.perf_counter() - t)
                    ours = np.load(out / "embeddings.npy").astype(np.float32)
                    error = float(np.abs(ours - reference).max())
                    assert error < 2e-2, f"{name}: embed rows differ from the plain loop by {error}"
                    shutil.rmtree(out)
            plain = len(paths) / statistics.median(times["plain"])
            for key in ("embed w0", "embed w2"):
                speed = len(paths) / statistics.median(times[key])
                rows.append((name, key, speed, plain, speed / plain))
                print(f"{name:9s} {key:9s} {speed:7.1f} img/s  plain loop {plain:7.1f} img/s  ratio {speed / plain:.2f}x",
                      flush=True)
        print("\n| model | ours | ours img/s | plain loop img/s | ratio |\n|---|---|---|---|---|")
        for name, key, speed, plain, ratio in rows:
            print(f"| {name} | {key.replace('embed w', 'embed, workers ')} | {speed:.1f} | {plain:.1f} | {ratio:.2f}x |")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
