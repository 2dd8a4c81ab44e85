"""Node-side text generation with the language model a node holds (a ``transformers`` GPT-2).

* :class:`Decoder` keeps one text's KV cache (``past_key_values``): the prompt is run once
  (prefill), then each step feeds only the newest token.
* :func:`generate` continues a prompt with this node's model alone: greedy at temperature 0
  (the arg-max of the logits, what ``transformers``' ``generate(do_sample=False)`` does, so an
  exported model gives the same text), else a draw from ``softmax(logits / temperature)``
  after top-k / top-p (:mod:`workers.sampling`, the same code the server's ensemble uses).
* :class:`StepSessions` holds the decoders of ensemble decoding: the server opens one per prompt
  on every node, averages the nodes' next-token distributions, and sends each node the token it
  chose.
* :func:`benchmark_generation` measures tokens/s, per-token latency, time to first token and
  prompt throughput.

Nothing here prints: stdout of the node process is a protocol stream.
"""

from __future__ import annotations

import inspect
import math
import threading
import time
from collections import OrderedDict
from typing import Any

import numpy as np
import torch

from workers.inference import InferenceError
from workers.protocol import Continuation, GenerationOptions
from workers.sampling import choose, rng_for

__all__ = ["Decoder", "StepSessions", "benchmark_generation", "generate", "lm_parts"]

MAX_STEP_SESSIONS = 64
"""Open ensemble decodings a node keeps; the least recently used one goes first."""
STEP_SESSION_IDLE_S = 300.0
"""An ensemble decoding untouched this long is dropped (its server went away)."""


def lm_parts(trained: Any, local: bool = False) -> tuple[Any, Any, int]:
    """(the ``transformers`` causal LM, the BPE tokenizer, the context length) of a trained
    language model; InferenceError when the node holds something else."""
    if trained.task.kind != "lm":
        raise InferenceError("this model is a classifier; generation options apply to language models")
    model = trained.local_model if local and getattr(trained, "local_model", None) is not None else trained.model
    hf = getattr(model, "hf", None)
    if hf is None or trained.tokenizer is None or not hasattr(trained.tokenizer, "eos_id"):
        raise InferenceError("this language model was not built with transformers and a BPE tokenizer; train it "
                             "again with this version of the server")
    return hf, trained.tokenizer, int(hf.config.n_positions)


def prompt_ids(tokenizer: Any, text: str, options: GenerationOptions, context: int) -> list[int]:
    """The prompt's tokens, checked to leave room for ``max_new_tokens`` in the context."""
    if options.max_new_tokens >= context:
        raise InferenceError(f"max_new_tokens {options.max_new_tokens} does not fit the model's context of "
                             f"{context} tokens (prompt included); ask for at most {context - 1}")
    ids = tokenizer.ids(text) or [int(tokenizer.eos_id)]  # an empty prompt starts a new document
    if len(ids) + options.max_new_tokens > context:
        raise InferenceError(f"the prompt is {len(ids)} tokens and max_new_tokens {options.max_new_tokens}; "
                             f"together they exceed the model's context of {context} tokens: shorten the prompt "
                             f"or ask for at most {max(0, context - len(ids))} new tokens")
    return ids


def _cache_arg(hf: Any) -> str:
    """transformers 5 names the KV cache argument ``cache``; older versions ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(type(hf).forward).parameters else "past_key_values"


class Decoder:
    """One text being decoded: the model's KV cache and the logits for the next token."""

    def __init__(self, hf: Any, ids: list[int]) -> None:
        self.hf = hf
        self.device = next(hf.parameters()).device
        self.length = 0
        self.past: Any = None
        self.logits = self._forward(ids)
        self.generated: list[int] = []  # tokens appended after the prompt

    @torch.inference_mode()
    def _forward(self, ids: list[int]) -> torch.Tensor:
        x = torch.tensor([ids], dtype=torch.long, device=self.device)
        out = self.hf(input_ids=x, use_cache=True, **{_cache_arg(self.hf): self.past})
        self.past = out.get("cache", None) or out.get("past_key_values")
        self.length += len(ids)
        return out.logits[0, -1].float()

    def append(self, ids: list[int]) -> None:
        self.logits = self._forward(ids)
        self.generated.extend(ids)

    def distribution(self, temperature: float) -> np.ndarray:
        """softmax(logits / temperature) as float64 (temperature 0 counts as 1)."""
        t = temperature if temperature > 0 else 1.0
        return torch.softmax(self.logits / t, dim=-1).cpu().numpy().astype(np.float64)

    def logprob(self, token: int) -> float:
        return float(torch.log_softmax(self.logits, dim=-1)[token])


def _eval(hf: Any) -> Any:
    if hf.training:
        hf.eval()
    return hf


def generate(trained: Any, text: str, options: GenerationOptions, *, local: bool = False,
             rng: np.random.Generator | None = None) -> Continuation:
    """Continue ``text`` with this node's model alone (see the module docstring)."""
    hf, tokenizer, context = lm_parts(trained, local)
    rng = rng if rng is not None else rng_for(options)
    start = time.perf_counter()
    ids = prompt_ids(tokenizer, text, options, context)
    decoder = Decoder(_eval(hf), ids)
    new: list[int] = []
    logprobs: list[float] = []
    first_ms = 0.0
    stopped = "length"
    while True:
        if options.temperature == 0:
            token = int(torch.argmax(decoder.logits))
        else:
            token = choose(decoder.distribution(options.temperature), options, rng)
        new.append(token)
        logprobs.append(decoder.logprob(token))
        if len(new) == 1:
            first_ms = (time.perf_counter() - start) * 1000
        if token == tokenizer.eos_id:
            stopped = "eos"
            break
        if len(new) >= options.max_new_tokens:
            break
        decoder.append([token])
    elapsed = time.perf_counter() - start
    return Continuation(text=tokenizer.decode([t for t in new if t != tokenizer.eos_id]), token_ids=new,
                        prompt_tokens=len(ids), mean_logprob=float(np.mean(logprobs)), stopped=stopped,
                        latency_ms=elapsed * 1000, first_token_ms=first_ms, tokens_per_second=len(new) / elapsed)


class StepSessions:
    """The open ensemble decodings of one node, by session id (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: OrderedDict[str, tuple[Decoder, float]] = OrderedDict()

    def open(self, session: str, trained: Any, text: str, options: GenerationOptions,
             local: bool = False) -> tuple[Decoder, list[int]]:
        hf, tokenizer, context = lm_parts(trained, local)
        ids = prompt_ids(tokenizer, text, options, context)
        decoder = Decoder(_eval(hf), ids)
        with self._lock:
            self._expire()
            self._open[session] = (decoder, time.monotonic())
            while len(self._open) > MAX_STEP_SESSIONS:
                self._open.popitem(last=False)
        return decoder, ids

    def step(self, session: str, tokens: list[int], context: int) -> Decoder:
        with self._lock:
            self._expire()
            entry = self._open.get(session)
            if entry is not None:
                self._open.move_to_end(session)
                self._open[session] = (entry[0], time.monotonic())
        if entry is None:
            raise InferenceError(f"no open decoding {session!r} on this node (it ended or expired); start again")
        decoder = entry[0]
        if decoder.length + len(tokens) > context:
            raise InferenceError(f"the decoding would exceed the model's context of {context} tokens")
        vocab = int(decoder.logits.shape[0])
        if any(not 0 <= t < vocab for t in tokens):
            raise InferenceError(f"token ids must lie in 0-{vocab - 1}")
        if tokens:
            decoder.append(tokens)
        return decoder

    def close(self, session: str) -> Decoder | None:
        with self._lock:
            entry = self._open.pop(session, None)
        return entry[0] if entry else None

    def clear(self) -> None:
        with self._lock:
            self._open.clear()

    def _expire(self) -> None:
        now = time.monotonic()
        for key in [k for k, (_, t) in self._open.items() if now - t > STEP_SESSION_IDLE_S]:
            del self._open[key]


def benchmark_generation(trained: Any, prompt: str, runs: int, max_new_tokens: int = 32) -> dict[str, float]:
    """Greedy generation of ``prompt`` timed ``runs`` times (after one untimed run), step by step:
    tokens/s, per-token decoding latency p50/p95, time to first token (p50) and prefill throughput."""
    hf, tokenizer, context = lm_parts(trained)
    max_new = max(1, min(max_new_tokens, context - 1))
    ids = tokenizer.ids(prompt) or [int(tokenizer.eos_id)]
    ids = ids[-(context - max_new):]  # keep the prompt's end when it is too long to leave room
    hf = _eval(hf)
    steps: list[float] = []
    firsts: list[float] = []
    prefill_s = total_s = 0.0
    new_tokens = prompt_tokens = 0
    for run in range(int(runs) + 1):
        t0 = time.perf_counter()
        decoder = Decoder(hf, ids)
        token = int(torch.argmax(decoder.logits))
        t1 = time.perf_counter()
        times, made = [], 1
        while made < max_new:
            s = time.perf_counter()
            decoder.append([token])
            token = int(torch.argmax(decoder.logits))
            times.append(time.perf_counter() - s)
            made += 1
        t2 = time.perf_counter()
        if run == 0:
            continue  # warm-up
        firsts.append(t1 - t0)
        steps.extend(times)
        prefill_s += t1 - t0
        total_s += t2 - t0
        new_tokens += made
        prompt_tokens += len(ids)
    step_ms = np.asarray(steps or [math.nan]) * 1000
    return {
        "tokens_per_second": new_tokens / total_s,
        "token_latency_p50_ms": float(np.percentile(step_ms, 50)),
        "token_latency_p95_ms": float(np.percentile(step_ms, 95)),
        "first_token_ms": float(np.percentile(np.asarray(firsts) * 1000, 50)),
        "prompt_tokens_per_second": prompt_tokens / prefill_s,
        "prompt_tokens": float(len(ids)),
        "new_tokens": float(max_new),
        "runs": float(runs),
    }
