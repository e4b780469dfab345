"""Zero-shot segmentation: the last-block variants against their formulas, the sliding windows, the upsampling,
a crafted scene with a known mask and mIoU, and the dataset / mask checks."""
from __future__ import annotations

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
    predict_mask,
    read_mask,
    read_segmentation_set,
    resized_shape,
    sliding_windows,
    window_logits,
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


def transcription(block, x: torch.Tensor, heads: int, method: str) -> torch.Tensor:
    """The formulas of SCLIP / ClearCLIP / MaskCLIP written out from the block's raw weights. x: [B, N, W]."""
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
    if method == "maskclip":
        return out_proj(v)
    raise AssertionError(method)


@pytest.mark.parametrize("method", ["plain", "csa", "clearclip", "maskclip"])
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
        x = transcription(visual.transformer.resblocks[-1], captured["x"], visual.heads, method)  # [B, 1+N, W]
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
        feats = {m: model.encode_dense(images, method=m) for m in ("plain", "csa", "clearclip", "maskclip")}
    names = list(feats)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert (feats[a] - feats[b]).abs().max() > 1e-3, (a, b)


def test_plain_dense_features_match_openclip_tokens(tmp_path):
    """`plain` dense features = OpenCLIP's patch tokens (after ln_post) @ proj, same weights."""
    open_clip = pytest.importorskip("open_clip")
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
                          dense=colour_features, image_size=224)
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
                          image_size=224)
    result = evaluate_segmentation(segmenter, dataset, ["red", "blue", "green"])
    assert result["per_class_iou"] == {"red": 0.5, "blue": 1.0, "green": 0.0}
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
                          background_index=0, dense=colour_features, image_size=224)
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
                          image_size=224)
    image = crafted_scene(3000, 2000)
    logits = segmenter.logits(image)
    assert logits.shape == (3, 336, 504)
    assert all(shape[0] <= 3 and shape[-2:] == (224, 224) for shape in calls)
    assert sum(shape[0] for shape in calls) == len(sliding_windows(336, 504, 224, 112))
    mask = segmenter(image)
    # The colour edge at x = 1500 falls inside a patch at the resized size (x = 252): a transition of a patch or so.
    assert mask.shape == (2000, 3000) and (mask[:, :1300] == 0).all() and (mask[:, 1700:] == 1).all()
    assert 1400 < int((mask[0] == 1).nonzero()[0]) < 1600


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
    (voc / "ImageSets" / "Segmentation").mkdir(parents=True)
    for stem in ("2007_000001", "2007_000002"):
        Image.new("RGB", (8, 8)).save(voc / "JPEGImages" / f"{stem}.jpg")
        Image.new("P", (8, 8)).save(voc / "SegmentationClass" / f"{stem}.png")
    (voc / "ImageSets" / "Segmentation" / "val.txt").write_text("2007_000002\n")
    assert [p.stem for p in read_segmentation_set(voc).images] == ["2007_000001", "2007_000002"]
    assert [p.stem for p in read_segmentation_set(voc, split="val").images] == ["2007_000002"]
    assert read_segmentation_set(voc).classnames_file is None
    with pytest.raises(CosmosError, match="split file not found"):
        read_segmentation_set(voc, split="train")
    Image.new("P", (8, 8)).save(voc / "SegmentationClass" / "orphan.png")
    with pytest.raises(CosmosError, match="orphan.png: no image with the same name"):
        read_segmentation_set(voc)
    with pytest.raises(CosmosError, match="expected images/ \\+ masks/"):
        read_segmentation_set(tmp_path)
