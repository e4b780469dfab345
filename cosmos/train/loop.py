"""The training program: data -> step -> optimizer -> teacher -> logs and checkpoints, on one CPU or many GPUs.

    cfg = TrainConfig(data="data/synth", out="runs/tiny", model="tiny", steps=2000, batch_size=64)
    result = train(cfg)                      # runs/tiny/{config.json, metrics.jsonl, loss.png, model.pt, checkpoints/}

What one step does (`train_one_step`): the loader's batch (B x accum samples per process, every view) -> the student's
forward through DDP and the teacher's on the global views -> the objective (train/loss.py) -> backward (exact
accumulation, train/step.py) -> AdamW step -> clamp both temperatures to [0, ln 100] -> EMA teacher update.

- Optimizer: AdamW, betas (0.9, 0.98), eps 1e-8, weight decay 0.5 except for tensors with fewer than 2 dimensions
  and names containing bias / ln / bn / logit_scale (the official rule); linear warmup then cosine to 0.
- Precision: auto (bf16 autocast where bf16 is native, else fp32), bf16, fp16 (CUDA, with a GradScaler), fp32;
  TF32 matmuls on CUDA.
- Checkpoints (rank 0 writes, atomically): out/checkpoints/step_XXXXXXXX.pt every `save_every` steps, at the end
  and on SIGINT / SIGTERM, holding the student, the teacher, the optimizer, the scaler, every rank's loader
  position and RNG states, the tokenizer and the resolved config; out/model.pt holds the weights only (what
  `cosmos.load` and the CLI take; teacher by default). Resuming continues exactly: the same batches, the same
  losses. A non-finite loss stops the run, naming the step; nothing is written for it.
- Distributed: torchrun / SLURM variables (train/distributed.py); DDP on the student only; every rank stops after
  the same number of steps per epoch (`equal_steps`).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import signal
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from ..checkpoint import read_checkpoint, save, split_checkpoint
from ..device import bf16_is_fast, resolve_device
from ..errors import CosmosError
from ..model.cosmos import CosmosConfig, CosmosModel, get_config, is_cosmos_extra
from . import distributed as D
from .ema import Teacher, default_momentum
from .loss import MODES, LossConfig
from .step import Batch, StudentForward, TrainStep, unused_extras

CHECKPOINT_DIR = "checkpoints"
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
# Settings that may change when a run is resumed (how it is logged and saved, not what it computes).
RESUMABLE_CHANGES = ("out", "resume", "log_every", "save_every", "keep", "val", "val_every", "compile",
                     "grad_checkpointing", "device", "time_limit_s")


@dataclass
class TrainConfig:
    data: str
    out: str
    model: str = "tiny"
    init: str | None = None
    mode: str = "cosmos"
    steps: int | None = None
    epochs: float | None = None
    batch_size: int = 64  # per process, per optimizer step (before accumulation splits it)
    accum: int = 1
    lr: float = 5e-4
    weight_decay: float = 0.5
    warmup: int | None = None  # default: min(2000, 10% of the steps)
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-8
    ema_momentum: float | None = None  # default: 0.999 below a global batch of 2,048, else 0.99
    ema_ramp: bool = False
    precision: str = "auto"
    device: str | None = None
    grad_checkpointing: bool = False
    compile: bool = False
    seed: int = 0
    workers: int = 2
    log_every: int = 10
    save_every: int = 500
    keep: int = 2  # step checkpoints kept (the newest); model.pt is always the latest
    val: str | None = None
    val_every: int = 500
    resume: str | None = None  # a checkpoint path or "auto"
    # the method
    text_padding_mask: bool = True  # False: the official behaviour (quirk 2), no trimming, padding attended to
    distill_image: bool = True
    distill_text: bool = True
    cross_attention: bool = True
    # views
    local_crops: int = 6
    global_scale: tuple[float, float] = (0.4, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.4)
    hflip: float | None = None  # default 0.5; 0 for `cosmos synth` data (its captions say left / right)
    clip_text: str = "caption"  # clip mode's caption: a random field, "raw" or "sentence"
    vocab_size: int | None = None  # learn a byte-level BPE of this many ids from the data (default: CLIP's 49,408)
    quick_gelu: bool = False
    time_limit_s: float | None = None  # fit the run into this much time: the step count (and schedule) is set from
    # the measured speed after a few steps, and training stops when the time is up

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class TrainResult:
    out: Path
    steps: int
    model_path: Path
    checkpoint: Path | None
    metrics: list[dict] = field(default_factory=list)
    wall_s: float = 0.0
    samples_per_s: float = 0.0
    stopped: str | None = None  # "signal" when stopped by SIGINT / SIGTERM


# ---------------------------------------------------------------------------------------------------------------
# Checks made before anything is written
# ---------------------------------------------------------------------------------------------------------------
def check_config(cfg: TrainConfig) -> None:
    def positive(name: str) -> None:
        value = getattr(cfg, name)
        if value is None or isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise CosmosError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")

    for name in ("batch_size", "accum", "log_every", "save_every", "val_every", "keep"):
        positive(name)
    if cfg.workers < 0:
        raise CosmosError(f"--workers must be 0 or more, got {cfg.workers}")
    if cfg.mode not in MODES:
        raise CosmosError(f"--mode {cfg.mode!r} is unknown; use one of {', '.join(MODES)}")
    if cfg.precision not in PRECISIONS:
        raise CosmosError(f"--precision {cfg.precision!r} is unknown; use one of {', '.join(PRECISIONS)}")
    if (cfg.steps is None) == (cfg.epochs is None):
        raise CosmosError("give exactly one of --steps and --epochs")
    if cfg.steps is not None and cfg.steps < 1:
        raise CosmosError(f"--steps must be at least 1, got {cfg.steps}")
    if cfg.epochs is not None and not cfg.epochs > 0:
        raise CosmosError(f"--epochs must be positive, got {cfg.epochs}")
    if cfg.batch_size % cfg.accum:
        raise CosmosError(f"--batch-size {cfg.batch_size} is not a multiple of --accum {cfg.accum}; each of the "
                          f"{cfg.accum} micro-batches must have the same size")
    if not cfg.lr > 0 or cfg.weight_decay < 0:
        raise CosmosError(f"--lr must be positive and --wd 0 or more, got {cfg.lr} and {cfg.weight_decay}")
    if cfg.warmup is not None and cfg.warmup < 0:
        raise CosmosError(f"--warmup must be 0 or more, got {cfg.warmup}")
    if cfg.ema_momentum is not None and not 0 <= cfg.ema_momentum <= 1:
        raise CosmosError(f"--ema-momentum must be in [0, 1], got {cfg.ema_momentum}")
    if cfg.hflip is not None and not 0 <= cfg.hflip <= 1:
        raise CosmosError(f"--hflip must be a probability in [0, 1], got {cfg.hflip}")
    if cfg.mode == "cosmos" and not (cfg.distill_image or cfg.distill_text):
        raise CosmosError("--no-distill-image with --no-distill-text leaves no distillation: use --mode clip-textcrops")
    if cfg.resume is not None and cfg.resume != "auto" and not Path(cfg.resume).is_file():
        raise CosmosError(f"--resume {cfg.resume}: no such checkpoint file (give a file from "
                          f"{Path(cfg.out) / CHECKPOINT_DIR}, or 'auto' for the latest)")
    if cfg.vocab_size is not None and (cfg.init is not None or cfg.data == "synthetic"):
        raise CosmosError("--vocab-size learns a tokenizer from the training captions for a new model; it cannot be "
                          "used with --init (the file brings its tokenizer) or --data synthetic")
    if cfg.init is not None and cfg.resume is not None:
        raise CosmosError("--init starts a new run from weights, --resume continues one: give only one of them")


def resolve_precision(device: torch.device, precision: str) -> str:
    if precision == "auto":
        return "bf16" if bf16_is_fast(device) else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise CosmosError("--precision fp16 needs a CUDA device (it trains with a GradScaler); on this device use "
                          "bf16 or fp32")
    return precision


def check_out_dir(out: Path, resuming: bool) -> None:
    """--out must be empty, or hold this run when resuming."""
    if out.exists() and not out.is_dir():
        raise CosmosError(f"--out {out}: exists and is not a folder")
    if resuming or not out.exists():
        return
    taken = [name for name in ("config.json", "metrics.jsonl", "model.pt", CHECKPOINT_DIR) if (out / name).exists()]
    if taken:
        raise CosmosError(f"--out {out}: holds another run ({taken[0]}); continue it with --resume auto, or choose "
                          "another --out")
    probe = out / ".cosmos-write-test"
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise CosmosError(f"--out {out}: cannot write there ({e.strerror or e})") from None


def latest_checkpoint(out: Path) -> Path | None:
    folder = out / CHECKPOINT_DIR
    found = sorted(folder.glob("step_*.pt")) if folder.is_dir() else []
    return found[-1] if found else None


# ---------------------------------------------------------------------------------------------------------------
# Data: shards (a folder, pattern or list; or a `cosmos synth` folder) or random views for throughput
# ---------------------------------------------------------------------------------------------------------------
def view_sizes(model_config: CosmosConfig) -> tuple[int, int]:
    """(global, local) crop sizes: the model's input size, and 96/224 of it rounded to whole patches (224 -> 96,
    64 -> 32 for the tiny model)."""
    g, p = model_config.vision.image_size, model_config.vision.patch_size
    local = max(2 * p, round(g * 96 / 224 / p) * p)
    return g, local


class SyntheticViews:
    """`--data synthetic`: random views of the configured sizes, nothing decoded (OpenCLIP's synthetic data set),
    for measuring step throughput. Caption lengths are drawn like `cosmos synth` text crops (global up to 63
    tokens, local one-sentence crops up to 19). Deterministic in (seed, rank, batch index); resumable."""

    def __init__(self, views, batch_size: int, vocab_size: int, seed: int, rank: int):
        self.views, self.batch_size, self.vocab_size = views, batch_size, vocab_size
        self.seed, self.rank, self.batches = seed, rank, 0
        self.epoch = 0

    def __iter__(self) -> Iterator[dict]:
        v = self.views
        while True:
            g = torch.Generator().manual_seed(hash((self.seed, self.rank, self.batches)) & (2**63 - 1))
            b = self.batch_size

            def text(n: int, longest: int) -> torch.Tensor:
                ids = torch.randint(1, self.vocab_size - 2, (b, n, v.context_length), generator=g)
                ends = torch.randint(3, min(longest, v.context_length), (b, n, 1), generator=g)
                positions = torch.arange(v.context_length)
                ids = torch.where(positions < ends, ids, torch.zeros_like(ids))
                return ids.scatter_(2, ends, self.vocab_size - 1)

            self.batches += 1
            yield {"global_crops": torch.randn(b, v.n_global, 3, v.global_size, v.global_size, generator=g),
                   "local_crops": torch.randn(b, v.n_local, 3, v.local_size, v.local_size, generator=g),
                   "global_text": text(v.n_global_text, 64), "local_text": text(v.n_local_text, 20)}

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def steps_per_epoch(self) -> None:
        return None

    def state_dict(self) -> dict:
        return {"synthetic": True, "batches": self.batches, "seed": self.seed, "rank": self.rank}

    def load_state_dict(self, state: dict) -> None:
        self.batches = int(state["batches"])


def resolve_data(spec: str) -> dict:
    """{"kind": "synthetic"} or {"kind": "shards", "shards": [...], "synth_root": Path | None}."""
    from ..data.shards import expand_sources, shard_sizes

    if spec == "synthetic":
        return {"kind": "synthetic", "shards": [], "synth_root": None, "samples": None}
    root = Path(spec).expanduser()
    synth_root = None
    if (root / "synth.json").is_file() and (root / "train").is_dir():  # a `cosmos synth --out` folder
        synth_root, spec = root, str(root / "train")
    try:
        shards = expand_sources(spec)
    except CosmosError as e:
        raise CosmosError(f"--data: {e}") from None
    sizes = shard_sizes(shards)
    return {"kind": "shards", "shards": shards, "synth_root": synth_root,
            "samples": sum(sizes.values()) if sizes else None}


def learn_tokenizer(data: dict, vocab_size: int, max_samples: int = 20000):
    """A byte-level BPE tokenizer of `vocab_size` ids learned from the sentences of the first `max_samples` training
    samples (in shard order): a small vocabulary for a small model, carried in every checkpoint."""
    from ..data.shards import iter_samples
    from ..data.views import sentence_pool
    from ..tokenizer import Tokenizer

    sentences = []
    for i, sample in enumerate(iter_samples("::".join(data["shards"]))):
        if i >= max_samples:
            break
        sentences.extend(sentence_pool(sample["captions"], f"sample {sample['__key__']}"))
    return Tokenizer.train(sentences, vocab_size)


# ---------------------------------------------------------------------------------------------------------------
# Optimizer and schedule
# ---------------------------------------------------------------------------------------------------------------
def exclude_from_decay(name: str, param: torch.Tensor) -> bool:
    """The official (OpenCLIP) rule: no weight decay for gains, biases, norms and the temperatures."""
    return param.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in named if not exclude_from_decay(n, p)]
    no_decay = [p for n, p in named if exclude_from_decay(n, p)]
    groups = [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": cfg.weight_decay}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)


def learning_rate(step: int, base: float, warmup: int, total: int) -> float:
    """Linear warmup to `base` over `warmup` steps, then cosine to 0 at `total` (OpenCLIP's cosine_lr)."""
    if step < warmup:
        return base * (step + 1) / warmup
    span = max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / span))) * base


# ---------------------------------------------------------------------------------------------------------------
# RNG state (kept as plain tensors / lists, so checkpoints load with weights_only=True)
# ---------------------------------------------------------------------------------------------------------------
def rng_state() -> dict:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss,
                                                    cached], "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------------------------------
# Signals: finish the current step, write a checkpoint, stop
# ---------------------------------------------------------------------------------------------------------------
class StopFlag:
    """SIGINT / SIGTERM set a flag the loop checks after every step (a second signal stops at once)."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        if self.signal is not None:  # a second signal: stop now
            raise KeyboardInterrupt
        self.signal = signum

    def __enter__(self) -> "StopFlag":
        if threading_main():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def threading_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


# ---------------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------------
class Reporter:
    """Progress hooks; the CLI passes a rich progress bar, the library default is silent."""

    def start(self, total: int, done: int, description: str) -> None: ...

    def update(self, step: int, stats: dict) -> None: ...

    def message(self, text: str) -> None: ...

    def stop(self) -> None: ...


class Run:
    """Everything one training run holds; `train()` builds one and calls `run()`."""

    def __init__(self, cfg: TrainConfig, reporter: Reporter | None = None):
        check_config(cfg)
        self.cfg = cfg
        self.reporter = reporter or Reporter()
        self.out = Path(cfg.out).expanduser()
        self.device = resolve_device(cfg.device)
        self.world = D.init_distributed(self.device)
        if self.device.type == "cuda" and self.world.distributed:
            self.device = torch.device("cuda", self.world.local_rank)
        self.precision = resolve_precision(self.device, cfg.precision)
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.is_main = self.world.is_main

        # Resume: which checkpoint, and is --out ours?
        resume_path = None
        if cfg.resume == "auto":
            resume_path = latest_checkpoint(self.out)
        elif cfg.resume:
            resume_path = Path(cfg.resume)
        self.resume_path = resume_path
        if self.is_main:
            check_out_dir(self.out, resuming=cfg.resume is not None)
        self.resumed = None
        if resume_path is not None:
            self.resumed = read_checkpoint(resume_path)
            if not isinstance(self.resumed.get("train"), dict):
                raise CosmosError(f"--resume {resume_path}: a model file without training state (no optimizer, no "
                                  "loader position); start a new run from its weights with --init instead")

        self.data = resolve_data(cfg.data)
        self._build_model()
        self._build_views_and_loader()
        self._resolve_schedule()
        self._build_training()
        if self.resumed is not None:
            self._load_resumed()
        self.metrics: list[dict] = []
        self.stop = StopFlag()

    # -- model, teacher, tokenizer --------------------------------------------------------------------------------
    def _build_model(self) -> None:
        cfg = self.cfg
        from ..tokenizer import Tokenizer

        tokenizer_state = None
        init_sd = None
        if self.resumed is not None:
            model_config = CosmosConfig.from_dict(self.resumed["config"])
            tokenizer_state = self.resumed.get("tokenizer")
        elif cfg.init is not None:
            model_config, init_sd, tokenizer_state = read_init(cfg.init, cfg.quick_gelu)
        else:
            model_config = get_config(cfg.model)
            model_config.quick_gelu = cfg.quick_gelu
            if cfg.vocab_size is not None:
                tokenizer_state = D.broadcast_object(learn_tokenizer(self.data, cfg.vocab_size).state_dict()
                                                     if self.is_main else None)
        if tokenizer_state and cfg.vocab_size is not None:
            model_config.text.vocab_size = Tokenizer.from_state_dict(tokenizer_state).vocab_size
        model_config.cosmos = cfg.mode == "cosmos"
        self.tokenizer = Tokenizer.from_state_dict(tokenizer_state) if tokenizer_state else Tokenizer.clip()
        if self.tokenizer.vocab_size != model_config.text.vocab_size:
            raise CosmosError(f"the tokenizer has {self.tokenizer.vocab_size} ids but the model's text tower "
                              f"{model_config.text.vocab_size}")
        torch.manual_seed(cfg.seed)
        student = CosmosModel(model_config)
        if init_sd is not None:
            self.init_report = load_init_weights(student, init_sd, cfg.init)
        else:
            self.init_report = None
        self.loss_cfg = LossConfig(cfg.mode, cfg.distill_image, cfg.distill_text, cfg.cross_attention)
        for name, p in student.named_parameters():
            if name.startswith(tuple(unused_extras(student, self.loss_cfg))):
                p.requires_grad_(False)
        if cfg.grad_checkpointing:
            student.set_grad_checkpointing(True)
        self.student = student.to(self.device).train()

    # -- views and the loader -------------------------------------------------------------------------------------
    def _build_views_and_loader(self) -> None:
        from ..data.views import MultiViewTransform, ViewConfig

        cfg = self.cfg
        g, l = view_sizes(self.student.config)
        hflip = cfg.hflip if cfg.hflip is not None else (0.0 if self.data["synth_root"] is not None else 0.5)
        common = dict(global_size=g, local_size=l, context_length=self.student.context_length, hflip_p=hflip,
                      global_scale=tuple(cfg.global_scale), local_scale=tuple(cfg.local_scale))
        if g < 224:  # small crops: DINO's blur radius shrinks with them (ViewConfig.tiny)
            common["blur_sigma"] = (0.1, 2.0 * g / 224 + 0.03)
        if cfg.mode == "clip":
            self.views = ViewConfig(mode="clip", clip_text=cfg.clip_text, **common)
        else:
            self.views = ViewConfig(n_local=cfg.local_crops if self.uses_local else 0, **common)
        self.batch = cfg.batch_size
        self.global_batch = cfg.batch_size * self.world.world_size
        self.resumed_position = None
        if self.data["kind"] == "synthetic":
            self.loader = SyntheticViews(self.views, self.batch, self.student.config.text.vocab_size, cfg.seed,
                                         self.world.rank)
            return
        samples = self.data["samples"]
        if samples is not None and samples < self.global_batch:
            raise CosmosError(f"--batch-size {cfg.batch_size} x {self.world.world_size} process(es) needs "
                              f"{self.global_batch} samples per step but --data has only {samples}; lower the batch size")
        from ..data import build_loader

        self.transform = MultiViewTransform(self.views, self.tokenizer, seed=cfg.seed)
        self.loader = build_loader(
            "::".join(self.data["shards"]), self.transform, batch_size=self.batch,
            num_workers=cfg.workers, rank=self.world.rank, world_size=self.world.world_size, seed=cfg.seed,
            drop_last=True, equal_steps=self.world.distributed)  # a resumed position is loaded in _load_resumed

    @property
    def uses_local(self) -> bool:
        """Local crops only feed h_I (image self-distillation) in cosmos mode."""
        return self.cfg.mode == "cosmos" and self.cfg.distill_image

    def _resolve_schedule(self) -> None:
        cfg = self.cfg
        self.steps_per_epoch = self.loader.steps_per_epoch() if self.data["kind"] == "shards" else None
        if self.steps_per_epoch == 0:
            raise CosmosError(f"--batch-size {cfg.batch_size} leaves no full batch per loader worker: the data has "
                              f"{self.data['samples']} samples for {max(1, cfg.workers)} worker(s) x "
                              f"{self.world.world_size} process(es); lower --batch-size or --workers")
        if cfg.steps is not None:
            self.total_steps = cfg.steps
        else:
            if self.steps_per_epoch is None:
                raise CosmosError("--epochs needs the shards' sizes.json (or --data synthetic has no epochs); give "
                                  "--steps instead")
            self.total_steps = max(1, round(cfg.epochs * self.steps_per_epoch))
        self.warmup = cfg.warmup if cfg.warmup is not None else min(2000, self.total_steps // 10)
        self.cfg_steps_cap = self.total_steps  # --time-limit fits the total below this
        self._pace_mark = 0.0
        self._elapsed_before = 0.0  # training time of the earlier parts of a resumed run
        self._t_start: float | None = None  # when this part's training loop started
        self.abandoned: list[Path] = []  # newer checkpoints set aside when resuming from an older one
        self.momentum = cfg.ema_momentum if cfg.ema_momentum is not None else default_momentum(self.global_batch)
        self.teacher = None
        if self.loss_cfg.distills:
            self.teacher = Teacher(self.student, self.momentum, self.total_steps, cfg.ema_ramp).to(self.device)

    def _build_training(self) -> None:
        cfg = self.cfg
        self.optimizer = build_optimizer(self.student, cfg)
        self.scaler = torch.amp.GradScaler("cuda") if self.precision == "fp16" else None
        self.forward = StudentForward(self.student, self.loss_cfg.cross(), cfg.text_padding_mask)
        if cfg.compile:
            self.forward = torch.compile(self.forward)
        if self.world.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            with warnings.catch_warnings():  # torch >= 2.12 renames it; the old name still means what we want
                warnings.filterwarnings("ignore", message=".*broadcast_buffers.*deprecated", category=FutureWarning)
                self.forward = DDP(self.forward, device_ids=ids, broadcast_buffers=False)
        self.step_fn = TrainStep(self.forward, self.teacher, self.loss_cfg, self.device, self.precision, self.scaler)
        self.step = 0

    # -- resume -------------------------------------------------------------------------------------------------
    def resolved_config(self) -> dict:
        out = self.cfg.to_dict()
        out.update({
            "total_steps": self.total_steps, "warmup": self.warmup, "ema_momentum": self.momentum,
            "precision": self.precision, "world_size": self.world.world_size, "global_batch": self.global_batch,
            "model_config": self.student.config.to_dict(), "views": dataclasses.asdict(self.views),
            "shards": len(self.data["shards"]), "samples": self.data["samples"],
            "shards_digest": _digest(self.data["shards"]), "steps_per_epoch": self.steps_per_epoch,
            "loss": dataclasses.asdict(self.loss_cfg),
        })
        return _jsonable(out)

    def _load_resumed(self) -> None:
        saved = self.resumed["train"]
        if saved["world_size"] != self.world.world_size:
            raise CosmosError(f"--resume {self.resume_path}: written by {saved['world_size']} process(es), now "
                              f"{self.world.world_size}; resume with the same number of processes")
        ours = self.resolved_config()
        theirs = saved["config"]
        for key in sorted(set(ours) | set(theirs)):
            if key in RESUMABLE_CHANGES or key in ("device", "world_size"):
                continue
            if cfg_time_limited(theirs) and key in ("total_steps", "warmup"):
                continue  # set from the measured pace
            if key == "data" and ours.get("shards_digest") == theirs.get("shards_digest"):
                continue
            if ours.get(key) != theirs.get(key):
                what = "shard list" if key in ("shards_digest", "shards", "samples", "data") else key
                raise CosmosError(f"--resume {self.resume_path}: the run was started with a different {what} "
                                  f"({key}: {theirs.get(key)!r} then, {ours.get(key)!r} now); resume with the same "
                                  "settings, or start a new run in another --out")
        from ..checkpoint import load_state

        load_state(self.student, self.resumed["student"], str(self.resume_path))
        if self.teacher is not None:
            self.teacher.load_state_dict(self.resumed["teacher"])
        self.optimizer.load_state_dict(saved["optimizer"])
        if self.scaler is not None and saved.get("scaler"):
            self.scaler.load_state_dict(saved["scaler"])
        self.step = int(saved["step"])
        if cfg_time_limited(theirs):  # continue the fitted schedule and the time budget where they were
            self.total_steps = int(theirs.get("total_steps", self.total_steps))
            self.warmup = int(theirs.get("warmup", self.warmup))
            if self.teacher is not None:
                self.teacher.total_steps = self.total_steps
            self._elapsed_before = float(saved.get("elapsed_s", 0.0))
        self.resumed_position = saved["loaders"][self.world.rank]
        self.loader.load_state_dict(self.resumed_position)
        rngs = saved.get("rng") or []
        if len(rngs) > self.world.rank:
            set_rng_state(rngs[self.world.rank])
        self.resumed = None  # free the tensors
        # Resumed from an older checkpoint of this run: its newer ones belong to the abandoned continuation. They are
        # set aside (renamed, not deleted), so that neither the rotation of --keep nor `--resume auto` mistakes them
        # for this continuation's.
        folder = self.out / CHECKPOINT_DIR
        if self.is_main and folder.is_dir() and self.resume_path.resolve().parent == folder.resolve():
            for newer in sorted(folder.glob("step_*.pt")):
                if newer.name > self.resume_path.name:
                    target = newer.with_name(newer.name + ".abandoned")
                    os.replace(newer, target)
                    self.abandoned.append(target)

    # -- checkpoints --------------------------------------------------------------------------------------------
    def save_checkpoint(self) -> Path | None:
        """Every rank takes part (loader positions and RNG states are gathered); rank 0 writes."""
        loaders = D.all_gather_object(self.loader.state_dict())
        rngs = D.all_gather_object(rng_state())
        if not self.is_main:
            return None
        train_state = {
            "step": self.step, "world_size": self.world.world_size, "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None, "loaders": loaders,
            "rng": rngs, "config": self.resolved_config(), "elapsed_s": self._train_elapsed(),
        }
        teacher = self.teacher.model if self.teacher is not None else None
        labels = self.labels()
        path = self.out / CHECKPOINT_DIR / f"step_{self.step:08d}.pt"
        meta = {"step": self.step, "mode": self.cfg.mode,  # epoch: completed epochs, as OpenCLIP and COSMOS save it
                "epoch": self.step // self.steps_per_epoch if self.steps_per_epoch else 0}
        if self.data.get("synth_root") is not None:
            meta["templates"] = "synth"  # caption-style prompts: what a model of these scenes understands
        save(path, self.student, self.tokenizer, labels, teacher, extra={"train": train_state, **meta})
        save(self.out / "model.pt", self.student, self.tokenizer, labels, teacher, extra=meta)
        for old in sorted((self.out / CHECKPOINT_DIR).glob("step_*.pt"))[: -self.cfg.keep]:
            old.unlink(missing_ok=True)
        self._plot()
        return path

    def labels(self) -> list[str] | None:
        """A model trained on `cosmos synth` scenes carries the shape names as its default labels."""
        if self.data.get("synth_root") is not None:
            from ..data.synth import SHAPES

            return list(SHAPES)
        return None

    # -- logging ------------------------------------------------------------------------------------------------
    def _metrics_path(self) -> Path:
        return self.out / "metrics.jsonl"

    def _start_metrics(self) -> None:
        if not self.is_main:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        path = self._metrics_path()
        kept = []
        if path.exists():  # a resumed run: keep the lines up to the checkpoint's step
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    row = json.loads(line)
                except ValueError:
                    continue
                if row.get("step", 0) <= self.step:
                    kept.append(row)
        from ..data.shards import atomic_write_bytes, atomic_write_json

        atomic_write_bytes(path, "".join(json.dumps(r) + "\n" for r in kept).encode("utf-8"))
        self.metrics = kept
        atomic_write_json(self.out / "config.json", {**self.resolved_config(), "command": sys.argv,
                                                      "torch": torch.__version__, "device_name": str(self.device)})

    def _log(self, row: dict) -> None:
        self.metrics.append(row)
        if self.is_main:
            with open(self._metrics_path(), "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")

    def _plot(self) -> None:
        from ..plot import line_chart, save_png

        rows = [r for r in self.metrics if "loss" in r]
        series = {name: [(r["step"], r[name]) for r in rows if name in r] for name in ("loss", "clip", "distill")}
        series = {k: v for k, v in series.items() if v}
        save_png(line_chart(series, title=f"training loss ({self.cfg.mode})"), self.out / "loss.png")

    def _validate(self) -> dict:
        if not self.cfg.val or not self.is_main:
            return {}
        from ..zeroshot.synthetic import evaluate_synthetic, is_synth_folder

        model = self.teacher.model if self.teacher is not None else self.student
        val = Path(self.cfg.val)
        self.reporter.message(f"validating at step {self.step}")
        if is_synth_folder(val):
            r = evaluate_synthetic(model, self.tokenizer, val, tasks=("classification", "retrieval"),
                                   precision=self.precision)
            return {f"val_{k}": v for k, v in r.items()}
        return validate_eval_set(model, self.tokenizer, val, self.precision)

    # -- the loop -----------------------------------------------------------------------------------------------
    def batches(self) -> Iterator[dict]:
        """The loader's batches across epochs, without end (the loop stops at total_steps). A resumed loader first
        yields the rest of its epoch (possibly nothing, when the checkpoint fell on the epoch's end)."""
        fresh = self.resumed_position is None
        while True:
            got = False
            for batch in self.loader:
                got = True
                yield batch
            if not got and fresh:
                raise CosmosError(f"--data yields no full batch of {self.batch} in an epoch (damaged samples?); "
                                  "check the data with `cosmos preprocess`, or lower --batch-size")
            self.loader.set_epoch(self.loader.epoch + 1)
            fresh = True

    def run(self) -> TrainResult:
        cfg = self.cfg
        if self.init_report and self.init_report["fresh"]:
            self.reporter.message(f"--init {cfg.init}: {len(self.init_report['fresh'])} COSMOS tensors it lacks "
                                  "(cross-attention poolers, token mappings, distill_logit_scale) start freshly "
                                  "initialized")
        if self.abandoned:
            self.reporter.message(f"resumed from step {self.step}: {len(self.abandoned)} newer checkpoint(s) of the "
                                  f"abandoned continuation set aside as {self.abandoned[0].name} ...")
        self._start_metrics()
        start_step = self.step
        description = f"train {cfg.mode} {self.student.config.vision.image_size}px"
        self.reporter.start(self.total_steps, self.step, description)
        window: dict[str, float] = {}
        window_steps, window_samples, window_wait, window_start = 0, 0, 0.0, time.perf_counter()
        checkpoint, stopped = None, None
        t_start = self._t_start = time.perf_counter()
        source = self.batches()
        try:
            with self.stop:
                while self.step < self.total_steps:
                    t0 = time.perf_counter()
                    views = next(source)
                    window_wait += time.perf_counter() - t0
                    batch = Batch.from_views(views, self.device, self.uses_local)
                    lr = learning_rate(self.step, cfg.lr, self.warmup, self.total_steps)
                    for group in self.optimizer.param_groups:
                        group["lr"] = lr
                    parts = self.step_fn(batch, cfg.accum)
                    parts = self._reduce(parts)
                    if not all(math.isfinite(v) for v in parts.values()):
                        last = latest_checkpoint(self.out)
                        kept = f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
                        raise CosmosError(f"the loss is {parts['loss']} at step {self.step + 1} ({kept}); nothing was "
                                          "saved for this step. Lower --lr, check the data, or use --precision fp32")
                    if self.scaler is not None:
                        self.scaler.step(self.optimizer)
                        self.scaler.update()
                    else:
                        self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
                    self.student.clamp_logit_scales()
                    momentum = self.teacher.update(self.student, self.step) if self.teacher is not None else None
                    self.step += 1
                    for k, v in parts.items():
                        window[k] = window.get(k, 0.0) + v
                    window_steps += 1
                    window_samples += self.global_batch
                    if cfg.time_limit_s is not None:  # before logging: the step that ends the run is logged
                        self._fit_time(time.perf_counter() - t_start, start_step)
                    if self.step % cfg.log_every == 0 or self.step == self.total_steps:
                        elapsed = time.perf_counter() - window_start
                        row = {"step": self.step, "epoch": getattr(self.loader, "epoch", 0)}
                        row.update({k: v / window_steps for k, v in window.items()})
                        row.update({"lr": lr, "logit_scale": float(self.student.logit_scale.detach().exp()),
                                    "samples_per_s": window_samples / elapsed if elapsed > 0 else None,
                                    "data_wait_s": window_wait / window_steps})
                        if hasattr(self.student, "distill_logit_scale") and self.loss_cfg.distills:
                            row["distill_logit_scale"] = float(self.student.distill_logit_scale.detach().exp())
                        if momentum is not None:
                            row["ema_momentum"] = momentum
                        self._log(row)
                        self.reporter.update(self.step, row)
                        window, window_steps, window_samples, window_wait = {}, 0, 0, 0.0
                        window_start = time.perf_counter()
                    if cfg.val and (self.step % cfg.val_every == 0 or self.step == self.total_steps):
                        result = self._validate()
                        if result:
                            self._log({"step": self.step, **result})
                            self.reporter.message("  ".join(f"{k} {100 * v:.1f}" for k, v in result.items()
                                                            if v is not None))
                        D.barrier()
                    if D.any_rank(self.stop.signal is not None, self._flag_device()):
                        stopped = "signal"
                        break
                    if self.step % cfg.save_every == 0 and self.step < self.total_steps:
                        checkpoint = self.save_checkpoint() or checkpoint
            if stopped or self.step >= self.total_steps:
                checkpoint = self.save_checkpoint() or checkpoint
        finally:
            self.reporter.stop()
            _close(source)
        wall = time.perf_counter() - t_start
        done = self.step - start_step
        return TrainResult(self.out, self.step, self.out / "model.pt", checkpoint, self.metrics, wall,
                           done * self.global_batch / wall if wall > 0 else 0.0, stopped)

    def _fit_time(self, elapsed: float, start_step: int) -> None:
        """--time-limit: set the total step count from the measured pace (the schedule follows), first after 5
        steps, then again after 20 and every 50 steps with the pace measured since step 5 (the first steps pay for
        start-up: loader workers, first-call allocations); stop at the limit in any case. A resumed run counts the
        time its earlier part trained. Every rank calls the same collectives at the same steps: whether the limit is
        reached is decided together (any rank past it stops all), the fit is the slowest rank's."""
        done = self.step - start_step
        limit = self.cfg.time_limit_s
        used = self._elapsed_before + elapsed
        if done == 5:
            self._pace_mark = elapsed
        over = D.any_rank(used >= limit, self._flag_device())
        refit = done == 5 or done == 20 or (done > 20 and done % 50 == 0)
        if not (refit or over):
            return
        if over:
            fit = self.step
        else:
            pace = elapsed / done if done == 5 else (elapsed - self._pace_mark) / (done - 5)
            fit = self.step + int((limit - used) / pace)
        self.total_steps = max(self.step, D.all_reduce_min(min(fit, self.cfg_steps_cap), self._flag_device()))
        if self.cfg.warmup is None:  # only ever shortened: a later, longer fit must not restart the warmup
            self.warmup = min(self.warmup, self.total_steps // 10)
        if self.teacher is not None:
            self.teacher.total_steps = self.total_steps
        self.reporter.start(self.total_steps, self.step, "")

    def _train_elapsed(self) -> float:
        """Seconds of training so far, the earlier parts of a resumed run included (for --time-limit)."""
        running = time.perf_counter() - self._t_start if self._t_start is not None else 0.0
        return self._elapsed_before + running

    def _flag_device(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")

    def _reduce(self, parts: dict[str, float]) -> dict[str, float]:
        """The loss parts averaged over ranks (every rank gets the same numbers)."""
        if not self.world.distributed:
            return parts
        keys = sorted(parts)
        t = torch.tensor([parts[k] for k in keys], dtype=torch.float64, device=self._flag_device())
        D.all_reduce_sum(t)
        t /= self.world.world_size
        return dict(zip(keys, t.tolist()))


def cfg_time_limited(config: dict) -> bool:
    return config.get("time_limit_s") is not None


def _close(generator) -> None:
    try:
        generator.close()
    except Exception:  # a loader that failed already reported its own error
        pass


def _digest(items: list[str]) -> str:
    import hashlib

    return hashlib.sha256("\n".join(items).encode()).hexdigest()[:16]


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


# ---------------------------------------------------------------------------------------------------------------
# Starting from weights (--init)
# ---------------------------------------------------------------------------------------------------------------
def read_init(weights: str, quick_gelu: bool = False) -> tuple[CosmosConfig, dict, dict | None]:
    """(model config, state dict, tokenizer state) of any checkpoint `cosmos.load` reads; a COSMOS file gives its
    student (the weights training continues from), a student-less file its teacher."""
    from ..checkpoint import infer_config, resolve_weights

    path = resolve_weights(weights)
    obj = read_checkpoint(path)
    try:
        sd, meta = split_checkpoint(obj, "student", str(path))
    except CosmosError:
        sd, meta = split_checkpoint(obj, "teacher", str(path))
    if isinstance(meta.get("config"), dict):
        config = CosmosConfig.from_dict(meta["config"])
        config.quick_gelu = config.quick_gelu or quick_gelu
    else:
        config = infer_config(sd, quick_gelu=quick_gelu, name=str(path))
    return config, sd, meta.get("tokenizer")


def load_init_weights(model: CosmosModel, sd: dict, name: str) -> dict:
    """Copy the file's tensors into the model: every CLIP tensor must be there with the right shape; COSMOS extras
    the file lacks keep their fresh initialization, extras the model does not use are ignored."""
    from ..checkpoint import load_state

    sd = dict(sd)
    own = model.state_dict()
    fresh = sorted(k for k in own if is_cosmos_extra(k) and k not in sd)
    ignored = sorted(k for k in sd if is_cosmos_extra(k) and k not in own)
    for k in ignored:
        del sd[k]
    for k in fresh:
        sd[k] = own[k]
    load_state(model, sd, name)
    return {"fresh": fresh, "ignored": ignored}


def validate_eval_set(model, tokenizer, path: Path, precision: str) -> dict:
    """Validation on an eval set the `cosmos eval` commands take: a retrieval JSON or an ImageFolder."""
    from ..transforms import eval_transform
    from ..zeroshot.classify import evaluate_classification
    from ..zeroshot.retrieval import evaluate_retrieval, load_retrieval_set

    preprocess = eval_transform(model.image_size)
    was_training = model.training
    model.eval()
    try:
        if path.suffix.lower() == ".json":
            r = evaluate_retrieval(model, preprocess, tokenizer, load_retrieval_set(path), 128, precision)
            return {"val_i2t_R@1": r["i2t_R@1"], "val_t2i_R@1": r["t2i_R@1"]}
        if path.is_dir():
            r = evaluate_classification(model, preprocess, tokenizer, path, None, "openai", 128, precision)
            return {"val_top1": r["top1"]}
    finally:
        model.train(was_training)
    raise CosmosError(f"--val {path}: not a `cosmos synth` folder, a retrieval JSON or an ImageFolder")


def check_val(path: str | None) -> None:
    if path is None:
        return
    p = Path(path)
    if not p.exists():
        raise CosmosError(f"--val {path}: no such file or folder")


def train(cfg: TrainConfig, reporter: Reporter | None = None) -> TrainResult:
    """Run (or resume) a training run; see the module docstring. Raises CosmosError for bad input before writing."""
    check_val(cfg.val)
    try:
        run = Run(cfg, reporter)
        result = run.run()
        D.barrier()
    except RuntimeError as e:
        if not _peer_failed(e):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CosmosError(f"another process of this run failed, so this one stops ({first[:200]}); under torchrun "
                          "--max-restarts N with --resume auto the run restarts from its last checkpoint") from None
    return result


def _peer_failed(error: RuntimeError) -> bool:
    """A collective that failed because another rank died (gloo / NCCL transport errors, elastic timeouts)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return False
    text = str(error)
    return isinstance(error, dist.DistError) or any(
        s in text for s in ("Connection closed by peer", "Connection reset", "gloo", "Gloo", "NCCL", "timed out"))
