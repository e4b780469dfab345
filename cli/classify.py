"""`cosmos classify IMG... --labels cat,dog`: zero-shot class probabilities for images, as tables or JSON.

"""
from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from .common import (
    DEFAULT_WEIGHTS, PRECISION_HELP, QUICK_GELU_HELP, WHICH_HELP, check_precision, cli_errors, console, err_console,
    load_model, model_labels, progress_bar,
)

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
    precision: str = typer.Option("auto", "--precision", help=PRECISION_HELP),
    which: str = typer.Option("teacher", "--which", help=WHICH_HELP),
    quick_gelu: bool = typer.Option(False, "--quick-gelu", help=QUICK_GELU_HELP),
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
    model, preprocess, tokenizer = load_model(weights, device, which, quick_gelu)
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
