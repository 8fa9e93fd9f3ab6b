"""aksis.plots: the loss curves of a run, as points and as a drawing."""

import pytest

from aksis.plots import loss_curves, loss_figure

RECORDS = [
    {"step": 1, "tokens": 512, "loss": 5.5, "lr": 1e-3},
    {"step": 2, "tokens": 1024, "loss": 5.0, "lr": 1e-3},
    {"step": 2, "tokens": 1024, "val_loss": 5.2, "val_ppl": 181.3},
    {"step": 3, "tokens": 1536, "loss": 4.8},
]


def test_the_curves_are_the_logged_losses_against_steps_or_tokens() -> None:
    assert loss_curves(RECORDS) == {"training": [(1, 5.5), (2, 5.0), (3, 4.8)], "validation": [(2, 5.2)]}
    assert loss_curves(RECORDS, x="tokens")["validation"] == [(1024, 5.2)]
    assert loss_curves([]) == {"training": [], "validation": []}
    with pytest.raises(ValueError, match="x must be one of step, tokens"):
        loss_curves(RECORDS, x="time")


def test_the_figure_draws_each_curve_and_nothing_without_points() -> None:
    assert loss_figure(loss_curves([])) is None
    figure = loss_figure(loss_curves(RECORDS, x="tokens"), x="tokens")
    assert figure is not None
    (axes,) = figure.axes
    lines = {line.get_label(): list(zip(line.get_xdata(), line.get_ydata(), strict=True)) for line in axes.lines}
    assert lines == {"training": [(512, 5.5), (1024, 5.0), (1536, 4.8)], "validation": [(1024, 5.2)]}
    assert axes.get_xlabel() == "tokens seen" and axes.get_ylabel() == "loss (nats per token)"
