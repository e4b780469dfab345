"""Zero-shot use of a CLIP/COSMOS model: classification, image-text retrieval and training-free segmentation."""
from .classify import (
    ClassEmbeddings,
    build_class_embeddings,
    class_logits,
    classify_images,
    encode_images,
    encode_texts,
    evaluate_classification,
    folder_classes,
    image_batches,
    per_class_accuracy,
    rank_of_target,
    read_image_folder,
    topk_accuracy,
)
from .retrieval import RetrievalSet, evaluate_retrieval, load_retrieval_set, recall_at_k, retrieval_ranks
from .segment import (
    SegmentConfig,
    Segmenter,
    class_titles,
    confusion_matrix,
    evaluate_segmentation,
    iou_from_confusion,
    overlay,
    pixel_shares,
    predict_mask,
    read_segmentation_set,
    save_mask,
    sliding_windows,
    window_logits,
    with_background,
)
from .templates import OPENAI_TEMPLATES, SIMPLE_TEMPLATES, SYNTH_TEMPLATES, parse_labels, read_classnames, resolve_templates

__all__ = [
    "ClassEmbeddings", "build_class_embeddings", "class_logits", "classify_images", "encode_images",
    "encode_texts", "evaluate_classification", "folder_classes", "image_batches", "per_class_accuracy", "rank_of_target", "read_image_folder", "topk_accuracy",
    "RetrievalSet", "evaluate_retrieval", "load_retrieval_set", "recall_at_k", "retrieval_ranks",
    "SegmentConfig", "Segmenter", "class_titles", "confusion_matrix", "evaluate_segmentation", "iou_from_confusion", "overlay",
    "pixel_shares", "predict_mask", "read_segmentation_set", "save_mask", "sliding_windows", "window_logits",
    "with_background",
    "OPENAI_TEMPLATES", "SIMPLE_TEMPLATES", "SYNTH_TEMPLATES", "parse_labels", "read_classnames", "resolve_templates",
]
