"""Text generation through a language-model cluster (neural_predict_distributed on an LM).

* ``ensemble`` (and its alias ``mean``) decodes jointly: every node keeps a KV-cached decoding of
  the prompt (``/generate/step``); at each step the server averages the nodes' next-token
  distributions, chooses the token from the average (greedy, or sampled with
  :mod:`workers.sampling`, the code a node alone uses) and sends it to every node.
* ``majority`` and ``weighted`` let every node continue the prompt alone (``/generate``) and
  choose among those continuations: the text most nodes wrote (ties: the higher mean token
  log-probability), or the text with the most confidence mass, each node adding
  exp(mean log-probability), its geometric-mean token probability.
* ``mode="shard"`` splits the prompts across the nodes, each continuing its own.

Every figure is measured: node-side latency by the nodes, total latency by the server.
"""

from __future__ import annotations

import json
import math
import secrets
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from flow_nexus_server import replies as r
from flow_nexus_server.service.errors import ServiceError
from flow_nexus_server.service.node_client import NodeClient, NodeRequestError
from flow_nexus_server.service.parallel import parallel
from flow_nexus_server.service.prediction import shard_indices
from workers import protocol as p
from workers.sampling import choose, decode_probabilities, rng_for

PROMPT_KEYS = ("text", "prompt", "inputs", "input", "texts", "prompts", "data")
MAX_PROMPTS = 256


def prompts_of(payload: Any) -> list[str]:
    """The prompts in an input: text, ``{"text": ...}`` (also as a JSON string), or a list of them."""
    if isinstance(payload, str):
        s = payload.strip()
        if s[:1] in ("{", "[", '"'):
            try:
                return prompts_of(json.loads(s))
            except ValueError:
                pass
        return [payload]
    if isinstance(payload, dict):
        key = next((k for k in PROMPT_KEYS if k in payload), None)
        if key is None:
            raise ServiceError("a language model continues text: send it as plain text, {\"text\": \"...\"} or a "
                               f"list of them (the object has keys {', '.join(map(repr, payload)) or 'none'})")
        return prompts_of(payload[key])
    if isinstance(payload, list) and payload:
        out = [t for item in payload for t in prompts_of(item)]
        if len(out) > MAX_PROMPTS:
            raise ServiceError(f"{len(out)} prompts; send at most {MAX_PROMPTS} per call")
        return out
    raise ServiceError(f"a language model continues text; input_data holds {type(payload).__name__} "
                       f"{json.dumps(payload)[:40] if payload is not None else 'null'}: send text or {{\"text\": ...}}")


def _node_error(exc: BaseException) -> ServiceError:
    if isinstance(exc, NodeRequestError) and exc.status == 400:
        return ServiceError(str(exc).split(": ", 1)[-1])
    return ServiceError(f"generation failed: {exc}")


def _raise_first(results: Sequence[Any]) -> None:
    for res in results:
        if isinstance(res, BaseException):
            raise _node_error(res)


def ensemble_decode(clients: Sequence[NodeClient], prompt: str, options: p.GenerationOptions,
                    rng: np.random.Generator,
                    on_step: Callable[[int, list[np.ndarray], np.ndarray], None] | None = None) -> dict[str, Any]:
    """Decode ``prompt`` jointly over ``clients``: the mean of their next-token distributions
    chooses each token. ``on_step(step, node distributions, mean)`` sees every step (tests)."""
    session = secrets.token_hex(8)
    node_ms = [0.0] * len(clients)
    node_logprobs: list[list[float]] = [[] for _ in clients]
    tokens: list[int] = []
    logprobs: list[float] = []
    start = time.perf_counter()
    first_ms = 0.0
    stopped = "length"
    request = p.GenerateStepRequest(session=session, prompt=prompt, temperature=options.temperature)
    try:
        while True:
            replies = parallel(lambda c, req=request: c.generate_step(req), clients)
            _raise_first(replies)
            if not tokens:
                _check_room(replies[0], options)  # type: ignore[arg-type]
            dists = [decode_probabilities(rep.probabilities, rep.vocab_size) for rep in replies]  # type: ignore[union-attr]
            if len({d.shape[0] for d in dists}) != 1:
                raise ServiceError("the nodes hold language models with different vocabularies; an ensemble "
                                   "needs the same tokenizer on every node (load one model, or train them together)")
            mean = np.mean(dists, axis=0)
            if on_step is not None:
                on_step(len(tokens), dists, mean)
            token = choose(mean, options, rng)
            tokens.append(token)
            logprobs.append(math.log(max(mean[token], 1e-300)))
            for j, (rep, dist) in enumerate(zip(replies, dists)):
                node_ms[j] += rep.step_ms  # type: ignore[union-attr]
                node_logprobs[j].append(math.log(max(dist[token], 1e-300)))
            if len(tokens) == 1:
                first_ms = (time.perf_counter() - start) * 1000
            if token == replies[0].eos_id:  # type: ignore[union-attr]
                stopped = "eos"
                break
            if len(tokens) >= options.max_new_tokens:
                break
            request = p.GenerateStepRequest(session=session, tokens=[token], temperature=options.temperature)
    finally:
        closing = p.GenerateStepRequest(session=session, tokens=tokens[-1:], close=True)
        closed = parallel(lambda c: c.generate_step(closing), clients)
    text = next((c.text for c in closed if isinstance(c, p.GenerateStepReply)), "")
    elapsed = time.perf_counter() - start
    return {"text": text, "token_ids": tokens, "mean_logprob": float(np.mean(logprobs)), "stopped": stopped,
            "latency_ms": elapsed * 1000, "first_token_ms": first_ms, "tokens_per_second": len(tokens) / elapsed,
            "node_ms": node_ms, "node_mean_logprob": [float(np.mean(v)) for v in node_logprobs]}


def _check_room(opened: p.GenerateStepReply, options: p.GenerationOptions) -> None:
    """The sentence a node alone gives (workers.generation.prompt_ids) when the text would not fit."""
    context, used = opened.context, len(opened.prompt_ids)
    if options.max_new_tokens >= context:
        raise ServiceError(f"max_new_tokens {options.max_new_tokens} does not fit the model's context of {context} "
                           f"tokens (prompt included); ask for at most {context - 1}")
    if used + options.max_new_tokens > context:
        raise ServiceError(f"the prompt is {used} tokens and max_new_tokens {options.max_new_tokens}; together they "
                           f"exceed the model's context of {context} tokens: shorten the prompt or ask for at most "
                           f"{max(0, context - used)} new tokens")


def choose_continuation(continuations: Sequence[p.Continuation], method: str) -> tuple[int, float]:
    """(index of the chosen node continuation, agreement: share of nodes that wrote that text)."""
    texts = [c.text for c in continuations]
    if method == "majority":
        score = {t: (texts.count(t), max(c.mean_logprob for c in continuations if c.text == t)) for t in texts}
    else:  # weighted: confidence mass, exp(mean log-probability) per node
        score = {t: (sum(math.exp(c.mean_logprob) for c in continuations if c.text == t), 0.0) for t in texts}
    best = max(score, key=lambda t: (score[t], -texts.index(t)))
    return texts.index(best), texts.count(best) / len(texts)


def generate(clients: Sequence[NodeClient], node_ids: Sequence[str], prompts: list[str], aggregation: str,
             mode: str, options: p.GenerationOptions, use_local: bool, cluster_id: str) -> r.PredictReply:
    """Generate through the nodes; see the module docstring."""
    start = time.perf_counter()
    per_node: list[r.NodePrediction] = []
    details: list[dict[str, Any]] = []
    method = "ensemble" if aggregation == "mean" else aggregation
    if mode == "shard":
        cuts = [c for c in shard_indices(len(prompts), len(clients)) if c.stop > c.start]
        jobs = [(clients[i], p.GenerateRequest(prompts=prompts[c], options=options, use_local=use_local))
                for i, c in enumerate(cuts)]
        answers = parallel(lambda job: _timed(job[0].generate, job[1]), jobs)
        _raise_first(answers)
        for (client, _), (rep, rtt) in zip(jobs, answers):  # type: ignore[misc]
            per_node.append(_node_line(rep, rtt))
            details.extend(_detail(prompt, c) | {"node_id": rep.node_id}
                           for prompt, c in zip(_prompts_of(jobs, client), rep.continuations))
        method = "shard"
    elif method == "ensemble":
        if use_local:
            raise ServiceError("ensemble decoding runs the nodes' served models; use model='global', or "
                               "aggregation 'majority' / 'weighted' to compare the nodes' local models")
        rng = rng_for(options)
        for prompt in prompts:
            out = ensemble_decode(clients, prompt, options, rng)
            details.append({"prompt": prompt, "continuation": out["text"], "token_ids": out["token_ids"],
                            "mean_logprob": out["mean_logprob"], "stopped": out["stopped"],
                            "new_tokens": len(out["token_ids"]), "tokens_per_second": out["tokens_per_second"],
                            "first_token_ms": out["first_token_ms"], "latency_ms": out["latency_ms"],
                            "nodes": [{"node_id": n, "mean_logprob": lp, "step_ms": ms}
                                      for n, lp, ms in zip(node_ids, out["node_mean_logprob"], out["node_ms"])]})
        tokens = sum(d["new_tokens"] for d in details)
        for j, node in enumerate(node_ids):
            busy_ms = float(sum(d["nodes"][j]["step_ms"] for d in details))
            per_node.append(r.NodePrediction(
                node_id=node, prediction=None, model="global", examples=len(prompts),
                confidence=float(np.mean([d["nodes"][j]["mean_logprob"] for d in details])), latency_ms=busy_ms,
                round_trip_ms=float(sum(d["latency_ms"] for d in details)), new_tokens=tokens,
                tokens_per_second=tokens / (busy_ms / 1000) if busy_ms > 0 else None))
    else:
        request = p.GenerateRequest(prompts=prompts, options=options, use_local=use_local)
        answers = parallel(lambda c: _timed(c.generate, request), clients)
        _raise_first(answers)
        replies = [a[0] for a in answers]  # type: ignore[index]
        per_node = [_node_line(rep, rtt) for rep, rtt in answers]  # type: ignore[misc]
        for i, prompt in enumerate(prompts):
            conts = [rep.continuations[i] for rep in replies]
            k, agreement = choose_continuation(conts, method)
            details.append(_detail(prompt, conts[k]) | {
                "chosen_node": replies[k].node_id, "agreement": agreement,
                "nodes": [{"node_id": rep.node_id, "continuation": c.text, "mean_logprob": c.mean_logprob}
                          for rep, c in zip(replies, conts)]})
    total_ms = (time.perf_counter() - start) * 1000
    texts = [d["continuation"] for d in details]
    model = per_node[0].model if per_node else "global"
    return r.PredictReply(
        success=True, cluster_id=cluster_id, prediction=texts[0] if len(texts) == 1 else texts,
        confidence=float(np.mean([d["mean_logprob"] for d in details])), aggregation_method=method, mode=mode,
        model=model, nodes_used=len(per_node), examples=len(texts), individual_predictions=per_node,
        details=details, details_truncated=False, total_latency_ms=total_ms,
        generation=options.model_dump())


def _prompts_of(jobs: list[tuple[NodeClient, p.GenerateRequest]], client: NodeClient) -> list[str]:
    return next(req.prompts for c, req in jobs if c is client)


def _timed(fn: Callable[[Any], Any], req: Any) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn(req)
    return out, (time.perf_counter() - t0) * 1000


def _detail(prompt: str, c: p.Continuation) -> dict[str, Any]:
    return {"prompt": prompt, "continuation": c.text, "token_ids": c.token_ids, "mean_logprob": c.mean_logprob,
            "stopped": c.stopped, "new_tokens": len(c.token_ids), "tokens_per_second": c.tokens_per_second,
            "first_token_ms": c.first_token_ms, "latency_ms": c.latency_ms}


def _node_line(rep: p.GenerateReply, rtt_ms: float) -> r.NodePrediction:
    conts = rep.continuations
    texts = [c.text for c in conts]
    tokens = sum(len(c.token_ids) for c in conts)
    latency = sum(c.latency_ms for c in conts)
    return r.NodePrediction(
        node_id=rep.node_id, prediction=texts[0] if len(texts) == 1 else texts,
        confidence=float(np.mean([c.mean_logprob for c in conts])), latency_ms=latency, round_trip_ms=rtt_ms,
        model=rep.model, examples=len(conts), tokens_per_second=tokens / (latency / 1000) if latency > 0 else None,
        first_token_ms=float(np.median([c.first_token_ms for c in conts])), new_tokens=tokens)
