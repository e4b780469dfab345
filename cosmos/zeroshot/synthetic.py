"""The evaluation suite of a `cosmos synth` folder in one call: what training validation, the paper table and the
demo report. Same protocols and defaults as `cosmos eval ... --synthetic DIR`: caption-style prompts (`synth` for
shapes, `synth-colour` for colours), retrieval with the long captions, segmentation with class 0 = background."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import torch

from ..errors import CosmosError
from ..transforms import eval_transform

TEMPLATES = {"shape": "synth", "colour": "synth-colour"}


def is_synth_folder(path: str | Path) -> bool:
    path = Path(path)
    return (path / "synth.json").is_file() and (path / "eval").is_dir()


@torch.no_grad()
def evaluate_synthetic(
    model,
    tokenizer,
    root: str | Path,
    tasks: Sequence[str] = ("classification", "retrieval", "segmentation"),
    methods: Sequence[str] = ("plain", "csa"),
    precision: str = "fp32",
    batch_size: int = 128,
    limit: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, float | None]:
    """Flat metrics (fractions in [0, 1]) of `model` on root/eval:
    shape_top1, colour_top1, i2t_R@1, t2i_R@1 (and R@5), seg_shape_{method}_mIoU, seg_colour_{method}_mIoU.
    `limit` evaluates only the first `limit` segmentation images (the slowest part), for quick checks."""
    from .classify import evaluate_classification, read_image_folder
    from .retrieval import evaluate_retrieval, load_retrieval_set
    from .segment import SegmentConfig, Segmenter, evaluate_segmentation, read_segmentation_set, with_background
    from .templates import read_classnames
    from .classify import build_class_embeddings

    root = Path(root)
    if not is_synth_folder(root):
        raise CosmosError(f"{root}: not a `cosmos synth` folder with evaluation sets (no synth.json or eval/)")
    was_training = model.training
    model.eval()
    preprocess = eval_transform(model.image_size)
    out: dict[str, float | None] = {}
    note = progress or (lambda _: None)
    try:
        if "classification" in tasks:
            for kind in ("shape", "colour"):
                note(f"classification {kind}")
                data = read_image_folder(root / "eval" / f"classify_{kind}")
                r = evaluate_classification(model, preprocess, tokenizer, data, None, TEMPLATES[kind], batch_size,
                                            precision)
                out[f"{kind}_top1"] = r["top1"]
        if "retrieval" in tasks:
            note("retrieval")
            r = evaluate_retrieval(model, preprocess, tokenizer, load_retrieval_set(root / "eval" / "retrieval" /
                                                                                 "captions.json"), batch_size, precision)
            for key in ("i2t_R@1", "t2i_R@1", "i2t_R@5", "t2i_R@5"):
                out[key] = r[key]
        if "segmentation" in tasks:
            for kind in ("shape", "colour"):
                folder = root / "eval" / f"segment_{kind}"
                dataset = read_segmentation_set(folder)
                if limit is not None:
                    dataset.images, dataset.masks = dataset.images[:limit], dataset.masks[:limit]
                classes, titles, background = with_background(read_classnames(dataset.classnames_file), None, 0)
                classifier = build_class_embeddings(model, tokenizer, classes, TEMPLATES[kind], precision=precision)
                for method in methods:
                    note(f"segmentation {kind} {method}")
                    config = SegmentConfig(method=method, batch_size=64, precision=precision)
                    segmenter = Segmenter(model, classifier, config, background_index=background)
                    r = evaluate_segmentation(segmenter, dataset, titles)
                    out[f"seg_{kind}_{method}_mIoU"] = r["mIoU"]
    finally:
        model.train(was_training)
    return out
