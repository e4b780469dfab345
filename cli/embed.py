"""`cosmos embed`, `cosmos search` and `cosmos export`: embedding collections and checkpoints for other tools."""
from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table
from rich.text import Text

from .common import (
    DEVICE, PRECISION, QUICK_GELU, WEIGHTS, WHICH, check_output, check_precision, cli_errors, console, err_console,
    load_model, progress_bar,
)


@cli_errors
def embed(
    inputs: Optional[List[Path]] = typer.Argument(None, help="image files and folders (searched recursively)",
                                                  show_default=False),
    texts: Optional[Path] = typer.Option(None, "--texts", help="a text file: one text per line (instead of images)"),
    out: Path = typer.Option(..., "--out", "-o", help="the embedding folder (extended if it exists)"),
    weights: str = WEIGHTS,
    which: str = WHICH,
    quick_gelu: bool = QUICK_GELU,
    dtype: str = typer.Option("float16", "--dtype", help="float16 or float32"),
    batch_size: int = typer.Option(64, "--batch-size", min=1),
    workers: int = typer.Option(2, "--workers", min=0, help="image decoding processes"),
    device: Optional[str] = DEVICE,
    precision: str = PRECISION,
) -> None:
    """Embed images (a folder, searched recursively, or files) or texts (--texts FILE) into OUT/embeddings.npy with
    OUT/index.jsonl and OUT/meta.json; a second run adds only what is new."""
    from cosmos.device import resolve_precision
    from cosmos.embeddings import describe, embed as embed_collection, list_images, read_texts
    from cosmos.errors import CosmosError
    from cosmos.zeroshot.classify import model_device

    if bool(inputs) == (texts is not None):
        raise CosmosError("give image files / folders, or --texts FILE (not both)")
    check_output(out, "--out", kind="folder")
    check_precision(precision)
    images = list_images(inputs) if inputs else None
    text_list = read_texts(texts) if texts is not None else None
    model, _, tokenizer = load_model(weights, device, which, quick_gelu)
    precision = resolve_precision(model_device(model), precision)
    # a file is recorded by its absolute path, so `search` finds it from any folder; a released name as it is
    recorded = str(Path(weights).expanduser().resolve()) if Path(weights).expanduser().is_file() else weights
    meta = {"model": describe(model), "weights": recorded, "which": which, "quick_gelu": quick_gelu,
            "precision": precision,
            "device": str(model_device(model)), "command": " ".join(shlex.quote(a) for a in ["cosmos", *sys.argv[1:]])}
    total = len(images) if images is not None else len(text_list)
    with progress_bar("embedding", total=total) as update:
        result = embed_collection(model, tokenizer, out, images=images, texts=text_list, meta=meta,
                                  batch_size=batch_size, workers=workers, precision=precision, dtype=dtype,
                                  progress=lambda done, n: update(done, n))
    for item in result.skipped:  # never fatal: listed here and in meta.json
        err_console.print(Text(f"skipped: {item['reason']}"), highlight=False)
    if result.dropped:
        err_console.print(Text(f"dropped {len(result.dropped)} row(s) whose file is gone (first: "
                               f"{result.dropped[0]})"), highlight=False)
    console.print(Text(f"{out}: {result.count} embeddings ({result.added} new, {result.kept} kept, "
                       f"{len(result.skipped)} skipped)"), highlight=False)


@cli_errors
def search(
    collection: Path = typer.Argument(..., help="an embedding folder made by `cosmos embed`"),
    text: Optional[str] = typer.Option(None, "--text", help="a text query"),
    image: Optional[Path] = typer.Option(None, "--image", help="an image query"),
    top: int = typer.Option(10, "--top", help="number of hits"),
    as_json: bool = typer.Option(False, "--json", help='print [{"rank", "score", "item"}]'),
    sheet: Optional[Path] = typer.Option(None, "--sheet", help="write a contact sheet PNG of the image hits"),
    weights: Optional[str] = typer.Option(None, "--weights", "-w", help="the model to encode the query (default: the "
                                          "one that made the collection; another one is refused)"),
    quick_gelu: bool = QUICK_GELU,
    device: Optional[str] = DEVICE,
    precision: str = PRECISION,
) -> None:
    """Exact cosine top-k of a text or image query over a collection."""
    from cosmos.embeddings import contact_sheet, model_digest, open_collection, top_k
    from cosmos.errors import CosmosError
    from cosmos.images import open_image
    from cosmos.plot import save_png
    from cosmos.transforms import eval_transform
    from cosmos.zeroshot.classify import encode_images, encode_texts

    if (text is None) == (image is None):
        raise CosmosError("give one query: --text \"...\" or --image FILE")
    if top < 1:
        raise CosmosError(f"--top must be at least 1, got {top}")
    if text is not None and not text.strip():
        raise CosmosError("--text is empty; give the words to search for")
    if sheet is not None:
        check_output(sheet, "--sheet")
    check_precision(precision)
    found = open_collection(collection)
    if sheet is not None and found.kind != "image":
        raise CosmosError(f"--sheet draws image hits, but {collection} holds texts")
    theirs = found.meta.get("weights")
    model_name = weights or theirs
    quick_gelu = quick_gelu or bool(found.meta.get("quick_gelu", False))  # as the collection was embedded
    model, _, tokenizer = load_model(model_name, device, found.meta.get("which", "teacher"), quick_gelu)
    if model_digest(model) != found.meta.get("digest"):
        same = weights is None or str(Path(weights).expanduser().resolve()) == theirs or weights == theirs
        if same:
            raise CosmosError(f"{collection} was embedded with {theirs} ({found.meta.get('which')}), whose weights "
                              "have changed since (another file at that path now): scores across two models mean "
                              "nothing; embed the collection again into a new --out")
        raise CosmosError(f"{collection} was embedded with {theirs} ({found.meta.get('which')}), "
                          f"but the query would be encoded with {model_name}: scores across two models mean nothing; "
                          f"search with --weights {theirs}")
    from cosmos.device import resolve_precision
    from cosmos.zeroshot.classify import model_device

    precision = resolve_precision(model_device(model), precision)
    if text is not None:
        query = encode_texts(model, tokenizer, [text], precision=precision)[0]
    else:
        query = encode_images(model, eval_transform(model.image_size)(open_image(image))[None], precision)[0]
    hits = top_k(found.matrix(), query.cpu().numpy(), top)
    key = "path" if found.kind == "image" else "text"
    results = [{"rank": i + 1, "score": round(score, 6), "item": found.rows[row][key]} for i, (row, score) in
               enumerate(hits)]
    if as_json:
        typer.echo(json.dumps(results, indent=2, ensure_ascii=False, allow_nan=False))
    else:
        table = Table(title=Text(f"{text!r}" if text is not None else str(image)), title_justify="left")
        table.add_column("rank", justify="right")
        table.add_column("score", justify="right")
        table.add_column(key)
        for r in results:
            table.add_row(str(r["rank"]), f"{r['score']:.4f}", Text(str(r["item"])))
        console.print(table)
    if sheet is not None:
        save_png(contact_sheet([(r["item"], r["score"]) for r in results]), sheet)
        (err_console if as_json else console).print(Text(f"contact sheet: {sheet}"), highlight=False)


@cli_errors
def export(
    checkpoint: str = typer.Argument(..., help="a checkpoint cosmos reads (path or name)"),
    out: Path = typer.Option(..., "--out", "-o", help="the file to write"),
    fmt: str = typer.Option("openclip", "--format", help="openclip (a state dict open_clip loads strictly) or cosmos "
                            "(the released COSMOS layout: student + teacher)"),
    which: str = typer.Option("teacher", "--which", help="openclip: which weights (teacher or student)"),
    quick_gelu: bool = QUICK_GELU,
) -> None:
    """Write a checkpoint for the rest of the ecosystem (OpenCLIP, the official COSMOS code)."""
    from cosmos.checkpoint import export_cosmos, export_openclip

    check_output(out, "--out")
    if fmt == "openclip":
        name, quick = export_openclip(checkpoint, out, which, quick_gelu)
        if name.startswith("{"):  # not a named OpenCLIP config: the constructor's arguments, one JSON line
            typer.echo(f"wrote {out}; OpenCLIP model: open_clip.model.CLIP(**kwargs) with kwargs (vision_cfg / "
                       "text_cfg as CLIPVisionCfg / CLIPTextCfg), then "
                       "load_state_dict(torch.load(FILE, weights_only=True), strict=True):")
            typer.echo(name)
        else:
            typer.echo(f"wrote {out}; OpenCLIP model: open_clip.create_model({name!r}), then "
                       f"load_state_dict(torch.load({str(out)!r}, weights_only=True), strict=True)")
        typer.echo(f"QuickGELU: {'yes (the -quickgelu model name, or quick_gelu=True)' if quick else 'no'}")
    elif fmt == "cosmos":
        export_cosmos(checkpoint, out)
        console.print(Text(f"wrote {out} in the released COSMOS layout (student, teacher)"), highlight=False)
    else:
        from cosmos.errors import CosmosError

        raise CosmosError(f"--format {fmt!r}: use openclip or cosmos")


def register(app: typer.Typer) -> None:
    app.command("embed")(embed)
    app.command("search")(search)
    app.command("export")(export)
