"""Training data: tar shards (write, list, stream across ranks and workers), preprocessing, the loader."""
from .loader import ShardDataset, ShardLoader, build_loader
from .preprocess import PreprocessResult, split_sentences  # the function `preprocess` stays in its module
from .shards import (
    CaptionContentError,
    ReadStats,
    ShardWriter,
    expand_sources,
    iter_samples,
    iter_shard,
    sample_files,
    shard_sizes,
    validate_captions,
    write_manifest,
)

__all__ = [
    "CaptionContentError", "PreprocessResult", "ReadStats", "ShardDataset", "ShardLoader", "ShardWriter", "build_loader",
    "expand_sources", "iter_samples", "iter_shard", "sample_files", "shard_sizes", "split_sentences",
    "validate_captions", "write_manifest",
]
