"""COSMOS's cross-attention poolers (training only).

One layer each: LayerNorm on the query (`ln_q`), LayerNorm on the key/value tokens (`ln_k`: the same normalized
tokens are keys and values), multi-head attention (`attn`, `nn.MultiheadAttention` names), no MLP, no output norm,
no learned query. The cross-modal feature is h = query + attn(ln_q(query), ln_k(tokens)); the caller L2-normalizes.

- `visual.attn_cross_pool` (C^I): queries = pooled text embeddings, tokens = mapped image patch tokens.
- `text_attn_cross_pool` (C^T): queries = pooled image embeddings, tokens = mapped text tokens.

Both are built with the joint embedding width. (The official code builds C^T with the text width, which crashes for
any config whose text width differs from the embedding width; ViT-B hides it since both are 512.)
"""
from __future__ import annotations

import torch
from torch import nn

from .transformer import Attention, LayerNorm


class CrossAttentionPooler(nn.Module):
    def __init__(self, dim: int, heads: int = 8):
        super().__init__()
        self.ln_q = LayerNorm(dim)
        self.ln_k = LayerNorm(dim)
        self.attn = Attention(dim, heads)

    def forward(
        self, query: torch.Tensor, tokens: torch.Tensor, key_padding_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """query [B, M, D] (M queries per sample, e.g. one per view), tokens [B, N, D] -> attention output [B, M, D].

        key_padding_mask: optional bool [B, N], True where a token is padding. The official code passes none
        (queries also attend to padding after end-of-text); we keep that default for parity.
        """
        context = self.ln_k(tokens)
        return self.attn.cross(self.ln_q(query), context, key_padding_mask)
