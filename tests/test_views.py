"""Multi-modal views: image multi-crop shapes and counts, text crops drawn from the sample's own sentences,
reproducibility from a seed, and the crop/resize ops against torchvision's."""
from __future__ import annotations

import math
import pickle
import random
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import functional as TF

from cosmos.data.views import (
    MultiViewTransform,
    ViewConfig,
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


def test_clip_mode_is_a_plain_normalized_crop(tokenizer):
    """CLIP mode applies no colour augmentation: a white image gives exactly CLIP's normalized white."""
    white = Image.new("RGB", (120, 90), (255, 255, 255))
    out = MultiViewTransform(ViewConfig.tiny(mode="clip"), tokenizer, seed=1)(white, WORDS[:3])
    expected = (1.0 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)  # [3]
    torch.testing.assert_close(out["global_crops"][0], expected.view(3, 1, 1).expand(3, 64, 64))
    # The one caption is one sentence of the pool.
    assert decode_sentences(tokenizer, out["global_text"][0]) in [WORDS[:3][i:i + 1] for i in range(3)]


def test_clip_mode_caption_covers_the_pool(tokenizer, image):
    transform = MultiViewTransform(ViewConfig.tiny(mode="clip"), tokenizer, seed=0)
    seen = Counter()
    for i in range(60):
        (sentence,) = decode_sentences(tokenizer, transform(image, WORDS[:3], key=str(i))["global_text"][0])
        seen[sentence] += 1
    assert set(seen) == set(WORDS[:3])


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


def test_bad_config_is_refused():
    with pytest.raises(CosmosError, match="view mode 'dino' is unknown"):
        ViewConfig(mode="dino")
    with pytest.raises(CosmosError, match="local_scale"):
        ViewConfig(local_scale=(0.5, 0.1))
