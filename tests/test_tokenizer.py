"""Tests of cosmos/tokenizer.py: id parity with OpenCLIP's tokenizer on generated strings, decoding, the bounded
word cache, merges-file integrity, and learning merges (checked against a naive reference BPE trainer)."""
from __future__ import annotations

import copy
import gzip
import html
import pickle
import random
import string
import sys
import threading

import ftfy
import pytest
import torch

import cosmos.tokenizer as tokmod
from cosmos.errors import CosmosError
from cosmos.paths import find_shipped
from cosmos.tokenizer import Tokenizer, clean, load_clip_merges, pretokenize, tokenize

# The reference: a declared test dependency (the `test` extra), imported plainly so a missing install fails loudly
# instead of skipping every parity check.
import open_clip
from open_clip.tokenizer import SimpleTokenizer

WORDS = (
    "a an the of on in with and at by near under over two three several people man woman child dog cat bird "
    "horse car bus train plane boat street city beach mountain river tree flower table chair kitchen room "
    "red blue green yellow white black small large old young happy sitting standing walking running playing "
    "eating holding looking riding wearing shirt hat glasses phone laptop book pizza cake coffee water snow "
    "grass field sky cloud sunset night photo picture image view close-up portrait illustration painting "
    "vintage modern wooden metal glass stone background foreground front behind next to top bottom left right "
    "new york london paris tokyo 2019 2023 100 3d 4k hd vector logo icon design pattern texture"
).split()
ACCENTED = ("café naïve résumé über straße señor crème brûlée smørrebrød ångström façade jalapeño zoë Ærø "
            "İstanbul").split()
SCRIPTS = [
    (0x4E00, 0x9FFF),  # CJK
    (0x3040, 0x30FF),  # kana
    (0xAC00, 0xD7A3),  # hangul
    (0x0400, 0x04FF),  # cyrillic
    (0x0370, 0x03FF),  # greek
    (0x0600, 0x06FF),  # arabic
    (0x0900, 0x097F),  # devanagari
    (0x1F300, 0x1F6FF),  # emoji and pictographs
    (0x0300, 0x036F),  # combining marks
    (0xFF01, 0xFF5E),  # fullwidth forms (ftfy narrows them)
]
ENTITIES = ["&amp;", "&amp;amp;", "&#39;", "&quot;", "&lt;b&gt;", "&#x2019;", "&hellip;", "&nbsp;", "&copy;", "& "]
CONTROLS = [chr(c) for c in range(32)] + ["\x7f", "\u200b", "\r\n", "\t", "\x1b[31m", "\u2028", "\x85", "\xa0"]
ODDITIES = ["ﬁ", "ﬂ", "“", "”", "‘", "’", "…", "—", "ſ", "'ſ", "K", "<start_of_text>", "<END_OF_TEXT>", "</w>",
            "\ufffd"]
PUNCT = ["!!", "?!", "...", "--", "$", "%", "#", "@", "(", ")", "[x]", "{}", "/", "\\", "*", "+=", "<>", ";", ":"]
CONTRACTIONS = ["don't", "it's", "we're", "they've", "I'm", "you'll", "he'd", "CAN'T", "It'S", "o'clock"]


def _mojibake(word: str, rng: random.Random) -> str:
    """Text ftfy repairs: UTF-8 bytes decoded with a single-byte codec."""
    codec = rng.choice(["latin-1", "cp1252"])
    return word.encode("utf-8").decode(codec, errors="ignore")


def _piece(rng: random.Random) -> str:
    kind = rng.random()
    if kind < 0.45:
        word = rng.choice(WORDS)
        style = rng.random()
        return word.upper() if style < 0.1 else word.capitalize() if style < 0.25 else word
    if kind < 0.52:
        return rng.choice(ACCENTED)
    if kind < 0.60:
        lo, hi = rng.choice(SCRIPTS)
        return "".join(chr(rng.randint(lo, hi)) for _ in range(rng.randint(1, 4)))
    if kind < 0.64:
        return rng.choice(ENTITIES)
    if kind < 0.68:
        return rng.choice(CONTROLS)
    if kind < 0.72:
        return _mojibake(rng.choice(ACCENTED + ["naïve “quoted” text", "emoji 😀", "日本"]), rng)
    if kind < 0.76:
        return rng.choice(ODDITIES)
    if kind < 0.82:
        return rng.choice(PUNCT) * rng.randint(1, 3)
    if kind < 0.88:
        return str(rng.randint(0, 10 ** rng.randint(1, 8)))
    if kind < 0.92:
        return f"https://www.{rng.choice(WORDS)}.com/{rng.choice(WORDS)}?id={rng.randint(0, 999)}&x=1"
    if kind < 0.96:
        return rng.choice(CONTRACTIONS)
    return chr(rng.randint(0x20, 0x2FFF))  # anything from the lower planes


def _ascii_caption(rng: random.Random) -> str:
    words = [rng.choice(WORDS) for _ in range(rng.randint(1, 20))]
    if rng.random() < 0.3:
        words[0] = words[0].capitalize()
    return " ".join(words) + rng.choice(["", ".", "!", " ,", "'s"])


def make_strings(n: int, seed: int = 0) -> list[str]:
    """`n` varied strings, deterministic: about 40% plain ASCII captions (the fast path), the rest mixing every
    kind of trouble, a few empty/blank and a few very long (> 77 tokens)."""
    rng = random.Random(seed)
    out = ["", " ", "\n\t ", "a photo of a cat.", "&amp;amp;", "\x00", "İ", "'ſ"]
    while len(out) < n:
        r = rng.random()
        if r < 0.40:
            out.append(_ascii_caption(rng))
        elif r < 0.97:
            seps = [" ", " ", " ", "", "  ", "\n", "\t"]
            out.append("".join(_piece(rng) + rng.choice(seps) for _ in range(rng.randint(1, 12))))
        else:
            out.append(" ".join(_piece(rng) for _ in range(rng.randint(60, 150))))  # long
    return out


@pytest.fixture(scope="module")
def reference() -> SimpleTokenizer:
    return SimpleTokenizer()


@pytest.fixture(scope="module")
def strings() -> list[str]:
    return make_strings(12_000)


# --- the CLIP vocabulary: parity with OpenCLIP ---------------------------------------------------------------


def test_known_example() -> None:
    tok = Tokenizer.clip()
    assert tok.encode("a photo of a cat.") == [320, 1125, 539, 320, 2368, 269]
    row = tokenize("a photo of a cat.")
    assert row.shape == (1, 77) and row.dtype == torch.int64
    assert row[0, :8].tolist() == [49406, 320, 1125, 539, 320, 2368, 269, 49407]
    assert row[0, 8:].eq(0).all()
    assert (tok.vocab_size, tok.sot_token_id, tok.eot_token_id, tok.context_length) == (49408, 49406, 49407, 77)


def test_generated_strings_cover_both_paths(strings: list[str]) -> None:
    fast = sum(not tokmod._needs_ftfy(s) for s in strings)
    non_ascii = sum(not s.isascii() for s in strings)
    long = sum(len(s) > 400 for s in strings)
    assert fast > 0.3 * len(strings) and non_ascii > 0.3 * len(strings) and long > 100
    assert any(s.strip() == "" for s in strings)
    assert sum(not tokmod._needs_ftfy(s) and not s.isprintable() for s in strings) > 50  # fast path with \n, \t


@pytest.mark.slow
def test_batch_parity_with_open_clip(strings: list[str]) -> None:
    ours = tokenize(strings)
    ref = open_clip.tokenize(strings)
    assert ours.dtype == ref.dtype == torch.int64
    assert ours.shape == ref.shape == (len(strings), 77)
    bad = (ours != ref).any(dim=1).nonzero().flatten().tolist()
    assert not bad, f"{len(bad)} rows differ, first: {strings[bad[0]]!r}"


@pytest.mark.slow
def test_encode_parity_with_open_clip(strings: list[str], reference: SimpleTokenizer) -> None:
    """Whole id sequences (no truncation), through a fresh tokenizer so every word goes through BPE."""
    tok = Tokenizer._from_clip_file(find_shipped(tokmod.CLIP_MERGES_FILE))
    for s in strings:
        assert tok.encode(s) == reference.encode(s), repr(s)


def test_context_length_and_truncation(reference: SimpleTokenizer) -> None:
    long = " ".join(f"word{i}" for i in range(100))  # ~200 tokens
    for length in (77, 16, 5, 2):
        ours = tokenize([long, "a cat", ""], context_length=length)
        ref = open_clip.tokenize([long, "a cat", ""], context_length=length)
        assert ours.shape == (3, length) and torch.equal(ours, ref)
        assert ours[0, -1].item() == 49407 and ours[0, 0].item() == 49406
    tok = Tokenizer.clip()
    assert torch.equal(tok(long, context_length=30), reference(long, context_length=30))
    assert tok([]).shape == (0, 77)
    with pytest.raises(CosmosError, match="context_length"):
        tok("x", context_length=0)
    with pytest.raises(CosmosError, match="item 1 is a int"):
        tok(["ok", 3])  # type: ignore[list-item]


def test_fast_path_premise_holds_for_ftfy() -> None:
    """The fast path skips ftfy and html.unescape on ASCII without '&' whose only control characters are tab, LF,
    CR, FF: they must not change such text, up to the whitespace the cleaning collapses next."""
    rng = random.Random(1)
    alphabet = string.printable[:95].replace("&", "")  # 0x20..0x7e without '&'
    tricky = ["<b>", "\\x1b[31m", "#39;", "lt;", "Ac;", "''", '"', "``", "--", "\\n", "quot;", "\t", "\n", "\r\n",
              "\r", "\x0c", "\n\n"]
    for _ in range(3000):
        parts = [rng.choice(tricky) if rng.random() < 0.2 else rng.choice(alphabet) for _ in range(rng.randint(0, 40))]
        text = "".join(parts)
        assert not tokmod._needs_ftfy(text)
        assert html.unescape(html.unescape(text)) == text
        if text.isprintable():
            assert ftfy.fix_text(text) == text
        else:
            assert ftfy.fix_text(text).split() == text.split()
    for text in ["a &amp; b", "vt\x0bhere", "nul\x00", "del\x7f", "café", "\u200b", "\x1b[31mred", "\x1c", "\x85"]:
        assert tokmod._needs_ftfy(text)


def test_cache_is_bounded_and_eviction_keeps_ids_right(reference: SimpleTokenizer) -> None:
    small = Tokenizer(load_clip_merges(find_shipped(tokmod.CLIP_MERGES_FILE)), cache_size=200, kind="clip")
    rng = random.Random(2)
    texts = [" ".join("".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(6)) for _ in range(5))
             for _ in range(1000)]  # ~5,000 distinct words
    for t in texts[:500]:
        small.encode(t)
        assert len(small._cache) <= 200
    assert torch.equal(small(texts), reference(texts))  # words evicted and re-made give the same ids
    assert len(small._cache) <= 200
    assert Tokenizer.clip().cache_size == tokmod.DEFAULT_CACHE_SIZE


def test_cache_eviction_is_safe_with_threads_sharing_one_tokenizer(reference: SimpleTokenizer) -> None:
    """4 threads on one tokenizer with a tiny cache evict all the time: no KeyError or RuntimeError, ids right."""
    shared = Tokenizer(load_clip_merges(find_shipped(tokmod.CLIP_MERGES_FILE)), cache_size=16, kind="clip")
    texts = {t: [" ".join("".join(random.Random(t * 1000 + i).choices(string.ascii_lowercase, k=6))
                          for _ in range(20)) for i in range(150)] for t in range(4)}
    results: dict[int, torch.Tensor] = {}
    errors: list[str] = []

    def work(t: int) -> None:
        try:
            results[t] = torch.cat([shared(text) for text in texts[t]])
        except Exception as e:  # collected and reported below: a thread's exception would otherwise be lost
            errors.append(f"{type(e).__name__}: {e}")

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible, inside the eviction too
    try:
        threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(interval)
    assert errors == []
    for t in range(4):
        assert torch.equal(results[t], reference(texts[t]))
    assert len(shared._cache) <= 16 + 4  # bounded (a skipped eviction overshoots by at most a few entries)


def test_cache_eviction_tolerates_keys_another_thread_removed(reference: SimpleTokenizer) -> None:
    """The race above, made deterministic: while the oldest keys are listed for eviction, "another thread" evicts
    each listed key first (what two threads evicting at once do). The eviction must not raise KeyError."""

    class RacingCache(dict):
        def __iter__(self):
            for key in list(dict.__iter__(self)):
                yield key
                dict.pop(self, key, None)  # the other thread got there first

    tok = Tokenizer(load_clip_merges(find_shipped(tokmod.CLIP_MERGES_FILE)), cache_size=16, kind="clip")
    tok._cache = RacingCache()
    rng = random.Random(5)
    texts = [" ".join("".join(rng.choices(string.ascii_lowercase, k=6)) for _ in range(8)) for _ in range(10)]
    assert torch.equal(tok(texts), reference(texts))
    assert len(tok._cache) <= 16


# --- decoding ------------------------------------------------------------------------------------------------


def test_decode_round_trip(strings: list[str], reference: SimpleTokenizer) -> None:
    tok = Tokenizer.clip()
    checked = 0
    for s in strings[:4000]:
        cleaned = clean(s)
        if "<start_of_text>" in cleaned or "<end_of_text>" in cleaned or "</w>" in cleaned:
            continue
        ids = tok.encode(s)
        # pre-tokens come back separated by single spaces; text made of space-separated words comes back as is
        assert tok.decode(ids) == " ".join(pretokenize(cleaned)), repr(s)
        assert tok.decode(ids) + (" " if ids else "") == reference.decode(ids)
        checked += 1
    assert checked > 3500
    for text in ["a photo of a cat", "zoë and the naïve ångström", "日本語 テキスト 😀", ""]:
        assert tok.decode(tok.encode(text)) == text
    batch = tokenize(["two dogs on a beach", "x"])
    assert tok.decode(batch[0]) == "two dogs on a beach" and tok.decode(batch[1].tolist()) == "x"
    with pytest.raises(CosmosError, match="outside"):
        tok.decode([60000])
    with pytest.raises(CosmosError, match="one sequence"):
        tok.decode(batch)


# --- the shipped merges file ---------------------------------------------------------------------------------


def test_corrupted_merges_file_is_refused(tmp_path, monkeypatch) -> None:
    raw = bytearray(find_shipped(tokmod.CLIP_MERGES_FILE).read_bytes())
    raw[1000] ^= 0xFF
    bad = tmp_path / tokmod.CLIP_MERGES_FILE
    bad.write_bytes(bytes(raw))
    with pytest.raises(CosmosError, match="sha256") as err:
        load_clip_merges(bad)
    assert str(bad) in str(err.value)
    # the same through the cached constructor
    monkeypatch.setattr(tokmod, "_CLIP", None)
    monkeypatch.setattr(tokmod, "find_shipped", lambda name: bad)
    with pytest.raises(CosmosError, match="corrupted") as err:
        Tokenizer.clip()
    assert str(bad) in str(err.value)
    # a valid gzip with other content is refused the same way
    other = tmp_path / "other.txt.gz"
    other.write_bytes(gzip.compress(b"#version: 0.2\na b\n"))
    with pytest.raises(CosmosError, match=str(other)):
        load_clip_merges(other)


def test_pickle_and_copy() -> None:
    """DataLoader workers receive pickled tokenizers; copy.copy must not touch the shared CLIP instance."""
    tok = Tokenizer.clip()
    texts = ["a dog on a skateboard", "zoë's café &amp; bar"]
    expected = tok(texts)
    clone = pickle.loads(pickle.dumps(tok))
    assert clone is not tok and clone._cache == {} and torch.equal(clone(texts), expected)
    short = copy.copy(tok)
    short.context_length = 16
    assert short(texts).shape == (2, 16) and tok.context_length == 77 and torch.equal(short(texts), expected[:, :16])


def test_clip_state_dict_round_trip(tmp_path) -> None:
    tok = Tokenizer.clip()
    state = tok.state_dict()
    assert state["kind"] == "clip"
    torch.save({"tokenizer": state}, tmp_path / "t.pt")
    loaded = torch.load(tmp_path / "t.pt", weights_only=True)["tokenizer"]
    assert Tokenizer.from_state_dict(loaded) is tok
    short = Tokenizer.from_state_dict({"kind": "clip", "context_length": 32})
    assert short("a cat").shape == (1, 32) and tok.context_length == 77
    for bad, msg in [({"kind": "wordpiece"}, "unknown tokenizer kind"), ({}, "'kind'"), ("clip", "'kind'"),
                     ({"kind": "bpe"}, "merges"), ({"kind": "bpe", "merges": ["a"]}, "malformed"),
                     ({"kind": "bpe", "merges": ["ab c"]}, "no earlier merge"),
                     ({"kind": "clip", "context_length": "77"}, "context_length")]:
        with pytest.raises(CosmosError, match=msg):
            Tokenizer.from_state_dict(bad)  # type: ignore[arg-type]


# --- learning merges -----------------------------------------------------------------------------------------


def naive_bpe_merges(texts: list[str], num_merges: int) -> list[str]:
    """Reference trainer: recount every pair from scratch at each step (special-token strings left out); most
    frequent pair first, ties to the smallest (left, right) strings; every occurrence merged left to right."""
    words: dict[tuple[str, ...], int] = {}
    for t in texts:
        for w in pretokenize(clean(t)):
            if w in ("<start_of_text>", "<end_of_text>"):
                continue  # specials are never split, so never learned from
            syms = [tokmod.BYTE_TO_SYMBOL[b] for b in w.encode("utf-8")]
            syms[-1] += "</w>"
            words[tuple(syms)] = words.get(tuple(syms), 0) + 1
    merges = []
    for _ in range(num_merges):
        counts: dict[tuple[str, str], int] = {}
        for syms, f in words.items():
            for pair in zip(syms, syms[1:]):
                counts[pair] = counts.get(pair, 0) + f
        if not counts:
            break
        best = min(counts, key=lambda p: (-counts[p], p))
        merges.append(" ".join(best))
        new_words: dict[tuple[str, ...], int] = {}
        for syms, f in words.items():
            out, i = [], 0
            while i < len(syms):
                if i + 1 < len(syms) and (syms[i], syms[i + 1]) == best:
                    out.append(syms[i] + syms[i + 1])
                    i += 2
                else:
                    out.append(syms[i])
                    i += 1
            new_words[tuple(out)] = new_words.get(tuple(out), 0) + f
        words = new_words
    return merges


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    rng = random.Random(3)
    return [_ascii_caption(rng) for _ in range(1500)] + make_strings(300, seed=4)


def test_train_matches_naive_reference(corpus: list[str]) -> None:
    tok = Tokenizer.train(corpus, vocab_size=514 + 300)
    assert tok.state_dict()["merges"] == naive_bpe_merges(corpus, 300)
    # a tiny corpus runs out of pairs: fewer merges, smaller vocabulary, eot still last
    tiny = Tokenizer.train(["aa aa", "ab"], vocab_size=1000)
    assert tiny.state_dict()["merges"] == naive_bpe_merges(["aa aa", "ab"], 1000) == ["a a</w>", "a b</w>"]
    assert tiny.vocab_size == 516 and tiny.eot_token_id == 515


def test_trained_tokenizer_properties(corpus: list[str], tmp_path) -> None:
    tok = Tokenizer.train(corpus, vocab_size=900, context_length=40)
    assert tok.vocab_size == 900 and tok.eot_token_id == 899 and tok.sot_token_id == 898
    ids = tok(corpus)
    assert ids.shape == (len(corpus), 40) and ids.dtype == torch.int64
    assert int(ids.max()) == 899 and int(ids.min()) >= 0
    assert torch.equal(ids.argmax(dim=1), (ids == 899).int().argmax(dim=1))  # the text tower pools at eot
    # merges compress the training text well below one id per byte
    assert sum(len(tok.encode(t)) for t in corpus[:500]) < 0.5 * sum(len(clean(t).encode()) for t in corpus[:500])
    # deterministic, and independent of the order of the corpus
    shuffled = corpus[:]
    random.Random(5).shuffle(shuffled)
    assert Tokenizer.train(shuffled, vocab_size=900).state_dict()["merges"] == tok.state_dict()["merges"]
    # state dict: plain python, survives torch.save / torch.load(weights_only=True)
    torch.save(tok.state_dict(), tmp_path / "tok.pt")
    again = Tokenizer.from_state_dict(torch.load(tmp_path / "tok.pt", weights_only=True))
    assert again.context_length == 40 and torch.equal(again(corpus), ids)
    for s in corpus[:300]:
        cleaned = clean(s)
        if "<start_of_text>" not in cleaned and "<end_of_text>" not in cleaned and "</w>" not in cleaned:
            assert tok.decode(tok.encode(s)) == " ".join(pretokenize(cleaned))
    with pytest.raises(CosmosError, match="at least 514"):
        Tokenizer.train(corpus, vocab_size=300)
    with pytest.raises(CosmosError, match="item 1"):
        Tokenizer.train(["ok", None], vocab_size=600)  # type: ignore[list-item]


def test_trained_merges_load_in_open_clip(corpus: list[str], tmp_path) -> None:
    """Our merges file layout is CLIP's: OpenCLIP's tokenizer reading them gives the same ids."""
    tok = Tokenizer.train(corpus, vocab_size=700)
    ref = _open_clip_reading(tok.state_dict()["merges"], tmp_path)
    assert ref.vocab_size == tok.vocab_size
    sample = corpus[:400]
    assert torch.equal(tok(sample), ref(sample))


def test_train_small_alphabets_against_references(tmp_path) -> None:
    """Tiny alphabets (many ties, repeated symbols): training matches the naive trainer, and encoding matches
    OpenCLIP's tokenizer reading the same merges."""
    rng = random.Random(6)
    for trial in range(25):
        texts = [" ".join("".join(rng.choice("abc") for _ in range(rng.randint(1, 7)))
                          for _ in range(rng.randint(1, 6))) for _ in range(40)]
        tok = Tokenizer.train(texts, vocab_size=514 + 40)
        merges = tok.state_dict()["merges"]
        assert merges == naive_bpe_merges(texts, 40)
        probes = texts + ["abcabc cba", "ccccccc aaaa bbb", "a"]
        ref = _open_clip_reading(merges, tmp_path)
        assert [tok.encode(t) for t in probes] == [ref.encode(t) for t in probes]
        assert int(tok(probes).max()) == tok.eot_token_id == tok.vocab_size - 1


def test_symbol_made_by_two_merges_matches_open_clip(tmp_path) -> None:
    """A merges list may make one string twice ("a bc</w>" and "ab c</w>"): its id is the later one, as in CLIP."""
    merges = ["b c</w>", "a b", "ab c</w>", "a bc</w>", "x abc</w>", "ab ab"]
    tok = Tokenizer.from_state_dict({"kind": "bpe", "merges": merges})
    ref = _open_clip_reading(merges, tmp_path)
    probes = ["abc", "xabc", "ab", "abab", "ababc", "cab abc xab", "bc"]
    assert [tok.encode(t) for t in probes] == [ref.encode(t) for t in probes]
    assert tok.encode("abc") == [512 + 3]  # the later of the two "abc</w>" ids


def _open_clip_reading(merges: list[str], folder) -> SimpleTokenizer:
    """OpenCLIP's tokenizer on a merges file holding `merges` (no newline after the last: SimpleTokenizer would
    read an empty last line as one more merge)."""
    path = folder / "merges.txt.gz"
    path.write_bytes(gzip.compress(("#version: 0.2\n" + "\n".join(merges)).encode("utf-8")))
    return SimpleTokenizer(bpe_path=str(path))
