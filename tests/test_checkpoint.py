import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import Hub, tiny_config
from huggingface_hub import HfApi

from aksis.checkpoint import (
    CheckpointError,
    atomic_folder,
    load_generation_config,
    load_gpt,
    load_tokenizer,
    save_checkpoint,
    shown,
)
from aksis.config import GenerationConfig
from aksis.model import GPT
from aksis.tokenizer import Tokenizer


@pytest.fixture
def saved(tmp_path: Path) -> tuple[GPT, Path]:
    """A checkpoint in aksis's own layout (format 1), as every folder was written before aksis wrote transformers'
    layout; the tests of the transformers layout are in test_transformers_format.py."""
    model = GPT(tiny_config("llama", vocab_size=260)).eval()
    folder = tmp_path / "ckpt"
    save_checkpoint(
        model, folder, tokenizer=Tokenizer.byte_level(), generation_config=GenerationConfig(top_k=7), layout="aksis"
    )
    return model, folder


def test_folder_has_the_documented_files(saved: tuple[GPT, Path]) -> None:
    _, folder = saved
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json", "README.md"} <= names
    config = json.loads((folder / "config.json").read_text())
    assert config["format_version"] == 1 and config["arch"] == "llama"
    card = (folder / "README.md").read_text()
    assert "library_name: aksis" in card and "text-generation" in card
    assert not any(name.startswith(".") for name in os.listdir(folder.parent))  # no temp folders left behind


def test_a_model_no_transformers_family_expresses_is_written_in_aksis_layout(tmp_path: Path) -> None:
    model = GPT(tiny_config(vocab_size=260, n_kv_head=2)).eval()  # gpt2 flavour with grouped-query attention
    save_checkpoint(model, tmp_path / "m", tokenizer=Tokenizer.byte_level())
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["format_version"] == 1 and "model_type" not in config
    assert load_gpt(tmp_path / "m").config == model.config


@pytest.mark.parametrize("layout", ["transformers", "aksis"])
def test_round_trip_gives_identical_outputs(arch: str, layout: str, tmp_path: Path) -> None:
    model = GPT(tiny_config(arch, vocab_size=260, dropout=0.1)).eval()
    save_checkpoint(model, tmp_path / "m", tokenizer=Tokenizer.byte_level(), layout=layout)
    loaded = load_gpt(tmp_path / "m")
    assert isinstance(loaded, GPT) and not loaded.training
    assert loaded.config == model.config
    idx = torch.randint(0, 260, (2, 12))
    with torch.no_grad():
        assert torch.equal(loaded(idx)[0], model(idx)[0])
    assert load_tokenizer(tmp_path / "m").encode("hé") == Tokenizer.byte_level().encode("hé")
    assert load_generation_config(tmp_path / "m") == GenerationConfig()


def test_tied_weights_are_stored_once_and_stay_tied(saved: tuple[GPT, Path]) -> None:
    from safetensors import safe_open

    _, folder = saved
    with safe_open(folder / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert len({"lm_head.weight", "transformer.wte.weight"} & keys) == 1
    loaded = load_gpt(folder)
    assert loaded.lm_head.weight is loaded.transformer.wte.weight


def test_load_with_dtype_and_generation_config(saved: tuple[GPT, Path]) -> None:
    _, folder = saved
    loaded = load_gpt(folder, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in loaded.parameters())
    assert load_generation_config(folder).top_k == 7


def test_truncated_weights_name_the_file(saved: tuple[GPT, Path]) -> None:
    _, folder = saved
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="model.safetensors is truncated or corrupt"):
        load_gpt(folder)


def test_missing_config_names_the_file(saved: tuple[GPT, Path]) -> None:
    _, folder = saved
    (folder / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json is missing: a checkpoint folder needs"):
        load_gpt(folder)


def test_corrupt_or_mismatched_config_names_the_file(saved: tuple[GPT, Path]) -> None:
    _, folder = saved
    config_path = folder / "config.json"
    good = json.loads(config_path.read_text())
    config_path.write_text('{"arch": "llama", ')
    with pytest.raises(CheckpointError, match="config.json is not valid JSON"):
        load_gpt(folder)
    config_path.write_text(json.dumps({**good, "n_embd": 96, "n_head": 4}))
    with pytest.raises(CheckpointError, match="model.safetensors does not match config.json.*in the file but"):
        load_gpt(folder)
    config_path.write_text(json.dumps({**good, "arch": "gpt2", "n_kv_head": 4}))
    with pytest.raises(CheckpointError, match="missing tensors: .*c_attn.bias.*unexpected tensors: .*w_gate"):
        load_gpt(folder)
    config_path.write_text(json.dumps({**good, "n_head": 5}))
    with pytest.raises(CheckpointError, match="config.json: invalid ModelConfig: n_embd \\(64\\)"):
        load_gpt(folder)
    config_path.write_text(json.dumps({**good, "format_version": 7}))
    with pytest.raises(CheckpointError, match="format_version 7 is newer"):
        load_gpt(folder)


def test_a_config_asking_for_more_than_its_weights_is_refused_before_anything_is_allocated(
    saved: tuple[GPT, Path],
) -> None:
    """The config drives the allocation, so it is checked against the weights file's header on the meta device: a
    vocabulary of 2**40 (terabytes) or 20,000 layers is refused at once, without memory."""
    _, folder = saved
    config_path = folder / "config.json"
    good = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**good, "vocab_size": 2**40}))
    with pytest.raises(CheckpointError, match=r"transformer.wte.weight is \(260, 64\) in the file but \(1099511627776"):
        load_gpt(folder)
    config_path.write_text(json.dumps({**good, "n_layer": 20_000}))
    with pytest.raises(CheckpointError, match="holds 2 layers but config.json beside it asks for 20000"):
        load_gpt(folder)


def test_a_model_over_the_memory_bound_is_refused(saved: tuple[GPT, Path]) -> None:
    model, folder = saved
    size = sum(p.numel() for p in model.parameters()) * 4
    assert load_gpt(folder, max_bytes=size).config == model.config
    with pytest.raises(CheckpointError, match=r"makes a model of .* MiB, more than the 0 MiB allowed"):
        load_gpt(folder, max_bytes=size - 1)


def test_errors_name_a_hub_file_by_repo_never_by_its_place_in_the_cache() -> None:
    cached = Path("/srv/hf/hub/models--evil--bomb/snapshots/0123abcd/sub/config.json")
    assert shown(cached) == "evil/bomb/sub/config.json"
    assert shown(Path("runs/mine/config.json")) == "runs/mine/config.json"  # a local file as it was given


def test_missing_tokenizer_and_bad_paths_are_clear_errors(saved: tuple[GPT, Path], tmp_path: Path) -> None:
    _, folder = saved
    (folder / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="tokenizer.json is missing"):
        load_tokenizer(folder)
    with pytest.raises(CheckpointError, match="no checkpoint folder at ./nowhere/at-all"):
        load_gpt("./nowhere/at-all")
    with pytest.raises(CheckpointError, match="is a file"):
        load_gpt(folder / "config.json")


def test_never_unpickles_a_pytorch_bin(tmp_path: Path) -> None:
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(tiny_config().to_dict()))
    torch.save(GPT(tiny_config()).state_dict(), folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="model.safetensors is missing"):
        load_gpt(folder)


def test_hub_ids_without_a_checkpoint_say_what_is_missing(hub: Hub) -> None:
    # The Hub is conftest's local server: only what a test created is there.
    with pytest.raises(CheckpointError, match=f"no model repo {hub.user}/never-pushed on the Hub, or it is private"):
        load_gpt(f"{hub.user}/never-pushed")
    empty = HfApi(endpoint=hub.endpoint, token=hub.write_token).create_repo(hub.fresh_repo_id("empty")).repo_id
    with pytest.raises(CheckpointError, match=f"the Hub repo {empty} has no config.json: it is not an aksis"):
        load_gpt(empty)


def test_offline_hub_id_that_is_not_cached_says_so(hub: Hub, tmp_path: Path) -> None:
    script = "from aksis.checkpoint import load_gpt; load_gpt('someone/not-cached')"
    env = hub.subprocess_env(tmp_path, offline=True)  # HF_HUB_OFFLINE=1 and an empty HF_HOME
    start = len(hub.requests)
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert (
        "CheckpointError: config.json of someone/not-cached is not in the local Hub cache and the Hub cannot be "
        "reached (offline, or HF_HUB_OFFLINE is set) (there is no local folder named someone/not-cached either)"
    ) in result.stderr, result.stderr
    assert not [r for r in hub.requests[start:] if "not-cached" in r.path]  # offline: not even a try


def test_interrupted_save_keeps_the_previous_checkpoint(saved: tuple[GPT, Path]) -> None:
    _, folder = saved
    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    class Interrupted(Exception):
        pass

    with pytest.raises(Interrupted), atomic_folder(folder) as tmp:
        (tmp / "model.safetensors").write_bytes(b"half")
        raise Interrupted
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert sorted(os.listdir(folder.parent)) == ["ckpt"]


def test_save_replaces_an_old_checkpoint_but_never_a_foreign_folder(saved: tuple[GPT, Path], tmp_path: Path) -> None:
    _, folder = saved
    other = GPT(tiny_config(vocab_size=260)).eval()
    save_checkpoint(other, folder, tokenizer=Tokenizer.byte_level())  # overwrite: fine, it is a checkpoint
    assert load_gpt(folder).config.arch == "gpt2"
    foreign = tmp_path / "my-notes"
    foreign.mkdir()
    (foreign / "thesis.txt").write_text("precious")
    with pytest.raises(CheckpointError, match="non-empty folder that is not a checkpoint; refusing"):
        save_checkpoint(other, foreign)
    assert (foreign / "thesis.txt").read_text() == "precious"


def test_tokenizer_larger_than_the_model_vocab_is_refused(tmp_path: Path) -> None:
    model = GPT(tiny_config(vocab_size=100))
    with pytest.raises(CheckpointError, match="tokenizer has 260 tokens but the model only 100"):
        save_checkpoint(model, tmp_path / "m", tokenizer=Tokenizer.byte_level())
    assert not (tmp_path / "m").exists()


def test_the_same_model_saved_twice_is_the_same_bytes(tmp_path: Path) -> None:
    """Each save in a process of its own (string hashing, and the map safetensors writes its metadata from, differ
    from process to process): every file of the folder has the same bytes, so pushing it again changes nothing."""
    code = (
        "import sys, torch\n"
        "from aksis.checkpoint import save_checkpoint\n"
        "from aksis.config import ModelConfig\n"
        "from aksis.model import GPT\n"
        "from aksis.tokenizer import Tokenizer\n"
        "torch.manual_seed(0)\n"
        "model = GPT(ModelConfig.from_preset('tiny', vocab_size=260))  # tied embeddings: one tensor, two names\n"
        "save_checkpoint(model, sys.argv[1], tokenizer=Tokenizer.byte_level())\n"
    )
    hashes = []
    for run in range(4):  # the old save made two orders of its metadata, half the time each
        subprocess.run([sys.executable, "-c", code, str(tmp_path / f"m{run}")], check=True, timeout=120)
        files = sorted((tmp_path / f"m{run}").iterdir())
        hashes.append({p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files})
    assert all(h == hashes[0] for h in hashes) and "model.safetensors" in hashes[0]
