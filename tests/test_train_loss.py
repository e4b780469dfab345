"""The fused multi-view InfoNCE against the naive reference (one process and 2 gloo processes), the COSMOS objective
against a direct transcription of COSMOS_METHOD.md section 3, the ablation switches, the cross-attention poolers
against nn.MultiheadAttention, DINO's positional interpolation, the EMA teacher and exact gradient accumulation."""
from __future__ import annotations

import math
import os
import socket

import pytest
import torch
import torch.nn.functional as F

from cosmos.model.cosmos import CosmosConfig, CosmosModel, TextConfig, VisionConfig
from cosmos.train.ema import Teacher
from cosmos.train.loss import (LossConfig, cosmos_loss, multiview_infonce, multiview_infonce_pairs,
                               naive_multiview_infonce, naive_multiview_infonce_pairs)
from cosmos.train.step import Batch, StudentForward, TrainStep

REL = 1e-5  # fp32 tolerance (relative to the largest magnitude), as the issue asks


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.detach().double(), ref.detach().double()
    return float((x - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def views(v: int, n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(v, n, d, generator=g), dim=-1)


@pytest.mark.parametrize("va, vb, n, tile", [(2, 8, 37, 300), (16, 4, 50, 1000), (1, 1, 5, 1), (3, 2, 129, 1 << 21),
                                             (8, 2, 64, 4096)])
def test_fused_equals_naive_value_and_gradients(va, vb, n, tile):
    # N not a multiple of the tile side (37 with a 300-logit tile = 4-sample tiles, 50, 129 ...)
    a, b = views(va, n, 32, 0).requires_grad_(), views(vb, n, 32, 1).requires_grad_()
    scale = torch.tensor(9.7, requires_grad=True)
    ref = naive_multiview_infonce(a, b, scale)
    ga, gb, gs = torch.autograd.grad(ref, (a, b, scale))
    out = multiview_infonce(a, b, scale, tile_elements=tile)
    fa, fb, fs = torch.autograd.grad(out, (a, b, scale))
    assert rel_err(out, ref) <= REL
    assert rel_err(fa, ga) <= REL and rel_err(fb, gb) <= REL and rel_err(fs, gs) <= REL


def test_fused_pairs_and_a_large_scale():
    # per-pair values, and a temperature at the clamp (100): exp(s - lse) far below float32's range must not NaN
    a, b = views(3, 40, 16, 2), views(2, 40, 16, 3)
    scale = torch.tensor(100.0)
    assert rel_err(multiview_infonce_pairs(a, b, scale, tile_elements=200), naive_multiview_infonce_pairs(a, b, scale)) <= REL
    a.requires_grad_()
    g = torch.autograd.grad(multiview_infonce(a, b, scale, tile_elements=200), a)[0]
    assert torch.isfinite(g).all()


def test_fused_gradient_is_skipped_for_targets_without_grad():
    a, b = views(4, 20, 8, 4).requires_grad_(), views(2, 20, 8, 5)  # b: teacher targets, detached
    out = multiview_infonce(a, b, torch.tensor(5.0))
    out.backward()
    assert a.grad is not None and b.grad is None


def test_fused_never_allocates_an_n_by_n_matrix():
    # With a 4k-logit tile at N = 512 and 4 x 2 views, no tensor of N*N (262,144) elements or more may appear.
    a, b = views(4, 512, 16, 6).requires_grad_(), views(2, 512, 16, 7).requires_grad_()
    biggest = 0

    def pack(t):
        nonlocal biggest
        biggest = max(biggest, t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = multiview_infonce(a, b, torch.tensor(10.0), tile_elements=4096)
    out.backward()
    assert biggest < 512 * 512
    from cosmos.train import loss as loss_module

    tiles = []
    real = loss_module._matmul

    def spy(x, y):
        r = real(x, y)
        tiles.append(r.numel())
        return r

    loss_module._matmul = spy
    try:
        multiview_infonce(a.detach(), b.detach(), torch.tensor(10.0), tile_elements=4096)
    finally:
        loss_module._matmul = real
    assert tiles and max(tiles) <= 4096 + 4 * 2 * 33  # one tile side rounding


# --- 2 gloo processes against the single-process global batch -----------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, out: dict) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        n = 11  # per rank
        a_all, b_all = views(6, n * world, 16, 10), views(3, n * world, 16, 11)
        mine = slice(rank * n, (rank + 1) * n)
        a = a_all[:, mine].clone().requires_grad_()
        b = b_all[:, mine].clone().requires_grad_()
        scale = torch.tensor(7.0, requires_grad=True)
        loss = multiview_infonce(a, b, scale, tile_elements=100)
        loss.backward()
        out[rank] = (float(loss), a.grad.clone(), b.grad.clone(), float(scale.grad))
    finally:
        dist.destroy_process_group()


def test_fused_under_two_gloo_processes_equals_the_global_batch():
    import torch.multiprocessing as mp

    world, n = 2, 11
    port = _free_port()
    manager = mp.Manager()
    out = manager.dict()
    mp.spawn(_ddp_worker, args=(world, port, out), nprocs=world, join=True)
    a_all = views(6, n * world, 16, 10).requires_grad_()
    b_all = views(3, n * world, 16, 11).requires_grad_()
    scale = torch.tensor(7.0, requires_grad=True)
    ref = naive_multiview_infonce(a_all, b_all, scale)
    ref.backward()
    ref = ref.item()
    # The value on a rank is its share (OpenCLIP's local_loss convention): their mean is the global loss.
    assert abs(sum(out[r][0] for r in range(world)) / world - ref) <= REL * abs(ref)
    # Feature gradients: each rank holds sum over ranks of d(rank loss)/d(its features) = world x the global
    # gradient, which DDP's averaging of parameter gradients turns back into the global gradient.
    for r in range(world):
        mine = slice(r * n, (r + 1) * n)
        assert rel_err(out[r][1] / world, a_all.grad[:, mine]) <= REL
        assert rel_err(out[r][2] / world, b_all.grad[:, mine]) <= REL
    assert abs(sum(out[r][3] for r in range(world)) / world - float(scale.grad)) <= REL * abs(float(scale.grad))


# --- the objective ------------------------------------------------------------------------------------------------
def transcribed_clip(A: list[torch.Tensor], B: list[torch.Tensor], s: float) -> torch.Tensor:
    """COSMOS_METHOD.md section 3, written out: mean over (a, b) of (CE(s a b^T) + CE(s b a^T)) / 2."""
    total, count = 0.0, 0
    for a in A:
        for b in B:
            logits = s * a @ b.T
            labels = torch.arange(len(a))
            total = total + (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
            count += 1
    return total / count


def make_features(n: int = 6, e: int = 8, seed: int = 0) -> tuple[dict, dict]:
    student = {"image": views(8, n, e, seed), "text": views(8, n, e, seed + 1), "h_image": views(8, n, e, seed + 2),
               "h_text": views(8, n, e, seed + 3), "logit_scale": torch.tensor(10.0),
               "distill_logit_scale": torch.tensor(6.0)}
    teacher = {"image": views(2, n, e, seed + 4), "text": views(2, n, e, seed + 5)}
    return student, teacher


def test_cosmos_loss_equals_the_transcription_of_section_3():
    s, t = make_features()
    parts = cosmos_loss(s, t, LossConfig(), n_global=2)
    clip = transcribed_clip(list(s["image"][:2]), list(s["text"]), 10.0)
    ti, tt = list(t["image"]), list(t["text"])
    hi, ht = list(s["h_image"]), list(s["h_text"])
    distill = (transcribed_clip(hi, ti, 6.0) + transcribed_clip(hi, tt, 6.0) + transcribed_clip(ht, ti, 6.0)
               + transcribed_clip(ht, tt, 6.0)) / 4
    assert math.isclose(float(parts["clip"]), float(clip), rel_tol=1e-5)
    assert math.isclose(float(parts["distill"]), float(distill), rel_tol=1e-5)
    assert math.isclose(float(parts["loss"]), float(clip + distill), rel_tol=1e-5)
    assert math.isclose(float(parts["distill_hi_tt"]), float(transcribed_clip(hi, tt, 6.0)), rel_tol=1e-5)
    assert math.isclose(float(parts["distill_ht_ti"]), float(transcribed_clip(ht, ti, 6.0)), rel_tol=1e-5)


def test_each_ablation_switch_removes_exactly_its_terms():
    s, t = make_features(seed=3)
    full = cosmos_loss(s, t, LossConfig(), 2)
    no_text = cosmos_loss(s, t, LossConfig(distill_text=False), 2)
    assert set(no_text) == {"clip", "distill_hi_ti", "distill_hi_tt", "distill", "loss"}
    assert math.isclose(float(no_text["distill"]), (float(full["distill_hi_ti"]) + float(full["distill_hi_tt"])) / 2,
                        rel_tol=1e-6)
    no_image = cosmos_loss(s, t, LossConfig(distill_image=False), 2)
    assert set(no_image) == {"clip", "distill_ht_ti", "distill_ht_tt", "distill", "loss"}
    assert math.isclose(float(no_image["distill"]), (float(full["distill_ht_ti"]) + float(full["distill_ht_tt"])) / 2,
                        rel_tol=1e-6)
    # without cross-attention the pooled embeddings stand in for h_I / h_T
    plain = cosmos_loss(s, t, LossConfig(cross_attention=False), 2)
    swapped = cosmos_loss({**s, "h_image": s["image"], "h_text": s["text"]}, t, LossConfig(), 2)
    assert math.isclose(float(plain["loss"]), float(swapped["loss"]), rel_tol=1e-6)
    assert LossConfig(cross_attention=False).cross() == ()
    assert LossConfig(distill_text=False).cross() == ("image",)
    # CLIP modes: the CLIP term only
    textcrops = cosmos_loss(s, None, LossConfig("clip-textcrops"), 2)
    assert set(textcrops) == {"clip", "loss"} and math.isclose(float(textcrops["loss"]), float(full["clip"]), rel_tol=1e-6)
    clip = cosmos_loss(s, None, LossConfig("clip"), 2)
    assert math.isclose(float(clip["loss"]), float(transcribed_clip([s["image"][0]], [s["text"][0]], 10.0)), rel_tol=1e-5)


# --- the model pieces training uses --------------------------------------------------------------------------------
def small_config() -> CosmosConfig:
    # image width 48, text width 40, embedding 32: every width differs (the official code crashes here, quirk 7)
    return CosmosConfig(embed_dim=32, vision=VisionConfig(image_size=32, patch_size=8, width=48, layers=2, heads=4),
                        text=TextConfig(context_length=20, vocab_size=300, width=40, layers=2, heads=4),
                        cross_pool_heads=4)


def mha_pooler(pooler, query: torch.Tensor, tokens: torch.Tensor, key_padding_mask=None) -> torch.Tensor:
    """The same pooler through torch's nn.MultiheadAttention with the same weights."""
    mha = torch.nn.MultiheadAttention(query.shape[-1], pooler.attn.heads, batch_first=True)
    with torch.no_grad():
        mha.in_proj_weight.copy_(pooler.attn.in_proj_weight)
        mha.in_proj_bias.copy_(pooler.attn.in_proj_bias)
        mha.out_proj.weight.copy_(pooler.attn.out_proj.weight)
        mha.out_proj.bias.copy_(pooler.attn.out_proj.bias)
    kv = pooler.ln_k(tokens)
    return mha(pooler.ln_q(query), kv, kv, key_padding_mask=key_padding_mask, need_weights=False)[0]


def test_cross_attention_poolers_equal_multihead_attention():
    torch.manual_seed(0)
    model = CosmosModel(small_config()).eval()
    for p in model.parameters():  # randomize everything, biases and norms included
        torch.nn.init.normal_(p, std=0.3)
    images = torch.randn(3, 3, 32, 32)
    text = torch.randint(1, 298, (3, 20))
    text[:, 9] = 299
    text[:, 10:] = 0
    with torch.no_grad():
        pooled_i, tokens_i = model.encode_image_views(images)
        pooled_t, tokens_t = model.encode_text_views(text)
        mapped_t = model.text_token_mapping(tokens_t)
        mapped_i = model.image_token_mapping(tokens_i)
        query_i = pooled_i[:, None].expand(3, 2, -1)
        query_t = pooled_t[:, None]
        mask = text == 0
        ours = model.text_attn_cross_pool(query_i, mapped_t, mask)
        ref = mha_pooler(model.text_attn_cross_pool, query_i, mapped_t, mask)
        assert torch.allclose(ours, ref, atol=1e-5)
        assert torch.allclose(model.cross_text(query_i, tokens_t, mask), query_i + ref, atol=1e-5)
        ours = model.visual.attn_cross_pool(query_t, mapped_i)
        ref = mha_pooler(model.visual.attn_cross_pool, query_t, mapped_i)
        assert torch.allclose(ours, ref, atol=1e-5)
        assert torch.allclose(model.cross_image(query_t, tokens_i), query_t + ref, atol=1e-5)
        # keys and values are the same normalized tokens: using the raw tokens as values must differ
        mha_wrong = model.visual.attn_cross_pool.attn
        assert not torch.allclose(ours, mha_wrong.cross(model.visual.attn_cross_pool.ln_q(query_t), mapped_i), atol=1e-3)


def test_forward_train_layout_trimming_and_official_padding():
    torch.manual_seed(1)
    model = CosmosModel(small_config()).eval()
    b = 3
    g = torch.randn(b, 2, 3, 32, 32)
    l = torch.randn(b, 4, 3, 16, 16)
    gt = torch.randint(1, 298, (b, 2, 20))
    lt = torch.randint(1, 298, (b, 3, 20))
    for ids, end in ((gt, 12), (lt, 5)):
        ids[..., end] = 299
        ids[..., end + 1:] = 0
    with torch.no_grad():
        out = model.forward_train(g, gt, l, lt)
        assert out["image"].shape == (6, b, 32) and out["text"].shape == (5, b, 32)
        assert out["h_image"].shape == (6, b, 32) and out["h_text"].shape == (5, b, 32)
        # view-major: image view 1 of sample 2 is global crop 1 of sample 2
        assert torch.allclose(out["image"][1, 2], F.normalize(model.encode_image(g[2:3, 1]), dim=-1)[0], atol=1e-5)
        assert torch.allclose(out["image"][3, 0], F.normalize(model.encode_image(l[0:1, 1]), dim=-1)[0], atol=1e-5)
        assert torch.allclose(out["text"][3, 1], F.normalize(model.encode_text(lt[1:2, 1]), dim=-1)[0], atol=1e-5)
        # h_I: image queries over caption #1 (global text 0) with padding masked == no padding at all
        q = model.encode_image(g[:, 0])[:, None]
        _, tokens = model.encode_text_views(gt[:, 0, :13])
        h = F.normalize(model.cross_text(q, tokens), dim=-1)[:, 0]
        assert torch.allclose(out["h_image"][0], h, atol=1e-5)
        # h_T: caption queries over global crop #1's patch tokens
        _, patches = model.encode_image_views(g[:, 0])
        h = F.normalize(model.cross_image(model.encode_text(lt[:, 2])[:, None], patches), dim=-1)[:, 0]
        assert torch.allclose(out["h_text"][4], h, atol=1e-5)
        # official behaviour (quirk 2): full length, padding attended -> h_I differs, pooled embeddings do not
        official = model.forward_train(g, gt, l, lt, text_padding_mask=False)
        assert torch.allclose(official["text"], out["text"], atol=1e-5)
        assert not torch.allclose(official["h_image"], out["h_image"], atol=1e-4)
        _, full_tokens = model.encode_text_views(gt[:, 0])
        h = F.normalize(model.cross_text(q, full_tokens), dim=-1)[:, 0]
        assert torch.allclose(official["h_image"][0], h, atol=1e-5)


def dino_interpolate(pos: torch.Tensor, g_old: int, g_new: int) -> torch.Tensor:
    """DINO's interpolate_pos_encoding, transcribed: scale_factor = (g_new + 0.1) / g_old, bicubic."""
    cls, grid = pos[:1], pos[1:]
    dim = pos.shape[-1]
    w0 = h0 = g_new + 0.1
    grid = F.interpolate(grid.reshape(1, g_old, g_old, dim).permute(0, 3, 1, 2),
                         scale_factor=(w0 / g_old, h0 / g_old), mode="bicubic")
    assert int(w0) == grid.shape[-2] and int(h0) == grid.shape[-1]
    return torch.cat([cls, grid.permute(0, 2, 3, 1).view(-1, dim)])


def test_positional_embedding_follows_dinos_formula():
    torch.manual_seed(0)
    model = CosmosModel("ViT-B-16")
    pos = model.visual.positional_embedding.detach()
    ours = model.visual.positional_embedding_for(6, 6).detach()  # 96 px local crops: 14 -> 6
    assert ours.shape == (37, 768)
    assert torch.allclose(ours, dino_interpolate(pos, 14, 6), atol=1e-6)
    grid = pos[1:].reshape(1, 14, 14, -1).permute(0, 3, 1, 2)
    by_size = F.interpolate(grid, size=(6, 6), mode="bicubic", align_corners=False).permute(0, 2, 3, 1).reshape(36, -1)
    assert not torch.allclose(ours[1:], by_size, atol=1e-3)  # the two forms sample different points


# --- the teacher and one training step -----------------------------------------------------------------------------
def test_teacher_is_a_clip_copy_and_follows_the_ema_rule():
    torch.manual_seed(0)
    student = CosmosModel(small_config())
    teacher = Teacher(student, momentum=0.9)
    assert not teacher.model.config.cosmos and not hasattr(teacher.model, "text_attn_cross_pool")
    assert all(not p.requires_grad and p.dtype == torch.float32 for p in teacher.model.parameters())
    before = teacher.model.visual.proj.detach().clone()
    with torch.no_grad():
        student.visual.proj.add_(1.0)
    teacher.update(student, step=0)
    assert torch.allclose(teacher.model.visual.proj, 0.9 * before + 0.1 * student.visual.proj.detach(), atol=1e-6)
    ramp = Teacher(student, momentum=0.99, total_steps=100, ramp=True)
    assert ramp.momentum_at(0) == pytest.approx(0.99) and ramp.momentum_at(100) == pytest.approx(1.0)
    assert ramp.momentum_at(50) == pytest.approx(0.995)


def perturbed_teacher(model: CosmosModel) -> Teacher:
    """A teacher that differs from the student (the EMA after some steps), from the global torch RNG."""
    teacher = Teacher(model, 0.99)
    with torch.no_grad():
        for p in teacher.model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return teacher


def step_inputs(n: int, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    gt = torch.randint(1, 298, (n, 2, 20), generator=g)
    lt = torch.randint(1, 298, (n, 3, 20), generator=g)
    for ids in (gt, lt):
        ends = torch.randint(3, 19, ids.shape[:2] + (1,), generator=g)
        ids.masked_fill_(torch.arange(20) > ends, 0)
        ids.scatter_(2, ends, 299)
    return Batch(torch.randn(n, 2, 3, 32, 32, generator=g), gt, torch.randn(n, 4, 3, 16, 16, generator=g), lt)


@pytest.mark.parametrize("mode", ["cosmos", "clip-textcrops"])
def test_accumulation_4_x_8_equals_one_batch_of_32(mode):
    def grads(accum: int):
        torch.manual_seed(0)
        cfg = small_config()
        cfg.cosmos = mode == "cosmos"
        model = CosmosModel(cfg)
        teacher = perturbed_teacher(model) if mode == "cosmos" else None
        loss_cfg = LossConfig(mode)
        step = TrainStep(StudentForward(model, loss_cfg.cross()), teacher, loss_cfg, torch.device("cpu"), "fp32")
        parts = step(step_inputs(32), accum)
        return parts, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    parts1, g1 = grads(1)
    parts4, g4 = grads(4)
    assert set(g1) == set(g4) and len(g1) > 20
    for k in parts1:
        assert math.isclose(parts1[k], parts4[k], rel_tol=1e-5), k
    for name in g1:
        assert rel_err(g4[name], g1[name]) <= 1e-4, name
    assert "logit_scale" in g1 and (mode != "cosmos" or "distill_logit_scale" in g1)


def test_length_buckets_change_nothing_but_the_padding_computed():
    # 40 samples x 2 global captions = 80 rows: two length buckets (64 + 16); caption #1's rows land in both
    torch.manual_seed(3)
    model = CosmosModel(small_config()).eval()
    b = 40
    g = torch.randn(b, 2, 3, 32, 32)
    gt = torch.randint(1, 298, (b, 2, 20))
    ends = torch.randint(2, 19, (b, 2, 1))
    gt.masked_fill_(torch.arange(20) > ends, 0)
    gt.scatter_(2, ends, 299)
    with torch.no_grad():
        out = model.forward_train(g, gt, cross=("image",))
        ref_text = F.normalize(model.encode_text(gt.transpose(0, 1).reshape(2 * b, 20)), dim=-1).view(2, b, -1)
        assert torch.allclose(out["text"], ref_text, atol=1e-5)
        q = model.encode_image(g.transpose(0, 1).reshape(2 * b, 3, 32, 32)).view(2, b, -1).transpose(0, 1)
        _, tokens = model.encode_text_views(gt[:, 0])
        mask = torch.arange(20)[None] > ends[:, 0]
        h = F.normalize(model.cross_text(q, tokens, mask), dim=-1).transpose(0, 1)
        assert torch.allclose(out["h_image"], h, atol=1e-5)
