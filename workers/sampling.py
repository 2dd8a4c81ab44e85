"""Choosing the next token from a next-token distribution: greedy, temperature, top-k, top-p.

numpy only (no torch), so the server's ensemble decoding (which averages the nodes'
distributions) and a node decoding alone make the same choice from the same distribution and
the same seeded generator. Distributions travel between them as base64 float32.
"""

from __future__ import annotations

import base64

import numpy as np

from workers.protocol import GenerationOptions

__all__ = ["choose", "decode_probabilities", "encode_probabilities", "filtered", "rng_for"]


def rng_for(options: GenerationOptions) -> np.random.Generator:
    """The generator sampling draws from: seeded by ``options.seed``, fresh entropy without one."""
    return np.random.default_rng(options.seed)


def filtered(probs: np.ndarray, top_k: int | None, top_p: float | None) -> np.ndarray:
    """``probs`` (float64, sums to 1) restricted to its top-k tokens, then to the smallest set of
    most likely tokens whose mass reaches top_p, renormalised. The most likely token always stays."""
    p = np.asarray(probs, dtype=np.float64)
    if top_k is not None and top_k < p.shape[0]:
        keep = np.zeros(p.shape[0], dtype=bool)
        keep[np.argpartition(-p, top_k - 1)[:top_k]] = True
        p = np.where(keep, p, 0.0)
        p = p / p.sum()
    if top_p is not None and top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        reach = int(np.searchsorted(np.cumsum(p[order]), top_p)) + 1  # tokens up to the one reaching top_p
        keep = np.zeros(p.shape[0], dtype=bool)
        keep[order[:min(reach, p.shape[0])]] = True
        p = np.where(keep, p, 0.0)
    return p / p.sum()


def choose(probs: np.ndarray, options: GenerationOptions, rng: np.random.Generator) -> int:
    """The next token: the arg-max at temperature 0 (``probs`` already holds the temperature
    otherwise), else a draw from ``probs`` after top-k / top-p."""
    if options.temperature == 0:
        return int(np.argmax(probs))
    p = filtered(probs, options.top_k, options.top_p)
    return int(rng.choice(p.shape[0], p=p))


def encode_probabilities(probs: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(probs, dtype="<f4").tobytes()).decode("ascii")


def decode_probabilities(text: str, vocab_size: int) -> np.ndarray:
    """float64 distribution from :func:`encode_probabilities`; ValueError when it is not one."""
    raw = base64.b64decode(text.encode("ascii"), validate=True)
    p = np.frombuffer(raw, dtype="<f4").astype(np.float64)
    if p.shape[0] != vocab_size or not np.isfinite(p).all() or (p < 0).any() or abs(p.sum() - 1.0) > 1e-3:
        raise ValueError(f"not a distribution over {vocab_size} tokens")
    return p / p.sum()
