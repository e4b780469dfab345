"""Zero-shot classification: templates, label parsing, class embeddings (against OpenCLIP), and top-k metrics
against a direct computation, ties included (a tie with a wrong class counts against)."""
from __future__ import annotations

import numpy as np
import open_clip  # a declared test dependency: the reference for templates and classifiers
import pytest
import torch
import torch.nn.functional as F
from open_clip.zero_shot_classifier import build_zero_shot_classifier
from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES
from PIL import Image

from cosmos.errors import CosmosError
from cosmos.zeroshot.classify import (
    ClassEmbeddings,
    build_class_embeddings,
    class_logits,
    classify_images,
    encode_images,
    evaluate_classification,
    image_batches,
    per_class_accuracy,
    rank_of_target,
    read_image_folder,
    topk_accuracy,
)
from cosmos.zeroshot.templates import (
    OPENAI_TEMPLATES,
    SIMPLE_TEMPLATES,
    parse_labels,
    read_classnames,
    resolve_templates,
)


# --- templates and labels ------------------------------------------------------------------------------------------
def test_templates_are_openclips_lists():
    assert list(OPENAI_TEMPLATES) == [t("{}") for t in OPENAI_IMAGENET_TEMPLATES]
    assert list(SIMPLE_TEMPLATES) == [t("{}") for t in SIMPLE_IMAGENET_TEMPLATES]
    assert len(OPENAI_TEMPLATES) == 80 and len(SIMPLE_TEMPLATES) == 7


def test_resolve_templates():
    assert resolve_templates("openai") == list(OPENAI_TEMPLATES)
    assert resolve_templates(" Simple ") == list(SIMPLE_TEMPLATES)
    assert resolve_templates("a photo of a {}.") == ["a photo of a {}."]
    assert resolve_templates(["{} a", "b {}"]) == ["{} a", "b {}"]
    with pytest.raises(CosmosError, match="no '\\{\\}' placeholder"):
        resolve_templates("a photo")
    with pytest.raises(CosmosError, match="not a valid format string"):
        resolve_templates("a {} {0}")
    with pytest.raises(CosmosError, match="no prompt templates"):
        resolve_templates([])


def test_parse_labels():
    assert parse_labels("cat, dog;puppy ,, car ;") == [["cat"], ["dog", "puppy"], ["car"]]
    for empty in ("", ",,", " ; , "):
        with pytest.raises(CosmosError, match="--labels: no class names"):
            parse_labels(empty)


def test_read_classnames(tmp_path):
    f = tmp_path / "names.txt"
    f.write_text("background\ncat;kitty\ndog\n\n\n")
    assert read_classnames(f) == [["background"], ["cat", "kitty"], ["dog"]]
    assert read_classnames(f, expected=3)
    with pytest.raises(CosmosError, match="3 class names for 4 classes"):
        read_classnames(f, expected=4)
    f.write_text("cat\n\ndog\n")
    with pytest.raises(CosmosError, match="names.txt:2: empty class name"):
        read_classnames(f)
    with pytest.raises(CosmosError, match="not found"):
        read_classnames(tmp_path / "missing.txt")


# --- metrics against a direct computation -------------------------------------------------------------------------
def direct_rank(row: list[float], target: int) -> int:
    """Rank by the documented rule, written as a loop: wrong classes scoring >= the target's score."""
    return sum(1 for c, s in enumerate(row) if c != target and s >= row[target])


def test_topk_and_per_class_accuracy_equal_a_direct_computation_with_ties():
    gen = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 4, (300, 9), generator=gen).float()  # small integers: ties everywhere
    targets = torch.randint(0, 9, (300,), generator=gen)
    ranks = [direct_rank(scores[i].tolist(), int(targets[i])) for i in range(300)]
    assert rank_of_target(scores, targets).tolist() == ranks
    accuracy = topk_accuracy(scores, targets, (1, 2, 5))
    for k in (1, 2, 5):
        assert accuracy[k] == pytest.approx(sum(r < k for r in ranks) / 300)
    per_class = per_class_accuracy(scores, targets, 10)  # class 9 has no images
    for c in range(9):
        rows = [i for i in range(300) if targets[i] == c]
        assert per_class[c] == pytest.approx(sum(ranks[i] == 0 for i in rows) / len(rows))
    assert per_class[9] is None


def test_tie_rule_by_hand():
    scores = torch.tensor([[1.0, 1.0, 1.0], [2.0, 1.0, 1.0], [1.0, 2.0, 2.0], [0.0, 5.0, 5.0]])
    targets = torch.tensor([0, 0, 1, 0])
    assert rank_of_target(scores, targets).tolist() == [2, 0, 1, 2]  # all ties count against
    assert topk_accuracy(scores, targets, (1, 2, 3)) == {1: 0.25, 2: 0.5, 3: 1.0}


# --- class embeddings ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def openclip_pair(tmp_path_factory):
    """A small random OpenCLIP model and the same weights loaded by our loader."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    from cosmos.checkpoint import load

    torch.manual_seed(0)
    ref = CLIP(embed_dim=32, vision_cfg=CLIPVisionCfg(layers=1, width=64, patch_size=8, image_size=32, head_width=64),
               text_cfg=CLIPTextCfg(context_length=77, vocab_size=49408, width=64, heads=1, layers=2)).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    path = tmp_path_factory.mktemp("ref") / "ref.pt"
    torch.save(ref.state_dict(), path)
    model, preprocess, tokenizer = load(path)
    return ref, model, preprocess, tokenizer


def test_class_embeddings_equal_openclips_classifier(openclip_pair):
    ref, model, _, tokenizer = openclip_pair
    names = ["cat", "dog", "a red car", "tree"]
    with torch.no_grad():
        expected = build_zero_shot_classifier(ref, open_clip.get_tokenizer("ViT-B-16"), names,
                                              [t.format for t in SIMPLE_TEMPLATES], num_classes_per_batch=3)  # [E, C]
    got = build_class_embeddings(model, tokenizer, names, "simple", batch_size=5)  # prompts across batches
    assert got.owner.tolist() == [0, 1, 2, 3] and got.num_classes == 4
    torch.testing.assert_close(got.embeddings, expected.T, atol=1e-5, rtol=1e-5)


def test_synonyms_score_the_best_name(openclip_pair):
    _, model, _, tokenizer = openclip_pair
    classes = [["cat", "kitten"], ["dog"], ["car", "automobile", "truck"]]
    grouped = build_class_embeddings(model, tokenizer, classes, "a photo of a {}.")
    single = build_class_embeddings(model, tokenizer, ["cat", "kitten", "dog", "car", "automobile", "truck"],
                                    "a photo of a {}.")
    torch.testing.assert_close(grouped.embeddings, single.embeddings)
    features = F.normalize(torch.randn(5, 32), dim=-1)
    cos = features @ single.embeddings.T  # [5, 6]
    expected = torch.stack([cos[:, :2].amax(1), cos[:, 2], cos[:, 3:].amax(1)], dim=1) * model.logit_scale.exp()
    torch.testing.assert_close(class_logits(model, features, grouped), expected)


def test_classify_images_equals_openclip(openclip_pair):
    ref, model, preprocess, tokenizer = openclip_pair
    images = torch.stack([preprocess(Image.fromarray(np.random.default_rng(i).integers(0, 255, (40, 50, 3), np.uint8)))
                          for i in range(3)])
    names = ["cat", "dog", "tree"]
    probs = classify_images(model, images, build_class_embeddings(model, tokenizer, names, "openai"))
    with torch.no_grad():
        w = build_zero_shot_classifier(ref, open_clip.get_tokenizer("ViT-B-16"), names,
                                       [t.format for t in OPENAI_TEMPLATES])
        expected = (ref.logit_scale.exp() * ref.encode_image(images, normalize=True) @ w).softmax(-1)
    torch.testing.assert_close(probs, expected, atol=1e-5, rtol=1e-5)


def test_evaluate_classification_on_an_image_folder(openclip_pair, tmp_path):
    _, model, preprocess, tokenizer = openclip_pair
    rng = np.random.default_rng(0)
    folders = ["cat", "dog", "red_car"]
    for folder in folders:
        (tmp_path / folder).mkdir()
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (36, 36, 3), np.uint8)).save(tmp_path / folder / f"{i}.png")
    (tmp_path / "dog" / "notes.txt").write_text("not an image, skipped by extension")
    seen = []
    result = evaluate_classification(model, preprocess, tokenizer, tmp_path, templates="a {}", batch_size=4,
                                     progress=lambda done, total: seen.append((done, total)))
    assert seen[-1] == (9, 9) and result["images"] == 9 and result["classes"] == 3
    # Direct computation: the same images, the same classifier ("red_car" is read as "red car").
    classifier = build_class_embeddings(model, tokenizer, ["cat", "dog", "red car"], "a {}")
    images = torch.stack([preprocess(Image.open(tmp_path / f / f"{i}.png").convert("RGB"))
                          for f in folders for i in range(3)])
    scores = class_logits(model, encode_images(model, images), classifier)
    targets = torch.arange(3).repeat_interleave(3)
    top1 = topk_accuracy(scores, targets, (1,))[1]
    assert result["top1"] == pytest.approx(top1)
    assert result["top5"] is None  # 3 classes: every image is in the top 5, so top-5 is not reported
    assert [(c["index"], c["folder"], c["class"], c["images"]) for c in result["per_class"]] == [
        (0, "cat", "cat", 3), (1, "dog", "dog", 3), (2, "red_car", "red car", 3)]
    assert [c["top1"] for c in result["per_class"]] == pytest.approx(per_class_accuracy(scores, targets, 3))
    with pytest.raises(CosmosError, match="2 class names for 3 class folders"):
        evaluate_classification(model, preprocess, tokenizer, tmp_path, classes=["a", "b"], templates="{}")
    with pytest.raises(CosmosError, match="not a directory"):
        evaluate_classification(model, preprocess, tokenizer, tmp_path / "none", templates="{}")
    (tmp_path / "cat" / "0.png").write_bytes(b"broken")
    with pytest.raises(CosmosError, match="cat/0.png: not an image"):
        evaluate_classification(model, preprocess, tokenizer, tmp_path, templates="{}")


def image_folder(root, folders, per_class=1, size=36):
    rng = np.random.default_rng(0)
    for folder in folders:
        (root / folder).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (size, size, 3), np.uint8)).save(root / folder / f"{i}.png")
    return root


def test_top5_is_reported_only_with_more_than_5_classes(openclip_pair, tmp_path):
    _, model, preprocess, tokenizer = openclip_pair
    folders = ["ant", "bee", "cat", "dog", "eel", "fox"]
    six = image_folder(tmp_path / "six", folders)
    result = evaluate_classification(model, preprocess, tokenizer, six, templates="a {}")
    classifier = build_class_embeddings(model, tokenizer, folders, "a {}")
    images = torch.stack([preprocess(Image.open(six / f / "0.png").convert("RGB")) for f in folders])
    scores = class_logits(model, encode_images(model, images), classifier)
    assert result["top5"] == pytest.approx(topk_accuracy(scores, torch.arange(6), (5,))[5])
    five = image_folder(tmp_path / "five", folders[:5])
    assert evaluate_classification(model, preprocess, tokenizer, five, templates="a {}")["top5"] is None


def test_duplicate_class_names_stay_separate(openclip_pair, tmp_path):
    """ImageNet names two classes 'crane' (the bird and the machine): per-class results must not merge them."""
    _, model, preprocess, tokenizer = openclip_pair
    root = image_folder(tmp_path / "data", ["n02012849", "n03126707", "n04000000"], per_class=2)
    result = evaluate_classification(model, preprocess, tokenizer, root, classes=["crane", "crane", "tower"],
                                     templates="a {}")
    assert [(c["folder"], c["class"], c["images"]) for c in result["per_class"]] == [
        ("n02012849", "crane", 2), ("n03126707", "crane", 2), ("n04000000", "tower", 2)]


def test_wordnet_id_folders_need_class_names(openclip_pair, tmp_path):
    _, model, preprocess, tokenizer = openclip_pair
    root = image_folder(tmp_path / "imagenet", ["n01440764", "n01443537"])
    with pytest.raises(CosmosError, match=r"WordNet ids \(n01440764, n01443537, \.\.\.\).*--classnames"):
        evaluate_classification(model, preprocess, tokenizer, root, templates="a {}")
    result = evaluate_classification(model, preprocess, tokenizer, root, classes=["tench", "goldfish"], templates="{}")
    assert [c["class"] for c in result["per_class"]] == ["tench", "goldfish"]


@pytest.mark.parametrize("workers", [0, 1])
def test_unreadable_image_is_one_clean_error_with_workers(openclip_pair, tmp_path, workers):
    """A worker process's failure reaches the user as the same one-line CosmosError, not a worker traceback."""
    _, model, preprocess, tokenizer = openclip_pair
    root = image_folder(tmp_path / "data", ["cat", "dog"], per_class=2)
    (root / "dog" / "1.png").write_bytes(b"broken")
    with pytest.raises(CosmosError) as error:
        evaluate_classification(model, preprocess, tokenizer, root, templates="{}", batch_size=3, workers=workers)
    assert str(error.value) == f"{root / 'dog' / '1.png'}: not an image (unknown format)"


def test_image_batches_stream_and_report_unreadable_files(tmp_path):
    """Batches come in order, one at a time (a file is opened only when its batch is needed); with on_error an
    unreadable file is reported by index and skipped."""
    root = image_folder(tmp_path / "data", ["a"], per_class=7, size=8)
    paths = sorted(read_image_folder(root).paths)
    paths.insert(3, tmp_path / "missing.png")
    opened = []

    def preprocess(image):
        opened.append(image.size)
        return torch.zeros(3, 4, 4)

    errors = []
    batches = image_batches(paths, preprocess, 3, on_error=lambda i, message: errors.append((i, message)))
    indices, images = next(batches)
    assert indices == [0, 1, 2] and images.shape == (3, 3, 4, 4) and len(opened) == 3
    rest = [indices for indices, _ in batches]
    assert rest == [[4, 5], [6, 7]] and len(opened) == 7
    assert errors == [(3, f"{tmp_path / 'missing.png'}: no such file")]


def test_empty_classes_rejected(openclip_pair):
    _, model, _, tokenizer = openclip_pair
    with pytest.raises(CosmosError, match="no class names"):
        build_class_embeddings(model, tokenizer, [], "openai")
    assert isinstance(build_class_embeddings(model, tokenizer, [[]], "{}"), ClassEmbeddings)
