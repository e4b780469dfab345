"""The streaming training loader: shards -> (rank, worker) slots -> seeded shuffle -> views -> batches.

Every epoch, each sample of the source is yielded exactly once across all ranks and DataLoader workers:

1. Shard order. The shard list is shuffled with a generator seeded by (seed, epoch), identically on every rank.
2. Slots. Rank r's worker w is slot s = r * num_workers + w, out of S = world_size * num_workers. With at least
   S shards, shard i (in epoch order) goes to slot i mod S. With fewer shards than slots, slot s reads shard
   s mod n_shards and keeps the samples whose index j in that shard (counting every sample group in the tar,
   good or bad) satisfies j mod k == t, where k slots share the shard and s is the t-th of them.
3. Shuffle buffer. Each slot passes its stream through a buffer of `shuffle_buffer` samples with a generator
   seeded by (seed, epoch, slot): fill the buffer, then for each new sample emit a random buffered one and put
   the new one in its place; at the end emit the rest in shuffled order. Same (seed, epoch) -> same order.
4. Views. With a transform, the image is decoded (cosmos.images.decode_image) and the transform gets
   (image, sentence_pool(captions)); without one, the raw sample dicts of cosmos.data.shards are yielded.

Resume position. `ShardLoader.state_dict()` records, for each of this rank's slots, how many samples the slot's
shuffled stream (step 3) had produced when the last batch handed to the caller was made. Resuming replays each
slot's stream for the same (seed, epoch, world_size, num_workers, shards) and drops that many samples before
decoding anything, so the remaining samples come out exactly, in the same order. A sample whose image fails to
decode still counts as produced (it is dropped again on replay).

Damage is never fatal: a broken tar stream, a sample with a missing or undecodable member, an image that does
not decode are skipped and counted (`ShardLoader.stats()`). A caption field that is a string instead of a list
of sentences raises CosmosError: that is a bug in how the shards were made, and training on it would collapse.
"""
from __future__ import annotations

import hashlib
import inspect
import math
import multiprocessing
import random
from typing import Any, Callable, Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..device import default_device
from ..errors import CosmosError
from ..images import decode_image
from .shards import BadSample, ReadStats, decode_sample, expand_sources, iter_members, known_sizes, shard_sizes

_STAT_FIELDS = ("samples", "bad_samples", "corrupt_shards", "bad_images")


def _rng(*parts: Any) -> random.Random:
    """A generator seeded from `parts` by a hash (stable across processes and Python runs)."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


def _torch_seed(*parts: Any) -> int:
    return _rng("torch", *parts).getrandbits(63)


# --- 1-2. Epoch shard order and the slot plan -------------------------------------------------------------------


def epoch_shard_order(shards: list[str], seed: int, epoch: int) -> list[str]:
    """The shards in this epoch's order: a shuffle seeded by (seed, epoch), the same on every rank."""
    order = list(shards)
    _rng("shards", seed, epoch).shuffle(order)
    return order


def slot_plan(n_shards: int, n_slots: int, slot: int) -> list[tuple[int, int, int]]:
    """What slot `slot` of `n_slots` reads: [(shard position, k, t)], keeping sample j of that shard when
    j % k == t. Shard-level round-robin when there are enough shards, sample-level modulo split otherwise."""
    if n_shards >= n_slots:
        return [(i, 1, 0) for i in range(slot, n_shards, n_slots)]
    shard = slot % n_shards
    sharing = list(range(shard, n_slots, n_shards))  # the slots reading this shard
    return [(shard, len(sharing), sharing.index(slot))]


def slot_samples(sizes: list[int], n_slots: int, slot: int) -> int:
    """How many samples a slot reads in an epoch, given the shards' sample counts in epoch order."""
    total = 0
    for pos, k, t in slot_plan(len(sizes), n_slots, slot):
        total += len(range(t, sizes[pos], k))
    return total


# --- 3. The per-slot stream ---------------------------------------------------------------------------------------


def shuffle_buffer(samples: Iterator[dict], size: int, rng: random.Random) -> Iterator[dict]:
    """Reservoir-style shuffle with a buffer of `size` samples (size <= 1: keep the order)."""
    if size <= 1:
        yield from samples
        return
    buffer: list[dict] = []
    for sample in samples:
        if len(buffer) < size:
            buffer.append(sample)
            continue
        i = rng.randrange(size)
        yield buffer[i]
        buffer[i] = sample
    rng.shuffle(buffer)
    yield from buffer


class ShardDataset(IterableDataset):
    """Streams one epoch of samples for one rank; each DataLoader worker takes its own slot (see module doc).

    Yields (slot, produced, item): the slot id, how many samples the slot's shuffled stream has produced so far
    (the resume position), and the sample dict or the transform's output. `ShardLoader` unwraps these.
    """

    def __init__(self, shards: list[str], transform: Callable | None = None, rank: int = 0, world_size: int = 1,
                 seed: int = 0, epoch: int = 0, shuffle_buffer: int = 1000):
        self.shards = list(shards)
        self.transform = transform
        self.rank, self.world_size = rank, world_size
        self.seed, self.epoch = seed, epoch
        self.shuffle_buffer = shuffle_buffer
        self.sizes = known_sizes(self.shards)  # recorded counts, to notice shards cut short
        self.skip: dict[int, int] = {}  # slot -> samples to drop (resume)
        self.stats_array = None  # shared counters [num_workers * len(_STAT_FIELDS)], set by ShardLoader
        self._transform_takes_key = _accepts_key(transform)

    def slot(self) -> tuple[int, int, int]:
        """(slot, number of slots, this worker's index on this rank) for the calling worker."""
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return self.rank * workers + worker, self.world_size * workers, worker

    def _read(self, slot: int, n_slots: int, stats: ReadStats) -> Iterator[dict]:
        """Step 2: the slot's samples in epoch shard order (undecoded image bytes)."""
        order = epoch_shard_order(self.shards, self.seed, self.epoch)
        for pos, k, t in slot_plan(len(order), n_slots, slot):
            url = order[pos]
            # Only the first slot sharing a shard counts its damage, so counts are not multiplied.
            local = stats if t == 0 else ReadStats()
            for j, (key, files) in enumerate(iter_members(url, local, self.sizes.get(url))):
                if j % k != t:
                    continue
                try:
                    yield decode_sample(key, files, url)
                except BadSample:
                    stats.bad_samples += 1

    def __iter__(self) -> Iterator[tuple[int, int, Any]]:
        slot, n_slots, worker = self.slot()
        stats = ReadStats()
        stream = shuffle_buffer(self._read(slot, n_slots, stats), self.shuffle_buffer,
                                _rng("buffer", self.seed, self.epoch, slot))
        if self.transform is not None and hasattr(self.transform, "set_epoch"):
            self.transform.set_epoch(self.epoch)
        skip = self.skip.get(slot, 0)
        produced = 0
        try:
            for sample in stream:
                produced += 1
                if produced <= skip:
                    continue
                if self.transform is None:
                    stats.samples += 1
                    self._publish(worker, stats)
                    yield slot, produced, sample
                    continue
                item = self._apply(sample, stats)
                self._publish(worker, stats)
                if item is not None:
                    yield slot, produced, item
        finally:
            self._publish(worker, stats)

    def _apply(self, sample: dict, stats: ReadStats) -> dict | None:
        """Step 4: decode the image, pool the sentences, run the transform; None for an undecodable image."""
        from .views import sentence_pool

        key, url = sample["__key__"], sample["__url__"]
        try:
            image = decode_image(sample["image"], name=f"{url}: {key}.{sample['image_ext']}")
        except CosmosError:
            stats.bad_images += 1
            return None
        sentences = sentence_pool(sample["captions"], where=f"{url}: {key}")
        if self._transform_takes_key:
            out = self.transform(image, sentences, key=key)
        else:
            out = self.transform(image, sentences)
        out["__key__"] = key
        stats.samples += 1
        return out

    def _publish(self, worker: int, stats: ReadStats) -> None:
        if self.stats_array is None:
            return
        base = worker * len(_STAT_FIELDS)
        for i, name in enumerate(_STAT_FIELDS):
            self.stats_array[base + i] = getattr(stats, name)


def _accepts_key(transform: Callable | None) -> bool:
    if transform is None:
        return False
    try:
        return "key" in inspect.signature(transform).parameters
    except (TypeError, ValueError):
        return False


# --- Batching and the DataLoader wrapper ------------------------------------------------------------------------


def _as_list(samples: list) -> list:
    return list(samples)


class _SlotCollate:
    """Collates (slot, produced, item) triples into (slot, last produced, collate(items)). All items of a batch
    come from one worker, hence one slot."""

    def __init__(self, collate: Callable[[list], Any]):
        self.collate = collate

    def __call__(self, triples: list[tuple[int, int, Any]]) -> tuple[int, int, Any]:
        slot = triples[0][0]
        return slot, max(t[1] for t in triples), self.collate([t[2] for t in triples])


def _default_collate(transform: Callable | None) -> Callable[[list], Any]:
    if transform is None:
        return _as_list
    from .views import collate_views

    return collate_views


def _shards_digest(shards: list[str]) -> str:
    return hashlib.sha256("\n".join(shards).encode()).hexdigest()[:16]


class ShardLoader:
    """A DataLoader over shards for one rank: iterate it for one epoch of batches; `set_epoch` between epochs;
    `state_dict()` is the resume position (see the module docstring); `stats()` the skipped-damage counts."""

    def __init__(self, shards: list[str], transform: Callable | None, batch_size: int, num_workers: int = 2,
                 rank: int = 0, world_size: int = 1, seed: int = 0, epoch: int = 0, shuffle_buffer: int = 1000,
                 resume: dict | None = None, collate: Callable | None = None, drop_last: bool = False):
        if batch_size < 1:
            raise CosmosError(f"batch_size must be at least 1, got {batch_size}")
        if num_workers < 0:
            raise CosmosError(f"num_workers must be 0 or more, got {num_workers}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise CosmosError(f"rank {rank} is not in a world of {world_size} ranks; need 0 <= rank < world_size")
        if shuffle_buffer < 0:
            raise CosmosError(f"shuffle_buffer must be 0 or more, got {shuffle_buffer}")
        self.shards = shards
        self.batch_size, self.num_workers, self.drop_last = batch_size, num_workers, drop_last
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.dataset = ShardDataset(shards, transform, rank, world_size, seed, epoch, shuffle_buffer)
        self.collate = collate if collate is not None else _default_collate(transform)
        self._position: dict[int, int] = {}
        self._stats = multiprocessing.get_context().RawArray("q", max(1, num_workers) * len(_STAT_FIELDS))
        self.dataset.stats_array = self._stats
        if resume is not None:
            self._load_position(resume, epoch)

    @property
    def epoch(self) -> int:
        return self.dataset.epoch

    @property
    def slots(self) -> list[int]:
        """This rank's slot ids."""
        workers = max(1, self.num_workers)
        return [self.rank * workers + w for w in range(workers)]

    def set_epoch(self, epoch: int) -> None:
        """Start a fresh epoch (new shard order and shuffle); forgets any resume position."""
        self.dataset.epoch = epoch
        self.dataset.skip = {}
        self._position = {}

    def num_samples(self) -> int | None:
        """Samples this rank reads in an epoch, from the shards' sizes.json (None when not recorded)."""
        sizes = shard_sizes(self.shards)
        if sizes is None:
            return None
        order = epoch_shard_order(self.shards, self.seed, self.epoch)
        n_slots = self.world_size * max(1, self.num_workers)
        return sum(slot_samples([sizes[s] for s in order], n_slots, slot) for slot in self.slots)

    def __len__(self) -> int:
        """Batches per epoch on this rank (each worker makes its own, possibly partial, last batch)."""
        sizes = shard_sizes(self.shards)
        if sizes is None:
            raise TypeError("length unknown: the shards have no sizes.json")
        order = [sizes[s] for s in epoch_shard_order(self.shards, self.seed, self.epoch)]
        n_slots = self.world_size * max(1, self.num_workers)
        rounding = math.floor if self.drop_last else math.ceil
        return sum(rounding(slot_samples(order, n_slots, slot) / self.batch_size) for slot in self.slots)

    def __iter__(self) -> Iterator[Any]:
        self.dataset.skip = dict(self._position)
        for i in range(len(self._stats)):
            self._stats[i] = 0
        loader = DataLoader(
            self.dataset,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            collate_fn=_SlotCollate(self.collate),
            pin_memory=default_device().type == "cuda",
            drop_last=self.drop_last,
            generator=torch.Generator().manual_seed(_torch_seed(self.seed, self.epoch, self.rank)),
        )
        for slot, produced, batch in loader:
            self._position[slot] = produced
            yield batch

    def state_dict(self) -> dict:
        """The resume position: per slot of this rank, samples its shuffled stream produced for the batches
        handed out so far this epoch, plus what must match on resume."""
        return {
            "version": 1,
            "seed": self.seed,
            "epoch": self.epoch,
            "rank": self.rank,
            "world_size": self.world_size,
            "num_workers": self.num_workers,
            "shards": _shards_digest(self.shards),
            "produced": {str(slot): self._position.get(slot, 0) for slot in self.slots},
        }

    def load_state_dict(self, state: dict) -> None:
        self._load_position(state, state.get("epoch", self.epoch))

    def _load_position(self, state: dict, epoch: int) -> None:
        expected = {"seed": self.seed, "epoch": epoch, "rank": self.rank, "world_size": self.world_size,
                    "num_workers": self.num_workers, "shards": _shards_digest(self.shards)}
        if not isinstance(state, dict) or state.get("version") != 1 or "produced" not in state:
            raise CosmosError("resume position is not a ShardLoader.state_dict() (version 1); pass what "
                              "state_dict() returned, or None to start the epoch from the beginning")
        for name, value in expected.items():
            if state.get(name) != value:
                raise CosmosError(f"resume position was recorded with {name}={state.get(name)!r} but this loader "
                                  f"has {name}={value!r}; resume with the same seed, epoch, rank, world size, "
                                  "workers and shards")
        self.dataset.epoch = epoch
        self._position = {int(slot): int(n) for slot, n in state["produced"].items()}

    def stats(self) -> dict[str, int]:
        """Totals over this rank's workers for the current (or last) epoch: samples yielded, bad samples,
        corrupt shards, undecodable images."""
        n = len(_STAT_FIELDS)
        return {name: sum(self._stats[w * n + i] for w in range(len(self._stats) // n))
                for i, name in enumerate(_STAT_FIELDS)}


def build_loader(
    source: str,
    transform: Callable | None,
    batch_size: int,
    num_workers: int = 2,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    epoch: int = 0,
    shuffle_buffer: int = 1000,
    resume: dict | None = None,
    collate: Callable | None = None,
    drop_last: bool = False,
) -> ShardLoader:
    """A loader over the shards named by `source` (directory, brace pattern, or a "::" list).

    transform=None: batches are lists of raw sample dicts. With a transform (e.g. views.MultiViewTransform):
    batches are collate(transform outputs), by default views.collate_views. `resume`: a state_dict() from an
    earlier run with the same settings, to continue mid-epoch.
    """
    shards = expand_sources(source)
    return ShardLoader(shards, transform, batch_size, num_workers, rank, world_size, seed, epoch, shuffle_buffer,
                       resume, collate, drop_last)
