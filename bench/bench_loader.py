"""Benchmark: our shard loader against the same pipeline built on the `webdataset` library, in the same run.

Both read the same shards (made with `cosmos synth` in a temporary folder, JPEG scenes), decode each image, pool
the caption sentences and run views.MultiViewTransform with the default COSMOS config (2 global 224 px + 6 local
96 px image crops, 2 global + 6 local text crops of 77 tokens, CLIP vocabulary), batch with views.collate_views,
in a torch DataLoader with the same number of workers, batch size and shuffle buffer. The figure is samples/s over
one full epoch, including worker start-up; the two pipelines alternate for `--rounds` rounds and the best round of
each is reported, with the ratio ours / webdataset. On a shared machine the wall-clock figure swings with other
jobs, so the CPU time spent (this process + its joined workers) per sample is reported as well.

    python bench/bench_loader.py [--n 768] [--size 256] [--workers 2] [--batch-size 32] [--rounds 3]
"""
from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import webdataset as wds  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from cosmos.data.loader import build_loader  # noqa: E402
from cosmos.data.shards import expand_sources  # noqa: E402
from cosmos.data.synth import write_synth  # noqa: E402
from cosmos.data.views import MultiViewTransform, ViewConfig, collate_views, sentence_pool  # noqa: E402
from cosmos.tokenizer import Tokenizer  # noqa: E402


class WdsViews:
    """The webdataset-side step: (decoded PIL sample) -> the same views dict our loader makes."""

    def __init__(self, transform: MultiViewTransform):
        self.transform = transform

    def __call__(self, sample: dict) -> dict:
        image = sample.get("jpg") or sample.get("png")
        out = self.transform(image, sentence_pool(sample["json"]["captions"]), key=sample["__key__"])
        out["__key__"] = sample["__key__"]
        return out


def cpu_seconds() -> float:
    """CPU time of this process plus its finished children (the DataLoader workers, joined after each epoch)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def run_ours(train: Path, transform: MultiViewTransform, args) -> tuple[float, int]:
    loader = build_loader(str(train), transform, args.batch_size, num_workers=args.workers, seed=0,
                          shuffle_buffer=args.shuffle_buffer)
    start = time.perf_counter()
    n = sum(len(batch["keys"]) for batch in loader)
    return time.perf_counter() - start, n


def run_webdataset(train: Path, transform: MultiViewTransform, args) -> tuple[float, int]:
    dataset = (
        wds.WebDataset(expand_sources(str(train)), shardshuffle=False, empty_check=False)
        .shuffle(args.shuffle_buffer)
        .decode("pil")
        .map(WdsViews(transform))
    )
    loader = DataLoader(dataset, batch_size=args.batch_size, num_workers=args.workers, collate_fn=collate_views)
    start = time.perf_counter()
    n = sum(len(batch["keys"]) for batch in loader)
    return time.perf_counter() - start, n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=768, help="training samples")
    parser.add_argument("--size", type=int, default=256, help="scene size in pixels")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--shuffle-buffer", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    torch.set_num_threads(1)
    tokenizer = Tokenizer.clip()  # built once here; forked workers inherit it
    transform = MultiViewTransform(ViewConfig(), tokenizer, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        write_synth(Path(tmp) / "synth", n=args.n, n_eval=0, size=args.size, image_format="jpg",
                    maxcount=max(1, args.n // 8), workers=args.workers)
        train = Path(tmp) / "synth" / "train"
        print(f"{args.n} samples ({args.size} px JPEG, {len(expand_sources(str(train)))} shards), default COSMOS "
              f"views (2x224 + 6x96 crops, 2 + 6 text crops), {args.workers} workers, batch {args.batch_size}, "
              f"shuffle buffer {args.shuffle_buffer}")
        best = {"ours": float("inf"), "webdataset": float("inf")}
        best_cpu = {"ours": float("inf"), "webdataset": float("inf")}
        for r in range(args.rounds):
            for name, fn in (("ours", run_ours), ("webdataset", run_webdataset)):
                cpu = cpu_seconds()
                seconds, n = fn(train, transform, args)
                cpu = cpu_seconds() - cpu
                if n != args.n:
                    raise SystemExit(f"{name} yielded {n} samples, expected {args.n}")
                best[name], best_cpu[name] = min(best[name], seconds), min(best_cpu[name], cpu)
                print(f"  round {r + 1} {name:>10}: {n / seconds:7.1f} samples/s wall ({seconds:.2f} s), "
                      f"{n / cpu:6.1f} samples per CPU-second ({cpu:.2f} CPU-s)")
    ours, ref = args.n / best["ours"], args.n / best["webdataset"]
    ours_cpu, ref_cpu = args.n / best_cpu["ours"], args.n / best_cpu["webdataset"]
    print(f"best wall: ours {ours:.1f} samples/s, webdataset {ref:.1f} samples/s, ratio ours/webdataset "
          f"{ours / ref:.2f}x")
    print(f"best CPU:  ours {ours_cpu:.1f} samples/CPU-s, webdataset {ref_cpu:.1f} samples/CPU-s, ratio "
          f"{ours_cpu / ref_cpu:.2f}x")


if __name__ == "__main__":
    main()
