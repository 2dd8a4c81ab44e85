"""Text: word tokens, a word-level vocabulary, language-modelling windows and a baseline."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from .dataset import DatasetError

_TOKEN_RE = re.compile(
    r"https?://\S+|www\.\S+"  # URLs as one token
    r"|[@#]\w+"  # @mentions and #hashtags
    r"|\w+(?:['’]\w+)*"  # words, numbers, contractions (don't, it's)
    r"|[^\w\s]",  # any other single symbol: punctuation, emoji
    re.UNICODE,
)


def tokenize(text: str) -> list[str]:
    """Lowercased word-level tokens of ``text``."""
    return _TOKEN_RE.findall(text.lower())


class Tokenizer:
    """Word-level vocabulary: ids 0..3 are PAD, UNK, BOS, EOS, then words by frequency."""

    PAD = 0
    UNK = 1
    BOS = 2
    EOS = 3
    SPECIALS = ("<pad>", "<unk>", "<bos>", "<eos>")

    def __init__(self, itos: Sequence[str]):
        itos = list(itos)
        if tuple(itos[: len(self.SPECIALS)]) != self.SPECIALS:
            raise DatasetError(f"tokenizer vocabulary must start with {list(self.SPECIALS)}")
        if len(set(itos)) != len(itos):
            raise DatasetError("tokenizer vocabulary has duplicate entries")
        self.itos = itos
        self.stoi = {w: i for i, w in enumerate(itos)}

    @classmethod
    def fit(cls, texts: Sequence[str], vocab_size: int = 20000, min_freq: int = 1) -> Tokenizer:
        """The ``vocab_size - 4`` most frequent tokens seen at least ``min_freq`` times."""
        if vocab_size < len(cls.SPECIALS) + 1:
            raise DatasetError(f"vocab_size must be at least {len(cls.SPECIALS) + 1}, got {vocab_size}")
        counts: Counter[str] = Counter()
        for t in texts:
            counts.update(tokenize(t))
        for s in cls.SPECIALS:
            counts.pop(s, None)
        words = sorted((w for w, c in counts.items() if c >= min_freq), key=lambda w: (-counts[w], w))
        return cls(list(cls.SPECIALS) + words[: vocab_size - len(cls.SPECIALS)])

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    def ids(self, text: str) -> list[int]:
        get, unk = self.stoi.get, self.UNK
        return [get(w, unk) for w in tokenize(text)]

    def encode(self, texts: Sequence[str], max_len: int) -> np.ndarray:
        """int64 (n, max_len): token ids, truncated, padded with PAD."""
        if max_len < 1:
            raise DatasetError(f"max_len must be at least 1, got {max_len}")
        out = np.full((len(texts), max_len), self.PAD, dtype=np.int64)
        for i, t in enumerate(texts):
            ids = self.ids(t)[:max_len]
            if ids:
                out[i, : len(ids)] = ids
        return out

    def encode_stream(self, texts: Sequence[str]) -> np.ndarray:
        """1-D int64 token stream of all texts, each followed by EOS."""
        stream: list[int] = []
        for t in texts:
            stream.extend(self.ids(t))
            stream.append(self.EOS)
        return np.asarray(stream, dtype=np.int64)

    def decode(self, ids: Iterable[int]) -> str:
        """Tokens of ``ids`` joined by spaces, PAD dropped."""
        return " ".join(self.itos[i] if 0 <= i < len(self.itos) else "<unk>" for i in map(int, ids) if i != self.PAD)

    def to_dict(self) -> dict[str, Any]:
        return {"type": "word", "version": 1, "lowercase": True, "itos": list(self.itos)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Tokenizer:
        if not isinstance(d, dict) or d.get("type") != "word" or not isinstance(d.get("itos"), list):
            raise DatasetError("not a saved word tokenizer (expected {'type': 'word', 'itos': [...]})")
        return cls(d["itos"])

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Tokenizer) and self.itos == other.itos

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size})"


def lm_windows(stream: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Non-overlapping (inputs, targets) windows of ``seq_len``; targets are inputs shifted by 1."""
    stream = np.asarray(stream, dtype=np.int64).reshape(-1)
    if seq_len < 1:
        raise DatasetError(f"seq_len must be at least 1, got {seq_len}")
    n = (stream.size - 1) // seq_len
    if n < 1:
        raise DatasetError(
            f"text too short for language modelling: {stream.size} tokens, need more than {seq_len}"
        )
    inputs = stream[: n * seq_len].reshape(n, seq_len)
    targets = stream[1 : n * seq_len + 1].reshape(n, seq_len)
    return inputs.copy(), targets.copy()


def unigram_perplexity(train_stream: np.ndarray, eval_stream: np.ndarray, vocab_size: int) -> float:
    """Perplexity on ``eval_stream`` of an add-one smoothed unigram model of ``train_stream``."""
    train = np.asarray(train_stream, dtype=np.int64).reshape(-1)
    ev = np.asarray(eval_stream, dtype=np.int64).reshape(-1)
    if ev.size == 0:
        raise DatasetError("cannot compute perplexity on an empty evaluation stream")
    for s, what in ((train, "training"), (ev, "evaluation")):
        if s.size and (s.min() < 0 or s.max() >= vocab_size):
            raise DatasetError(f"{what} stream has token ids outside [0, {vocab_size})")
    counts = np.bincount(train, minlength=vocab_size).astype(np.float64)
    logp = np.log((counts + 1.0) / (train.size + vocab_size))
    return float(np.exp(-logp[ev].mean()))


def load_tokenizer(d: dict[str, Any]) -> Any:
    """A saved tokenizer back from its ``to_dict()``: ``word`` -> :class:`Tokenizer` (text
    classification), ``bpe`` -> :class:`~workers.data.bpe.BPETokenizer` (language modelling)."""
    kind = d.get("type") if isinstance(d, dict) else None
    if kind == "word":
        return Tokenizer.from_dict(d)
    if kind == "bpe":
        from .bpe import BPETokenizer  # the tokenizers library loads only where BPE is used

        return BPETokenizer.from_dict(d)
    raise DatasetError(f"unknown saved tokenizer type {kind!r}; expected 'word' or 'bpe'")
