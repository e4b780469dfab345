"""cosmos: COSMOS vision-language models (CVPR 2025) in plain PyTorch.

    import cosmos
    model, preprocess, tokenizer = cosmos.load("cosmos_vitb16_merged30m")   # or a checkpoint path
    image = preprocess(cosmos.open_image("cat.jpg"))[None]
    text = cosmos.tokenize(["a photo of a cat", "a photo of a dog"])
    probs = (model.logit_scale.exp() * model.encode_image(image, normalize=True)
             @ model.encode_text(text, normalize=True).T).softmax(-1)
"""
from .checkpoint import load, save
from .errors import CosmosError
from .images import open_image
from .model.cosmos import CONFIGS, CosmosConfig, CosmosModel, get_config


def __getattr__(name: str):
    # The tokenizer is imported on first use (loading the CLIP merges is not free).
    if name in ("tokenize", "Tokenizer"):
        from . import tokenizer

        return getattr(tokenizer, name)
    raise AttributeError(f"module 'cosmos' has no attribute {name!r}")


__all__ = [
    "CONFIGS", "CosmosConfig", "CosmosError", "CosmosModel", "Tokenizer", "get_config", "load", "open_image",
    "save", "tokenize",
]
