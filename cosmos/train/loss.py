"""The COSMOS objective (paper section 3.3; COSMOS_METHOD.md section 3) and the fused, tiled multi-view InfoNCE.

clip(A, B, s): for stacked views A [Va, N, D] and B [Vb, N, D] (L2-normalized, N samples of the GLOBAL batch), the
mean over all view pairs (a in A, b in B) of the symmetric InfoNCE
    (CE(s a b^T, diag) + CE(s b a^T, diag)) / 2.

The COSMOS loss = CLIP term + distillation term (1 : 1):
    CLIP term     clip(student image [g1, g2], student text [all 8 captions], logit_scale)        16 pairs
    distillation  mean of clip(h_I, teacher image), clip(h_I, teacher text),
                          clip(h_T, teacher image), clip(h_T, teacher text), distill_logit_scale   64 pairs
with h_I / h_T the student's cross-modal embeddings of every image view / caption view (model.forward_train) and
the teacher's embeddings of the 2 global crops and the 2 global captions (normalized, no gradient).

That is 80 N x N logit matrices per step. `multiview_infonce` never holds one: it walks the similarity matrix of
ALL view pairs at once in big tiles ([r samples x Va views] x [c samples x Vb views], one matmul each), keeps an
online log-sum-exp per row and per column of every pair, and recomputes the tiles in the backward pass from the
saved log-sum-exps (Inf-CL's idea, extended to many views). Memory is linear in N. Under torch.distributed each
rank scores its own rows (and columns) against everyone's features and the gradients are summed back to the
ranks that own the features (OpenCLIP's `local_loss` + `gather_with_grad` convention): the value on a rank is the
mean over its own samples, the mean over ranks is the loss of the global batch, and after DDP averages the
parameter gradients they are exactly the gradient of the global-batch loss.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import CosmosError
from . import distributed as D

MODES = ("cosmos", "clip", "clip-textcrops")


# ---------------------------------------------------------------------------------------------------------------
# The reference: every pair's logits materialized (tests and benchmarks compare against this)
# ---------------------------------------------------------------------------------------------------------------
def naive_multiview_infonce_pairs(a: torch.Tensor, b: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Per-pair symmetric InfoNCE [Va, Vb] of a [Va, N, D] and b [Vb, N, D]; logit_scale already exponentiated."""
    labels = torch.arange(a.shape[1], device=a.device)
    rows = []
    for ai in a:
        row = []
        for bj in b:
            logits = logit_scale * ai @ bj.T  # [N, N]
            row.append((F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2)
        rows.append(torch.stack(row))
    return torch.stack(rows)  # [Va, Vb]


def naive_multiview_infonce(a: torch.Tensor, b: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    return naive_multiview_infonce_pairs(a, b, logit_scale).mean()


# ---------------------------------------------------------------------------------------------------------------
# The fused, tiled version
# ---------------------------------------------------------------------------------------------------------------
def default_tile_elements(device: torch.device) -> int:
    """Logits per tile: big enough for efficient matmuls, small enough to stay out of the memory budget."""
    return 1 << 26 if device.type == "cuda" else 1 << 21


def _matmul(x: torch.Tensor, y_t: torch.Tensor) -> torch.Tensor:
    """x @ y_t in the inputs' dtype with a float32 result (float32 output straight from the GEMM where supported)."""
    if x.dtype != torch.float32 and x.is_cuda:
        try:
            return torch.mm(x, y_t, out_dtype=torch.float32)
        except (TypeError, RuntimeError):
            pass
    return (x @ y_t).float()


def _spans(n: int, size: int) -> list[tuple[int, int]]:
    return [(start, min(n, start + size)) for start in range(0, n, size)]


def _tile(vx: int, vy: int, tile_elements: int) -> int:
    """Samples per tile side so that a [side * vx, side * vy] tile holds about `tile_elements` logits."""
    return max(1, int(math.sqrt(tile_elements / (vx * vy))))


def _lse_pass(x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor, both: bool, tile_elements: int):
    """x [R, Vx, D] rows, y [C, Vy, D] columns (sample-major). Returns the log-sum-exp over the C columns of every
    (row sample, x view, y view): [R, Vx, Vy]; with both=True also over the R rows of every (column sample, y view,
    x view): [C, Vy, Vx]. One pass over [r * Vx, c * Vy] tiles, combined online with logaddexp."""
    r_all, vx, dim = x.shape
    c_all, vy, _ = y.shape
    side = _tile(vx, vy, tile_elements)
    xs = (x.float() * scale).to(x.dtype)  # the temperature folded into the (small) left operand
    row = torch.full((r_all, vx, vy), float("-inf"), device=x.device)
    col = torch.full((c_all, vy, vx), float("-inf"), device=x.device) if both else None
    for r0, r1 in _spans(r_all, side):
        xt = xs[r0:r1].reshape(-1, dim)  # [r*Vx, D]
        for c0, c1 in _spans(c_all, side):
            s = _matmul(xt, y[c0:c1].reshape(-1, dim).T).view(r1 - r0, vx, c1 - c0, vy)  # logits
            torch.logaddexp(row[r0:r1], s.logsumexp(dim=2), out=row[r0:r1])
            if both:
                torch.logaddexp(col[c0:c1], s.logsumexp(dim=0).permute(1, 2, 0), out=col[c0:c1])
    return row, col


def _grad_pass(x, y, scale, row, col, weights, tile_elements, gx, gy):
    """Accumulate the gradients of sum_ij weights_ij * (row terms [+ column terms]) over one pass of tiles:
    dL/dlogits = weights_ij * (exp(s - row_lse) [+ exp(s - col_lse)]); gx += scale * G y, gy += scale * G^T x
    (gy may be None). weights [Vx, Vy] is oriented (x view, y view). Returns the scale's gradient (float32)."""
    r_all, vx, dim = x.shape
    c_all, vy, _ = y.shape
    side = _tile(vx, vy, tile_elements)
    folded = bool((weights > 0).all()) and float(scale) > 0
    if folded:  # w * exp(s - lse) = exp(s - (lse - log w)): the pair weights ride on the small LSE tensors
        row = row - weights.log()[None]
        col = col - weights.T.log()[None] if col is not None else None
        xs = (x.float() * scale).to(x.dtype)  # logits straight from the matmul; d scale = sum(G * logits) / scale
    else:
        xs = x
    d_scale = torch.zeros((), device=x.device)
    for r0, r1 in _spans(r_all, side):
        xt = xs[r0:r1].reshape(-1, dim)
        for c0, c1 in _spans(c_all, side):
            yt = y[c0:c1].reshape(-1, dim)
            s = _matmul(xt, yt.T).view(r1 - r0, vx, c1 - c0, vy)  # logits (folded) or cosines
            logits = s if folded else s * scale
            p = torch.sub(logits, row[r0:r1, :, None, :]).exp_()  # softmax over columns
            if col is not None:
                p.add_(torch.sub(logits, col[c0:c1].permute(2, 0, 1)[None]).exp_())  # softmax over rows
            if not folded:
                p.mul_(weights[None, :, None, :])
            d_scale += torch.dot(p.view(-1), s.view(-1))
            g = p.view(xt.shape[0], yt.shape[0]).to(x.dtype)  # [r*Vx, c*Vy]
            gx[r0:r1] += (g @ yt).float().view(r1 - r0, vx, dim).mul_(scale)
            if gy is not None:
                gy[c0:c1] += (g.T @ x[r0:r1].reshape(-1, dim)).float().view(c1 - c0, vy, dim).mul_(scale)
    return d_scale / scale if folded else d_scale


class _MultiViewInfoNCE(torch.autograd.Function):
    """Per-pair symmetric InfoNCE [Va, Vb] without materializing a logits matrix. See the module docstring."""

    @staticmethod
    def forward(ctx, a, b, scale, a_all, b_all, rank, world, tile_elements):
        # a [n, Va, D], b [n, Vb, D]: this rank's samples (sample-major); a_all / b_all: every rank's ([N, V, D]).
        n = a.shape[0]
        total = a_all.shape[0]
        s = scale.detach().float()
        if world == 1:
            row, col = _lse_pass(a, b, s, True, tile_elements)  # [N, Va, Vb], [N, Vb, Va]
        else:  # own rows against all columns, own columns against all rows
            row, _ = _lse_pass(a, b_all, s, False, tile_elements)  # [n, Va, Vb]
            col, _ = _lse_pass(b, a_all, s, False, tile_elements)  # [n, Vb, Va]
        diag = torch.einsum("nid,njd->ij", a.float(), b.float())  # [Va, Vb] sum over own samples of a_i . b_j
        pairs = (row.sum(0) + col.sum(0).T - 2 * s * diag) / (2 * total) * world  # [Va, Vb]
        ctx.save_for_backward(a, b, a_all, b_all, row, col, s)
        ctx.rank, ctx.world, ctx.n, ctx.tile_elements, ctx.scale_dtype = rank, world, n, tile_elements, scale.dtype
        return pairs

    @staticmethod
    def backward(ctx, grad_pairs):
        a, b, a_all, b_all, row, col, s = ctx.saved_tensors
        rank, world, n, tile = ctx.rank, ctx.world, ctx.n, ctx.tile_elements
        need_a, need_b, need_s = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        total = a_all.shape[0]
        w = grad_pairs.float() * world / (2 * total)  # [Va, Vb]: d loss_pair / d (row + col terms)
        mine = slice(rank * n, (rank + 1) * n)
        if world == 1:
            ga = torch.zeros(a.shape, device=a.device)
            gb = torch.zeros(b.shape, device=b.device) if need_b else None
            d_scale = _grad_pass(a, b, s, row, col, w, tile, ga, gb)
        else:
            ga_all = torch.zeros(a_all.shape, device=a.device)
            gb_all = torch.zeros(b_all.shape, device=b.device)
            d_scale = _grad_pass(a, b_all, s, row, None, w, tile, ga_all[mine], gb_all)
            d_scale += _grad_pass(b, a_all, s, col, None, w.T, tile, gb_all[mine], ga_all)
            # Features belong to the rank that computed them: sum every rank's contribution there.
            if need_a:
                D.all_reduce_sum(ga_all)
            if need_b:
                D.all_reduce_sum(gb_all)
            ga, gb = ga_all[mine], gb_all[mine]
        # The diagonal (positive pair) terms: - 2 s sum_ij w_ij a_i . b_j over own samples.
        af, bf = a.float(), b.float()
        ga = ga - 2 * s * torch.einsum("ij,njd->nid", w, bf)
        if gb is not None:
            gb = gb - 2 * s * torch.einsum("ij,nid->njd", w, af)
        d_scale = d_scale - 2 * (w * torch.einsum("nid,njd->ij", af, bf)).sum()
        return (ga.to(a.dtype) if need_a else None, gb.to(b.dtype) if need_b and gb is not None else None,
                d_scale.to(ctx.scale_dtype) if need_s else None, None, None, None, None, None)


@torch.compiler.disable
def multiview_infonce_pairs(a: torch.Tensor, b: torch.Tensor, logit_scale: torch.Tensor,
                            tile_elements: int | None = None) -> torch.Tensor:
    """Per-pair symmetric InfoNCE [Va, Vb] of views a [Va, n, D] and b [Vb, n, D] (normalized), fused and tiled.

    logit_scale: the temperature already exponentiated (a tensor; its gradient is computed). The matmuls run in
    the features' dtype (bf16 features: bf16 GEMMs), the log-sum-exps and gradients in float32. Under
    torch.distributed with several ranks, n is this rank's share and every rank must pass the same n; the result
    is this rank's share as described in the module docstring (mean over ranks = the global-batch loss)."""
    if a.dim() != 3 or b.dim() != 3 or a.shape[1:] != b.shape[1:]:
        raise CosmosError(f"multiview_infonce wants a [Va, N, D] and b [Vb, N, D] with the same N and D, got "
                          f"{tuple(a.shape)} and {tuple(b.shape)}")
    if b.dtype != a.dtype:
        b = b.to(a.dtype)
    tile_elements = tile_elements or default_tile_elements(a.device)
    rank, world = D.rank_and_world()
    a_s, b_s = a.transpose(0, 1).contiguous(), b.transpose(0, 1).contiguous()  # sample-major [n, V, D]
    a_all = D.all_gather_cat(a_s.detach()) if world > 1 else a_s.detach()
    b_all = D.all_gather_cat(b_s.detach()) if world > 1 else b_s.detach()
    scale = logit_scale if torch.is_tensor(logit_scale) else torch.tensor(float(logit_scale), device=a.device)
    with torch.autocast(device_type=a.device.type, enabled=False):  # the dtype is the features' own, not autocast's
        return _MultiViewInfoNCE.apply(a_s, b_s, scale, a_all, b_all, rank, world, tile_elements)


def multiview_infonce(a: torch.Tensor, b: torch.Tensor, logit_scale: torch.Tensor,
                      tile_elements: int | None = None) -> torch.Tensor:
    """Mean symmetric InfoNCE over all view pairs of a [Va, N, D] and b [Vb, N, D] (normalized); logit_scale already
    exponentiated. Fused and tiled (never an N x N matrix); see `multiview_infonce_pairs` for distributed use."""
    return multiview_infonce_pairs(a, b, logit_scale, tile_elements).mean()


# ---------------------------------------------------------------------------------------------------------------
# The COSMOS objective and its ablations
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class LossConfig:
    """Which terms the objective has.

    mode: "cosmos" (CLIP term + distillation), "clip" (one image view x one caption: plain CLIP),
    "clip-textcrops" (the CLIP term over the global image crops x every text crop; no teacher, no distillation).
    The ablation switches of the paper's Table 5 (cosmos mode only) each remove exactly their terms:
    distill_image=False drops the terms whose student side is h_I (image views), distill_text=False those of h_T
    (caption views), cross_attention=False uses the pooled embeddings themselves as h_I and h_T (no poolers).
    """

    mode: str = "cosmos"
    distill_image: bool = True
    distill_text: bool = True
    cross_attention: bool = True
    tile_elements: int | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise CosmosError(f"unknown training mode {self.mode!r}; use one of {', '.join(MODES)}")
        if self.mode == "cosmos" and not (self.distill_image or self.distill_text):
            raise CosmosError("cosmos mode with neither image nor text self-distillation is clip-textcrops; "
                              "use --mode clip-textcrops")

    @property
    def distills(self) -> bool:
        return self.mode == "cosmos"

    def cross(self) -> tuple[str, ...]:
        """Which cross-modal embeddings the student forward must compute."""
        if not self.distills or not self.cross_attention:
            return ()
        return tuple(side for side, on in (("image", self.distill_image), ("text", self.distill_text)) if on)


def cosmos_loss(student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor] | None, cfg: LossConfig,
                n_global: int) -> dict[str, torch.Tensor]:
    """The objective's parts by name, and their sum under "loss".

    student: `CosmosModel.forward_train` output (view-major, normalized): "image" [Vi, N, E] with the n_global
    global crops first, "text" [Vt, N, E], "h_image" / "h_text" when used, "logit_scale", "distill_logit_scale".
    teacher: {"image": [n_global, N, E], "text": [G, N, E]} (normalized, detached), for cosmos mode.
    Parts: "clip"; in cosmos mode also "distill" (the mean of its terms) and each term:
    "distill_hi_ti", "distill_hi_tt", "distill_ht_ti", "distill_ht_tt" (h_I / h_T against teacher image / text).
    """
    tile = cfg.tile_elements
    parts: dict[str, torch.Tensor] = {}
    images = student["image"][:n_global] if cfg.mode != "clip" else student["image"][:1]
    texts = student["text"] if cfg.mode != "clip" else student["text"][:1]
    parts["clip"] = multiview_infonce(images, texts, student["logit_scale"], tile)
    loss = parts["clip"]
    if cfg.distills:
        if teacher is None:
            raise CosmosError("cosmos mode needs the teacher's features")
        sides = []
        if cfg.distill_image:
            sides.append(("hi", student["h_image"] if cfg.cross_attention else student["image"]))
        if cfg.distill_text:
            sides.append(("ht", student["h_text"] if cfg.cross_attention else student["text"]))
        targets = torch.cat([teacher["image"], teacher["text"]])  # [n_global + G, N, E]
        n_img = teacher["image"].shape[0]
        queries = torch.cat([h for _, h in sides])  # all student sides in ONE fused call
        pairs = multiview_infonce_pairs(queries, targets.to(queries.dtype), student["distill_logit_scale"], tile)
        start = 0
        terms = []
        for name, h in sides:
            block = pairs[start:start + h.shape[0]]
            start += h.shape[0]
            for target, cols in (("ti", slice(0, n_img)), ("tt", slice(n_img, None))):
                parts[f"distill_{name}_{target}"] = block[:, cols].mean()
                terms.append(parts[f"distill_{name}_{target}"])
        parts["distill"] = torch.stack(terms).mean()
        loss = loss + parts["distill"]
    parts["loss"] = loss
    return parts
