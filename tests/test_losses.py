"""aksis.losses: the loss of text and chat batches, and each step's loss on its way to the host."""

import math

import datasets
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config

from aksis.blocks import tokenize_chat
from aksis.chat_template import Message, render
from aksis.config import IGNORE_INDEX
from aksis.losses import NonFiniteLoss, StepLosses, batch_loss, inputs_and_targets, target_loss_sums
from aksis.model import GPT
from aksis.tokenizer import Tokenizer

CONVERSATION = [
    Message("system", "Speak in verse."),
    Message("user", "Who goes there?"),
    Message("assistant", "Nay, answer me."),
    Message("user", "Long live the king!"),
    Message("assistant", "Bernardo?"),
]


def test_text_blocks_predict_their_own_next_token_and_chat_blocks_their_labels() -> None:
    text = torch.arange(10).view(2, 5)
    inputs, targets = inputs_and_targets(text)
    assert inputs.tolist() == [[0, 1, 2, 3], [5, 6, 7, 8]] and targets.tolist() == [[1, 2, 3, 4], [6, 7, 8, 9]]
    chat = torch.stack([text, text + 100], dim=1)  # (B, 2, T+1): [ids; labels]
    inputs, targets = inputs_and_targets(chat)
    assert inputs.tolist() == [[0, 1, 2, 3], [5, 6, 7, 8]] and targets.tolist() == [
        [101, 102, 103, 104],
        [106, 107, 108, 109],
    ]


def test_the_chat_loss_is_the_cross_entropy_over_assistant_tokens_only() -> None:
    byte = Tokenizer.byte_level()
    model = GPT(tiny_config(vocab_size=byte.vocab_size, block_size=128))
    tokenized = tokenize_chat(datasets.Dataset.from_dict({"messages": [[m.to_dict() for m in CONVERSATION]]}), byte)
    batch = torch.tensor([[tokenized["ids"][0], tokenized["labels"][0]]])  # (1, 2, T+1), as PackedBlocks gives
    ids, trained = render(byte, CONVERSATION)  # the mask, independently of the labels under test
    replies = [t for t in range(len(ids) - 1) if trained[t + 1]]  # positions whose next token is the assistant's
    prompts = [t for t in range(len(ids) - 1) if not trained[t + 1]]
    assert len(replies) == len("Nay, answer me.") + len("Bernardo?") + 2  # each reply and its <|endoftext|>

    logits, _ = model(batch[:, 0, :-1])
    expected = F.cross_entropy(logits[0, replies], torch.tensor(ids)[[t + 1 for t in replies]])
    loss = batch_loss(model, batch)
    assert torch.allclose(loss, expected, rtol=1e-6)
    _, every_token = model(batch[:, 0, :-1], batch[:, 0, 1:])
    assert not torch.allclose(loss, every_token)  # the prompt would change the loss if it were not masked

    # no gradient reaches the predictions at masked positions, whatever their targets; all replies get one
    leaf = logits.detach().requires_grad_()
    sums, counts = target_loss_sums(leaf, batch[:, 1, 1:])
    assert counts.tolist() == [len(replies)]
    (sums.sum() / counts.sum()).backward()
    assert leaf.grad is not None
    per_position = leaf.grad[0].abs().sum(-1)
    assert (per_position[prompts] == 0).all() and (per_position[replies] > 0).all()

    # a batch cut entirely from prompts trains nothing: loss 0 and no gradient, not NaN (which stops a run)
    prompt_only = batch.clone()
    prompt_only[:, 1] = IGNORE_INDEX
    silent = batch_loss(model, prompt_only)
    silent.backward()
    assert silent.item() == 0.0
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())


def test_step_losses_read_late_in_one_go_and_name_the_first_bad_step() -> None:
    losses = StepLosses()
    assert math.isnan(losses.read())  # nothing read yet
    for step, value in enumerate([2.0, 1.5, 1.25], start=1):
        losses.add(step, torch.tensor(value))
    assert losses.read() == 1.25 and losses.unread == []
    assert losses.read() == 1.25  # the last loss read, until a new one is added
    losses.add(4, torch.tensor(1.0))
    losses.add(5, torch.tensor(float("nan")))
    losses.add(6, torch.tensor(float("inf")))
    with pytest.raises(NonFiniteLoss, match="the training loss became nan at step 5") as bad:
        losses.read()
    assert (bad.value.step, math.isnan(bad.value.loss)) == (5, True)


def test_copy_to_host_gives_the_values() -> None:
    assert StepLosses.copy_to_host(torch.tensor([1.5, 0.0, 3.0]))() == [1.5, 0.0, 3.0]
