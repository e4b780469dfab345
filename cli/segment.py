"""`cosmos segment IMG... --labels a,b,c`: training-free zero-shot segmentation (SCLIP protocol) to mask and
overlay PNGs, with the pixel share of each class."""
from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table
from rich.text import Text

from .common import (
    DEVICE, PRECISION, QUICK_GELU, WEIGHTS, WHICH, check_output, check_precision, cli_errors, console, err_console,
    load_model, model_labels, print_error, progress_bar,
)

# The SCLIP protocol's options, shared with `cosmos eval segmentation`.
METHOD = typer.Option("csa", "--method", "-m", help="last-block variant: plain, csa (SCLIP), clearclip, maskclip or naclip")
SHORT_SIDE = typer.Option(None, "--short-side", min=1,
                          help="resize the short side to this (default 336 x image_size/224)")
WINDOW = typer.Option(
    None, "--window", min=1, help="window size, a multiple of the patch size (default: the model's input size)")
STRIDE = typer.Option(None, "--stride", min=1, help="window stride (default: window / 2)")
LOGIT_SCALE = typer.Option(None, "--logit-scale", help="logits x this before the softmax (default 40, or the "
                           "--benchmark's)")
BENCHMARK = typer.Option(None, "--benchmark", help="a standard benchmark's preset (class names, logit scale, "
                         "background and area thresholds, resize): voc21, voc20, context60, context59, cityscapes, "
                         "ade20k, coco-object, coco-stuff")
AREA_THRESHOLD = typer.Option(None, "--area-threshold", help="remove a class predicted on no more than this fraction of "
                              "an image's non-background pixels (SCLIP's area_thd; VOC21 preset 0.1)")
WINDOW_BATCH = typer.Option(16, "--batch-size", min=1, help="windows per forward pass")


def segmenter_options(method: str, short_side: Optional[int], window: Optional[int], stride: Optional[int],
                      logit_scale: Optional[float], bg_threshold: Optional[float], batch_size: int, precision: str,
                      area_threshold: Optional[float] = None, benchmark: Optional[str] = None):
    """A SegmentConfig from the options (checked there, before the model is loaded); a --benchmark preset fills the
    settings not given explicitly."""
    from cosmos.zeroshot.benchmarks import get_benchmark
    from cosmos.zeroshot.segment import REFERENCE_SHORT_SIDE, SegmentConfig

    preset = get_benchmark(benchmark) if benchmark else None
    if preset is not None:
        logit_scale = logit_scale if logit_scale is not None else preset.logit_scale
        bg_threshold = bg_threshold if bg_threshold is not None else preset.bg_threshold
        area_threshold = area_threshold if area_threshold is not None else preset.area_threshold
    return SegmentConfig(method, short_side, window, stride, logit_scale if logit_scale is not None else 40.0,
                         bg_threshold, batch_size, check_precision(precision), area_threshold=area_threshold,
                         reference_short_side=preset.short_side if preset else REFERENCE_SHORT_SIDE)


def _check_mask_classes(classes, bg_threshold) -> None:
    """The mask PNG is 8-bit with 255 meaning 'ignore': at most 255 classes (a background added by --bg-threshold
    included). Refused before any work."""
    from cosmos.errors import CosmosError

    count = len(classes) + (1 if bg_threshold is not None and not any(
        names and names[0].lower() == "background" for names in classes) else 0)
    if count > 255:
        raise CosmosError(f"--labels: {count} classes do not fit the 8-bit mask PNG (at most 255, value 255 is "
                          "'ignore'); segment with fewer labels")


@cli_errors
def segment(
    images: List[Path] = typer.Argument(..., help="image files", show_default=False),
    labels: Optional[str] = typer.Option(
        None, "--labels", "-l", help="comma-separated class names; 'person;people' = several names for one class "
        "(default: the checkpoint's own labels)"),
    weights: str = WEIGHTS,
    method: str = METHOD,
    out: Path = typer.Option(Path("segments"), "--out", "-o", help="folder for the mask and overlay PNGs"),
    templates: Optional[str] = typer.Option(
        None, "--templates", "-t", help="openai (80 prompts), simple (7), synth, or one template with {} "
        "(default: the checkpoint's own, else openai)"),
    short_side: Optional[int] = SHORT_SIDE,
    window: Optional[int] = WINDOW,
    stride: Optional[int] = STRIDE,
    logit_scale: Optional[float] = LOGIT_SCALE,
    bg_threshold: Optional[float] = typer.Option(
        None, "--bg-threshold", help="pixels whose best class probability is below this become background"),
    area_threshold: Optional[float] = AREA_THRESHOLD,
    benchmark: Optional[str] = BENCHMARK,
    batch_size: int = WINDOW_BATCH,
    device: Optional[str] = DEVICE,
    precision: str = PRECISION,
    which: str = WHICH,
    quick_gelu: bool = QUICK_GELU,
    as_json: bool = typer.Option(False, "--json", help="print the pixel shares as JSON"),
) -> None:
    """Zero-shot segmentation: writes OUT/<name>_mask.png (class indices) and OUT/<name>_overlay.png."""
    from cosmos.device import resolve_precision
    from cosmos.errors import CosmosError
    from cosmos.images import open_image
    from cosmos.zeroshot.classify import build_class_embeddings, model_device
    from cosmos.zeroshot.segment import Segmenter, overlay, pixel_shares, save_mask, with_background
    from cosmos.zeroshot.templates import parse_labels, read_classnames, resolve_templates

    check_output(out, "--out", kind="folder")
    config = segmenter_options(method, short_side, window, stride, logit_scale, bg_threshold, batch_size, precision,
                               area_threshold, benchmark)
    bg_threshold = config.bg_threshold
    classes = parse_labels(labels) if labels is not None else None
    if classes is None and benchmark is not None:
        from cosmos.zeroshot.benchmarks import get_benchmark

        classes = read_classnames(get_benchmark(benchmark).classnames_file)
    if classes is not None:
        _check_mask_classes(classes, bg_threshold)
    if templates is not None:
        resolve_templates(templates)  # checked before the model is loaded
    model, _, tokenizer = load_model(weights, device, which, quick_gelu)
    template_list = resolve_templates(templates or getattr(model, "templates", None) or "openai")
    config.precision = resolve_precision(model_device(model), config.precision)
    if classes is None:
        classes = model_labels(model)
        _check_mask_classes(classes, bg_threshold)
    classes, titles, background = with_background(classes, bg_threshold)
    with progress_bar("encoding class prompts") as update:
        classifier = build_class_embeddings(model, tokenizer, classes, template_list, precision=config.precision,
                                            progress=update)
    segmenter = Segmenter(model, classifier, config, background_index=background)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CosmosError(f"{out}: cannot create the output folder ({e.strerror or e})") from None

    failed, used, report = 0, set(), []
    for path in images:
        try:
            image = open_image(path)
        except CosmosError as e:
            failed += 1
            print_error(str(e))
            continue
        with progress_bar(f"segmenting {path.name}", total=segmenter.count_windows(image)) as update:
            mask = segmenter(image, progress=update)  # [H, W]
        stem, n = path.stem, 1
        while stem in used:
            n, stem = n + 1, f"{path.stem}-{n + 1}"
        used.add(stem)
        mask_path, overlay_path = out / f"{stem}_mask.png", out / f"{stem}_overlay.png"
        save_mask(mask, mask_path)
        overlay(image, mask, titles).save(overlay_path)
        shares = pixel_shares(mask, len(titles))
        order = sorted(range(len(titles)), key=lambda i: -shares[i])
        entry = {"image": str(path), "mask": str(mask_path), "overlay": str(overlay_path),
                 "classes": [{"index": i, "label": titles[i], "share": shares[i]} for i in order if shares[i] > 0]}
        report.append(entry)
        if not as_json:
            console.print(Text(f"{path} -> {mask_path}", style="bold"))
            table = Table()
            table.add_column("index", justify="right")
            table.add_column("label")
            table.add_column("pixels", justify="right")
            for c in entry["classes"]:
                table.add_row(str(c["index"]), Text(c["label"]), f"{100 * c['share']:.1f}%")
            console.print(table)
    if as_json:
        typer.echo(json.dumps(report, indent=2))
    if report:  # where the files went (on stderr with --json, so stdout stays JSON)
        (err_console if as_json else console).print(
            Text(f"wrote {len(report)} mask{'s' if len(report) > 1 else ''} and overlay"
                 f"{'s' if len(report) > 1 else ''} to {out}/ (<name>_mask.png, <name>_overlay.png)"),
            highlight=False, soft_wrap=True)
    if failed:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.command("segment")(segment)
