"""`cosmos preprocess`: sentence splitting, folder and table sources, bad-sample triage and the manifest,
read-back with the `webdataset` library, and the CLI's one-line errors."""
from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image
from typer.testing import CliRunner

from cosmos.data.preprocess import preprocess, split_sentences
from cosmos.data.shards import expand_sources, iter_samples
from cosmos.errors import CosmosError

try:
    from cosmos_cli.main import app
except ImportError:  # not installed yet: the package lives in cli/
    import importlib
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    app = importlib.import_module("cli.main").app


# --- helpers: images that are good and images that are bad in each way ------------------------------------------


def gradient(w: int, h: int, seed: int) -> Image.Image:
    """A smooth image (survives JPEG re-encoding nearly unchanged), different per seed."""
    y, x = np.mgrid[0:h, 0:w]
    r = (x * 255 // max(1, w - 1)).astype(np.uint8)
    g = (y * 255 // max(1, h - 1)).astype(np.uint8)
    b = np.full_like(r, (seed * 37) % 256)
    return Image.fromarray(np.stack([r, g, b], axis=-1))  # [h, w, 3]


def encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt)
    return buf.getvalue()


def truncated_jpeg() -> bytes:
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    data = encode(Image.fromarray(noise), "JPEG")
    return data[: int(len(data) * 0.6)]


def bomb_png() -> bytes:
    """A PNG header claiming 20000 x 20000 pixels: Pillow refuses it as a decompression bomb on open."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", 20000, 20000, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + chunk(b"IEND", b"")


GOOD = {  # name -> (size, raw caption, json sidecar captions or None)
    "cat": ((300, 200), "A cat on a mat. It sleeps.", None),
    "dog": ((120, 90), "A dog</s>running fast\n\nin the park", None),
    "bird": ((64, 400), "A bird", {"long": ["A small bird sits on a wire. The sky is grey", "Wires cross"],
                                   "short": ["A bird on a wire"]}),
    "tree": ((256, 256), "A tall tree.", None),
}


def expected_captions(name: str) -> dict[str, list[str]]:
    _, raw, fields = GOOD[name]
    out = {"raw": split_sentences(raw)}
    for field, items in (fields or {}).items():
        out[field] = [s for item in items for s in split_sentences(item)]
    return out


def make_folder(root: Path, bad: bool = True) -> dict[str, str]:
    """The good samples, plus (bad=True) one planted bad sample of each kind; returns name -> expected kind."""
    root.mkdir(parents=True, exist_ok=True)
    for i, (name, (size, raw, fields)) in enumerate(GOOD.items()):
        (root / f"{name}.png").write_bytes(encode(gradient(*size, seed=i)))
        (root / f"{name}.txt").write_text(raw, encoding="utf-8")
        if fields:
            (root / f"{name}.json").write_text(json.dumps({"captions": fields, "source_id": i}), encoding="utf-8")
    if not bad:
        return {}
    ok_image = encode(gradient(40, 30, seed=9))
    planted = {
        "unreadable": ("unreadable", b"this is not an image at all", "a caption"),
        "truncated": ("corrupt-image", truncated_jpeg(), "a caption"),
        "zero": ("empty-file", b"", "a caption"),
        "bomb": ("decompression-bomb", bomb_png(), "a caption"),
        "emptycap": ("empty-caption", ok_image, " . \n </s> "),
        "latin1": ("caption-not-utf8", ok_image, "caf\xe9".encode("latin-1")),
    }
    for name, (_, data, caption) in planted.items():
        suffix = ".png" if name == "bomb" else ".jpg"
        (root / f"{name}{suffix}").write_bytes(data)
        (root / f"{name}.txt").write_bytes(caption if isinstance(caption, bytes) else caption.encode())
    (root / "orphan.txt").write_text("a caption whose image is missing", encoding="utf-8")
    (root / "stringfield.png").write_bytes(ok_image)
    (root / "stringfield.json").write_text(json.dumps({"captions": {"long": "A dog. A cat."}}), encoding="utf-8")
    kinds = {name: kind for name, (kind, _, _) in planted.items()}
    kinds.update({"orphan": "missing-file", "stringfield": "caption-format"})
    return kinds


def read_back_with_webdataset(out: Path) -> dict[str, dict]:
    samples = {}
    for s in wds.WebDataset(expand_sources(str(out)), shardshuffle=False, empty_check=False).decode("pil"):
        samples[s["__key__"]] = s
    return samples


# --- sentences --------------------------------------------------------------------------------------------------


def test_split_sentences_like_the_release():
    assert split_sentences("A dog. It runs.\nGrass</s>Sky") == ["A dog", "It runs", "Grass", "Sky"]
    assert split_sentences("  one  ..  \n\n two ") == ["one", "two"]
    assert split_sentences(" . \n </s> ") == []


# --- folder sources ---------------------------------------------------------------------------------------------


def test_folder_with_one_bad_sample_of_each_kind(tmp_path):
    kinds = make_folder(tmp_path / "src")
    result = preprocess(tmp_path / "src", tmp_path / "out", max_size=64, workers=2, shard_size=3,
                        command="cosmos preprocess src --out out")
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())

    # Every bad sample is listed with its kind and a reason naming its file.
    skipped = {Path(s["source"]).stem: s for s in manifest["skipped"]}
    assert {name: s["kind"] for name, s in skipped.items()} == kinds
    for name, s in skipped.items():
        assert name in s["reason"]
    assert "is a string, not a list of sentences" in skipped["stringfield"]["reason"]
    assert "not UTF-8" in skipped["latin1"]["reason"]
    assert "decompression bomb" in skipped["bomb"]["reason"]
    assert manifest["counts"] == {"total": len(GOOD) + len(kinds), "written": len(GOOD), "skipped": len(kinds),
                                  "skipped_by_kind": {k: list(kinds.values()).count(k) for k in sorted(set(kinds.values()))}}
    assert manifest["command"] == "cosmos preprocess src --out out"
    assert result.written == len(GOOD)
    sizes = json.loads((tmp_path / "out" / "sizes.json").read_text())
    assert sizes == {s["name"]: s["count"] for s in manifest["shards"]} and sum(sizes.values()) == len(GOOD)
    assert not list((tmp_path / "out").glob("*.tmp"))

    # Every good sample is intact, read by the webdataset library: images decode, shrunk, captions equal.
    samples = read_back_with_webdataset(tmp_path / "out")
    assert len(samples) == len(GOOD)
    by_source = {s["json"]["source"]: s for s in samples.values()}
    for i, name in enumerate(GOOD):
        s = by_source[f"{name}.png"]
        assert s["json"]["captions"] == expected_captions(name)
        assert s["txt"] == GOOD[name][1].strip()
        w, h = GOOD[name][0]
        assert min(s["jpg"].size) == min(64, w, h)
        assert abs(s["jpg"].size[0] / s["jpg"].size[1] - w / h) < 0.05
        original = np.asarray(gradient(w, h, seed=i).resize(s["jpg"].size, Image.BICUBIC), dtype=np.float32)
        assert np.abs(np.asarray(s["jpg"], dtype=np.float32) - original).mean() < 4.0
    # Keys: zero-padded source index, sortable, unique.
    assert all(len(k) == 9 and k.isdigit() for k in samples)


def test_keys_are_stable_and_json_meta_is_kept(tmp_path):
    make_folder(tmp_path / "src", bad=False)
    preprocess(tmp_path / "src", tmp_path / "a", workers=1)
    preprocess(tmp_path / "src", tmp_path / "b", workers=2)
    a = {s["__key__"]: (s["image"], s["captions"], s["meta"]) for s in iter_samples(str(tmp_path / "a"))}
    b = {s["__key__"]: (s["image"], s["captions"], s["meta"]) for s in iter_samples(str(tmp_path / "b"))}
    assert a == b and sorted(a) == [f"{i:09d}" for i in range(len(GOOD))]
    bird = next(v for v in a.values() if v[2]["source"] == "bird.png")
    assert bird[2]["source_id"] == 2
    assert (tmp_path / "a" / "00000.tar").read_bytes() == (tmp_path / "b" / "00000.tar").read_bytes()


# --- table sources ----------------------------------------------------------------------------------------------


def test_csv_with_several_caption_columns(tmp_path):
    (tmp_path / "img").mkdir()
    for i in range(3):
        (tmp_path / "img" / f"{i}.png").write_bytes(encode(gradient(50, 40, seed=i)))
    rows = ["filepath,title,long_caption",
            'img/0.png,A red ball,"A red ball on grass. Sunny day"',
            "img/1.png,A blue cube,",
            "img/9.png,missing image,nothing",
            'img/2.png,"",""']
    (tmp_path / "data.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    result = preprocess(tmp_path / "data.csv", tmp_path / "out", caption_columns=["title", "long_caption"],
                        workers=1)
    assert result.written == 2
    assert [(s["kind"], Path(s["source"]).name) for s in result.skipped] == [("missing-file", "9.png"),
                                                                             ("empty-caption", "2.png")]
    samples = {s["__key__"]: s for s in iter_samples(str(tmp_path / "out"))}
    assert samples["000000000"]["captions"] == {"title": ["A red ball"], "long_caption": ["A red ball on grass",
                                                                                         "Sunny day"]}
    assert samples["000000001"]["captions"] == {"title": ["A blue cube"]}
    with pytest.raises(CosmosError, match="no column 'caption'; the columns are filepath, title, long_caption"):
        preprocess(tmp_path / "data.csv", tmp_path / "out2", caption_columns=["caption"])


def test_tsv_and_jsonl_with_a_non_utf8_row(tmp_path):
    (tmp_path / "a.png").write_bytes(encode(gradient(30, 30, seed=1)))
    (tmp_path / "b.png").write_bytes(encode(gradient(30, 30, seed=2)))
    (tmp_path / "data.tsv").write_bytes(b"path\tcap\na.png\tfirst. second\nb.png\tcaf\xe9\n")
    result = preprocess(tmp_path / "data.tsv", tmp_path / "tsv", image_column="path", caption_columns=["cap"],
                        workers=1)
    assert result.written == 1 and [s["kind"] for s in result.skipped] == ["caption-not-utf8"]

    lines = [json.dumps({"image": "a.png", "caps": ["one. two", "three"]}).encode(),
             b'{"image": "b.png", "caps": "caf\xe9"}',
             json.dumps({"image": "b.png", "caps": "plain text. more"}).encode()]
    (tmp_path / "data.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    result = preprocess(tmp_path / "data.jsonl", tmp_path / "jsonl", image_column="image", caption_columns=["caps"],
                        workers=1)
    assert result.written == 2 and [s["kind"] for s in result.skipped] == ["caption-not-utf8"]
    captions = [s["captions"] for s in iter_samples(str(tmp_path / "jsonl"))]
    assert captions == [{"caps": ["one", "two", "three"]}, {"caps": ["plain text", "more"]}]


# --- output folder rules ----------------------------------------------------------------------------------------


def test_non_empty_out_is_refused_unless_overwrite(tmp_path):
    make_folder(tmp_path / "src", bad=False)
    out = tmp_path / "out"
    out.mkdir()
    (out / "99999.tar").write_bytes(b"stale")
    (out / "notes.md").write_text("mine")
    with pytest.raises(CosmosError, match="output folder is not empty; pass --overwrite"):
        preprocess(tmp_path / "src", out, workers=1)
    preprocess(tmp_path / "src", out, workers=1, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["00000.tar", "manifest.json", "notes.md", "sizes.json"]


def test_all_bad_is_an_error_with_a_manifest(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "x.jpg").write_bytes(b"")
    (tmp_path / "src" / "x.txt").write_text("caption")
    with pytest.raises(CosmosError, match="no good samples, all 1 were skipped"):
        preprocess(tmp_path / "src", tmp_path / "out", workers=1)
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["counts"]["skipped"] == 1


# --- CLI ----------------------------------------------------------------------------------------------------------

runner = CliRunner()


def one_line_error(result) -> str:
    text = (result.stderr if result.stderr_bytes is not None else result.output).strip()
    assert result.exit_code != 0
    assert len(text.splitlines()) == 1, text
    return text


def test_cli_missing_src(tmp_path):
    result = runner.invoke(app, ["preprocess", str(tmp_path / "nope"), "--out", str(tmp_path / "out")])
    assert one_line_error(result) == f"error: {tmp_path / 'nope'}: no such file or folder; pass a folder of images " \
                                     "with .txt/.json captions, or a .csv/.tsv/.jsonl file"


def test_cli_non_empty_out_without_overwrite(tmp_path):
    make_folder(tmp_path / "src", bad=False)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("x")
    result = runner.invoke(app, ["preprocess", str(tmp_path / "src"), "--out", str(tmp_path / "out")])
    assert "output folder is not empty; pass --overwrite" in one_line_error(result)


def test_cli_writes_shards_and_prints_a_summary(tmp_path):
    make_folder(tmp_path / "src", bad=False)
    (tmp_path / "src" / "zero.jpg").write_bytes(b"")
    (tmp_path / "src" / "zero.txt").write_text("caption")
    result = runner.invoke(app, ["preprocess", str(tmp_path / "src"), "--out", str(tmp_path / "out"),
                                 "--workers", "1", "--max-size", "32"])
    assert result.exit_code == 0, result.output
    assert "written" in result.output and "skipped: empty-file" in result.output
    assert len(list(iter_samples(str(tmp_path / "out")))) == len(GOOD)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["settings"]["max_size"] == 32 and manifest["command"].startswith("cosmos")
