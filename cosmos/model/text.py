"""The causal text tower, in OpenCLIP's layout: its parameters sit at the TOP level of the model's state dict.

tokens [B, L] -> `token_embedding` + `positional_embedding` -> causal transformer -> `ln_final` -> the hidden state
at the end-of-text token (argmax of the ids: end-of-text is the largest id, padding is 0) @ `text_projection`.

`TextTower` is the base class of the dual encoder, which is how its keys end up without a prefix.
"""
from __future__ import annotations

import torch
from torch import nn

from .transformer import LayerNorm, Transformer


def trim_padding(ids: torch.Tensor, multiple: int = 8) -> torch.Tensor:
    """Token ids [B, L] cut after the longest caption's end-of-text, rounded up to a multiple of `multiple`.
    With end-of-text pooling and the causal mask the pooled embeddings are unchanged; only padding is dropped."""
    longest = int(ids.argmax(dim=-1).max()) + 1
    return ids[:, : min(ids.shape[1], -(-longest // multiple) * multiple)]


class TextTower(nn.Module):
    def __init__(
        self,
        context_length: int,
        vocab_size: int,
        width: int,
        layers: int,
        heads: int,
        embed_dim: int,
        mlp_ratio: float = 4.0,
        quick_gelu: bool = False,
    ):
        super().__init__()
        self.context_length, self.vocab_size = context_length, vocab_size
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, width))
        self.transformer = Transformer(width, layers, heads, mlp_ratio, quick_gelu)
        self.ln_final = LayerNorm(width)
        self.text_projection = nn.Parameter(torch.empty(width, embed_dim))
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.text_projection, std=width**-0.5)
        # Residual-branch init scaled by depth (GPT-2 / CLIP style).
        attn_std, fc_std = width**-0.5, (2 * width) ** -0.5
        proj_std = width**-0.5 * (2 * layers) ** -0.5
        for block in self.transformer.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)

    def encode_text_features(self, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pooled text embedding [B, E] and all token states after ln_final [B, L, W]."""
        if text.dim() != 2 or text.shape[1] > self.context_length:
            raise ValueError(f"text ids must be [B, L<={self.context_length}], got {tuple(text.shape)}")
        n = text.shape[1]
        x = self.token_embedding(text) + self.positional_embedding[:n]  # [B, L, W]
        x = self.ln_final(self.transformer(x, is_causal=True))  # [B, L, W]
        eot = text.argmax(dim=-1)  # [B]
        pooled = x[torch.arange(x.shape[0], device=x.device), eot] @ self.text_projection  # [B, E]
        return pooled, x
