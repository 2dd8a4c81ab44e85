"""The language model: a ``transformers`` GPT-2 causal LM built from a config.

Presets (:data:`GPT_PRESETS`): ``base`` and ``large`` train on two CPU cores in minutes; ``xl``
is GPT-2-small sized (768 wide, 12 layers, 12 heads) for GPU machines. A ``custom`` layer list
maps onto the same config: ``embedding`` {embedding_dim -> n_embd, dropout -> embd_pdrop},
``transformer_block`` {num_heads -> n_head, num_layers -> n_layer, hidden_dim -> n_inner,
dropout -> resid/attn_pdrop}, ``output``; the vocabulary is always the tokenizer's.
The output projection is tied to the token embedding (GPT-2's own choice).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .base import FlowModel
from .task import ModelError, TaskInfo, task_max_len

GPT_PRESETS: dict[str, dict[str, Any]] = {
    "base": {"n_embd": 128, "n_layer": 2, "n_head": 4, "n_inner": 512, "dropout": 0.0, "vocab_size": 4096},
    "large": {"n_embd": 256, "n_layer": 4, "n_head": 4, "n_inner": 1024, "dropout": 0.0, "vocab_size": 8192},
    "xl": {"n_embd": 768, "n_layer": 12, "n_head": 12, "n_inner": 3072, "dropout": 0.1, "vocab_size": 16384},
}
"""preset -> GPT-2 config fields (``vocab_size``: the BPE vocabulary trained for it)."""

EOS_ID = 0
_TRANSFORMERS_MAJOR = 0  # set when the first model is built (transformers loads only then)
"""``<|endoftext|>`` is the BPE tokenizer's first token (see :mod:`workers.data.bpe`)."""

_LAYER_TYPES = {"embedding": "embedding", "transformer_block": "transformer_block", "transformer": "transformer_block",
                "transformer_encoder": "transformer_block", "attention": "transformer_block", "output": "output"}


def _int(spec: dict[str, Any], key: str, where: str, default: int | None = None) -> int:
    value = spec.get(key, default)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ModelError(f"{where}: {key!r} must be an integer >= 1, got {value!r}")
    return value


def _rate(spec: dict[str, Any], key: str, where: str, default: float) -> float:
    value = spec.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ModelError(f"{where}: {key!r} must be a number in [0, 1), got {value!r}")
    return float(value)


def layers_config(layers: list[dict[str, Any]]) -> dict[str, Any]:
    """GPT config fields from a custom ``layers`` list (embedding, transformer_block(s), output)."""
    if not isinstance(layers, list) or not layers:
        raise ModelError("model 'custom' needs a non-empty 'layers' list, e.g. [{\"type\": \"embedding\", "
                         "\"embedding_dim\": 128}, {\"type\": \"transformer_block\", \"num_heads\": 4, "
                         "\"num_layers\": 2}, {\"type\": \"output\"}]")
    types = []
    for i, spec in enumerate(layers):
        raw = spec.get("type") if isinstance(spec, dict) else None
        kind = _LAYER_TYPES.get(str(raw).lower()) if raw is not None else None
        if kind is None:
            raise ModelError(f"layers[{i}]: a transformer language model (GPT-2) is built from 'embedding', "
                             f"'transformer_block' and 'output' layers, got {raw!r}; use architecture 'rnn' "
                             "for lstm/gru language models")
        types.append(kind)
    if types[0] != "embedding":
        raise ModelError("layers[0]: a language model needs an 'embedding' layer first, e.g. "
                         "{\"type\": \"embedding\", \"embedding_dim\": 128}")
    if types.count("embedding") > 1 or ("output" in types and types.index("output") != len(types) - 1):
        raise ModelError("layers: one 'embedding' layer first, 'transformer_block' layers, and at most one "
                         "'output' layer last")
    blocks = [(i, s) for i, (t, s) in enumerate(zip(types, layers)) if t == "transformer_block"]
    if not blocks:
        raise ModelError("layers: add a 'transformer_block' layer, e.g. {\"type\": \"transformer_block\", "
                         "\"num_heads\": 4, \"num_layers\": 2}")
    emb = layers[0]
    n_embd = _int(emb, "embedding_dim", "layers[0] (embedding)")
    shapes = {(_int(s, "num_heads", f"layers[{i}] (transformer_block)"),
               _int(s, "hidden_dim", f"layers[{i}] (transformer_block)", 4 * n_embd)) for i, s in blocks}
    if len(shapes) != 1:
        raise ModelError("layers: every 'transformer_block' of a GPT-2 model has the same num_heads and "
                         f"hidden_dim; got {sorted(shapes)}")
    n_head, n_inner = shapes.pop()
    if n_embd % n_head:
        divisors = [h for h in range(1, min(n_embd, 16) + 1) if n_embd % h == 0]
        raise ModelError(f"layers: num_heads {n_head} does not divide embedding_dim {n_embd}; use num_heads "
                         f"in {divisors}")
    n_layer = sum(_int(s, "num_layers", f"layers[{i}] (transformer_block)", 1) for i, s in blocks)
    dropout = max(_rate(s, "dropout", f"layers[{i}] (transformer_block)", 0.1) for i, s in blocks)
    cfg = {"n_embd": n_embd, "n_layer": n_layer, "n_head": n_head, "n_inner": n_inner, "dropout": dropout,
           "embd_dropout": _rate(emb, "dropout", "layers[0] (embedding)", dropout)}
    return cfg


MIN_AUTO_VOCAB = 512


def corpus_vocab_cap(n_pretokens: int) -> int:
    """A vocabulary the corpus can fill: about 4 x sqrt(words) (Heaps' law), in multiples of 64,
    at least 512. BBC News (~0.9M words) keeps ~4k; a 50k-word file gets ~1k, not a table of
    tokens seen once or twice that neither the model nor the unigram baseline could learn."""
    return max(MIN_AUTO_VOCAB, 64 * math.ceil(4 * math.sqrt(max(0, n_pretokens)) / 64))


def requested_vocab_size(preset: str, layers: list[dict[str, Any]] | None, n_pretokens: int | None = None) -> int:
    """The BPE vocabulary to train for this model: the layer list's embedding ``vocab_size`` or
    output ``num_classes`` when given; else the preset's (``base``'s for custom models), capped by
    :func:`corpus_vocab_cap` when the corpus size ``n_pretokens`` (words) is known."""
    for spec in layers or []:
        if not isinstance(spec, dict):
            continue
        kind = _LAYER_TYPES.get(str(spec.get("type")).lower())
        key = {"embedding": "vocab_size", "output": "num_classes"}.get(kind or "")
        if key and spec.get(key) is not None:
            return _int(spec, key, f"layers ({kind})")
    preset_vocab = int(GPT_PRESETS.get(preset, GPT_PRESETS["base"])["vocab_size"])
    return preset_vocab if n_pretokens is None else min(preset_vocab, corpus_vocab_cap(n_pretokens))


class GPTLanguageModel(FlowModel):
    """A ``transformers.GPT2LMHeadModel`` (attribute ``hf``) behind the FlowModel interface:
    ``forward(ids (B, L) long) -> logits (B, L, V)``."""

    def __init__(self, preset: str, task: TaskInfo, cfg: dict[str, Any]) -> None:
        global _TRANSFORMERS_MAJOR
        import transformers
        from transformers import GPT2Config, GPT2LMHeadModel

        _TRANSFORMERS_MAJOR = int(transformers.__version__.split(".")[0])

        super().__init__("transformer", preset, task, cfg)
        if task.kind != "lm":
            raise ModelError(f"the GPT-2 model is a language model; dataset kind is {task.kind!r}")
        drop = float(cfg.get("dropout", 0.0))
        config = GPT2Config(
            vocab_size=task.vocab_size, n_positions=task_max_len(task), n_embd=int(cfg["n_embd"]),
            n_layer=int(cfg["n_layer"]), n_head=int(cfg["n_head"]), n_inner=int(cfg["n_inner"]),
            resid_pdrop=drop, attn_pdrop=drop, embd_pdrop=float(cfg.get("embd_dropout", drop)),
            bos_token_id=EOS_ID, eos_token_id=EOS_ID, tie_word_embeddings=True,
        )
        if config.n_embd % config.n_head:
            raise ModelError(f"n_embd {config.n_embd} is not divisible by n_head {config.n_head}")
        self.hf = GPT2LMHeadModel(config)
        self.config.update(vocab_size=task.vocab_size, n_positions=config.n_positions)
        self._apply_checkpointing()

    @classmethod
    def from_hf_config(cls, config: dict[str, Any], preset: str = "custom") -> GPTLanguageModel:
        """A model of exactly this GPT-2 config (a Hugging Face ``config.json`` or a checkpoint's
        ``hf_config``: activation, epsilon and context included), freshly initialised and labelled
        ``preset``; its task's vocabulary and context are the config's."""
        from transformers import GPT2Config, GPT2LMHeadModel

        hf_config = GPT2Config.from_dict({k: v for k, v in config.items() if k != "auto_map"})
        shaped = TaskInfo("lm", (), int(hf_config.vocab_size), int(hf_config.vocab_size), int(hf_config.n_positions))
        cfg = {"n_embd": hf_config.n_embd, "n_layer": hf_config.n_layer, "n_head": hf_config.n_head,
               "n_inner": hf_config.n_inner or 4 * hf_config.n_embd, "dropout": hf_config.resid_pdrop,
               "embd_dropout": hf_config.embd_pdrop}
        with torch.device("meta"):  # the preset-shaped model is replaced at once: no need to fill it
            model = cls(preset, shaped, cfg)
        model.hf = GPT2LMHeadModel(hf_config)
        model._apply_checkpointing()
        return model

    def hf_config_dict(self) -> dict[str, Any]:
        """The full GPT-2 config as JSON values (what a checkpoint records to rebuild this model)."""
        import json

        return dict(json.loads(self.hf.config.to_json_string(use_diff=False)))

    @property
    def hf_config(self) -> Any:
        return self.hf.config

    # FlowModel's flag, mapped onto transformers' own gradient checkpointing
    @property
    def gradient_checkpointing(self) -> bool:
        return bool(self.__dict__.get("_grad_ckpt", False))

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, value: bool) -> None:
        self.__dict__["_grad_ckpt"] = bool(value)
        self._apply_checkpointing()

    def _apply_checkpointing(self) -> None:
        hf = self._modules.get("hf")
        if hf is None:
            return
        if self.gradient_checkpointing:
            if hasattr(hf, "activation_checkpointing_enable"):  # transformers 5 renamed it
                hf.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        elif self.hf_checkpointing:
            disable = getattr(hf, "activation_checkpointing_disable", None) or hf.gradient_checkpointing_disable
            disable()

    @property
    def hf_checkpointing(self) -> bool:
        """Whether the transformers model itself has checkpointing on."""
        hf = self.hf
        if hasattr(type(hf), "is_activation_checkpointing"):
            return bool(hf.is_activation_checkpointing)
        return bool(hf.is_gradient_checkpointing)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        ids = self._token_input(ids, self.hf.config.n_positions)
        mask = None
        if ids.is_meta and _TRANSFORMERS_MAJOR >= 5:  # a shape-only pass (the memory estimate):
            # transformers 5's mask checks read values, which meta tensors have not; a ready 4-D
            # causal mask is used as it is (4.x takes no 4-D mask here, and reads nothing)
            n = ids.shape[1]
            mask = torch.ones(n, n, dtype=torch.bool, device=ids.device).tril().expand(ids.shape[0], 1, n, n)
        return self.hf(input_ids=ids, attention_mask=mask, use_cache=False).logits
