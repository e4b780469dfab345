"""The COSMOS dual encoder: a CLIP model (ViT + causal text tower) plus COSMOS's training-only extras.

State-dict layout = OpenCLIP's flat CLIP naming (text tower at the top level, image tower under `visual.`, a 0-dim
`logit_scale`) plus the 21 tensors COSMOS adds (COSMOS_METHOD.md sections 1 and 7):
    `distill_logit_scale`, `image_token_mapping` (Linear W_vision -> E), `text_token_mapping` (Linear W_text -> E),
    `visual.attn_cross_pool` (C^I) and `text_attn_cross_pool` (C^T).
At inference it is exactly a CLIP model: `encode_image`, `encode_text`, `forward` -> (image, text, scale) as OpenCLIP.
For training, `forward_train` runs every view of a batch (what DDP wraps) and returns the per-view pooled embeddings and
the cross-modal embeddings h_I (`cross_text`: image queries over text tokens) and h_T (`cross_image`: text queries over
image patch tokens).
"""
from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CosmosError
from .cross_attention import CrossAttentionPooler
from .text import TextTower, trim_padding
from .transformer import DENSE_METHODS
from .vision import VisionTransformer

LOGIT_SCALE_INIT = math.log(1 / 0.07)
LOGIT_SCALE_MAX = math.log(100)


@dataclass
class VisionConfig:
    image_size: int = 224
    patch_size: int = 16
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    stem: str = "patch"  # "patch" (OpenCLIP's conv1) or "conv" (stride-2 3x3 convolutions, tiny models)


@dataclass
class TextConfig:
    context_length: int = 77
    vocab_size: int = 49408
    width: int = 512
    layers: int = 12
    heads: int = 8
    mlp_ratio: float = 4.0


@dataclass
class CosmosConfig:
    embed_dim: int = 512
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    quick_gelu: bool = False  # True only for OpenAI-trained weights; COSMOS and LAION models use GELU
    cosmos: bool = True  # build the training-only extras (cross-attention poolers, token mappings, distill scale)
    cross_pool_heads: int = 8

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "CosmosConfig":
        try:
            top = {k: v for k, v in d.items() if k not in ("vision", "text")}
            _check_keys(cls, top)
            _check_keys(VisionConfig, d.get("vision", {}))
            _check_keys(TextConfig, d.get("text", {}))
            return cls(**top, vision=VisionConfig(**d.get("vision", {})), text=TextConfig(**d.get("text", {})))
        except (TypeError, AttributeError) as e:
            raise CosmosError(f"malformed model config {d!r}: {e}") from None


def _check_keys(cls, d: dict) -> None:
    unknown = set(d) - {f.name for f in fields(cls)}
    if unknown:
        raise CosmosError(f"unknown {cls.__name__} fields {sorted(unknown)}")


CONFIGS: dict[str, CosmosConfig] = {
    # As released: OpenCLIP ViT-B/16 and ViT-B/32 (plain GELU), joint embedding 512.
    "ViT-B-16": CosmosConfig(),
    "ViT-B-32": CosmosConfig(vision=VisionConfig(patch_size=32)),
    # Trains on a 2-core CPU in minutes: 64 px images (32 px local crops), patch 8 through a conv stem, width 192,
    # 4 layers each, embedding 128 (SYNTH_PROTOTYPE.md). Uses the CLIP vocabulary unless a checkpoint says otherwise.
    "tiny": CosmosConfig(
        embed_dim=128,
        vision=VisionConfig(image_size=64, patch_size=8, width=192, layers=4, heads=3, stem="conv"),
        text=TextConfig(width=192, layers=4, heads=3),
        cross_pool_heads=2,
    ),
}


def get_config(name: str) -> CosmosConfig:
    if name not in CONFIGS:
        raise CosmosError(f"unknown model config {name!r}; known: {', '.join(CONFIGS)}")
    return copy.deepcopy(CONFIGS[name])


class CosmosModel(TextTower):
    """CLIP dual encoder with COSMOS extras. The text tower is the base class, so its keys have no prefix."""

    def __init__(self, config: CosmosConfig | str = "ViT-B-16"):
        cfg = get_config(config) if isinstance(config, str) else config
        v, t, e = cfg.vision, cfg.text, cfg.embed_dim
        super().__init__(t.context_length, t.vocab_size, t.width, t.layers, t.heads, e, t.mlp_ratio, cfg.quick_gelu)
        self.config = cfg
        self.visual = VisionTransformer(
            v.image_size, v.patch_size, v.width, v.layers, v.heads, e, v.mlp_ratio, cfg.quick_gelu, v.stem,
            cross_pool=cfg.cosmos, cross_pool_heads=cfg.cross_pool_heads,
        )
        self.logit_scale = nn.Parameter(torch.tensor(LOGIT_SCALE_INIT))
        if cfg.cosmos:
            self.distill_logit_scale = nn.Parameter(torch.tensor(LOGIT_SCALE_INIT))
            # C^T: image queries attend over (mapped) text tokens.
            self.text_attn_cross_pool = CrossAttentionPooler(e, cfg.cross_pool_heads)
            self.image_token_mapping = nn.Linear(v.width, e)
            self.text_token_mapping = nn.Linear(t.width, e)
        self.labels: list[str] | None = None  # class names a checkpoint may carry (the CLI's default labels)
        self.templates: str | list[str] | None = None  # prompt templates it was trained for (the CLI's default)

    # --- sizes ----------------------------------------------------------------------------------------------
    @property
    def image_size(self) -> int:
        return self.config.vision.image_size

    @property
    def patch_size(self) -> int:
        return self.config.vision.patch_size

    @property
    def embed_dim(self) -> int:
        return self.config.embed_dim

    # --- inference: a plain CLIP model ----------------------------------------------------------------------
    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        x = self.visual(images)  # [B, E]
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(self, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        x = self.encode_text_features(text)[0]  # [B, E]
        return F.normalize(x, dim=-1) if normalize else x

    def forward(self, images: torch.Tensor | None = None, text: torch.Tensor | None = None):
        """(normalized image features, normalized text features, logit_scale.exp()), as OpenCLIP's CLIP."""
        image_features = self.encode_image(images, normalize=True) if images is not None else None
        text_features = self.encode_text(text, normalize=True) if text is not None else None
        return image_features, text_features, self.logit_scale.exp()

    def encode_dense(self, images: torch.Tensor, method: str = "plain", normalize: bool = True) -> torch.Tensor:
        """Per-patch embeddings [B, gh, gw, E] for training-free segmentation; `method` picks the last block:
        plain, csa (SCLIP), clearclip, maskclip or naclip (see transformer.py)."""
        if method not in DENSE_METHODS:
            raise CosmosError(f"unknown dense method {method!r}; choose one of {', '.join(DENSE_METHODS)}")
        x = self.visual.forward_dense(images, method)
        return F.normalize(x, dim=-1) if normalize else x

    # --- training: per-view features and the cross-modal embeddings ----------------------------------------
    def encode_image_views(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One batch of views of equal size [B, 3, H, W] -> pooled [B, E] (not normalized), patch tokens [B, N, Wv]."""
        return self.visual.forward_features(images)

    def encode_text_views(self, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids [B, L] -> pooled [B, E] (not normalized), token states [B, L, Wt]."""
        return self.encode_text_features(text)

    def cross_text(self, image_query: torch.Tensor, text_tokens: torch.Tensor, key_padding_mask=None) -> torch.Tensor:
        """h_I, the image side's cross-modal embedding: image queries [B, M, E] (pooled, one per image view) attend
        over one caption's token states [B, L, Wt] through `text_token_mapping` and `text_attn_cross_pool` (C^T)
        -> [B, M, E] = query + attention (not normalized). key_padding_mask: bool [B, L], True = padding."""
        tokens = self.text_token_mapping(text_tokens)  # [B, L, E]
        return image_query + self.text_attn_cross_pool(image_query, tokens, key_padding_mask)

    def cross_image(self, text_query: torch.Tensor, image_tokens: torch.Tensor) -> torch.Tensor:
        """h_T, the text side's cross-modal embedding: text queries [B, M, E] (pooled, one per caption view) attend
        over one image view's patch tokens [B, N, Wv] through `image_token_mapping` and `visual.attn_cross_pool`
        (C^I) -> [B, M, E] = query + attention (not normalized)."""
        tokens = self.image_token_mapping(image_tokens)  # [B, N, E]
        return text_query + self.visual.attn_cross_pool(text_query, tokens)

    def forward_train(
        self,
        global_crops: torch.Tensor,
        global_text: torch.Tensor,
        local_crops: torch.Tensor | None = None,
        local_text: torch.Tensor | None = None,
        cross: tuple[str, ...] = ("image", "text"),
        text_padding_mask: bool = True,
    ) -> dict[str, torch.Tensor]:
        """The student's training forward: every view of a batch in one call (what DDP wraps, see train/step.py).

        global_crops [B, Vg, 3, G, G], local_crops [B, Vl, 3, L, L] or None, global_text [B, G, ctx] and local_text
        [B, Lt, ctx] or None token ids (the layout of `cosmos.data.views.collate_views`). Each image resolution runs
        through the tower in ONE batch, view-major ([g1 of every sample, g2 of every sample, l1 ...], the official
        order). Returns, view-major and L2-normalized in float32:
            "image" [Vg + Vl, B, E], "text" [G + Lt, B, E]: pooled embeddings per view, global views first;
            "h_image" [Vg + Vl, B, E] (when "image" in `cross`): h_I, each image view's pooled embedding attending
                over the tokens of caption #1 (C^T);
            "h_text" [G + Lt, B, E] (when "text" in `cross`): h_T, each caption's pooled embedding attending over
                the patch tokens of global crop #1 (C^I);
            "logit_scale", "distill_logit_scale": the exponentiated temperatures (0-dim), so the loss's use of them
                goes through this forward as well.
        text_padding_mask=True runs each kind of caption (global, local) in length buckets, each trimmed to its
        longest caption (`encode_text_bucketed`; end-of-text pooling and the causal mask make the pooled embeddings
        identical, while most padding is never computed), and masks the padding after end-of-text in C^T, so h_I
        does not depend on how much padding a batch has. False is the official behaviour (quirk 2): all captions in
        one batch of `ctx` positions, padding attended to.
        """
        b, n_global = global_crops.shape[:2]
        crops = global_crops.transpose(0, 1).reshape(n_global * b, *global_crops.shape[2:])  # [Vg*B, 3, G, G]
        pooled_g, tokens_g = self.visual.forward_features(crops)  # [Vg*B, E], [Vg*B, N, Wv]
        image = [pooled_g.view(n_global, b, -1)]
        if local_crops is not None and local_crops.shape[1] > 0:
            n_local = local_crops.shape[1]
            crops = local_crops.transpose(0, 1).reshape(n_local * b, *local_crops.shape[2:])  # [Vl*B, 3, L, L]
            image.append(self.visual(crops).view(n_local, b, -1))
        image = torch.cat(image)  # [Vi, B, E]

        groups = [global_text] + ([local_text] if local_text is not None and local_text.shape[1] > 0 else [])
        if not text_padding_mask:  # official: one batch, full length
            groups = [torch.cat(groups, dim=1)]
        pooled, first_tokens, first_ids = [], None, None
        for group in groups:
            ids = group.transpose(0, 1).reshape(group.shape[1] * b, -1)  # [V*B, ctx]
            if text_padding_mask:
                pooled_t, tokens_t, ids_t = self.encode_text_bucketed(ids, b if first_tokens is None else 0)
            else:
                pooled_t, tokens_t = self.encode_text_features(ids)  # [V*B, E], [V*B, L, Wt]
                tokens_t, ids_t = tokens_t[:b], ids[:b]
            pooled.append(pooled_t.view(group.shape[1], b, -1))
            if first_tokens is None:  # caption #1 = the first b rows
                first_tokens, first_ids = tokens_t, ids_t
        text_emb = torch.cat(pooled)  # [Vt, B, E]

        out = {"image": F.normalize(image.float(), dim=-1), "text": F.normalize(text_emb.float(), dim=-1),
               "logit_scale": self.logit_scale.exp()}
        if self.config.cosmos:
            out["distill_logit_scale"] = self.distill_logit_scale.exp()
        if "image" in cross:  # h_I: image queries over caption #1's tokens
            mask = None
            if text_padding_mask:
                positions = torch.arange(first_ids.shape[1], device=first_ids.device)
                mask = positions[None, :] > first_ids.argmax(dim=-1)[:, None]  # [B, L], True after end-of-text
            h = self.cross_text(image.transpose(0, 1), first_tokens, mask)  # [B, Vi, E]
            out["h_image"] = F.normalize(h.transpose(0, 1).float(), dim=-1)
        if "text" in cross:  # h_T: text queries over global crop #1's patch tokens
            h = self.cross_image(text_emb.transpose(0, 1), tokens_g[:b])  # [B, Vt, E]
            out["h_text"] = F.normalize(h.transpose(0, 1).float(), dim=-1)
        return out

    def encode_text_bucketed(self, ids: torch.Tensor, keep: int, buckets: int = 4):
        """Captions [M, ctx] in length buckets: sorted by length, cut into `buckets` groups (of at least 64), each
        trimmed to its own longest caption, so little padding is computed (the pooled embeddings are those of the
        untrimmed captions: end-of-text pooling under a causal mask). Returns the pooled embeddings [M, E] in input
        order and, for the first `keep` rows (caption #1), token states [keep, L, Wt] and ids [keep, L], L their
        longest; positions past a row's bucket length are zeros there, and padding, which C^T masks."""
        m = ids.shape[0]
        order = torch.argsort(ids.argmax(dim=-1), stable=True)  # by end-of-text position
        size = max(64, -(-m // buckets))
        rows, pooled, tokens = [], [], []
        for start in range(0, m, size):
            r = order[start:start + size]
            p, t = self.encode_text_features(trim_padding(ids[r]))  # [n, E], [n, L_b, Wt]
            rows.append(r)
            pooled.append(p)
            tokens.append(t)
        all_rows = torch.cat(rows)
        pooled = torch.cat(pooled)
        pooled = torch.empty_like(pooled).index_copy(0, all_rows, pooled)  # back to input order
        if not keep:
            return pooled, None, None
        width = trim_padding(ids[:keep]).shape[1]
        picked, where = [], []
        for r, t in zip(rows, tokens):
            sel = (r < keep).nonzero().flatten()
            if sel.numel():
                t = t[sel][:, :width]
                picked.append(F.pad(t, (0, 0, 0, width - t.shape[1])))  # [k, width, Wt]
                where.append(r[sel])
        picked = torch.cat(picked)
        first = torch.empty_like(picked).index_copy(0, torch.cat(where), picked)  # [keep, width, Wt]
        return pooled, first, ids[:keep, :width]

    def clamp_logit_scales(self) -> None:
        """Keep both temperatures in [0, ln 100], as after every optimizer step in CLIP and COSMOS."""
        with torch.no_grad():
            self.logit_scale.clamp_(0, LOGIT_SCALE_MAX)
            if hasattr(self, "distill_logit_scale"):
                self.distill_logit_scale.clamp_(0, LOGIT_SCALE_MAX)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.transformer.grad_checkpointing = enable
        self.visual.transformer.grad_checkpointing = enable

    def clip_state_dict(self) -> dict[str, torch.Tensor]:
        """The state dict without COSMOS's training-only tensors: exactly an OpenCLIP CLIP state dict."""
        return {k: v for k, v in self.state_dict().items() if not is_cosmos_extra(k)}


COSMOS_EXTRA_PREFIXES = (
    "distill_logit_scale",
    "visual.attn_cross_pool.",
    "text_attn_cross_pool.",
    "image_token_mapping.",
    "text_token_mapping.",
)


def is_cosmos_extra(key: str) -> bool:
    return key.startswith(COSMOS_EXTRA_PREFIXES)
