"""CLI tests of `cosmos classify`, `cosmos segment` and `cosmos eval`: parity with OpenCLIP on a checkpoint OpenCLIP
saved, every image kind, and one-line errors for bad inputs."""
from __future__ import annotations

import importlib
import json

import numpy as np
import open_clip  # a declared test dependency: the parity reference
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from tests.helpers import one_line_error

try:
    from cosmos_cli import main as cli_main
except ImportError:  # not pip-installed yet: the cli/ folder is importable from the repository root
    from cli import main as cli_main

app = cli_main.app
runner = CliRunner()
CPU_FP32 = ("--device", "cpu", "--precision", "fp32")  # parity runs must not depend on the machine
LABELS = ["cat", "dog", "red car", "tree"]


def run(*args: str):
    return runner.invoke(app, [str(a) for a in args])




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
    result = run("classify", *paths, "--labels", ",".join(LABELS), "--weights", ckpt, "--json", *CPU_FP32)
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
                     *CPU_FP32)
        assert result.exit_code == 0, result.output
        got = {e["label"]: e["prob"] for e in json.loads(result.stdout)[0]["labels"]}
        ref = openclip_probs(model, [images["png"]], LABELS, templates)[0]
        assert max(abs(got[label] - ref[i]) for i, label in enumerate(LABELS)) <= 1e-4


def test_classify_reads_every_image_kind(openclip_ckpt, images):
    _, ckpt = openclip_ckpt
    kinds = ["jpeg", "png", "webp", "gray", "rgba", "palette", "exif", "exif_reference"]
    result = run("classify", *(images[k] for k in kinds), "-l", "cat,dog,tree", "-w", ckpt, "--json",
                 "-t", "a photo of a {}.", *CPU_FP32)
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


def test_classify_json_lists_every_label_unless_top_is_given(openclip_ckpt, images):
    _, ckpt = openclip_ckpt
    labels = ["cat", "dog", "car", "tree", "bird", "boat", "house"]
    common = ("-l", ",".join(labels), "-w", ckpt, "-t", "a {}", *CPU_FP32)
    result = run("classify", images["png"], "--json", *common)
    assert sorted(e["label"] for e in json.loads(result.stdout)[0]["labels"]) == sorted(labels)
    result = run("classify", images["png"], "--json", "--top", 2, *common)
    assert len(json.loads(result.stdout)[0]["labels"]) == 2
    result = run("classify", images["png"], *common)  # a table: the 5 most likely
    assert len([line for line in result.stdout.splitlines() if any(f" {label} " in line for label in labels)]) == 5


def test_classify_streams_images_one_batch_at_a_time(openclip_ckpt, images, monkeypatch):
    """Images are opened and preprocessed per batch, just before that batch runs: memory does not grow with the
    number of images."""
    _, ckpt = openclip_ckpt
    module = importlib.import_module(f"{cli_main.__package__}.classify")
    load_model, log = module.load_model, []

    def spy_load(*args, **kwargs):
        model, preprocess, tokenizer = load_model(*args, **kwargs)
        model.visual.register_forward_pre_hook(lambda m, a: log.append(f"forward {len(a[0])}"))

        def counting(image):
            log.append("preprocess")
            return preprocess(image)

        return model, counting, tokenizer

    monkeypatch.setattr(module, "load_model", spy_load)
    kinds = ["jpeg", "png", "webp", "gray", "rgba", "palette", "exif"]
    result = run("classify", *(images[k] for k in kinds), "-l", "cat,dog", "-w", ckpt, "--json", "--batch-size", 3,
                 *CPU_FP32)
    assert result.exit_code == 0, result.output
    assert log == ["preprocess"] * 3 + ["forward 3"] + ["preprocess"] * 3 + ["forward 3"] + ["preprocess", "forward 1"]


def test_paths_that_look_like_markup_are_printed_as_they_are(openclip_ckpt, tmp_path, monkeypatch):
    """Rich markup characters in paths: no MarkupError traceback, no garbled names."""
    _, ckpt = openclip_ckpt
    monkeypatch.chdir(tmp_path)  # short relative paths: the table title does not wrap
    (tmp_path / "x[/tmp]").mkdir(parents=True)  # folders "x[" and "tmp]"
    photo(64, 64).save(tmp_path / "x[/tmp]" / "[b]img.png")
    picture, missing = "x[/tmp]/[b]img.png", "x[/tmp]/a.jpg"
    result = run("classify", picture, missing, "-l", "cat,[red]dog", "-w", ckpt, *CPU_FP32)
    assert result.exit_code == 1, result.output
    assert result.stderr.strip().splitlines() == [f"error: {missing}: no such file"]
    assert picture in result.stdout and "[red]dog" in result.stdout
    line = one_line_error(run("classify", picture, "-l", "cat", "-w", "x[/tmp]/w.pt"))
    assert line.startswith("error: x[/tmp]/w.pt: no such file")
    result = run("segment", picture, "-l", "a,[b]b", "-w", ckpt, "--out", "x[/tmp]/out", "-t", "{}", *CPU_FP32)
    assert result.exit_code == 0, result.output
    assert f"{picture}->x[/tmp]/out/[b]img_mask.png" in "".join(result.stdout.split())  # the title may wrap
    assert "wrote 1 mask and overlay to x[/tmp]/out/" in result.stdout


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
    assert str(weights) in line and "a text file, not a PyTorch checkpoint" in line


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


def test_segment_says_where_it_wrote(openclip_ckpt, tmp_path):
    _, ckpt = openclip_ckpt
    for name in ("a", "b"):
        photo(80, 60, seed=1).save(tmp_path / f"{name}.png")
    out = tmp_path / "out"
    result = run("segment", tmp_path / "a.png", tmp_path / "b.png", "-l", "sky,grass", "-w", ckpt, "--out", out,
                 "-t", "{}", *CPU_FP32)
    assert result.exit_code == 0, result.output
    assert f"wrote 2 masks and overlays to {out}/" in " ".join(result.stdout.split())
    result = run("segment", tmp_path / "a.png", "-l", "sky,grass", "-w", ckpt, "--out", out, "-t", "{}", "--json",
                 *CPU_FP32)
    assert json.loads(result.stdout)[0]["mask"] == str(out / "a_mask.png")  # stdout stays pure JSON
    assert f"wrote 1 mask and overlay to {out}/" in " ".join(result.stderr.split())


def test_segment_windows_and_patch_size(openclip_ckpt, tmp_path):
    """The small model has 16 px patches: a --window that is not a multiple is refused; an elongated image whose
    windows are clipped to a non-multiple of 16 is padded and segmented."""
    _, ckpt = openclip_ckpt
    picture = tmp_path / "strip.png"
    photo(400, 40, seed=2).save(picture)
    line = one_line_error(run("segment", picture, "-l", "sky,grass", "-w", ckpt, "--window", 30, "--out", tmp_path))
    assert line == "error: window 30 px (--window) is not a multiple of the model's 16 px patches; use 16 or 32"
    result = run("segment", picture, "-l", "sky,grass", "-w", ckpt, "--out", tmp_path / "out", "-t", "{}", *CPU_FP32)
    assert result.exit_code == 0, result.output
    assert Image.open(tmp_path / "out" / "strip_mask.png").size == (400, 40)


def test_write_errors_are_one_line(openclip_ckpt, tmp_path):
    """An OSError while writing (here: a folder where the mask file should go) names the file, no traceback."""
    _, ckpt = openclip_ckpt
    picture = tmp_path / "scene.png"
    photo(80, 60).save(picture)
    out = tmp_path / "out"
    (out / "scene_mask.png").mkdir(parents=True)
    line = one_line_error(run("segment", picture, "-l", "sky,grass", "-w", ckpt, "--out", out, "-t", "{}", *CPU_FP32))
    assert line == f"error: {out / 'scene_mask.png'}: Is a directory"


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
    from cosmos.device import resolve_precision

    _, ckpt = openclip_ckpt
    for task, sets, key in (("classification", ["classify_shape", "classify_colour"], "top1"),
                            ("retrieval", ["retrieval"], "i2t_R@1"),
                            ("segmentation", ["segment_shape", "segment_colour"], "mIoU")):
        out = tmp_path / f"{task}.json"
        result = run("eval", task, "--synthetic", synthetic, "-w", ckpt, "--out", out, "--batch-size", 3,
                     "--device", "cpu")
        assert result.exit_code == 0, result.output
        assert "per-class top-1" not in result.stdout and "per-class IoU" not in result.stdout  # only with --per-class
        written = json.loads(out.read_text())
        results = written["results"]
        assert sorted(results) == sorted(sets)
        for name in sets:
            assert 0.0 <= results[name][key] <= 1.0
        # The settings record what ran: the device and the precision "auto" resolved to on it.
        assert written["settings"]["device"] == "cpu"
        assert written["settings"]["precision"] == resolve_precision("cpu", "auto") != "auto"
    classification = json.loads((tmp_path / "classification.json").read_text())["results"]
    assert classification["classify_colour"]["templates"] == "synth-colour"
    assert classification["classify_shape"]["images"] == 4
    assert classification["classify_shape"]["top5"] is None  # 2 classes: top-5 would be trivially 100%
    assert [c["class"] for c in classification["classify_colour"]["per_class"]] == ["blue", "green", "red"]
    segmentation = json.loads((tmp_path / "segmentation.json").read_text())["results"]
    assert [c["class"] for c in segmentation["segment_shape"]["per_class_iou"]] == ["background", "circle", "square"]
    retrieval = json.loads((tmp_path / "retrieval.json").read_text())["results"]["retrieval"]
    assert (retrieval["images"], retrieval["captions"]) == (4, 8)
    # 8 captions, 4 images: R@10 is reached by any model, so it is None (the rule of top-5 with few classes)
    assert retrieval["i2t_R@10"] is None and retrieval["t2i_R@10"] is None


def test_eval_per_class_tables(openclip_ckpt, synthetic):
    _, ckpt = openclip_ckpt
    data = synthetic / "eval" / "classify_colour"
    result = run("eval", "classification", "--data", data, "-w", ckpt, "-t", "a {} .", "--per-class", *CPU_FP32)
    assert result.exit_code == 0, result.output
    assert "per-class top-1" in result.stdout
    cells = [[c.strip() for c in line.split("│")[1:-1]] for line in result.stdout.splitlines() if "│" in line]
    assert [row[:2] for row in cells if row[0] in ("0", "1", "2")] == [["0", "blue"], ["1", "green"], ["2", "red"]]
    result = run("eval", "segmentation", "--data", synthetic / "eval" / "segment_shape", "-w", ckpt, "-t", "{}",
                 "--per-class", *CPU_FP32)
    assert result.exit_code == 0, result.output
    assert "per-class IoU" in " ".join(result.stdout.split())


def test_eval_checks_inputs_before_loading_the_model(synthetic, tmp_path):
    """Wrong inputs are reported before the weights are read (here they do not even exist)."""
    weights = tmp_path / "never-read.pt"
    names = tmp_path / "names.txt"
    names.write_text("a\nb\n")
    for task in ("classification", "segmentation"):
        line = one_line_error(run("eval", task, "--synthetic", synthetic, "--classnames", names, "-w", weights))
        assert "--classnames applies to one --data set" in line
    imagenet = tmp_path / "imagenet"
    for wnid in ("n01440764", "n01443537"):
        (imagenet / wnid).mkdir(parents=True)
        photo(32, 32).save(imagenet / wnid / "0.png")
    line = one_line_error(run("eval", "classification", "--data", imagenet, "-w", weights))
    assert "class folders are WordNet ids (n01440764, n01443537, ...)" in line and "--classnames" in line


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
