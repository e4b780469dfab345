"""The shard format: caption validation, ShardWriter (atomic, deterministic), listing sources, streaming,
and compatibility with the `webdataset` library in both directions."""
from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest
import webdataset as wds
from PIL import Image

import cosmos.data.shards as shards_module
from tests.helpers import write_raw_tar
from cosmos.data.shards import (
    CaptionContentError,
    ReadStats,
    ShardWriter,
    atomic_write_bytes,
    expand_sources,
    iter_members,
    iter_samples,
    iter_shard,
    sample_files,
    split_key,
    validate_captions,
    write_manifest,
)
from cosmos.errors import CosmosError


def jpeg(colour: tuple[int, int, int], size: tuple[int, int] = (20, 16)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def write_samples(out: Path, n: int, maxcount: int = 4) -> dict[str, dict]:
    """n samples with two caption fields; returns key -> captions."""
    expected = {}
    with ShardWriter(out, maxcount=maxcount) as writer:
        for i in range(n):
            key = f"{i:09d}"
            captions = {"raw": [f"photo {i}"], "long": [f"A red square {i}", "It is small"]}
            writer.write(key, sample_files(key, jpeg((10 * i % 255, 0, 0)), "jpg", captions, f"photo {i}",
                                           meta={"index": i}))
            expected[key] = captions
    return expected


# --- validate_captions ------------------------------------------------------------------------------------------


def test_validate_captions_accepts_lists_of_sentences():
    captions = {"raw": ["a dog"], "long": ["A dog runs", "Grass is green"], "short": []}
    assert validate_captions(captions, "x") == captions


def test_validate_captions_rejects_a_string_field_and_says_why():
    with pytest.raises(CosmosError) as e:
        validate_captions({"raw": ["ok"], "long": "A dog runs. Grass."}, "shard.tar: 000001.json")
    msg = str(e.value)
    assert msg.startswith("shard.tar: 000001.json: caption field 'long' is a string, not a list of sentences")
    assert "collapses" in msg


@pytest.mark.parametrize(
    "captions, words",
    [
        ("just text", "not an object"),
        ({"raw": 3}, "is a int, not a list"),
        ({"raw": ["ok", 5]}, "item 1 is a int"),
        ({"raw": ["ok", "  "]}, "item 1 is an empty sentence"),
        ({"raw": [], "long": []}, "no caption sentences"),
    ],
)
def test_validate_captions_rejects_other_malformed_structures(captions, words):
    with pytest.raises(CosmosError, match=words):
        validate_captions(captions, "here")


def test_validate_captions_tells_content_from_structure():
    """Bad content in one sample is a CaptionContentError (readers skip the sample); wrong types are not."""
    for captions in ({"raw": ["ok", "  "]}, {"raw": [], "long": []}, {"raw": ["caf\ud800"]}):
        with pytest.raises(CaptionContentError):
            validate_captions(captions, "here")
    for captions in ({"long": "A dog."}, {"raw": 3}, {"raw": ["ok", 5]}, "text"):
        with pytest.raises(CosmosError) as e:
            validate_captions(captions, "here")
        assert not isinstance(e.value, CaptionContentError)
    with pytest.raises(CaptionContentError, match=r"item 0 is not valid UTF-8 \(it holds a lone surrogate"):
        validate_captions({"raw": ["caf\ud800"]}, "here")


def test_sample_files_refuses_text_that_is_not_utf8_with_a_clear_error():
    with pytest.raises(CosmosError, match="the raw caption is not valid UTF-8"):
        sample_files("k", b"IMG", "jpg", {"raw": ["a cat"]}, "a cat\udce9")
    with pytest.raises(CosmosError, match="a metadata value is not valid UTF-8"):
        sample_files("k", b"IMG", "jpg", {"raw": ["a cat"]}, "a cat", meta={"note": "\ud83d"})


def test_sample_files_validates_and_builds_members():
    files = sample_files("000000007", b"IMG", "JPG", {"raw": ["a cat"]}, "a cat.", meta={"url": "u"})
    assert set(files) == {"jpg", "txt", "json"}
    assert files["txt"] == b"a cat."
    assert json.loads(files["json"]) == {"key": "000000007", "captions": {"raw": ["a cat"]}, "url": "u"}
    with pytest.raises(CosmosError, match="is a string"):
        sample_files("k", b"IMG", "jpg", {"raw": "a cat"}, "a cat")
    with pytest.raises(CosmosError, match="reserved"):
        sample_files("k", b"IMG", "jpg", {"raw": ["a"]}, "a", meta={"captions": 1})


# --- ShardWriter ---------------------------------------------------------------------------------------------------


def test_shard_writer_splits_by_maxcount_and_writes_sizes(tmp_path):
    write_samples(tmp_path, 10, maxcount=4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00000.tar", "00001.tar", "00002.tar", "sizes.json"]
    assert json.loads((tmp_path / "sizes.json").read_text()) == {"00000.tar": 4, "00001.tar": 4, "00002.tar": 2}
    with tarfile.open(tmp_path / "00000.tar") as tar:
        assert tar.getnames()[:3] == ["000000000.jpg", "000000000.txt", "000000000.json"]


def test_shard_writer_is_atomic_and_cleans_up_on_error(tmp_path):
    writer = ShardWriter(tmp_path, maxcount=100)
    writer.write("000000001", {"jpg": jpeg((1, 2, 3)), "txt": b"a"})
    # Mid-shard: only the temporary name exists.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00000.tar.tmp"]
    writer.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00000.tar", "sizes.json"]

    broken = tmp_path / "broken"
    with pytest.raises(RuntimeError):
        with ShardWriter(broken, maxcount=2) as w:
            for i in range(3):
                w.write(f"{i:03d}", {"txt": b"x"})
            raise RuntimeError("boom")
    # The finished shard stays, the half-written one and sizes.json do not exist.
    assert sorted(p.name for p in broken.iterdir()) == ["00000.tar"]


def test_refused_sample_leaves_nothing_in_the_shard(tmp_path):
    with ShardWriter(tmp_path) as w:
        w.write("a", {"txt": b"x"})
        with pytest.raises(CosmosError, match="must be bytes"):
            w.write("b", {"txt": b"half", "json": "a str, not bytes"})
        with pytest.raises(CosmosError, match="bad member extension"):
            w.write("b", {"txt": b"half", "a/b": b"x"})
        with pytest.raises(CosmosError, match="names the member b.txt twice"):
            w.write("b", {"txt": b"half", ".txt": b"again"})
        w.write("b", {"txt": b"whole"})  # the key was not taken by the refused attempts
    with tarfile.open(tmp_path / "00000.tar") as tar:
        assert tar.getnames() == ["a.txt", "b.txt"]
        assert tar.extractfile("b.txt").read() == b"whole"
    assert json.loads((tmp_path / "sizes.json").read_text()) == {"00000.tar": 2}


def test_atomic_write_leaves_no_temporary_file_when_the_write_fails(tmp_path, monkeypatch):
    def failing_fsync(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(shards_module.os, "fsync", failing_fsync)
    with pytest.raises(CosmosError, match="out.json: cannot write \\(No space left on device\\)"):
        atomic_write_bytes(tmp_path / "out.json", b"{}")
    assert list(tmp_path.iterdir()) == []


def test_shard_writer_refuses_bad_keys(tmp_path):
    with ShardWriter(tmp_path) as w:
        with pytest.raises(CosmosError, match="contain no '.'"):
            w.write("a.b", {"txt": b"x"})
        w.write("a", {"txt": b"x"})
        with pytest.raises(CosmosError, match="written twice"):
            w.write("a", {"txt": b"y"})


def test_shard_writer_is_deterministic(tmp_path):
    write_samples(tmp_path / "a", 6)
    write_samples(tmp_path / "b", 6)
    for name in ("00000.tar", "00001.tar"):
        digest = [hashlib.sha256((tmp_path / d / name).read_bytes()).hexdigest() for d in ("a", "b")]
        assert digest[0] == digest[1]


def test_write_manifest_is_json(tmp_path):
    write_manifest(tmp_path, {"counts": {"written": 3}})
    assert json.loads((tmp_path / "manifest.json").read_text()) == {"counts": {"written": 3}}
    assert not list(tmp_path.glob("*.tmp"))


# --- Listing ----------------------------------------------------------------------------------------------------


def test_expand_sources_directory_braces_and_lists(tmp_path):
    write_samples(tmp_path / "a", 12, maxcount=4)
    write_samples(tmp_path / "b", 4, maxcount=4)
    a = [str(tmp_path / "a" / f"{i:05d}.tar") for i in range(3)]
    assert expand_sources(str(tmp_path / "a")) == a
    assert expand_sources(str(tmp_path / "a" / "{00001..00002}.tar")) == a[1:]
    both = expand_sources(f"{tmp_path / 'a'}::{tmp_path / 'b' / '00000.tar'}")
    assert both == a + [str(tmp_path / "b" / "00000.tar")]


@pytest.mark.parametrize(
    "spec, words",
    [
        ("nowhere", "no such shard file or directory"),
        ("a/{00000..00009}.tar", "7 of 10 shards are missing"),
        ("a/{00005..00001}.tar", "is empty"),
        ("a::a/00000.tar", "listed twice"),
        ("empty", "no .tar shards"),
        ("", "no shard source"),
    ],
)
def test_expand_sources_errors(tmp_path, spec, words):
    write_samples(tmp_path / "a", 12, maxcount=4)
    (tmp_path / "empty").mkdir()
    spec = "::".join(str(tmp_path / p) for p in spec.split("::")) if spec else spec
    with pytest.raises(CosmosError, match=words):
        expand_sources(spec)


def test_split_key_matches_webdataset():
    from webdataset.tariterators import base_plus_ext

    for name in ["000001.jpg", "dir/000001.seg.png", "a/b/c.tar.gz", "x.JSON"]:
        key, ext = base_plus_ext(name)
        assert split_key(name) == (key, ext.lower())
    assert split_key("README") is None


# --- Streaming ------------------------------------------------------------------------------------------------


def test_iter_samples_reads_back_what_was_written(tmp_path):
    expected = write_samples(tmp_path, 7, maxcount=3)
    samples = list(iter_samples(str(tmp_path)))
    assert [s["__key__"] for s in samples] == sorted(expected)
    for s in samples:
        assert s["captions"] == expected[s["__key__"]]
        assert s["image_ext"] == "jpg"
        assert s["meta"] == {"index": int(s["__key__"])}
        assert Image.open(io.BytesIO(s["image"])).size == (20, 16)
        assert s["__url__"].endswith(".tar")


def test_our_shards_read_by_webdataset(tmp_path):
    expected = write_samples(tmp_path, 7, maxcount=3)
    urls = expand_sources(str(tmp_path))
    seen = {}
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode("pil"):
        assert sample["jpg"].size == (20, 16)
        assert sample["json"]["captions"] == expected[sample["__key__"]]
        assert sample["txt"] == f"photo {int(sample['__key__'])}"
        seen[sample["__key__"]] = True
    assert sorted(seen) == sorted(expected)


def test_img2dataset_layout_from_webdataset_tarwriter_is_read(tmp_path):
    """img2dataset writes KEY.jpg + KEY.txt + KEY.json (its metadata, no caption lists)."""
    captions = {}
    with wds.TarWriter(str(tmp_path / "00000.tar")) as sink:
        for i in range(5):
            key = f"{i:09d}"
            text = f"A blue bird {i}. On a branch\nsunny"
            sink.write({"__key__": key, "jpg": jpeg((0, 0, 50 * i)), "txt": text,
                        "json": {"url": f"http://x/{i}.jpg", "caption": text, "key": key, "status": "success",
                                 "width": 20, "height": 16}})
            captions[key] = {"raw": [f"A blue bird {i}", "On a branch", "sunny"]}
    samples = list(iter_samples(str(tmp_path / "00000.tar")))
    assert [s["__key__"] for s in samples] == sorted(captions)
    for s in samples:
        assert s["captions"] == captions[s["__key__"]]
        assert s["meta"]["url"].startswith("http://x/")
        assert Image.open(io.BytesIO(s["image"])).size == (20, 16)


def test_bad_members_are_skipped_and_counted(tmp_path):
    good = json.dumps({"captions": {"raw": ["fine"]}}).encode()
    write_raw_tar(tmp_path / "00000.tar", [
        ("a.jpg", jpeg((1, 1, 1))), ("a.json", good),
        ("b.txt", b"no image here"),                           # no image member
        ("c.jpg", jpeg((2, 2, 2))), ("c.json", b"{not json"),  # broken JSON
        ("d.jpg", jpeg((3, 3, 3))), ("d.txt", b"\xff\xfe"),   # caption not UTF-8
        ("e.jpg", jpeg((4, 4, 4))), ("e.txt", b" . \n "),     # empty caption
        ("f.jpg", jpeg((5, 5, 5))), ("f.txt", b"last one"),
    ])
    stats = ReadStats()
    keys = [s["__key__"] for s in iter_shard(str(tmp_path / "00000.tar"), stats)]
    assert keys == ["a", "f"]
    assert stats.as_dict() == {"samples": 2, "bad_samples": 4, "corrupt_shards": 0, "bad_images": 0}


def test_unusable_caption_content_is_a_counted_bad_sample_not_fatal(tmp_path):
    def record(captions) -> bytes:
        return json.dumps({"captions": captions}, ensure_ascii=True).encode()  # \ud800 travels as an escape

    write_raw_tar(tmp_path / "00000.tar", [
        ("a.jpg", jpeg((1, 1, 1))), ("a.json", record({"raw": ["fine"]})),
        ("b.jpg", jpeg((2, 2, 2))), ("b.json", record({"raw": ["ok", " "]})),      # a blank sentence
        ("c.jpg", jpeg((3, 3, 3))), ("c.json", record({"raw": [], "long": []})),   # no sentence at all
        ("d.jpg", jpeg((4, 4, 4))), ("d.json", record({"raw": ["caf\ud800"]})),   # a lone surrogate
        ("e.jpg", jpeg((5, 5, 5))), ("e.json", record({"raw": ["also fine"]})),
    ])
    stats = ReadStats()
    assert [s["__key__"] for s in iter_shard(str(tmp_path / "00000.tar"), stats)] == ["a", "e"]
    assert stats.bad_samples == 3 and stats.samples == 2


def test_a_shared_shard_reads_only_its_own_samples_bytes(tmp_path, monkeypatch):
    write_samples(tmp_path, 9, maxcount=9)
    reads = []
    original = tarfile.TarFile.extractfile

    def counting(self, member, *args, **kwargs):
        reads.append(member.name if isinstance(member, tarfile.TarInfo) else member)
        return original(self, member, *args, **kwargs)

    monkeypatch.setattr(tarfile.TarFile, "extractfile", counting)
    got = {}
    for t in range(3):
        reads.clear()
        got[t] = [key for key, _ in iter_members(str(tmp_path / "00000.tar"), ReadStats(), 9, share=(3, t))]
        assert sorted({name.split(".")[0] for name in reads}) == got[t]  # read only the groups it keeps
        assert len(reads) == 3 * len(got[t])
    assert got == {t: [f"{i:09d}" for i in range(t, 9, 3)] for t in range(3)}


def test_truncated_shard_keeps_what_precedes_the_damage(tmp_path):
    write_samples(tmp_path, 6, maxcount=6)
    data = (tmp_path / "00000.tar").read_bytes()
    (tmp_path / "00000.tar").write_bytes(data[: len(data) // 2])
    stats = ReadStats()
    keys = [s["__key__"] for s in iter_shard(str(tmp_path / "00000.tar"), stats)]
    assert 1 <= len(keys) < 6 and keys == [f"{i:09d}" for i in range(len(keys))]
    assert stats.corrupt_shards == 1


def test_string_caption_field_in_a_hand_made_shard_is_rejected_at_load(tmp_path):
    write_raw_tar(tmp_path / "00000.tar", [
        ("a.jpg", jpeg((1, 1, 1))), ("a.json", json.dumps({"captions": {"long": "A dog. A cat."}}).encode()),
    ])
    with pytest.raises(CosmosError, match="caption field 'long' is a string, not a list of sentences"):
        list(iter_shard(str(tmp_path / "00000.tar")))


def test_shard_cut_between_members_is_noticed_through_sizes_json(tmp_path):
    write_samples(tmp_path, 6, maxcount=6)
    shard = tmp_path / "00000.tar"
    with tarfile.open(shard) as tar:
        members = tar.getmembers()
    # Cut right after the 3rd sample's last member: a shorter but valid-looking tar.
    end = members[8].offset_data + ((members[8].size + 511) // 512) * 512
    shard.write_bytes(shard.read_bytes()[:end])
    stats = ReadStats()
    keys = [s["__key__"] for s in iter_samples(str(tmp_path), stats)]
    assert keys == [f"{i:09d}" for i in range(3)]
    assert stats.corrupt_shards == 1


def test_synth_shards_read_back_with_webdataset_and_our_reader(tmp_path):
    """`cosmos synth` writes its training shards with ShardWriter: both readers must agree on every sample."""
    from cosmos.data.synth import write_synth

    write_synth(tmp_path / "s", n=6, n_eval=0, size=64, workers=1, maxcount=4)
    train = tmp_path / "s" / "train"
    ours = {s["__key__"]: s for s in iter_samples(str(train))}
    theirs = {s["__key__"]: s for s in wds.WebDataset(expand_sources(str(train)), shardshuffle=False,
                                                        empty_check=False).decode("pil")}
    assert len(ours) == 6 and sorted(ours) == sorted(theirs)
    for key, sample in ours.items():
        other = theirs[key]
        assert sample["captions"] == other["json"]["captions"]
        assert all(isinstance(v, list) and v for v in sample["captions"].values())
        image = Image.open(io.BytesIO(sample["image"])).convert("RGB")
        assert image.size == (64, 64)
        assert image.tobytes() == other[sample["image_ext"]].convert("RGB").tobytes()
