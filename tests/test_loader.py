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

from tests.helpers import write_raw_tar
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


def _take(loader, n: int) -> list[list[str]]:
    """The keys of the first n batches, then stop iterating (an interruption)."""
    out = []
    for i, batch in enumerate(loader):
        out.append([s["__key__"] for s in batch])
        if i + 1 == n:
            break
    return out


def _batches(loader) -> list[list[str]]:
    return [[s["__key__"] for s in batch] for batch in loader]


@pytest.mark.filterwarnings("ignore:This DataLoader will create 3 worker processes")  # on a 2-core machine
@pytest.mark.parametrize("num_workers", [0, 2, 3])
def test_resume_mid_epoch_yields_exactly_the_rest_in_order(tmp_path, num_workers):
    make_shards(tmp_path, 30, 7)  # 5 uneven shards: with 2 or 3 workers some workers finish before others
    source = str(tmp_path)

    def loader(resume=None):
        return build_loader(source, None, 3, num_workers=num_workers, seed=5, epoch=2, shuffle_buffer=6,
                            resume=resume)

    full = _batches(loader())
    assert len(full) >= 10 and sorted(k for b in full for k in b) == sorted(f"{i:09d}" for i in range(30))
    for stop in (1, 4, len(full) - 2):  # early, mid-epoch, and after a worker has run dry
        first = loader()
        consumed = _take(first, stop)
        state = json.loads(json.dumps(first.state_dict()))  # must survive a checkpoint round trip
        assert consumed + _batches(loader(state)) == full, stop  # the very same batches, in the same order
    # Resuming a resumed run: interrupted twice, still the same order.
    first = loader()
    part1 = _take(first, 2)
    second = loader(first.state_dict())
    part2 = _take(second, 3)
    assert part1 + part2 + _batches(loader(second.state_dict())) == full
    # A finished epoch's position resumes to nothing.
    done = loader()
    _batches(done)
    assert _batches(loader(done.state_dict())) == []


def test_resume_with_other_settings_is_refused(tmp_path):
    make_shards(tmp_path, 10, 5)
    state = build_loader(str(tmp_path), None, 2, num_workers=2, seed=0).state_dict()
    with pytest.raises(CosmosError, match="recorded with num_workers=2 but this loader has num_workers=1"):
        build_loader(str(tmp_path), None, 2, num_workers=1, seed=0, resume=state)
    with pytest.raises(CosmosError, match="recorded with epoch=0 but this loader has epoch=3"):
        build_loader(str(tmp_path), None, 2, num_workers=2, seed=0, epoch=3, resume=state)
    with pytest.raises(CosmosError, match="not a ShardLoader.state_dict"):
        build_loader(str(tmp_path), None, 2, resume={"position": 3})
    with pytest.raises(CosmosError, match="has version 1, this loader reads version 2"):
        build_loader(str(tmp_path), None, 2, num_workers=2, seed=0, resume={**state, "version": 1})


def test_iterating_again_without_set_epoch_replays_the_epoch(tmp_path):
    make_shards(tmp_path, 20, 6)
    loader = build_loader(str(tmp_path), None, 3, num_workers=2, seed=1, shuffle_buffer=4)
    first = _batches(loader)
    assert sum(map(len, first)) == 20
    assert _batches(loader) == first  # not an empty second pass
    # Breaking out continues where it stopped; after the end, the next pass starts over.
    part = _take(loader, 2)
    assert part + _batches(loader) == first
    assert _batches(loader) == first


def test_length_and_sample_count_after_a_resume_are_what_remains(tmp_path):
    make_shards(tmp_path, 23, 5)
    for num_workers in (0, 2):
        first = build_loader(str(tmp_path), None, 4, num_workers=num_workers, seed=2)
        full = len(first)
        _take(first, 3)
        resumed = build_loader(str(tmp_path), None, 4, num_workers=num_workers, seed=2, resume=first.state_dict())
        rest = _batches(resumed)
        assert len(rest) == full - 3
        # measured before iterating: a new loader with the same resume position
        again = build_loader(str(tmp_path), None, 4, num_workers=num_workers, seed=2, resume=first.state_dict())
        assert len(again) == len(rest) and again.num_samples() == sum(map(len, rest))
        assert len(first) == full - 3  # the interrupted loader itself, too
        assert len(resumed) == full  # after a complete pass, the next pass is a whole epoch


def _uneven(tmp_path) -> str:
    """Shards of 5, 5, 5, 5, 3 samples: with 2 ranks x 2 workers, one rank gets more batches."""
    make_shards(tmp_path, 23, 5)
    return str(tmp_path)


def test_equal_steps_gives_every_rank_the_same_number_of_batches(tmp_path):
    source = _uneven(tmp_path)
    default = [build_loader(source, None, 2, num_workers=2, rank=r, world_size=2, seed=0) for r in range(2)]
    lengths = [len(_batches(d)) for d in default]
    assert lengths[0] != lengths[1]  # the problem: DDP would wait forever for the shorter rank
    assert [len(d) for d in default] == lengths
    steps = default[0].steps_per_epoch()
    assert steps == default[1].steps_per_epoch() == min(lengths)

    equal = [build_loader(source, None, 2, num_workers=2, rank=r, world_size=2, seed=0, equal_steps=True)
             for r in range(2)]
    got = [_batches(e) for e in equal]
    assert [len(g) for g in got] == [steps, steps] == [len(e) for e in equal]
    for r in range(2):  # the first `steps` batches of the default order
        assert got[r] == _batches(default[r])[:steps]
    # Resumed mid-epoch, a rank still stops at `steps` batches in total.
    first = build_loader(source, None, 2, num_workers=2, rank=1, world_size=2, seed=0, equal_steps=True)
    part = _take(first, 2)
    resumed = build_loader(source, None, 2, num_workers=2, rank=1, world_size=2, seed=0, equal_steps=True,
                           resume=first.state_dict())
    assert len(resumed) == steps - 2
    assert part + _batches(resumed) == got[1]


def test_equal_steps_needs_sizes_json(tmp_path):
    source = _uneven(tmp_path)
    (tmp_path / "sizes.json").unlink()
    assert build_loader(source, None, 2).steps_per_epoch() is None
    with pytest.raises(CosmosError, match="equal_steps needs the sample count of every shard, but .*00000.tar has"):
        build_loader(source, None, 2, equal_steps=True)


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


def test_damage_is_skipped_and_counted_never_fatal(tmp_path):
    keys = make_shards(tmp_path, 12, 6)  # 00000.tar, 00001.tar
    # A third shard whose tar stream breaks half-way, and a fourth with bad samples.
    good_json = json.dumps({"captions": {"raw": ["fine"]}}).encode()
    write_raw_tar(tmp_path / "00002.tar", [m for i in range(6)
                                           for m in ((f"t{i}.jpg", jpeg(i, (64, 64))), (f"t{i}.json", good_json))])
    with tarfile.open(tmp_path / "00002.tar") as tar:
        cut = tar.getmember("t3.jpg").offset_data + 10  # inside t3's image: t0..t2 survive
    (tmp_path / "00002.tar").write_bytes((tmp_path / "00002.tar").read_bytes()[:cut])
    write_raw_tar(tmp_path / "00003.tar", [
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
def test_string_caption_field_is_rejected_at_load_time_in_one_line(tmp_path, num_workers):
    write_raw_tar(tmp_path / "00000.tar", [
        ("a.jpg", jpeg(1)), ("a.json", json.dumps({"captions": {"raw": ["ok"]}}).encode()),
        ("b.jpg", jpeg(2)), ("b.json", json.dumps({"captions": {"long": "A dog. A cat."}}).encode()),
    ])
    with pytest.raises(CosmosError) as e:
        list(build_loader(str(tmp_path), None, 2, num_workers=num_workers, drop_last=True))
    message = str(e.value)
    assert message.startswith(f"{tmp_path / '00000.tar'}: b.json: caption field 'long' is a string, not a list of "
                              "sentences")
    assert "\n" not in message and "Traceback" not in message and "worker" not in message


class _FailingTransform:
    """Raises a CosmosError for one key, as a transform refusing a sample would."""

    def __call__(self, image, captions, key=None):
        if key == "000000004":
            raise CosmosError(f"sample {key}: this view cannot be made; fix the sample")
        return {"key": key}


def _keys(items: list) -> list:
    return [item["key"] for item in items]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_an_error_in_a_worker_transform_or_collate_reaches_the_caller_in_one_line(tmp_path, num_workers):
    make_shards(tmp_path, 8, 4)
    with pytest.raises(CosmosError) as e:
        list(build_loader(str(tmp_path), _FailingTransform(), 2, num_workers=num_workers, collate=_keys))
    assert str(e.value) == "sample 000000004: this view cannot be made; fix the sample"

    def refusing_collate(items):
        raise CosmosError("cannot stack these views; use one ViewConfig")

    with pytest.raises(CosmosError) as e:
        list(build_loader(str(tmp_path), None, 2, num_workers=num_workers, collate=refusing_collate))
    assert str(e.value) == "cannot stack these views; use one ViewConfig"


@pytest.mark.slow
def test_multiview_transform_batches(tmp_path):
    from cosmos.data.views import MultiViewTransform, ViewConfig

    keys = make_shards(tmp_path, 10, 5)
    good_json = json.dumps({"captions": {"raw": ["fine"]}}).encode()
    write_raw_tar(tmp_path / "00002.tar", [("bad.jpg", b"not an image"), ("bad.json", good_json)])
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


@pytest.mark.parametrize("how", ["error", "break"])
def test_an_abandoned_pass_stops_its_workers_at_once(tmp_path, how):
    """A worker error or a caller that stops early: the DataLoader workers are gone when control returns (left to
    the DataLoader, a worker it had marked finished lingered until its 5 s status check)."""
    import multiprocessing

    make_shards(tmp_path, 16, 4)
    if how == "error":
        with pytest.raises(CosmosError):
            list(build_loader(str(tmp_path), _FailingTransform(), 2, num_workers=2, collate=_keys))
    else:
        batches = iter(build_loader(str(tmp_path), None, 2, num_workers=2))
        next(batches)
        batches.close()
    assert multiprocessing.active_children() == []
