"""The streaming training loader: shards -> (rank, worker) slots -> seeded shuffle -> views -> batches.

Every epoch, each sample of the source is yielded exactly once across all ranks and DataLoader workers:

1. Shard order. The shard list is shuffled with a generator seeded by (seed, epoch), identically on every rank.
2. Slots. Rank r owns slots r * W .. r * W + W - 1 (W = num_workers, at least 1), out of S = world_size * W.
   With at least S shards, shard i (in epoch order) goes to slot i mod S. With fewer shards than slots, slot s
   reads shard s mod n_shards and keeps the samples whose index j in that shard (counting every sample group in
   the tar, good or bad) satisfies j mod k == t, where k slots share the shard and s is the t-th of them; the
   bytes of the other samples are never read.
3. Shuffle buffer. Each slot passes its stream through a buffer of `shuffle_buffer` samples with a generator
   seeded by (seed, epoch, slot): fill the buffer, then for each new sample emit a random buffered one and put
   the new one in its place; at the end emit the rest in shuffled order. Same (seed, epoch) -> same order.
4. Views. With a transform, the image is decoded (cosmos.images.decode_image) and the transform gets
   (image, captions) (and `key=` when it accepts one); without one, the raw sample dicts of cosmos.data.shards
   are yielded.
5. Batches. Each DataLoader worker serves one slot and makes its own batches; the DataLoader hands them out
   round-robin over the workers in worker order, skipping workers that have finished. So the order of a rank's
   batches is fixed by (seed, epoch): slot after slot in cyclic order, each giving its next batch.

Resume position. `ShardLoader.state_dict()` records, for each of this rank's slots, how many samples the slot's
shuffled stream (step 3) had produced when the last batch handed to the caller was made, which slot was due to
give the next batch, and how many batches were handed out. Resuming replays each slot's stream for the same
(seed, epoch, world_size, num_workers, shards) and drops that many samples before decoding anything; the
DataLoader's worker w then serves slot r * W + (w + offset) mod W, where `offset` is the slot that was due, so
its round-robin restarts exactly where the interrupted one stopped. The remaining batches come out identical,
in the same order. A sample whose image fails to decode still counts as produced (it is dropped again on replay).
Iterating a loader again after breaking out of the loop continues the same way; after a complete pass, iterating
again replays the epoch from its start (call `set_epoch` for the next epoch).

Equal steps for DDP. Slots get different numbers of samples when the shards are uneven, so ranks can get
different numbers of batches, and a DDP rank that runs out while the others still step makes them wait forever.
`steps_per_epoch()` is the smallest number of batches any rank gets in this epoch (from sizes.json), and
`equal_steps=True` stops every rank after exactly that many batches. The default (False) keeps the exactly-once
guarantee instead, for single-process training and evaluation.

Damage is never fatal: a broken tar stream, a sample with a missing or undecodable member or unusable caption
text, an image that does not decode are skipped and counted (`ShardLoader.stats()`). A caption field of the wrong
type (a string instead of a list of sentences) raises CosmosError: that is a bug in how the shards were made, and
training on it would collapse. A CosmosError raised in a worker reaches the caller with its one-line message.
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
STATE_VERSION = 2


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


class _WorkerErrors:
    """A small shared buffer through which a DataLoader worker hands its CosmosError message to the main process.

    The DataLoader re-raises a worker's exception wrapped in a 20-line "Caught CosmosError in DataLoader worker
    process 0 ... Original Traceback" message; the loader raises the original one-line message instead.
    """

    SIZE = 4096  # bytes; a longer message is cut

    def __init__(self) -> None:
        self._buffer = multiprocessing.get_context().Array("c", self.SIZE)

    def record(self, error: CosmosError) -> None:
        data = str(error).encode("utf-8", errors="replace")[: self.SIZE - 1]
        with self._buffer.get_lock():
            if not self._buffer.value:  # the first error wins
                self._buffer.value = data

    def message(self) -> str | None:
        with self._buffer.get_lock():
            data = self._buffer.value
        return data.decode("utf-8", errors="ignore") if data else None

    def clear(self) -> None:
        with self._buffer.get_lock():
            self._buffer.value = b""


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
        self.offset = 0  # worker w serves this rank's slot (w + offset) % workers (resume)
        self.stats_array = None  # shared counters [num_workers * len(_STAT_FIELDS)], set by ShardLoader
        self.errors: _WorkerErrors | None = None  # set by ShardLoader
        self._transform_takes_key = _accepts_key(transform)

    def slot(self) -> tuple[int, int, int]:
        """(slot, number of slots, this worker's index on this rank) for the calling worker."""
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return self.rank * workers + (worker + self.offset) % workers, self.world_size * workers, worker

    def _read(self, slot: int, n_slots: int, stats: ReadStats) -> Iterator[dict]:
        """Step 2: the slot's samples in epoch shard order (undecoded image bytes)."""
        order = epoch_shard_order(self.shards, self.seed, self.epoch)
        for pos, k, t in slot_plan(len(order), n_slots, slot):
            url = order[pos]
            # Only the first slot sharing a shard counts its damage, so counts are not multiplied.
            local = stats if t == 0 else ReadStats()
            for key, files in iter_members(url, local, self.sizes.get(url), share=(k, t)):
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
        except CosmosError as e:
            if self.errors is not None:
                self.errors.record(e)
            raise
        finally:
            self._publish(worker, stats)

    def _apply(self, sample: dict, stats: ReadStats) -> dict | None:
        """Step 4: decode the image, run the transform on (image, captions); None for an undecodable image."""
        key, url = sample["__key__"], sample["__url__"]
        try:
            image = decode_image(sample["image"], name=f"{url}: {key}.{sample['image_ext']}")
        except CosmosError:
            stats.bad_images += 1
            return None
        captions = sample["captions"]  # checked by decode_sample; the transform pools the fields
        if self._transform_takes_key:
            out = self.transform(image, captions, key=key)
        else:
            out = self.transform(image, captions)
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


# --- 5. Batching and the DataLoader wrapper ------------------------------------------------------------------------


def _as_list(samples: list) -> list:
    return list(samples)


class _SlotCollate:
    """Collates (slot, produced, item) triples into (slot, last produced, collate(items)). All items of a batch
    come from one worker, hence one slot."""

    def __init__(self, collate: Callable[[list], Any], errors: _WorkerErrors | None = None):
        self.collate = collate
        self.errors = errors

    def __call__(self, triples: list[tuple[int, int, Any]]) -> tuple[int, int, Any]:
        slot = triples[0][0]
        try:
            batch = self.collate([t[2] for t in triples])
        except CosmosError as e:
            if self.errors is not None:
                self.errors.record(e)
            raise
        return slot, max(t[1] for t in triples), batch


def _default_collate(transform: Callable | None) -> Callable[[list], Any]:
    if transform is None:
        return _as_list
    from .views import collate_views

    return collate_views


def _shards_digest(shards: list[str]) -> str:
    return hashlib.sha256("\n".join(shards).encode()).hexdigest()[:16]


class ShardLoader:
    """A DataLoader over shards for one rank: iterate it for one epoch of batches; `set_epoch` between epochs;
    `state_dict()` is the resume position (see the module docstring); `stats()` the skipped-damage counts.

    `equal_steps=True` (for DDP) stops after `steps_per_epoch()` batches, the same number on every rank; it needs
    sizes.json beside the shards. `len(loader)` and `num_samples()` count what the next pass yields: after a
    resume (or a break out of the loop), only what remains of the epoch.
    """

    def __init__(self, shards: list[str], transform: Callable | None, batch_size: int, num_workers: int = 2,
                 rank: int = 0, world_size: int = 1, seed: int = 0, epoch: int = 0, shuffle_buffer: int = 1000,
                 resume: dict | None = None, collate: Callable | None = None, drop_last: bool = False,
                 equal_steps: bool = False):
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
        self.equal_steps = equal_steps
        if equal_steps and shard_sizes(shards) is None:
            missing = sorted(set(shards) - set(known_sizes(shards)))
            raise CosmosError(f"equal_steps needs the sample count of every shard, but {missing[0]} has none in "
                              "the sizes.json beside it; write the shards with `cosmos preprocess` (or ShardWriter), "
                              "or add its count to sizes.json")
        self.dataset = ShardDataset(shards, transform, rank, world_size, seed, epoch, shuffle_buffer)
        self.collate = collate if collate is not None else _default_collate(transform)
        self._stats = multiprocessing.get_context().RawArray("q", max(1, num_workers) * len(_STAT_FIELDS))
        self._errors = _WorkerErrors()
        self.dataset.stats_array = self._stats
        self.dataset.errors = self._errors
        self._restart()
        if resume is not None:
            self._load_position(resume, epoch)

    @property
    def epoch(self) -> int:
        return self.dataset.epoch

    @property
    def workers(self) -> int:
        """Slots per rank: the DataLoader workers, or 1 when loading in the main process."""
        return max(1, self.num_workers)

    @property
    def slots(self) -> list[int]:
        """This rank's slot ids."""
        return self.rank_slots(self.rank)

    def rank_slots(self, rank: int) -> list[int]:
        return [rank * self.workers + w for w in range(self.workers)]

    def _restart(self) -> None:
        """Position at the start of the epoch."""
        self._position: dict[int, int] = {}  # slot -> samples its shuffled stream produced for handed-out batches
        self._next = 0  # this rank's slot index (0 .. workers-1) due to give the next batch
        self._batches = 0  # batches handed out this epoch
        self._finished = False  # a pass reached the end of the epoch: the next pass starts over

    def set_epoch(self, epoch: int) -> None:
        """Start a fresh epoch (new shard order and shuffle); forgets any resume position."""
        self.dataset.epoch = epoch
        self._restart()

    # -- sizes: samples and batches, from sizes.json --

    def _slot_counts(self, rank: int) -> list[tuple[int, int]] | None:
        """(samples in the epoch, samples already produced) for each slot of `rank`; None without sizes.json.
        The produced counts are this loader's position (its own rank only), zero once a pass has finished."""
        sizes = shard_sizes(self.shards)
        if sizes is None:
            return None
        order = [sizes[s] for s in epoch_shard_order(self.shards, self.seed, self.epoch)]
        n_slots = self.world_size * self.workers
        position = self._position if rank == self.rank and not self._finished else {}
        return [(slot_samples(order, n_slots, slot), position.get(slot, 0)) for slot in self.rank_slots(rank)]

    def _batches_of(self, counts: list[tuple[int, int]], remaining: bool) -> int:
        rounding = math.floor if self.drop_last else math.ceil
        return sum(rounding(max(0, total - (done if remaining else 0)) / self.batch_size) for total, done in counts)

    def steps_per_epoch(self) -> int | None:
        """The smallest number of batches any rank gets in this epoch (None without sizes.json): with DDP, run
        every rank for this many steps (`equal_steps=True` does it). Samples a rank would read beyond that are
        left out for this epoch; the next epoch's shard order differs, so other samples are left out then.
        (sizes.json counts every written sample: damaged samples found while reading can make a rank shorter.)"""
        per_rank = [self._slot_counts(r) for r in range(self.world_size)]
        if any(counts is None for counts in per_rank):
            return None
        return min(self._batches_of(counts, remaining=False) for counts in per_rank)

    def num_samples(self) -> int | None:
        """Samples this rank yields in the next pass, from the shards' sizes.json (None when not recorded): the
        whole epoch, or what remains of it after a resume. With equal_steps, at most steps x batch_size."""
        counts = self._slot_counts(self.rank)
        if counts is None:
            return None
        samples = sum(max(0, total - done) for total, done in counts)
        if self.equal_steps:
            samples = min(samples, self._steps_left() * self.batch_size)
        return samples

    def __len__(self) -> int:
        """Batches this rank yields in the next pass (each worker makes its own, possibly partial, last batch):
        the whole epoch, or what remains of it after a resume; with equal_steps, steps_per_epoch() minus the
        batches already handed out."""
        counts = self._slot_counts(self.rank)
        if counts is None:
            raise TypeError("length unknown: the shards have no sizes.json")
        batches = self._batches_of(counts, remaining=True)
        return min(batches, self._steps_left()) if self.equal_steps else batches

    def _steps_left(self) -> int:
        return max(0, self.steps_per_epoch() - (0 if self._finished else self._batches))

    # -- iteration --

    def __iter__(self) -> Iterator[Any]:
        if self._finished:  # a complete pass is behind us: replay the epoch from its start
            self._restart()
        self.dataset.skip = dict(self._position)
        self.dataset.offset = self._next
        for i in range(len(self._stats)):
            self._stats[i] = 0
        # A fresh error buffer per pass: a worker stopped mid-pass (see _stop_workers) may have held the old one's lock.
        self._errors = self.dataset.errors = _WorkerErrors()
        limit = self.steps_per_epoch() if self.equal_steps else None
        if limit is not None and self._batches >= limit:
            self._finished = True
            return
        loader = DataLoader(
            self.dataset,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            collate_fn=_SlotCollate(self.collate, self._errors),
            pin_memory=default_device().type == "cuda",
            drop_last=self.drop_last,
            generator=torch.Generator().manual_seed(_torch_seed(self.seed, self.epoch, self.rank)),
        )
        batches = iter(loader)
        finished = False
        try:
            while True:
                try:
                    slot, produced, batch = next(batches)
                except StopIteration:
                    break
                except Exception:
                    message = self._errors.message()
                    if message is None:
                        raise
                    raise CosmosError(message) from None  # the worker's one-line message, not its traceback
                self._position[slot] = produced
                self._next = (slot - self.rank * self.workers + 1) % self.workers
                self._batches += 1
                yield batch
                if limit is not None and self._batches >= limit:
                    break
            finished = True
            self._finished = True
        finally:
            if not finished:  # an error, a break in the caller's loop, or the caller closing us
                _stop_workers(batches)

    # -- resume --

    def state_dict(self) -> dict:
        """The resume position: per slot of this rank, samples its shuffled stream produced for the batches
        handed out so far this epoch, the slot due next, the batches handed out, plus what must match on
        resume. After a complete pass it is the end of the epoch (resuming from it yields nothing)."""
        return {
            "version": STATE_VERSION,
            "seed": self.seed,
            "epoch": self.epoch,
            "rank": self.rank,
            "world_size": self.world_size,
            "num_workers": self.num_workers,
            "shards": _shards_digest(self.shards),
            "produced": {str(slot): self._position.get(slot, 0) for slot in self.slots},
            "next_slot": self._next,
            "batches": self._batches,
        }

    def load_state_dict(self, state: dict) -> None:
        self._load_position(state, state.get("epoch", self.epoch) if isinstance(state, dict) else self.epoch)

    def _load_position(self, state: dict, epoch: int) -> None:
        expected = {"seed": self.seed, "epoch": epoch, "rank": self.rank, "world_size": self.world_size,
                    "num_workers": self.num_workers, "shards": _shards_digest(self.shards)}
        if not isinstance(state, dict) or not {"produced", "next_slot", "batches"} <= set(state):
            raise CosmosError("resume position is not a ShardLoader.state_dict(); pass what state_dict() returned, "
                              "or None to start the epoch from the beginning")
        if state.get("version") != STATE_VERSION:
            raise CosmosError(f"resume position has version {state.get('version')!r}, this loader reads version "
                              f"{STATE_VERSION}; resume with the version that wrote it, or pass None to start the "
                              "epoch from the beginning")
        for name, value in expected.items():
            if state.get(name) != value:
                raise CosmosError(f"resume position was recorded with {name}={state.get(name)!r} but this loader "
                                  f"has {name}={value!r}; resume with the same seed, epoch, rank, world size, "
                                  "workers and shards")
        self.dataset.epoch = epoch
        self._restart()
        self._position = {int(slot): int(n) for slot, n in state["produced"].items()}
        self._next = int(state["next_slot"]) % self.workers
        self._batches = int(state["batches"])

    def stats(self) -> dict[str, int]:
        """Totals over this rank's workers for the current (or last) pass: samples yielded, bad samples,
        corrupt shards, undecodable images."""
        n = len(_STAT_FIELDS)
        return {name: sum(self._stats[w * n + i] for w in range(len(self._stats) // n))
                for i, name in enumerate(_STAT_FIELDS)}


def _stop_workers(iterator) -> None:
    """Stop a DataLoader iterator's worker processes now. Left to the DataLoader, a pass abandoned mid-way (an error,
    the caller stopping early) waits up to 5 s per worker: workers it has marked finished are never told to exit
    and only notice at their next 5 s status check."""
    workers = getattr(iterator, "_workers", None)
    if not workers:
        return
    for w in workers:
        if w.is_alive():
            w.terminate()
    for w in workers:
        w.join(timeout=1.0)
    iterator._shutdown_workers()


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
    equal_steps: bool = False,
) -> ShardLoader:
    """A loader over the shards named by `source` (directory, brace pattern, or a "::" list).

    transform=None: batches are lists of raw sample dicts. With a transform (e.g. views.MultiViewTransform):
    batches are collate(transform outputs), by default views.collate_views. `resume`: a state_dict() from an
    earlier run with the same settings, to continue mid-epoch. `equal_steps`: stop every rank after
    steps_per_epoch() batches (use with DDP, where ranks must take the same number of steps).
    """
    shards = expand_sources(source)
    return ShardLoader(shards, transform, batch_size, num_workers, rank, world_size, seed, epoch, shuffle_buffer,
                       resume, collate, drop_last, equal_steps)
