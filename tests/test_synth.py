"""Synthetic scenes: masks agree with what the captions say (parsed back from the text), and `cosmos synth`
writes shards that the webdataset library reads, eval sets in the contract's layout, deterministically."""
from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

import cosmos.data.synth as synth_module
from cosmos.data.synth import (COLOURS, POSITIONS, SHAPES, Scene, SceneObject, default_workers, make_captions,
                                 make_scene, scene_rng, write_synth)
from cosmos.errors import CosmosError

from cosmos_cli.main import app

COLOUR_NAMES = list(COLOURS)
SIZE_SYNONYMS = {"small": "small", "little": "small", "tiny": "small", "large": "large", "big": "large"}


# --- parsing a long caption back ---------------------------------------------------------------------------------


def _words(sentence: str, vocabulary) -> list[str]:
    return [w for w in vocabulary if re.search(rf"\b{w}\b", sentence.lower())]


def parse_object_sentence(sentence: str) -> dict | None:
    """What one long-caption sentence says about an object; None for a sentence naming no shape (the scene)."""
    text = sentence.lower().replace("centre", "center")
    shapes = _words(text, SHAPES)
    if not shapes:
        return None
    colours = _words(text, COLOURS)
    positions = [p for p in POSITIONS if p in text]
    sizes = {SIZE_SYNONYMS[w] for w in _words(text, SIZE_SYNONYMS)}
    assert len(shapes) == 1 and len(colours) == 1 and len(positions) == 1 and len(sizes) == 1, sentence
    return {"shape": shapes[0], "colour": colours[0], "position": positions[0], "size": sizes.pop()}


def cell_slices(position: str, size: int) -> tuple[slice, slice]:
    row, col = divmod(POSITIONS.index(position), 3)
    rows = slice(int(np.ceil(row * size / 3)), int(np.ceil((row + 1) * size / 3)))
    cols = slice(int(np.ceil(col * size / 3)), int(np.ceil((col + 1) * size / 3)))
    return rows, cols


def check_scene_against_its_captions(scene, size: int) -> None:
    shape_mask, colour_mask = scene.shape_mask, scene.colour_mask
    pixels = np.asarray(scene.image)
    assert shape_mask.shape == colour_mask.shape == (size, size) and pixels.shape == (size, size, 3)
    assert ((shape_mask > 0) == (colour_mask > 0)).all()

    long = scene.captions["long"]
    assert all("." not in s and s.strip() == s and s for s in long)  # pre-split sentences
    named = [p for p in map(parse_object_sentence, long) if p is not None]
    assert len(long) == len(named) + 1  # one sentence per object plus one about the scene
    assert 1 <= len(named) <= 4
    assert len({p["position"] for p in named}) == len(named)

    covered = np.zeros_like(shape_mask, dtype=bool)
    ranks = {}  # (colour, shape) -> (is large, pixel count): how the alt-text picks its object
    for obj in named:
        rows, cols = cell_slices(obj["position"], size)
        cell_shape, cell_colour = shape_mask[rows, cols], colour_mask[rows, cols]
        inside = cell_shape > 0
        # The named object has pixels of its shape class and colour class in the named cell, and nothing else
        # is there (objects do not overlap).
        assert inside.sum() > 0, (obj, long)
        assert (cell_shape[inside] == SHAPES.index(obj["shape"]) + 1).all(), (obj, long)
        assert (cell_colour[inside] == COLOUR_NAMES.index(obj["colour"]) + 1).all(), (obj, long)
        # The image shows exactly that colour on exactly those pixels.
        assert (pixels[rows, cols][inside] == COLOURS[obj["colour"]]).all()
        covered[rows, cols] |= inside
        rank = (obj["size"] == "large", int(inside.sum()))
        ranks[(obj["colour"], obj["shape"])] = max(ranks.get((obj["colour"], obj["shape"]), rank), rank)
        # Sizes, as drawn: a small object spans at most half a cell (+2 px of rasterization), a large one at
        # least 0.648 of a cell (-1 px), so the two never meet.
        width = np.nonzero(inside.any(axis=0))[0]
        extent = width.max() - width.min() + 1
        if obj["size"] == "large":
            assert extent >= 0.648 * size / 3 - 1, (obj, extent)
        else:
            assert extent <= 0.5 * size / 3 + 2, (obj, extent)
    # No object pixel outside the objects the caption names.
    assert covered.sum() == (shape_mask > 0).sum()
    # Background pixels never take an object colour.
    background = pixels[shape_mask == 0]
    for rgb in COLOURS.values():
        assert not (background == rgb).all(axis=1).any()

    # raw: alt-text naming the largest object (a large one if the long caption calls any object large, then the
    # most pixels); short: one sentence.
    (raw,) = scene.captions["raw"]
    raw_shape, raw_colour = _words(raw, SHAPES), _words(raw, COLOURS)
    assert len(raw_shape) == 1 and len(raw_colour) == 1
    assert ranks[(raw_colour[0], raw_shape[0])] == max(ranks.values())
    (short,) = scene.captions["short"]
    assert "." not in short and short


@pytest.mark.parametrize("size", [64, 128])
def test_masks_agree_with_the_long_captions(size):
    seen_shapes, seen_colours, seen_positions, seen_backgrounds = set(), set(), set(), set()
    for i in range(150):
        scene = make_scene(scene_rng(0, "train", i), size)
        check_scene_against_its_captions(scene, size)
        seen_shapes |= {o.shape for o in scene.objects}
        seen_colours |= {o.colour for o in scene.objects}
        seen_positions |= {o.position for o in scene.objects}
        seen_backgrounds.add((scene.background, scene.texture))
    assert seen_shapes == set(SHAPES) and seen_colours == set(COLOURS) and seen_positions == set(POSITIONS)
    assert len(seen_backgrounds) == 16


def test_raw_caption_names_a_large_object_over_a_bigger_small_one():
    """A small square can hold more pixels than a large star (the star is thin); the alt-text names the object
    the other captions call large."""
    objects = [SceneObject("square", "blue", "small", "center", (25, 25, 36, 36), 110),
               SceneObject("star", "red", "large", "top left", (2, 2, 19, 19), 99)]
    scene = Scene(Image.new("RGB", (64, 64)), np.zeros((64, 64), np.uint8), np.zeros((64, 64), np.uint8), objects,
                  "grey", "plain")
    for seed in range(30):
        (raw,) = make_captions(scene_rng(seed, "x", 0), scene)["raw"]
        assert _words(raw, SHAPES) == ["star"] and _words(raw, COLOURS) == ["red"], raw
    objects[1].size = "small"  # both small: the most pixels wins
    assert _words(make_captions(scene_rng(0, "x", 0), scene)["raw"][0], SHAPES) == ["square"]


def test_articles_before_vowels_in_every_field():
    """"an orange ...", never "a orange ..." (templates such as "stock image of a {colour} {shape}" included)."""
    oranges = 0
    for i in range(400):
        captions = make_scene(scene_rng(2, "train", i), 48).captions
        for sentence in [s for field in captions.values() for s in field]:
            assert not re.search(r"\b[Aa] [aeiouAEIOU]", sentence), sentence
            oranges += bool(re.search(r"\b[Aa]n orange", sentence))
    assert oranges > 20  # the rule was exercised


def test_captions_vary_in_wording():
    sentences = set()
    for i in range(200):
        sentences |= set(make_scene(scene_rng(1, "train", i), 64).captions["long"])
    openings = {" ".join(s.split()[:2]) for s in sentences}
    assert len(openings) >= 8


def test_make_scene_is_deterministic_and_honours_fixed_choices():
    a, b = make_scene(scene_rng(4, "train", 9), 96), make_scene(scene_rng(4, "train", 9), 96)
    assert a.captions == b.captions and np.array_equal(np.asarray(a.image), np.asarray(b.image))
    assert np.array_equal(a.shape_mask, b.shape_mask)
    c = make_scene(scene_rng(4, "train", 10), 96)
    assert a.captions != c.captions
    single = make_scene(scene_rng(0, "x", 0), 64, n_objects=1, shape="heart", colour="cyan")
    assert [(o.shape, o.colour) for o in single.objects] == [("heart", "cyan")]
    with pytest.raises(CosmosError, match="unknown shape 'blob'"):
        make_scene(scene_rng(0, "x", 0), 64, shape="blob")
    with pytest.raises(CosmosError, match="too small"):
        make_scene(scene_rng(0, "x", 0), 16)


# --- the command -------------------------------------------------------------------------------------------------

runner = CliRunner()
N, N_EVAL = 23, 9


def synth(out: Path, seed: int = 0, *extra: str):
    return runner.invoke(app, ["synth", "--out", str(out), "--n", str(N), "--n-eval", str(N_EVAL),
                               "--seed", str(seed), "--size", "64", "--maxcount", "10", *extra])


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "data"
    result = synth(out, 0, "--workers", "2")
    assert result.exit_code == 0, result.output
    return out


def all_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_shards_read_back_with_webdataset(written):
    import webdataset as wds

    shards = sorted(str(p) for p in (written / "train").glob("*.tar"))
    assert [Path(s).name for s in shards] == ["00000.tar", "00001.tar", "00002.tar"]
    assert json.loads((written / "train" / "sizes.json").read_text()) == {
        "00000.tar": 10, "00001.tar": 10, "00002.tar": 3}
    assert (written / "train" / "manifest.json").is_file()
    samples = list(wds.WebDataset(shards, shardshuffle=False, empty_check=False))
    assert len(samples) == N
    for i, sample in enumerate(samples):
        scene = make_scene(scene_rng(0, "train", i), 64)  # what the generator made for this index
        record = json.loads(sample["json"])
        assert sample["__key__"] == f"{i:08d}" == record["key"]
        assert record["captions"] == scene.captions
        assert sample["txt"].decode() == scene.raw_caption
        assert [o["shape"] for o in record["objects"]] == [o.shape for o in scene.objects]
        image = Image.open(io.BytesIO(sample["png"]))
        assert image.mode == "RGB" and np.array_equal(np.asarray(image), np.asarray(scene.image))


def test_eval_sets_have_the_contract_layout(written):
    ev = written / "eval"
    assert sorted(p.name for p in ev.iterdir()) == ["classify_colour", "classify_shape", "retrieval",
                                                     "segment_colour", "segment_shape"]
    for name, classes, attr in (("classify_shape", SHAPES, "shape"), ("classify_colour", COLOUR_NAMES, "colour")):
        assert sorted(p.name for p in (ev / name).iterdir()) == sorted(classes)
        files = sorted((ev / name).rglob("*.png"))
        assert len(files) == N_EVAL
        for path in files:
            index = int(path.stem)
            assert path.name == f"{index:06d}.png"
            scene_class = classes[index % len(classes)]  # classes are balanced by index
            assert path.parent.name == scene_class
            image = Image.open(path)
            assert image.size == (64, 64) and image.mode == "RGB"
            pixels = np.asarray(image).reshape(-1, 3)
            if attr == "colour":  # a single object of the folder's colour is in the image
                assert (pixels == COLOURS[scene_class]).all(axis=1).sum() > 0

    coco = json.loads((ev / "retrieval" / "captions.json").read_text())
    assert set(coco) == {"images", "annotations"}
    assert len(coco["images"]) == N_EVAL and len(coco["annotations"]) == N_EVAL
    ids = {img["id"] for img in coco["images"]}
    for img in coco["images"]:
        assert isinstance(img["id"], int) and (ev / "retrieval" / "images" / img["file_name"]).is_file()
    for ann in coco["annotations"]:
        assert isinstance(ann["id"], int) and ann["image_id"] in ids
        sentences = [s for s in ann["caption"].split(".") if s.strip()]
        assert sum(parse_object_sentence(s.strip()) is not None for s in sentences) == len(sentences) - 1

    for kind, classes in (("shape", SHAPES), ("colour", COLOUR_NAMES)):
        folder = ev / f"segment_{kind}"
        assert (folder / "classnames.txt").read_text().splitlines() == ["background", *classes]
        images, masks = sorted((folder / "images").glob("*.png")), sorted((folder / "masks").glob("*.png"))
        assert [p.name for p in images] == [p.name for p in masks] and len(images) == N_EVAL
        for image_path, mask_path in zip(images, masks):
            mask = Image.open(mask_path)
            assert mask.mode == "L" and mask.size == (64, 64)
            values = np.asarray(mask)
            assert values.max() <= len(classes) and values.max() > 0
            pixels = np.asarray(Image.open(image_path))
            if kind == "colour":  # each labelled pixel shows its class colour
                for k in np.unique(values[values > 0]):
                    assert (pixels[values == k] == COLOURS[classes[k - 1]]).all()
    assert all_files(ev / "segment_shape" / "images") == all_files(ev / "segment_colour" / "images")

    settings = json.loads((written / "synth.json").read_text())
    assert settings["seed"] == 0 and settings["n"] == N and settings["size"] == 64
    assert settings["shapes"] == list(SHAPES) and settings["colours"] == COLOUR_NAMES


def test_eval_scenes_are_not_training_scenes(written):
    train = {make_scene(scene_rng(0, "train", i), 64).long_caption for i in range(N)}
    coco = json.loads((written / "eval" / "retrieval" / "captions.json").read_text())
    assert not train & {a["caption"] for a in coco["annotations"]}


def _pixels(data: bytes) -> bytes:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).tobytes()


def test_classify_and_segment_scenes_are_their_own_streams(written):
    """Each classification / segmentation image is the scene of its own stream's generator (seed, stream, index),
    and no eval image is a training image."""
    import webdataset as wds

    train = {_pixels(s["png"]) for s in wds.WebDataset(sorted(str(p) for p in (written / "train").glob("*.tar")),
                                                     shardshuffle=False, empty_check=False)}
    assert len(train) == N
    ev = written / "eval"
    checked = 0
    for stream, folder in (("classify_shape", ev / "classify_shape"), ("classify_colour", ev / "classify_colour"),
                           ("segment", ev / "segment_shape" / "images"), ("segment", ev / "segment_colour" / "images")):
        files = sorted(folder.rglob("*.png"))
        assert len(files) == N_EVAL
        for path in files:
            index = int(path.stem)
            if stream == "classify_shape":
                scene = make_scene(scene_rng(0, stream, index), 64, n_objects=1, shape=path.parent.name)
            elif stream == "classify_colour":
                scene = make_scene(scene_rng(0, stream, index), 64, n_objects=1, colour=path.parent.name)
            else:
                scene = make_scene(scene_rng(0, stream, index), 64)
            pixels = _pixels(path.read_bytes())
            assert pixels == np.asarray(scene.image).tobytes(), path
            assert pixels not in train, path
            checked += 1
    assert checked == 4 * N_EVAL


def test_same_seed_same_bytes_any_worker_count_and_different_seed_differs(written, tmp_path):
    assert synth(tmp_path / "again", 0, "--workers", "1").exit_code == 0
    first, again = all_files(written), all_files(tmp_path / "again")
    assert first.keys() == again.keys() and first == again
    assert synth(tmp_path / "other", 1, "--workers", "1").exit_code == 0
    other = all_files(tmp_path / "other")
    assert other["train/00000.tar"] != first["train/00000.tar"]
    assert other["eval/retrieval/captions.json"] != first["eval/retrieval/captions.json"]


def test_refuses_a_non_empty_directory_without_overwrite(written, tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    result = synth(out, 0)
    assert result.exit_code == 2
    assert "directory is not empty; pass --overwrite" in result.output
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    result = synth(out, 0, "--overwrite", "--workers", "1")
    assert result.exit_code == 0, result.output
    assert (out / "notes.txt").read_text() == "mine"  # only the generator's own outputs are replaced
    assert all_files(out / "train") == all_files(written / "train")


@pytest.mark.parametrize(
    "args, message",
    [
        (["--size", "16"], "--size 16: scenes need at least 32 px"),
        (["--format", "gif"], "image format 'gif' is not supported; use one of png, jpg"),
        (["--maxcount", "0"], "--maxcount 0: each shard needs room for at least 1 sample"),
        (["--n", "0"], "--n 0: the training set needs at least 1 scene"),
        (["--n-eval", "-1"], "--n-eval -1: must be >= 0 (0 writes no evaluation sets)"),
        (["--workers", "-1"], "--workers -1: must be >= 0 (0 = one per CPU core)"),
    ],
)
def test_bad_options_give_one_line_errors_and_write_nothing(tmp_path, args, message):
    """A bad option is refused before the disk is touched, so the same --out works on the rerun."""
    for out in (tmp_path / "x", tmp_path / "empty"):
        if out.name == "empty":
            out.mkdir()
        result = synth(out, 0, *args)
        assert result.exit_code == 2
        assert message in result.output
        assert "Traceback" not in result.output
        assert not out.exists() if out.name == "x" else not any(out.iterdir())
    result = synth(tmp_path / "x", 0, "--workers", "1", "--n-eval", "0")
    assert result.exit_code == 0, result.output


def test_a_failed_run_removes_what_it_wrote(tmp_path, monkeypatch):
    render = synth_module._render

    def failing(job):
        if job.stream == "retrieval" and job.index == 2:
            raise CosmosError("disk full (simulated)")
        return render(job)

    monkeypatch.setattr(synth_module, "_render", failing)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    for out, overwrite in ((tmp_path / "new", False), (busy, True)):
        with pytest.raises(CosmosError, match="disk full"):
            write_synth(out, n=5, size=48, n_eval=3, maxcount=2, workers=1, overwrite=overwrite)
    assert not (tmp_path / "new").exists()
    assert sorted(p.name for p in busy.iterdir()) == ["notes.txt"]
    monkeypatch.setattr(synth_module, "_render", render)
    write_synth(tmp_path / "new", n=5, size=48, n_eval=3, maxcount=2, workers=1)  # the rerun is not refused
    assert (tmp_path / "new" / "synth.json").is_file()


def test_default_worker_count_follows_the_cpu_affinity(tmp_path, monkeypatch):
    monkeypatch.setattr(synth_module.os, "cpu_count", lambda: 64)
    monkeypatch.setattr(synth_module.os, "sched_getaffinity", lambda pid: {0, 3, 5}, raising=False)
    assert default_workers() == 3
    used = []
    rendered = synth_module._rendered
    monkeypatch.setattr(synth_module, "_rendered", lambda jobs, workers: used.append(workers) or rendered(jobs, 1))
    write_synth(tmp_path / "a", n=2, size=48, n_eval=0)
    write_synth(tmp_path / "b", n=2, size=48, n_eval=0, workers=0)
    write_synth(tmp_path / "c", n=2, size=48, n_eval=0, workers=2)
    assert used == [3, 3, 2]
    monkeypatch.delattr(synth_module.os, "sched_getaffinity")  # platforms without it (macOS, Windows)
    assert default_workers() == 64


def test_no_eval_sets_when_n_eval_is_zero(tmp_path):
    result = synth(tmp_path / "d", 0, "--n-eval", "0", "--workers", "1")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["synth.json", "train"]
    settings = json.loads((tmp_path / "d" / "synth.json").read_text())
    assert settings["n_eval"] == 0 and settings["streams"] == ["train"]


def test_jpeg_and_masks_options(tmp_path):
    import webdataset as wds

    result = synth(tmp_path / "j", 3, "--format", "jpg", "--masks", "--workers", "1", "--n-eval", "0")
    assert result.exit_code == 0, result.output
    samples = list(wds.WebDataset(sorted(str(p) for p in (tmp_path / "j" / "train").glob("*.tar")),
                                  shardshuffle=False, empty_check=False))
    assert len(samples) == N
    scene = make_scene(scene_rng(3, "train", 0), 64)
    assert Image.open(io.BytesIO(samples[0]["jpg"])).format == "JPEG"
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(samples[0]["shape.png"]))), scene.shape_mask)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(samples[0]["colour.png"]))), scene.colour_mask)
