"""`cosmos eval classification|retrieval|segmentation`: zero-shot benchmarks, as tables and JSON.

Each command takes either `--data` (a standard layout) or `--synthetic DIR` (the eval sets `cosmos synth` wrote
under DIR/eval), prints a table, and with `--out results.json` writes the figures and the settings used.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table
from rich.text import Text

from .common import (
    DEVICE, PRECISION, QUICK_GELU, WEIGHTS, WHICH, check_output, check_precision, cli_errors, console, load_model,
    progress_bar,
)
from .segment import (
    AREA_THRESHOLD, BENCHMARK, LOGIT_SCALE, METHOD, SHORT_SIDE, STRIDE, WINDOW, WINDOW_BATCH, segmenter_options,
)

eval_app = typer.Typer(help="Zero-shot evaluation: classification, retrieval, segmentation.", no_args_is_help=True)

# Options every eval command shares.
OUT = typer.Option(None, "--out", "-o", help="write the results as JSON to this file")
SYNTHETIC = typer.Option(None, "--synthetic", help="a `cosmos synth` output folder: run its eval sets")
PER_CLASS = typer.Option(False, "--per-class", help="also print the per-class table (always in --out)")


def _data_or_synthetic(data: Optional[Path], synthetic: Optional[Path], sets: dict[str, str],
                       classnames: Optional[Path] = None) -> dict[str, Path]:
    """{set name: path} from --data or from the synthetic eval folder."""
    from cosmos.errors import CosmosError

    if (data is None) == (synthetic is None):
        raise CosmosError("give exactly one of --data and --synthetic")
    if synthetic is not None and classnames is not None:
        raise CosmosError("--classnames applies to one --data set; the --synthetic sets carry their own class names "
                          "(drop --classnames, or evaluate one set with --data DIR/eval/<set> --classnames F)")
    if data is not None:
        return {data.name or str(data): data}
    paths = {name: synthetic / "eval" / relative for name, relative in sets.items()}
    missing = [str(p) for p in paths.values() if not p.exists()]
    if missing:
        raise CosmosError(f"{missing[0]}: not found; is {synthetic} a `cosmos synth --out` folder?")
    return paths


def _settings(model, weights: str, which: str, precision: str, **more) -> dict:
    """The settings recorded with the results: the device and precision actually used ("auto" resolved)."""
    from cosmos.zeroshot.classify import model_device

    return {"weights": weights, "which": which, "device": str(model_device(model)), "precision": precision, **more}


def _resolved(model, precision: str) -> str:
    from cosmos.device import resolve_precision
    from cosmos.zeroshot.classify import model_device

    return resolve_precision(model_device(model), precision)


def _write(out: Optional[Path], results: dict, settings: dict) -> None:
    if out is None:
        return
    from cosmos.errors import CosmosError

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"settings": settings, "results": results}, indent=2) + "\n", encoding="utf-8")
    except OSError as e:
        raise CosmosError(f"{out}: cannot write the results ({e.strerror or e})") from None
    console.print(Text(f"results written to {out}"), highlight=False)


def _percent(value) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def _detail_table(title: str, column: str, key: str, rows: list[dict]) -> Table:
    """One row per class (a list, so two classes with the same name stay apart)."""
    table = Table(title=Text(title), title_justify="left")
    table.add_column("#", justify="right")
    table.add_column("class")
    table.add_column(column, justify="right")
    for row in rows:
        table.add_row(str(row["index"]), Text(row["class"]), _percent(row[key]))
    return table


# --- classification ------------------------------------------------------------------------------------------------
@eval_app.command("classification")
@cli_errors
def classification(
    data: Optional[Path] = typer.Option(None, "--data", "-d", help="ImageFolder: DATA/<class>/<images>"),
    synthetic: Optional[Path] = SYNTHETIC,
    classnames: Optional[Path] = typer.Option(
        None, "--classnames", help="one class name per line, in sorted folder order ('a;b' = synonyms)"),
    templates: Optional[str] = typer.Option(
        None, "--templates", "-t", help="openai, simple, synth, synth-colour or one template with {} "
        "(default: openai; synth / synth-colour with --synthetic)"),
    weights: str = WEIGHTS,
    which: str = WHICH,
    quick_gelu: bool = QUICK_GELU,
    batch_size: int = typer.Option(64, "--batch-size", min=1),
    workers: int = typer.Option(0, "--workers", min=0, help="image loading processes"),
    device: Optional[str] = DEVICE,
    precision: str = PRECISION,
    per_class: bool = PER_CLASS,
    out: Optional[Path] = OUT,
) -> None:
    """Top-1, top-5 and per-class accuracy on an ImageFolder (or the synthetic shape and colour sets).
    Top-k is shown as '-' (null in JSON) when there are no more than k classes."""
    from cosmos.zeroshot.classify import evaluate_classification, folder_classes, read_image_folder
    from cosmos.zeroshot.templates import read_classnames, resolve_templates

    if out is not None:
        check_output(out, "--out")
    sets = _data_or_synthetic(data, synthetic, {"classify_shape": "classify_shape", "classify_colour": "classify_colour"},
                              classnames)
    default_templates = {"classify_shape": "synth", "classify_colour": "synth-colour"} if synthetic else {}
    check_precision(precision)
    prepared = {}
    for name, path in sets.items():  # everything checked before the model is loaded
        set_templates = templates or default_templates.get(name, "openai")
        resolve_templates(set_templates)
        dataset = read_image_folder(path)
        classes = read_classnames(classnames, expected=len(dataset.folders)) if classnames is not None else None
        prepared[name] = (dataset, folder_classes(dataset, classes), set_templates)
    model, preprocess, tokenizer = load_model(weights, device, which, quick_gelu)
    precision = _resolved(model, precision)
    results = {}
    for name, (dataset, classes, set_templates) in prepared.items():
        with progress_bar(f"classification {name}") as update:
            results[name] = evaluate_classification(
                model, preprocess, tokenizer, dataset, classes, set_templates, batch_size, precision, workers, update)
        results[name]["templates"] = set_templates
    summary = Table(title="zero-shot classification (%)", title_justify="left")
    for column in ("set", "images", "classes", "top-1", "top-5", "mean per-class"):
        summary.add_column(column, justify="left" if column == "set" else "right")
    for name, r in results.items():
        summary.add_row(Text(name), str(r["images"]), str(r["classes"]), _percent(r["top1"]), _percent(r["top5"]),
                        _percent(r["mean_per_class"]))
    if per_class:
        for name, r in results.items():
            console.print(_detail_table(f"{name}: per-class top-1 (%)", "top-1", "top1", r["per_class"]))
    console.print(summary)
    _write(out, results, _settings(model, weights, which, precision))


# --- retrieval -----------------------------------------------------------------------------------------------------
@eval_app.command("retrieval")
@cli_errors
def retrieval(
    data: Optional[Path] = typer.Option(None, "--data", "-d", help="COCO captions JSON or Karpathy-style JSON"),
    synthetic: Optional[Path] = SYNTHETIC,
    images: Optional[Path] = typer.Option(
        None, "--images", help="image folder (default: images/ beside the JSON, else the JSON's folder)"),
    split: str = typer.Option("test", "--split", help="Karpathy split to evaluate"),
    weights: str = WEIGHTS,
    which: str = WHICH,
    quick_gelu: bool = QUICK_GELU,
    batch_size: int = typer.Option(64, "--batch-size", min=1),
    workers: int = typer.Option(0, "--workers", min=0, help="image loading processes"),
    device: Optional[str] = DEVICE,
    precision: str = PRECISION,
    out: Optional[Path] = OUT,
) -> None:
    """Image->text and text->image recall at 1, 5 and 10."""
    from cosmos.zeroshot.retrieval import evaluate_retrieval, load_retrieval_set

    if out is not None:
        check_output(out, "--out")
    sets = _data_or_synthetic(data, synthetic, {"retrieval": "retrieval/captions.json"})
    check_precision(precision)
    datasets = {name: load_retrieval_set(path, images, split) for name, path in sets.items()}
    model, preprocess, tokenizer = load_model(weights, device, which, quick_gelu)
    precision = _resolved(model, precision)
    results = {}
    for name, dataset in datasets.items():
        with progress_bar(f"retrieval {name}") as update:
            results[name] = evaluate_retrieval(model, preprocess, tokenizer, dataset, batch_size, precision, workers,
                                               update)
    table = Table(title="zero-shot retrieval, recall (%)", title_justify="left")
    table.add_column("")
    for name in results:
        table.add_column(Text(name), justify="right")
    table.add_row("images", *(str(r["images"]) for r in results.values()))
    table.add_row("captions", *(str(r["captions"]) for r in results.values()))
    for direction, label in (("i2t", "image->text"), ("t2i", "text->image")):
        for k in (1, 5, 10):
            table.add_row(f"{label} R@{k}", *(_percent(r[f"{direction}_R@{k}"]) for r in results.values()))
    console.print(table)
    _write(out, results, _settings(model, weights, which, precision, split=split))


# --- segmentation --------------------------------------------------------------------------------------------------
@eval_app.command("segmentation")
@cli_errors
def segmentation(
    data: Optional[Path] = typer.Option(
        None, "--data", "-d", help="images/ + masks/ + classnames.txt, or VOC's JPEGImages/ + SegmentationClass/"),
    synthetic: Optional[Path] = SYNTHETIC,
    classnames: Optional[str] = typer.Option(
        None, "--classnames", help="class names, line i = mask index i: a file, or a benchmark's shipped list (voc21, "
        "context60, ...; default: the --benchmark's, else classnames.txt in the data folder)"),
    split: Optional[str] = typer.Option(
        None, "--split", help="VOC: evaluate ImageSets/Segmentation/<split>.txt (default: val when val.txt exists)"),
    benchmark: Optional[str] = BENCHMARK,
    area_threshold: Optional[float] = AREA_THRESHOLD,
    templates: Optional[str] = typer.Option(
        None, "--templates", "-t", help="openai, simple, synth, synth-colour or one template with {} "
        "(default: openai; synth / synth-colour with --synthetic)"),
    method: str = METHOD,
    short_side: Optional[int] = SHORT_SIDE,
    window: Optional[int] = WINDOW,
    stride: Optional[int] = STRIDE,
    logit_scale: Optional[float] = LOGIT_SCALE,
    bg_threshold: Optional[float] = typer.Option(
        None, "--bg-threshold", help="pixels whose best probability is below this become class 0 (background)"),
    bg_prompt: bool = typer.Option(
        True, "--bg-prompt/--no-bg-prompt", help="prompt class 0 by its name like the others, or only assign it "
        "through --bg-threshold"),
    weights: str = WEIGHTS,
    which: str = WHICH,
    quick_gelu: bool = QUICK_GELU,
    batch_size: int = WINDOW_BATCH,
    device: Optional[str] = DEVICE,
    precision: str = PRECISION,
    per_class: bool = PER_CLASS,
    out: Optional[Path] = OUT,
) -> None:
    """mIoU and per-class IoU (SCLIP protocol, ignore index 255). Class 0 is the background class."""
    from cosmos.errors import CosmosError
    from cosmos.zeroshot.classify import build_class_embeddings
    from cosmos.zeroshot.segment import Segmenter, evaluate_segmentation, read_segmentation_set, with_background
    from cosmos.zeroshot.benchmarks import classnames_source
    from cosmos.zeroshot.templates import read_classnames, resolve_templates

    if out is not None:
        check_output(out, "--out")
    sets = _data_or_synthetic(data, synthetic, {"segment_shape": "segment_shape", "segment_colour": "segment_colour"},
                              classnames)
    default_templates = {"segment_shape": "synth", "segment_colour": "synth-colour"} if synthetic else {}
    config = segmenter_options(method, short_side, window, stride, logit_scale, bg_threshold, batch_size, precision,
                               area_threshold, benchmark)
    bg_threshold = config.bg_threshold
    if classnames is None and benchmark is not None:
        classnames = benchmark
    prepared = {}
    for name, path in sets.items():
        dataset = read_segmentation_set(path, split)
        names_file = classnames_source(classnames) if classnames is not None else dataset.classnames_file
        if names_file is None:
            raise CosmosError(f"{path}: no class names; give --classnames F or put classnames.txt in the folder "
                              "(one name per line, line i = mask index i)")
        # Class 0 is the background (the masks' convention): --bg-threshold sends pixels there.
        classes, titles, background = with_background(read_classnames(names_file), bg_threshold, index=0,
                                                      prompt=bg_prompt)
        set_templates = templates or default_templates.get(name, "openai")
        prepared[name] = (dataset, classes, titles, background, resolve_templates(set_templates), set_templates)
    model, _, tokenizer = load_model(weights, device, which, quick_gelu)
    config.precision = _resolved(model, config.precision)
    results = {}
    for name, (dataset, classes, titles, background, template_list, set_templates) in prepared.items():
        with progress_bar("encoding class prompts") as update:
            classifier = build_class_embeddings(model, tokenizer, classes, template_list, precision=config.precision,
                                                progress=update)
        segmenter = Segmenter(model, classifier, config, background_index=background)
        with progress_bar(f"segmentation {name}", total=len(dataset.images)) as update:
            results[name] = evaluate_segmentation(segmenter, dataset, titles, update)
        results[name]["templates"] = set_templates
    if per_class:
        for name, r in results.items():
            console.print(_detail_table(f"{name}: per-class IoU (%)", "IoU", "iou", r["per_class_iou"]))
    summary = Table(title=f"zero-shot segmentation, method {method} (%)", title_justify="left")
    for column in ("set", "images", "classes", "mIoU", "pixel acc."):
        summary.add_column(column, justify="left" if column == "set" else "right")
    for name, r in results.items():
        summary.add_row(Text(name), str(r["images"]), str(r["classes"]), _percent(r["mIoU"]), _percent(r["pixel_accuracy"]))
    console.print(summary)
    _write(out, results, _settings(model, weights, which, config.precision, method=method, benchmark=benchmark))


def register(app: typer.Typer) -> None:
    app.add_typer(eval_app, name="eval")
