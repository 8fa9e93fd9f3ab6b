"""The loss curves of a run, from its metrics.jsonl records: the points (`loss_curves`), and a drawing of them
(`loss_figure`) for the model card's loss_curve.png and the app's Model tab; the Train tab draws the same points
live in its own chart.

Figures are plain matplotlib `Figure`s, not pyplot ones: no global state, so requests can draw at the same time,
and no display is needed. matplotlib is imported when a figure is drawn, not with this module.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.figure import Figure

Curves = dict[str, list[tuple[float, float]]]  # "training" / "validation" -> (x, loss) points
X_LABELS = {"step": "step", "tokens": "tokens seen"}


def loss_curves(records: Sequence[dict[str, Any]], x: str = "step") -> Curves:
    """Training loss and validation loss against `x` ("step" or "tokens"), from metrics.jsonl records."""
    if x not in X_LABELS:
        raise ValueError(f"x must be one of {', '.join(X_LABELS)}, got {x!r}")
    return {
        curve: [(r[x], r[key]) for r in records if key in r and x in r]
        for key, curve in (("loss", "training"), ("val_loss", "validation"))
    }


def loss_figure(curves: Curves, x: str = "step") -> Figure | None:
    """The curves drawn against `x` (None when there is no point). Points are marked when few, so that a short
    run's lone validation point shows."""
    if not any(curves.values()):
        return None
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 3.5), dpi=100)
    ax = fig.add_subplot()
    for curve, points in curves.items():
        if points:
            ax.plot(*zip(*points, strict=True), label=curve, marker="o" if len(points) < 30 else None)
    ax.set_xlabel(X_LABELS[x])
    ax.set_ylabel("loss (nats per token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig
