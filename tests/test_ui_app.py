"""The app's frame (aksis.ui): settings from the environment, the model store (finding, loading once, a bound on
memory), the picker, first start with no model, a Hub checkpoint named by AKSIS_MODEL, and many clients at once."""

import threading
from pathlib import Path
from typing import Any

import gradio as gr
import pytest
import torch
from conftest import Hub, ServedApp, serve_app, write_run

from aksis.checkpoint import CheckpointError
from aksis.kernels import inference_bytes
from aksis.ui import AppSettings
from aksis.ui.context import to_max_new_tokens, to_number, to_seed, to_whole
from aksis.ui.models import ModelStore


def test_settings_come_from_the_environment() -> None:
    env = {"AKSIS_MODEL": "alice/tiny@v1", "AKSIS_CHECKPOINTS": "/data/runs", "AKSIS_MODEL_CACHE_MB": "512"}
    settings = AppSettings.from_env(env)
    assert settings.model == "alice/tiny@v1" and settings.checkpoints_dir == Path("/data/runs")
    assert settings.cache_mb == 512 and settings.concurrency == AppSettings().concurrency
    assert AppSettings.from_env({}) == AppSettings()
    on_a_space = AppSettings.from_env({"SPACE_AUTHOR_NAME": "alice", "AKSIS_RUN_HOURS": "6"})
    assert on_a_space.hub_author == "alice"  # a Space lists its owner's models
    assert (on_a_space.space_owner, on_a_space.run_hours) == ("alice", 6)  # who may push any run; runs kept 6 h
    # A request that runs a model is bounded in time on a public Space, unless set otherwise; not in one's own app.
    assert AppSettings().request_limit() is None and AppSettings(local_paths=False).request_limit() == 180
    assert AppSettings.from_env({"AKSIS_REQUEST_SECONDS": "30"}).request_limit() == 30
    assert AppSettings.from_env({"AKSIS_UPLOAD_MB": "5"}).upload_mb == 5 and AppSettings().upload_mb == 200
    with pytest.raises(ValueError, match="AKSIS_REQUEST_SECONDS must be at least 1"):
        AppSettings.from_env({"AKSIS_REQUEST_SECONDS": "0"})
    with pytest.raises(ValueError, match="AKSIS_CONCURRENCY='many' is not a whole number"):
        AppSettings.from_env({"AKSIS_CONCURRENCY": "many"})
    with pytest.raises(ValueError, match="AKSIS_MODEL_CACHE_MB must be at least 1"):
        AppSettings.from_env({"AKSIS_MODEL_CACHE_MB": "0"})


def test_numbers_from_the_inputs() -> None:
    # Sliders send floats, gr.Number whole floats, the API anything.
    assert to_number("0.5", "top-p") == 0.5 and to_number(2, "temperature", 0, 2) == 2.0
    assert to_whole(5.0, "seed") == 5 and to_whole("12", "samples", 1, 200) == 12
    assert to_max_new_tokens(64.0, 64) == 64
    assert [to_seed(v) for v in (None, "", -1, -0.5, 0, 7.0)] == [None, None, None, None, 0, 7]


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: to_number(None, "top-p"), "top-p must be a number, got None"),
        (lambda: to_number(True, "top-p"), "top-p must be a number, got True"),  # not 1
        (lambda: to_number("hot", "temperature", 0, 2), "temperature must be a number from 0 to 2, got 'hot'"),
        (lambda: to_number(2.5, "temperature", 0, 2), "temperature must be a number from 0 to 2, got 2.5"),
        (lambda: to_number(-1, "penalty", 0), "penalty must be a number of 0 or more, got -1"),
        (lambda: to_number(float("inf"), "top-p"), "top-p must be a finite number, got inf"),
        (lambda: to_whole(2.5, "top-k"), "top-k must be a whole number, got 2.5"),
        (lambda: to_whole([3], "top-k"), "top-k must be a whole number, got [3]"),
        (lambda: to_whole("nan", "samples", 1, 200), "samples must be a finite whole number from 1 to 200, got 'nan'"),
        (lambda: to_whole(0, "samples", 1, 200), "samples must be a whole number from 1 to 200, got 0"),
        (lambda: to_whole(9, "layer", high=8), "layer must be a whole number of 8 or less, got 9"),
        (lambda: to_max_new_tokens(None, 64), "max new tokens is missing: give a number from 1 to 64"),
        (lambda: to_max_new_tokens(65, 64), "max new tokens must be between 1 and 64 (this app's limit), got 65"),
        (lambda: to_seed("lucky"), "seed must be a number, got 'lucky'"),
        (lambda: to_seed(1.5), "seed must be a whole number from 0 to 9223372036854775807, got 1.5"),
    ],
)
def test_bad_numbers_are_errors_that_name_the_input_and_what_it_accepts(call: Any, message: str) -> None:
    with pytest.raises(gr.Error) as caught:
        call()
    assert caught.value.message == message
    assert caught.value.print_exception is False  # bad input is no server fault: no traceback in the log


def test_store_lists_runs_and_skips_folders_without_a_checkpoint(app_checkpoints: Path, tmp_path: Path) -> None:
    store = ModelStore(app_checkpoints, device=torch.device("cpu"))
    runs = [str(app_checkpoints / "tiny-gpt2"), str(app_checkpoints / "tiny-llama")]
    assert store.local_models() == runs
    assert store.choices("alice/tiny") == ["alice/tiny", *runs]
    assert store.choices(runs[1]) == [runs[1], runs[0]]  # the configured model first, listed once
    (tmp_path / "starting-run").mkdir()  # a run whose first checkpoint is not written yet
    assert ModelStore(tmp_path, device=torch.device("cpu")).local_models() == []
    assert ModelStore(tmp_path / "missing", device=torch.device("cpu")).choices() == []


def test_store_loads_once_and_keeps_within_its_memory_bound(app_checkpoints: Path) -> None:
    llama, gpt2 = str(app_checkpoints / "tiny-llama"), str(app_checkpoints / "tiny-gpt2")
    store = ModelStore(app_checkpoints, device=torch.device("cpu"))
    first = store.get(llama)
    assert store.get(llama) is first and first.checkpoint.endswith("best")
    assert first.nbytes == inference_bytes(first.model) and first.file("metrics.jsonl") is not None
    assert first.file("no-such-file.txt") is None

    small = ModelStore(app_checkpoints, device=torch.device("cpu"), max_bytes=first.nbytes + 1)
    small.get(llama)
    small.get(gpt2)
    assert small.loaded() == [gpt2]  # the older one was dropped to stay within the bound
    small.get(llama)
    assert small.loaded() == [llama]


def test_switching_models_never_disturbs_a_generation_in_flight(app_checkpoints: Path) -> None:
    """A visitor streams from one model while another visitor's switch drops it from the cache: the stream goes on,
    on the weights it started with, to the text the library gives alone."""
    from aksis.config import GenerationConfig
    from aksis.generation import generate, stream

    llama, gpt2 = str(app_checkpoints / "tiny-llama"), str(app_checkpoints / "tiny-gpt2")
    store = ModelStore(app_checkpoints, device=torch.device("cpu"), max_bytes=1)  # room for one model only
    entry = store.get(llama)
    config = GenerationConfig(max_new_tokens=40, temperature=1.0, top_k=0, top_p=1.0, seed=7, stop=[])
    pieces = stream(entry.model, entry.tokenizer, "ROMEO:", config)
    text = next(iter(pieces))
    store.get(gpt2)  # the switch: llama leaves the cache mid-stream
    assert store.loaded() == [gpt2]
    text += "".join(pieces)
    alone = generate(store.get(llama).model, entry.tokenizer, "ROMEO:", config).text
    assert text == alone


def test_a_run_that_wrote_new_weights_is_loaded_again(tmp_path: Path) -> None:
    """A run still training rewrites best/ at each evaluation: the store serves what is on disk, not what it loaded
    first; an unchanged run is not loaded twice."""
    import os

    run = write_run(tmp_path / "checkpoints" / "run", "gpt2", seed=6)
    store = ModelStore(tmp_path / "checkpoints", device=torch.device("cpu"))
    first = store.get(str(run))
    assert store.get(str(run)) is first
    write_run(run, "gpt2", seed=7)  # the trainer saves a better best/
    weights = run / "best" / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 1_000_000))
    second = store.get(str(run))
    assert second is not first
    assert not torch.equal(second.model.lm_head.weight, first.model.lm_head.weight)
    assert store.loaded() == [str(run)]


def test_a_failed_load_leaves_nothing_behind(app_checkpoints: Path) -> None:
    store = ModelStore(app_checkpoints, device=torch.device("cpu"))
    for _ in range(2):  # the second attempt fails the same way: no lock or half-loaded entry was left
        with pytest.raises(CheckpointError):
            store.get("./no/such/run")
    assert store._loading == {} and store.loaded() == []


def test_a_space_refuses_hub_models_larger_than_its_cache(
    hub: Hub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from aksis.hub import push_checkpoint

    run = write_run(tmp_path / "run", "llama", seed=8)
    repo_id = hub.fresh_repo_id("big")
    monkeypatch.setenv("HF_TOKEN", hub.write_token)
    push_checkpoint(run / "best", repo_id)
    size = (run / "best" / "model.safetensors").stat().st_size
    space = ModelStore(tmp_path / "none", device=torch.device("cpu"), max_bytes=size - 1, local_paths=False)
    with pytest.raises(CheckpointError, match="MiB of weights; this app loads models of at most"):
        space.get(repo_id)
    roomy = ModelStore(tmp_path / "none", device=torch.device("cpu"), max_bytes=size, local_paths=False)
    roomy.get(repo_id)  # weights of exactly the bound's size are served
    assert roomy.loaded() == [repo_id]


def test_concurrent_requests_load_a_model_once(app_checkpoints: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = ModelStore(app_checkpoints, device=torch.device("cpu"))
    loads = []
    real_load = store._load

    def counting_load(source: str):  # type: ignore[no-untyped-def]
        loads.append(source)
        return real_load(source)

    monkeypatch.setattr(store, "_load", counting_load)
    source = str(app_checkpoints / "tiny-llama")
    results = []
    threads = [threading.Thread(target=lambda: results.append(store.get(source))) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert loads == [source] and len(results) == 6 and all(r is results[0] for r in results)


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("", "no model picked"),
        ("./no/such/folder", "no checkpoint folder at ./no/such/folder"),
        ("just-a-name", "neither a local folder nor a Hub id"),
        ("alice/tiny@", "write a Hub revision as user/name@revision"),
    ],
)
def test_store_explains_bad_sources(app_checkpoints: Path, source: str, message: str) -> None:
    with pytest.raises(CheckpointError, match=message):
        ModelStore(app_checkpoints, device=torch.device("cpu")).get(source)


def test_first_start_without_models_offers_training(tmp_path: Path) -> None:
    app = serve_app(AppSettings(checkpoints_dir=tmp_path / "checkpoints", feedback_file=tmp_path / "f.jsonl"))
    try:
        welcome = component(app, "welcome")
        assert welcome["props"]["visible"] is True
        assert component(app, "model-picker")["props"].get("value") in (None, "", [])
    finally:
        app.demo.close()


def component(app: ServedApp, elem_id: str) -> dict:  # type: ignore[type-arg]
    """A component of the served app's config (what the browser receives), by elem_id."""
    import httpx

    config = httpx.get(app.url + "config", timeout=10).json()
    (found,) = [c for c in config["components"] if c.get("props", {}).get("elem_id") == elem_id]
    return found  # type: ignore[no-any-return]


def test_a_served_app_with_models_hides_the_welcome(served_app: ServedApp) -> None:
    assert component(served_app, "welcome")["props"]["visible"] is False
    assert component(served_app, "model-picker")["props"]["value"] == served_app.settings.model


def test_picker_loads_and_explains_errors(served_app: ServedApp) -> None:
    from gradio_client.exceptions import AppError

    client = served_app.client()
    status = client.predict(served_app.settings.model, api_name="/load_model")
    assert "llama, 2 layers × 64" in status and "on cpu" in status
    with pytest.raises(AppError, match="Could not load the model: no model repo nobody/nothing on the Hub"):
        client.predict("nobody/nothing", api_name="/load_model")
    assert "llama" in client.predict(served_app.settings.model, api_name="/load_model")  # still serving


def test_aksis_model_names_a_hub_checkpoint(hub: Hub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A Space sets AKSIS_MODEL to a Hub id: the app starts with it picked and loads it through the Hub."""
    from aksis.hub import push_checkpoint

    run = write_run(tmp_path / "run", "gpt2", seed=3)
    repo_id = hub.fresh_repo_id("space-model")
    monkeypatch.setenv("HF_TOKEN", hub.write_token)
    push_checkpoint(run / "best", repo_id)
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setenv("AKSIS_MODEL", repo_id)
    monkeypatch.setenv("AKSIS_CHECKPOINTS", str(tmp_path / "empty"))
    monkeypatch.setenv("AKSIS_FEEDBACK_FILE", str(tmp_path / "feedback.jsonl"))
    app = serve_app(AppSettings.from_env())
    try:
        assert component(app, "model-picker")["props"]["value"] == repo_id
        assert component(app, "welcome")["props"]["visible"] is False
        status = app.client().predict(repo_id, api_name="/load_model")
        assert f"**{repo_id}**: gpt2" in status
    finally:
        app.demo.close()


def test_store_lists_the_hub_models_of_an_author(hub: Hub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from aksis.hub import push_checkpoint

    repo_id = hub.fresh_repo_id("listed", namespace=hub.org)
    monkeypatch.setenv("HF_TOKEN", hub.write_token)
    push_checkpoint(write_run(tmp_path / "run", "llama", seed=4) / "best", repo_id)
    store = ModelStore(tmp_path / "none", device=torch.device("cpu"), hub_author=hub.org)
    assert repo_id in store.hub_models() and repo_id in store.choices()
    assert ModelStore(tmp_path, device=torch.device("cpu"), hub_author="nobody-at-all").hub_models() == []


def test_eight_clients_generating_at_once_all_finish(app_checkpoints: Path, tmp_path: Path) -> None:
    """The load the issue names: 8 visitors generating at the same moment, on an app that serves 4 at a time (the
    default), so half of them queue; all get their text, without errors, each the text the library gives alone for
    its seed (no request saw another's state)."""
    from concurrent.futures import ThreadPoolExecutor

    from aksis.checkpoint import load_model
    from aksis.generation import generate, sampler_config

    source = str(app_checkpoints / "tiny-llama")
    app = serve_app(
        AppSettings(model=source, checkpoints_dir=app_checkpoints, feedback_file=tmp_path / "f.jsonl", device="cpu")
    )
    assert app.settings.concurrency == 4
    try:
        clients = [app.client() for _ in range(8)]
        barrier = threading.Barrier(len(clients))

        def visit(i: int) -> str:
            barrier.wait()  # all requests start together
            text, _, _, stats = clients[i].predict(
                source, f"Visitor {i}:", "sample", 1.0, 0, 1.0, 2, 1.0, 48, i, api_name="/generate"
            )
            assert " tokens in " in stats and f"seed {i}" in stats
            return str(text)

        with ThreadPoolExecutor(len(clients)) as pool:
            texts = list(pool.map(visit, range(len(clients))))
    finally:
        app.demo.close()
    model, tokenizer, defaults = load_model(source, device="cpu")
    for i, text in enumerate(texts):
        config = sampler_config(None, defaults, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=48, seed=i)
        assert text == generate(model, tokenizer, f"Visitor {i}:", config).text


def test_a_space_does_not_read_files_named_by_visitors(app_checkpoints: Path, tmp_path: Path) -> None:
    """On a Space (SPACE_ID set) visitors are strangers: models only from the checkpoints folder, no local dataset."""
    import gradio as gr

    from aksis.ui.evaluate_tab import load_texts

    assert AppSettings.from_env({"SPACE_ID": "alice/demo"}).local_paths is False
    assert AppSettings.from_env({"SPACE_ID": "alice/demo", "AKSIS_LOCAL_PATHS": "1"}).local_paths is True
    assert AppSettings.from_env({}).local_paths is True
    with pytest.raises(ValueError, match="AKSIS_LOCAL_PATHS='maybe': use 1"):
        AppSettings.from_env({"AKSIS_LOCAL_PATHS": "maybe"})

    outside = write_run(tmp_path / "elsewhere", "gpt2", seed=5)
    closed = ModelStore(app_checkpoints, device=torch.device("cpu"), local_paths=False)
    assert closed.get(str(app_checkpoints / "tiny-gpt2")).model is not None  # a listed model still loads
    with pytest.raises(CheckpointError, match="serves local models only from"):
        closed.get(str(outside))
    assert ModelStore(app_checkpoints, device=torch.device("cpu")).get(str(outside)).model is not None

    secret = tmp_path / "secret.txt"
    secret.write_text("do not show this " * 50)
    with pytest.raises(gr.Error, match="does not read its own files"):
        load_texts("dataset", None, None, str(secret), "train", 1, local_paths=False)
    texts, _ = load_texts("dataset", None, None, str(secret), "train", 1, local_paths=True)
    assert "do not show this" in texts[0]
