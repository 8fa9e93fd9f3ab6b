"""aksis.card: the model card of a pushed checkpoint, and the public names of what a push says about the run."""

import json
from pathlib import Path
from typing import Any

import torch
import yaml
from conftest import Hub, tiny_config
from huggingface_hub import ModelCard

import aksis
from aksis.card import model_card, plot_loss_curve, public_files
from aksis.checkpoint import save_checkpoint
from aksis.config import TrainConfig
from aksis.model import GPT
from aksis.runs import TRAINER_STATE_FILE, TRAINING_STATE_DIR, public_name, public_settings, read_metrics
from aksis.tokenizer import Tokenizer


def save_tiny(folder: Path, arch: str = "gpt2") -> GPT:
    torch.manual_seed(0)
    model = GPT(tiny_config(arch, vocab_size=260)).eval()
    save_checkpoint(model, folder, tokenizer=Tokenizer.byte_level())
    records = [
        {"step": 1, "tokens": 512, "loss": 5.6, "lr": 1e-3},
        {"step": 2, "tokens": 1024, "loss": 5.2, "lr": 1e-3},
        {"step": 2, "tokens": 1024, "val_loss": 5.3, "val_ppl": 200.3},
    ]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return model


def front_matter(card: str) -> dict[str, Any]:
    assert card.startswith("---\n")
    data: dict[str, Any] = yaml.safe_load(card.split("---\n")[1])
    return data


def test_the_model_card_carries_metadata_architecture_training_results_and_usage(tmp_path: Path) -> None:
    save_tiny(tmp_path, "llama")
    (tmp_path / "eval_results.json").write_text(
        json.dumps(
            {
                "dataset": "karpathy/tiny_shakespeare",
                "split": "test",
                "metrics": {"perplexity": 41.5, "bleu": 0.12, "tokens_scored": 4096, "bytes_scored": 9000},
            }
        )
    )
    train = TrainConfig(dataset="tinystories", learning_rate=3e-4, hub_license=None).to_dict()
    card = model_card(
        tmp_path, "alice/tiny", train_config=train, license="mit", samples=[("Once", " upon")], loss_curve=True
    )
    meta = front_matter(card)
    assert meta["library_name"] == "aksis" and meta["pipeline_tag"] == "text-generation"
    assert "aksis" in meta["tags"] and "llama-style" in meta["tags"]
    assert meta["license"] == "mit" and meta["datasets"] == ["roneneldan/TinyStories"]
    [index] = meta["model-index"]
    metrics = {m["type"]: m["value"] for m in index["results"][0]["metrics"]}
    assert metrics == {"perplexity": 41.5, "bleu": 0.12}  # scores, not how much was scored
    assert index["results"][0]["dataset"]["split"] == "test"
    for text in (
        "LLaMA style",
        "| layers | 2 |",
        "| vocabulary | 260 tokens |",
        "peak learning rate: `0.0003`",
        "best validation loss: 5.3000",
        "![training and validation loss](loss_curve.png)",
        "Once upon",
        "aksis generate-text --checkpoint-path alice/tiny",
        'load_model("alice/tiny")',
        "| perplexity | 41.5 |",
        "4,096 tokens, 9,000 bytes scored",
        f"trained with aksis {aksis.__version__}.",  # the version that wrote the checkpoint
        f"`pip install aksis-{aksis.__version__}-py3-none-any.whl`",
        "`pip install .`",
        'AutoModelForCausalLM.from_pretrained("alice/tiny")',  # a llama-family checkpoint loads in transformers
    ):
        assert text in card, text
    assert "pypi.org" not in card  # aksis has no PyPI page to link to


def test_the_card_passes_the_hub_s_model_card_checks(tmp_path: Path, hub: Hub) -> None:
    """huggingface_hub's ModelCard reads the card's metadata back (model-index as EvalResults) and the Hub (the test
    server, as the Hub validates YAML) accepts it."""
    save_tiny(tmp_path, "llama")
    (tmp_path / "eval_results.json").write_text(
        json.dumps({"dataset": "karpathy/tiny_shakespeare", "split": "test", "metrics": {"perplexity": 41.5}})
    )
    train = TrainConfig(dataset="tiny_shakespeare").to_dict()
    card = ModelCard(model_card(tmp_path, "alice/tiny", train_config=train, license="apache-2.0"))
    card.validate()
    assert card.data.library_name == "aksis" and card.data.license == "apache-2.0"
    assert card.data.datasets == ["karpathy/tiny_shakespeare"] and card.data.model_name == "tiny"
    [result] = card.data.eval_results
    assert (result.metric_type, result.metric_value, result.dataset_type) == (
        "perplexity",
        41.5,
        "karpathy/tiny_shakespeare",
    )
    # A folder that does not say which aksis wrote it (an older one) gets a card that does not guess.
    config = json.loads((tmp_path / "config.json").read_text())
    config["aksis"].pop("version")
    (tmp_path / "config.json").write_text(json.dumps(config))
    plain = model_card(tmp_path, "alice/tiny")
    assert "trained with aksis." in plain and "aksis-VERSION-py3-none-any.whl" in plain
    ModelCard(plain).validate()


def test_the_loss_curve_is_a_png_drawn_from_metrics(tmp_path: Path) -> None:
    save_tiny(tmp_path)
    assert plot_loss_curve(read_metrics(tmp_path), tmp_path / "curve.png")
    assert (tmp_path / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not plot_loss_curve([], tmp_path / "none.png") and not (tmp_path / "none.png").exists()


def test_scores_on_a_dataset_that_is_not_on_the_hub_stay_out_of_model_index(tmp_path: Path) -> None:
    save_tiny(tmp_path)
    record = {"dataset": "shakespeare", "split": "validation", "metrics": {"perplexity": 30.0}}
    (tmp_path / "eval_results.json").write_text(json.dumps(record))
    card = model_card(tmp_path, "alice/tiny")
    assert "model-index" not in front_matter(card)  # model-index names a dataset by its Hub id
    assert "On `shakespeare` (validation split):" in card and "| perplexity | 30 |" in card


def test_local_paths_become_their_base_names_and_places_are_left_out(tmp_path: Path) -> None:
    diary = tmp_path / "private" / "diary.txt"
    diary.parent.mkdir()
    diary.write_text("dear diary")
    assert public_name(str(diary)) == "diary.txt"
    assert public_name(str(tmp_path / "runs" / "first" / "best")) == "first/best"  # a run's checkpoint: with its run
    assert public_name(str(tmp_path / "runs" / "first" / "step-000200")) == "first/step-000200"
    assert public_name(f"{tmp_path}/texts/*.txt") == "*.txt"
    assert public_name("~/corpus.txt") == "corpus.txt"
    for public in ("shakespeare", "tinystories", "karpathy/tiny_shakespeare", "alice/run@step-4", "bpe", "byte"):
        assert public_name(public) == public
    assert public_name("alice/run@refs/pr/1") == "alice/run@refs/pr/1"  # a revision may hold slashes

    settings = TrainConfig(
        dataset=str(diary), init_from=str(tmp_path / "runs" / "first" / "best"), output_dir=str(tmp_path / "out")
    ).to_dict()
    settings["data_cache"], settings["resume"] = str(tmp_path / "cache"), str(tmp_path / "out" / "step-000004")
    public = public_settings(settings)
    assert public["dataset"] == "diary.txt" and public["init_from"] == "first/best"
    assert not {"output_dir", "data_cache", "resume"} & set(public) and str(tmp_path) not in json.dumps(public)
    save_tiny(tmp_path / "ckpt")
    card = model_card(tmp_path / "ckpt", "alice/tiny", train_config=settings)
    assert "- data: `diary.txt`" in card and "- fine-tuned from: `first/best`" in card and str(tmp_path) not in card


def test_a_staged_checkpoint_s_settings_files_name_no_place(tmp_path: Path) -> None:
    save_tiny(tmp_path / "ckpt")
    state = tmp_path / "ckpt" / TRAINING_STATE_DIR / TRAINER_STATE_FILE
    state.parent.mkdir()
    settings = TrainConfig(dataset=str(tmp_path / "texts"), output_dir=str(tmp_path / "run")).to_dict()
    state.write_text(json.dumps({"state": {"step": 4}, "block_size": 32, "train_config": settings}))
    evaluation = {"dataset": str(tmp_path / "held_out.txt"), "split": "validation", "metrics": {"perplexity": 9.0}}
    evaluation["settings"] = {"prompts_file": str(tmp_path / "prompts.jsonl"), "num_samples": 8}
    (tmp_path / "ckpt" / "eval_results.json").write_text(json.dumps(evaluation))
    staged = tmp_path / "staged"
    staged.mkdir()
    for path in (tmp_path / "ckpt").rglob("*"):  # as a push stages it: hard links to the run's own files
        target = staged / path.relative_to(tmp_path / "ckpt")
        target.mkdir(parents=True) if path.is_dir() else target.hardlink_to(path)
    public_files(staged)
    for path in staged.rglob("*.json"):
        assert str(tmp_path) not in path.read_text(), path
    pushed = json.loads((staged / TRAINING_STATE_DIR / TRAINER_STATE_FILE).read_text())
    assert pushed["state"] == {"step": 4} and pushed["train_config"]["dataset"] == "texts"
    assert "output_dir" not in pushed["train_config"]
    results = json.loads((staged / "eval_results.json").read_text())
    assert results["dataset"] == "held_out.txt" and results["settings"] == {
        "prompts_file": "prompts.jsonl",
        "num_samples": 8,
    }
    assert str(tmp_path) in state.read_text()  # the run's own files are untouched: the staged ones were replaced


def test_a_fine_tuned_models_card_names_its_base_and_shows_transformers(tmp_path: Path) -> None:
    base = "HuggingFaceTB/SmolLM2-135M"
    save_checkpoint(
        GPT(tiny_config("llama", vocab_size=260)), tmp_path, tokenizer=Tokenizer.byte_level(), base_model=base
    )
    card = model_card(tmp_path, "alice/smol-mine")
    metadata = yaml.safe_load(card.split("---")[1])
    assert metadata["base_model"] == base and {"transformers", "llama"} <= set(metadata["tags"])
    assert f"fine-tuned from [{base}](https://huggingface.co/{base})" in card
    assert 'AutoModelForCausalLM.from_pretrained("alice/smol-mine")' in card
    old = tmp_path / "old"
    save_checkpoint(GPT(tiny_config("llama", vocab_size=260)), old, tokenizer=Tokenizer.byte_level(), layout="aksis")
    old_card = model_card(old, "alice/old")
    assert "base_model" not in old_card and "AutoModelForCausalLM" not in old_card  # transformers cannot read it
