"""Forward throughput of our towers against OpenCLIP's with the same weights, fp32 and bf16 autocast.

    python bench/bench_forward.py [--models ViT-B-16,tiny] [--precisions fp32,bf16] [--batch 32] [--repeats 5]

For each model and precision it times encode_image (images/s) and encode_text (texts/s) for both implementations,
interleaving the two (ours, reference, ours, ...) so that load on the machine hits both alike, and prints the median
throughputs and the ratio ours / OpenCLIP. "tiny" is timed with the patch stem (OpenCLIP has no conv stem), so both
models hold identical weights; its transformer sizes are the tiny config's.
"""
from __future__ import annotations

import argparse
import statistics
import time

import open_clip
import torch
from open_clip.model import CLIPTextCfg, CLIPVisionCfg

from cosmos.device import autocast
from cosmos.model.cosmos import CosmosModel, get_config, is_cosmos_extra


def reference_model(name: str) -> tuple[torch.nn.Module, object]:
    if name == "tiny":
        cfg = get_config("tiny")
        cfg.vision.stem = "patch"
        v, t = cfg.vision, cfg.text
        ref = open_clip.model.CLIP(
            embed_dim=cfg.embed_dim,
            vision_cfg=CLIPVisionCfg(layers=v.layers, width=v.width, head_width=64, patch_size=v.patch_size,
                                     image_size=v.image_size),
            text_cfg=CLIPTextCfg(context_length=t.context_length, vocab_size=t.vocab_size, width=t.width,
                                 heads=t.heads, layers=t.layers),
        )
        return ref, cfg
    return open_clip.create_model(name), get_config(name)


def timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="ViT-B-16,tiny")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--precisions", default="fp32,bf16")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, open_clip {open_clip.__version__}, threads {torch.get_num_threads()}, "
          f"batch {args.batch}, median of {args.repeats}")
    print(f"{'model':10s} {'prec':5s} {'tower':6s} {'ours/s':>9s} {'openclip/s':>11s} {'ratio':>6s}")
    for name in args.models.split(","):
        ref, cfg = reference_model(name)
        ref.eval()
        ours = CosmosModel(cfg).eval()
        missing, unexpected = ours.load_state_dict(ref.state_dict(), strict=False)
        assert not unexpected and all(is_cosmos_extra(k) for k in missing), (missing, unexpected)
        s, L = cfg.vision.image_size, cfg.text.context_length
        images = torch.randn(args.batch, 3, s, s)
        text = torch.randint(1, 49000, (args.batch, L))
        text[:, L // 3] = 49407
        text[:, L // 3 + 1:] = 0
        for precision in args.precisions.split(","):
            for tower, x in (("image", images), ("text", text)):
                fns = {
                    "ours": ours.encode_image if tower == "image" else ours.encode_text,
                    "ref": ref.encode_image if tower == "image" else ref.encode_text,
                }
                times: dict[str, list[float]] = {"ours": [], "ref": []}
                with torch.inference_mode(), autocast("cpu", precision):
                    for key in fns:  # warm-up
                        fns[key](x)
                    for _ in range(args.repeats):
                        for key in fns:
                            times[key].append(timed(fns[key], x))
                ours_rate = args.batch / statistics.median(times["ours"])
                ref_rate = args.batch / statistics.median(times["ref"])
                print(f"{name:10s} {precision:5s} {tower:6s} {ours_rate:9.1f} {ref_rate:11.1f} "
                      f"{ours_rate / ref_rate:5.2f}x", flush=True)


if __name__ == "__main__":
    main()
