"""The streaming loader: exactly once per epoch across 2 ranks x 2 real DataLoader workers, seeded order,
mid-epoch resume, damage skipped and counted, load-time caption validation, the multi-view transform path."""
from __future__ import annotations

import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image

from cosmos.data.loader import build_loader, slot_plan
from cosmos.data.shards import ShardWriter, sample_files
from cosmos.errors import CosmosError


def jpeg(i: int, size: tuple[int, int] = (24, 20)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (i % 256, (7 * i) % 256, 100)).save(buf, "JPEG")
    return buf.getvalue()


def make_shards(out: Path, n: int, maxcount: int) -> list[str]:
    keys = []
    with ShardWriter(out, maxcount=maxcount) as writer:
        for i in range(n):
            key = f"{i:09d}"
            captions = {"raw": [f"thing {i}"], "long": [f"A thing numbered {i}", "It is red", "It is round"]}
            writer.write(key, sample_files(key, jpeg(i), "jpg", captions, f"thing {i}"))
            keys.append(key)
    return keys


def epoch_keys(source: str, *, rank: int = 0, world_size: int = 1, num_workers: int = 2, seed: int = 0,
               epoch: int = 0, batch_size: int = 3, shuffle_buffer: int = 8) -> list[str]:
    loader = build_loader(source, None, batch_size, num_workers=num_workers, rank=rank, world_size=world_size,
                          seed=seed, epoch=epoch, shuffle_buffer=shuffle_buffer)
    return [s["__key__"] for batch in loader for s in batch]


def test_slot_plan_covers_every_sample_once():
    for n_shards in range(1, 9):
        for n_slots in range(1, 9):
            size = 11
            seen = Counter()
            for slot in range(n_slots):
                for pos, k, t in slot_plan(n_shards, n_slots, slot):
                    seen.update((pos, j) for j in range(size) if j % k == t)
            assert seen == Counter((pos, j) for pos in range(n_shards) for j in range(size)), (n_shards, n_slots)


@pytest.mark.parametrize("n, maxcount", [(30, 7), (30, 30), (10, 4)], ids=["5-uneven-shards", "1-shard", "3-shards"])
def test_two_ranks_two_workers_see_every_sample_exactly_once(tmp_path, n, maxcount):
    keys = make_shards(tmp_path, n, maxcount)
    seen = []
    per_rank = []
    for rank in range(2):
        got = epoch_keys(str(tmp_path), rank=rank, world_size=2, num_workers=2)
        per_rank.append(got)
        seen += got
    assert Counter(seen) == Counter(keys)
    assert all(per_rank)  # both ranks got work


def test_same_seed_same_order_other_epoch_or_seed_other_order(tmp_path):
    make_shards(tmp_path, 40, 8)
    source = str(tmp_path)
    first = epoch_keys(source, seed=3, epoch=0)
    assert epoch_keys(source, seed=3, epoch=0) == first
    other_epoch = epoch_keys(source, seed=3, epoch=1)
    other_seed = epoch_keys(source, seed=4, epoch=0)
    assert sorted(other_epoch) == sorted(first) == sorted(other_seed)
    assert other_epoch != first and other_seed != first
    assert first != sorted(first)  # shuffled at all


def test_shuffle_buffer_shuffles_within_a_shard(tmp_path):
    keys = make_shards(tmp_path, 20, 20)  # one shard: only the sample buffer can change the order
    assert epoch_keys(str(tmp_path), num_workers=0, shuffle_buffer=0) == keys
    epoch0 = epoch_keys(str(tmp_path), num_workers=0, shuffle_buffer=8, epoch=0)
    epoch1 = epoch_keys(str(tmp_path), num_workers=0, shuffle_buffer=8, epoch=1)
    assert sorted(epoch0) == sorted(epoch1) == keys
    assert epoch0 != keys and epoch1 != keys and epoch0 != epoch1


def test_set_epoch_changes_the_order(tmp_path):
    make_shards(tmp_path, 24, 6)
    loader = build_loader(str(tmp_path), None, 4, num_workers=0, seed=1, shuffle_buffer=8)
    epoch0 = [s["__key__"] for b in loader for s in b]
    loader.set_epoch(1)
    epoch1 = [s["__key__"] for b in loader for s in b]
    assert epoch1 == epoch_keys(str(tmp_path), num_workers=0, seed=1, epoch=1, batch_size=4)
    assert sorted(epoch0) == sorted(epoch1) and epoch0 != epoch1


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_mid_epoch_yields_exactly_the_rest(tmp_path, num_workers):
    make_shards(tmp_path, 30, 7)
    source = str(tmp_path)
    full = build_loader(source, None, 3, num_workers=num_workers, seed=5, epoch=2, shuffle_buffer=6)
    full_keys = [s["__key__"] for b in full for s in b]

    first = build_loader(source, None, 3, num_workers=num_workers, seed=5, epoch=2, shuffle_buffer=6)
    consumed = []
    for i, batch in enumerate(first):
        consumed += [s["__key__"] for s in batch]
        if i == 2:
            break
    state = json.loads(json.dumps(first.state_dict()))  # must survive a checkpoint round trip
    resumed = build_loader(source, None, 3, num_workers=num_workers, seed=5, epoch=2, shuffle_buffer=6,
                           resume=state)
    rest = [s["__key__"] for b in resumed for s in b]
    assert len(consumed) == 9
    assert Counter(consumed + rest) == Counter(full_keys)
    if num_workers == 0:  # one stream: the very same order
        assert consumed + rest == full_keys
    # A finished epoch's position resumes to nothing.
    assert list(build_loader(source, None, 3, num_workers=num_workers, seed=5, epoch=2, shuffle_buffer=6,
                             resume=resumed.state_dict())) == []


def test_resume_with_other_settings_is_refused(tmp_path):
    make_shards(tmp_path, 10, 5)
    state = build_loader(str(tmp_path), None, 2, num_workers=2, seed=0).state_dict()
    with pytest.raises(CosmosError, match="recorded with num_workers=2 but this loader has num_workers=1"):
        build_loader(str(tmp_path), None, 2, num_workers=1, seed=0, resume=state)
    with pytest.raises(CosmosError, match="recorded with epoch=0 but this loader has epoch=3"):
        build_loader(str(tmp_path), None, 2, num_workers=2, seed=0, epoch=3, resume=state)
    with pytest.raises(CosmosError, match="not a ShardLoader.state_dict"):
        build_loader(str(tmp_path), None, 2, resume={"position": 3})


def test_length_matches_the_batches(tmp_path):
    make_shards(tmp_path, 23, 5)
    for rank in range(2):
        loader = build_loader(str(tmp_path), None, 4, num_workers=2, rank=rank, world_size=2)
        batches = list(loader)
        assert len(loader) == len(batches)
        assert loader.num_samples() == sum(len(b) for b in batches)


def test_brace_pattern_and_joined_sources(tmp_path):
    a = make_shards(tmp_path / "a", 12, 4)
    b = make_shards(tmp_path / "b", 5, 5)
    spec = f"{tmp_path / 'a' / '{00000..00001}.tar'}::{tmp_path / 'b'}"
    keys = epoch_keys(spec, num_workers=2)
    assert Counter(keys) == Counter(a[:8] + b)


def _add_members(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_damage_is_skipped_and_counted_never_fatal(tmp_path):
    keys = make_shards(tmp_path, 12, 6)  # 00000.tar, 00001.tar
    # A third shard whose tar stream breaks half-way, and a fourth with bad samples.
    good_json = json.dumps({"captions": {"raw": ["fine"]}}).encode()
    _add_members(tmp_path / "00002.tar", [m for i in range(6)
                                           for m in ((f"t{i}.jpg", jpeg(i, (64, 64))), (f"t{i}.json", good_json))])
    with tarfile.open(tmp_path / "00002.tar") as tar:
        cut = tar.getmember("t3.jpg").offset_data + 10  # inside t3's image: t0..t2 survive
    (tmp_path / "00002.tar").write_bytes((tmp_path / "00002.tar").read_bytes()[:cut])
    _add_members(tmp_path / "00003.tar", [
        ("x1.jpg", b"not an image"), ("x1.json", good_json),   # undecodable image: counted when decoded
        ("x2.txt", b"no image"),                               # no image member
        ("x3.jpg", jpeg(3)), ("x3.json", b"{oops"),            # bad JSON
        ("x4.jpg", jpeg(4)), ("x4.json", good_json),           # fine
    ])
    loader = build_loader(str(tmp_path), None, 4, num_workers=2)
    got = [s["__key__"] for b in loader for s in b]
    assert sorted(got) == sorted(keys + ["t0", "t1", "t2", "x1", "x4"])
    stats = loader.stats()
    assert stats["corrupt_shards"] == 1 and stats["bad_samples"] == 2
    assert stats["samples"] == len(got)


def _tokens(texts: list[str], context_length: int = 16) -> torch.Tensor:
    from cosmos.tokenizer import Tokenizer

    return Tokenizer.clip()(texts, context_length=context_length)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_string_caption_field_is_rejected_at_load_time(tmp_path, num_workers):
    _add_members(tmp_path / "00000.tar", [
        ("a.jpg", jpeg(1)), ("a.json", json.dumps({"captions": {"raw": ["ok"]}}).encode()),
        ("b.jpg", jpeg(2)), ("b.json", json.dumps({"captions": {"long": "A dog. A cat."}}).encode()),
    ])
    with pytest.raises(CosmosError, match="caption field 'long' is a string, not a list of sentences"):
        list(build_loader(str(tmp_path), None, 2, num_workers=num_workers))


@pytest.mark.slow
def test_multiview_transform_batches(tmp_path):
    from cosmos.data.views import MultiViewTransform, ViewConfig

    keys = make_shards(tmp_path, 10, 5)
    good_json = json.dumps({"captions": {"raw": ["fine"]}}).encode()
    _add_members(tmp_path / "00002.tar", [("bad.jpg", b"not an image"), ("bad.json", good_json)])
    _tokens(["warm the tokenizer cache before the workers fork"])
    cfg = ViewConfig.tiny(context_length=16)
    loader = build_loader(str(tmp_path), MultiViewTransform(cfg, _tokens, seed=0), 4, num_workers=2)
    batches = list(loader)
    assert sorted(k for b in batches for k in b["keys"]) == keys
    assert loader.stats() == {"samples": 10, "bad_samples": 0, "corrupt_shards": 0, "bad_images": 1}
    b = batches[0]
    B = len(b["keys"])
    assert b["global_crops"].shape == (B, cfg.n_global, 3, cfg.global_size, cfg.global_size)
    assert b["local_crops"].shape == (B, cfg.n_local, 3, cfg.local_size, cfg.local_size)
    assert b["global_text"].shape == (B, cfg.n_global_text, 16) and b["global_text"].dtype == torch.long
    assert b["local_text"].shape == (B, cfg.n_local_text, 16)
    # Seeded views: the same (seed, epoch) gives the same tensors.
    again = list(build_loader(str(tmp_path), MultiViewTransform(cfg, _tokens, seed=0), 4, num_workers=2))
    assert all(torch.equal(x["global_crops"], y["global_crops"]) for x, y in zip(batches, again))
