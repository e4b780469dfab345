"""`cosmos classify IMG... --labels cat,dog`: zero-shot class probabilities for images, as tables or JSON.

Also holds the option helpers the other zero-shot commands (segment, eval) share: model loading with a progress
bar for downloads, and the progress bar itself.
"""
from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, List, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from .common import DEFAULT_WEIGHTS, cli_errors, console, err_console

WHICH_HELP = "which weights of a COSMOS checkpoint: teacher (the paper's evaluation) or student"


# --- shared by the zero-shot commands ----------------------------------------------------------------------------
@contextmanager
def progress_bar(description: str, total: int | None = None) -> Iterator:
    """A rich progress bar on stderr (stdout stays clean for --json); yields update(done, total)."""
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn()]
    with Progress(*columns, console=err_console, transient=True) as progress:
        task = progress.add_task(description, total=total)

        def update(done: int, total_: int | None = None) -> None:
            progress.update(task, completed=done, total=total_ if total_ is not None else total)

        yield update


def load_model(weights: str, device: Optional[str], which: str):
    """(model, preprocess, tokenizer) via cosmos.checkpoint.load, with a download bar for registry names."""
    from cosmos.checkpoint import load

    if which not in ("teacher", "student"):
        from cosmos.errors import CosmosError

        raise CosmosError(f"--which must be 'teacher' or 'student', got {which!r}")
    with progress_bar(f"loading {weights}") as update:
        return load(weights, device=device, which=which, progress=lambda done, total: update(done, total))


def check_precision(precision: str) -> str:
    from cosmos.errors import CosmosError

    if precision not in ("fp32", "bf16"):
        raise CosmosError(f"--precision must be fp32 or bf16, got {precision!r}")
    return precision


def model_labels(model, where: str = "--labels") -> list[list[str]]:
    """The checkpoint's own label set, or a clear error asking for --labels."""
    from cosmos.errors import CosmosError
    from cosmos.zeroshot.templates import parse_class_names

    if not getattr(model, "labels", None):
        raise CosmosError(f"this checkpoint carries no class names; give them with {where} (e.g. --labels cat,dog)")
    return [names for names in (parse_class_names(label) for label in model.labels) if names]


# --- cosmos classify -----------------------------------------------------------------------------------------------
@cli_errors
def classify(
    images: List[Path] = typer.Argument(..., help="image files (JPEG, PNG, WebP, ...)", show_default=False),
    labels: Optional[str] = typer.Option(
        None, "--labels", "-l", help="comma-separated class names; 'dog;puppy' = several names for one class "
        "(default: the checkpoint's own labels)"),
    weights: str = typer.Option(DEFAULT_WEIGHTS, "--weights", "-w", help="checkpoint file or released name"),
    templates: str = typer.Option(
        "openai", "--templates", "-t", help="openai (80 prompts), simple (7), synth, or one template with {}"),
    top: int = typer.Option(5, "--top", "-k", min=1, help="show the K most likely labels"),
    as_json: bool = typer.Option(False, "--json", help="print a JSON list instead of tables"),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:1 ... (default: cuda if present)"),
    precision: str = typer.Option("fp32", "--precision", help="fp32 or bf16 (autocast)"),
    which: str = typer.Option("teacher", "--which", help=WHICH_HELP),
    batch_size: int = typer.Option(32, "--batch-size", min=1, help="images per forward pass"),
) -> None:
    """Zero-shot classification: probabilities = softmax(logit_scale * cosine) over the labels."""
    import torch

    from cosmos.errors import CosmosError
    from cosmos.images import open_image
    from cosmos.zeroshot.classify import build_class_embeddings, classify_images
    from cosmos.zeroshot.templates import parse_labels, resolve_templates

    classes = parse_labels(labels) if labels is not None else None
    template_list = resolve_templates(templates)
    check_precision(precision)
    model, preprocess, tokenizer = load_model(weights, device, which)
    if classes is None:
        classes = model_labels(model)
    with progress_bar("encoding class prompts") as update:
        classifier = build_class_embeddings(model, tokenizer, classes, template_list, precision=precision,
                                            progress=update)

    failed = 0
    opened: list[tuple[Path, torch.Tensor]] = []
    for path in images:
        try:
            opened.append((path, preprocess(open_image(path))))  # [3, S, S]
        except CosmosError as e:
            failed += 1
            err_console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
    results = []
    with progress_bar("classifying", total=len(opened)) as update:
        for start in range(0, len(opened), batch_size):
            chunk = opened[start : start + batch_size]
            probs = classify_images(model, torch.stack([x for _, x in chunk]), classifier, precision)  # [b, C]
            for (path, _), row in zip(chunk, probs.cpu()):
                order = row.argsort(descending=True)[:top].tolist()
                results.append({"image": str(path),
                                "labels": [{"label": ";".join(classes[i]), "prob": row[i].item()} for i in order]})
            update(start + len(chunk))

    if as_json:
        typer.echo(json.dumps(results, indent=2))
    else:
        for result in results:
            table = Table(title=result["image"], title_justify="left")
            table.add_column("label")
            table.add_column("probability", justify="right")
            for entry in result["labels"]:
                table.add_row(entry["label"], f"{entry['prob']:.4f}")
            console.print(table)
    if failed:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.command("classify")(classify)
