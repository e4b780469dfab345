"""Retrieval: R@k against a direct computation on fixed embeddings (ties, several captions per image, an image
without captions), and the COCO / Karpathy readers."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from cosmos.errors import CosmosError
from cosmos.zeroshot.retrieval import (
    evaluate_retrieval,
    load_retrieval_set,
    recall_at_k,
    retrieval_ranks,
)


def direct_recall(sims: list[list[float]], text_image: list[int], ks=(1, 5, 10)) -> dict[str, float]:
    """The documented rule as loops over a full image x text similarity table.

    image->text: hit at k if some caption of the image has fewer than k captions of OTHER images scoring >= it.
    text->image: hit at k if fewer than k other images score >= the caption's own image.
    """
    n_images, n_texts = len(sims), len(text_image)
    i2t_ranks = []
    for i in range(n_images):
        own = [t for t in range(n_texts) if text_image[t] == i]
        if not own:
            continue
        i2t_ranks.append(min(sum(1 for u in range(n_texts) if text_image[u] != i and sims[i][u] >= sims[i][t])
                             for t in own))
    t2i_ranks = []
    for t in range(n_texts):
        right = text_image[t]
        t2i_ranks.append(sum(1 for j in range(n_images) if j != right and sims[j][t] >= sims[right][t]))
    # A recall every query reaches whatever the scores are is None (the top-k rule): fewer than k wrong candidates.
    most_wrong = max(sum(1 for u in range(n_texts) if text_image[u] != i) for i in set(text_image))
    out = {f"i2t_R@{k}": sum(r < k for r in i2t_ranks) / len(i2t_ranks) if k <= most_wrong else None for k in ks}
    out.update({f"t2i_R@{k}": sum(r < k for r in t2i_ranks) / len(t2i_ranks) if k < n_images else None for k in ks})
    return out


def test_recall_equals_a_direct_computation_with_ties_and_several_captions():
    gen = torch.Generator().manual_seed(0)
    n_images = 30
    # 0 to 5 captions per image (image 3 has none: it only competes in text->image).
    counts = torch.randint(1, 6, (n_images,), generator=gen)
    counts[3] = 0
    text_image = torch.arange(n_images).repeat_interleave(counts)
    # Coarse integer embeddings: many exactly equal similarities.
    images = torch.randint(-1, 2, (n_images, 4), generator=gen).float()
    texts = torch.randint(-1, 2, (len(text_image), 4), generator=gen).float()
    sims = (images @ texts.T).tolist()
    expected = direct_recall(sims, text_image.tolist())
    got = recall_at_k(images, texts, text_image)
    assert got == pytest.approx(expected)
    i2t, t2i = retrieval_ranks(images, texts, text_image, chunk=7)  # chunks that do not divide the sizes
    whole_i2t, whole_t2i = retrieval_ranks(images, texts, text_image, chunk=4096)
    assert torch.equal(i2t, whole_i2t) and torch.equal(t2i, whole_t2i)
    assert i2t[3] == -1 and len(t2i) == len(text_image)


def test_recall_on_normalized_random_embeddings():
    gen = torch.Generator().manual_seed(1)
    images = F.normalize(torch.randn(50, 16, generator=gen), dim=-1)
    text_image = torch.arange(50).repeat_interleave(5)
    texts = F.normalize(images[text_image] + 0.9 * torch.randn(250, 16, generator=gen), dim=-1)
    expected = direct_recall((images @ texts.T).tolist(), text_image.tolist())
    assert recall_at_k(images, texts, text_image) == pytest.approx(expected)
    assert 0 < expected["i2t_R@1"] < 1 and 0 < expected["t2i_R@1"] < 1


def test_tie_rule_by_hand():
    """All embeddings equal: every wrong candidate ties, so it counts against."""
    images = torch.ones(3, 2)
    texts = torch.ones(6, 2)
    text_image = torch.tensor([0, 0, 1, 1, 2, 2])
    i2t, t2i = retrieval_ranks(images, texts, text_image)
    assert i2t.tolist() == [4, 4, 4]  # the 4 captions of the other images tie with the best own caption
    assert t2i.tolist() == [2] * 6
    r = recall_at_k(images, texts, text_image, ks=(1, 3, 5))
    # i2t R@5 (4 wrong captions) and t2i R@3, R@5 (3 images) are reached by any model: None, as top-k with few classes
    assert r == {"i2t_R@1": 0.0, "i2t_R@3": 0.0, "i2t_R@5": None, "t2i_R@1": 0.0, "t2i_R@3": None, "t2i_R@5": None}


# --- datasets ------------------------------------------------------------------------------------------------------
def write_images(folder, names):
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        Image.fromarray(np.full((20, 20, 3), 40 * i, np.uint8)).save(folder / name)


def test_coco_captions_json(tmp_path):
    write_images(tmp_path / "images", ["a.png", "b.png"])
    data = {"images": [{"id": 7, "file_name": "a.png"}, {"id": 9, "file_name": "b.png"}],
            "annotations": [{"id": 1, "image_id": 9, "caption": " two "}, {"id": 2, "image_id": 7, "caption": "one"},
                            {"id": 3, "image_id": 9, "caption": "three"}]}
    (tmp_path / "captions.json").write_text(json.dumps(data))
    ds = load_retrieval_set(tmp_path / "captions.json")  # images/ beside the JSON
    assert [p.name for p in ds.image_paths] == ["a.png", "b.png"]
    assert ds.captions == ["two", "one", "three"] and ds.text_image == [1, 0, 1]
    data["annotations"].append({"id": 4, "image_id": 99, "caption": "x"})
    (tmp_path / "bad.json").write_text(json.dumps(data))
    with pytest.raises(CosmosError, match="unknown image_id 99"):
        load_retrieval_set(tmp_path / "bad.json")


def test_karpathy_json(tmp_path):
    write_images(tmp_path / "flickr", ["1.jpg", "2.jpg", "3.jpg"])
    data = {"images": [
        {"filename": "1.jpg", "split": "test", "sentences": [{"raw": "a dog."}, {"raw": "a brown dog."}]},
        {"filename": "2.jpg", "split": "train", "sentences": [{"raw": "a cat."}]},
        {"filename": "3.jpg", "split": "test", "sentences": [{"raw": "a car."}]},
    ]}
    (tmp_path / "dataset_flickr30k.json").write_text(json.dumps(data))
    ds = load_retrieval_set(tmp_path / "dataset_flickr30k.json", images=tmp_path / "flickr")
    assert [p.name for p in ds.image_paths] == ["1.jpg", "3.jpg"]
    assert ds.captions == ["a dog.", "a brown dog.", "a car."] and ds.text_image == [0, 0, 1]
    assert len(load_retrieval_set(tmp_path / "dataset_flickr30k.json", tmp_path / "flickr", split="train").captions) == 1
    with pytest.raises(CosmosError, match="no images in split 'val' \\(splits present: test, train\\)"):
        load_retrieval_set(tmp_path / "dataset_flickr30k.json", tmp_path / "flickr", split="val")
    with pytest.raises(CosmosError, match="1.jpg: image not found \\(2 of 2 missing\\)"):
        load_retrieval_set(tmp_path / "dataset_flickr30k.json")  # wrong image folder


def test_bad_files(tmp_path):
    with pytest.raises(CosmosError, match="no such file"):
        load_retrieval_set(tmp_path / "none.json")
    (tmp_path / "x.json").write_text("{not json")
    with pytest.raises(CosmosError, match="not valid JSON"):
        load_retrieval_set(tmp_path / "x.json")
    (tmp_path / "y.json").write_text("[1, 2]")
    with pytest.raises(CosmosError, match="no 'images' list"):
        load_retrieval_set(tmp_path / "y.json")


def test_evaluate_retrieval_matches_direct_computation(tmp_path):
    """End to end with a tiny model: the recalls equal the direct rule on the model's own embeddings."""
    from cosmos.model.cosmos import CosmosModel, TextConfig, VisionConfig, get_config
    from cosmos.tokenizer import Tokenizer
    from cosmos.transforms import eval_transform

    config = get_config("tiny")
    config.vision = VisionConfig(image_size=32, patch_size=8, width=64, layers=1, heads=1)
    config.text = TextConfig(width=64, layers=1, heads=1)
    config.embed_dim = 32
    torch.manual_seed(0)
    model = CosmosModel(config).eval()
    names = [f"{i}.png" for i in range(6)]
    write_images(tmp_path / "images", names)
    data = {"images": [{"id": i, "file_name": n} for i, n in enumerate(names)],
            "annotations": [{"id": 10 * i + j, "image_id": i, "caption": f"picture {i} take {j}"}
                            for i in range(6) for j in range(2)]}
    (tmp_path / "captions.json").write_text(json.dumps(data))
    ds = load_retrieval_set(tmp_path / "captions.json")
    tokenizer, preprocess = Tokenizer.clip(), eval_transform(32)
    result = evaluate_retrieval(model, preprocess, tokenizer, ds, batch_size=4)
    with torch.no_grad():
        imgs = model.encode_image(torch.stack([preprocess(Image.open(p).convert("RGB")) for p in ds.image_paths]),
                                  normalize=True)
        txts = model.encode_text(tokenizer(ds.captions), normalize=True)
    expected = direct_recall((imgs @ txts.T).tolist(), ds.text_image)
    for key, value in expected.items():
        assert result[key] == (pytest.approx(value) if value is not None else None)
    assert (result["images"], result["captions"]) == (6, 12)
