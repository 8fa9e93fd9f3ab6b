"""The training loss of a batch of blocks, for plain text and for chat fine-tuning.

Text blocks (B, T+1) predict their own next token, and every target counts. Chat blocks (B, 2, T+1) hold
[ids; labels] (aksis.blocks): the target of position t is labels[t + 1], and positions whose label is IGNORE_INDEX
(everything but the assistant's replies) carry no loss. Validation loss is the mean over the trained target tokens,
in both formats: `target_loss_sums` gives the sums and counts that processes pool. `StepLosses` carries each
step's loss to the host, late where it can, and finds the first that is not finite.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from aksis.config import IGNORE_INDEX


def inputs_and_targets(batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets), each (B, T), of a batch of blocks: text blocks (B, T+1) predict their own next
    token; chat blocks (B, 2, T+1) hold [ids; labels], and the target of position t is labels[t + 1]
    (IGNORE_INDEX where it is not trained)."""
    if batch.dim() == 2:
        return batch[:, :-1], batch[:, 1:]
    return batch[:, 0, :-1], batch[:, 1, 1:]


def target_loss_sums(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per block: the sum of the cross-entropy over trained targets (not IGNORE_INDEX) and their number,
    each (B,). Summed rather than averaged so blocks (and processes) can be pooled into a per-token mean."""
    losses = F.cross_entropy(
        logits.float().transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none"
    )  # (B, T), 0 where ignored
    return losses.sum(1), (targets != IGNORE_INDEX).sum(1)


def batch_loss(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """The training loss of one batch: the mean cross-entropy over its trained targets.

    Text: the model's own loss, over every target, exactly as always. Chat: the sum over the batch's trained
    targets divided by max(their number, 1). Each batch is normalised by its own count, as the model does for
    text (batches of an accumulated step and of several processes are then weighted equally, however many
    assistant tokens each holds). A batch cut entirely from prompts has no trained target: its loss is 0 with
    zero gradient, instead of the 0/0 = NaN that a plain mean gives and that would stop the run."""
    inputs, targets = inputs_and_targets(batch)
    if batch.dim() == 2:
        _, loss = model(inputs, targets)
        assert loss is not None
        return loss
    logits, _ = model(inputs)
    sums, counts = target_loss_sums(logits, targets)
    return sums.sum() / counts.sum().clamp(min=1)


class NonFiniteLoss(Exception):
    """The loss of a step was NaN or infinite."""

    def __init__(self, step: int, loss: float) -> None:
        super().__init__(f"the training loss became {loss} at step {step}")
        self.step, self.loss = step, loss


class StepLosses:
    """The mean loss of each optimizer step, on its way to the host.

    A step's loss may stay on the device (`add` a tensor there): where the optimizer skips a non-finite step by
    itself, nothing needs it before a log step, and a GPU then never waits for the host. `read` copies every loss
    added since the last read in one wait and raises `NonFiniteLoss` for the first that is not finite. A step whose
    loss must be known before its update (several processes, SGD, fp16) goes through `copy_to_host` first."""

    def __init__(self) -> None:
        self.unread: list[tuple[int, torch.Tensor]] = []  # (step, its mean loss, on the device) not read yet
        self.last = math.nan  # the last loss read

    def add(self, step: int, loss: torch.Tensor) -> None:
        self.unread.append((step, loss))

    def read(self) -> float:
        """The loss of the last step added, reading those not read yet; NonFiniteLoss at the first bad one."""
        if self.unread:
            values = torch.stack([loss for _, loss in self.unread]).tolist()
            steps = [step for step, _ in self.unread]
            self.unread.clear()
            for step, value in zip(steps, values, strict=True):
                if not math.isfinite(value):
                    raise NonFiniteLoss(step, value)
            self.last = values[-1]
        return self.last

    @staticmethod
    def copy_to_host(values: torch.Tensor) -> Callable[[], list[float]]:
        """Start copying `values` to the host; the returned function waits for that copy alone and gives the
        numbers. On a GPU the copy goes to pinned memory behind the work queued so far, and later work is not
        waited for."""
        if values.device.type != "cuda":
            return values.tolist
        host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
        host.copy_(values, non_blocking=True)
        copied = torch.cuda.Event()
        copied.record()

        def wait() -> list[float]:
            copied.synchronize()
            return host.tolist()

        return wait
