"""The pre-LN residual attention block both towers are built from, in OpenCLIP's parameter layout.

A block is `x = x + attn(ln_1(x)); x = x + mlp(ln_2(x))`. Parameter names follow OpenCLIP (which follows
`nn.MultiheadAttention`): `attn.in_proj_weight` [3W, W] with rows (q, k, v), `attn.in_proj_bias` [3W],
`attn.out_proj`, `mlp.c_fc`, `mlp.c_proj`, so checkpoints load key for key. Attention runs through
`F.scaled_dot_product_attention`.

For training-free segmentation the LAST block of the image tower can be swapped for one of the published
one-block variants (`last_block_variant`):
- csa (SCLIP):   x + out_proj((softmax(q q^T s) + softmax(k k^T s)) v), then the usual FFN residual
- clearclip:     out_proj(softmax(q q^T s) v)            (no residual, no FFN)
- maskclip:      x + out_proj(v), then the usual FFN residual (MaskCLIP's reference implementation: the value
                 embedding through the output projection, residual and FFN kept)
- naclip:        out_proj(softmax(k k^T s + G) v)        (no residual, no FFN), G the NACLIP Gaussian neighbourhood
                 bias exp(-|p_i - p_j|^2 / (2 * 5^2)) between patch positions on the grid (0 for the class token)
with q, k, v computed from ln_1(x) per head and s = head_dim ** -0.5.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

DENSE_METHODS = ("plain", "csa", "clearclip", "maskclip", "naclip")
NACLIP_STD = 5.0  # NACLIP's Gaussian window, in patches


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_causal: bool = False,
           mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(hd) [+ causal / padding mask]) v for [B, H, N, hd] tensors; mask: bool, True = attend.

    `F.scaled_dot_product_attention` everywhere except bf16 on a CPU, where its fused kernels run 3-6x slower than
    plain matmuls (measured: BENCHMARKS.md, "attention"); there the attention is written out."""
    if q.device.type != "cpu" or q.dtype != torch.bfloat16:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)
    scores = (q @ k.transpose(-2, -1)).mul_(q.shape[-1] ** -0.5)  # [B, H, N, M]
    if is_causal:
        n, m = scores.shape[-2:]
        scores = scores.masked_fill(torch.ones(n, m, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(dim=-1) @ v  # [B, H, N, hd]


def neighbourhood_bias(grid: tuple[int, int], std: float, device=None, dtype=torch.float32) -> torch.Tensor:
    """[1 + gh*gw, 1 + gh*gw]: exp(-squared distance / (2 std^2)) between the patch positions (row-major, as the
    tokens), zero in the class token's row and column."""
    gh, gw = grid
    rows, cols = torch.meshgrid(torch.arange(gh, device=device), torch.arange(gw, device=device), indexing="ij")
    pos = torch.stack([rows.flatten(), cols.flatten()], dim=-1).float()  # [N, 2]
    bias = torch.exp(-torch.cdist(pos, pos).pow(2) / (2 * std**2))  # [N, N]
    return F.pad(bias, (1, 0, 1, 0)).to(dtype)  # [1 + N, 1 + N]


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the activation OpenAI's CLIP weights were trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class LayerNorm(nn.LayerNorm):
    """LayerNorm that returns the input's dtype (under autocast F.layer_norm computes and returns float32)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps).to(x.dtype)


class Attention(nn.Module):
    """Multi-head attention with `nn.MultiheadAttention`'s parameter names, batch first."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.width, self.heads, self.head_dim = width, heads, width // heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.heads, self.head_dim).transpose(1, 2)  # [B, H, N, hd]

    def _merge_heads(self, x: torch.Tensor) -> torch.Tensor:
        b, _, n, _ = x.shape
        return x.transpose(1, 2).reshape(b, n, self.width)  # [B, N, W]

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-head queries, keys and values of x [B, N, W], each [B, H, N, hd]."""
        b, n, _ = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)  # [B, N, 3W]
        qkv = qkv.view(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)  # [3, B, H, N, hd]
        q, k, v = qkv.unbind(0)  # one backward op (three index selects would each build a full-size gradient)
        return q, k, v

    def forward(self, x: torch.Tensor, is_causal: bool = False) -> torch.Tensor:
        q, k, v = self.qkv(x)
        return self.out_proj(self._merge_heads(attend(q, k, v, is_causal=is_causal)))

    def cross(self, query: torch.Tensor, context: torch.Tensor, key_padding_mask: torch.Tensor | None = None):
        """Queries from `query` [B, M, W] attend over `context` [B, N, W] (keys = values = context).

        key_padding_mask: optional bool [B, N], True where a context position must be ignored.
        """
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q, b_k, b_v = self.in_proj_bias.chunk(3)
        q = self._split_heads(F.linear(query, w_q, b_q))  # [B, H, M, hd]
        k = self._split_heads(F.linear(context, w_k, b_k))  # [B, H, N, hd]
        v = self._split_heads(F.linear(context, w_v, b_v))  # [B, H, N, hd]
        mask = None
        if key_padding_mask is not None:
            mask = ~key_padding_mask[:, None, None, :]  # [B, 1, 1, N], True = attend
        return self.out_proj(self._merge_heads(attend(q, k, v, mask=mask)))  # [B, M, W]

    # --- last-block variants for dense prediction -------------------------------------------------------
    def self_self(self, x: torch.Tensor, use: str) -> torch.Tensor:
        """out_proj(softmax(a a^T s) v) with a = q ("q") or k ("k"), or the CSA sum of both ("qk")."""
        q, k, v = self.qkv(x)
        scale = self.head_dim**-0.5
        attn = 0
        if "q" in use:
            attn = attn + torch.softmax((q @ q.transpose(-2, -1)) * scale, dim=-1)  # [B, H, N, N]
        if "k" in use:
            attn = attn + torch.softmax((k @ k.transpose(-2, -1)) * scale, dim=-1)
        return self.out_proj(self._merge_heads(attn @ v))

    def neighbour(self, x: torch.Tensor, grid: tuple[int, int], std: float = NACLIP_STD) -> torch.Tensor:
        """NACLIP: out_proj(softmax(k k^T s + G) v), G [1 + N, 1 + N] the Gaussian neighbourhood bias on the grid."""
        _, k, v = self.qkv(x)
        scale = self.head_dim**-0.5
        scores = (k @ k.transpose(-2, -1)) * scale + neighbourhood_bias(grid, std, x.device, k.dtype)  # [B, H, N, N]
        return self.out_proj(self._merge_heads(torch.softmax(scores, dim=-1) @ v))

    def value_only(self, x: torch.Tensor) -> torch.Tensor:
        """out_proj(v): MaskCLIP's attention, each token keeps its own value."""
        _, _, v = self.qkv(x)
        return self.out_proj(self._merge_heads(v))


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0, quick_gelu: bool = False):
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.ln_1 = LayerNorm(width)
        self.attn = Attention(width, heads)
        self.ln_2 = LayerNorm(width)
        self.mlp = nn.Sequential(
            OrderedDict(
                [
                    ("c_fc", nn.Linear(width, hidden)),
                    ("gelu", QuickGELU() if quick_gelu else nn.GELU()),
                    ("c_proj", nn.Linear(hidden, width)),
                ]
            )
        )

    def forward(self, x: torch.Tensor, is_causal: bool = False) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), is_causal=is_causal)
        return x + self.mlp(self.ln_2(x))

    def forward_variant(self, x: torch.Tensor, method: str, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """This block with its attention replaced by a dense-prediction variant (see the module docstring); `grid`
        (gh, gw) is the patch grid, which naclip needs."""
        if method == "plain":
            return self(x)
        if method == "csa":
            x = x + self.attn.self_self(self.ln_1(x), use="qk")
            return x + self.mlp(self.ln_2(x))
        if method == "clearclip":
            return self.attn.self_self(self.ln_1(x), use="q")
        if method == "maskclip":
            x = x + self.attn.value_only(self.ln_1(x))
            return x + self.mlp(self.ln_2(x))
        if method == "naclip":
            if grid is None:
                raise ValueError("naclip needs the patch grid")
            return self.attn.neighbour(self.ln_1(x), grid)
        raise ValueError(f"unknown dense method {method!r}; choose one of {', '.join(DENSE_METHODS)}")


class Transformer(nn.Module):
    """A stack of residual attention blocks (`resblocks.{i}`), optionally gradient-checkpointed."""

    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float = 4.0, quick_gelu: bool = False):
        super().__init__()
        self.width, self.layers = width, layers
        self.grad_checkpointing = False
        self.resblocks = nn.ModuleList(
            [ResidualAttentionBlock(width, heads, mlp_ratio, quick_gelu) for _ in range(layers)]
        )

    def forward(self, x: torch.Tensor, is_causal: bool = False, skip_last: bool = False) -> torch.Tensor:
        blocks = self.resblocks[:-1] if skip_last else self.resblocks
        for block in blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, is_causal, use_reentrant=False)
            else:
                x = block(x, is_causal=is_causal)
        return x
