"""Benchmark: zero-shot segmentation latency and classification throughput, ours vs OpenCLIP (same weights).

Segmentation: one 512x512 image, ViT-B/16, SCLIP protocol with CSA (short side 336, windows 224 / stride 112,
logit scale 40), class embeddings computed beforehand; fp32 and bf16 autocast. The reference is the same
computation written on OpenCLIP's model the way SCLIP does it (its visual tower up to the last block, the CSA
block from that block's weights, an accumulator of the resized size, F.interpolate to the image, softmax).
Classification: images/s of encode_image + cosine logits + softmax for a batch of 224 px images.

Prints each figure as a ratio against the reference measured in the same run (> 1 = ours faster).

    python bench/bench_zeroshot.py [--repeats 3] [--batch 16] [--threads N]
"""
from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import open_clip  # noqa: E402  (reference only)

from cosmos.checkpoint import load  # noqa: E402
from cosmos.device import autocast  # noqa: E402
from cosmos.zeroshot.classify import build_class_embeddings, classify_images  # noqa: E402
from cosmos.zeroshot.segment import SegmentConfig, Segmenter, resized_shape, sliding_windows, to_model_input  # noqa: E402

LABELS = ["sky", "grass", "tree", "road", "building", "person", "car", "water"]


# --- the reference: SCLIP's pipeline on OpenCLIP's model ----------------------------------------------------------
def reference_dense(visual, windows: torch.Tensor) -> torch.Tensor:
    """CSA dense features from OpenCLIP's ViT: [b, 3, 224, 224] -> normalized [b, gh, gw, E]."""
    x = visual._embeds(windows)  # [b, 1+N, W]
    for block in visual.transformer.resblocks[:-1]:
        x = block(x)
    block = visual.transformer.resblocks[-1]
    mha = block.attn
    b, n, width = x.shape
    heads = mha.num_heads
    hd = width // heads
    q, k, v = F.linear(block.ln_1(x), mha.in_proj_weight, mha.in_proj_bias).reshape(b, n, 3, heads, hd).permute(
        2, 0, 3, 1, 4)  # [3, b, H, N, hd]
    attn = (q @ q.transpose(-1, -2) * hd**-0.5).softmax(-1) + (k @ k.transpose(-1, -2) * hd**-0.5).softmax(-1)
    x = x + mha.out_proj((attn @ v).transpose(1, 2).reshape(b, n, width))
    x = x + block.mlp(block.ln_2(x))
    tokens = visual.ln_post(x[:, 1:]) @ visual.proj  # [b, N, E]
    g = int(round(tokens.shape[1] ** 0.5))
    return F.normalize(tokens.reshape(b, g, g, -1).float(), dim=-1)


def reference_segment(visual, image: Image.Image, queries: torch.Tensor, owner: torch.Tensor, n_classes: int,
                      batch: int) -> torch.Tensor:
    size = resized_shape(image.height, image.width, 336)
    x = to_model_input(image, size)[None]  # [1, 3, h, w]
    boxes = sliding_windows(size[0], size[1], 224, 112)
    preds = torch.zeros(1, queries.shape[0], *size)
    count = torch.zeros(1, 1, *size)
    for start in range(0, len(boxes), batch):
        chunk = boxes[start : start + batch]
        crops = torch.cat([x[:, :, t:b, l:r] for t, l, b, r in chunk])
        logits = torch.einsum("bhwe,qe->bqhw", reference_dense(visual, crops), queries)
        logits = F.interpolate(logits, size=(224, 224), mode="bilinear", align_corners=False)
        for (t, l, b, r), logit in zip(chunk, logits):
            preds += F.pad(logit[None], (l, size[1] - r, t, size[0] - b))
            count[:, :, t:b, l:r] += 1
    preds = F.interpolate(preds / count, size=(image.height, image.width), mode="bilinear", align_corners=False)
    probs = (40 * preds[0]).softmax(0)  # [Q, H, W]
    per_class = torch.full((n_classes, image.height, image.width), float("-inf"))
    index = owner[:, None, None].expand_as(probs)
    return per_class.scatter_reduce(0, index, probs, "amax").argmax(0)


def compare(reference, ours, repeats: int) -> tuple[float, float, object, object]:
    """Median seconds of each after one warm-up, the two runs interleaved so load changes hit both alike."""
    out_ref, out_ours = reference(), ours()
    t_ref, t_ours = [], []
    for _ in range(repeats):
        for fn, times in ((reference, t_ref), (ours, t_ours)):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return statistics.median(t_ref), statistics.median(t_ours), out_ref, out_ours


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=16, help="classification batch size")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--skip-bf16", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    logging.disable(logging.WARNING)  # "no pretrained weights loaded": random weights are what we want
    ref = open_clip.create_model("ViT-B-16").eval()  # random weights, OpenCLIP's own initialization
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    path = Path("/tmp/bench_zeroshot_vitb16.pt")
    torch.save(ref.state_dict(), path)
    model, _, tokenizer = load(path, device="cpu")
    print(f"torch {torch.__version__}, open_clip {open_clip.__version__}, threads {torch.get_num_threads()}, "
          f"repeats {args.repeats} (median)")

    with torch.no_grad():
        classifier = build_class_embeddings(model, tokenizer, LABELS, "simple")
        queries = classifier.embeddings
        rng = np.random.default_rng(0)
        image = Image.fromarray(rng.integers(0, 255, (512, 512, 3), dtype=np.uint8)).resize((512, 512))
        precisions = ["fp32"] + ([] if args.skip_bf16 else ["bf16"])
        for precision in precisions:
            segmenter = Segmenter(model, classifier, SegmentConfig(method="csa", batch_size=16, precision=precision))

            def ours():
                return segmenter(image)

            def reference():
                with autocast("cpu", precision):
                    return reference_segment(ref.visual, image, queries, classifier.owner, len(LABELS), 16)

            t_ref, t_ours, m_ref, m_ours = compare(reference, ours, args.repeats)
            agree = (m_ref == m_ours).float().mean().item()
            print(f"segmentation 512x512 ViT-B/16 csa {precision}: ours {t_ours:.2f} s, OpenCLIP {t_ref:.2f} s, "
                  f"ratio {t_ref / t_ours:.2f}x (masks agree on {100 * agree:.2f}% of pixels)")

        images = torch.randn(args.batch, 3, 224, 224)
        ref_classifier = queries.T  # [E, C]
        for precision in precisions:
            def ours_cls():
                return classify_images(model, images, classifier, precision)

            def reference_cls():
                with autocast("cpu", precision):
                    features = ref.encode_image(images, normalize=True).float()
                return (ref.logit_scale.exp() * features @ ref_classifier).softmax(-1)

            t_ref, t_ours, p_ref, p_ours = compare(reference_cls, ours_cls, args.repeats)
            diff = (p_ref - p_ours).abs().max().item()
            print(f"classification ViT-B/16 batch {args.batch} {precision}: ours {args.batch / t_ours:.1f} img/s, "
                  f"OpenCLIP {args.batch / t_ref:.1f} img/s, ratio {t_ref / t_ours:.2f}x (max prob diff {diff:.1e})")
    path.unlink()


if __name__ == "__main__":
    main()
