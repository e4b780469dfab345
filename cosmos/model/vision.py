"""The ViT image tower, in OpenCLIP's layout (keys under `visual.`).

image [B, 3, H, W] -> patch embedding (`conv1`, a stride-P convolution without bias; or, for tiny models, a
convolutional `stem` of stride-2 3x3 convolutions) -> prepend `class_embedding` -> add `positional_embedding`
(bicubically interpolated when the grid differs from the trained one, e.g. 96 px local crops) -> `ln_pre` ->
transformer -> `ln_post` on all tokens -> pooled = class token @ `proj`.

The patch tokens after `ln_post` are what COSMOS's cross-attention reads (through `image_token_mapping`), and,
projected with `proj`, the dense features of training-free segmentation.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .cross_attention import CrossAttentionPooler
from .transformer import LayerNorm, Transformer


def conv_stem(width: int, patch_size: int) -> nn.Sequential:
    """log2(patch) stride-2 3x3 convolutions, widths growing to `width`, GELU between them: the same grid as a
    stride-P patch projection, but a tiny ViT learns shape from it far sooner (SYNTH_PROTOTYPE.md finding 1)."""
    steps = int(math.log2(patch_size))
    if 2**steps != patch_size:
        raise ValueError(f"a convolutional stem needs a power-of-two patch size, got {patch_size}")
    layers: list[nn.Module] = []
    channels = 3
    for i in range(steps):
        out = width // 2 ** (steps - 1 - i)
        layers.append(nn.Conv2d(channels, out, kernel_size=3, stride=2, padding=1))
        if i < steps - 1:
            layers.append(nn.GELU())
        channels = out
    return nn.Sequential(*layers)


class VisionTransformer(nn.Module):
    def __init__(
        self,
        image_size: int,
        patch_size: int,
        width: int,
        layers: int,
        heads: int,
        embed_dim: int,
        mlp_ratio: float = 4.0,
        quick_gelu: bool = False,
        stem: str = "patch",
        cross_pool: bool = True,
        cross_pool_heads: int = 8,
    ):
        super().__init__()
        self.image_size, self.patch_size, self.width, self.heads = image_size, patch_size, width, heads
        self.grid_size = image_size // patch_size
        scale = width**-0.5
        if stem == "patch":
            self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        elif stem == "conv":
            self.stem = conv_stem(width, patch_size)
        else:
            raise ValueError(f"unknown stem {stem!r}; use 'patch' or 'conv'")
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(self.grid_size**2 + 1, width))
        self.ln_pre = LayerNorm(width)
        self.transformer = Transformer(width, layers, heads, mlp_ratio, quick_gelu)
        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, embed_dim))
        # C^I: text queries attend over (mapped) image patch tokens. Training only.
        self.attn_cross_pool = CrossAttentionPooler(embed_dim, cross_pool_heads) if cross_pool else None

    # --- embedding ------------------------------------------------------------------------------------------
    def positional_embedding_for(self, grid_h: int, grid_w: int) -> torch.Tensor:
        """The positional embedding for a grid_h x grid_w patch grid: [1 + gh*gw, W]; the class token's row is
        kept and the grid is resized bicubically when it differs, in DINO's form as the official COSMOS code does
        it for its 96 px local crops: `scale_factor = (g_new + 0.1) / g` (the output is g_new wide, but the sampling
        positions follow that scale, not g_new / g as `size=` would), align_corners=False, no antialias, in float32.
        (DINO applies the width's factor to the height axis; for the square grids COSMOS uses that is the same.)"""
        pos = self.positional_embedding
        if (grid_h, grid_w) == (self.grid_size, self.grid_size):
            return pos
        cls_pos, grid_pos = pos[:1], pos[1:]
        g = self.grid_size
        grid_pos = grid_pos.reshape(1, g, g, -1).permute(0, 3, 1, 2)  # [1, W, g, g]
        grid_pos = F.interpolate(grid_pos.float(), scale_factor=((grid_h + 0.1) / g, (grid_w + 0.1) / g),
                                 mode="bicubic", align_corners=False)  # [1, W, gh, gw]
        grid_pos = grid_pos.to(pos.dtype).permute(0, 2, 3, 1).reshape(grid_h * grid_w, -1)  # [gh*gw, W]
        return torch.cat([cls_pos, grid_pos], dim=0)

    def embed(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """images [B, 3, H, W] -> tokens [B, 1 + gh*gw, W] after ln_pre, and the grid (gh, gw)."""
        h, w = images.shape[-2:]
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {self.patch_size}")
        x = self.stem(images) if hasattr(self, "stem") else self.conv1(images)  # [B, W, gh, gw]
        grid = (x.shape[-2], x.shape[-1])
        x = x.flatten(2).transpose(1, 2)  # [B, gh*gw, W]
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)  # [B, 1, W]
        x = torch.cat([cls, x], dim=1) + self.positional_embedding_for(*grid).to(x.dtype)  # [B, 1+N, W]
        return self.ln_pre(x), grid

    # --- features -------------------------------------------------------------------------------------------
    def forward_features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pooled embedding [B, E] (class token after ln_post, @ proj) and patch tokens [B, N, W] after ln_post."""
        x, _ = self.embed(images)
        x = self.ln_post(self.transformer(x))  # [B, 1+N, W]
        return x[:, 0] @ self.proj, x[:, 1:]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_features(images)[0]

    def forward_dense(self, images: torch.Tensor, method: str = "plain") -> torch.Tensor:
        """Projected patch features [B, gh, gw, E] with the last block replaced by `method` (not normalized)."""
        x, (gh, gw) = self.embed(images)
        x = self.transformer(x, skip_last=True)
        x = self.transformer.resblocks[-1].forward_variant(x, method, (gh, gw))  # [B, 1+N, W]
        x = self.ln_post(x[:, 1:]) @ self.proj  # [B, N, E]
        return x.reshape(x.shape[0], gh, gw, -1)
