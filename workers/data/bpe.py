"""Byte-level BPE for language modelling, built with the ``tokenizers`` library (GPT-2 style).

Workers never share raw text: each counts the *pre-tokens* of its shard (the GPT-2 regex
split, e.g. ``" the"``, ``","``, ``"\\n"``) with :func:`pretoken_counts`; every rank then trains
the same tokenizer from the summed counts with :meth:`BPETokenizer.fit_counts`. The BPE
trainer only ever sees pre-token counts, so training from counts gives the tokenizer that
training on the texts themselves gives. ``<|endoftext|>`` (id 0) ends every document and is
the eos / bos / unk token; every byte is in the alphabet, so no text is ever unknown.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from .dataset import DatasetError

EOS_TOKEN = "<|endoftext|>"
MIN_VOCAB_SIZE = 257 + 1
"""The 256 byte symbols, ``<|endoftext|>`` and at least one merge."""
_BATCH = 4096


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def pretoken_counts(texts: Iterable[str]) -> Counter[str]:
    """How often each raw pre-token (the GPT-2 regex split of the text) occurs in ``texts``."""
    split = _pre_tokenizer().pre_tokenize_str
    counts: Counter[str] = Counter()
    for text in texts:
        # offsets index the text itself; the strings returned are already byte-mapped
        counts.update(text[a:b] for _, (a, b) in split(text))
    return counts


def _repeat_batches(counts: Mapping[str, int]) -> Iterator[list[str]]:
    """Each pre-token ``count`` times, in a fixed order, in batches for the Rust trainer."""
    batch: list[str] = []
    for piece in sorted(counts):
        n = int(counts[piece])
        while n > 0:
            take = min(n, _BATCH - len(batch))
            batch.extend([piece] * take)
            n -= take
            if len(batch) >= _BATCH:
                yield batch
                batch = []
    if batch:
        yield batch


class BPETokenizer:
    """A trained byte-level BPE ``tokenizers.Tokenizer`` (``hf``) with the calls training needs."""

    def __init__(self, hf: Tokenizer) -> None:
        eos = hf.token_to_id(EOS_TOKEN)
        if eos is None:
            raise DatasetError(f"a BPE tokenizer here needs the {EOS_TOKEN} token in its vocabulary")
        self.hf = hf
        self.eos_id = int(eos)

    @classmethod
    def fit_counts(cls, counts: Mapping[str, int], vocab_size: int) -> BPETokenizer:
        """Train on pre-token counts (what workers gather); the same counts give the same tokenizer."""
        if vocab_size < MIN_VOCAB_SIZE:
            raise DatasetError(f"a byte-level BPE vocabulary needs at least {MIN_VOCAB_SIZE} entries "
                               f"(256 bytes, {EOS_TOKEN} and merges), got {vocab_size}")
        if not counts:
            raise DatasetError("no text to build a tokenizer from")
        hf = Tokenizer(models.BPE())
        hf.pre_tokenizer = _pre_tokenizer()
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=int(vocab_size), min_frequency=2, special_tokens=[EOS_TOKEN],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
        )
        hf.train_from_iterator(_repeat_batches(counts), trainer=trainer, length=sum(counts.values()))
        return cls(hf)

    @classmethod
    def fit(cls, texts: Sequence[str], vocab_size: int) -> BPETokenizer:
        """Train on ``texts`` (one process holding all of them)."""
        return cls.fit_counts(pretoken_counts(texts), vocab_size)

    @property
    def vocab_size(self) -> int:
        return int(self.hf.get_vocab_size())

    def ids(self, text: str) -> list[int]:
        return list(self.hf.encode(text).ids)

    def decode(self, ids: Iterable[int]) -> str:
        return str(self.hf.decode([int(i) for i in ids], skip_special_tokens=False))

    def encode_stream(self, texts: Sequence[str]) -> np.ndarray:
        """1-D int64 token stream of all texts, each followed by ``<|endoftext|>``."""
        stream: list[int] = []
        for enc in self.hf.encode_batch(list(texts)):
            stream.extend(enc.ids)
            stream.append(self.eos_id)
        return np.asarray(stream, dtype=np.int64)

    def to_dict(self) -> dict[str, Any]:
        return {"type": "bpe", "tokenizer_json": self.hf.to_str()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BPETokenizer:
        if not isinstance(d, dict) or d.get("type") != "bpe" or not isinstance(d.get("tokenizer_json"), str):
            raise DatasetError("not a saved BPE tokenizer (expected {'type': 'bpe', 'tokenizer_json': '...'})")
        try:
            return cls(Tokenizer.from_str(d["tokenizer_json"]))
        except Exception as exc:  # the Rust parser's own message says what is wrong
            raise DatasetError(f"the saved BPE tokenizer does not load: {exc}") from exc

    def to_transformers(self) -> Any:
        """The same tokenizer as a ``transformers.PreTrainedTokenizerFast`` (eos/bos/unk = ``<|endoftext|>``)."""
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(self.hf.to_str()),
                                       eos_token=EOS_TOKEN, bos_token=EOS_TOKEN, unk_token=EOS_TOKEN)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, BPETokenizer) and json.loads(self.hf.to_str()) == json.loads(other.hf.to_str())

    def __repr__(self) -> str:
        return f"BPETokenizer(vocab_size={self.vocab_size})"
