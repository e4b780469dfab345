"""CLIP's byte-level BPE tokenizer, written from scratch: encode, decode, and learn merges from a corpus.

The recipe, in the order a caption goes through it (CLIP_COMPAT.md section 2):

1. Cleaning: ftfy.fix_text, html.unescape twice, strip, whitespace collapsed to one space, lowercase.
2. Pre-tokenization: the special tokens, the contractions 's 't 're 've 'm 'll 'd, runs of letters, ONE digit,
   runs of other non-space characters (case-insensitive).
3. Each pre-token: its UTF-8 bytes become byte symbols, the last one carries the end-of-word mark `</w>`, then the
   adjacent pair with the lowest merge rank is merged (every occurrence, left to right) until none is mergeable.
4. Vocabulary: 256 byte symbols, the same 256 with `</w>`, one symbol per merge, then <start_of_text> and
   <end_of_text>: the end-of-text id is always the largest, which is where the text tower pools.
5. Batches: [sot] + ids + [eot], zero padded to the context length; longer inputs are cut with the last position
   forced to eot; int64.

Speed without changing a single id:
- ftfy and html.unescape are skipped when they provably cannot change the text: ASCII with no '&' whose only control
  characters are tab, line feed, carriage return or form feed. On such text every ftfy fixer is a no-op up to
  whitespace (mojibake, quotes, widths and ligatures need non-ASCII, entities need '&', terminal escapes need ESC, the
  control characters ftfy deletes are excluded, carriage returns become line feeds, NFC leaves ASCII alone), and
  the whitespace is collapsed right after; tests check this premise against ftfy.
- Cleaned ASCII text is split with an ASCII-only pattern of the standard `re` module, equivalent on such input.
- A word cache maps a pre-token straight to its ids. It is bounded (OpenCLIP's grows forever): when full, the
  oldest quarter of the entries is dropped (safe when threads share one tokenizer: no lock, no lost ids).
- The output tensor of a batch is filled once, with numpy, from one flat list of ids.
"""
from __future__ import annotations

import copy
import gzip
import hashlib
import heapq
import html
import re
import threading
from collections import Counter
from itertools import chain, islice
from pathlib import Path
from typing import Any, Iterable, Sequence

import ftfy
import numpy as np
import regex
import torch

from .errors import CosmosError
from .paths import find_shipped

CLIP_MERGES_FILE = "bpe_simple_vocab_16e6.txt.gz"
CLIP_MERGES_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"
CLIP_NUM_MERGES = 48894  # 49408 ids = 512 byte symbols + 48,894 merges + 2 specials
DEFAULT_CONTEXT_LENGTH = 77
DEFAULT_CACHE_SIZE = 100_000  # words; a few tens of MB at most

SOT = "<start_of_text>"
EOT = "<end_of_text>"
END_OF_WORD = "</w>"

# --- 1. Cleaning ---------------------------------------------------------------------------------------------


# ftfy keeps tab, line feed and form feed, and turns carriage returns into line feeds: all whitespace either way
_BENIGN_WHITESPACE = str.maketrans("\t\n\r\x0c", "    ")


def _needs_ftfy(text: str) -> bool:
    """False when ftfy.fix_text and html.unescape cannot change `text` beyond whitespace the cleaning collapses
    anyway: ASCII without '&' whose only non-printable characters are tab, line feed, carriage return, form feed."""
    if not text.isascii() or "&" in text:
        return True
    return not (text.isprintable() or text.translate(_BENIGN_WHITESPACE).isprintable())


def clean(text: str) -> str:
    """CLIP's cleaning: ftfy, HTML entities unescaped twice, whitespace collapsed to single spaces, lowercase."""
    if _needs_ftfy(text):
        text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return " ".join(text.split()).lower()


# --- 2. Pre-tokenization -------------------------------------------------------------------------------------

# The general pattern (the `regex` package, for \p{L} and \p{N}) and its exact equivalent on cleaned ASCII text,
# where letters are a-z (the text is lowercase), digits 0-9 and the only whitespace left is ' '.
_SPLIT = regex.compile(
    rf"{SOT}|{EOT}|'s|'t|'re|'ve|'m|'ll|'d|[\p{{L}}]+|[\p{{N}}]|[^\s\p{{L}}\p{{N}}]+", regex.IGNORECASE
)
_SPLIT_ASCII = re.compile(rf"{SOT}|{EOT}|'s|'t|'re|'ve|'m|'ll|'d|[a-z]+|[0-9]|[^\sa-z0-9]+")


def _split_pattern(cleaned: str) -> re.Pattern[str] | regex.Pattern[str]:
    """The pre-tokenization pattern for `cleaned`: the fast ASCII one when it applies, else the general one."""
    return _SPLIT_ASCII if cleaned.isascii() else _SPLIT


def pretokenize(cleaned: str) -> list[str]:
    """Split cleaned text into the words BPE runs on."""
    return _split_pattern(cleaned).findall(cleaned)


# --- 3. Bytes to symbols -------------------------------------------------------------------------------------


def _byte_symbols() -> list[tuple[int, str]]:
    """(byte, symbol) in vocabulary order: bytes that are printable Latin-1 stand for themselves, the other 68
    (control characters, space, ...) map in ascending order to chr(256 + n)."""
    visible = [*range(33, 127), *range(161, 173), *range(174, 256)]
    hidden = [b for b in range(256) if b not in set(visible)]
    return [(b, chr(b)) for b in visible] + [(b, chr(256 + n)) for n, b in enumerate(hidden)]


_BYTE_SYMBOLS = _byte_symbols()
BYTE_TO_SYMBOL: dict[int, str] = dict(_BYTE_SYMBOLS)
SYMBOL_TO_BYTE: dict[str, int] = {s: b for b, s in _BYTE_SYMBOLS}
# the id of byte b is its position in vocabulary order; b with </w> is 256 further
BYTE_TO_ID: list[int] = [0] * 256
for _i, (_b, _s) in enumerate(_BYTE_SYMBOLS):
    BYTE_TO_ID[_b] = _i


# --- 4. The tokenizer ----------------------------------------------------------------------------------------


class Tokenizer:
    """Byte-level BPE with CLIP's vocabulary layout. Build with `Tokenizer.clip()`, `Tokenizer.train(...)` or
    `Tokenizer.from_state_dict(...)`; call it on a string or a list of strings to get a LongTensor [N, L]."""

    def __init__(
        self,
        merges: Sequence[str],
        context_length: int = DEFAULT_CONTEXT_LENGTH,
        cache_size: int = DEFAULT_CACHE_SIZE,
        kind: str = "bpe",
    ) -> None:
        """`merges`: "left right" symbol pairs, best (lowest rank) first. Use the named constructors instead."""
        self.kind = kind
        self.context_length = _check_context_length(context_length)
        self.cache_size = max(int(cache_size), 16)
        self._merges = list(merges)

        # vocabulary: 256 byte symbols, the same with </w>, one symbol per merge, then the specials
        symbols = [s for _, s in _BYTE_SYMBOLS]
        symbols += [s + END_OF_WORD for s in symbols]
        pairs = []
        for rank, line in enumerate(self._merges):
            parts = line.split(" ") if isinstance(line, str) else []
            if len(parts) != 2 or not parts[0] or not parts[1]:
                raise CosmosError(f"malformed BPE merge #{rank}: {line!r}; expected two symbols separated by one space")
            pairs.append((parts[0], parts[1]))
            symbols.append(parts[0] + parts[1])
        symbols += [SOT, EOT]
        self._symbols = symbols
        self.vocab_size = len(symbols)
        self.sot_token_id = self.vocab_size - 2
        self.eot_token_id = self.vocab_size - 1
        # a symbol string made twice resolves to its last id (as in CLIP); the merges only ever name known symbols
        self._encoder = {s: i for i, s in enumerate(symbols)}
        known = set(symbols[:512])
        self._ranks: dict[tuple[int, int], tuple[int, int]] = {}  # (left id, right id) -> (rank, merged id)
        for rank, (left, right) in enumerate(pairs):
            if left not in known or right not in known:
                missing = left if left not in known else right
                raise CosmosError(
                    f"malformed BPE merge #{rank}: {left!r} {right!r} uses the symbol {missing!r}, which no "
                    "earlier merge produced; the merges list is corrupted or out of order"
                )
            known.add(left + right)
            enc = self._encoder
            self._ranks[enc[left], enc[right]] = (rank, enc[left + right])
        self._specials = {SOT: (self.sot_token_id,), EOT: (self.eot_token_id,)}
        self._cache: dict[str, tuple[int, ...]] = {}
        self._decode_table: list[bytes] | None = None

    # -- named constructors --

    @classmethod
    def clip(cls) -> "Tokenizer":
        """The CLIP vocabulary (49,408 ids) from the shipped merges file; one instance shared by all callers."""
        global _CLIP
        with _CLIP_LOCK:
            if _CLIP is None:
                _CLIP = cls._from_clip_file(find_shipped(CLIP_MERGES_FILE))
            return _CLIP

    @classmethod
    def _from_clip_file(cls, path: Path, context_length: int = DEFAULT_CONTEXT_LENGTH) -> "Tokenizer":
        """A fresh (uncached) CLIP tokenizer read from `path`, whose sha256 is checked."""
        return cls(load_clip_merges(path), context_length=context_length, kind="clip")

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, context_length: int = DEFAULT_CONTEXT_LENGTH) -> "Tokenizer":
        """Learn byte-level BPE merges from `texts` (cleaned and pre-tokenized as for encoding).

        The vocabulary is 512 byte symbols + the learned merges + sot + eot, so `vocab_size` must be >= 514. Each
        step merges the most frequent adjacent pair; ties go to the lexicographically smallest (left, right) pair
        of symbol strings, so the result does not depend on the order of `texts`. Training stops early (and the
        vocabulary is smaller than asked) when every word of the corpus is a single symbol.
        """
        if not isinstance(vocab_size, int) or vocab_size < 514:
            raise CosmosError(
                f"vocab_size={vocab_size!r} is too small: the vocabulary holds 512 byte symbols and 2 specials, "
                "so ask for at least 514 (CLIP uses 49408)"
            )
        _check_context_length(context_length)
        merges = _learn_merges(_count_words(texts), vocab_size - 514)
        return cls(merges, context_length=context_length)

    # -- serialization --

    def state_dict(self) -> dict[str, Any]:
        """Plain python types only, so it can live inside a checkpoint read with torch.load(weights_only=True)."""
        if self.kind == "clip":
            return {"kind": "clip", "context_length": self.context_length}
        return {"kind": "bpe", "merges": list(self._merges), "context_length": self.context_length}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> "Tokenizer":
        """Rebuild a tokenizer from `state_dict()`; an unknown kind or malformed content is a CosmosError."""
        if not isinstance(state, dict) or "kind" not in state:
            raise CosmosError(
                f"tokenizer state must be a dict with a 'kind' key ('clip' or 'bpe'), got {type(state).__name__}"
            )
        context_length = _check_context_length(state.get("context_length", DEFAULT_CONTEXT_LENGTH))
        kind = state["kind"]
        if kind == "clip":
            tok = cls.clip()
            if context_length != tok.context_length:
                tok = copy.copy(tok)  # shares the tables and the word cache
                tok.context_length = context_length
            return tok
        if kind == "bpe":
            merges = state.get("merges")
            if not isinstance(merges, (list, tuple)) or not all(isinstance(m, str) for m in merges):
                raise CosmosError("tokenizer state of kind 'bpe' needs 'merges': a list of 'left right' strings")
            return cls(merges, context_length=context_length)
        raise CosmosError(f"unknown tokenizer kind {kind!r} in the tokenizer state; expected 'clip' or 'bpe'")

    # -- encoding --

    def _bpe(self, word: str) -> tuple[int, ...]:
        """Ids of one pre-token: byte symbols, </w> on the last, then lowest-ranked merges first."""
        special = self._specials.get(word)
        if special is not None:
            return special
        ids = [BYTE_TO_ID[b] for b in word.encode("utf-8")]  # [n]
        ids[-1] += 256  # the same byte with </w>
        ranks = self._ranks
        while len(ids) > 1:
            best_rank, best = None, None
            for pair in zip(ids, ids[1:]):
                hit = ranks.get(pair)
                if hit is not None and (best_rank is None or hit[0] < best_rank):
                    best_rank, best = hit[0], (pair[0], pair[1], hit[1])
            if best is None:
                break
            ids = _merge_pair(ids, *best)
        result = tuple(ids)
        cache = self._cache
        if len(cache) >= self.cache_size:  # bounded: drop the oldest quarter
            _evict_oldest(cache, max(1, self.cache_size // 4))
        cache[word] = result
        return result

    def _encode_clean(self, text: str) -> list[int]:
        cache_get, bpe = self._cache.get, self._bpe
        ids: list[int] = []
        for word in _split_pattern(text).findall(text):
            hit = cache_get(word)
            ids.extend(hit if hit is not None else bpe(word))
        return ids

    def encode(self, text: str) -> list[int]:
        """Ids of `text` without sot/eot and without truncation."""
        if not isinstance(text, str):
            raise CosmosError(f"can only tokenize strings, got {type(text).__name__}: {text!r:.80}")
        return self._encode_clean(clean(text))

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> torch.Tensor:
        """LongTensor [N, context_length]: sot, ids, eot, zero padding; overlong rows end with eot."""
        if isinstance(texts, str):
            texts = [texts]
        length = self.context_length if context_length is None else _check_context_length(context_length)
        sot, eot = self.sot_token_id, self.eot_token_id
        encode = self._encode_clean
        rows: list[list[int]] = []
        for n, text in enumerate(texts):
            if not isinstance(text, str):
                raise CosmosError(f"can only tokenize strings, but item {n} is a {type(text).__name__}: {text!r:.80}")
            row = [sot, *encode(clean(text)), eot]
            if len(row) > length:
                row = row[:length]
                row[-1] = eot
            rows.append(row)
        # fill the padded batch in one go from a flat list of ids
        count = len(rows)
        lengths = np.fromiter(map(len, rows), dtype=np.int64, count=count)  # [N]
        total = int(lengths.sum())
        flat = np.fromiter(chain.from_iterable(rows), dtype=np.int64, count=total)  # [T]
        starts = np.cumsum(lengths) - lengths  # [N] where each row begins in `flat`
        position = np.arange(total, dtype=np.int64) - np.repeat(starts, lengths)  # [T] column of each id
        out = np.zeros((count, length), dtype=np.int64)  # [N, L]
        out.reshape(-1)[np.repeat(np.arange(count, dtype=np.int64) * length, lengths) + position] = flat
        return torch.from_numpy(out)

    # -- decoding --

    def decode(self, ids: Sequence[int] | torch.Tensor | np.ndarray) -> str:
        """Text of one id sequence: stops at eot (what follows is padding), drops sot, one space after each
        word-final symbol (so "cat." decodes as "cat ."), invalid UTF-8 replaced by U+FFFD."""
        if isinstance(ids, (torch.Tensor, np.ndarray)):
            if ids.ndim != 1:
                raise CosmosError(f"decode takes one sequence of ids, got an array of shape {tuple(ids.shape)}")
            ids = ids.tolist()
        table = self._decode_table
        if table is None:
            table = self._decode_table = [_symbol_bytes(s) for s in self._symbols[: self.sot_token_id]]
        out = bytearray()
        for i in ids:
            if i == self.eot_token_id:
                break
            if i == self.sot_token_id:
                continue
            if not 0 <= i < self.sot_token_id:
                raise CosmosError(f"token id {i!r} is outside this tokenizer's vocabulary (0..{self.vocab_size - 1})")
            out += table[i]
        text = out.decode("utf-8", errors="replace")
        return text[:-1] if text.endswith(" ") else text

    # -- pickling (DataLoader workers): the tables travel, the word cache starts empty --

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_cache"], state["_decode_table"] = {}, None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return f"Tokenizer(kind={self.kind!r}, vocab_size={self.vocab_size}, context_length={self.context_length})"


_CLIP: Tokenizer | None = None
_CLIP_LOCK = threading.Lock()


def tokenize(texts: str | Sequence[str], context_length: int = DEFAULT_CONTEXT_LENGTH) -> torch.Tensor:
    """CLIP vocabulary, LongTensor [N, context_length]: a drop-in for open_clip.tokenize."""
    return Tokenizer.clip()(texts, context_length=context_length)


def load_clip_merges(path: Path | str) -> list[str]:
    """The 48,894 merges of CLIP's merges file (line 0 is a header), after checking the file's sha256."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise CosmosError(f"cannot read the CLIP merges file {path}: {e.strerror or e}") from e
    digest = hashlib.sha256(raw).hexdigest()
    if digest != CLIP_MERGES_SHA256:
        raise CosmosError(
            f"the CLIP merges file {path} is corrupted: sha256 {digest} instead of {CLIP_MERGES_SHA256}; "
            f"restore weights/{CLIP_MERGES_FILE} from the repository or reinstall the package"
        )
    lines = gzip.decompress(raw).decode("utf-8").split("\n")
    return lines[1 : 1 + CLIP_NUM_MERGES]


def _merge_pair(symbols: Sequence, left, right, merged) -> list:
    """`symbols` with every adjacent (left, right) replaced by `merged`, scanning left to right."""
    out, i, n = [], 0, len(symbols)
    while i < n:
        if i + 1 < n and symbols[i] == left and symbols[i + 1] == right:
            out.append(merged)
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return out


def _evict_oldest(cache: dict[str, tuple[int, ...]], n: int) -> None:
    """Drop the `n` oldest entries of the word cache; safe when several threads share one tokenizer.

    Another thread may insert or evict while the keys are listed (the listing then fails: skip this eviction, the
    next insertion tries again, so the cache overshoots its bound by at most a few entries) or delete a listed key
    first (pop with a default ignores it). A lookup racing an eviction only misses and recomputes the same ids.
    """
    try:
        stale = list(islice(cache, n))
    except RuntimeError:  # "dictionary changed size during iteration"
        return
    for key in stale:
        cache.pop(key, None)


def _check_context_length(context_length: Any) -> int:
    if isinstance(context_length, bool) or not isinstance(context_length, int) or context_length < 2:
        raise CosmosError(f"context_length={context_length!r} is invalid; use an integer >= 2 (CLIP uses 77)")
    return context_length


def _symbol_bytes(symbol: str) -> bytes:
    """The bytes a vocabulary symbol stands for; a word-final symbol is followed by one space."""
    final = symbol.endswith(END_OF_WORD)
    if final:
        symbol = symbol[: -len(END_OF_WORD)]
    return bytes(SYMBOL_TO_BYTE[c] for c in symbol) + (b" " if final else b"")


# --- 5. Learning merges from a corpus ------------------------------------------------------------------------


def _count_words(texts: Iterable[str]) -> Counter[str]:
    """How often each pre-token occurs in the cleaned corpus (special-token strings excluded)."""
    counts: Counter[str] = Counter()
    for n, text in enumerate(texts):
        if not isinstance(text, str):
            raise CosmosError(f"can only train on strings, but item {n} is a {type(text).__name__}: {text!r:.80}")
        counts.update(pretokenize(clean(text)))
    counts.pop(SOT, None)
    counts.pop(EOT, None)
    return counts


def _learn_merges(word_counts: Counter[str], num_merges: int) -> list[str]:
    """Greedy BPE: repeatedly merge the most frequent adjacent symbol pair, updating only the words it touches.

    Symbols are strings (a string made by two different merges is one symbol); pair counts live in a dict and
    a max-heap with stale entries skipped when popped.
    """
    symbols_of: list[list[str]] = []  # per distinct word, its current symbols
    freqs: list[int] = []
    for word in sorted(word_counts):
        syms = [BYTE_TO_SYMBOL[b] for b in word.encode("utf-8")]
        syms[-1] += END_OF_WORD
        symbols_of.append(syms)
        freqs.append(word_counts[word])

    pair_count: dict[tuple[str, str], int] = {}
    where: dict[tuple[str, str], set[int]] = {}  # pair -> words that may contain it (a superset)
    for w, syms in enumerate(symbols_of):
        for pair in zip(syms, syms[1:]):
            pair_count[pair] = pair_count.get(pair, 0) + freqs[w]
            where.setdefault(pair, set()).add(w)
    heap = [(-c, a, b) for (a, b), c in pair_count.items()]
    heapq.heapify(heap)

    merges: list[str] = []
    while heap and len(merges) < num_merges:
        neg, left, right = heapq.heappop(heap)
        if pair_count.get((left, right), 0) != -neg or neg == 0:
            continue  # stale entry
        merges.append(f"{left} {right}")
        merged = left + right
        touched: set[tuple[str, str]] = set()
        for w in sorted(where.pop((left, right), ())):
            syms, f = symbols_of[w], freqs[w]
            out, n = _merge_pair(syms, left, right, merged), len(syms)
            if len(out) == n:
                continue
            for pair in zip(syms, syms[1:]):
                pair_count[pair] -= f
                touched.add(pair)
            for pair in zip(out, out[1:]):
                pair_count[pair] = pair_count.get(pair, 0) + f
                where.setdefault(pair, set()).add(w)
                touched.add(pair)
            symbols_of[w] = out
        pair_count.pop((left, right), None)
        for pair in touched:
            c = pair_count.get(pair, 0)
            if c > 0:
                heapq.heappush(heap, (-c, pair[0], pair[1]))
    return merges
