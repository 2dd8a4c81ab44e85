"""Training curves as a PNG: loss and accuracy per epoch/round, and each worker's local loss."""

from __future__ import annotations

import io

from flow_nexus_server.service.errors import ServiceError


def training_plot_png(history: dict[str, list[list[float]]], *, title: str, unit: str = "epoch") -> tuple[bytes, int]:
    """Render the curves; returns (png bytes, number of epochs plotted). Width grows with the epochs."""
    # A Figure with its own Agg canvas, not pyplot: pyplot's global figure registry is not safe
    # from the worker threads tools run on, and nothing needs a display.
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ServiceError("plotting needs matplotlib: pip install matplotlib") from exc
    epochs = sorted({int(p[0]) for series in history.values() for p in series})
    if not epochs:
        raise ServiceError("the session has no recorded epochs yet; plot it once an epoch or round has finished")
    loss_keys = [k for k in ("loss", "val_loss") if k in history]
    local = sorted(k for k in history if k.startswith("local_loss/"))
    score_keys = [k for k in ("accuracy", "val_accuracy", "val_f1_macro") if k in history]
    if not score_keys and "val_perplexity" in history:
        score_keys = ["val_perplexity"]
    width = min(24.0, 6.0 + 0.35 * len(epochs))
    fig = Figure(figsize=(width, 4.2), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    for key in loss_keys:
        xs, ys = _series(history[key])
        axes[0].plot(xs, ys, marker="o", linewidth=2, label=key)
    for key in local:
        xs, ys = _series(history[key])
        axes[0].plot(xs, ys, linestyle="--", linewidth=1, alpha=0.8, label=f"local loss {key.split('/', 1)[1]}")
    axes[0].set_title("loss")
    for key in score_keys:
        xs, ys = _series(history[key])
        axes[1].plot(xs, ys, marker="o", linewidth=2, label=key)
    axes[1].set_title("perplexity" if score_keys == ["val_perplexity"] else "accuracy")
    for ax in axes:
        ax.set_xlabel(unit)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue(), len(epochs)


def _series(points: list[list[float]]) -> tuple[list[float], list[float]]:
    by_epoch: dict[float, float] = {}
    for epoch, _step, value in points:
        by_epoch[epoch] = value  # the last value recorded for an epoch wins
    xs = sorted(by_epoch)
    return xs, [by_epoch[x] for x in xs]
