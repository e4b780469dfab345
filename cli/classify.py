"""`cosmos classify IMG... --labels cat,dog`: zero-shot class probabilities for images, as tables or JSON."""
from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table
from rich.text import Text

from .common import (
    DEVICE, PRECISION, QUICK_GELU, WEIGHTS, WHICH, check_precision, cli_errors, console, load_model, model_labels,
    print_error, progress_bar,
)

TABLE_TOP = 5  # labels per table without --top; --json lists every label unless --top is given


# --- cosmos classify -----------------------------------------------------------------------------------------------
@cli_errors
def classify(
    images: List[Path] = typer.Argument(..., help="image files (JPEG, PNG, WebP, ...)", show_default=False),
    labels: Optional[str] = typer.Option(
        None, "--labels", "-l", help="comma-separated class names; 'dog;puppy' = several names for one class "
        "(default: the checkpoint's own labels)"),
    weights: str = WEIGHTS,
    templates: Optional[str] = typer.Option(
        None, "--templates", "-t", help="openai (80 prompts), simple (7), synth, or one template with {} "
        "(default: the checkpoint's own, else openai)"),
    top: Optional[int] = typer.Option(
        None, "--top", "-k", min=1, help=f"show the K most likely labels (default: {TABLE_TOP} in tables, all in --json)"),
    as_json: bool = typer.Option(False, "--json", help="print a JSON list instead of tables"),
    device: Optional[str] = DEVICE,
    precision: str = PRECISION,
    which: str = WHICH,
    quick_gelu: bool = QUICK_GELU,
    batch_size: int = typer.Option(32, "--batch-size", min=1, help="images per forward pass"),
) -> None:
    """Zero-shot classification: probabilities = softmax(logit_scale * cosine) over the labels."""
    from cosmos.device import resolve_precision
    from cosmos.zeroshot.classify import build_class_embeddings, classify_images, image_batches, model_device
    from cosmos.zeroshot.templates import parse_labels, resolve_templates

    classes = parse_labels(labels) if labels is not None else None
    if templates is not None:
        resolve_templates(templates)  # checked before the model is loaded
    check_precision(precision)
    model, preprocess, tokenizer = load_model(weights, device, which, quick_gelu)
    template_list = resolve_templates(templates or getattr(model, "templates", None) or "openai")
    precision = resolve_precision(model_device(model), precision)
    if classes is None:
        classes = model_labels(model)
    with progress_bar("encoding class prompts") as update:
        classifier = build_class_embeddings(model, tokenizer, classes, template_list, precision=precision,
                                            progress=update)
    shown = top if top is not None else (len(classes) if as_json else TABLE_TOP)

    failed = 0

    def report(index: int, message: str) -> None:  # an unreadable file: one line, the others go on
        nonlocal failed
        failed += 1
        print_error(message)

    results = []
    with progress_bar("classifying", total=len(images)) as update:
        # Images are opened and preprocessed one batch at a time, so memory does not grow with their number.
        for indices, batch in image_batches(images, preprocess, batch_size, on_error=report):
            probs = classify_images(model, batch, classifier, precision).cpu()  # [b, C]
            for index, row in zip(indices, probs):
                order = row.argsort(descending=True)[:shown].tolist()
                results.append({"image": str(images[index]),
                                "labels": [{"label": ";".join(classes[i]), "prob": row[i].item()} for i in order]})
            update(indices[-1] + 1)

    if as_json:
        typer.echo(json.dumps(results, indent=2, allow_nan=False))
    else:
        for result in results:
            console.print(Text(result["image"], style="bold"))  # above the table: a long path is not wrapped
            table = Table()
            table.add_column("label")
            table.add_column("probability", justify="right")
            for entry in result["labels"]:
                table.add_row(Text(entry["label"]), f"{entry['prob']:.4f}")
            console.print(table)
    if failed:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.command("classify")(classify)
