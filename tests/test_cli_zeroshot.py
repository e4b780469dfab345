"""CLI tests of `cosmos classify`, `cosmos segment` and `cosmos eval`: parity with OpenCLIP on a checkpoint OpenCLIP
saved, every image kind, and one-line errors for bad inputs."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

try:
    from cosmos_cli.main import app
except ImportError:  # not pip-installed yet: the cli/ folder is importable from the repository root
    from cli.main import app

open_clip = pytest.importorskip("open_clip")

runner = CliRunner()
LABELS = ["cat", "dog", "red car", "tree"]


def run(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def one_line_error(result) -> str:
    """The command failed with a single 'error: ...' line on stderr and no traceback."""
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output and result.exception is None or isinstance(result.exception, SystemExit)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """A natural-looking picture: smooth sky gradient, a textured ground, a few soft blobs, sensor noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.zeros((height, width, 3), np.float32)
    horizon = height * (0.45 + 0.1 * np.sin(x / width * 6.0))
    sky = y < horizon
    img[sky] = np.stack([110 + 60 * y / height, 160 + 40 * y / height, 235 - 20 * y / height], -1)[sky]
    grass = np.stack([60 + 30 * np.sin(x / 7) * np.cos(y / 5), 120 + 40 * np.sin(y / 11), 40 + 0 * x], -1)
    img[~sky] = grass[~sky]
    for _ in range(4):
        cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(height / 10, height / 4)
        blob = np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * r * r))[..., None]
        img = img * (1 - blob) + rng.uniform(0, 255, 3) * blob
    img += rng.normal(0, 6, img.shape)
    return Image.fromarray(img.clip(0, 255).astype(np.uint8))


# --- a small CLIP built and saved by OpenCLIP ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def openclip_ckpt(tmp_path_factory):
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(0)
    model = CLIP(
        embed_dim=64,
        vision_cfg=CLIPVisionCfg(layers=2, width=128, patch_size=16, image_size=64, head_width=64),
        text_cfg=CLIPTextCfg(context_length=77, vocab_size=49408, width=128, heads=2, layers=2),
    ).eval()
    with torch.no_grad():  # spread the random weights so the zero-shot probabilities are far from uniform
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        model.logit_scale.fill_(np.log(100.0))
    path = tmp_path_factory.mktemp("openclip") / "openclip_small.pt"
    torch.save(model.state_dict(), path)
    return model, path


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """One file of every kind the command must read, plus a reference RGB version of the EXIF one."""
    root = tmp_path_factory.mktemp("images")
    base = photo(96, 72, seed=1)
    files = {}
    base.save(root / "photo.jpg", quality=92)
    files["jpeg"] = root / "photo.jpg"
    photo(80, 80, seed=2).save(root / "photo.png")
    files["png"] = root / "photo.png"
    photo(70, 90, seed=3).save(root / "photo.webp", lossless=True)
    files["webp"] = root / "photo.webp"
    photo(64, 64, seed=4).convert("L").save(root / "gray.png")
    files["gray"] = root / "gray.png"
    rgba = photo(64, 80, seed=5).convert("RGBA")
    rgba.putalpha(Image.fromarray(np.tile(np.linspace(0, 255, 64, dtype=np.uint8), (80, 1))))
    rgba.save(root / "rgba.png")
    files["rgba"] = root / "rgba.png"
    photo(90, 60, seed=6).quantize(colors=32).save(root / "palette.png")
    files["palette"] = root / "palette.png"
    # EXIF orientation 6 (rotate 90 deg clockwise to display): store the picture rotated the other way.
    upright = photo(60, 100, seed=7)
    exif = Image.Exif()
    exif[0x0112] = 6
    upright.transpose(Image.Transpose.ROTATE_90).save(root / "exif.jpg", exif=exif.tobytes(), quality=95)
    files["exif"] = root / "exif.jpg"
    # Reference: the EXIF file decoded and turned upright by hand, stored losslessly.
    with Image.open(root / "exif.jpg") as raw:
        raw.convert("RGB").transpose(Image.Transpose.ROTATE_270).save(root / "exif_reference.png")
    files["exif_reference"] = root / "exif_reference.png"
    return files


def openclip_probs(model, paths, labels, templates) -> np.ndarray:
    """OpenCLIP's own zero-shot probabilities: its transform, tokenizer, classifier builder and logit scale."""
    from open_clip.zero_shot_classifier import build_zero_shot_classifier

    preprocess = open_clip.image_transform(64, is_train=False)
    tokenizer = open_clip.get_tokenizer("ViT-B-16")
    with torch.no_grad():
        classifier = build_zero_shot_classifier(model, tokenizer, labels, templates, num_classes_per_batch=None)
        batch = torch.stack([preprocess(Image.open(p)) for p in paths])
        features = model.encode_image(batch, normalize=True)
        return (model.logit_scale.exp() * features @ classifier).softmax(dim=-1).numpy()


@pytest.mark.slow
def test_classify_matches_openclip_probabilities(openclip_ckpt, images):
    model, ckpt = openclip_ckpt
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    paths = [images["jpeg"], images["png"], images["webp"]]
    result = run("classify", *paths, "--labels", ",".join(LABELS), "--weights", ckpt, "--json", "--top", len(LABELS))
    assert result.exit_code == 0, result.output
    ours = json.loads(result.stdout)
    reference = openclip_probs(model, paths, LABELS, OPENAI_IMAGENET_TEMPLATES)
    assert [entry["image"] for entry in ours] == [str(p) for p in paths]
    for entry, ref in zip(ours, reference):
        probs = [e["prob"] for e in entry["labels"]]
        assert probs == sorted(probs, reverse=True)
        got = {e["label"]: e["prob"] for e in entry["labels"]}
        assert max(abs(got[label] - ref[i]) for i, label in enumerate(LABELS)) <= 1e-4
    assert reference.max() - reference.min() > 0.05  # the check above compares informative probabilities


def test_classify_custom_and_simple_templates_match_openclip(openclip_ckpt, images):
    model, ckpt = openclip_ckpt
    from open_clip.zero_shot_metadata import SIMPLE_IMAGENET_TEMPLATES

    for option, templates in (("a drawing of a {}.", ["a drawing of a {}."]), ("simple", SIMPLE_IMAGENET_TEMPLATES)):
        result = run("classify", images["png"], "-l", ",".join(LABELS), "-w", ckpt, "--json", "--templates", option,
                     "--top", len(LABELS))
        assert result.exit_code == 0, result.output
        got = {e["label"]: e["prob"] for e in json.loads(result.stdout)[0]["labels"]}
        ref = openclip_probs(model, [images["png"]], LABELS, templates)[0]
        assert max(abs(got[label] - ref[i]) for i, label in enumerate(LABELS)) <= 1e-4


def test_classify_reads_every_image_kind(openclip_ckpt, images):
    _, ckpt = openclip_ckpt
    kinds = ["jpeg", "png", "webp", "gray", "rgba", "palette", "exif", "exif_reference"]
    result = run("classify", *(images[k] for k in kinds), "-l", "cat,dog,tree", "-w", ckpt, "--json",
                 "-t", "a photo of a {}.")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert len(out) == len(kinds)
    for entry in out:
        assert abs(sum(e["prob"] for e in entry["labels"]) - 1) < 1e-5
    by_kind = {k: {e["label"]: e["prob"] for e in entry["labels"]} for k, entry in zip(kinds, out)}
    # The EXIF-rotated JPEG is classified upright: exactly as its hand-rotated copy.
    for label in ("cat", "dog", "tree"):
        assert by_kind["exif"][label] == pytest.approx(by_kind["exif_reference"][label], abs=1e-6)


def test_classify_table_output_sorted_and_top_k(openclip_ckpt, images):
    _, ckpt = openclip_ckpt
    result = run("classify", images["png"], "-l", ",".join(LABELS), "-w", ckpt, "--top", 2, "-t", "a {}")
    assert result.exit_code == 0, result.output
    rows = [line for line in result.stdout.splitlines() if any(f" {label} " in line for label in LABELS)]
    assert len(rows) == 2
    values = [float(row.split()[-2]) for row in rows]
    assert values == sorted(values, reverse=True)


def test_classify_bad_file_does_not_stop_the_others(openclip_ckpt, images, tmp_path):
    _, ckpt = openclip_ckpt
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    missing = tmp_path / "missing.jpg"
    result = run("classify", images["png"], text, missing, images["jpeg"], "-l", "cat,dog", "-w", ckpt, "--json")
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    out = json.loads(result.stdout)
    assert [e["image"] for e in out] == [str(images["png"]), str(images["jpeg"])]
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert errors == [f"error: {text}: not an image (unknown format)", f"error: {missing}: no such file"]


@pytest.mark.parametrize("labels", ["", ",,", " , ;"])
def test_classify_empty_label_list(openclip_ckpt, images, labels):
    _, ckpt = openclip_ckpt
    line = one_line_error(run("classify", images["png"], "--labels", labels, "-w", ckpt))
    assert "--labels: no class names" in line


def test_classify_text_file_as_weights(images, tmp_path):
    weights = tmp_path / "weights.pt"
    weights.write_text("this is not a checkpoint\n")
    line = one_line_error(run("classify", images["png"], "-l", "cat,dog", "-w", weights))
    assert str(weights) in line and "not a readable PyTorch checkpoint" in line


def test_classify_missing_weights_and_bad_template(images, tmp_path):
    line = one_line_error(run("classify", images["png"], "-l", "cat", "-w", tmp_path / "nope.pt"))
    assert "nope.pt" in line
    line = one_line_error(run("classify", images["png"], "-l", "cat", "-t", "a photo of a cat"))
    assert "no '{}' placeholder" in line
    line = one_line_error(run("classify", images["png"], "-l", "cat", "--precision", "fp8"))
    assert "--precision" in line


def test_classify_without_labels_uses_checkpoint_labels_or_asks(openclip_ckpt, images, tmp_path):
    from cosmos.checkpoint import load, save

    _, ckpt = openclip_ckpt
    line = one_line_error(run("classify", images["png"], "-w", ckpt))
    assert "--labels" in line
    model, _, _ = load(ckpt)
    labelled = tmp_path / "labelled.pt"
    save(labelled, model, labels=["cat", "dog;puppy"])
    result = run("classify", images["png"], "-w", labelled, "--json", "-t", "a {}")
    assert result.exit_code == 0, result.output
    assert sorted(e["label"] for e in json.loads(result.stdout)[0]["labels"]) == ["cat", "dog;puppy"]


# --- cosmos segment ------------------------------------------------------------------------------------------------
def test_segment_writes_mask_and_overlay(openclip_ckpt, tmp_path):
    _, ckpt = openclip_ckpt
    picture = tmp_path / "scene.png"
    photo(150, 100, seed=9).save(picture)
    out = tmp_path / "out"
    result = run("segment", picture, "-l", "sky,grass;lawn,tree", "-w", ckpt, "--out", out, "--json",
                 "-t", "a photo of a {}.", "--method", "maskclip", "--bg-threshold", "0.5")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)[0]
    mask = np.asarray(Image.open(out / "scene_mask.png"))
    assert mask.shape == (100, 150) and Image.open(out / "scene_mask.png").mode == "P"
    assert Image.open(out / "scene_overlay.png").size[0] == 150
    shares = {c["label"]: c["share"] for c in report["classes"]}
    assert abs(sum(shares.values()) - 1) < 1e-9
    counts = np.bincount(mask.ravel(), minlength=4)
    titles = ["background", "sky", "grass;lawn", "tree"]
    for index, title in enumerate(titles):
        assert shares.get(title, 0.0) == pytest.approx(counts[index] / mask.size)


def test_segment_errors(openclip_ckpt, tmp_path):
    _, ckpt = openclip_ckpt
    picture = tmp_path / "scene.png"
    photo(80, 80).save(picture)
    assert "carries no class names" in one_line_error(run("segment", picture, "-w", ckpt, "--out", tmp_path))
    assert "--labels: no class names" in one_line_error(run("segment", picture, "-l", ",", "-w", ckpt))
    assert "--method" in one_line_error(run("segment", picture, "-l", "a", "-w", ckpt, "--method", "nope"))
    broken = tmp_path / "broken.png"
    broken.write_bytes(Image.new("RGB", (4, 4)).tobytes()[:7])
    result = run("segment", broken, picture, "-l", "a,b", "-w", ckpt, "--out", tmp_path / "o", "-t", "{}")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"error: {broken}: not an image" in result.stderr
    assert (tmp_path / "o" / "scene_mask.png").is_file()


@pytest.mark.slow
def test_segment_large_photo_with_vit_b16(tmp_path):
    """`cosmos segment` on a 1024x768 photo with a (random) ViT-B/16 finishes on a CPU and writes its PNGs."""
    from cosmos.checkpoint import save
    from cosmos.model.cosmos import CosmosModel, get_config

    config = get_config("ViT-B-16")
    config.cosmos = False
    torch.manual_seed(0)
    ckpt = save(tmp_path / "vitb16.pt", CosmosModel(config), labels=["sky", "grass", "tree", "road"])
    picture = tmp_path / "photo.jpg"
    photo(1024, 768, seed=3).save(picture, quality=90)
    result = run("segment", picture, "-w", ckpt, "--out", tmp_path / "out", "-t", "simple")
    assert result.exit_code == 0, result.output
    mask = Image.open(tmp_path / "out" / "photo_mask.png")
    assert mask.size == (1024, 768)
    assert np.asarray(mask).max() < 4
    assert Image.open(tmp_path / "out" / "photo_overlay.png").size[0] == 1024


# --- cosmos eval ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """A tiny stand-in for `cosmos synth` output, in its layout (eval sets only)."""
    root = tmp_path_factory.mktemp("synth")
    ev = root / "eval"
    rng = np.random.default_rng(0)
    for kind, names in (("classify_shape", ["circle", "square"]), ("classify_colour", ["red", "blue", "green"])):
        for name in names:
            (ev / kind / name).mkdir(parents=True)
            for i in range(2):
                Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(ev / kind / name / f"{i}.png")
    (ev / "retrieval" / "images").mkdir(parents=True)
    ann = {"images": [], "annotations": []}
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(ev / "retrieval" / "images" / f"{i}.png")
        ann["images"].append({"id": i, "file_name": f"{i}.png"})
        for j in range(2):
            ann["annotations"].append({"id": 2 * i + j, "image_id": i, "caption": f"caption {j} of image {i}"})
    (ev / "retrieval" / "captions.json").write_text(json.dumps(ann))
    for kind, names in (("segment_shape", ["circle", "square"]), ("segment_colour", ["red", "blue"])):
        (ev / kind / "images").mkdir(parents=True)
        (ev / kind / "masks").mkdir(parents=True)
        (ev / kind / "classnames.txt").write_text("\n".join(["background", *names]) + "\n")
        for i in range(2):
            Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(ev / kind / "images" / f"{i}.png")
            mask = np.zeros((64, 64), np.uint8)
            mask[10:30, 10:30], mask[40:60, 40:60], mask[0, :] = 1, 2, 255
            Image.fromarray(mask, "L").save(ev / kind / "masks" / f"{i}.png")
    return root


def test_eval_commands_on_synthetic_layout(openclip_ckpt, synthetic, tmp_path):
    _, ckpt = openclip_ckpt
    for task, sets, key in (("classification", ["classify_shape", "classify_colour"], "top1"),
                            ("retrieval", ["retrieval"], "i2t_R@1"),
                            ("segmentation", ["segment_shape", "segment_colour"], "mIoU")):
        out = tmp_path / f"{task}.json"
        result = run("eval", task, "--synthetic", synthetic, "-w", ckpt, "--out", out, "--batch-size", 3)
        assert result.exit_code == 0, result.output
        results = json.loads(out.read_text())["results"]
        assert sorted(results) == sorted(sets)
        for name in sets:
            assert 0.0 <= results[name][key] <= 1.0
    classification = json.loads((tmp_path / "classification.json").read_text())["results"]
    assert classification["classify_colour"]["templates"] == "synth-colour"
    assert classification["classify_shape"]["images"] == 4
    retrieval = json.loads((tmp_path / "retrieval.json").read_text())["results"]["retrieval"]
    assert (retrieval["images"], retrieval["captions"]) == (4, 8)
    assert retrieval["i2t_R@10"] == 1.0 and retrieval["t2i_R@10"] == 1.0  # 8 captions, 4 images: always in top 10


def test_eval_errors(openclip_ckpt, synthetic, tmp_path):
    _, ckpt = openclip_ckpt
    assert "exactly one of --data and --synthetic" in one_line_error(run("eval", "classification", "-w", ckpt))
    assert "not found" in one_line_error(run("eval", "retrieval", "--synthetic", tmp_path, "-w", ckpt))
    # Segmentation data without class names.
    data = tmp_path / "seg"
    (data / "images").mkdir(parents=True)
    (data / "masks").mkdir()
    Image.new("RGB", (64, 48)).save(data / "images" / "a.png")
    Image.new("L", (64, 48)).save(data / "masks" / "a.png")
    assert "no class names" in one_line_error(run("eval", "segmentation", "--data", data, "-w", ckpt))
    # A mask whose size differs from its image.
    (data / "classnames.txt").write_text("background\ncat\n")
    Image.new("L", (32, 48)).save(data / "masks" / "a.png")
    line = one_line_error(run("eval", "segmentation", "--data", data, "-w", ckpt, "-t", "{}"))
    assert "mask is 32x48 but its image is 64x48" in line
    # An unreadable image in an eval set.
    Image.new("L", (64, 48)).save(data / "masks" / "a.png")
    (data / "images" / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    line = one_line_error(run("eval", "segmentation", "--data", data, "-w", ckpt, "-t", "{}"))
    assert "images/a.png: not an image" in line
    # An empty class-name file.
    names = tmp_path / "names.txt"
    names.write_text("\n\n")
    line = one_line_error(run("eval", "classification", "--data", synthetic / "eval" / "classify_shape",
                              "--classnames", names, "-w", ckpt))
    assert "no class names" in line
