"""`cosmos preprocess SRC --out DIR`: images + captions -> webdataset tar shards (cosmos.data.preprocess)."""
from __future__ import annotations

import shlex
import sys
from pathlib import Path

import typer
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from .common import check_output, cli_errors, console, make_progress


def register(app: typer.Typer) -> None:
    @app.command("preprocess")
    @cli_errors
    def preprocess_command(
        src: Path = typer.Argument(..., help="A folder of images with KEY.txt / KEY.json captions beside them, "
                                             "or a .csv / .tsv / .jsonl file (image paths relative to it)."),
        out: Path = typer.Option(..., "--out", "-o", help="Folder for the shards, sizes.json and manifest.json."),
        max_size: int = typer.Option(256, help="Shrink images so the shorter side is at most this many pixels."),
        quality: int = typer.Option(95, help="JPEG quality of the re-encoded images."),
        workers: int = typer.Option(2, help="Worker processes."),
        shard_size: int = typer.Option(1000, help="Samples per shard."),
        image_column: str = typer.Option("filepath", help="Table column holding the image path."),
        caption_columns: str = typer.Option("title", help="Comma-separated table columns holding captions; "
                                                          "each becomes a caption field."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace the shards in a non-empty --out."),
    ) -> None:
        """Split captions into sentences, validate them, shrink and re-encode images, write tar shards."""
        from cosmos.data.preprocess import preprocess

        check_output(out, "--out", kind="folder")
        columns = [c.strip() for c in caption_columns.split(",") if c.strip()]
        command = " ".join(shlex.quote(a) for a in ["cosmos", *sys.argv[1:]])
        with make_progress(TextColumn("preprocess"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                           TimeRemainingColumn(), console=console) as bar:
            task = bar.add_task("samples", total=None)

            def progress(done: int, total: int) -> None:
                bar.update(task, completed=done, total=total)

            result = preprocess(src, out, max_size=max_size, quality=quality, workers=workers,
                                shard_size=shard_size, image_column=image_column, caption_columns=columns,
                                overwrite=overwrite, command=command, progress=progress)

        table = Table(title=f"{src} -> {out}", show_lines=False)
        table.add_column("result")
        table.add_column("samples", justify="right")
        table.add_column("example")
        table.add_row("written", str(result.written), f"{len(result.shards)} shard(s)")
        for kind, count in result.skipped_by_kind().items():
            example = next(s["reason"] for s in result.skipped if s["kind"] == kind)
            table.add_row(f"skipped: {kind}", str(count), example)
        console.print(table)
        console.print(f"manifest: {Path(out) / 'manifest.json'}", highlight=False)
