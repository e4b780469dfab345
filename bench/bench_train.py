"""Training benchmarks: each figure is a ratio against a reference measured in the same run, on the same inputs.

    python bench/bench_train.py clip      [--batch 128] [--precision bf16] [--repeats 5]
    python bench/bench_train.py cosmos    [--batch 128] [--precision bf16] [--repeats 5]
    python bench/bench_train.py loss      [--sizes 1024,4096,16384] [--dtype bf16]
    python bench/bench_train.py all

clip    Plain CLIP training step, tiny config (patch stem: OpenCLIP has no conv stem, so both hold the same
        weights): ours (forward_train + fused loss + AdamW) against OpenCLIP's model + ClipLoss + AdamW, same
        weights, batch and precision, one 64 px crop and one caption per sample (captions drawn from `cosmos synth`
        text crops; OpenCLIP runs them at 77 tokens as it always does, ours trims the padding).
cosmos  The COSMOS step (2 x 64 + 6 x 32 crops, 2 + 6 captions, teacher, tiny config with its conv stem, 13.3 M
        parameters): samples/s, and its cost over our CLIP step at the same batch; and against a REFERENCE STEP
        written here the way the official code is structured (COSMOS_METHOD.md: the full teacher copy, EMA
        before the optimizer step, all captions at 77 tokens with padding attended, every logit matrix
        materialized with F.cross_entropy). It is our re-creation of that structure, not the official code, which
        is not available on this machine; the official figures quoted in BENCHMARKS.md come from COSMOS_METHOD.md.
loss    Fused multi-view InfoNCE against the naive one (80 view pairs: the CLIP term 2 x 8 and the distillation
        16 x 4, D = 512): forward + backward time and peak memory (each in a fresh process: the resident set
        size sampled every millisecond during the call, above its value before the call; inputs excluded). The naive loss is skipped where its logits alone would not fit in memory.
Timings interleave ours and the reference (ours, ref, ours, ...) and report medians.
"""
from __future__ import annotations

import argparse
import copy
import json
import resource
import statistics
import subprocess
import sys
import threading
import time

import torch
import torch.nn.functional as F

from cosmos.device import autocast
from cosmos.model.cosmos import CosmosModel, get_config, is_cosmos_extra
from cosmos.train.ema import Teacher
from cosmos.train.loop import build_optimizer, TrainConfig
from cosmos.train.loss import LossConfig, multiview_infonce, naive_multiview_infonce
from cosmos.train.step import Batch, StudentForward, TrainStep


def synth_views(batch: int, mode: str, seed: int = 0) -> Batch:
    """A batch of real views from `cosmos synth` scenes (rendered in memory, so no files are needed)."""
    import random

    from cosmos.data.synth import make_captions, make_scene
    from cosmos.data.views import MultiViewTransform, ViewConfig, collate_views
    from cosmos.tokenizer import Tokenizer

    cfg = ViewConfig.tiny(mode=mode, hflip_p=0.0)
    transform = MultiViewTransform(cfg, Tokenizer.clip(), seed=seed)
    samples = []
    for i in range(batch):
        rng = random.Random(f"bench/{seed}/{i}")
        scene = make_scene(rng, size=64)
        samples.append(transform(scene.image, make_captions(rng, scene), key=str(i)))
    return Batch.from_views(collate_views(samples), torch.device("cpu"), use_local=mode == "cosmos")


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def interleaved(fns: dict, repeats: int) -> dict[str, float]:
    for fn in fns.values():
        fn()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


# --- ours --------------------------------------------------------------------------------------------------------
def our_step(mode: str, batch: Batch, precision: str, stem: str = "conv"):
    cfg = get_config("tiny")
    cfg.vision.stem = stem
    cfg.cosmos = mode == "cosmos"
    torch.manual_seed(0)
    model = CosmosModel(cfg)
    loss_cfg = LossConfig(mode)
    teacher = Teacher(model, 0.99) if mode == "cosmos" else None
    optimizer = build_optimizer(model, TrainConfig(data="", out=""))
    step = TrainStep(StudentForward(model, loss_cfg.cross()), teacher, loss_cfg, torch.device("cpu"), precision)

    def run():
        step(batch)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.clamp_logit_scales()
        if teacher is not None:
            teacher.update(model, 0)

    return model, run


# --- references -------------------------------------------------------------------------------------------------
def openclip_clip_step(ours: CosmosModel, batch: Batch, precision: str):
    import open_clip
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    cfg = ours.config
    v, t = cfg.vision, cfg.text
    ref = open_clip.model.CLIP(
        embed_dim=cfg.embed_dim,
        vision_cfg=CLIPVisionCfg(layers=v.layers, width=v.width, head_width=64, patch_size=v.patch_size,
                                 image_size=v.image_size),
        text_cfg=CLIPTextCfg(context_length=t.context_length, vocab_size=t.vocab_size, width=t.width, heads=t.heads,
                             layers=t.layers))
    ref.load_state_dict({k: v for k, v in ours.state_dict().items() if not is_cosmos_extra(k)})
    loss_fn = open_clip.ClipLoss()
    optimizer = build_optimizer(ref, TrainConfig(data="", out=""))
    images, text = batch.global_crops[:, 0], batch.global_text[:, 0]

    def run():
        with autocast("cpu", precision):
            img, txt, scale = ref(images, text)
            loss = loss_fn(img, txt, scale)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            ref.logit_scale.clamp_(0, 4.6052)

    return run


def reference_cosmos_step(batch: Batch, precision: str):
    """The official step's structure (see the module docstring), written here: same model class and weights."""
    cfg = get_config("tiny")
    torch.manual_seed(0)
    model = CosmosModel(cfg)
    teacher = copy.deepcopy(model).requires_grad_(False)  # the full copy, poolers included (quirk 6)
    optimizer = build_optimizer(model, TrainConfig(data="", out=""))
    g, l = batch.global_crops, batch.local_crops
    text = torch.cat([batch.global_text, batch.local_text], dim=1)  # full 77 tokens (no trimming)
    b = g.shape[0]

    def clip_pairs(A, B, s):
        labels = torch.arange(A[0].shape[0])
        losses = [(F.cross_entropy(s * x @ y.T, labels) + F.cross_entropy(s * y @ x.T, labels)) / 2 for x in A for y in B]
        return sum(losses) / len(losses)

    def run():
        with autocast("cpu", precision):
            gi = g.transpose(0, 1).reshape(-1, *g.shape[2:])
            li = l.transpose(0, 1).reshape(-1, *l.shape[2:])
            pooled_g, tok_g = model.encode_image_views(gi)
            pooled_l, _ = model.encode_image_views(li)
            image = torch.cat([pooled_g, pooled_l]).view(8, b, -1)
            ids = text.transpose(0, 1).reshape(-1, text.shape[-1])
            pooled_t, tok_t = model.encode_text_views(ids)
            txt = pooled_t.view(8, b, -1)
            h_i = model.cross_text(image.transpose(0, 1), tok_t[:b]).transpose(0, 1)  # padding attended
            h_t = model.cross_image(txt.transpose(0, 1), tok_g[:b]).transpose(0, 1)
            with torch.no_grad():
                t_img = F.normalize(teacher.encode_image(gi).view(2, b, -1), dim=-1)
                t_txt = F.normalize(teacher.encode_text(batch.global_text.transpose(0, 1).reshape(-1, 77)).view(2, b, -1), dim=-1)
            image, txt = F.normalize(image, dim=-1), F.normalize(txt, dim=-1)
            h_i, h_t = F.normalize(h_i, dim=-1), F.normalize(h_t, dim=-1)
            s, ds = model.logit_scale.exp(), model.distill_logit_scale.exp()
            loss = clip_pairs(list(image[:2]), list(txt), s)
            loss = loss + (clip_pairs(list(h_i), list(t_img), ds) + clip_pairs(list(h_i), list(t_txt), ds)
                           + clip_pairs(list(h_t), list(t_img), ds) + clip_pairs(list(h_t), list(t_txt), ds)) / 4
        loss.backward()
        with torch.no_grad():  # EMA before the optimizer step (quirk 1), over the full copy
            for p_t, p_s in zip(teacher.parameters(), model.parameters()):
                p_t.mul_(0.99).add_(p_s.detach(), alpha=0.01)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.clamp_logit_scales()

    return run


# --- sections -----------------------------------------------------------------------------------------------------
def bench_clip(args) -> None:
    batch = synth_views(args.batch, "clip")
    ours_model, ours = our_step("clip", batch, args.precision, stem="patch")
    ref = openclip_clip_step(ours_model, batch, args.precision)
    t = interleaved({"ours": ours, "openclip": ref}, args.repeats)
    print(f"CLIP step, tiny (patch stem), batch {args.batch}, {args.precision}: ours {args.batch / t['ours']:.1f} "
          f"samples/s, OpenCLIP {args.batch / t['openclip']:.1f} samples/s, ratio {t['openclip'] / t['ours']:.2f}x")


def bench_cosmos(args) -> None:
    cosmos_batch = synth_views(args.batch, "cosmos")
    clip_batch = synth_views(args.batch, "clip")
    _, ours_cosmos = our_step("cosmos", cosmos_batch, args.precision)
    _, ours_clip = our_step("clip", clip_batch, args.precision)
    ref = reference_cosmos_step(cosmos_batch, args.precision)
    t = interleaved({"cosmos": ours_cosmos, "clip": ours_clip, "reference": ref}, args.repeats)
    n = args.batch
    print(f"COSMOS step, tiny (conv stem, 13.3 M parameters), 2 x 64 + 6 x 32 crops, 2 + 6 captions, batch {n}, "
          f"{args.precision}:")
    print(f"  ours COSMOS {n / t['cosmos']:.1f} samples/s ({t['cosmos']:.2f} s/step); ours CLIP {n / t['clip']:.1f} "
          f"samples/s; COSMOS / CLIP cost {t['cosmos'] / t['clip']:.2f}x")
    print(f"  reference-structured COSMOS step {n / t['reference']:.1f} samples/s ({t['reference']:.2f} s/step); "
          f"ours / reference {t['reference'] / t['cosmos']:.2f}x")


def _loss_worker(kind: str, n: int, dtype: str) -> None:
    """In a fresh process: one forward + backward, print time and peak RSS above the baseline (MiB)."""
    dt = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    scale, dscale = torch.tensor(14.0, requires_grad=True), torch.tensor(14.0, requires_grad=True)

    def features(size: int) -> dict:
        g = torch.Generator().manual_seed(0)
        return {name: F.normalize(torch.randn(v, size, 512, generator=g), dim=-1).to(dt).requires_grad_(name != "t")
                for name, v in (("img", 2), ("txt", 8), ("h", 16), ("t", 4))}

    def run(leaves):
        if kind == "fused":
            loss = multiview_infonce(leaves["img"], leaves["txt"], scale) + multiview_infonce(leaves["h"], leaves["t"], dscale)
        else:
            with autocast("cpu", "bf16" if dtype == "bf16" else "fp32"):
                loss = naive_multiview_infonce(leaves["img"], leaves["txt"], scale) + \
                    naive_multiview_infonce(leaves["h"], leaves["t"], dscale)
        loss.backward()
        return float(loss)

    run(features(64))  # warm-up: kernel selection and first-call costs stay out of the timing
    leaves = features(n)
    base = _rss()
    peak = [base]
    stop = threading.Event()

    def sample():  # the resident set size every millisecond while the loss runs
        while not stop.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t = time.perf_counter()
    value = run(leaves)
    elapsed = time.perf_counter() - t
    stop.set()
    sampler.join()
    print(json.dumps({"kind": kind, "n": n, "seconds": elapsed, "peak_mib": (max(peak[0], _rss()) - base) / 2**20,
                      "loss": value}))


def _rss() -> int:
    """Resident set size in bytes (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def bench_loss(args) -> None:
    sizes = [int(s) for s in args.sizes.split(",")]
    print(f"COSMOS loss (2 x 8 + 16 x 4 = 80 view pairs, D = 512, {args.dtype} features), forward + backward, one "
          "run per fresh process:")
    print(f"{'N':>7s} {'fused s':>9s} {'fused MiB':>10s} {'naive s':>9s} {'naive MiB':>10s} {'time ratio':>10s} "
          f"{'memory ratio':>12s}")
    for n in sizes:
        row = {}
        kinds = ["fused"] + (["naive"] if 80 * n * n * 4 * 3 < args.memory_gib * 2**30 else [])
        for kind in kinds:
            out = subprocess.run([sys.executable, __file__, "_loss", kind, str(n), args.dtype], capture_output=True,
                                 text=True)
            if out.returncode != 0:
                row[kind] = None
                print(f"  {kind} at N={n} failed: {out.stderr.strip().splitlines()[-1] if out.stderr else out.returncode}")
                continue
            row[kind] = json.loads(out.stdout.strip().splitlines()[-1])
        f, nv = row.get("fused"), row.get("naive")
        if f and nv:
            assert abs(f["loss"] - nv["loss"]) <= 1e-2 * abs(nv["loss"]), (f, nv)
        ratio_t = f"{f['seconds'] / nv['seconds']:.2f}" if f and nv else "-"
        ratio_m = f"{nv['peak_mib'] / max(f['peak_mib'], 1):.1f}x less" if f and nv else "-"
        print(f"{n:>7d} {f['seconds'] if f else float('nan'):>9.2f} {f['peak_mib'] if f else float('nan'):>10.0f} "
              f"{nv['seconds'] if nv else float('nan'):>9.2f} {nv['peak_mib'] if nv else float('nan'):>10.0f} "
              f"{ratio_t:>10s} {ratio_m:>12s}")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_loss":
        torch.set_num_threads(2)
        _loss_worker(sys.argv[2], int(sys.argv[3]), sys.argv[4])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("section", choices=["clip", "cosmos", "loss", "all"])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sizes", default="1024,4096,16384")
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--memory-gib", type=float, default=20.0, help="skip the naive loss above this estimate")
    args = parser.parse_args()
    torch.set_num_threads(2)
    flags = open("/proc/cpuinfo").read() if sys.platform.startswith("linux") else ""
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU avx512_bf16: {'avx512_bf16' in flags}, "
          f"amx_bf16: {'amx_bf16' in flags}")
    for section, fn in (("clip", bench_clip), ("cosmos", bench_cosmos), ("loss", bench_loss)):
        if args.section in (section, "all"):
            fn(args)


if __name__ == "__main__":
    main()
