"""`cosmos train --data SHARDS --out RUN`: COSMOS (or a CLIP baseline) pre-training, on a CPU or under torchrun."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.text import Text

from .common import cli_errors, console, err_console, fail, make_progress


class _Bar:
    """The training progress bar (rank 0 only): loss, lr, samples/s, elapsed, ETA."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.progress = None
        self.task = None

    def start(self, total: int, done: int, description: str) -> None:
        if not self.enabled:
            return
        if self.progress is not None:  # the run re-planned its length (--time-limit)
            self.progress.update(self.task, total=total, completed=done)
            return
        self.progress = make_progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"), TextColumn("lr {task.fields[lr]}"),
            TextColumn("{task.fields[speed]} samples/s"), TimeElapsedColumn(), TimeRemainingColumn())
        self.progress.start()
        self.task = self.progress.add_task(description, total=total, completed=done, loss="-", lr="-", speed="-")

    def update(self, step: int, stats: dict) -> None:
        if self.progress is None:
            return
        speed = stats.get("samples_per_s")
        self.progress.update(self.task, completed=step, loss=f"{stats.get('loss', float('nan')):.4f}",
                             lr=f"{stats.get('lr', 0):.2e}", speed=f"{speed:.1f}" if speed else "-")

    def message(self, text: str) -> None:
        if self.enabled:
            (self.progress.console if self.progress else err_console).print(Text(text), highlight=False)

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


def _pair(text: str, option: str) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in text.split(","))
    except ValueError:
        fail(f"{option} {text!r}: give two numbers, low,high (e.g. 0.4,1.0)")
    if not 0 < low <= high <= 1:
        fail(f"{option} {text!r}: need 0 < low <= high <= 1")
    return low, high


def _launch_torchrun(nproc: int) -> None:
    """Re-run this command under torchrun with nproc processes on this node (--nproc removed)."""
    args, skip = [], False
    for i, arg in enumerate(sys.argv[1:]):
        if skip:
            skip = False
            continue
        if arg == "--nproc":
            skip = True
            continue
        if arg.startswith("--nproc="):
            continue
        args.append(arg)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "cosmos_cli.main", *args]
    err_console.print(Text("launching: " + " ".join(command)), highlight=False)
    try:
        code = subprocess.call(command)
    except KeyboardInterrupt:
        code = 130
    raise typer.Exit(code)


@cli_errors
def train(
    data: str = typer.Option(..., "--data", "-d", help="shards (folder, pattern, a::b list), a `cosmos synth` folder, "
                             "or 'synthetic' (random views, for throughput)"),
    out: Path = typer.Option(..., "--out", "-o", help="run folder: config.json, metrics.jsonl, loss.png, model.pt, "
                             "checkpoints/"),
    model: str = typer.Option("tiny", "--model", "-m", help="tiny (trains on a CPU), ViT-B-16 or ViT-B-32"),
    init: Optional[str] = typer.Option(None, "--init", help="start from these weights (any checkpoint cosmos.load "
                                       "reads, or a released name); the config comes from the file"),
    mode: str = typer.Option("cosmos", "--mode", help="cosmos, clip (one view, one caption) or clip-textcrops"),
    steps: Optional[int] = typer.Option(None, "--steps", help="optimizer steps (or --epochs)"),
    epochs: Optional[float] = typer.Option(None, "--epochs", help="passes over the data (or --steps)"),
    batch_size: int = typer.Option(64, "--batch-size", "-b", help="samples per process per step"),
    accum: int = typer.Option(1, "--accum", help="split each batch into N micro-batches (exact for the "
                              "contrastive loss, GradCache style)"),
    lr: float = typer.Option(5e-4, "--lr"),
    wd: float = typer.Option(0.5, "--wd", help="AdamW weight decay (not on gains, biases, norms, temperatures)"),
    warmup: Optional[int] = typer.Option(None, "--warmup", help="warmup steps (default min(2000, 10% of the steps))"),
    ema_momentum: Optional[float] = typer.Option(None, "--ema-momentum",
                                                 help="teacher EMA momentum (default 0.999; 0.99 from a global "
                                                 "batch of 2,048)"),
    ema_ramp: bool = typer.Option(False, "--ema-ramp", help="cosine ramp of the momentum to 1.0 (DINO)"),
    precision: str = typer.Option("auto", "--precision", help="auto, bf16, fp16 (CUDA) or fp32"),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda (default: cuda if present)"),
    grad_checkpointing: bool = typer.Option(False, "--grad-checkpointing"),
    compile_model: bool = typer.Option(False, "--compile", help="torch.compile the student's forward"),
    seed: int = typer.Option(0, "--seed"),
    workers: int = typer.Option(2, "--workers", help="data loading processes per training process"),
    log_every: int = typer.Option(10, "--log-every", help="steps between metrics.jsonl lines"),
    save_every: int = typer.Option(500, "--save-every", help="steps between checkpoints"),
    keep: int = typer.Option(2, "--keep", help="step checkpoints to keep"),
    val: Optional[str] = typer.Option(None, "--val", help="a `cosmos synth` folder, a retrieval JSON or an "
                                      "ImageFolder: zero-shot metrics every --val-every steps"),
    val_every: int = typer.Option(500, "--val-every"),
    resume: Optional[str] = typer.Option(None, "--resume", help="a checkpoint file, or 'auto' (the latest in "
                                         "--out; a fresh start if none)"),
    official_padding: bool = typer.Option(False, "--official-padding", help="text cross-attention attends to the "
                                          "padding of full 77-token captions, as the official code (quirk 2)"),
    distill_image: bool = typer.Option(True, "--distill-image/--no-distill-image",
                                       help="ablation: the distillation terms of the image views (h_I)"),
    distill_text: bool = typer.Option(True, "--distill-text/--no-distill-text",
                                      help="ablation: the distillation terms of the caption views (h_T)"),
    cross_attention: bool = typer.Option(True, "--cross-attention/--no-cross-attention",
                                         help="ablation: without it h_I / h_T are the pooled embeddings"),
    local_crops: int = typer.Option(6, "--local-crops", help="local image crops (cosmos mode)"),
    global_scale: str = typer.Option("0.4,1.0", "--global-scale", help="area range of the global crops"),
    local_scale: str = typer.Option("0.05,0.4", "--local-scale", help="area range of the local crops"),
    hflip: Optional[float] = typer.Option(None, "--hflip", help="flip probability (default 0.5; 0 for `cosmos "
                                          "synth` data, whose captions say left / right)"),
    clip_text: str = typer.Option("caption", "--clip-text", help="clip mode's caption: caption (a random field), "
                                  "raw (the alt-text) or sentence"),
    vocab_size: Optional[int] = typer.Option(None, "--vocab-size", help="learn a byte-level BPE vocabulary of this "
                                             "many ids from the training captions (default: CLIP's 49,408)"),
    quick_gelu: bool = typer.Option(False, "--quick-gelu"),
    time_limit: Optional[float] = typer.Option(None, "--time-limit", help="minutes: fit the run into this time "
                                               "(the step count and schedule follow the measured pace)"),
    nproc: int = typer.Option(1, "--nproc", help="launch torchrun with N processes on this node"),
) -> None:
    """Train COSMOS (or a CLIP baseline) and write a run folder; see README 'cosmos train'."""
    if nproc > 1 and "LOCAL_RANK" not in os.environ:
        _launch_torchrun(nproc)
    if nproc < 1:
        fail(f"--nproc must be at least 1, got {nproc}")
    from cosmos.train.loop import TrainConfig
    from cosmos.train.loop import train as run_training

    cfg = TrainConfig(
        data=data, out=str(out), model=model, init=init, mode=mode, steps=steps, epochs=epochs,
        batch_size=batch_size, accum=accum, lr=lr, weight_decay=wd, warmup=warmup, ema_momentum=ema_momentum,
        ema_ramp=ema_ramp, precision=precision, device=device, grad_checkpointing=grad_checkpointing,
        compile=compile_model, seed=seed, workers=workers, log_every=log_every, save_every=save_every, keep=keep,
        val=val, val_every=val_every, resume=resume, text_padding_mask=not official_padding,
        distill_image=distill_image, distill_text=distill_text, cross_attention=cross_attention,
        local_crops=local_crops, global_scale=_pair(global_scale, "--global-scale"),
        local_scale=_pair(local_scale, "--local-scale"), hflip=hflip, clip_text=clip_text, quick_gelu=quick_gelu,
        vocab_size=vocab_size, time_limit_s=time_limit * 60 if time_limit is not None else None,
    )
    rank = int(os.environ.get("RANK", "0") or 0)
    bar = _Bar(enabled=rank == 0)
    result = run_training(cfg, bar)
    if rank != 0:
        return
    loss = next((r["loss"] for r in reversed(result.metrics) if "loss" in r), None)
    summary = f"step {result.steps}" + (f", loss {loss:.4f}" if loss is not None else "")
    summary += f", {result.samples_per_s:.1f} samples/s over {result.wall_s:.0f} s"
    if result.stopped:
        console.print(Text(f"stopped by a signal at {summary}; checkpoint {result.checkpoint}; continue with "
                           f"--resume auto"), highlight=False)
        raise typer.Exit(130)
    console.print(Text(f"done: {summary}"), highlight=False)
    console.print(Text(f"model: {result.model_path}  (cosmos classify IMG --weights {result.model_path})"),
                  highlight=False)


def register(app: typer.Typer) -> None:
    app.command("train")(train)
