"""`cosmos synth`: write the synthetic scenes (training shards + evaluation sets) to a directory."""
from __future__ import annotations

from pathlib import Path

import typer
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn

from .common import cli_errors, console, make_progress


@cli_errors
def synth(
    out: Path = typer.Option(..., "--out", help="Output directory (must be empty unless --overwrite)."),
    n: int = typer.Option(..., "--n", help="Number of training scenes."),
    seed: int = typer.Option(0, "--seed", help="Seed: the same seed writes byte-identical files."),
    size: int = typer.Option(128, "--size", help="Image side in pixels (at least 32)."),
    n_eval: int = typer.Option(500, "--n-eval", help="Images per evaluation set (0 writes no evaluation sets)."),
    image_format: str = typer.Option("png", "--format", help="Training image format: png or jpg."),
    masks: bool = typer.Option(False, "--masks", help="Also store each training scene's masks in the shards."),
    maxcount: int = typer.Option(1000, "--maxcount", help="Samples per shard."),
    workers: int = typer.Option(0, "--workers", help="Worker processes (0 = one per CPU core available)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace synthetic data already in --out."),
) -> None:
    """Procedural image-text scenes with exact masks: training shards in DIR/train, eval sets in DIR/eval."""
    from cosmos.data.synth import EVAL_SETS, write_synth

    total = n + n_eval * len(EVAL_SETS)
    columns = (TextColumn("synth"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with make_progress(*columns, console=console) as bar:
        task = bar.add_task("synth", total=total)
        write_synth(out, n=n, seed=seed, size=size, n_eval=n_eval, overwrite=overwrite, image_format=image_format,
                    masks=masks, maxcount=maxcount, workers=workers,
                    progress=lambda k: bar.advance(task, k))
    evals = f" and {n_eval} per eval set to {out / 'eval'}" if n_eval else " (no eval sets: --n-eval 0)"
    console.print(f"wrote {n} training scenes to {out / 'train'}{evals}")


def register(app: typer.Typer) -> None:
    app.command("synth")(synth)
