"""No setting that does nothing: for every field of TrainConfig (read from the dataclass, so a new field fails here
until it has a check), a run with that field changed differs from a run with the defaults where the field says it
should (the data split, the model, the optimizer, the schedule, the run folder, the Hub repo...). `--val-split` was
accepted, validated and documented while the trainer never passed it on: this is the test that would have caught it.

Most checks build a Trainer (data, model, optimizer, schedule: no training); the rest train a few steps of the tiny
preset. The Hub is conftest's local server."""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import Hub
from huggingface_hub import HfApi

from aksis.blocks import StreamingBlocks
from aksis.checkpoint import BEST_DIR, load_gpt
from aksis.config import TrainConfig
from aksis.hub import TRAINING_STATE_BRANCH
from aksis.runs import TRAINING_STATE_DIR, read_metrics, step_checkpoints
from aksis.trainer import Trainer, TrainingError, train

TEXT = "".join(f"line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(400))  # ~22 KB


def base(tmp_path: Path, **overrides: Any) -> TrainConfig:
    """A run of the tiny preset on a small local text: a second or two."""
    corpus = tmp_path / "corpus.txt"
    if not corpus.exists():
        tmp_path.mkdir(parents=True, exist_ok=True)
        corpus.write_text(TEXT)
    settings: dict[str, Any] = dict(
        dataset=str(corpus),
        tokenizer="byte",
        preset="tiny",
        n_layer=1,
        block_size=32,
        batch_size=4,
        max_steps=4,
        eval_every=100,
        eval_batches=2,
        log_every=1,
        warmup_steps=2,
        learning_rate=3e-3,
        progress=False,
        output_dir=str(tmp_path / "run"),
        data_cache=str(tmp_path / "cache"),
    )
    settings.update(overrides)
    return TrainConfig(**settings)


def trainers(tmp_path: Path, **changed: Any) -> tuple[Trainer, Trainer]:
    """Trainers of the base run and of the base run with `changed`, in folders of their own."""
    return Trainer(base(tmp_path / "a")), Trainer(base(tmp_path / "b", **changed))


def group(trainer: Trainer, index: int = 0) -> dict[str, Any]:
    return trainer.optimizer.param_groups[index]  # type: ignore[no-any-return]


# ----- data -----


def check_dataset(tmp_path: Path) -> None:
    other = tmp_path / "other.txt"
    other.write_text("a much shorter text, repeated.\n" * 40)
    a, b = trainers(tmp_path, dataset=str(other))
    assert b.data.train_tokens is not None and a.data.train_tokens is not None
    assert b.data.train_tokens < a.data.train_tokens


def check_data_format(tmp_path: Path) -> None:
    chat = tmp_path / "chat.jsonl"
    turns = [
        [{"role": "user", "content": f"say {i}"}, {"role": "assistant", "content": f"{i} said."}] for i in range(60)
    ]
    chat.write_text("".join(json.dumps({"messages": t}) + "\n" for t in turns))
    a, b = trainers(tmp_path, dataset=str(chat), data_format="chat")
    assert a.data.train.labels is None and b.data.train.labels is not None  # type: ignore[union-attr]


def check_text_column(tmp_path: Path) -> None:
    records = tmp_path / "records.jsonl"
    rows = [{"text": "x" * 50, "body": TEXT[i * 300 : (i + 1) * 300]} for i in range(20)]
    records.write_text("".join(json.dumps(row) + "\n" for row in rows))
    a = Trainer(base(tmp_path / "a", dataset=str(records)))
    b = Trainer(base(tmp_path / "b", dataset=str(records), text_column="body"))
    assert a.data.train_tokens != b.data.train_tokens  # the body column, not the text one


def documents(tmp_path: Path) -> str:
    """The base text as 40 documents of a .jsonl file (a stream and tokenizing processes share out documents)."""
    path = tmp_path / "documents.jsonl"
    tmp_path.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": TEXT[i * 550 : (i + 1) * 550]}) + "\n" for i in range(40)))
    return str(path)


def check_streaming(tmp_path: Path) -> None:
    a, b = trainers(tmp_path, dataset=documents(tmp_path), streaming=True)
    assert not isinstance(a.data.train, StreamingBlocks) and isinstance(b.data.train, StreamingBlocks)


def check_tokenizer(tmp_path: Path) -> None:
    a, b = trainers(tmp_path, tokenizer="bpe", vocab_size=300)
    assert a.tokenizer.name == "byte" and b.tokenizer.name.startswith("bpe") and b.tokenizer.vocab_size == 300


def check_vocab_size(tmp_path: Path) -> None:
    a = Trainer(base(tmp_path / "a", tokenizer="bpe", vocab_size=300))
    b = Trainer(base(tmp_path / "b", tokenizer="bpe", vocab_size=280))
    assert (a.tokenizer.vocab_size, b.tokenizer.vocab_size) == (300, 280)
    assert b.model_config.vocab_size == 280


def check_val_fraction(tmp_path: Path) -> None:
    a, b = trainers(tmp_path, val_fraction=0.2)
    assert len(b.data.validation) > len(a.data.validation)


def check_val_split(tmp_path: Path) -> None:
    a, b = trainers(tmp_path, val_fraction=0.1, val_split="tail")
    tail = math.floor(len(TEXT) * 0.9) + 1  # the first 90% of the characters (bytes here) and the end-of-text token
    assert b.data.train_tokens == tail and a.data.train_tokens != tail


def check_stride(tmp_path: Path) -> None:
    a, b = trainers(tmp_path, stride=8)
    assert len(b.data.train) > 3 * len(a.data.train)  # a window every 8 tokens instead of every 32


def check_num_proc(tmp_path: Path) -> None:
    Trainer(base(tmp_path / "a", dataset=documents(tmp_path), num_proc=2))
    # datasets writes one cache file per tokenizing process
    assert list((tmp_path / "a" / "cache").rglob("*_00001_of_00002.arrow"))


def check_data_cache(tmp_path: Path) -> None:
    Trainer(base(tmp_path / "a", data_cache=str(tmp_path / "elsewhere")))
    assert list((tmp_path / "elsewhere").rglob("*.arrow")) and not (tmp_path / "a" / "cache").exists()


# ----- model -----


def model_check(field: str, value: Any, **extra: Any) -> Callable[[Path], None]:
    def check(tmp_path: Path) -> None:
        a, b = trainers(tmp_path, **{field: value}, **extra)
        assert getattr(b.model_config, field) == value != getattr(a.model_config, field)

    return check


def check_preset(tmp_path: Path) -> None:
    a = Trainer(base(tmp_path / "a", n_layer=None))
    b = Trainer(base(tmp_path / "b", n_layer=None, preset="small"))
    assert a.model_config.n_embd != b.model_config.n_embd and b.model.num_params() > a.model.num_params()


def check_init_from(tmp_path: Path) -> None:
    first = train(base(tmp_path / "first", max_steps=2))
    assert first.best_checkpoint is not None
    b = Trainer(base(tmp_path / "b", init_from=str(first.best_checkpoint), n_layer=None))
    start = load_gpt(first.best_checkpoint)
    assert all(
        torch.equal(x, y) for x, y in zip(start.state_dict().values(), b.model.state_dict().values(), strict=True)
    )


# ----- optimisation -----


def check_epochs(tmp_path: Path) -> None:
    a, b = trainers(tmp_path, max_steps=None, epochs=3)
    b1 = Trainer(base(tmp_path / "c", max_steps=None, epochs=1))
    assert a.total_steps == 4 and b.total_steps == 3 * b1.total_steps  # type: ignore[operator]


def check_max_steps(tmp_path: Path) -> None:
    a, b = trainers(tmp_path, max_steps=7)
    assert (a.total_steps, b.total_steps) == (4, 7)


def check_max_tokens(tmp_path: Path) -> None:
    a, b = trainers(tmp_path, max_steps=None, max_tokens=3 * 4 * 32)
    assert b.total_steps == 3 and a.total_steps != 3


def check_max_time(tmp_path: Path) -> None:
    result = train(base(tmp_path, max_steps=None, epochs=10_000, max_time=1.0))
    assert result.stopped == "max_time"


def check_batch_size(tmp_path: Path) -> None:
    a, b = trainers(tmp_path, batch_size=2)
    assert (a.tokens_per_step, b.tokens_per_step) == (4 * 32, 2 * 32)


def check_grad_accum_steps(tmp_path: Path) -> None:
    a, b = trainers(tmp_path, grad_accum_steps=3)
    assert b.tokens_per_step == 3 * a.tokens_per_step


def check_optimizer(tmp_path: Path) -> None:
    a, b = trainers(tmp_path, optimizer="sgd")
    assert isinstance(a.optimizer.optimizer, torch.optim.AdamW) and isinstance(b.optimizer.optimizer, torch.optim.SGD)  # type: ignore[attr-defined]


def optimizer_check(field: str, value: Any, key: str, index: int | None = None, **extra: Any) -> Callable[[Path], None]:
    """The first param group's `key` (its `index`-th item, for betas) is `value` with the field set, not without."""

    def check(tmp_path: Path) -> None:
        a = Trainer(base(tmp_path / "a", **extra))
        b = Trainer(base(tmp_path / "b", **{field: value}, **extra))
        found, default = group(b)[key], group(a)[key]
        if index is not None:
            found, default = found[index], default[index]
        assert found == value != default

    return check


def check_learning_rate(tmp_path: Path) -> None:
    a, b = trainers(tmp_path, learning_rate=1e-4)
    assert group(b)["initial_lr"] == 1e-4 != group(a)["initial_lr"]


def schedule(trainer: Trainer) -> list[float]:
    return [trainer.scheduler.lr_lambdas[0](step) for step in range(trainer.total_steps or 0)]  # type: ignore[attr-defined]


def check_min_lr_ratio(tmp_path: Path) -> None:
    a, b = trainers(tmp_path, min_lr_ratio=0.5)
    assert schedule(b)[-1] > schedule(a)[-1]


def check_warmup_steps(tmp_path: Path) -> None:
    a, b = trainers(tmp_path, warmup_steps=4)
    assert schedule(a)[0] == pytest.approx(0.5) and schedule(b)[0] == pytest.approx(0.25)


def check_grad_clip(tmp_path: Path) -> None:
    a = train(base(tmp_path / "a", max_steps=2))
    b = train(base(tmp_path / "b", max_steps=2, grad_clip=1e-4))
    assert a.last_checkpoint is not None and b.last_checkpoint is not None
    wa, wb = load_gpt(a.last_checkpoint).state_dict(), load_gpt(b.last_checkpoint).state_dict()
    assert any(not torch.equal(wa[k], wb[k]) for k in wa)


def check_mixed_precision(tmp_path: Path) -> None:
    # accelerate keeps its state in process-wide singletons: each run's is read before the next run starts
    assert Trainer(base(tmp_path / "a")).accelerator.mixed_precision == "no"
    assert Trainer(base(tmp_path / "b", mixed_precision="bf16")).accelerator.mixed_precision == "bf16"


def check_compile(tmp_path: Path) -> None:
    a, b = trainers(tmp_path, compile=True)
    assert not hasattr(a.model, "_orig_mod") and hasattr(b.model, "_orig_mod")  # torch.compile's wrapper


def check_seed(tmp_path: Path) -> None:
    a, b = trainers(tmp_path, seed=7)
    assert not torch.equal(a.model.transformer.wte.weight, b.model.transformer.wte.weight)


def check_device(tmp_path: Path) -> None:
    if torch.cuda.is_available():
        a, b = trainers(tmp_path, device="cpu")
        assert a.accelerator.device.type == "cuda" and b.accelerator.device.type == "cpu"
    else:
        with pytest.raises(TrainingError, match="--device"):
            Trainer(base(tmp_path, device="cuda"))


# ----- evaluation, checkpoints, logging -----


def val_steps(run: Path) -> list[int]:
    return [r["step"] for r in read_metrics(run) if "val_loss" in r]


def check_eval_every(tmp_path: Path) -> None:
    train(base(tmp_path / "a"))
    train(base(tmp_path / "b", eval_every=2))
    assert val_steps(tmp_path / "a" / "run") == [4] and val_steps(tmp_path / "b" / "run") == [2, 4]


def check_eval_batches(tmp_path: Path) -> None:
    a, b = trainers(tmp_path, eval_batches=1)
    assert a.evaluate() != b.evaluate()  # the same model, a smaller sample of the validation blocks


def check_save_every(tmp_path: Path) -> None:
    train(base(tmp_path / "a", max_steps=4, eval_every=4))
    train(base(tmp_path / "b", max_steps=4, eval_every=4, save_every=1, keep_last=10))
    assert len(step_checkpoints(tmp_path / "a" / "run")) == 1 and len(step_checkpoints(tmp_path / "b" / "run")) == 4


def check_keep_last(tmp_path: Path) -> None:
    train(base(tmp_path / "a", save_every=1))
    train(base(tmp_path / "b", save_every=1, keep_last=3))
    assert len(step_checkpoints(tmp_path / "a" / "run")) == 2 and len(step_checkpoints(tmp_path / "b" / "run")) == 3


def check_patience(tmp_path: Path) -> None:
    diverging = dict(max_steps=60, eval_every=2, learning_rate=5.0, grad_clip=0)  # validation loss worsens
    assert train(base(tmp_path / "a", **diverging)).stopped == "max_steps"
    assert train(base(tmp_path / "b", **diverging, patience=2)).stopped == "early stopping"


def check_output_dir(tmp_path: Path) -> None:
    train(base(tmp_path, output_dir=str(tmp_path / "elsewhere")))
    assert (tmp_path / "elsewhere" / BEST_DIR).is_dir() and not (tmp_path / "run").exists()


def check_resume(tmp_path: Path) -> None:
    train(base(tmp_path, save_every=2))
    resumed = Trainer(base(tmp_path, max_steps=6, resume="latest"))
    assert resumed.resume_from == tmp_path / "run" / "step-000004" and resumed.state.step == 4


def check_overwrite(tmp_path: Path) -> None:
    train(base(tmp_path))
    with pytest.raises(TrainingError, match="already holds"):
        Trainer(base(tmp_path))
    Trainer(base(tmp_path, overwrite=True))
    assert not step_checkpoints(tmp_path / "run")  # the earlier run's checkpoints are gone


def check_log_every(tmp_path: Path) -> None:
    train(base(tmp_path, log_every=2))
    assert [r["step"] for r in read_metrics(tmp_path / "run") if "loss" in r] == [1, 2, 4]


def check_report_to(tmp_path: Path) -> None:
    train(base(tmp_path, report_to="tensorboard"))
    assert list((tmp_path / "run").rglob("events.out.tfevents.*"))


def check_progress(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    train(base(tmp_path / "a"))
    quiet = capfd.readouterr().err
    train(base(tmp_path / "b", progress=True))
    shown = capfd.readouterr().err
    assert "4/4" not in quiet and "4/4" in shown  # tqdm's bar, steps done of the run's


# ----- the Hub -----


def pushed(tmp_path: Path, hub: Hub, name: str, **settings: Any) -> tuple[HfApi, str]:
    """A run pushed to a fresh repo of the test Hub; (api, repo id)."""
    repo_id = hub.fresh_repo_id(name)
    train(base(tmp_path / name, push_to_hub=True, hub_model_id=repo_id, save_every=2, **settings))
    return HfApi(endpoint=hub.endpoint, token=hub.write_token), repo_id


def check_push_to_hub(tmp_path: Path, hub: Hub) -> None:
    api, repo_id = pushed(tmp_path, hub, "push")
    assert "model.safetensors" in api.list_repo_files(repo_id)


def check_hub_model_id(tmp_path: Path, hub: Hub) -> None:
    api, repo_id = pushed(tmp_path, hub, "named")
    assert f"# {repo_id.split('/')[-1]}" in card_of(api, repo_id)  # that repo, with this run's card


def check_hub_private(tmp_path: Path, hub: Hub) -> None:
    api, public = pushed(tmp_path, hub, "public")
    _, private = pushed(tmp_path, hub, "private", hub_private=True)
    assert not api.model_info(public).private and api.model_info(private).private


def card_of(api: HfApi, repo_id: str) -> str:
    return Path(api.hf_hub_download(repo_id, "README.md")).read_text()


def check_hub_license(tmp_path: Path, hub: Hub) -> None:
    api, repo_id = pushed(tmp_path, hub, "licensed", hub_license="apache-2.0")
    assert "license: apache-2.0" in card_of(api, repo_id)


def step_tags(api: HfApi, repo_id: str) -> set[str]:
    return {t.name for t in api.list_repo_refs(repo_id).tags}


def check_push_every(tmp_path: Path, hub: Hub) -> None:
    api, every_save = pushed(tmp_path, hub, "every-save")
    _, every_four = pushed(tmp_path, hub, "every-four", push_every=4)
    assert step_tags(api, every_save) == {"step-2", "step-4"} and step_tags(api, every_four) == {"step-4"}


def check_push_training_state(tmp_path: Path, hub: Hub) -> None:
    api, without = pushed(tmp_path, hub, "without-state")
    _, with_state = pushed(tmp_path, hub, "with-state", push_training_state=True)
    branches = {b.name for b in api.list_repo_refs(without).branches}
    assert TRAINING_STATE_BRANCH not in branches
    state = f"{TRAINING_STATE_DIR}/trainer_state.json"
    assert state in api.list_repo_files(with_state, revision=TRAINING_STATE_BRANCH)  # resumable with --resume


CHECKS: dict[str, Callable[..., None]] = {
    "dataset": check_dataset,
    "data_format": check_data_format,
    "text_column": check_text_column,
    "streaming": check_streaming,
    "tokenizer": check_tokenizer,
    "vocab_size": check_vocab_size,
    "val_fraction": check_val_fraction,
    "val_split": check_val_split,
    "stride": check_stride,
    "num_proc": check_num_proc,
    "data_cache": check_data_cache,
    "preset": check_preset,
    "arch": model_check("arch", "llama"),
    "block_size": model_check("block_size", 16),
    "n_layer": model_check("n_layer", 2),
    "n_embd": model_check("n_embd", 32),
    "n_head": model_check("n_head", 2),
    "d_ff": model_check("d_ff", 96),
    "dropout": model_check("dropout", 0.25),
    "init_from": check_init_from,
    "epochs": check_epochs,
    "max_steps": check_max_steps,
    "max_tokens": check_max_tokens,
    "max_time": check_max_time,
    "batch_size": check_batch_size,
    "grad_accum_steps": check_grad_accum_steps,
    "optimizer": check_optimizer,
    "learning_rate": check_learning_rate,
    "min_lr_ratio": check_min_lr_ratio,
    "warmup_steps": check_warmup_steps,
    "weight_decay": optimizer_check("weight_decay", 0.3, "weight_decay"),
    "beta1": optimizer_check("beta1", 0.5, "betas", 0),
    "beta2": optimizer_check("beta2", 0.5, "betas", 1),
    "momentum": optimizer_check("momentum", 0.5, "momentum", optimizer="sgd"),
    "muon_lr": optimizer_check("muon_lr", 0.05, "initial_lr", optimizer="muon"),
    "muon_momentum": optimizer_check("muon_momentum", 0.5, "momentum", optimizer="muon"),
    "muon_weight_decay": optimizer_check("muon_weight_decay", 0.1, "weight_decay", optimizer="muon"),
    "grad_clip": check_grad_clip,
    "mixed_precision": check_mixed_precision,
    "compile": check_compile,
    "seed": check_seed,
    "device": check_device,
    "eval_every": check_eval_every,
    "eval_batches": check_eval_batches,
    "save_every": check_save_every,
    "keep_last": check_keep_last,
    "patience": check_patience,
    "output_dir": check_output_dir,
    "resume": check_resume,
    "overwrite": check_overwrite,
    "log_every": check_log_every,
    "report_to": check_report_to,
    "progress": check_progress,
    "push_to_hub": check_push_to_hub,
    "hub_model_id": check_hub_model_id,
    "hub_private": check_hub_private,
    "hub_license": check_hub_license,
    "push_every": check_push_every,
    "push_training_state": check_push_training_state,
}


def test_every_setting_has_a_check() -> None:
    assert list(CHECKS) == [f.name for f in dataclasses.fields(TrainConfig)]


@pytest.mark.parametrize("field", [f.name for f in dataclasses.fields(TrainConfig)])
def test_each_setting_changes_what_it_should(
    field: str, tmp_path: Path, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    check = CHECKS.get(field)
    if check is None:
        pytest.fail(f"TrainConfig.{field} has no check in CHECKS: say what setting it changes")
    fixtures = [name for name in inspect.signature(check).parameters if name != "tmp_path"]
    if "hub" in fixtures:
        monkeypatch.setenv("HF_TOKEN", request.getfixturevalue("hub").write_token)  # as after `hf auth login`
    check(tmp_path, **{name: request.getfixturevalue(name) for name in fixtures})
