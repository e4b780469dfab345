"""Zero-shot segmentation: the last-block variants against their formulas, the sliding windows, the upsampling,
a crafted scene with a known mask and mIoU, and the dataset / mask checks."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from cosmos.errors import CosmosError
from cosmos.model.cosmos import CosmosModel, TextConfig, VisionConfig, get_config
from cosmos.zeroshot.classify import ClassEmbeddings
from cosmos.zeroshot.segment import (
    SegmentConfig,
    Segmenter,
    bilinear_matrix,
    confusion_matrix,
    evaluate_segmentation,
    iou_from_confusion,
    overlay,
    palette,
    patch_padding,
    predict_mask,
    read_mask,
    read_segmentation_set,
    resized_shape,
    sliding_windows,
    to_model_input,
    window_logits,
    with_background,
)


# --- 1. last-block variants ----------------------------------------------------------------------------------------
def small_model(stem: str = "patch") -> CosmosModel:
    config = get_config("tiny")
    config.vision = VisionConfig(image_size=32, patch_size=8, width=64, layers=3, heads=4, stem=stem)
    config.text = TextConfig(width=64, layers=1, heads=2, vocab_size=1000)
    config.embed_dim = 48
    torch.manual_seed(0)
    model = CosmosModel(config).eval()
    with torch.no_grad():  # non-trivial LayerNorm affine parameters and biases
        for name, p in model.visual.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.3)
    return model


def naclip_bias(gh: int, gw: int, std: float = 5.0) -> torch.Tensor:
    """NACLIP's Gaussian neighbourhood term written out: token 0 (class) gets none; patch i = (row, col) row-major."""
    n = gh * gw
    bias = torch.zeros(1 + n, 1 + n)
    for i in range(n):
        for j in range(n):
            (ri, ci), (rj, cj) = divmod(i, gw), divmod(j, gw)
            bias[1 + i, 1 + j] = math.exp(-((ri - rj) ** 2 + (ci - cj) ** 2) / (2 * std**2))
    return bias


def transcription(block, x: torch.Tensor, heads: int, method: str, grid=None) -> torch.Tensor:
    """The formulas of SCLIP / ClearCLIP / MaskCLIP / NACLIP written out from the block's raw weights. x: [B, N, W]."""
    b, n, width = x.shape
    hd = width // heads
    s = hd**-0.5
    h = F.layer_norm(x, (width,), block.ln_1.weight, block.ln_1.bias, block.ln_1.eps)
    qkv = h @ block.attn.in_proj_weight.T + block.attn.in_proj_bias  # [B, N, 3W]
    q, k, v = (t.reshape(b, n, heads, hd).transpose(1, 2) for t in qkv.split(width, dim=-1))  # [B, H, N, hd]

    def out_proj(o: torch.Tensor) -> torch.Tensor:  # [B, H, N, hd] -> [B, N, W]
        return o.transpose(1, 2).reshape(b, n, width) @ block.attn.out_proj.weight.T + block.attn.out_proj.bias

    def mlp(y: torch.Tensor) -> torch.Tensor:
        y = F.layer_norm(y, (width,), block.ln_2.weight, block.ln_2.bias, block.ln_2.eps)
        y = F.gelu(y @ block.mlp.c_fc.weight.T + block.mlp.c_fc.bias)
        return y @ block.mlp.c_proj.weight.T + block.mlp.c_proj.bias

    if method == "plain":
        x = x + out_proj(torch.softmax(q @ k.transpose(-1, -2) * s, -1) @ v)
        return x + mlp(x)
    if method == "csa":
        attn = torch.softmax(q @ q.transpose(-1, -2) * s, -1) + torch.softmax(k @ k.transpose(-1, -2) * s, -1)
        x = x + out_proj(attn @ v)
        return x + mlp(x)
    if method == "clearclip":
        return out_proj(torch.softmax(q @ q.transpose(-1, -2) * s, -1) @ v)
    if method == "maskclip":  # MaskCLIP's reference: value embedding through out_proj, residual and FFN kept
        x = x + out_proj(v)
        return x + mlp(x)
    if method == "naclip":  # NACLIP: key-key attention plus the Gaussian neighbourhood, no residual, no FFN
        return out_proj(torch.softmax(k @ k.transpose(-1, -2) * s + naclip_bias(*grid), -1) @ v)
    raise AssertionError(method)


@pytest.mark.parametrize("method", ["plain", "csa", "clearclip", "maskclip", "naclip"])
@pytest.mark.parametrize("size", [(32, 32), (40, 56)])
def test_last_block_variants_match_their_formulas(method, size):
    model = small_model()
    visual = model.visual
    captured = {}
    hook = visual.transformer.resblocks[-1].register_forward_pre_hook(lambda m, args: captured.setdefault("x", args[0]))
    images = torch.randn(2, 3, *size)
    with torch.no_grad():
        model.encode_image(images)  # runs every block: the pre-hook records the last block's input
        hook.remove()
        x = transcription(visual.transformer.resblocks[-1], captured["x"], visual.heads, method,
                          (size[0] // 8, size[1] // 8))  # [B, 1+N, W]
        tokens = F.layer_norm(x[:, 1:], (visual.width,), visual.ln_post.weight, visual.ln_post.bias, visual.ln_post.eps)
        expected = (tokens @ visual.proj).reshape(2, size[0] // 8, size[1] // 8, -1)  # [B, gh, gw, E]
        got = model.encode_dense(images, method=method, normalize=False)
        got_normalized = model.encode_dense(images, method=method)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_normalized, F.normalize(expected, dim=-1), atol=1e-5, rtol=1e-5)


def test_variants_differ_from_each_other():
    """The comparison above is not vacuous: the four last blocks give different features."""
    model = small_model()
    images = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        feats = {m: model.encode_dense(images, method=m) for m in ("plain", "csa", "clearclip", "maskclip", "naclip")}
    names = list(feats)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert (feats[a] - feats[b]).abs().max() > 1e-3, (a, b)


def test_plain_dense_features_match_openclip_tokens(tmp_path):
    """`plain` dense features = OpenCLIP's patch tokens (after ln_post) @ proj, same weights."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    from cosmos.checkpoint import load

    torch.manual_seed(1)
    ref = CLIP(embed_dim=32, vision_cfg=CLIPVisionCfg(layers=2, width=64, patch_size=8, image_size=32, head_width=64),
               text_cfg=CLIPTextCfg(context_length=77, vocab_size=49408, width=64, heads=1, layers=1)).eval()
    torch.save(ref.state_dict(), tmp_path / "ref.pt")
    ours, _, _ = load(tmp_path / "ref.pt")
    ref.visual.output_tokens = True
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        _, tokens = ref.visual(images)  # [B, N, W] after ln_post
        expected = (tokens @ ref.visual.proj).reshape(2, 4, 4, -1)
        got = ours.encode_dense(images, method="plain", normalize=False)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


# --- 2. sliding windows and sizes ----------------------------------------------------------------------------------
@pytest.mark.parametrize("h,w,window,stride", [(336, 448, 224, 112), (336, 336, 224, 112), (337, 500, 224, 112),
                                               (224, 224, 224, 112), (96, 150, 64, 32), (500, 333, 224, 100),
                                               (100, 300, 224, 112)])
def test_sliding_windows_cover_every_pixel(h, w, window, stride):
    boxes = sliding_windows(h, w, window, stride)
    covered = np.zeros((h, w), np.int64)
    for top, left, bottom, right in boxes:
        assert 0 <= top < bottom <= h and 0 <= left < right <= w
        assert bottom - top == min(window, h) and right - left == min(window, w)  # full windows where possible
        covered[top:bottom, left:right] += 1
    assert covered.min() >= 1
    # SCLIP's grid: ceil((size - window) / stride) + 1 windows per axis, starting every `stride` px, the last one
    # moved back to end at the edge.
    rows = max(0, -(-(h - window) // stride)) + 1
    cols = max(0, -(-(w - window) // stride)) + 1
    assert len(boxes) == rows * cols == len(set(boxes))
    tops = sorted({b[0] for b in boxes})
    expected_tops = sorted({max(min(r * stride + window, h) - window, 0) for r in range(rows)})
    assert tops == expected_tops and tops[0] == 0 and max(b[2] for b in boxes) == h


def test_protocol_sizes_scale_with_the_model():
    assert SegmentConfig().sizes(224) == (336, 224, 112)
    assert SegmentConfig().sizes(64) == (96, 64, 32)
    assert SegmentConfig().sizes(336) == (504, 336, 168)
    assert SegmentConfig(short_side=448, window=224, stride=100).sizes(64) == (448, 224, 100)
    assert resized_shape(768, 1024, 336) == (336, 448)
    assert resized_shape(1000, 500, 336) == (672, 336)
    assert resized_shape(100, 10000, 336) == (20, 2048)  # mmseg's cap: long side <= 2048 for short side 336
    with pytest.raises(CosmosError, match="smaller than the 224 px window"):
        SegmentConfig(short_side=200).sizes(224)


def test_long_side_cap_stays_2048_whatever_the_short_side():
    """SCLIP resizes with scale (2048, 336): a larger --short-side does not move the 2048 px cap on the long side;
    only the model's input size scales the whole protocol."""
    assert resized_shape(100, 10000, 448) == (20, 2048)
    assert SegmentConfig(short_side=448).long_cap(224) == 2048
    assert SegmentConfig().long_cap(64) == round(2048 * 64 / 224)
    segmenter = Segmenter(None, colour_classifier(), SegmentConfig(method="plain", short_side=448),
                          dense=colour_features, image_size=224, patch_size=16)
    assert segmenter.resized_shape(Image.new("RGB", (10000, 1000))) == (205, 2048)


def test_resize_is_bilinear_without_antialiasing():
    """A fine stripe pattern shrunk by 3: without antialiasing (cv2, SCLIP) bilinear sampling at half-pixel centres
    keeps hard stripes; PIL's resize would average them to grey."""
    pixels = np.zeros((90, 120, 3), np.uint8)
    pixels[:, 1::3] = 255  # columns 1, 4, 7 ...: exactly the sampling points of a 3x reduction
    image = Image.fromarray(pixels)
    got = to_model_input(image, (30, 40))  # [3, 30, 40]
    x = torch.from_numpy(pixels).permute(2, 0, 1)[None].float()
    expected = F.interpolate(x, size=(30, 40), mode="bilinear", align_corners=False, antialias=False)[0] / 255
    from cosmos.transforms import CLIP_MEAN, CLIP_STD

    expected = (expected - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None]
    torch.testing.assert_close(got, expected, atol=1.5 / 255 / min(CLIP_STD), rtol=0)
    white = (1 - CLIP_MEAN[0]) / CLIP_STD[0]
    assert (got[0] - white).abs().max() < 0.02  # the stripes survive: every sample is white, none is grey


def test_window_must_be_a_patch_multiple():
    assert SegmentConfig(window=224).sizes(224, 16) == (336, 224, 112)
    with pytest.raises(CosmosError, match=r"window 200 px \(--window\) is not a multiple of the model's 16 px patches; "
                                          r"use 192 or 208"):
        SegmentConfig(window=200).sizes(224, 16)
    with pytest.raises(CosmosError, match="not a multiple"):
        Segmenter(small_model(), colour_classifier(), SegmentConfig(window=36, short_side=64))


def test_patch_padding_is_split_evenly():
    assert patch_padding(224, 224, 16) == (0, 0, 0, 0)
    assert patch_padding(100, 224, 16) == (0, 0, 6, 6)
    assert patch_padding(99, 37, 8) == (1, 2, 2, 3)  # (left, right, top, bottom): the odd pixel right / bottom


def sclip_logits(model, x: torch.Tensor, queries: torch.Tensor, crop: int, stride: int, patch: int) -> torch.Tensor:
    """SCLIP's forward_slide written out: windows one by one, each zero-padded evenly to a patch multiple, patch
    logits upsampled to the padded window, cropped back, padded into an image-sized sum, divided by the count."""
    _, h_img, w_img = x.shape
    preds = torch.zeros(queries.shape[0], h_img, w_img)
    count = torch.zeros(1, h_img, w_img)
    h_grids = max(h_img - crop + stride - 1, 0) // stride + 1
    w_grids = max(w_img - crop + stride - 1, 0) // stride + 1
    for h_idx in range(h_grids):
        for w_idx in range(w_grids):
            y1, x1 = h_idx * stride, w_idx * stride
            y2, x2 = min(y1 + crop, h_img), min(x1 + crop, w_img)
            y1, x1 = max(y2 - crop, 0), max(x2 - crop, 0)
            img = x[None, :, y1:y2, x1:x2]
            H, W = img.shape[-2:]
            lr, tb = (patch - W % patch) % patch, (patch - H % patch) % patch
            l, t = lr // 2, tb // 2
            img = F.pad(img, (l, lr - l, t, tb - t))
            feats = F.normalize(model.encode_dense(img, method="csa", normalize=False), dim=-1)  # [1, gh, gw, E]
            logits = (feats @ queries.T).permute(0, 3, 1, 2)  # [1, Q, gh, gw]
            logits = F.interpolate(logits, size=img.shape[-2:], mode="bilinear", align_corners=False)
            logits = logits[:, :, t : t + H, l : l + W]
            preds += F.pad(logits, (x1, w_img - x2, y1, h_img - y2))[0]
            count[:, y1:y2, x1:x2] += 1
    return preds / count


@pytest.mark.parametrize("size", [(40, 1000), (30, 2000)])
def test_windows_that_are_not_patch_multiples_are_padded(size):
    """Very elongated images (the long-side cap pushes the short side below the window, to 12 and 4 px here) give
    windows whose size is not a multiple of the patch size: padded like SCLIP, and the result equals its code."""
    model = small_model()  # 32 px input, 8 px patches: short side 48, window 32, stride 16, long cap 293
    classifier = ClassEmbeddings(F.normalize(torch.randn(3, 48), dim=-1), torch.arange(3), 3, [["a"], ["b"], ["c"]])
    segmenter = Segmenter(model, classifier, SegmentConfig(method="csa", batch_size=3))
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (*size, 3), dtype=np.uint8))
    h, w = segmenter.resized_shape(image)
    assert h % 8 or w % 8 or min(h, w) < 32
    got = segmenter.logits(image)
    with torch.no_grad():
        expected = sclip_logits(model, to_model_input(image, (h, w)), classifier.embeddings, 32, 16, 8)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert segmenter(image).shape == size


def test_bf16_dense_features_are_normalized_in_float32():
    model = small_model()
    classifier = ClassEmbeddings(F.normalize(torch.randn(2, 48), dim=-1), torch.arange(2), 2, [["a"], ["b"]])
    segmenter = Segmenter(model, classifier, SegmentConfig(method="csa", precision="bf16"))
    features = segmenter.dense(torch.randn(2, 3, 32, 32))
    assert features.dtype == torch.float32
    torch.testing.assert_close(features.norm(dim=-1), torch.ones(2, 4, 4), atol=1e-6, rtol=0)


def test_config_is_checked_when_made():
    with pytest.raises(CosmosError, match="choose --method plain, csa, clearclip, maskclip or naclip"):
        SegmentConfig(method="nope")
    with pytest.raises(CosmosError, match="--bg-threshold must be a probability"):
        SegmentConfig(bg_threshold=1.5)
    with pytest.raises(CosmosError, match="--precision"):
        SegmentConfig(precision="fp16")


def test_with_background():
    assert with_background([["cat"], ["dog"]], None) == ([["cat"], ["dog"]], ["cat", "dog"], None)
    # A threshold: the class named background, else a prompt-less one put first.
    assert with_background([["cat"], ["background"]], 0.5) == ([["cat"], ["background"]], ["cat", "background"], 1)
    assert with_background([["cat"]], 0.5) == ([[], ["cat"]], ["background", "cat"], 0)
    # Datasets: class 0 by convention, prompted or not.
    assert with_background([["sky"], ["cat"]], 0.5, index=0) == ([["sky"], ["cat"]], ["sky", "cat"], 0)
    assert with_background([["sky"], ["cat"]], 0.5, index=0, prompt=False) == ([[], ["cat"]], ["sky", "cat"], 0)
    with pytest.raises(CosmosError, match="needs --bg-threshold"):
        with_background([["sky"], ["cat"]], None, index=0, prompt=False)


@pytest.mark.parametrize("n_out,n_in", [(768, 336), (37, 5), (5, 37), (336, 336), (1, 4), (9, 1)])
def test_bilinear_matrix_matches_interpolate(n_out, n_in):
    x = torch.randn(3, n_in, 7)
    expected = F.interpolate(x[None], size=(n_out, 7), mode="bilinear", align_corners=False)[0]
    got = torch.einsum("yh,qhw->qyw", bilinear_matrix(n_out, n_in), x)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def classes_with_synonyms() -> ClassEmbeddings:
    """5 names for 3 classes: class 1 has names 1 and 3, class 2 names 2 and 4."""
    emb = F.normalize(torch.randn(5, 8), dim=-1)
    return ClassEmbeddings(emb, torch.tensor([0, 1, 2, 1, 2]), 3, [["a"], ["b", "b2"], ["c", "c2"]])


@pytest.mark.parametrize("threshold", [None, 0.6])
def test_predict_mask_equals_the_direct_full_resolution_computation(threshold):
    torch.manual_seed(0)
    classifier = classes_with_synonyms()
    logits = torch.randn(5, 12, 17) * 0.2  # [Q, h, w] cosine logits at the resized size
    out = (45, 61)
    got = predict_mask(logits, classifier, out, logit_scale=40.0, bg_threshold=threshold, background_index=0,
                       band_pixels=500)  # forces many bands of rows
    up = F.interpolate(logits[None], size=out, mode="bilinear", align_corners=False)[0]  # [Q, H, W]
    probs = (40.0 * up).softmax(dim=0)
    per_class = torch.stack([probs[[0]].amax(0), probs[[1, 3]].amax(0), probs[[2, 4]].amax(0)])  # [C, H, W]
    best, expected = per_class.max(dim=0)
    if threshold is not None:
        expected[best < threshold] = 0
        assert (best < threshold).any() and (best >= threshold).any()
    assert torch.equal(got, expected)
    assert len(set(got.unique().tolist())) == 3


# --- 3. a crafted scene with a known answer ------------------------------------------------------------------------
RED, BLUE = (230, 20, 20), (20, 20, 230)


def colour_features(windows: torch.Tensor) -> torch.Tensor:
    """A hand-made 'dense encoder': each 16 px patch's mean normalized colour: [b, 3, H, W] -> [b, H/16, W/16, 3]."""
    return F.normalize(F.avg_pool2d(windows, 16).permute(0, 2, 3, 1), dim=-1)


def colour_classifier() -> ClassEmbeddings:
    """Classes red, blue, green, embedded as the features of plain patches of those colours."""
    colours = torch.tensor([RED, BLUE, (20, 230, 20)], dtype=torch.float32)[:, :, None, None] / 255  # [3, 3, 1, 1]
    from cosmos.transforms import CLIP_MEAN, CLIP_STD

    normalized = (colours - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None]
    emb = F.normalize(normalized.flatten(1), dim=-1)  # [3, 3]
    return ClassEmbeddings(emb, torch.arange(3), 3, [["red"], ["blue"], ["green"]])


def crafted_scene(width: int = 448, height: int = 336) -> Image.Image:
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[:, : width // 2] = RED
    pixels[:, width // 2 :] = BLUE
    return Image.fromarray(pixels)


def test_crafted_scene_gives_the_expected_mask():
    segmenter = Segmenter(None, colour_classifier(), SegmentConfig(method="plain", batch_size=4),
                          dense=colour_features, image_size=224, patch_size=16)
    image = crafted_scene()
    assert (segmenter.short_side, segmenter.window, segmenter.stride) == (336, 224, 112)
    assert segmenter.count_windows(image) == 2 * 3
    mask = segmenter(image)
    expected = torch.zeros(336, 448, dtype=torch.long)
    expected[:, 224:] = 1
    assert torch.equal(mask, expected)
    # The same scene at twice the size: resized to 336 px, predicted there, upsampled back.
    big = segmenter(crafted_scene(896, 672))
    expected_big = torch.zeros(672, 896, dtype=torch.long)
    expected_big[:, 448:] = 1
    assert torch.equal(big, expected_big)


def test_crafted_dataset_miou(tmp_path):
    """Ground truth labels the left quarter 'green' (wrong on purpose) and ignores the top rows: IoU red 0.5,
    blue 1, green 0 -> mIoU 0.5."""
    root = tmp_path / "seg"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "classnames.txt").write_text("red\nblue\ngreen\n")
    for name in ("a", "b"):
        crafted_scene().save(root / "images" / f"{name}.png")
        truth = np.zeros((336, 448), np.uint8)
        truth[:, 224:] = 1
        truth[:, :112] = 2
        truth[:10] = 255  # ignored rows
        Image.fromarray(truth, "L").save(root / "masks" / f"{name}.png")
    dataset = read_segmentation_set(root)
    assert dataset.classnames_file == root / "classnames.txt" and len(dataset.images) == 2
    segmenter = Segmenter(None, colour_classifier(), SegmentConfig(method="plain"), dense=colour_features,
                          image_size=224, patch_size=16)
    result = evaluate_segmentation(segmenter, dataset, ["red", "blue", "green"])
    assert result["per_class_iou"] == [{"index": 0, "class": "red", "iou": 0.5},
                                       {"index": 1, "class": "blue", "iou": 1.0},
                                       {"index": 2, "class": "green", "iou": 0.0}]
    assert result["mIoU"] == pytest.approx(0.5)
    assert result["pixel_accuracy"] == pytest.approx((112 + 224) / 448)


def test_background_threshold_on_the_crafted_scene():
    """A green stripe matches neither red nor blue well: with a threshold it becomes background (class 0)."""
    pixels = np.asarray(crafted_scene()).copy()
    pixels[:, 96:128] = (20, 230, 20)
    image = Image.fromarray(pixels)
    classifier = colour_classifier()
    classifier = ClassEmbeddings(classifier.embeddings[:2], torch.tensor([1, 2]), 3, [[], ["red"], ["blue"]])
    segmenter = Segmenter(None, classifier, SegmentConfig(method="plain", logit_scale=5.0, bg_threshold=0.9),
                          background_index=0, dense=colour_features, image_size=224, patch_size=16)
    mask = segmenter(image)
    assert (mask[:, 100:124] == 0).all()  # the stripe
    assert (mask[:, :80] == 1).all() and (mask[:, 240:] == 2).all()
    with pytest.raises(CosmosError, match="background class"):
        Segmenter(None, classifier, SegmentConfig(bg_threshold=0.5), dense=colour_features, image_size=224)


def test_large_image_accumulates_at_the_resized_size():
    calls = []

    def dense(windows):
        calls.append(windows.shape)
        return colour_features(windows)

    segmenter = Segmenter(None, colour_classifier(), SegmentConfig(method="plain", batch_size=3), dense=dense,
                          image_size=224, patch_size=16)
    image = crafted_scene(3000, 2000)
    logits = segmenter.logits(image)
    assert logits.shape == (3, 336, 504)
    assert all(shape[0] <= 3 and shape[-2:] == (224, 224) for shape in calls)
    assert sum(shape[0] for shape in calls) == len(sliding_windows(336, 504, 224, 112))
    mask = segmenter(image)
    # The colour edge at x = 1500 falls inside a patch at the resized size (x = 252): a transition of a patch or so.
    assert mask.shape == (2000, 3000) and (mask[:, :1300] == 0).all() and (mask[:, 1700:] == 1).all()
    assert 1400 < int((mask[0] == 1).nonzero()[0]) < 1600


def test_duplicate_titles_keep_their_own_iou(tmp_path):
    """Two classes with the same title (ImageNet-style duplicates) get one IoU entry each."""
    root = tmp_path / "seg"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    crafted_scene().save(root / "images" / "a.png")
    truth = np.zeros((336, 448), np.uint8)
    truth[:, 224:] = 1
    Image.fromarray(truth, "L").save(root / "masks" / "a.png")
    segmenter = Segmenter(None, colour_classifier(), SegmentConfig(method="plain"), dense=colour_features,
                          image_size=224, patch_size=16)
    result = evaluate_segmentation(segmenter, read_segmentation_set(root), ["colour", "colour", "green"])
    assert [(r["class"], r["iou"]) for r in result["per_class_iou"]] == [("colour", 1.0), ("colour", 1.0),
                                                                          ("green", None)]


def test_window_logits_upsample_one_window_at_a_time(monkeypatch):
    """Memory: logits are upsampled per window ([1, Q, 224, 224]), never for a whole batch of windows."""
    shapes = []
    interpolate = F.interpolate

    def spy(x, *args, **kwargs):
        out = interpolate(x, *args, **kwargs)
        shapes.append(tuple(out.shape))
        return out

    monkeypatch.setattr(torch.nn.functional, "interpolate", spy)
    segmenter = Segmenter(None, colour_classifier(), SegmentConfig(method="plain", batch_size=4), dense=colour_features,
                          image_size=224, patch_size=16)
    segmenter.logits(crafted_scene(900, 600))  # resized to 336 x 504: 2 x 4 windows, batches of 4
    window_calls = [shape for shape in shapes if shape[-2:] == (224, 224)]
    assert len(window_calls) == 8 and all(shape[0] == 1 for shape in window_calls)


def test_overlay_blends_in_8_bit():
    """The overlay is Image.blend of the image and the palette-coloured mask, and allocates no float or int64 copy
    of the picture (tracemalloc sees NumPy's buffers)."""
    import tracemalloc

    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (600, 800, 3), dtype=np.uint8))
    mask = torch.zeros(600, 800, dtype=torch.long)
    mask[:, 400:] = 2
    tracemalloc.start()
    picture = overlay(image, mask, ["a", "b", "c"])
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 600 * 800 * 3  # less than one uint8 copy of the picture through NumPy
    assert picture.size[0] == 800 and picture.size[1] > 600
    colours = Image.new("RGB", (800, 600), palette()[0])
    colours.paste(palette()[2], (400, 0, 800, 600))
    expected = Image.blend(image, colours, 0.5)
    assert np.array_equal(np.asarray(picture.crop((0, 0, 800, 600))), np.asarray(expected))


def test_window_logits_average_overlaps():
    """Each window's logits are its own constant: the average over overlaps is known per pixel."""
    counter = iter(range(100))

    def dense(windows):  # window i gets feature value (i+1) * e0 everywhere
        values = torch.tensor([next(counter) + 1.0 for _ in range(len(windows))])
        out = torch.zeros(len(windows), windows.shape[-2] // 16, windows.shape[-1] // 16, 2)
        out[..., 0] = values[:, None, None]
        return out

    image = torch.zeros(3, 224, 336)  # windows at left 0 and 112 (two), with the middle third shared
    got = window_logits(dense, image, torch.tensor([[1.0, 0.0]]), 224, 112, batch_size=1)
    assert torch.allclose(got[0, :, :112], torch.tensor(1.0))
    assert torch.allclose(got[0, :, 112:224], torch.tensor(1.5))
    assert torch.allclose(got[0, :, 224:], torch.tensor(2.0))


# --- 4. metrics and data checks -----------------------------------------------------------------------------------
def test_confusion_matrix_and_iou_by_hand():
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 1]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 0, 1]])
    cm = confusion_matrix(pred, target, 4)
    assert cm.tolist() == [[1, 1, 0, 0], [0, 3, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]]
    assert iou_from_confusion(cm) == [1 / 3, 3 / 4, 1 / 2, None]


def test_read_mask_checks(tmp_path):
    Image.fromarray(np.zeros((20, 30), np.uint8), "L").save(tmp_path / "ok.png")
    assert read_mask(tmp_path / "ok.png", (30, 20), 3).shape == (20, 30)
    with pytest.raises(CosmosError, match=r"mask is 30x20 but its image is 40x20"):
        read_mask(tmp_path / "ok.png", (40, 20), 3)
    Image.new("RGB", (30, 20)).save(tmp_path / "rgb.png")
    with pytest.raises(CosmosError, match="mode RGB; expected an 8-bit index PNG"):
        read_mask(tmp_path / "rgb.png", (30, 20), 3)
    bad = np.zeros((20, 30), np.uint8)
    bad[0, 0] = 7
    Image.fromarray(bad, "L").save(tmp_path / "bad.png")
    with pytest.raises(CosmosError, match="class index 7 but only 3 class names"):
        read_mask(tmp_path / "bad.png", (30, 20), 3)


def test_dataset_layouts_and_errors(tmp_path):
    voc = tmp_path / "voc"
    (voc / "JPEGImages").mkdir(parents=True)
    (voc / "SegmentationClass").mkdir()
    for stem in ("2007_000001", "2007_000002"):
        Image.new("RGB", (8, 8)).save(voc / "JPEGImages" / f"{stem}.jpg")
        Image.new("P", (8, 8)).save(voc / "SegmentationClass" / f"{stem}.png")
    assert [p.stem for p in read_segmentation_set(voc).images] == ["2007_000001", "2007_000002"]  # no split files
    with pytest.raises(CosmosError, match=r"val.txt: split file not found \(this folder has no split files\)"):
        read_segmentation_set(voc, split="val")
    (voc / "ImageSets" / "Segmentation").mkdir(parents=True)
    (voc / "ImageSets" / "Segmentation" / "val.txt").write_text("2007_000002\n")
    (voc / "ImageSets" / "Segmentation" / "train.txt").write_text("2007_000001\n")
    default = read_segmentation_set(voc)  # VOC's masks folder holds train and val: val by default
    assert [p.stem for p in default.images] == ["2007_000002"] and default.split == "val"
    assert [p.stem for p in read_segmentation_set(voc, split="train").images] == ["2007_000001"]
    assert read_segmentation_set(voc).classnames_file is None
    with pytest.raises(CosmosError, match=r"trainval.txt: split file not found \(splits present: train, val\)"):
        read_segmentation_set(voc, split="trainval")
    for split_file in (voc / "ImageSets" / "Segmentation").iterdir():  # without split files: every mask
        split_file.unlink()
    Image.new("P", (8, 8)).save(voc / "SegmentationClass" / "orphan.png")
    with pytest.raises(CosmosError, match="orphan.png: no image with the same name"):
        read_segmentation_set(voc)
    with pytest.raises(CosmosError, match="expected images/ \\+ masks/"):
        read_segmentation_set(tmp_path)
