"""``build_model``: a freshly initialised network for an architecture, preset and dataset."""

from __future__ import annotations

import logging
from typing import Any

from torch import nn

from .base import FlowModel
from .gpt import GPT_PRESETS, GPTLanguageModel, layers_config
from .layers import build_custom
from .networks import CNNNet, MLPNet, RNNNet, TransformerNet
from .presets import PRESET_CONFIGS, PRESETS
from .task import ModelError, TaskInfo, check_compatible, validate_task

log = logging.getLogger(__name__)

_NETWORKS: dict[str, type[FlowModel]] = {
    "mlp": MLPNet,
    "cnn": CNNNet,
    "rnn": RNNNet,
    "transformer": TransformerNet,
}


def build_model(architecture: str, preset: str, task: TaskInfo,
                layers: list[dict[str, Any]] | None = None,
                gradient_checkpointing: bool = False,
                hf_config: dict[str, Any] | None = None) -> nn.Module:
    """Build a freshly initialised model (deterministic given ``torch.manual_seed``).

    ``hf_config``: an exact GPT-2 config (a Hugging Face directory's ``config.json``, or the one a
    checkpoint recorded) that a language model is built from instead of the preset / layers, which
    then only label it; its vocabulary and context are the config's.

    Raises :class:`ModelError` (before any module is built) when the architecture does not fit
    the dataset kind, the preset is unknown, or the custom layer list is invalid.
    """
    check_compatible(architecture, task.kind)
    if hf_config is not None:
        if architecture != "transformer" or task.kind != "lm":
            raise ModelError(f"a GPT-2 config builds a transformer language model, not {architecture} for "
                             f"{task.kind} data")
        model = GPTLanguageModel.from_hf_config(hf_config, preset)
        model.gradient_checkpointing = bool(gradient_checkpointing)
        log.info("built transformer (GPT-2 config) for lm: %d parameters", describe_model(model)["parameters"])
        return model
    if preset not in PRESETS:
        raise ModelError(f"unknown model preset {preset!r}; choose one of {', '.join(PRESETS)}")
    validate_task(task)
    if task.kind == "lm" and task.num_classes == 0:
        task = TaskInfo(task.kind, tuple(task.input_shape), task.vocab_size, task.vocab_size, task.max_len)
    if architecture == "transformer" and task.kind == "lm":  # the transformers GPT-2 model
        if preset == "custom" and not layers:
            raise ModelError("model 'custom' needs a 'layers' list, e.g. [{\"type\": \"embedding\", "
                             "\"embedding_dim\": 128}, {\"type\": \"transformer_block\", \"num_heads\": 4, "
                             "\"num_layers\": 2}, {\"type\": \"output\"}]")
        if preset != "custom" and layers:
            raise ModelError(f"'layers' were given but model is {preset!r}; set model to 'custom' "
                             "to build from layers, or drop 'layers' to use the preset")
        cfg = layers_config(layers or []) if preset == "custom" else dict(GPT_PRESETS[preset])
        model: FlowModel = GPTLanguageModel(preset, task, cfg)
    elif preset == "custom":
        if not layers:
            raise ModelError("model 'custom' needs a 'layers' list, e.g. [{\"type\": \"embedding\", "
                             "\"embedding_dim\": 64}, {\"type\": \"transformer_block\", \"num_heads\": 4, "
                             "\"hidden_dim\": 128, \"num_layers\": 2}, {\"type\": \"output\"}]")
        model = build_custom(architecture, task, layers)
    else:
        if layers:
            raise ModelError(f"'layers' were given but model is {preset!r}; set model to 'custom' "
                             "to build from layers, or drop 'layers' to use the preset")
        model = _NETWORKS[architecture](preset, task, dict(PRESET_CONFIGS[architecture][preset]))
    model.gradient_checkpointing = bool(gradient_checkpointing)
    info = describe_model(model)
    log.info("built %s/%s for %s %s: %d parameters (%.2f MiB)", architecture, preset, task.kind,
             tuple(task.input_shape) or f"vocab={task.vocab_size}", info["parameters"], info["size_mb"])
    return model


def describe_model(model: nn.Module) -> dict[str, Any]:
    """Parameter count (shared/tied parameters counted once), size of parameters + buffers in
    MiB (2**20 bytes), and what the model is."""
    inner = model
    while not isinstance(inner, FlowModel) and isinstance(getattr(inner, "module", None), nn.Module):
        inner = inner.module  # DDP / wrappers
    params = list(inner.parameters())
    n_bytes = sum(p.numel() * p.element_size() for p in params)
    n_bytes += sum(b.numel() * b.element_size() for b in inner.buffers())
    task = getattr(inner, "task", None)
    return {
        "parameters": sum(p.numel() for p in params),
        "trainable_parameters": sum(p.numel() for p in params if p.requires_grad),
        "size_mb": round(n_bytes / 2**20, 4),
        "architecture": getattr(inner, "architecture", type(inner).__name__),
        "preset": getattr(inner, "preset", None),
        "kind": task.kind if task is not None else None,
        "config": dict(getattr(inner, "config", {})),
        "gradient_checkpointing": bool(getattr(inner, "gradient_checkpointing", False)),
    }
