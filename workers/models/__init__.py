"""Model zoo for node training: real torch modules for every (architecture, dataset kind) pair.

``build_model(architecture, preset, task)`` returns an ``nn.Module`` that maps one batch to
logits:

* ``vectors``: float ``(B, d)`` -> ``(B, num_classes)``
* ``images``:  float ``(B, C, H, W)`` (any shape with ``C*H*W`` values per sample) -> ``(B, num_classes)``
* ``text``:    int64 token ids ``(B, L)``, PAD id 0, ``L <= max_len`` -> ``(B, num_classes)``
* ``lm``:      int64 token ids ``(B, L)``, ``L <= max_len`` -> next-token logits ``(B, L, vocab_size)``

One module per job: :mod:`.task` (what fits which data), :mod:`.presets` (architecture x
size), :mod:`.networks` (the preset networks), :mod:`.layers` and :mod:`.stages` (custom
models from a ``layers`` list), :mod:`.blocks` and :mod:`.base` (shared pieces),
:mod:`.build` (``build_model``, ``describe_model``), :mod:`.gpt` (the language model: a
``transformers`` GPT-2 built from a config).
"""

from .build import build_model, describe_model
from .task import ARCHITECTURES, PAD_ID, SUPPORTED, ModelError, TaskInfo, check_compatible

__all__ = [
    "ARCHITECTURES",
    "PAD_ID",
    "SUPPORTED",
    "ModelError",
    "TaskInfo",
    "build_model",
    "check_compatible",
    "describe_model",
]
