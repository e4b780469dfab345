"""Multi-modal views: image multi-crop shapes and counts, text crops drawn from the sample's own sentences, CLIP
mode (one plain crop, one caption field), the augmentation recipe's probabilities and parameters measured over many
samples, reproducibility from a seed (also across DataLoader workers), config validation, and the crop/resize ops
against torchvision's."""
from __future__ import annotations

import io
import math
import pickle
import random
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import functional as TF

from cosmos.data.views import (
    MultiViewTransform,
    ViewConfig,
    augment_crop,
    clip_caption,
    collate_views,
    crop_box,
    resized_crop,
    sentence_pool,
    text_crops,
)
from cosmos.errors import CosmosError
from cosmos.tokenizer import Tokenizer
from cosmos.transforms import CLIP_MEAN, CLIP_STD

# Distinguishable sentences: two words each, no word shared between sentences.
WORDS = ["zebra violin", "quiet harbor", "golden tractor", "purple mountain", "silent engine", "frozen lake",
         "copper kettle", "wooden bridge", "paper lantern", "rusty anchor", "velvet curtain", "marble statue"]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.clip()


@pytest.fixture(scope="module")
def image() -> Image.Image:
    pixels = np.random.default_rng(0).integers(0, 256, size=(150, 200, 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")


def decode_sentences(tokenizer: Tokenizer, tokens: torch.Tensor) -> list[str]:
    """Token row -> the sentences of the crop (the tokenizer decodes ". " as " . ")."""
    return [s.strip() for s in tokenizer.decode(tokens).split(" . ")]


# --- image and text views: shapes and counts --------------------------------------------------------------------


@pytest.mark.parametrize(
    "cfg, counts",
    [
        (ViewConfig(), (2, 224, 6, 96, 2, 6)),
        (ViewConfig.tiny(), (2, 64, 6, 32, 2, 6)),
        (ViewConfig(mode="clip"), (1, 224, 0, 96, 1, 0)),
        (ViewConfig.tiny(mode="clip"), (1, 64, 0, 32, 1, 0)),
        (ViewConfig(global_size=48, local_size=24, n_global=3, n_local=4, n_global_text=1, n_local_text=2,
                    context_length=16), (3, 48, 4, 24, 1, 2)),
    ],
    ids=["cosmos", "cosmos-tiny", "clip", "clip-tiny", "custom"],
)
def test_view_shapes_and_counts(cfg, counts, tokenizer, image):
    n_global, g, n_local, l, n_gtext, n_ltext = counts
    out = MultiViewTransform(cfg, tokenizer, seed=0)(image, WORDS[:7], key="k")
    assert out["global_crops"].shape == (n_global, 3, g, g)
    assert out["local_crops"].shape == (n_local, 3, l, l)
    assert out["global_text"].shape == (n_gtext, cfg.context_length)
    assert out["local_text"].shape == (n_ltext, cfg.context_length)
    assert out["global_crops"].dtype == torch.float32 and out["global_text"].dtype == torch.long
    # Every caption view starts with start-of-text and holds one end-of-text.
    for text in (out["global_text"], out["local_text"]):
        for row in text:
            assert row[0] == tokenizer.sot_token_id
            assert (row == tokenizer.eot_token_id).sum() == 1


@pytest.mark.parametrize("seed", range(6))
def test_clip_mode_is_one_plain_crop_of_the_image(seed, tokenizer, image):
    """CLIP mode = one RandomResizedCrop (scale 0.9-1.0) of the image, bicubic, normalized, nothing else: on a
    random-noise image, compare with the pipeline rebuilt from a clone of the generator (exact up to float
    rounding, atol 1e-5), then with torchvision's crop of the same box (mean abs difference < 0.5 grey level)."""
    cfg = ViewConfig.tiny(mode="clip")
    captions = {"raw": [WORDS[0]], "long": WORDS[1:4]}
    rng = random.Random(seed)
    twin = random.Random()
    twin.setstate(rng.getstate())
    out = MultiViewTransform(cfg, tokenizer)(image, captions, rng=rng)

    box = crop_box(*image.size, (0.9, 1.0), twin)  # the first draws: the crop box
    left, top, w, h = box
    assert 0.9 * 0.99 <= w * h / (image.size[0] * image.size[1]) <= 1.0
    expected = TF.normalize(TF.to_tensor(resized_crop(image, box, 64)), CLIP_MEAN, CLIP_STD)  # [3, 64, 64]
    assert out["global_crops"].shape == (1, 3, 64, 64)
    torch.testing.assert_close(out["global_crops"][0], expected, atol=1e-5, rtol=0)
    reference = TF.resized_crop(image, top=top, left=left, height=h, width=w, size=[64, 64],
                                interpolation=T.InterpolationMode.BICUBIC)
    reference = TF.normalize(TF.to_tensor(reference), CLIP_MEAN, CLIP_STD)
    std = torch.tensor(CLIP_STD).view(3, 1, 1)
    assert ((out["global_crops"][0] - reference) * std).abs().mean() * 255 < 0.5
    # Then the caption, from the same generator: one whole caption field.
    assert decode_sentences(tokenizer, out["global_text"][0]) == clip_caption(captions, cfg, twin).split(". ")


CAPTIONS = {"raw": [WORDS[0]], "short": [WORDS[1]], "long": WORDS[2:5]}


def test_clip_mode_caption_is_one_whole_caption_field(tokenizer, image):
    """clip_text="caption" (the default): each call picks one caption field of the sample, all its sentences in
    order; every field gets picked."""
    transform = MultiViewTransform(ViewConfig.tiny(mode="clip"), tokenizer, seed=0)
    assert transform.cfg.clip_text == "caption"
    seen = Counter()
    for i in range(60):
        seen[tuple(decode_sentences(tokenizer, transform(image, CAPTIONS, key=str(i))["global_text"][0]))] += 1
    assert set(seen) == {tuple(v) for v in CAPTIONS.values()}
    # Fields with no sentences are never picked; a list of sentences is one field (the whole list).
    cfg = ViewConfig(mode="clip")
    for seed in range(20):
        assert clip_caption({"raw": [], "long": WORDS[:2]}, cfg, random.Random(seed)) == ". ".join(WORDS[:2])
        assert text_crops(WORDS[:3], cfg, random.Random(seed)) == ([". ".join(WORDS[:3])], [])


def test_clip_mode_raw_and_sentence_captions():
    raw = ViewConfig(mode="clip", clip_text="raw")
    sentence = ViewConfig(mode="clip", clip_text="sentence")
    picked = Counter()
    for seed in range(80):
        assert clip_caption(CAPTIONS, raw, random.Random(seed)) == WORDS[0]
        assert clip_caption({"raw": ["a b", "c"], "long": ["x"]}, raw, random.Random(seed)) == "a b. c"
        picked[clip_caption(CAPTIONS, sentence, random.Random(seed))] += 1
    assert set(picked) == set(WORDS[:5])  # one sentence of the pool, any of them
    with pytest.raises(CosmosError, match=r"sample 'k7': clip_text='raw' needs a non-empty 'raw' caption field, "
                                          r"got fields short, long"):
        clip_caption({"long": ["x"], "short": ["y"]}, raw, random.Random(0), where="sample 'k7'")
    with pytest.raises(CosmosError, match="got a plain list of sentences"):
        clip_caption(WORDS[:3], raw, random.Random(0))


def test_loader_hands_the_captions_dict_to_the_transform(tmp_path, tokenizer):
    """Through cosmos.data.loader, clip_text="raw" sees the sample's fields (a pooled sentence list has none)."""
    from cosmos.data.loader import build_loader
    from cosmos.data.shards import ShardWriter, sample_files

    buffer = io.BytesIO()
    Image.new("RGB", (40, 40), (10, 200, 30)).save(buffer, format="PNG")
    with ShardWriter(tmp_path) as writer:
        for i in range(3):
            writer.write(f"k{i}", sample_files(f"k{i}", buffer.getvalue(), "png",
                                               {"raw": [WORDS[i]], "long": WORDS[5:9]}, WORDS[i]))
    transform = MultiViewTransform(ViewConfig.tiny(mode="clip", clip_text="raw"), tokenizer, seed=0)
    (batch,) = list(build_loader(str(tmp_path), transform, 3, num_workers=0))
    by_key = dict(zip(batch["keys"], batch["global_text"][:, 0]))
    assert {k: decode_sentences(tokenizer, v) for k, v in by_key.items()} == {f"k{i}": [WORDS[i]] for i in range(3)}


# --- text crops: content -----------------------------------------------------------------------------------------


def test_text_crops_come_from_the_pool_by_construction():
    cfg = ViewConfig()
    pool = WORDS[:9]
    sizes = Counter()
    first_sentences = Counter()
    for seed in range(400):
        global_crops, local_crops = text_crops(pool, cfg, random.Random(seed))
        assert len(global_crops) == 2 and len(local_crops) == 6
        for crop in global_crops:
            parts = crop.split(". ")
            assert 1 <= len(parts) <= 5
            assert len(set(parts)) == len(parts), "global crop sentences must be drawn without replacement"
            assert set(parts) <= set(pool)
            sizes[len(parts)] += 1
            first_sentences[parts[0]] += 1
        assert set(local_crops) <= set(pool)
        assert len(set(local_crops)) == 6, "local crops must be distinct when the pool is large enough"
    # n ~ Uniform{1..5}: every count occurs, none dominates (800 crops, 160 expected each).
    assert set(sizes) == {1, 2, 3, 4, 5}
    assert all(100 < c < 220 for c in sizes.values()), sizes
    # Random order: any sentence can lead a crop.
    assert set(first_sentences) == set(pool)


def test_local_text_crops_repeat_a_small_pool():
    pool = WORDS[:4]
    for seed in range(50):
        global_crops, local_crops = text_crops(pool, ViewConfig(), random.Random(seed))
        counts = Counter(local_crops)
        assert len(local_crops) == 6 and set(counts) == set(pool)  # all of the pool first, then repeats
        assert sorted(counts.values()) == [1, 1, 2, 2]
        for crop in global_crops:
            assert 1 <= len(crop.split(". ")) <= 4  # never more sentences than the pool holds


def test_single_sentence_pool_and_empty_pool():
    global_crops, local_crops = text_crops(["only one"], ViewConfig(), random.Random(0))
    assert global_crops == ["only one"] * 2 and local_crops == ["only one"] * 6
    with pytest.raises(CosmosError, match="no caption sentences"):
        text_crops([], ViewConfig(), random.Random(0))


def test_tokenized_crops_decode_to_the_samples_sentences(tokenizer, image):
    """Decode the token views back: global crops hold 1-5 distinct pool sentences, local crops exactly one."""
    pool = WORDS[:8]
    transform = MultiViewTransform(ViewConfig.tiny(), tokenizer, seed=3)
    lengths = set()
    for i in range(30):
        out = transform(image, pool, key=f"s{i}")
        for row in out["global_text"]:
            sentences = decode_sentences(tokenizer, row)
            assert 1 <= len(sentences) <= 5 and len(set(sentences)) == len(sentences)
            assert set(sentences) <= set(pool)
            lengths.add(len(sentences))
        local = [decode_sentences(tokenizer, row) for row in out["local_text"]]
        assert all(len(s) == 1 for s in local)
        assert len({s[0] for s in local}) == 6 and {s[0] for s in local} <= set(pool)
    assert lengths == {1, 2, 3, 4, 5}


def test_long_crops_are_truncated_with_end_of_text(tokenizer, image):
    long_sentences = [" ".join(["zebra"] * 30) + f" number {i}" for i in range(6)]
    cfg = ViewConfig.tiny(context_length=24)
    out = MultiViewTransform(cfg, tokenizer, seed=0)(image, long_sentences)
    for text in (out["global_text"], out["local_text"]):
        assert text.shape[1] == 24
        assert (text[:, -1] == tokenizer.eot_token_id).all()
        assert (text != 0).all()  # full rows: truncated, no padding


def test_sentence_pool_order_and_the_string_field_error():
    captions = {"long": ["b one", "b two"], "raw": ["a"], "zeta": ["z"], "alpha": ["y"], "short": [" s "]}
    assert sentence_pool(captions) == ["a", "s", "b one", "b two", "y", "z"]
    with pytest.raises(CosmosError, match="caption field 'long' is a string, not a list of sentences"):
        sentence_pool({"raw": ["ok"], "long": "A whole paragraph. Not split."}, where="shard-0/key1")


# --- randomness ----------------------------------------------------------------------------------------------


def _equal(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def test_seeded_views_are_reproducible(tokenizer, image):
    cfg = ViewConfig.tiny()
    pool = WORDS[:8]
    a = MultiViewTransform(cfg, tokenizer, seed=7)
    b = MultiViewTransform(cfg, tokenizer, seed=7)
    torch_state = torch.random.get_rng_state()
    first = a(image, pool, key="000001")
    assert _equal(first, b(image, pool, key="000001"))  # same seed and key, another instance
    assert _equal(first, a(image, pool, key="000001"))  # the key, not the call order, decides
    assert not _equal(first, a(image, pool, key="000002"))
    assert not _equal(first, MultiViewTransform(cfg, tokenizer, seed=8)(image, pool, key="000001"))
    a.set_epoch(1)
    assert not _equal(first, a(image, pool, key="000001"))
    # Seed without keys: a reproducible stream of calls.
    c, d = MultiViewTransform(cfg, tokenizer, seed=5), MultiViewTransform(cfg, tokenizer, seed=5)
    assert _equal(c(image, pool), d(image, pool)) and _equal(c(image, pool), d(image, pool))
    # An explicit generator wins.
    assert _equal(a(image, pool, rng=random.Random(3)), b(image, pool, rng=random.Random(3)))
    # The global torch RNG is never touched (torchvision transforms would draw from it).
    assert torch.equal(torch.random.get_rng_state(), torch_state)


def test_unseeded_views_differ_and_follow_the_global_random_state(tokenizer, image):
    transform = MultiViewTransform(ViewConfig.tiny(), tokenizer)
    random.seed(11)
    first = transform(image, WORDS[:8])
    assert not _equal(first, transform(image, WORDS[:8]))
    random.seed(11)  # what the DataLoader does per worker: a different seed per worker gives different views
    assert _equal(first, transform(image, WORDS[:8]))


def test_transform_pickles_for_dataloader_workers(tokenizer, image):
    transform = MultiViewTransform(ViewConfig.tiny(), tokenizer, seed=2)
    clone = pickle.loads(pickle.dumps(transform))
    assert _equal(transform(image, WORDS[:5], key="x"), clone(image, WORDS[:5], key="x"))


def test_augmentations_change_pixels_per_view(tokenizer, image):
    """The 8 image views differ from each other, and global #1 (always blurred) is smoother than the input."""
    out = MultiViewTransform(ViewConfig(global_scale=(1.0, 1.0), global_size=100), tokenizer, seed=0)(
        image, WORDS[:3], key="a")
    g = out["global_crops"]
    assert not torch.equal(g[0], g[1])
    plain = TF.normalize(TF.to_tensor(image.resize((100, 100), Image.BICUBIC)), CLIP_MEAN, CLIP_STD)
    def roughness(x):
        return (x[..., 1:] - x[..., :-1]).abs().mean()
    assert roughness(g[0]) < 0.8 * roughness(plain)


# --- the augmentation recipe (DINO's, COSMOS_METHOD.md section 2), measured -----------------------------------


def fake_tokenizer(texts: list[str], context_length: int) -> torch.Tensor:
    return torch.zeros(len(texts), context_length, dtype=torch.long)  # [N, ctx]


class Recorder:
    """Records, per crop (one `resized_crop` call), which image ops ran with which parameters, in order."""

    JITTER = ("brightness", "contrast", "saturation", "hue")

    def __init__(self, monkeypatch):
        from PIL import ImageFilter, ImageOps

        import cosmos.data.views as views

        self.crops: list[dict] = []
        crop, transpose = views.resized_crop, Image.Image.transpose
        blur, solarize = ImageFilter.GaussianBlur, ImageOps.solarize

        def record_crop(image, box, size):
            self.crops.append({"size": size, "events": []})
            return crop(image, box, size)

        def record_transpose(image, method):
            self.event("flip", method)
            return transpose(image, method)

        def record_blur(radius):
            self.event("blur", radius)
            return blur(radius=radius)

        def record_solarize(image, threshold=128):
            self.event("solarize", threshold)
            return solarize(image, threshold=threshold)

        def jitter_op(name):
            op = getattr(TF, f"adjust_{name}")

            def record(image, factor):
                self.event(name, factor)
                return op(image, factor)
            return record

        monkeypatch.setattr(views, "resized_crop", record_crop)
        monkeypatch.setattr(Image.Image, "transpose", record_transpose)
        monkeypatch.setattr(ImageFilter, "GaussianBlur", record_blur)
        monkeypatch.setattr(ImageOps, "solarize", record_solarize)
        for name in self.JITTER:
            monkeypatch.setattr(TF, f"adjust_{name}", jitter_op(name))

    def event(self, name, value) -> None:
        self.crops[-1]["events"].append((name, value))


def is_grey(view: torch.Tensor) -> bool:
    """R = G = B everywhere, after undoing the normalization (grey levels, tolerance 1e-3)."""
    pixels = view * torch.tensor(CLIP_STD).view(3, 1, 1) + torch.tensor(CLIP_MEAN).view(3, 1, 1)  # [3, S, S]
    return bool((pixels[0] - pixels[1]).abs().max() * 255 < 1e-3 and (pixels[1] - pixels[2]).abs().max() * 255 < 1e-3)


def assert_rate(count: int, n: int, p: float, what: str) -> None:
    """count ~ Binomial(n, p): within 5 standard deviations (a false alarm about once in 1.7 million runs);
    exact for p = 0 or 1."""
    if p in (0.0, 1.0):
        assert count == round(n * p), f"{what}: {count} of {n}, expected always/never (p={p})"
        return
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(count / n - p) <= 5 * sigma, f"{what}: rate {count / n:.3f} over {n}, expected {p} +- {5 * sigma:.3f}"


N_RECIPE = 1000  # samples: 1,000 g1, 1,000 g2, 6,000 local crops


@pytest.fixture(scope="module")
def recipe_run():
    """Views of N_RECIPE samples (small crops of a noise image) with every image op recorded."""
    monkeypatch = pytest.MonkeyPatch()
    recorder = Recorder(monkeypatch)
    try:
        cfg = ViewConfig(global_size=24, local_size=12, context_length=8, blur_sigma=(0.1, 2.0))
        transform = MultiViewTransform(cfg, fake_tokenizer, seed=0)
        noise = Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 48, 3), dtype=np.uint8), "RGB")
        outputs = [transform(noise, WORDS[:6], key=str(i)) for i in range(N_RECIPE)]
    finally:
        monkeypatch.undo()
    crops = recorder.crops
    assert len(crops) == 8 * N_RECIPE
    assert [c["size"] for c in crops[:8]] == [24, 24] + [12] * 6
    views = []  # (kind, events, output view) per crop, in order
    for i, out in enumerate(outputs):
        tensors = [out["global_crops"][0], out["global_crops"][1], *out["local_crops"]]
        for j, (crop, view) in enumerate(zip(crops[8 * i: 8 * i + 8], tensors)):
            views.append(("g1" if j == 0 else "g2" if j == 1 else "local", crop["events"], view))
    return cfg, views


def _count(views, kind: str, test) -> tuple[int, int]:
    chosen = [v for v in views if kind == "all" or v[0] == kind]
    return sum(bool(test(events, view)) for _, events, view in chosen), len(chosen)


def _has(name):
    return lambda events, view: any(e == name for e, _ in events)


@pytest.mark.parametrize("kind, blur, solarize", [("g1", 1.0, 0.0), ("g2", 0.1, 0.2), ("local", 0.5, 0.0)])
def test_blur_and_solarize_probabilities_per_view(recipe_run, kind, blur, solarize):
    """Global #1 always blurred, never solarized; global #2 blurred 10 %, solarized 20 %; locals blurred 50 %."""
    _, views = recipe_run
    assert_rate(*_count(views, kind, _has("blur")), blur, f"{kind} blur")
    assert_rate(*_count(views, kind, _has("solarize")), solarize, f"{kind} solarize")


@pytest.mark.parametrize("kind", ["g1", "g2", "local"])
def test_flip_jitter_and_grayscale_probabilities(recipe_run, kind):
    """Every crop: flipped 50 %, colour-jittered 80 %, grey (R = G = B in the output) 20 %."""
    _, views = recipe_run
    assert_rate(*_count(views, kind, _has("flip")), 0.5, f"{kind} flip")
    assert_rate(*_count(views, kind, _has("brightness")), 0.8, f"{kind} jitter")
    assert_rate(*_count(views, kind, lambda events, view: is_grey(view)), 0.2, f"{kind} grayscale")


def test_jitter_strengths_op_order_and_the_chain_order(recipe_run):
    """ColorJitter(0.4, 0.4, 0.2, 0.1): all four ops when it applies, factors over their whole ranges, in a random
    order (all 24 orders occur among ~6,400 jittered crops, 267 expected each); the chain runs flip -> jitter ->
    blur -> solarize; the flip is left-right; blur radii lie in blur_sigma; solarize uses threshold 128."""
    cfg, views = recipe_run
    ranges = {"brightness": (0.6, 1.4), "contrast": (0.6, 1.4), "saturation": (0.8, 1.2), "hue": (-0.1, 0.1)}
    factors = {name: [] for name in ranges}
    orders = Counter()
    chain = ("flip", "jitter", "blur", "solarize")
    for _, events, _ in views:
        names = [e for e, _ in events]
        jitter = [e for e in names if e in ranges]
        assert sorted(jitter) in ([], sorted(ranges)), names  # all four ops or none
        if jitter:
            orders[tuple(jitter)] += 1
        stages = [("jitter" if e in ranges else e) for e in names]
        stages = [s for k, s in enumerate(stages) if k == 0 or s != stages[k - 1]]
        assert stages == sorted(stages, key=chain.index), names
        for name, value in events:
            if name in ranges:
                factors[name].append(value)
            elif name == "flip":
                assert value == Image.FLIP_LEFT_RIGHT
            elif name == "blur":
                assert cfg.blur_sigma[0] <= value <= cfg.blur_sigma[1]
            else:
                assert value == 128
    assert len(orders) == 24, orders
    for name, (lo, hi) in ranges.items():
        values = factors[name]
        assert lo <= min(values) < lo + 0.02 * (hi - lo) and hi - 0.02 * (hi - lo) < max(values) <= hi, name
    radii = [value for _, events, _ in views for name, value in events if name == "blur"]
    assert min(radii) < 0.2 and max(radii) > 1.9


def test_grey_crops_are_exactly_the_grayscale_draws(recipe_run):
    """The grey check is sound: no jittered colour crop of the noise image comes out near grey by accident (the
    saturation factor is >= 0.8), so a grey output means the grayscale op ran."""
    _, views = recipe_run
    std = torch.tensor(CLIP_STD).view(3, 1, 1)
    spreads = [float(((view * std)[0] - (view * std)[1]).abs().max()) * 255 for _, _, view in views
               if not is_grey(view)]  # largest R - G gap of each non-grey view, grey levels
    assert len(spreads) > 0.7 * len(views) and min(spreads) > 5


def test_solarize_inverts_from_128_up():
    """Solarize threshold 128: 127 stays, 128 -> 127, 255 -> 0. A generator stuck at 0.999 makes every draw
    "no" except solarize (p 1)."""

    class Stuck(random.Random):
        def random(self) -> float:
            return 0.999

    image = Image.fromarray(np.array([[[127, 128, 255], [0, 200, 126]]], dtype=np.uint8), "RGB")
    out = augment_crop(image, Stuck(), blur_p=0.0, solarize_p=1.0, blur_sigma=(0.1, 0.2))
    assert np.asarray(out).tolist() == [[[127, 127, 0], [0, 55, 126]]]
    assert np.asarray(augment_crop(image, Stuck(), 0.0, 0.0, (0.1, 0.2))).tolist() == np.asarray(image).tolist()


@pytest.mark.parametrize("hflip_p", [0.0, 1.0])
def test_hflip_p_sets_the_flip_probability(monkeypatch, hflip_p, image):
    """hflip_p=0 never flips (synthetic captions say "left" / "right"), hflip_p=1 flips every crop."""
    recorder = Recorder(monkeypatch)
    cfg = ViewConfig(global_size=24, local_size=12, context_length=8, hflip_p=hflip_p)
    transform = MultiViewTransform(cfg, fake_tokenizer, seed=0)
    for i in range(40):
        transform(image, WORDS[:3], key=str(i))
    flips = sum(any(e == "flip" for e, _ in crop["events"]) for crop in recorder.crops)
    assert len(recorder.crops) == 320 and flips == 320 * hflip_p
    assert ViewConfig().hflip_p == 0.5 and ViewConfig.tiny(hflip_p=0.0).hflip_p == 0.0


def test_hflip_mirrors_the_views(image):
    """The same draws with hflip_p 1 vs 0 give mirrored views (every other op is mirror-symmetric)."""
    cfg = ViewConfig(global_size=32, local_size=16, context_length=8)
    flipped = MultiViewTransform(replace(cfg, hflip_p=1.0), fake_tokenizer)(image, WORDS[:3], rng=random.Random(4))
    plain = MultiViewTransform(replace(cfg, hflip_p=0.0), fake_tokenizer)(image, WORDS[:3], rng=random.Random(4))
    for name in ("global_crops", "local_crops"):
        torch.testing.assert_close(flipped[name], plain[name].flip(-1), atol=2e-2, rtol=0)
        assert not torch.allclose(flipped[name], plain[name], atol=2e-2)


# --- DataLoader workers --------------------------------------------------------------------------------------


class _Unkeyed(torch.utils.data.Dataset):
    """Calls the transform without a sample key, as a user's own dataset might."""

    def __init__(self, transform: MultiViewTransform, image: Image.Image):
        self.transform, self.image = transform, image

    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.transform(self.image, WORDS[:6])["global_crops"]  # [2, 3, G, G]


def test_seeded_unkeyed_views_differ_across_workers_and_epochs(image):
    """Without a key, each DataLoader worker draws its own stream (seed, epoch, worker id): workers 0 and 1 get
    different views for their first samples, the run repeats exactly, and another epoch differs."""
    transform = MultiViewTransform(ViewConfig(global_size=24, local_size=12, context_length=8), fake_tokenizer,
                                   seed=3)

    def run() -> list[torch.Tensor]:
        return list(torch.utils.data.DataLoader(_Unkeyed(transform, image), batch_size=None, num_workers=2))

    first = run()  # items 0, 2 from worker 0; 1, 3 from worker 1
    assert not torch.equal(first[0], first[1]) and not torch.equal(first[2], first[3])
    assert all(torch.equal(a, b) for a, b in zip(first, run()))
    transform.set_epoch(1)
    assert not any(torch.equal(a, b) for a, b in zip(first, run()))


# --- the image ops against torchvision ------------------------------------------------------------------------


def test_crop_box_matches_torchvision_random_resized_crop_statistics():
    """Same algorithm as torchvision's RandomResizedCrop.get_params: compare area and aspect distributions over
    4,000 draws each (tolerances: 0.01 on the mean area fraction, 0.02 on the mean log aspect)."""
    width, height = 160, 120
    ours = [crop_box(width, height, (0.05, 0.4), random.Random(i)) for i in range(4000)]
    torch.manual_seed(0)
    img = torch.zeros(3, height, width)
    ref = [T.RandomResizedCrop.get_params(img, scale=(0.05, 0.4), ratio=(3 / 4, 4 / 3)) for _ in range(4000)]
    ours_area = np.mean([w * h / (width * height) for _, _, w, h in ours])
    ref_area = np.mean([w * h / (width * height) for _, _, h, w in ref])
    assert abs(ours_area - ref_area) < 0.01
    ours_aspect = np.mean([math.log(w / h) for _, _, w, h in ours])
    ref_aspect = np.mean([math.log(w / h) for _, _, h, w in ref])
    assert abs(ours_aspect - ref_aspect) < 0.02
    for left, top, w, h in ours:
        assert 0 <= left and left + w <= width and 0 <= top and top + h <= height


def test_resized_crop_matches_torchvision(image):
    """One bicubic resample from the box vs torchvision's crop-then-resize of the same box: equal up to PIL's
    filter support at the box edges (mean abs difference < 0.5 grey level; away from the edges < 1)."""
    box = (30, 20, 90, 70)  # left, top, w, h
    ours = np.asarray(resized_crop(image, box, 64), dtype=np.float32)
    ref = TF.resized_crop(image, top=20, left=30, height=70, width=90, size=[64, 64],
                          interpolation=T.InterpolationMode.BICUBIC)
    ref = np.asarray(ref, dtype=np.float32)
    diff = np.abs(ours - ref)
    assert diff.mean() < 0.5
    assert diff[4:-4, 4:-4].max() < 1.0


# --- batching ------------------------------------------------------------------------------------------------


def test_collate_views_stacks_per_key(tokenizer, image):
    transform = MultiViewTransform(ViewConfig.tiny(), tokenizer, seed=0)
    samples = []
    for i in range(3):
        out = transform(image, WORDS[:6], key=str(i))
        out["__key__"] = f"key{i}"
        samples.append(out)
    batch = collate_views(samples)
    assert batch["global_crops"].shape == (3, 2, 3, 64, 64)
    assert batch["local_crops"].shape == (3, 6, 3, 32, 32)
    assert batch["global_text"].shape == (3, 2, 77) and batch["local_text"].shape == (3, 6, 77)
    assert batch["keys"] == ["key0", "key1", "key2"]
    assert torch.equal(batch["local_text"][1], samples[1]["local_text"])
    clip = MultiViewTransform(ViewConfig.tiny(mode="clip"), tokenizer, seed=0)
    batch = collate_views([clip(image, WORDS[:2]) for _ in range(4)])
    assert batch["local_crops"].shape == (4, 0, 3, 32, 32) and batch["local_text"].shape == (4, 0, 77)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(mode="dino"), "view mode 'dino' is unknown"),
        (dict(local_scale=(0.5, 0.1)), r"local_scale=\(0.5, 0.1\) must satisfy 0 < low <= high <= 1"),
        (dict(global_scale=(0.0, 1.0)), "global_scale=.* must satisfy 0 < low"),
        (dict(global_scale=(0.4, 1.5)), "global_scale=.* must satisfy 0 < low"),
        (dict(clip_scale=(0.9, 1.1)), "clip_scale=.* must satisfy 0 < low"),
        (dict(local_scale=0.3), "local_scale=0.3 must be a pair of numbers"),
        (dict(blur_sigma=(0.0, 1.0)), r"blur_sigma=\(0.0, 1.0\) must satisfy 0 < low <= high"),
        (dict(blur_sigma=(2.0, 1.0)), "blur_sigma=.* must satisfy 0 < low <= high"),
        (dict(blur_sigma=(-1.0, 1.0)), "blur_sigma=.* must satisfy 0 < low <= high"),
        (dict(n_local=2.0), "n_local=2.0 must be an integer, not a float"),
        (dict(n_global_text=1.5), "n_global_text=1.5 must be an integer"),
        (dict(global_size=64.0), "global_size=64.0 must be an integer"),
        (dict(context_length="77"), "context_length='77' must be an integer, not a str"),
        (dict(n_global=True), "n_global=True must be an integer, not a bool"),
        (dict(n_local=-1), "n_local=-1 must be an integer >= 0"),
        (dict(local_size=0), "local_size=0 must be a positive integer"),
        (dict(hflip_p=1.5), "hflip_p=1.5 must be a probability between 0 and 1"),
        (dict(clip_text="words"), "clip_text='words' is unknown; use one of caption, raw, sentence"),
        (dict(mode="clip", n_local=4), r"mode='clip' uses one image view and one caption \(n_local=0\), but n_local=4"),
        (dict(mode="clip", n_global=3), "mode='clip' .*n_global=3 was set"),
        (dict(mode="clip", n_global_text=4), "mode='clip' .*n_global_text=4 was set"),
    ],
)
def test_bad_config_is_refused(kwargs, message):
    with pytest.raises(CosmosError, match=message):
        ViewConfig(**kwargs)


def test_clip_mode_fixes_the_counts():
    """mode="clip" sets 1 / 0 / 1 / 0; counts left at their defaults or set to those values are accepted."""
    for cfg in (ViewConfig(mode="clip"), ViewConfig(mode="clip", n_global=1, n_local=0), ViewConfig.tiny("clip"),
                replace(ViewConfig(), mode="clip")):
        assert (cfg.n_global, cfg.n_local, cfg.n_global_text, cfg.n_local_text) == (1, 0, 1, 0)
    cfg = ViewConfig(n_local=np.int64(4), global_scale=(np.float32(0.5), 1))  # numpy numbers are numbers
    assert type(cfg.n_local) is int and cfg.global_scale == (0.5, 1.0)
