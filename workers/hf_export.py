"""Hugging Face export and load of a language model (a ``transformers`` GPT-2 causal LM).

Export layout (what ``transformers`` itself writes, so ``AutoModelForCausalLM.from_pretrained``
and ``AutoTokenizer.from_pretrained`` load it): ``config.json``, ``model.safetensors``,
``generation_config.json`` (greedy, eos = ``<|endoftext|>``), ``tokenizer.json`` with
``tokenizer_config.json`` (and ``special_tokens_map.json`` where the installed transformers writes
one), plus ``flow_nexus.json`` (training facts and metrics) and ``README.md`` (a model card).

Loading reads JSON and safetensors only: never ``pytorch_model.bin`` (a pickle), never code
shipped with the model (``trust_remote_code`` is never set), and only GPT-2 models
(``model_type: gpt2``), the architecture the cluster trains. A directory trained elsewhere loads
too, when its weights fit the node's memory budget.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from workers.inference import InferenceError

log = logging.getLogger(__name__)

FACTS = "flow_nexus.json"
WEIGHTS = "model.safetensors"
PICKLED_WEIGHTS = ("pytorch_model.bin", "tf_model.h5", "flax_model.msgpack")
SERVING_COPIES = 2
"""Memory a served model takes, in copies of its float32 weights (weights + inference working set)."""


class HuggingFaceError(ValueError):
    """The directory cannot be exported to or loaded from; the message is for the user."""


def is_huggingface_dir(directory: Path) -> bool:
    """A directory whose config.json is a transformers config (it names a ``model_type``)."""
    try:
        config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and "model_type" in config


def export_huggingface(trained: Any, directory: Path, card: dict[str, Any], job: dict[str, Any] | None) -> list[Path]:
    """Write ``trained`` (a language model) as a Hugging Face model directory; returns the files."""
    from transformers import GenerationConfig
    from transformers.utils import logging as hf_logging

    from workers.generation import lm_parts

    hf_logging.disable_progress_bar()  # the node's stderr is its log, not a terminal

    try:
        hf, tokenizer, context = lm_parts(trained)
    except InferenceError as exc:
        raise HuggingFaceError(f"format 'huggingface' exports language models: {exc}") from None
    directory.mkdir(parents=True, exist_ok=True)
    hf.eval()
    hf.generation_config = GenerationConfig(do_sample=False, max_new_tokens=32, eos_token_id=tokenizer.eos_id,
                                             bos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.eos_id)
    hf.save_pretrained(str(directory), safe_serialization=True)
    tok = tokenizer.to_transformers()
    tok.model_max_length = context
    tok.save_pretrained(str(directory))
    facts = {"format": "huggingface", "architecture": trained.architecture, "preset": trained.preset,
             "metrics": dict(trained.metrics or {}), "card": card, "exported_at": time.time(),
             "training": {k: (job or {}).get(k) for k in ("session_id", "dataset", "mode", "topology", "epochs",
                                                          "rounds", "seed", "learning_rate")}}
    (directory / FACTS).write_text(json.dumps(facts, indent=2), encoding="utf-8")
    (directory / "README.md").write_text(_card(facts, hf.config, tokenizer.vocab_size), encoding="utf-8")
    return sorted(p for p in directory.iterdir() if p.is_file())


def _card(facts: dict[str, Any], config: Any, vocab: int) -> str:
    metrics = "\n".join(f"| {k} | {v:.4f} |" for k, v in sorted(facts["metrics"].items())
                        if isinstance(v, (int, float)))
    training = "\n".join(f"- {k}: {v}" for k, v in facts["training"].items() if v is not None)
    return f"""# GPT-2 language model trained by flow-nexus-server

- {config.n_layer} layers, {config.n_embd} wide, {config.n_head} heads, context {config.n_positions} tokens,
  byte-level BPE vocabulary of {vocab}
- Hugging Face layout: `AutoModelForCausalLM.from_pretrained(dir)`, `AutoTokenizer.from_pretrained(dir)`;
  greedy `generate` gives the text the cluster gives at temperature 0.

## Trained with
{training or '- (no training facts recorded)'}

## Metrics (held-out split)
| metric | value |
|---|---|
{metrics or '| (none recorded) | |'}
"""


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        raise HuggingFaceError(f"{path} cannot be read as JSON ({what}): {type(exc).__name__}") from None
    if not isinstance(value, dict):
        raise HuggingFaceError(f"{path} is not a JSON object ({what})")
    return value


def _weights(directory: Path) -> Path:
    path = (directory / WEIGHTS).resolve()
    if path.parent == directory.resolve() and path.is_file():
        return path
    if (directory / f"{WEIGHTS}.index.json").is_file():
        raise HuggingFaceError(f"{directory} holds sharded weights (model.safetensors.index.json); this server loads "
                               "one model.safetensors file: save the model again with a larger max_shard_size")
    pickled = [name for name in PICKLED_WEIGHTS if (directory / name).exists()]
    if pickled:
        raise HuggingFaceError(f"{directory} holds its weights as {pickled[0]}, which loading would unpickle (it can "
                               "run code); this server loads only model.safetensors: convert it with "
                               "save_pretrained(dir, safe_serialization=True)")
    raise HuggingFaceError(f"{directory} has no {WEIGHTS}; a Hugging Face model directory needs one")


def _parameters(weights: Path) -> int:
    from safetensors import safe_open

    total = 0
    with safe_open(str(weights), framework="pt") as f:  # reads the header only
        for key in f.keys():
            n = 1
            for s in f.get_slice(key).get_shape():
                n *= int(s)
            total += n
    return total


def load_huggingface(directory: Path, memory_mb: int | None = None) -> tuple[Any, dict[str, Any]]:
    """A Hugging Face GPT-2 directory -> (TrainedModel, the training facts it records)."""
    from safetensors.torch import load_model
    from tokenizers import Tokenizer

    from workers.data.bpe import BPETokenizer
    from workers.data.dataset import DatasetError
    from workers.models.gpt import GPTLanguageModel
    from workers.training.common import TrainedModel

    config = _read_json(directory / "config.json", "the model config")
    if config.get("model_type") != "gpt2":
        raise HuggingFaceError(f"{directory} holds a {config.get('model_type')!r} model; this server serves and trains "
                               "GPT-2 causal language models (model_type 'gpt2') only")
    if config.get("auto_map"):
        log.info("%s names custom code (auto_map); it is ignored, the model is built as GPT-2", directory)
    weights = _weights(directory)
    params = _parameters(weights)
    need_mb = params * 4 * SERVING_COPIES / 2**20
    if memory_mb is not None and need_mb > memory_mb:
        raise HuggingFaceError(f"{directory} holds {params:,} parameters, about {need_mb:,.0f} MB to serve, over the "
                               f"{memory_mb:,} MB (memory_mb) this node was deployed with; deploy nodes with "
                               f"memory_mb >= {int(need_mb) + 1}")
    if not (directory / "tokenizer.json").is_file():
        raise HuggingFaceError(f"{directory} has no tokenizer.json; save the tokenizer next to the model "
                               "(tokenizer.save_pretrained(dir), a fast tokenizer)")
    try:
        tokenizer = BPETokenizer(Tokenizer.from_file(str(directory / "tokenizer.json")))
    except (DatasetError, Exception) as exc:  # the Rust parser's message says what is wrong
        raise HuggingFaceError(f"{directory}/tokenizer.json does not load as a byte-level BPE tokenizer with an "
                               f"<|endoftext|> token: {exc}") from None
    try:
        model = GPTLanguageModel.from_hf_config(config)
        hf_config, task = model.hf.config, model.task
        if tokenizer.vocab_size > task.vocab_size:
            raise HuggingFaceError(f"{directory}: the tokenizer has {tokenizer.vocab_size} tokens, the model's "
                                   f"embedding only {task.vocab_size}")
        load_model(model.hf, str(weights), strict=False)
        missing = _missing(model.hf, weights)
        if missing:
            raise HuggingFaceError(f"{weights} lacks weights the GPT-2 config needs ({', '.join(missing[:3])}...)")
    except HuggingFaceError:
        raise
    except Exception as exc:  # a foreign or damaged file: no Python text in the reply
        log.info("loading %s failed", directory, exc_info=True)
        raise HuggingFaceError(f"the weights in {weights} do not fit the GPT-2 model its config.json describes "
                               f"({type(exc).__name__}); save the model again") from None
    model.eval()
    facts = _read_json(directory / FACTS, "training facts") if (directory / FACTS).is_file() else {}
    metrics = {k: float(v) for k, v in (facts.get("metrics") or {}).items() if isinstance(v, (int, float))}
    trained = TrainedModel(model=model, task=task, tokenizer=tokenizer, label_names=[], architecture="transformer",
                           preset="custom", max_len=task.max_len, metrics=metrics, checkpoint=str(directory),
                           session_id=(facts.get("training") or {}).get("session_id"))
    job = dict(facts.get("training") or {})
    job.update(architecture="transformer", model="custom", layers=layers_of(hf_config))
    return trained, job


def _missing(hf: Any, weights: Path) -> list[str]:
    """Parameters of ``hf`` the file does not hold (tied ones count as held)."""
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as f:
        held = set(f.keys())
    names = {n for n, _ in hf.named_parameters()}  # tied weights appear once
    return sorted(n for n in names if n not in held and f"transformer.{n}" not in held
                  and n.removeprefix("transformer.") not in held)


def layers_of(config: Any) -> list[dict[str, Any]]:
    """The ``custom`` layer list that builds a model of this GPT-2 config (for fine-tuning it)."""
    return [{"type": "embedding", "embedding_dim": int(config.n_embd), "vocab_size": int(config.vocab_size)},
            {"type": "transformer_block", "num_heads": int(config.n_head), "num_layers": int(config.n_layer),
             "hidden_dim": int(config.n_inner or 4 * config.n_embd), "dropout": float(config.resid_pdrop)},
            {"type": "output"}]
