import argparse
import dataclasses
import hashlib
import importlib.util
import itertools
import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from aksis.chat_template import Message
from aksis.checkpoint import BEST_DIR, load_gpt, load_tokenizer
from aksis.config import IGNORE_INDEX, TRAIN_HELP, TrainConfig
from aksis.runs import TRAINER_STATE_FILE, TRAINING_STATE_DIR, step_checkpoints
from aksis.runs import read_metrics as metrics
from aksis.tokenizer import Tokenizer
from aksis.trainer import Trainer, TrainingError, _require_tracker, train

ROOT = Path(__file__).resolve().parents[1]


def run_config(tmp_path: Path, **overrides: Any) -> TrainConfig:
    """A run that takes a second or two: the tiny preset, byte tokens, a context of 32."""
    settings: dict[str, Any] = dict(
        dataset="shakespeare",
        tokenizer="byte",
        preset="tiny",
        block_size=32,
        batch_size=4,
        max_steps=8,
        eval_every=4,
        eval_batches=2,
        log_every=1,
        warmup_steps=2,
        learning_rate=3e-3,
        output_dir=str(tmp_path / "run"),
        data_cache=str(tmp_path / "cache"),
        progress=False,
        device="cpu",
    )
    return TrainConfig(**{**settings, **overrides})


def losses(run: Path) -> list[float]:
    return [r["loss"] for r in metrics(run) if "loss" in r]


def tree_digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()
    }


# ----- configuration -----


def test_flags_override_the_config_file_which_overrides_defaults(tmp_path: Path) -> None:
    (tmp_path / "run.yaml").write_text("preset: tiny\nlearning-rate: 1.0e-3\nbatch_size: 8\n")
    parser = argparse.ArgumentParser()
    TrainConfig.add_arguments(parser)
    args = parser.parse_args(["--config", str(tmp_path / "run.yaml"), "--batch-size", "2", "--max-steps", "5"])
    config = TrainConfig.from_args(args)
    assert (config.preset, config.learning_rate, config.batch_size, config.max_steps) == ("tiny", 1e-3, 2, 5)
    assert config.epochs == TrainConfig().epochs
    assert TrainConfig.from_args(parser.parse_args(["--resume"])).resume == "latest"
    assert TrainConfig.from_args(parser.parse_args(["--no-progress", "--max-steps", "none"])).progress is False
    (tmp_path / "run.json").write_text(json.dumps({"dataset": "wikitext2", "compile": True}))
    assert TrainConfig.from_file(tmp_path / "run.json").compile is True


def test_bad_settings_are_clear_errors(tmp_path: Path) -> None:
    (tmp_path / "typo.yaml").write_text("learning_rat: 0.1\n")
    with pytest.raises(ValueError, match="unknown TrainConfig field.*learning_rat"):
        TrainConfig.from_file(tmp_path / "typo.yaml")
    with pytest.raises(ValueError, match="optimizer must be one of"):
        TrainConfig(optimizer="rmsprop")
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        TrainConfig(batch_size=0)
    with pytest.raises(ValueError, match="cannot read the config file"):
        TrainConfig.from_file(tmp_path / "missing.yaml")
    (tmp_path / "broken.yaml").write_text("a: [1,\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        TrainConfig.from_file(tmp_path / "broken.yaml")


def test_every_option_has_help() -> None:
    assert set(TRAIN_HELP) == set(TrainConfig.__dataclass_fields__)
    assert all(text.strip() for text in TRAIN_HELP.values())


def test_shipped_run_presets_load() -> None:
    presets = sorted((ROOT / "training" / "configs").glob("*.yaml"))
    assert {p.name for p in presets} >= {"tiny-cpu.yaml", "base.yaml", "chat-shakespeare.yaml"}
    for path in presets:
        TrainConfig.from_file(path)  # unknown keys or bad values raise


def test_shipped_accelerate_configs_name_only_existing_options() -> None:
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.commands.launch import launch_command_parser

    launch_options = {o.lstrip("-") for a in launch_command_parser()._actions for o in a.option_strings}
    configs = sorted((ROOT / "training" / "configs" / "accelerate").glob("*.yaml"))
    kinds = {ClusterConfig.from_yaml_file(str(p)).distributed_type.value for p in configs}  # unknown keys raise
    assert kinds >= {"MULTI_GPU", "FSDP", "DEEPSPEED", "MULTI_CPU"}
    import yaml

    for path in configs:
        data = yaml.safe_load(path.read_text())
        for section in ("fsdp_config", "deepspeed_config"):
            for key in data.get(section, {}):
                assert key in launch_options, f"{path.name}: {section}.{key} is not an accelerate option"


# ----- pieces -----


# ----- training runs -----


def test_a_tiny_model_learns_and_its_best_checkpoint_loads_and_generates(tmp_path: Path) -> None:
    config = run_config(tmp_path, max_steps=60, eval_every=20, batch_size=8, keep_last=2)
    result = train(config)
    run = Path(config.output_dir)
    curve = losses(run)
    assert len(curve) == 60 and curve[0] > 5.0  # about ln(260) at the start
    assert sum(curve[-5:]) / 5 < 0.6 * curve[0]
    assert result.stopped == "max_steps" and result.steps == 60 and result.tokens == 60 * 8 * 32
    assert [p.name for p in step_checkpoints(run)] == ["step-000040", "step-000060"]  # keep_last=2
    records = metrics(run)
    assert {"step", "tokens", "loss", "lr", "tokens_per_s", "elapsed"} <= set(records[0])
    assert [r["step"] for r in records if "val_loss" in r] == [20, 40, 60]
    assert result.best_checkpoint == run / BEST_DIR
    assert result.best_val_loss == min(r["val_loss"] for r in records if "val_loss" in r)

    model = load_gpt(run / BEST_DIR)
    tokenizer = load_tokenizer(run / BEST_DIR)
    ids = torch.tensor([tokenizer.encode("ROMEO:\n")])
    with torch.no_grad():
        for _ in range(20):  # greedy continuation
            logits, _ = model(ids[:, -model.config.block_size :])
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    text = tokenizer.decode(ids[0].tolist())
    assert text.startswith("ROMEO:\n") and len(text) > len("ROMEO:\n")
    assert (run / BEST_DIR / "metrics.jsonl").exists()


def test_resume_continues_exactly_where_an_interrupted_run_stopped(tmp_path: Path, arch: str) -> None:
    assert_resumes_exactly(tmp_path, arch=arch)


def test_a_muon_run_resumes_exactly(tmp_path: Path) -> None:
    """Muon's momentum buffers and AdamW's moments are saved with the run: the resumed losses equal an
    uninterrupted run's."""
    assert_resumes_exactly(tmp_path, optimizer="muon")
    saved = tmp_path / "b" / "run" / "step-000012" / TRAINING_STATE_DIR
    groups = json.loads((saved / "optimizer.json").read_text())["param_groups"]
    assert [g["muon"] for g in groups] == [True, False, False]
    with safe_open(saved / "optimizer.safetensors", "pt") as f:
        names = {key.split(".", 1)[1] for key in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    assert names == {"momentum_buffer", "exp_avg", "exp_avg_sq", "step"}


def assert_resumes_exactly(tmp_path: Path, **settings: Any) -> None:
    straight = run_config(tmp_path / "a", max_steps=12, save_every=3, dropout=0.1, **settings)
    train(straight)

    interrupted = run_config(tmp_path / "b", max_steps=12, save_every=3, dropout=0.1, **settings)
    trainer = Trainer(interrupted)
    calls = 0

    def stop_after_six_steps(module: torch.nn.Module, _: object) -> None:
        nonlocal calls
        calls += module.training  # evaluation passes don't count
        if calls == 6:
            trainer.request_stop()  # what SIGINT/SIGTERM do

    trainer.model.register_forward_pre_hook(stop_after_six_steps)
    first = trainer.train()
    assert first.stopped == "interrupted" and first.steps == 6
    assert first.last_checkpoint == Path(interrupted.output_dir) / "step-000006"

    resumed = train(run_config(tmp_path / "b", max_steps=12, save_every=3, dropout=0.1, resume="latest", **settings))
    assert resumed.steps == 12 and resumed.stopped == "max_steps"
    assert losses(Path(interrupted.output_dir)) == losses(Path(straight.output_dir))  # exactly, step for step
    a = load_gpt(Path(straight.output_dir) / "step-000012")
    b = load_gpt(Path(interrupted.output_dir) / "step-000012")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_resuming_elsewhere_warns_only_of_settings_that_change_the_training(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A run continued on another machine has another run folder, cache and push settings: not worth a warning
    (its losses match). A changed learning rate is."""
    train(run_config(tmp_path / "a", max_steps=4, save_every=2))
    saved = tmp_path / "a" / "run" / "step-000002"
    caplog.set_level(logging.WARNING, logger="aksis")
    elsewhere = run_config(tmp_path / "b", max_steps=4, resume=str(saved), log_every=2, keep_last=1, report_to="none")
    Trainer(elsewhere)
    assert "changed settings" not in caplog.text
    Trainer(dataclasses.replace(elsewhere, output_dir=str(tmp_path / "c"), learning_rate=1e-2))
    assert "resuming with changed settings" in caplog.text and "learning_rate: 0.003 -> 0.01" in caplog.text
    assert "output_dir" not in caplog.text


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_gradient_accumulation_equals_a_bigger_batch(tmp_path: Path, optimizer: str) -> None:
    train(run_config(tmp_path / "big", batch_size=8, max_steps=5, optimizer=optimizer))
    train(run_config(tmp_path / "accum", batch_size=4, grad_accum_steps=2, max_steps=5, optimizer=optimizer))
    big, accum = losses(tmp_path / "big" / "run"), losses(tmp_path / "accum" / "run")
    assert len(big) == 5 and max(abs(x - y) for x, y in zip(big, accum, strict=True)) < TOLERANCE[optimizer]


# Loss differences of runs that sum the same gradients in another order. Muon orthogonalises in bfloat16, where float
# rounding differences of the gradient flip roundings: 2e-5 to 4e-5 after 5 or 6 steps.
TOLERANCE = {"adamw": 1e-5, "muon": 2e-4}


def test_val_split_reaches_the_data_split(tmp_path: Path) -> None:
    """--val-split tail holds out exactly the last val_fraction of the text (nanoGPT's split of one file); auto cuts
    at the line break before that point."""
    from aksis.corpora import load_corpus

    path = tmp_path / "one.txt"
    path.write_text("".join(f"line {i}: some words\n" for i in range(300)))  # 6,190 characters
    train_tokens = {
        split: Trainer(run_config(tmp_path / split, dataset=str(path), val_fraction=0.1, val_split=split)).data
        for split in ("auto", "tail")
    }
    tail = load_corpus(str(path), val_fraction=0.1, val_split="tail")["train"]["text"][0]
    assert len(tail) == 6190 - 619
    assert train_tokens["tail"].train_tokens == len(tail) + 1  # byte tokens and the end-of-text token
    assert train_tokens["auto"].train_tokens < train_tokens["tail"].train_tokens


def test_epochs_limit_and_token_limit(tmp_path: Path) -> None:
    (tmp_path / "small.txt").write_text("".join(f"line {i} of a small corpus\n" for i in range(400)))
    result = train(run_config(tmp_path, dataset=str(tmp_path / "small.txt"), max_steps=None, epochs=2, batch_size=8))
    assert result.stopped == "epochs" and result.steps > 0
    tokens = train(run_config(tmp_path / "t", max_steps=None, max_tokens=1000, batch_size=4))
    assert tokens.stopped == "max_tokens" and tokens.steps == math.ceil(1000 / (4 * 32))


def test_early_stopping_with_patience(tmp_path: Path) -> None:
    # A learning rate this large makes validation loss worse after the first evaluation.
    result = train(run_config(tmp_path, max_steps=200, eval_every=2, patience=2, learning_rate=5.0, grad_clip=0))
    assert result.stopped == "early stopping" and result.steps < 200


def test_a_streamed_corpus_trains_with_a_step_limit(tmp_path: Path) -> None:
    with open(tmp_path / "docs.jsonl", "w") as f:
        for i in range(60):
            f.write(json.dumps({"text": f"record {i}: the quick brown fox jumps over the lazy dog. " * 3}) + "\n")
    dataset = str(tmp_path / "docs.jsonl")
    result = train(run_config(tmp_path, dataset=dataset, streaming=True, max_steps=4))
    assert result.steps == 4 and result.best_checkpoint is not None
    with pytest.raises(TrainingError, match="--max-steps or --max-tokens"):
        Trainer(run_config(tmp_path / "x", dataset=dataset, streaming=True, max_steps=None))


def small_corpus(tmp_path: Path) -> str:
    """A local text of ~40 KB: building its data takes no time, unlike the embedded plays."""
    path = tmp_path / "small.txt"
    path.write_text("".join(f"line {i}: the quick brown fox jumps over the lazy dog\n" for i in range(800)))
    return str(path)


def trainer_state(checkpoint: Path) -> dict[str, Any]:
    return json.loads((checkpoint / TRAINING_STATE_DIR / TRAINER_STATE_FILE).read_text())["state"]


def test_a_time_budget_ends_the_run_with_a_checkpoint_and_the_schedule_at_its_floor(tmp_path: Path) -> None:
    config = run_config(
        tmp_path, dataset=small_corpus(tmp_path), max_steps=None, epochs=10**4, max_time=1.5, eval_every=10**6
    )
    started = time.perf_counter()
    result = train(config)
    assert time.perf_counter() - started < 60  # the budget ended it, not the 10,000 epochs
    assert result.stopped == "max_time" and result.steps > config.warmup_steps
    records = metrics(config.output_dir)
    lrs = [r["lr"] for r in records if "lr" in r]
    assert len(lrs) == result.steps
    assert lrs[-1] == pytest.approx(config.learning_rate * config.min_lr_ratio)  # the floor, at the end
    peak = config.warmup_steps - 2  # the record of step k holds the rate for step k + 1
    assert lrs[peak] == pytest.approx(config.learning_rate) and max(lrs) == pytest.approx(config.learning_rate)
    assert all(a >= b for a, b in itertools.pairwise(lrs[peak:]))  # then the cosine, by the clock
    assert [r["step"] for r in records if "val_loss" in r] == [result.steps]  # the final evaluation
    assert result.last_checkpoint == Path(config.output_dir) / f"step-{result.steps:06d}"
    assert trainer_state(result.last_checkpoint)["clock"] >= 1.5
    # A streamed corpus may be bounded by time alone.
    with open(tmp_path / "docs.jsonl", "w") as f:
        for i in range(60):
            f.write(json.dumps({"text": f"record {i}: the quick brown fox jumps over the lazy dog. " * 3}) + "\n")
    dataset = str(tmp_path / "docs.jsonl")
    streamed = train(run_config(tmp_path / "s", dataset=dataset, streaming=True, max_steps=None, max_time=1.0))
    assert streamed.stopped == "max_time" and streamed.steps > 0


def test_a_step_limit_before_the_time_budget_ends_the_run_with_the_schedule_at_its_floor(tmp_path: Path) -> None:
    config = run_config(tmp_path, dataset=small_corpus(tmp_path), max_steps=6, max_time=3600)
    result = train(config)
    assert result.stopped == "max_steps" and result.steps == 6
    lrs = [r["lr"] for r in metrics(config.output_dir) if "lr" in r]
    assert lrs[-1] == pytest.approx(config.learning_rate * config.min_lr_ratio)


def test_a_resumed_run_counts_the_time_its_earlier_sessions_spent(tmp_path: Path) -> None:
    settings: dict[str, Any] = dict(dataset=small_corpus(tmp_path), max_steps=None, epochs=10**4, eval_every=10**6)
    trainer = Trainer(run_config(tmp_path, max_time=3600, **settings))
    calls = 0

    def stop_after_three_steps(module: torch.nn.Module, _: object) -> None:
        nonlocal calls
        calls += module.training
        if calls == 3:
            trainer.request_stop()

    trainer.model.register_forward_pre_hook(stop_after_three_steps)
    first = trainer.train()
    assert first.stopped == "interrupted" and first.steps == 3 and first.last_checkpoint is not None
    spent = trainer_state(first.last_checkpoint)["clock"]
    assert spent > 0
    # A budget no larger than the time already spent: nothing is left, the run ends where it was.
    again = train(run_config(tmp_path, max_time=spent, resume="latest", **settings))
    assert again.stopped == "max_time" and again.steps == 3
    # One more second: the run goes on for about that long, and its clock continues from the stored one.
    more = train(run_config(tmp_path, max_time=spent + 1.0, resume="latest", **settings))
    assert more.stopped == "max_time" and more.steps > 3 and more.last_checkpoint is not None
    assert spent + 1.0 <= trainer_state(more.last_checkpoint)["clock"] < spent + 30
    lrs = [r["lr"] for r in metrics(tmp_path / "run") if "lr" in r]
    assert len(lrs) == more.steps and lrs[-1] == pytest.approx(3e-3 * 0.1)


def test_model_shape_settings_shape_a_new_model_only(tmp_path: Path) -> None:
    trainer = Trainer(
        run_config(tmp_path, dataset=small_corpus(tmp_path), n_layer=3, n_embd=64, n_head=2, d_ff=96, max_steps=2)
    )
    shape = trainer.model_config
    assert (shape.n_layer, shape.n_embd, shape.n_head, shape.d_ff, shape.block_size) == (3, 64, 2, 96, 32)
    assert len(trainer.model.transformer.h) == 3
    trainer.train()
    with pytest.raises(TrainingError, match="--n-layer.*keeps the shape"):
        Trainer(run_config(tmp_path / "ft", init_from=str(tmp_path / "run" / BEST_DIR), n_layer=2))


# ----- bad input -----


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_a_nan_loss_stops_the_run_and_keeps_the_last_checkpoint(tmp_path: Path, optimizer: str) -> None:
    config = run_config(tmp_path, max_steps=4, save_every=4, optimizer=optimizer)
    train(config)
    run = Path(config.output_dir)
    before = tree_digest(run / "step-000004")

    settings = dict(max_steps=10, save_every=1, keep_last=10, resume="latest", optimizer=optimizer)
    trainer = Trainer(run_config(tmp_path, **settings))
    trainer.model.register_forward_hook(poison_training_call(3))
    with pytest.raises(TrainingError, match=r"loss became nan at step 7.*step-000006, is intact.*--learning-rate"):
        trainer.train()
    assert tree_digest(run / "step-000004") == before
    # saved before the bad step, never after it
    assert [p.name for p in step_checkpoints(run)] == ["step-000004", "step-000005", "step-000006"]
    last_good = load_gpt(run / "step-000006")
    assert all(torch.isfinite(p).all() for p in last_good.parameters())


def poison_training_call(number: int) -> Any:
    """A forward hook that turns the loss of the `number`-th training forward pass into NaN (and so its gradients)."""
    calls = 0

    def poison(module: torch.nn.Module, _: object, output: tuple[torch.Tensor, torch.Tensor]) -> Any:
        nonlocal calls
        calls += module.training
        logits, loss = output
        return (logits, loss * float("nan")) if calls == number else output

    return poison


def test_a_nan_loss_read_at_the_next_log_step_was_never_applied(tmp_path: Path) -> None:
    # One process, AdamW: the losses stay on the device between log steps; the optimizer skips a non-finite step.
    trainer = Trainer(run_config(tmp_path, max_steps=10, log_every=5, eval_every=100))
    trainer.model.register_forward_hook(poison_training_call(2))
    message = r"loss became nan at step 2; its update was skipped, and the run stopped at step 5 without saving"
    with pytest.raises(TrainingError, match=message + r" \(no checkpoint had been saved yet\)"):
        trainer.train()
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    adam_steps = {int(s["step"]) for s in trainer.optimizer.state_dict()["state"].values()}
    assert adam_steps == {4}  # five steps taken, the second one skipped
    assert step_checkpoints(tmp_path / "run") == []


def test_losses_read_only_at_log_steps_are_those_steps_losses(tmp_path: Path) -> None:
    train(run_config(tmp_path / "every", max_steps=10, log_every=1))
    train(run_config(tmp_path / "fifth", max_steps=10, log_every=5))
    every = {r["step"]: r["loss"] for r in metrics(tmp_path / "every" / "run") if "loss" in r}
    fifth = {r["step"]: r["loss"] for r in metrics(tmp_path / "fifth" / "run") if "loss" in r}
    assert sorted(fifth) == [1, 5, 10]
    assert fifth == {step: every[step] for step in fifth}


def test_a_run_saved_with_an_unfused_optimizer_resumes_fused(tmp_path: Path) -> None:
    # Runs on a CPU were saved with the unfused AdamW before it became fused there; loading restores the saved
    # param groups, "fused" included, and the step's found_inf needs the fused kernel.
    train(run_config(tmp_path, max_steps=4, save_every=4))
    saved = tmp_path / "run" / "step-000004" / TRAINING_STATE_DIR / "optimizer.json"
    state = json.loads(saved.read_text())
    for group in state["param_groups"]:
        group["fused"] = None
    saved.write_text(json.dumps(state))
    trainer = Trainer(run_config(tmp_path, max_steps=8, resume="latest"))
    assert all(group["fused"] for group in trainer.optimizer.param_groups)
    assert trainer.train().steps == 8


def test_a_stop_asked_for_during_the_backward_pass_ends_that_step(tmp_path: Path) -> None:
    trainer = Trainer(run_config(tmp_path, max_steps=10, eval_every=100))
    calls = 0

    def stop_in_the_third_backward_pass(grad: torch.Tensor) -> None:
        nonlocal calls
        calls += 1
        if calls == 3:
            trainer.request_stop()

    next(trainer.model.parameters()).register_hook(stop_in_the_third_backward_pass)
    result = trainer.train()
    assert result.stopped == "interrupted" and result.steps == 3


def test_a_resumed_epoch_keeps_the_non_blocking_copies_to_the_device(tmp_path: Path) -> None:
    # accelerate's skip_first_batches builds a new loader without them (a resumed run on a GPU would then wait
    # for every batch's copy until the epoch ends).
    train(run_config(tmp_path, max_steps=3, save_every=3))
    trainer = Trainer(run_config(tmp_path, max_steps=6, resume="latest"))
    assert trainer.state.batches_in_epoch == 3 and trainer.train_loader._non_blocking
    assert trainer._epoch_loader() is not trainer.train_loader and trainer._epoch_loader()._non_blocking


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu_the_steps_between_log_steps_never_wait_for_the_device(tmp_path: Path) -> None:
    trainer = Trainer(run_config(tmp_path, device="cuda", max_steps=8, log_every=8, eval_every=100))
    calls = 0

    def watch_syncs(module: torch.nn.Module, _: object) -> None:
        nonlocal calls
        calls += module.training
        # From the third step's forward pass to the eighth's (a log step, which reads the losses): any wait for the
        # device (.item(), .tolist(), a synchronising copy) raises.
        torch.cuda.set_sync_debug_mode("error" if 3 <= calls < 8 else "default")

    trainer.model.register_forward_pre_hook(watch_syncs)
    try:
        result = trainer.train()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert result.steps == 8 and calls >= 8


def test_bad_runs_are_refused_with_clear_errors_and_nothing_overwritten(tmp_path: Path) -> None:
    with pytest.raises(TrainingError, match="unknown dataset 'no_such_corpus'"):
        Trainer(run_config(tmp_path, dataset="no_such_corpus"))
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(TrainingError, match="no text"):
        Trainer(run_config(tmp_path, dataset=str(tmp_path / "empty.txt")))
    with pytest.raises(TrainingError, match="nothing to resume"):
        Trainer(run_config(tmp_path, resume="latest"))

    first = run_config(tmp_path, max_steps=2)
    train(first)
    run = Path(first.output_dir)
    before = tree_digest(run)
    with pytest.raises(TrainingError, match=r"already holds the checkpoints of a run.*--resume.*--overwrite"):
        Trainer(run_config(tmp_path, preset="small", max_steps=2))  # a different model, same folder
    assert tree_digest(run) == before

    with pytest.raises(TrainingError, match="--block-size 64 is longer than the context"):
        Trainer(run_config(tmp_path / "ft", init_from=str(run / BEST_DIR), block_size=64))
    with pytest.raises(TrainingError, match="cannot start from"):
        Trainer(run_config(tmp_path / "ft", init_from=str(tmp_path / "no-such-checkpoint")))

    again = train(run_config(tmp_path, max_steps=3, overwrite=True))
    assert again.steps == 3 and [p.name for p in step_checkpoints(run)] == ["step-000003"]


def test_init_from_fine_tunes_an_existing_checkpoint(tmp_path: Path) -> None:
    base = run_config(tmp_path / "base", max_steps=4)
    train(base)
    source = Path(base.output_dir) / BEST_DIR
    (tmp_path / "new.txt").write_text("".join(f"a new line of text number {i}\n" for i in range(300)))
    tuned = run_config(tmp_path / "ft", dataset=str(tmp_path / "new.txt"), init_from=str(source), block_size=16)
    trainer = Trainer(tuned)
    start = load_gpt(source)
    assert trainer.model_config == start.config and trainer.block_size == 16
    assert all(
        torch.equal(a, b) for a, b in zip(trainer.model.state_dict().values(), start.state_dict().values(), strict=True)
    )
    result = trainer.train()
    assert result.steps == 8 and Tokenizer.from_name(str(result.best_checkpoint)).kind == "byte"


# ----- the command line, signals, several processes -----


def _train_command(tmp_path: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        str(ROOT / "training" / "train.py"),
        *("--dataset", "shakespeare", "--tokenizer", "byte", "--preset", "tiny", "--block-size", "32"),
        *("--warmup-steps", "2", "--eval-batches", "2", "--log-every", "1", "--no-progress", "--device", "cpu"),
        *("--output-dir", str(tmp_path / "run"), "--data-cache", str(tmp_path / "cache")),
        *extra,
    ]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def test_sigint_saves_a_resumable_checkpoint_and_exits_cleanly(tmp_path: Path) -> None:
    command = _train_command(tmp_path, "--batch-size", "4", "--max-steps", "100000", "--eval-every", "100000")
    proc = subprocess.Popen(command, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not log.exists() or len(log.read_text().splitlines()) < 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output
    assert "continue with --resume" in output
    saved = step_checkpoints(tmp_path / "run")
    assert len(saved) == 1 and (saved[0] / TRAINING_STATE_DIR / "trainer_state.json").exists()
    steps = int(saved[0].name.split("-")[1])
    resumed = subprocess.run(
        [*command[:-4], "--eval-every", "100", "--max-steps", str(steps + 2), "--resume"],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert f"{steps + 2} steps" in resumed.stdout
    assert [r["step"] for r in metrics(tmp_path / "run") if "loss" in r][-3:] == [steps, steps + 1, steps + 2]


# A training run whose os.rename hangs at the `nth` rename of a folder whose name starts with `prefix`: a save made
# slow on purpose, in the middle, for the test to kill it there. It touches `marker` when it hangs.
HANGING_RUN = """
import os, runpy, sys, time
prefix, nth, marker, script = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
rename, seen = os.rename, 0
def slow_rename(src, dst):
    global seen
    if os.path.basename(src).startswith(prefix):
        seen += 1
        if seen == nth:
            open(marker, "w").close()
            time.sleep(600)
    return rename(src, dst)
os.rename = slow_rename
sys.argv = sys.argv[4:]
runpy.run_path(script, run_name="__main__")
"""


def test_a_run_killed_during_a_save_leaves_nothing_behind_once_resumed(tmp_path: Path) -> None:
    settings = ("--batch-size", "4", "--max-steps", "8", "--eval-every", "2", "--save-every", "2", "--keep-last", "2")
    straight = subprocess.run(_train_command(tmp_path / "straight", *settings), env=_env(), capture_output=True)
    assert straight.returncode == 0, straight.stderr
    expected = losses(tmp_path / "straight" / "run")
    # A kill while step 6 is assembled (its staged folder complete, not yet renamed into place), and one while the
    # best model of step 4 is written (its temporary folder complete, the older best/ still in place).
    for prefix, nth, leftover in [(".step-", 3, ".step-000006.tmp"), (".best.tmp-", 2, ".best.tmp-")]:
        out, marker = tmp_path / prefix.strip("."), tmp_path / f"{prefix}hanging"
        command = _train_command(out, *settings)
        hanging = [sys.executable, "-c", HANGING_RUN, prefix, str(nth), str(marker), *command[1:]]
        proc = subprocess.Popen(hanging, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while not marker.exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.1)
        assert marker.exists(), f"the run never reached the {prefix} save"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        run = out / "run"
        assert any(p.name.startswith(leftover) for p in run.iterdir())  # what the kill left

        resumed = subprocess.run([*command, "--resume"], env=_env(), capture_output=True, text=True, timeout=300)
        assert resumed.returncode == 0, resumed.stderr
        assert "removed what interrupted saves left" in resumed.stderr
        assert sorted(p.name for p in run.iterdir()) == ["best", "metrics.jsonl", "step-000006", "step-000008"]
        assert losses(run) == expected, prefix  # the same losses as the uninterrupted run


def test_the_quality_benchmark_trains_recipes_side_by_side_and_reports_bits_per_byte(tmp_path: Path) -> None:
    text = "".join(
        f"{'ROMEO' if i % 2 else 'JULIET'}:\nline {i} of a small play, spoken softly.\n\n" for i in range(600)
    )
    (tmp_path / "input.txt").write_text(text)
    (tmp_path / "short.yaml").write_text("preset: tiny\nn_layer: 1\ntokenizer: byte\nblock_size: 32\nmax_time: 2\n")
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "bench_quality.py"),
            str(tmp_path / "input.txt"),
            *("--recipe", "cpu-2min max_time=1", "--recipe", f"{tmp_path / 'short.yaml'} optimizer=muon"),
            *("--reference", "--repeats", "2", "--vocab-size", "300", "--data-cache", str(tmp_path / "cache")),
        ],
        env={**_env(), "AKSIS_CACHE": str(tmp_path / "cache")},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in done.stdout.splitlines() if line.startswith("| ")]
    assert rows[0][:6] == ["run", "budget s", "steps", "tokens", "tokens/s", "val bpb"]
    published = 1.88 / math.log(2)
    assert rows[1][0] == "nanoGPT CPU recipe, published" and float(rows[1][5]) == pytest.approx(published, abs=1e-3)
    # The reference at each budget, then the recipes of that budget, shortest budget first.
    names = [(row[0], row[1]) for row in rows[2:]]
    assert names == [
        ("nanoGPT CPU recipe, through aksis", "1"),
        ("aksis cpu-2min max_time=1", "1"),
        ("nanoGPT CPU recipe, through aksis", "2"),
        ("aksis short optimizer=muon", "2"),
    ]
    by_name = {name: row for name, row in zip(names, rows[2:], strict=True)}
    for (_, budget), row in by_name.items():
        steps, bpb, spread = int(row[2].replace(",", "")), float(row[5]), row[6]
        low, high = (float(x) for x in spread.split("-"))
        assert steps >= 1 and 0 < low <= bpb <= high < 10  # the median of two runs lies in their spread
        assert float(row[7].rstrip("x")) == pytest.approx(bpb / published, abs=0.006)
        reference = by_name[("nanoGPT CPU recipe, through aksis", budget)]
        assert float(row[8].rstrip("x")) == pytest.approx(bpb / float(reference[5]), abs=0.006)
    assert "bpe (300 tokens)" in done.stdout and "byte (260 tokens)" in done.stdout
    bench = [sys.executable, str(ROOT / "benchmarks" / "bench_quality.py"), str(tmp_path / "input.txt")]
    for spec, message in [("no-such-recipe", "cannot read the config file"), ("cpu-2min lr", "'lr' is not key=value")]:
        bad = subprocess.run([*bench, "--recipe", spec], env=_env(), capture_output=True, text=True)
        assert bad.returncode != 0 and f"recipe {spec!r}" in bad.stderr and message in bad.stderr
        assert "Traceback" not in bad.stderr
    for spec, message in [("  ", "a --recipe is empty"), ("cpu-2min lr=[", "the value of 'lr' is not a YAML value")]:
        bad = subprocess.run([*bench, "--recipe", spec], env=_env(), capture_output=True, text=True)
        assert bad.returncode != 0 and message in bad.stderr and "Traceback" not in bad.stderr


def test_an_interrupted_quality_benchmark_stops_instead_of_scoring_a_cut_run(tmp_path: Path) -> None:
    # The trainer turns Ctrl-C (and SIGTERM) into a clean stop with a checkpoint; the benchmark must then stop too,
    # not go on to its next run and report the cut one as if it had trained for its budget.
    (tmp_path / "input.txt").write_text("ROMEO:\nA line of a small play, spoken softly.\n\n" * 400)
    (tmp_path / "long.yaml").write_text("preset: tiny\nn_layer: 1\ntokenizer: byte\nblock_size: 32\nmax_time: 60\n")
    bench = subprocess.Popen(
        [
            *(sys.executable, str(ROOT / "benchmarks" / "bench_quality.py"), str(tmp_path / "input.txt")),
            *("--recipe", str(tmp_path / "long.yaml"), "--repeats", "2", "--data-cache", str(tmp_path / "cache")),
        ],
        env={**_env(), "AKSIS_CACHE": str(tmp_path / "cache")},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert bench.stdout is not None
    for line in bench.stdout:  # printed just before the run starts, and with it the trainer's signal handler
        if "training for 60 s" in line:
            break
    time.sleep(2)
    bench.send_signal(signal.SIGINT)
    out, err = bench.communicate(timeout=60)
    assert bench.returncode == 1 and "interrupted after" in err and "without a table" in err
    assert "Traceback" not in err and "| run" not in out and "training for" not in out  # no second run, no table


def test_cli_errors_are_one_line(tmp_path: Path) -> None:
    done = subprocess.run(
        _train_command(tmp_path, "--dataset", "no_such_corpus"), env=_env(), capture_output=True, text=True
    )
    assert done.returncode == 2
    assert "error: unknown dataset 'no_such_corpus'" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_two_processes_match_one_through_accelerate_launch(tmp_path: Path, optimizer: str) -> None:
    """`accelerate launch --multi_gpu --num_processes 2` on CPU runs two gloo processes (MULTI_CPU): per-process
    batch B/2 must give the losses of one process with batch B, and only the main process writes. Muon too: each
    process orthogonalises the same averaged gradient."""
    settings = ("--max-steps", "6", "--eval-every", "3", "--seed", "7", "--optimizer", optimizer)
    single = subprocess.run(
        _train_command(tmp_path / "one", "--batch-size", "8", *settings),
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert single.returncode == 0, single.stderr
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]
    double = subprocess.run(
        [*launch, *_train_command(tmp_path / "two", "--batch-size", "4", *settings)[1:]],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert double.returncode == 0, double.stderr
    assert "2 processes, MULTI_CPU" in double.stderr
    one, two = losses(tmp_path / "one" / "run"), losses(tmp_path / "two" / "run")
    assert len(one) == len(two) == 6  # each step logged once: only the main process writes metrics
    assert max(abs(a - b) for a, b in zip(one, two, strict=True)) < TOLERANCE[optimizer]
    saved = step_checkpoints(tmp_path / "two" / "run")
    assert [p.name for p in saved] == ["step-000003", "step-000006"]
    state = saved[-1] / TRAINING_STATE_DIR
    assert {p.name for p in state.iterdir()} == {  # each process its random state; no pickle
        "optimizer.json", "optimizer.safetensors", "scheduler.json", "trainer_state.json",
        "rng-0.json", "rng-0.safetensors", "rng-1.json", "rng-1.safetensors",
    }  # fmt: skip
    assert not list((tmp_path / "two" / "run").glob(".*tmp*"))  # no leftovers of concurrent writers
    load_gpt(tmp_path / "two" / "run" / BEST_DIR)


def test_processes_read_disjoint_data(tmp_path: Path) -> None:
    """The trainer's own data loaders (packed and streamed) under `accelerate launch`: each process records the
    blocks it reads."""
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import json, sys\n"
        "from aksis.config import TrainConfig\n"
        "from aksis.trainer import Trainer\n"
        "config = TrainConfig(tokenizer='byte', preset='tiny', block_size=32, batch_size=4, max_steps=5,\n"
        f"    output_dir={str(tmp_path / 'run')!r}, data_cache={str(tmp_path / 'cache')!r}, device='cpu')\n"
        "for name, streaming in (('packed', False), ('streamed', True)):\n"
        "    config.streaming, config.output_dir = streaming, config.output_dir + name\n"
        "    trainer = Trainer(config)\n"
        "    seen = [b[:, :8].tolist() for b, _ in zip(trainer._batches(), range(5))]\n"
        "    out = f'{sys.argv[1]}/{name}{trainer.accelerator.process_index}.json'\n"
        "    json.dump(seen, open(out, 'w'))\n"
    )
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]
    done = subprocess.run([*launch, str(probe), str(tmp_path)], env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    for name in ("packed", "streamed"):
        ranks = [json.loads((tmp_path / f"{name}{r}.json").read_text()) for r in (0, 1)]
        blocks = [{tuple(row) for batch in seen for row in batch} for seen in ranks]
        assert len(blocks[0]) == len(blocks[1]) == 20 and not blocks[0] & blocks[1], name


def test_bf16_autocast_runs_on_cpu_after_an_fp32_run_in_the_same_process(tmp_path: Path) -> None:
    train(run_config(tmp_path / "fp32", max_steps=2))
    result = train(run_config(tmp_path / "bf16", max_steps=2, mixed_precision="bf16"))
    assert result.steps == 2 and all(math.isfinite(x) for x in losses(tmp_path / "bf16" / "run"))
    with pytest.raises(TrainingError, match="fp16 needs a CUDA GPU"):
        Trainer(run_config(tmp_path / "fp16", mixed_precision="fp16"))


MISSING_TRACKERS = [m for m in ("wandb", "trackio") if importlib.util.find_spec(m) is None]


def test_a_missing_tracker_package_is_named(tmp_path: Path) -> None:
    with pytest.raises(TrainingError, match="pip install no_such_tracker"):
        _require_tracker("no_such_tracker")
    for tracker in MISSING_TRACKERS:  # the trackers not installed here fail the same way through the trainer
        with pytest.raises(TrainingError, match=f"pip install {tracker}"):
            Trainer(run_config(tmp_path, report_to=tracker))


def test_metrics_also_go_to_tensorboard(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(run_config(tmp_path, max_steps=4, eval_every=2, report_to="tensorboard"))
    events = list((tmp_path / "run").rglob("events.out.tfevents.*"))
    assert events
    accumulator = EventAccumulator(str(events[0].parent))
    accumulator.Reload()
    assert {"loss", "lr", "val_loss"} <= set(accumulator.Tags()["scalars"])
    assert [e.step for e in accumulator.Scalars("loss")] == [1, 2, 3, 4]


def test_compiled_training_matches_eager(tmp_path: Path) -> None:
    # torch.compile on a CPU generates C++: it needs a compiler (.ci/run installs g++ where it is missing).
    train(run_config(tmp_path / "eager", max_steps=4, eval_every=4))
    train(run_config(tmp_path / "compiled", max_steps=4, eval_every=4, compile=True))
    eager, compiled = losses(tmp_path / "eager" / "run"), losses(tmp_path / "compiled" / "run")
    assert len(eager) == 4 and max(abs(a - b) for a, b in zip(eager, compiled, strict=True)) < 1e-4
    load_gpt(tmp_path / "compiled" / "run" / BEST_DIR)  # saved without torch.compile's wrapper


# ----- chat fine-tuning (--data-format chat) -----

CONVERSATION = [
    Message("system", "Speak in verse."),
    Message("user", "Who goes there?"),
    Message("assistant", "Nay, answer me."),
    Message("user", "Long live the king!"),
    Message("assistant", "Bernardo?"),
]


@pytest.fixture(scope="module")
def text_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny byte-level text model to fine-tune on conversations (a couple of steps is enough)."""
    folder = tmp_path_factory.mktemp("text")
    train(run_config(folder, max_steps=2, eval_every=2))
    return folder / "run" / BEST_DIR


def test_chat_training_and_evaluation_use_only_the_assistant_tokens(tmp_path: Path, text_checkpoint: Path) -> None:
    config = run_config(
        tmp_path, dataset="shakespeare-chat", data_format="chat", init_from=str(text_checkpoint), max_steps=2
    )
    trainer = Trainer(config)
    first_batch = torch.stack([trainer.data.train[i] for i in list(trainer.sampler or [])[: config.batch_size]])
    assert first_batch.shape == (config.batch_size, 2, 33)

    def assistant_only(model: torch.nn.Module, blocks: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Sum of the loss over the trained targets, and their number, computed position by position."""
        logits, _ = model(blocks[:, 0, :-1])
        targets = blocks[:, 1, 1:]
        keep = targets != IGNORE_INDEX
        return F.cross_entropy(logits[keep], targets[keep], reduction="sum"), int(keep.sum())

    with torch.no_grad():
        total, count = assistant_only(trainer.model, first_batch)
    trainer.train()
    assert abs(losses(tmp_path / "run")[0] - total.item() / count) < 1e-5  # step 1 trained on the replies only

    blocks = [trainer.data.validation[i] for i in range(config.eval_batches * config.batch_size)]
    with torch.no_grad():
        pooled = [assistant_only(trainer.model, b[None]) for b in blocks]
    expected = sum(t.item() for t, _ in pooled) / sum(n for _, n in pooled)  # per trained token, not per block
    assert len({n for _, n in pooled}) > 1  # blocks hold different numbers of reply tokens: the two means differ
    assert abs(trainer.evaluate() - expected) < 1e-5


def test_train_model_with_data_format_chat_fine_tunes_a_checkpoint(
    tmp_path: Path, text_checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from aksis.cli import main

    run = tmp_path / "chat"
    flags = ["train-model", "--data-format", "chat", "--init-from", str(text_checkpoint), "--block-size", "32"]
    flags += [
        "--batch-size",
        "4",
        "--max-steps",
        "4",
        "--eval-every",
        "2",
        "--eval-batches",
        "2",
        "--warmup-steps",
        "1",
    ]
    flags += ["--output-dir", str(run), "--data-cache", str(tmp_path / "cache"), "--no-progress", "--device", "cpu"]
    assert main(flags) == 0  # --dataset defaults to shakespeare: its conversations in chat mode
    assert "4 steps" in capsys.readouterr().out
    records = metrics(run)
    assert [r["step"] for r in records if "val_loss" in r] == [2, 4]
    assert all(math.isfinite(r.get("loss", r.get("val_loss", 0.0))) for r in records)
    state = json.loads((run / "step-000004" / TRAINING_STATE_DIR / TRAINER_STATE_FILE).read_text())
    assert state["train_config"]["data_format"] == "chat"
    tuned = load_gpt(run / BEST_DIR)
    assert tuned.config == load_gpt(text_checkpoint).config
    assert Tokenizer.from_name(str(run / BEST_DIR)).kind == "byte"

    assert main([*flags, "--overwrite", "--streaming"]) == 2
    assert "--streaming cannot be combined with --data-format chat" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--streaming cannot be combined with --data-format chat"):
        TrainConfig(data_format="chat", streaming=True)
