"""`cosmos embed`, `cosmos search`, `cosmos export` on small local data, the published dense variants' presets, the
segmentation benchmark presets with SCLIP's area threshold, and float64 metrics."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from typer.testing import CliRunner

from tests.helpers import one_line_error

import cosmos
from cosmos.model.cosmos import CosmosConfig, CosmosModel, TextConfig, VisionConfig

try:
    from cosmos_cli import main as cli_main
except ImportError:
    from cli import main as cli_main

runner = CliRunner()
SMALL = CosmosConfig(embed_dim=64, vision=VisionConfig(image_size=32, patch_size=8, width=128, layers=2, heads=2),
                     text=TextConfig(width=64, layers=2, heads=1), cross_pool_heads=1)


def run(*args):
    return runner.invoke(cli_main.app, [str(a) for a in args])




@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    a = CosmosModel(SMALL)
    with torch.no_grad():
        for p in a.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    cosmos.save(root / "a.pt", a)
    torch.manual_seed(1)
    cosmos.save(root / "b.pt", CosmosModel(SMALL))
    return root / "a.pt", root / "b.pt"


@pytest.fixture()
def photos(tmp_path):
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    colours = {"red.png": (220, 20, 20), "green.png": (20, 220, 20), "sub/blue.jpg": (20, 20, 220)}
    for name, rgb in colours.items():
        image = Image.new("RGB", (48, 40), rgb)
        image.paste((255, 255, 255), (10, 10, 20, 20))
        image.save(folder / name)
    (folder / "broken.png").write_bytes(b"not an image at all")
    return folder


def test_embed_a_folder_then_only_what_is_new(models, photos, tmp_path):
    a, _ = models
    out = tmp_path / "emb"
    result = run("embed", photos, "--out", out, "--weights", a, "--device", "cpu", "--workers", 0)
    assert result.exit_code == 0, result.output
    assert "skipped:" in result.stderr and "broken.png" in result.stderr  # listed, never fatal
    matrix = np.load(out / "embeddings.npy")
    rows = [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines()]
    meta = json.loads((out / "meta.json").read_text())
    assert matrix.shape == (3, 64) and matrix.dtype == np.float16
    assert np.allclose(np.linalg.norm(matrix.astype(np.float32), axis=1), 1, atol=2e-3)
    assert sorted(r["path"].split("photos/")[1] for r in rows) == ["green.png", "red.png", "sub/blue.jpg"]
    assert all(r["width"] == 48 and r["height"] == 40 for r in rows)
    for key in ("model", "weights", "which", "precision", "device", "dim", "count", "command"):
        assert key in meta, key
    assert meta["count"] == 3 and meta["dim"] == 64 and len(meta["skipped"]) == 1
    # the rows are the model's embeddings of the files
    model, preprocess, _ = cosmos.load(a, device="cpu")
    red = next(i for i, r in enumerate(rows) if r["path"].endswith("red.png"))
    with torch.no_grad():
        ref = model.encode_image(preprocess(cosmos.open_image(photos / "red.png"))[None], normalize=True)[0]
    assert np.allclose(matrix[red].astype(np.float32), ref.numpy(), atol=2e-3)
    # again, with one new file and one gone: only the new one is embedded, the gone one is dropped with a message
    Image.new("RGB", (30, 30), (200, 200, 0)).save(photos / "yellow.png")
    (photos / "green.png").unlink()
    result = run("embed", photos, "--out", out, "--weights", a, "--device", "cpu", "--workers", 0)
    assert result.exit_code == 0, result.output
    assert "1 new, 2 kept" in result.stdout and "dropped 1 row" in result.stderr and "green.png" in result.stderr
    rows = [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines()]
    assert sorted(r["path"].rsplit("/", 1)[1] for r in rows) == ["blue.jpg", "red.png", "yellow.png"]
    assert np.load(out / "embeddings.npy").shape == (3, 64)


def test_embedding_more_keeps_earlier_rows_and_search_works_from_anywhere(models, photos, tmp_path, monkeypatch):
    a, _ = models
    out = tmp_path / "emb"
    monkeypatch.chdir(a.parent)  # a relative --weights path
    assert run("embed", photos / "sub", "--out", out, "--weights", a.name, "--device", "cpu", "--workers", 0,
               "--quick-gelu").exit_code == 0
    more = tmp_path / "more"
    more.mkdir()
    Image.new("RGB", (30, 30), (250, 250, 0)).save(more / "yellow.png")
    result = run("embed", more, "--out", out, "--weights", a.name, "--device", "cpu", "--workers", 0, "--quick-gelu")
    assert result.exit_code == 0, result.output
    assert "1 new, 1 kept" in result.stdout and "dropped" not in result.stderr  # blue.jpg stays: its file exists
    rows = [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines()]
    assert sorted(r["path"].rsplit("/", 1)[1] for r in rows) == ["blue.jpg", "yellow.png"]
    meta = json.loads((out / "meta.json").read_text())
    assert meta["weights"] == str(a.resolve()) and meta["quick_gelu"] is True
    # search from another folder: the recorded absolute path and the QuickGELU flag encode the query as embedded
    monkeypatch.chdir(tmp_path)
    result = run("search", out, "--image", more / "yellow.png", "--top", 1, "--json", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)[0]["item"].endswith("yellow.png")
    # the weights file replaced by another model: named as changed, not "use the file you used"
    cosmos.save(a.parent / "c.pt", CosmosModel(SMALL))
    (a.parent / "c.pt").replace(tmp_path / "a-moved.pt")
    import shutil

    shutil.copy(a, tmp_path / "a-backup.pt")
    try:
        shutil.copy(tmp_path / "a-moved.pt", a)
        assert "have changed since" in one_line_error(run("search", out, "--text", "x", "--device", "cpu"))
    finally:
        shutil.copy(tmp_path / "a-backup.pt", a)


def test_embed_texts_search_and_sheet(models, photos, tmp_path):
    a, b = models
    texts = tmp_path / "captions.txt"
    texts.write_text("a red square\n\na green field\n  \na blue sky\n", encoding="utf-8")
    out = tmp_path / "texts"
    result = run("embed", "--texts", texts, "--out", out, "--weights", a, "--dtype", "float32", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert np.load(out / "embeddings.npy").dtype == np.float32
    result = run("search", out, "--text", "a blue sky", "--top", 2, "--json", "--device", "cpu")
    assert result.exit_code == 0, result.output
    hits = json.loads(result.stdout)
    assert [h["rank"] for h in hits] == [1, 2] and hits[0]["item"] == "a blue sky"
    assert hits[0]["score"] == pytest.approx(1.0, abs=1e-4) and hits[0]["score"] >= hits[1]["score"]
    assert "a blue sky" in run("search", out, "--text", "a blue sky", "--device", "cpu").stdout  # the table
    # image collection: an image query and a contact sheet
    images = tmp_path / "emb"
    assert run("embed", photos, "--out", images, "--weights", a, "--device", "cpu", "--workers", 0).exit_code == 0
    sheet = tmp_path / "hits.png"
    result = run("search", images, "--image", photos / "red.png", "--top", 3, "--json", "--sheet", sheet,
                 "--device", "cpu")
    assert result.exit_code == 0, result.output
    hits = json.loads(result.stdout)
    assert hits[0]["item"].endswith("red.png") and hits[0]["score"] == pytest.approx(1.0, abs=1e-2)
    assert Image.open(sheet).size[0] > 0
    # a query encoded by another model is refused, naming both
    line = one_line_error(run("search", images, "--text", "red", "--weights", b, "--device", "cpu"))
    assert str(a) in line and str(b) in line


def test_embed_and_search_bad_inputs(models, photos, tmp_path):
    a, b = models
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "out"
    assert "no image files" in one_line_error(run("embed", empty, "--out", out, "--weights", a))
    assert not out.exists()
    blank = tmp_path / "blank.txt"
    blank.write_text("\n   \n\n")
    assert "only blank lines" in one_line_error(run("embed", "--texts", blank, "--out", out, "--weights", a))
    only_broken = tmp_path / "broken"
    only_broken.mkdir()
    (only_broken / "x.png").write_bytes(b"nope")
    assert "unreadable" in one_line_error(run("embed", only_broken, "--out", out, "--weights", a, "--workers", 0))
    assert not (out / "meta.json").exists()
    emb = tmp_path / "emb"
    assert run("embed", photos, "--out", emb, "--weights", a, "--device", "cpu", "--workers", 0).exit_code == 0
    before = (emb / "embeddings.npy").read_bytes()
    line = one_line_error(run("embed", photos, "--out", emb, "--weights", b, "--device", "cpu", "--workers", 0))
    assert "made with another model" in line and str(a) in line and str(b) in line
    assert (emb / "embeddings.npy").read_bytes() == before  # nothing lost
    assert "--top must be at least 1" in one_line_error(run("search", emb, "--text", "red", "--top", 0))
    assert "not an embedding folder" in one_line_error(run("search", empty, "--text", "red"))
    assert "one query" in one_line_error(run("search", emb))


def test_export_round_trips(models, tmp_path):
    a, _ = models
    out = tmp_path / "openclip.pt"
    result = run("export", a, "--out", out, "--format", "openclip")
    assert result.exit_code == 0, result.output
    kwargs = json.loads(next(line for line in result.stdout.splitlines() if line.startswith("{")))
    assert "QuickGELU: no" in result.stdout
    quick = kwargs.pop("quick_gelu")
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    ref = CLIP(embed_dim=kwargs["embed_dim"], vision_cfg=CLIPVisionCfg(**kwargs["vision_cfg"]),
               text_cfg=CLIPTextCfg(**kwargs["text_cfg"]), quick_gelu=quick).eval()
    ref.load_state_dict(torch.load(out, weights_only=True), strict=True)
    ours, _, tok = cosmos.load(a, device="cpu")
    images, text = torch.randn(2, 3, 32, 32), tok(["a red star", "two blue squares"])
    with torch.no_grad():
        assert torch.allclose(ref.encode_image(images), ours.encode_image(images), atol=1e-5)
        assert torch.allclose(ref.encode_text(text), ours.encode_text(text), atol=1e-5)
    # a ViT-B-16 is named by its OpenCLIP name
    from cosmos.checkpoint import openclip_name

    assert openclip_name(cosmos.get_config("ViT-B-16")) == "ViT-B-16"
    # the released COSMOS layout
    released = tmp_path / "released.pt"
    assert run("export", a, "--out", released, "--format", "cosmos").exit_code == 0
    obj = torch.load(released, weights_only=True)
    assert set(obj) == {"epoch", "student", "teacher"} and len(obj["teacher"]) == len(obj["student"])
    assert obj["epoch"] == 0  # completed epochs (the official code resumes from it), never a step count
    for which in ("student", "teacher"):
        back, _, _ = cosmos.load(released, device="cpu", which=which)
        with torch.no_grad():
            assert torch.allclose(back.encode_image(images), ours.encode_image(images), atol=1e-6)
    # tiny models (conv stem) cannot go to OpenCLIP: one line
    tiny = tmp_path / "tiny.pt"
    cosmos.save(tiny, CosmosModel("tiny"))
    assert "convolutional stem" in one_line_error(run("export", tiny, "--out", tmp_path / "x.pt"))


def test_area_threshold_as_sclip_does_it():
    from cosmos.zeroshot.classify import ClassEmbeddings
    from cosmos.zeroshot.segment import predict_mask

    torch.manual_seed(0)
    q, h, w = 4, 12, 12
    logits = torch.randn(q, h, w) * 0.005
    logits[3, :, :6] += 0.3  # class 3 on the left half, class 1 on the right half
    logits[1, :, 6:] += 0.3
    logits[2, :2, :2] += 1.0  # class 2 wins only 4 of the 144 pixels
    classifier = ClassEmbeddings(torch.zeros(q, 8), torch.arange(q), q, [["a"], ["b"], ["c"], ["d"]])
    got = predict_mask(logits, classifier, (h, w), logit_scale=40, bg_threshold=0.1, background_index=0,
                       area_threshold=0.1)
    # SCLIP's postprocess, transcribed: softmax, drop small non-background classes, argmax, probability threshold
    probs = (logits * 40).softmax(0)
    area = F.one_hot(probs.argmax(0), q)[:, :, 1:].sum((0, 1))
    keep = (area > 0.1 * area.sum()).float()
    probs[1:] *= keep[:, None, None]
    expected = probs.argmax(0)
    expected[probs.max(0).values < 0.1] = 0
    assert torch.equal(got, expected) and not (got == 2).any()
    plain = predict_mask(logits, classifier, (h, w), logit_scale=40)
    assert (plain == 2).sum() >= 4  # the threshold is what removed it


def test_benchmark_presets_and_class_lists():
    from cli.segment import segmenter_options
    from cosmos.zeroshot.benchmarks import BENCHMARKS, classnames_source
    from cosmos.zeroshot.templates import read_classnames

    for name, bench in BENCHMARKS.items():
        classes = read_classnames(classnames_source(name))
        assert len(classes) == bench.classes, name
    voc = read_classnames(classnames_source("voc21"))
    assert "sky" in voc[0] and "wall" in voc[0] and voc[15][0] == "person" and "person in shirt" in voc[15]
    assert read_classnames(classnames_source("context60"))[0] == ["background"]
    config = segmenter_options("csa", None, None, None, None, None, 16, "fp32", benchmark="voc21")
    assert (config.logit_scale, config.bg_threshold, config.area_threshold) == (65.0, 0.1, 0.1)
    assert segmenter_options("csa", None, None, None, 30.0, None, 16, "fp32", benchmark="voc21").logit_scale == 30.0
    city = segmenter_options("csa", None, None, None, None, None, 16, "fp32", benchmark="cityscapes")
    assert city.sizes(224, 16)[0] == 560 and city.logit_scale == 40.0 and city.bg_threshold is None


def test_metrics_are_float64():
    from cosmos.zeroshot.classify import per_class_accuracy, topk_accuracy

    targets = torch.zeros(100, dtype=torch.long)
    scores = torch.zeros(100, 2)
    scores[:21, 0] = 1.0  # 21 of 100 right
    scores[21:, 1] = 1.0
    top = topk_accuracy(scores, targets, (1,))[1]
    assert top == 0.21 and json.dumps(top) == "0.21"
    assert per_class_accuracy(scores, targets, 2)[0] == 0.21
