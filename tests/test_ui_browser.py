"""The app in a real browser: Debian's chromium driven by playwright, against the app served by the `served_app`
fixture. Each test clicks through one tab as a visitor would and saves a screenshot under test-artifacts/ (or
$AKSIS_ARTIFACTS).

Gradio keeps a connection open, so pages are awaited with wait_until="load" and then by the elements themselves,
never "networkidle". Without chromium (`apt-get install chromium`) the tests are skipped, except where
AKSIS_REQUIRE_BROWSER=1 (CI) makes that a failure.
"""

import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ServedApp

CHROMIUM = Path(os.environ.get("AKSIS_CHROMIUM", "/usr/bin/chromium"))
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(os.environ.get("AKSIS_ARTIFACTS", Path(__file__).resolve().parents[1] / "test-artifacts"))
TIMEOUT_MS = 60_000  # a generous bound on any one wait; the tiny model answers in well under a second


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    if not CHROMIUM.is_file():
        message = f"no chromium at {CHROMIUM}: install it (apt-get install chromium) or set AKSIS_CHROMIUM"
        if os.environ.get("AKSIS_REQUIRE_BROWSER") == "1":
            pytest.fail(message)
        pytest.skip(message)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, served_app: ServedApp, request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    """A fresh page on the app, loaded; a screenshot of it is saved when the test ends, pass or fail."""
    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    errors: list[str] = []
    page.on("pageerror", lambda err: errors.append(str(err)))
    page.goto(served_app.url, wait_until="load")
    page.locator("#model-status").get_by_text("parameters").wait_for()  # the picked model is loaded
    yield page
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{request.node.name}.png"), full_page=True)
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def open_tab(page, name: str) -> None:  # type: ignore[no-untyped-def]
    page.get_by_role("tab", name=name, exact=True).click()


def test_generate_after_moving_a_slider(page) -> None:  # type: ignore[no-untyped-def]
    open_tab(page, "Generate")
    page.locator("#generate-sampler input").click()
    page.get_by_role("option", name="greedy", exact=True).click()
    max_tokens = page.locator("#generate-max-new-tokens input[type=number]")
    max_tokens.fill("12")
    max_tokens.press("Enter")
    page.locator("#generate-prompt textarea").fill("ROMEO:")
    page.locator("#generate-button").click()
    stats = page.locator("#generate-stats")
    stats.get_by_text("12 tokens").wait_for()
    assert page.locator("#generate-output textarea").input_value() != ""
    assert page.locator("#generate-tokens .aksis-token").count() >= 1


def test_perplexity_of_pasted_text(page, served_app: ServedApp) -> None:  # type: ignore[no-untyped-def]
    from aksis.checkpoint import load_model
    from aksis.metrics import perplexity

    text = "O Romeo, Romeo, wherefore art thou Romeo?"
    open_tab(page, "Evaluate")
    page.locator("#eval-text textarea").fill(text)
    page.locator("#eval-text-perplexity").click()
    shown = page.locator("#eval-perplexity input")
    page.wait_for_function("() => document.querySelector('#eval-perplexity input').value !== ''")
    model, tokenizer, _ = load_model(served_app.settings.model, device="cpu")
    expected = perplexity(model, tokenizer, [text]).perplexity
    assert float(shown.input_value()) == pytest.approx(expected, rel=1e-3)


def test_model_tab_shows_the_config_curves_and_attention(page) -> None:  # type: ignore[no-untyped-def]
    open_tab(page, "Model")
    page.locator("#model-summary").get_by_text("llama").first.wait_for()
    page.locator("#model-curves img").wait_for()  # matplotlib figures arrive as images
    page.locator("#attention-prompt textarea").fill("To be or not")
    page.locator("#attention-run").click()
    page.locator("#attention-heatmap img").wait_for()


def test_chat_one_turn(page) -> None:  # type: ignore[no-untyped-def]
    open_tab(page, "Chat")
    page.get_by_text("Sampling", exact=True).click()  # the settings' accordion
    page.locator("#chat-max-new-tokens input[type=number]").fill("16")
    page.locator("#chat-seed input").fill("1")  # a seed whose reply is not empty (the tiny model is random)
    box = page.locator("#chat-input textarea")
    box.fill("Good morrow, my lord!")
    box.press("Enter")
    history = page.locator("#chat-history")
    history.get_by_text("Good morrow, my lord!").wait_for()
    bot = history.locator("[data-testid='bot']")
    bot.first.wait_for()
    page.locator("#chat-input [data-testid='submit-button']").wait_for()  # the stop button gave way: it ended
    assert bot.count() == 1 and bot.first.inner_text().strip()


def test_bad_input_is_a_message_in_the_page(page) -> None:  # type: ignore[no-untyped-def]
    open_tab(page, "Generate")
    page.locator("#generate-button").click()  # with an empty prompt
    page.get_by_text("The prompt is empty").first.wait_for()  # Gradio's error toast
    page.locator("#generate-prompt textarea").fill("ROMEO:")
    page.locator("#generate-button").click()  # and the app goes on serving
    page.locator("#generate-stats").get_by_text("tokens in").wait_for()


def test_a_page_opened_after_training_shows_the_new_model(browser, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """First start: no model, the welcome banner. Once a run exists (trained in the app, or copied in), a page
    opened afterwards lists and loads it, and the banner is gone."""
    from conftest import serve_app, write_run

    from aksis.ui import AppSettings

    checkpoints = tmp_path / "checkpoints"
    app = serve_app(AppSettings(checkpoints_dir=checkpoints, feedback_file=tmp_path / "f.jsonl", device="cpu"))
    page = browser.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    try:
        page.goto(app.url, wait_until="load")
        page.locator("#welcome").get_by_text("No model yet").wait_for()
        write_run(checkpoints / "first-run", "gpt2", seed=9)
        page.goto(app.url, wait_until="load")
        # Loaded, and it is the new run (while it loads, a progress line in the status names the run too).
        page.locator("#model-status").get_by_text("parameters").wait_for()
        page.locator("#model-status strong", has_text="first-run").wait_for()
        page.locator("#welcome").wait_for(state="hidden")  # the same update hides it; the browser may draw it after
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "test_a_page_opened_after_training_shows_the_new_model.png"))
    finally:
        page.close()
        app.demo.close()


def test_the_train_tab_draws_both_loss_curves_as_the_run_goes(browser, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A short run on an uploaded text: the live plot draws the training and validation curves as lines, each in a
    colour of its own, on numeric axes."""
    from conftest import serve_app

    from aksis.ui import AppSettings

    corpus = tmp_path / "verses.txt"
    corpus.write_text("\n".join(f"ROMEO {n}:\nBut soft, what light through yonder window breaks?" for n in range(400)))
    settings = AppSettings(checkpoints_dir=tmp_path / "checkpoints", feedback_file=tmp_path / "f.jsonl", device="cpu")
    app = serve_app(settings)
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    page.set_default_timeout(TIMEOUT_MS)
    try:
        page.goto(app.url, wait_until="load")
        open_tab(page, "Train")
        page.locator("#train-corpus").get_by_text("my .txt file").click()
        page.locator("#train-upload input[type=file]").set_input_files(str(corpus))
        page.locator("#train-tokenizer").get_by_text("bytes").click()
        steps = page.locator("#train-steps input[type=number]")
        steps.fill("12")
        steps.press("Enter")
        page.locator("#train-start").click()
        page.get_by_text("It is now picked").wait_for(timeout=4 * TIMEOUT_MS)
        lines = page.locator("#train-plot svg .mark-line path")
        lines.first.wait_for()
        assert lines.count() == 2  # train and validation
        strokes = {lines.nth(i).get_attribute("stroke") for i in range(2)}
        assert len(strokes) == 2 and None not in strokes and "transparent" not in strokes
        assert all("L" in (lines.nth(i).get_attribute("d") or "") for i in range(2))  # a line through 2+ points
        # Numeric axes have round ticks; categorical ones would label every step and every loss (9.227718353271484).
        ticks = page.locator("#train-plot svg .role-axis-label text").all_text_contents()
        assert ticks and all(re.fullmatch(r"\d+(\.\d{1,2})?", t) for t in ticks), ticks
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "test_the_train_tab_draws_both_loss_curves_as_the_run_goes.png"))
    finally:
        page.close()
        app.demo.close()


def test_a_hostile_model_card_is_shown_as_text_and_runs_nothing(browser, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A repo's README.md is the repo owner's HTML: rendered in a visitor's page, it must run nothing (issue 18)."""
    from conftest import serve_app, write_run

    from aksis.ui import AppSettings

    checkpoints = tmp_path / "checkpoints"
    run = write_run(checkpoints / "hostile", "gpt2", seed=3)
    (run / "best" / "README.md").write_text(
        "# A friendly card\n\n"
        "<script>window.__pwned = 'script'</script>\n\n"
        "<img src=x onerror=\"window.__pwned = 'img'\">\n\n"
        "<a href=\"javascript:void(window.__pwned = 'link')\">click me</a>\n\n"
        "<iframe srcdoc=\"<script>parent.__pwned = 'iframe'</script>\"></iframe>\n",
        encoding="utf-8",
    )
    settings = AppSettings(
        model=str(run), checkpoints_dir=checkpoints, feedback_file=tmp_path / "f.jsonl", device="cpu", local_paths=False
    )
    app = serve_app(settings)
    page = browser.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    try:
        page.goto(app.url, wait_until="load")
        page.locator("#model-status").get_by_text("parameters").wait_for()
        open_tab(page, "Model")
        page.get_by_text("Model card", exact=True).click()  # the accordion
        card = page.locator("#model-card")
        card.get_by_text("A friendly card").wait_for()
        page.wait_for_timeout(500)  # what an injected handler would have run by now
        assert page.evaluate("window.__pwned") is None
        page.get_by_text("click me").click()
        page.wait_for_timeout(200)
        assert page.evaluate("window.__pwned") is None
        assert card.locator("script, iframe, [onerror]").count() == 0
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "test_a_hostile_model_card_is_shown_as_text_and_runs_nothing.png"))
    finally:
        page.close()
        app.demo.close()
