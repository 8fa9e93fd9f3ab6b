"""A public Space against hostile repos (issue 18): each repo below, served by the local Hub test server, asks for
something its bytes do not justify. Loaded through the app's API in Space mode, each gets a clear message in bounded
time that names the repo's file (never a path of the server), and the app then serves an ordinary model at once."""

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import Hub, ServedApp, serve_app, tiny_config
from huggingface_hub import HfApi

from aksis.checkpoint import save_checkpoint
from aksis.hf_tokenizer import to_hf_json
from aksis.model import GPT
from aksis.tokenizer import Tokenizer
from aksis.ui import AppSettings


def hostile_repo(hub: Hub, folder: Path, name: str, layout: str, **changes: object) -> str:
    """A repo holding a tiny, valid checkpoint (in aksis's own layout or transformers') with `changes` made to its
    files: {file name: new content (a dict is written as JSON; a dict under config.json is merged into the config;
    None deletes the file)}."""
    torch.manual_seed(0)
    save_checkpoint(GPT(tiny_config(vocab_size=260)), folder, tokenizer=Tokenizer.byte_level(), layout=layout)
    for file, content in changes.items():
        path = folder / file.replace("__", ".")
        if content is None:
            path.unlink()
            continue
        if file == "config__json" and isinstance(content, dict):
            content = {**json.loads(path.read_text()), **content}
        path.write_text(json.dumps(content) if isinstance(content, dict | list) else str(content))
    repo_id = hub.fresh_repo_id(name, namespace=hub.org)
    api = HfApi(token=hub.write_token)
    api.create_repo(repo_id)
    api.upload_folder(folder_path=folder, repo_id=repo_id)
    return repo_id


@pytest.fixture(scope="module")
def space(app_checkpoints: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServedApp]:
    """The app as a public Space serves it: visitors may name any Hub repo, no file of the server."""
    settings = AppSettings(
        model=str(app_checkpoints / "tiny-llama"),
        checkpoints_dir=app_checkpoints,
        feedback_file=tmp_path_factory.mktemp("feedback") / "feedback.jsonl",
        device="cpu",
        local_paths=False,
    )
    app = serve_app(settings)
    yield app
    app.demo.close()


TOKENIZER = Tokenizer.byte_level().to_dict()
HF_TOKENIZER = json.loads(to_hf_json(Tokenizer.byte_level()))
SPLIT = HF_TOKENIZER["pre_tokenizer"]["pretokenizers"][0]
# Repos in aksis's own layout (format 1, how aksis saved every model before it wrote transformers' layout).
CASES = {
    # config.json asks for far more than the weights hold
    "vocab": ({"config__json": {"vocab_size": 2_000_000}}, "transformer.wte.weight is (260, 64) in the file but"),
    "layers": ({"config__json": {"n_layer": 20_000}}, "holds 2 layers but config.json beside it asks for 20000"),
    "huge": ({"config__json": {"vocab_size": 2**40}}, "transformer.wte.weight is (260, 64) in the file but"),
    "width": ({"config__json": {"d_ff": 10**9}}, "in the file but (1000000000, 64) in the model"),
    # files that would hang or crash the server
    "hang": ({"tokenizer__json": {**TOKENIZER, "pattern": r"\s*|\S"}}, "can match the empty string"),
    "list": ({"tokenizer__json": [1, 2]}, "must be a JSON object, got list"),
    "corrupt": ({"config__json": "{not json"}, "config.json is not valid JSON"),
    "nested": ({"generation_config__json": "[" * 100_000 + "]" * 100_000}, "nested too deeply"),
    "temperature": ({"generation_config__json": {"temperature": 1e-300}}, "temperature must be 0 (greedy) or at"),
    # a file the app would read (here the model card) larger than it reads: refused before any download
    "card": ({"README__md": "x" * ((4 << 20) + 1)}, "README.md is 4.0 MiB; this app reads at most 4 MiB of it"),
}
# Repos in transformers' layout (how aksis saves now, and how pretrained models come).
HF_CASES = {
    "hf-vocab": ({"config__json": {"vocab_size": 2**40}}, "transformer.wte.weight is (260, 64) in the file but"),
    "hf-layers": ({"config__json": {"n_layer": 20_000}}, "holds 2 layers but config.json beside it asks for 20000"),
    "hf-width": ({"config__json": {"n_inner": 10**9}}, "in the file but (1000000000, 64) in the model"),
    "hf-family": ({"config__json": {"model_type": "rwkv"}}, "its model_type is 'rwkv'; aksis reads the llama"),
    "hf-rope": (
        {"config__json": {"model_type": "llama", "max_position_embeddings": 64, "rope_scaling": {"rope_type": "yarn"}}},
        "RoPE scaling 'yarn' is not supported",
    ),
    "hf-pickle": ({"model__safetensors": None, "pytorch_model__bin": "not really a pickle"}, "never pytorch_model.bin"),
    "hf-shards": (
        {"model__safetensors": None, "model__safetensors__index__json": {"weight_map": {"w": "../../etc/passwd"}}},
        "names weight files aksis does not read",
    ),
    "hf-hang": (
        {
            "tokenizer__json": {**HF_TOKENIZER, "pre_tokenizer": {**SPLIT, "pattern": {"Regex": r"\s*|\S"}}},
            "tokenizer_config__json": {"eos_token": "<|endoftext|>"},
        },
        "can match the empty string",
    ),
}


@pytest.mark.parametrize("case", sorted(CASES) + sorted(HF_CASES))
def test_a_hostile_repo_gets_a_clear_message_fast_and_the_space_serves_on(
    case: str, space: ServedApp, hub: Hub, tmp_path: Path
) -> None:
    from gradio_client.exceptions import AppError

    layout = "transformers" if case in HF_CASES else "aksis"
    changes, expected = {**CASES, **HF_CASES}[case]
    repo_id = hostile_repo(hub, tmp_path / case, case, layout, **changes)
    client = space.client()
    client = space.client()
    start = time.perf_counter()
    with pytest.raises(AppError, match="Could not load the model") as err:
        client.predict(repo_id, api_name="/load_model")
    message = str(err.value)
    assert expected in message and time.perf_counter() - start < 30
    assert repo_id in message and "snapshots" not in message and "models--" not in message  # no server path
    assert "llama" in client.predict(space.settings.model, api_name="/load_model")  # and the Space goes on


def test_refusals_are_answered_without_a_traceback_in_the_server_log(
    space: ServedApp, capfd: pytest.CaptureFixture[str]
) -> None:
    """An unknown vote, a vote with nothing to vote on, a value outside a slider's range: the app working as meant.
    The visitor gets the reason; the server log gets no stack trace (a real failure keeps its own)."""
    from gradio_client.exceptions import AppError

    client = space.client()
    capfd.readouterr()
    refusals = [
        (("x" * 100_000,), "/arena_vote", "unknown vote 'xxxx"),
        (("a",), "/arena_vote", "nothing to vote on yet"),
    ]
    for args, api, expected in refusals:
        with pytest.raises(AppError) as err:
            client.predict(*args, api_name=api)
        assert expected in str(err.value) and len(str(err.value)) < 500  # the 100,000 characters are not echoed
    settings = dict(
        source=space.settings.model, compare=None, texts_from="pasted text", text="To be, or not to be.", file=None,
        dataset="shakespeare", split="validation", max_texts=10**9, scores=["perplexity"],
        generate_from="continuation of the texts", prompts_file=None, temperature=0, max_new_tokens=8,
        prompt_tokens=8, num_samples=2, seed=0,
    )  # fmt: skip
    with pytest.raises(AppError, match="At most this many texts: Value 1000000000 is greater than maximum value 100"):
        client.predict(**settings, api_name="/evaluate")
    with pytest.raises(AppError, match="Seed .* must be a number"):
        client.predict(**{**settings, "max_texts": 1, "seed": "many"}, api_name="/evaluate")
    chat = (space.settings.model, "", "precise", 0.7, 40, 0.9, 1.0, 8, 1)
    with pytest.raises(AppError, match="The message is empty"):  # null crashed in gr.ChatInterface's own wrapper
        client.predict(None, *chat, api_name="/chat")
    with pytest.raises(AppError, match="a model is named by text"):
        client.predict("Hi", 5, *chat[1:], api_name="/chat")
    assert "Traceback" not in capfd.readouterr().err


def test_a_space_reads_no_folder_outside_its_checkpoints_and_says_the_same_for_any(
    app_checkpoints: Path, tmp_path: Path
) -> None:
    """A path outside the checkpoints folder, with or without an @revision, existing or not, a file or a folder:
    one answer, decided before the file system is asked (no oracle), and nothing of the folder is read."""
    from aksis.checkpoint import CheckpointError
    from aksis.ui.models import ModelStore

    private = tmp_path / "private2" / "model"
    private.mkdir(parents=True)
    (private / "config.json").write_text(json.dumps({"api_key": "s3cret", "password": "hunter2"}))
    store = ModelStore(app_checkpoints, device=torch.device("cpu"), local_paths=False)
    messages = set()
    for source in (str(private), f"{private}@main", f"{tmp_path}/private2/model@x", "/etc/shadow", "/no/such/file",
                   f"{app_checkpoints}/../outside", "~/model", "./private2/model@main"):  # fmt: skip
        with pytest.raises(CheckpointError) as err:
            store.get(source)
        messages.add(str(err.value))
        assert "api_key" not in str(err.value) and "s3cret" not in str(err.value)
    assert messages == {
        f"this app serves local models only from {app_checkpoints}/: pick one of the listed models or name a Hub id "
        "(user/name or user/name@revision)"
    }
    assert "llama" in store.get(str(app_checkpoints / "tiny-llama")).describe()  # its own folder: served


def test_one_concurrency_limit_holds_for_the_whole_app(space: ServedApp) -> None:
    """Gradio counts concurrency per event: with a limit per endpoint, five endpoints at AKSIS_CONCURRENCY=4 ran
    five requests at once. Every queued event shares one group of `concurrency` workers, except the Train tab's,
    which reach the one-run slot at once: a second run is told at once that the slot is taken."""
    unlimited = {fn.api_name for fn in space.demo.fns.values() if fn.queue and fn.concurrency_limit is None}
    assert unlimited == {"train", "stop_training", "quick_start"}
    groups = {fn.concurrency_id for fn in space.demo.fns.values() if fn.queue and fn.concurrency_limit == "default"}
    assert groups == {"aksis"}
    space.client().predict(api_name="/list_models")
    queue = space.demo._queue.event_queue_per_concurrency_id["aksis"]
    assert queue.concurrency_limit == space.settings.concurrency


def test_every_request_that_runs_a_model_stops_at_the_time_limit_and_says_so(app_checkpoints: Path) -> None:
    """A public Space bounds each request by time (AKSIS_REQUEST_SECONDS, 180 s by default there): generation ends,
    scoring stops, the worker is free, and the visitor is told why. Here the bound is a microsecond."""
    import warnings

    import gradio as gr

    from aksis.ui import evaluate_tab
    from aksis.ui.arena_tab import answer_battle
    from aksis.ui.chat_tab import respond
    from aksis.ui.generate_tab import run_generate
    from aksis.ui.models import ModelStore

    store = ModelStore(app_checkpoints, device=torch.device("cpu"), request_seconds=1e-6)
    llama, gpt2 = str(app_checkpoints / "tiny-llama"), str(app_checkpoints / "tiny-gpt2")
    sliders = dict(temperature=0.9, top_k=40, top_p=0.9, repetition_penalty=1.0, max_new_tokens=64, seed=1)
    *_, (_, _, rows, stats) = run_generate(store, 64, llama, "To be", "sample", num_beams=3, **sliders)
    assert "stopped by this app's time limit per request" in stats and len(rows) == 1
    with warnings.catch_warnings(record=True) as caught:  # gr.Warning, outside a request, is a Python warning
        warnings.simplefilter("always")
        list(respond(store, 64, "Hello", [], llama, "", "precise", **sliders, replies={}))
    assert any("Stopped after 1e-06 s, this app's time limit per request" in str(w.message) for w in caught)
    *_, (_, _, _, status) = answer_battle(store, 64, "To be", llama, gpt2, "continue", "balanced", 64)
    assert "This app's time limit per request, 5e-07 s for each answer, cut answer" in status
    with pytest.raises(gr.Error, match="Stopped after 1e-06 s, this app's time limit per request. Score fewer"):
        evaluate_tab.run_perplexity(store, llama, "To be, or not to be, that is the question." * 20)
    settings = dict(
        compare=gpt2, texts_from=evaluate_tab.PASTED, text="To be, or not to be." * 20, file=None, dataset=None,
        split=None, max_texts=1, scores=[evaluate_tab.BLEU_ROUGE], generate_from=evaluate_tab.CONTINUATION,
        prompts_file=None, temperature=0.0, max_new_tokens=8, prompt_tokens=8, num_samples=2, seed=0,
    )  # fmt: skip
    with pytest.raises(gr.Error, match="Stopped after 1e-06 s"):
        evaluate_tab.run_evaluate(store, 64, llama, **settings)  # type: ignore[arg-type]


def test_one_session_cannot_fill_the_queue(app_checkpoints: Path, tmp_path: Path) -> None:
    """A client that sends request after request without waiting gets its first few served and the rest refused at
    once, as a busy server refuses (HTTP 503: they never wait in the queue, which other visitors share); another
    client is served meanwhile."""
    from gradio_client.utils import QueueError

    from aksis import ui

    settings = AppSettings(
        model=str(app_checkpoints / "tiny-llama"),
        checkpoints_dir=app_checkpoints,
        feedback_file=tmp_path / "feedback.jsonl",
        device="cpu",
        local_paths=False,
        concurrency=1,
    )
    app = serve_app(settings)
    try:
        flood = app.client()
        args = (settings.model, "To be", "greedy", 0, 0, 1.0, 1, 1.0, 256, None)
        jobs = [flood.submit(*args, api_name="/generate") for _ in range(ui.MAX_PER_SESSION + 4)]
        other = app.client().predict(settings.model, "Hi", "greedy", 0, 0, 1.0, 1, 1.0, 4, None, api_name="/generate")
        assert other[0]  # another visitor is served while the flood is refused
        outcomes = []
        for job in jobs:
            try:
                job.result(timeout=120)
                outcomes.append("served")
            except QueueError:
                outcomes.append("refused")
        assert outcomes.count("served") >= 1 and outcomes.count("refused") >= 4, outcomes
    finally:
        app.demo.close()


def test_a_visitor_uploads_a_bounded_number_of_bytes_an_hour(app_checkpoints: Path, tmp_path: Path) -> None:
    """Uploads land on the server's disk, and Gradio's upload requests carry no session: a visitor (an address) may
    upload AKSIS_UPLOAD_MB an hour; past it, and without a length, an upload is refused before it is read."""
    import httpx

    from aksis.ui import UploadBudget

    settings = AppSettings(
        checkpoints_dir=app_checkpoints,
        feedback_file=tmp_path / "f.jsonl",
        device="cpu",
        local_paths=False,
        upload_mb=1,
    )
    app = serve_app(settings)
    try:
        url = f"{app.url.rstrip('/')}/gradio_api/upload"
        part = ("part.txt", b"x" * (600 << 10), "text/plain")
        first = httpx.post(url, files={"files": part}, timeout=30)
        assert first.status_code == 200 and first.json()[0].endswith("part.txt")
        second = httpx.post(url, files={"files": part}, timeout=30)
        assert second.status_code == 429 and "at most 1 MiB an hour from a visitor" in second.text
        elsewhere = httpx.post(url, files={"files": part}, headers={"X-Forwarded-For": "203.0.113.9"}, timeout=30)
        assert elsewhere.status_code == 200  # another visitor (as a Space's proxy names them) has a budget of their own
    finally:
        app.demo.close()
    budget = UploadBudget(None, bytes_per_window=100, window_s=60)
    assert budget.charge("a", None) == (411, "An upload must say its length (Content-Length).")
    assert budget.charge("a", "80", now=0) is None and budget.charge("a", "80", now=30) is not None
    assert budget.charge("a", "80", now=61) is None  # an hour (here a minute) later, the budget is back


def test_a_hostile_chat_template_fails_its_chat_fast_with_a_message(hub: Hub, tmp_path: Path) -> None:
    """A chat template is code from the repo: it runs sandboxed, bounded in output and time."""
    from aksis.chat_template import ChatError, Message
    from aksis.checkpoint import load_model
    from aksis.jinja_template import render_chat

    template = {"eos_token": "<|endoftext|>", "chat_template": "{{ 'a' * 10**10 }}"}
    changes = {"tokenizer_config__json": template, "generation_config__json": {"eos_token_id": 256}}
    tokenizer = {**HF_TOKENIZER}
    repo_id = hostile_repo(hub, tmp_path, "template", "transformers", tokenizer__json=tokenizer, **changes)
    _, loaded, _ = load_model(repo_id, device="cpu")
    start = time.perf_counter()
    with pytest.raises(ChatError, match="chat template"):
        render_chat(loaded, [Message("user", "hi")], add_generation_prompt=True)
    assert time.perf_counter() - start < 5
