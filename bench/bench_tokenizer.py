"""Benchmark: our CLIP tokenizer against OpenCLIP's `SimpleTokenizer` on the same captions, in the same run.

Both start cold: a fresh instance (merges file read, tables built, empty word cache), then one call on the whole
list of captions; a second call on the same list measures the warm cache. The captions are generated
deterministically: web-style alt text of mixed lengths, mostly ASCII, some with accents, emoji, curly quotes,
HTML entities or line breaks, half of them with rare words from a long tail. Also times learning a vocabulary from the same captions (no reference).

    python bench/bench_tokenizer.py [--n 100000] [--train-vocab 8192]
"""
from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

NOUNS = (
    "dog cat man woman child girl boy bird horse car truck bus train plane boat bike house building street road "
    "city beach mountain river lake tree forest flower garden table chair sofa bed kitchen room window door "
    "shirt dress hat shoes bag phone laptop book pizza cake coffee cup plate bowl bottle sign logo poster "
    "painting drawing sketch icon pattern texture background wedding party concert game team player field "
    "stadium market shop restaurant bridge tower castle church park playground sky clouds sunset snow rain"
).split()
ADJECTIVES = (
    "red blue green yellow white black brown pink orange purple gray small large big tiny old young new "
    "vintage modern wooden metal glass plastic beautiful cute happy sad funny colorful bright dark empty busy "
    "crowded quiet rustic elegant abstract realistic cartoon minimalist luxury cheap handmade"
).split()
VERBS = "sitting standing walking running playing eating holding looking riding wearing carrying jumping".split()
PLACES = "on the beach|in the park|at night|in the snow|on a table|in a kitchen|near the river|in new york".split("|")
EXTRAS = [
    "stock photo", "royalty free", "high resolution", "4k wallpaper", "vector illustration", "for sale",
    "© 2019", "café", "naïve art", "crème brûlée", "😀", "❤️", "“best” ever", "it’s", "Zürich",
    "São Paulo",
    "&amp; more", "Tom &amp; Jerry", "size: 10\" x 12\"", "#summer #travel", "(2 pack)", "- page 3", "日本",
]


def make_captions(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    # a long tail of rare words (names, brands, places: 20,000 pseudo-words drawn with Zipf weights), so that
    # the word caches do not see only a few hundred distinct words
    letters = "etaoinshrdlcumwfgypbvkjxqz"
    rare = ["".join(rng.choice(letters[: rng.randint(10, 26)]) for _ in range(rng.randint(3, 11)))
            for _ in range(20_000)]
    weights = [1.0 / (rank + 1) for rank in range(len(rare))]
    out = []
    for _ in range(n):
        kind = rng.random()
        if kind < 0.45:
            caption = (f"a {rng.choice(ADJECTIVES)} {rng.choice(NOUNS)} {rng.choice(VERBS)} "
                       f"{rng.choice(PLACES)}")
        elif kind < 0.75:
            caption = " ".join(rng.choice(NOUNS + ADJECTIVES + VERBS) for _ in range(rng.randint(2, 12)))
        else:  # long descriptive caption, several sentences
            sentences = [f"The {rng.choice(ADJECTIVES)} {rng.choice(NOUNS)} is {rng.choice(VERBS)} "
                         f"{rng.choice(PLACES)} with a {rng.choice(NOUNS)}." for _ in range(rng.randint(2, 8))]
            caption = " ".join(sentences)
        if rng.random() < 0.5:
            caption += " " + " ".join(rng.choices(rare, weights, k=rng.randint(1, 3)))
        if rng.random() < 0.25:
            caption = caption.capitalize()
        if rng.random() < 0.15:
            caption += " " + rng.choice(EXTRAS)
        if rng.random() < 0.05:
            caption += f" {rng.randint(1, 99999)}"
        if rng.random() < 0.02:
            caption = caption.replace(" ", "\n", 1)
        out.append(caption)
    return out


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000, help="number of captions")
    parser.add_argument("--train-vocab", type=int, default=8192, help="vocab size for the training timing (0: skip)")
    args = parser.parse_args()

    captions = make_captions(args.n)
    non_ascii = sum(not c.isascii() for c in captions) / len(captions)
    print(f"{len(captions):,} captions, {non_ascii:.1%} non-ASCII, "
          f"mean {sum(map(len, captions)) / len(captions):.0f} characters; torch threads {torch.get_num_threads()}")

    from open_clip.tokenizer import SimpleTokenizer

    from cosmos.paths import find_shipped
    from cosmos.tokenizer import CLIP_MERGES_FILE, Tokenizer

    ref, ref_build = timed(lambda: SimpleTokenizer())
    ref_ids, ref_cold = timed(lambda: ref(captions))
    _, ref_warm = timed(lambda: ref(captions))

    ours, our_build = timed(lambda: Tokenizer._from_clip_file(find_shipped(CLIP_MERGES_FILE)))
    our_ids, our_cold = timed(lambda: ours(captions))
    _, our_warm = timed(lambda: ours(captions))

    assert torch.equal(ref_ids, our_ids), "ids differ from OpenCLIP"
    n = len(captions)
    rows = [
        ("cold: build + first pass", ref_build + ref_cold, our_build + our_cold),
        ("first pass only", ref_cold, our_cold),
        ("warm cache (second pass)", ref_warm, our_warm),
    ]
    print(f"{'':28s} {'OpenCLIP':>14s} {'cosmos':>14s} {'ratio':>7s}")
    for name, t_ref, t_ours in rows:
        print(f"{name:28s} {n / t_ref:>10,.0f} c/s {n / t_ours:>10,.0f} c/s {t_ref / t_ours:>6.2f}x")
    print(f"construction: OpenCLIP {ref_build:.3f} s, cosmos {our_build:.3f} s; ids identical: yes")

    if args.train_vocab:
        tok, t_train = timed(lambda: Tokenizer.train(captions, vocab_size=args.train_vocab))
        print(f"learning a {tok.vocab_size:,}-id vocabulary from the {n:,} captions: {t_train:.1f} s (no reference)")


if __name__ == "__main__":
    main()
