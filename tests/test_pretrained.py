"""Pretrained transformers models (a SmolLM2-like repo: LLaMA family, byte-level BPE, ChatML template) everywhere a
checkpoint is accepted: load_model from a folder and from the Hub, the CLI's commands."""

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import Hub, write_hf_repo

from aksis.checkpoint import load_model
from aksis.config import GenerationConfig
from aksis.generation import generate
from aksis.hf_tokenizer import HFTokenizer

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def smol(shakespeare_texts: list[str], tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    folder = tmp_path_factory.mktemp("smol")
    return write_hf_repo(folder, shakespeare_texts[:200]), folder


def test_load_model_reads_a_transformers_repo_with_its_tokenizer_and_defaults(smol: tuple[Any, Path]) -> None:
    hf, folder = smol
    model, tokenizer, settings = load_model(folder, device="cpu")
    assert isinstance(tokenizer, HFTokenizer)
    assert tokenizer.eos_ids == [tokenizer.special_id("<|im_end|>")]
    assert (settings.temperature, settings.top_p) == (0.7, 0.9)
    fast = transformers.AutoTokenizer.from_pretrained(folder)
    prompt = "ROMEO: But soft, what light"
    assert tokenizer.encode(prompt) == fast(prompt, add_special_tokens=False).input_ids
    ids = fast(prompt, add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = hf.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    ours = generate(model, tokenizer, prompt, GenerationConfig(max_new_tokens=12, temperature=0.0), stop_ids=set())
    assert ours.token_ids == expected[0, ids.size(1) :].tolist()
    assert ours.text == fast.decode(ours.token_ids)


def test_a_transformers_repo_loads_from_the_hub(smol: tuple[Any, Path], hub: Hub, tmp_path: Path) -> None:
    from huggingface_hub import HfApi

    _, folder = smol
    api = HfApi(endpoint=hub.endpoint, token=hub.write_token)
    repo_id = api.create_repo(hub.fresh_repo_id("smol")).repo_id
    api.upload_folder(folder_path=folder, repo_id=repo_id)
    model, tokenizer, _ = load_model(repo_id, device="cpu")
    local, local_tokenizer, _ = load_model(folder, device="cpu")
    assert tokenizer.encode("To be, or not") == local_tokenizer.encode("To be, or not")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), local.state_dict().values(), strict=True))


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "aksis.cli", *args], capture_output=True, text=True, timeout=300, env=env
    )


def test_generate_text_and_evaluate_from_the_cli(smol: tuple[Any, Path], tmp_path: Path) -> None:
    _, folder = smol
    out = cli(
        "generate-text", "--checkpoint-path", str(folder), "--prompt", "KING:", "--max-new-tokens", "8", "--seed", "1"
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip()
    texts = tmp_path / "eval.txt"
    texts.write_text("To be, or not to be, that is the question.\n" * 20)
    out = cli(
        "evaluate", "--checkpoint-path", str(folder), "--dataset", str(texts), "--tasks", "perplexity", "--no-save"
    )
    assert out.returncode == 0, out.stderr
    assert "perplexity" in out.stdout


def test_a_space_serves_a_transformers_repo_and_bounds_its_shards_together(
    smol: tuple[Any, Path], hub: Hub, tmp_path: Path
) -> None:
    from huggingface_hub import HfApi

    from aksis.checkpoint import CheckpointError
    from aksis.ui.models import ModelStore

    hf, _ = smol
    sharded = tmp_path / "sharded"
    hf.save_pretrained(sharded, max_shard_size="100KB")
    transformers.AutoTokenizer.from_pretrained(smol[1]).save_pretrained(sharded)
    api = HfApi(endpoint=hub.endpoint, token=hub.write_token)
    repo_id = api.create_repo(hub.fresh_repo_id("smol-sharded")).repo_id
    api.upload_folder(folder_path=sharded, repo_id=repo_id)
    shards = sorted(sharded.glob("*.safetensors"))
    assert len(shards) > 1
    total = sum(p.stat().st_size for p in shards)
    space = ModelStore(tmp_path / "none", device=torch.device("cpu"), max_bytes=total - 1, local_paths=False)
    with pytest.raises(CheckpointError, match="MiB of weights; this app loads models of at most"):
        space.get(repo_id)  # each shard is under the bound; together they are not
    roomy = ModelStore(tmp_path / "none", device=torch.device("cpu"), max_bytes=4 * total, local_paths=False)
    entry = roomy.get(repo_id)
    assert isinstance(entry.tokenizer, HFTokenizer) and entry.model.config.n_layer == 2


def test_a_tokenizer_that_adds_a_bos_gets_it_before_a_prompt_and_a_scored_text(
    shakespeare_texts: list[str], tmp_path: Path
) -> None:
    hf = write_hf_repo(tmp_path, shakespeare_texts[:100], add_bos=True)
    model, tokenizer, _ = load_model(tmp_path, device="cpu")
    assert tokenizer.add_bos and tokenizer.document_start == tokenizer.bos_id
    fast = transformers.AutoTokenizer.from_pretrained(tmp_path)
    ids = fast("HAMLET: To be", return_tensors="pt").input_ids
    assert ids[0, 0].item() == tokenizer.bos_id
    with torch.no_grad():
        expected = hf.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
    ours = generate(
        model, tokenizer, "HAMLET: To be", GenerationConfig(max_new_tokens=6, temperature=0.0), stop_ids=set()
    )
    assert ours.prompt_tokens == ids.size(1)
    assert ours.token_ids == expected[0, ids.size(1) :].tolist()
