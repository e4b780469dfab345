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

import cosmos.data.preprocess as preprocess_module
from cosmos.data.preprocess import preprocess, split_sentences
from cosmos.data.shards import expand_sources, iter_samples
from cosmos.errors import CosmosError, ImageDecodeError
from cosmos.images import decode_image


from cosmos_cli.main import app


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


def test_tsv_has_no_quoting_and_every_row_is_written_or_skipped(tmp_path):
    for name in "abcd":
        (tmp_path / f"{name}.png").write_bytes(encode(gradient(30, 30, seed=ord(name))))
    rows = ['a.png\tHe said "hi". Then left',        # quotes are ordinary characters in TSV
            '"b.png\tA "quoted" start',                 # a leading quote must not swallow the next lines
            "c.png\ttoo\tmany columns",                 # 3 columns: skipped, with the reason
            "d.png",                                     # 1 column: skipped
            "d.png\tThe last one"]
    (tmp_path / "data.tsv").write_text("path\tcap\n" + "\n".join(rows) + "\n", encoding="utf-8")
    result = preprocess(tmp_path / "data.tsv", tmp_path / "out", image_column="path", caption_columns=["cap"],
                        workers=1)
    assert result.total == len(rows) == result.written + len(result.skipped)
    kinds = [s["kind"] for s in result.skipped]
    assert kinds == ["missing-file", "bad-row", "bad-row"]  # '"b.png' is not a file: the quote stayed in the path
    assert '"b.png' in result.skipped[0]["reason"] and "line 4: 3 columns" in result.skipped[1]["reason"]
    assert "line 5: 1 columns, but the header has 2" in result.skipped[2]["reason"]
    samples = [s for s in iter_samples(str(tmp_path / "out"))]
    assert [s["captions"] for s in samples] == [{"cap": ['He said "hi"', "Then left"]}, {"cap": ["The last one"]}]
    assert [s["__key__"] for s in samples] == ["000000000", "000000004"]  # keys keep the row index


def test_malformed_csv_quoting_is_skipped_with_the_lines_it_spans(tmp_path):
    for i in range(4):
        (tmp_path / f"{i}.png").write_bytes(encode(gradient(30, 30, seed=i)))
    rows = ['0.png,"A caption, with a comma and ""quotes"""',
            '1.png,"multi-line\ncaption"',
            '2.png,"x"y',                                  # text after a closing quote
            "3.png,fine"]
    (tmp_path / "data.csv").write_text("filepath,title\n" + "\n".join(rows) + "\n", encoding="utf-8")
    result = preprocess(tmp_path / "data.csv", tmp_path / "out", workers=1)
    assert result.total == 4 == result.written + len(result.skipped)
    assert [s["kind"] for s in result.skipped] == ["bad-row"]
    assert "line 5: cannot be read as CSV (',' expected after '\"'); quote a field" in result.skipped[0]["reason"]
    captions = [s["captions"]["title"] for s in iter_samples(str(tmp_path / "out"))]
    assert captions == [['A caption, with a comma and "quotes"'], ["multi-line", "caption"], ["fine"]]


# --- one bad sample never stops the run ---------------------------------------------------------------------------


def test_text_that_is_not_utf8_inside_json_is_skipped(tmp_path):
    src = tmp_path / "src"
    make_folder(src, bad=False)
    (src / "sur.png").write_bytes(encode(gradient(30, 30, seed=5)))
    (src / "sur.json").write_text('{"captions": {"long": ["caf\\ud800 au lait"]}}', encoding="utf-8")
    (src / "meta.png").write_bytes(encode(gradient(30, 30, seed=6)))
    (src / "meta.txt").write_text("fine caption", encoding="utf-8")
    (src / "meta.json").write_text('{"note": "\\udce9"}', encoding="utf-8")
    result = preprocess(src, tmp_path / "out", workers=1)
    assert result.written == len(GOOD)
    assert sorted((Path(s["source"]).stem, s["kind"]) for s in result.skipped) == [("meta", "caption-not-utf8"),
                                                                                  ("sur", "caption-not-utf8")]
    assert all("not valid UTF-8" in s["reason"] for s in result.skipped)

    lines = [json.dumps({"image": "src/sur.png", "caps": "caf\ud800"}),
             json.dumps({"image": "src/cat.png", "caps": "ok"})]
    (tmp_path / "data.jsonl").write_text("\n".join(lines) + "\n", encoding="ascii")
    result = preprocess(tmp_path / "data.jsonl", tmp_path / "jsonl", image_column="image", caption_columns=["caps"],
                        workers=1)
    assert result.written == 1 and [s["kind"] for s in result.skipped] == ["caption-not-utf8"]


def test_an_image_wider_than_jpeg_allows_is_shrunk_to_fit(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    Image.new("RGB", (70000, 4), (200, 10, 10)).save(src / "wide.png")
    (src / "wide.txt").write_text("a very wide red line", encoding="utf-8")
    result = preprocess(src, tmp_path / "out", workers=1)
    assert result.written == 1 and result.skipped == []
    (sample,) = iter_samples(str(tmp_path / "out"))
    width, height = Image.open(io.BytesIO(sample["image"])).size
    assert width == 65500 and height == 4


def test_an_unexpected_error_in_one_sample_is_recorded_not_fatal(tmp_path, monkeypatch):
    make_folder(tmp_path / "src", bad=False)
    real = preprocess_module.read_image

    def flaky(path: str, max_size: int, quality: int) -> bytes:
        if Path(path).stem == "dog":
            raise RuntimeError("something nobody foresaw")
        return real(path, max_size, quality)

    monkeypatch.setattr(preprocess_module, "read_image", flaky)
    result = preprocess(tmp_path / "src", tmp_path / "out", workers=1)
    assert result.written == len(GOOD) - 1
    (skip,) = result.skipped
    assert skip["kind"] == "error"
    assert skip["reason"] == f"{tmp_path / 'src' / 'dog.png'}: something nobody foresaw (RuntimeError)"
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["counts"]["skipped_by_kind"] == {"error": 1}


def test_decode_errors_carry_a_kind(tmp_path):
    cases = {"empty": b"", "not-image": b"plain text", "bomb": bomb_png(), "corrupt": truncated_jpeg()}
    for kind, data in cases.items():
        with pytest.raises(ImageDecodeError) as e:
            decode_image(data, name="x.jpg")
        assert e.value.kind == kind and isinstance(e.value, CosmosError) and str(e.value).startswith("x.jpg: ")


def test_a_json_source_field_of_the_user_is_kept(tmp_path):
    src = tmp_path / "src"
    make_folder(src, bad=False)
    (src / "tree.json").write_text(json.dumps({"source": "flickr", "captions": {"short": ["A tree"]}}))
    preprocess(src, tmp_path / "out", workers=1)
    sources = sorted(s["meta"]["source"] for s in iter_samples(str(tmp_path / "out")))
    assert sources == ["bird.png", "cat.png", "dog.png", "flickr"]


# --- output folder rules ----------------------------------------------------------------------------------------


def test_out_inside_src_is_not_read_as_source(tmp_path):
    src = tmp_path / "src"
    make_folder(src, bad=False)
    first = preprocess(src, src / "shards", workers=1)
    again = preprocess(src, src / "shards", workers=1, overwrite=True)
    assert first.total == again.total == len(GOOD) and again.skipped == []


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
