"""Model parity with OpenCLIP 3.3.0 (the reference) and the model's own contracts.

Tolerance: max abs difference <= 1e-5 on fp32 image and text embeddings (typical magnitude 1-5), with every
parameter of the OpenCLIP model randomized (LayerNorm gains and biases included, so none sits at an identity init).
"""
import math

import open_clip
import pytest
import torch
from open_clip.model import CLIPTextCfg, CLIPVisionCfg

from cosmos.model.cosmos import CONFIGS, CosmosConfig, CosmosModel, TextConfig, VisionConfig, get_config

TOL = 1e-5


def randomize_(model: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("logit_scale"):
                p.fill_(torch.rand((), generator=g).item() * 4)
                continue
            noise = torch.randn(p.shape, generator=g) * 0.02
            if p.dim() == 1 and ("ln" in name):
                p.copy_((1.0 if name.endswith("weight") else 0.0) + noise * 5)
            else:
                p.add_(noise)


def small_openclip(quick_gelu: bool) -> open_clip.model.CLIP:
    return open_clip.model.CLIP(
        embed_dim=96,
        vision_cfg=CLIPVisionCfg(layers=2, width=128, head_width=64, patch_size=8, image_size=32),
        text_cfg=CLIPTextCfg(context_length=20, vocab_size=500, width=64, heads=1, layers=2),
        quick_gelu=quick_gelu,
    )


SMALL = CosmosConfig(
    embed_dim=96,
    vision=VisionConfig(image_size=32, patch_size=8, width=128, layers=2, heads=2),
    text=TextConfig(context_length=20, vocab_size=500, width=64, layers=2, heads=1),
)


def make_pair(name: str, quick_gelu: bool):
    if name == "small":
        ref, cfg = small_openclip(quick_gelu), SMALL
    else:
        ref = open_clip.create_model(name + ("-quickgelu" if quick_gelu else ""))
        cfg = get_config(name)
    cfg = CosmosConfig(**{**cfg.__dict__, "quick_gelu": quick_gelu})
    ref.eval()
    randomize_(ref)
    ours = CosmosModel(cfg).eval()
    missing, unexpected = ours.load_state_dict(ref.state_dict(), strict=False)
    assert unexpected == []
    assert all(k.startswith(("distill_logit_scale", "visual.attn_cross_pool", "text_attn", "image_token", "text_token"))
               for k in missing)
    return ref, ours, cfg


def inputs(cfg: CosmosConfig, n_img=2, n_txt=3):
    g = torch.Generator().manual_seed(1)
    images = torch.randn(n_img, 3, cfg.vision.image_size, cfg.vision.image_size, generator=g)
    L, V = cfg.text.context_length, cfg.text.vocab_size
    text = torch.randint(1, V - 2, (n_txt, L), generator=g)
    for i, n in enumerate([3, L // 2, L - 1][:n_txt]):  # end-of-text (the largest id) at varied places
        text[i, n] = V - 1
        text[i, n + 1:] = 0
    return images, text


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ViT-B-16", "ViT-B-32", "small"])
@pytest.mark.parametrize("quick_gelu", [False, True])
def test_embeddings_match_openclip(name, quick_gelu):
    ref, ours, cfg = make_pair(name, quick_gelu)
    images, text = inputs(cfg)
    with torch.no_grad():
        d_img = (ref.encode_image(images) - ours.encode_image(images)).abs().max().item()
        d_txt = (ref.encode_text(text) - ours.encode_text(text)).abs().max().item()
        ref_img, ref_txt, ref_scale = ref(images, text)[:3]
        our_img, our_txt, our_scale = ours(images, text)
    assert d_img <= TOL and d_txt <= TOL, (d_img, d_txt)
    assert (ref_img - our_img).abs().max() <= TOL and (ref_txt - our_txt).abs().max() <= TOL
    assert torch.allclose(ref_scale, our_scale)
    # ...and our (CLIP part of the) state dict loads back into OpenCLIP with strict=True.
    fresh = small_openclip(quick_gelu) if name == "small" else open_clip.create_model(
        name + ("-quickgelu" if quick_gelu else ""))
    fresh.load_state_dict(ours.clip_state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(fresh.eval().encode_text(text), ref.encode_text(text))


def test_quick_gelu_changes_the_output():
    # guards the flag itself: with the wrong activation the parity above must fail
    _, ours, cfg = make_pair("small", quick_gelu=False)
    other = CosmosModel(CosmosConfig(**{**cfg.__dict__, "quick_gelu": True})).eval()
    other.load_state_dict(ours.state_dict())
    images, text = inputs(cfg)
    with torch.no_grad():
        assert (ours.encode_image(images) - other.encode_image(images)).abs().max() > 1e-3


def test_released_layout_counts():
    sd = CosmosModel("ViT-B-16").state_dict()
    assert len(sd) == 323
    assert sum(v.numel() for v in sd.values()) == 152_382_466  # 152.38 M, COSMOS_METHOD.md section 7
    expected = {
        "distill_logit_scale": (),
        "visual.attn_cross_pool.attn.in_proj_weight": (1536, 512),
        "visual.attn_cross_pool.ln_k.weight": (512,),
        "text_attn_cross_pool.attn.out_proj.weight": (512, 512),
        "image_token_mapping.weight": (512, 768),
        "text_token_mapping.weight": (512, 512),
        "logit_scale": (),
        "visual.proj": (768, 512),
        "text_projection": (512, 512),
        "visual.positional_embedding": (197, 768),
    }
    for key, shape in expected.items():
        assert tuple(sd[key].shape) == shape, key
    assert len(CosmosModel(get_config("ViT-B-16")).clip_state_dict()) == 302
    assert math.isclose(sd["logit_scale"].item(), math.log(1 / 0.07), rel_tol=1e-6)


def test_positional_embedding_interpolates_for_other_sizes():
    torch.manual_seed(0)
    model = CosmosModel("tiny").eval()
    with torch.no_grad():
        for size in (32, 64, 96, 48):
            pooled, tokens = model.encode_image_views(torch.randn(2, 3, size, size))
            assert pooled.shape == (2, 128) and tokens.shape == (2, (size // 8) ** 2, 192)
        pos = model.visual.positional_embedding_for(8, 8)
        assert torch.equal(pos, model.visual.positional_embedding)  # native grid: untouched
        pos4 = model.visual.positional_embedding_for(4, 4)
        assert pos4.shape == (17, 192) and torch.equal(pos4[0], model.visual.positional_embedding[0])
        grid = model.visual.positional_embedding[1:].reshape(1, 8, 8, -1).permute(0, 3, 1, 2)
        # DINO's form, as the official code (tests/test_train_loss.py checks it against a transcription of DINO)
        ref = torch.nn.functional.interpolate(grid, scale_factor=(4.1 / 8, 4.1 / 8), mode="bicubic",
                                              align_corners=False)
        assert torch.allclose(pos4[1:], ref.permute(0, 2, 3, 1).reshape(16, -1), atol=1e-6)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        model.encode_image(torch.randn(1, 3, 60, 60))


def test_grad_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = CosmosModel("tiny")
    images, text = torch.randn(2, 3, 64, 64), torch.randint(1, 1000, (2, 77))
    text[:, 5] = 49407

    def grads():
        model.zero_grad()
        img, txt, scale = model(images, text)
        (scale * img @ txt.T).logsumexp(-1).sum().backward()
        return [p.grad.clone() for p in model.parameters() if p.grad is not None]

    import cosmos.model.transformer as transformer

    calls = []
    real_checkpoint = transformer.checkpoint

    def counting_checkpoint(*args, **kwargs):
        calls.append(1)
        return real_checkpoint(*args, **kwargs)

    transformer.checkpoint = counting_checkpoint
    try:
        plain = grads()
        assert calls == []
        model.set_grad_checkpointing(True)
        ckpt = grads()
    finally:
        transformer.checkpoint = real_checkpoint
    assert len(calls) == 8  # every block of both towers (4 + 4) ran through torch.utils.checkpoint
    assert len(plain) == len(ckpt) > 0
    for a, b in zip(plain, ckpt):
        assert torch.allclose(a, b, atol=1e-6)


def test_cross_attention_views_and_tiny_text_width():
    # The official code crashes when the text width differs from the embedding width (quirk 7); ours does not.
    torch.manual_seed(0)
    cfg = get_config("tiny")
    assert cfg.text.width != cfg.embed_dim
    model = CosmosModel(cfg)
    pooled_i, tokens_i = model.encode_image_views(torch.randn(3, 3, 64, 64))
    pooled_t, tokens_t = model.encode_text_views(torch.randint(1, 1000, (3, 77)))
    h_i = model.cross_image(pooled_t[:, None].expand(3, 4, -1), tokens_i)  # 4 text queries per image
    h_t = model.cross_text(pooled_i[:, None], tokens_t)
    assert h_i.shape == (3, 4, 128) and h_t.shape == (3, 1, 128)
    # a per-GPU batch of 1 works (the official `.squeeze()` broke it, quirk 3)
    assert model.cross_text(pooled_i[:1, None], tokens_t[:1]).shape == (1, 1, 128)
    # the pooler output is query + attention(query, tokens): with zero attention weights it is the query
    with torch.no_grad():
        model.text_attn_cross_pool.attn.out_proj.weight.zero_()
        model.text_attn_cross_pool.attn.out_proj.bias.zero_()
    assert torch.allclose(model.cross_text(pooled_i[:, None], tokens_t), pooled_i[:, None])


def test_padding_mask_in_text_cross_attention():
    torch.manual_seed(0)
    model = CosmosModel("tiny").eval()
    text = torch.randint(1, 1000, (2, 77))
    text[:, 6] = 49407
    text[:, 7:] = 0
    pooled_i, _ = model.encode_image_views(torch.randn(2, 3, 64, 64))
    _, tokens = model.encode_text_views(text)
    mask = text == 0
    masked = model.cross_text(pooled_i[:, None], tokens, key_padding_mask=mask)
    trimmed = model.cross_text(pooled_i[:, None], tokens[:, :7])
    assert torch.allclose(masked, trimmed, atol=1e-5)
    assert not torch.allclose(masked, model.cross_text(pooled_i[:, None], tokens), atol=1e-5)


def test_configs_build():
    for name in CONFIGS:
        cfg = get_config(name)
        assert CosmosConfig.from_dict(cfg.to_dict()) == cfg
    tiny = CosmosModel("tiny")
    n = sum(p.numel() for p in tiny.parameters())
    assert n < 20_000_000


def test_bf16_autocast_stays_close_to_fp32():
    from cosmos.device import autocast

    torch.manual_seed(0)
    model = CosmosModel("tiny").eval()
    images, text = torch.randn(2, 3, 64, 64), torch.randint(1, 1000, (2, 77))
    text[:, 8] = 49407
    with torch.no_grad():
        ref = model(images, text)
        with autocast("cpu", "bf16"):
            low = model(images, text)
            dense = model.encode_dense(images, "csa")
    # normalized embeddings: bf16 keeps about 3 significant digits
    assert (ref[0] - low[0].float()).abs().max() < 3e-2 and (ref[1] - low[1].float()).abs().max() < 3e-2
    assert torch.isfinite(dense.float()).all()
