"""Preset sizes per architecture: ``base`` < ``large`` < ``xl`` scale width and depth;
``custom`` builds from a ``layers`` list instead (see :mod:`workers.models.layers`)."""

from __future__ import annotations

from typing import Any

PRESETS: tuple[str, ...] = ("base", "large", "xl", "custom")

MLP_PRESETS: dict[str, dict[str, Any]] = {
    "base": {"hidden": (128, 128), "embedding_dim": 64, "dropout": 0.1},
    "large": {"hidden": (512, 512, 512), "embedding_dim": 128, "dropout": 0.1},
    "xl": {"hidden": (1024, 1024, 1024, 1024), "embedding_dim": 256, "dropout": 0.1},
}
CNN_PRESETS: dict[str, dict[str, Any]] = {
    # images / vectors as a square grid: per entry of channels one block of convs_per_block 3x3
    # convs (padding 1, GroupNorm, ReLU) and a 2x2 max-pool while a side is >= 2 px; the maps
    # (average-pooled to at most max_grid x max_grid) are flattened into a dense ReLU layer of
    # hidden units, then the classifier.
    # embedding_dim / filters / kernel_sizes: the TextCNN used for text.
    "base": {"channels": (32, 64), "convs_per_block": 1, "hidden": 128, "max_grid": 7,
             "embedding_dim": 64, "filters": 64, "kernel_sizes": (3, 4, 5), "dropout": 0.1},
    "large": {"channels": (32, 64, 128), "convs_per_block": 2, "hidden": 256, "max_grid": 7,
              "embedding_dim": 128, "filters": 128, "kernel_sizes": (2, 3, 4, 5), "dropout": 0.1},
    "xl": {"channels": (64, 128, 256), "convs_per_block": 2, "hidden": 512, "max_grid": 7,
           "embedding_dim": 256, "filters": 256, "kernel_sizes": (2, 3, 4, 5, 6), "dropout": 0.1},
}
RNN_PRESETS: dict[str, dict[str, Any]] = {
    "base": {"cell": "lstm", "embedding_dim": 64, "hidden_size": 64, "num_layers": 1, "dropout": 0.1},
    "large": {"cell": "lstm", "embedding_dim": 128, "hidden_size": 256, "num_layers": 2, "dropout": 0.1},
    "xl": {"cell": "lstm", "embedding_dim": 256, "hidden_size": 512, "num_layers": 3, "dropout": 0.1},
}
TRANSFORMER_PRESETS: dict[str, dict[str, Any]] = {
    "base": {"d_model": 64, "num_layers": 2, "num_heads": 4, "ffn_dim": 128, "dropout": 0.1},
    "large": {"d_model": 128, "num_layers": 4, "num_heads": 4, "ffn_dim": 512, "dropout": 0.1},
    "xl": {"d_model": 256, "num_layers": 6, "num_heads": 8, "ffn_dim": 1024, "dropout": 0.1},
}

PRESET_CONFIGS: dict[str, dict[str, dict[str, Any]]] = {
    "mlp": MLP_PRESETS,
    "cnn": CNN_PRESETS,
    "rnn": RNN_PRESETS,
    "transformer": TRANSFORMER_PRESETS,
}
"""architecture -> preset -> the configuration its network is built from."""
