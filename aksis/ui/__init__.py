"""The Gradio app, the Hugging Face Space demo: `python app.py` (or `build_app()` from Python).

Layout: the model picker on top (a local run folder, or a Hub id with an optional @revision), then one tab per
file in this package: Chat, Generate, Evaluate, Model, Arena (human evaluation) and Train. `context.py` holds
what the tabs share. Every action a visitor takes (generate, chat, score, train, ...) also has an `api_name`, so
the app is an API too (`gradio_client.Client`); events that only update the page are private.

Requests wait in a queue and at most `AKSIS_CONCURRENCY` run at once, all endpoints together. The device is chosen
once, when the app is built (CUDA > MPS > CPU, bf16 on a GPU that supports it; AKSIS_DTYPE and AKSIS_QUANTIZE choose
the compute dtype and int8 / int4 weights, AKSIS_COMPILE decode steps compiled ahead of time on a CPU).
"""

from __future__ import annotations

import argparse
import logging
import threading
import time
from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from aksis.ui.context import AppContext, AppSettings, user_errors

if TYPE_CHECKING:
    import gradio as gr

__all__ = ["AppSettings", "build_app", "main"]

log = logging.getLogger(__name__)

QUEUE_SIZE = 256  # requests waiting, all visitors together
MAX_FILE_MB = 50  # the largest file Gradio accepts as an upload
MAX_PER_SESSION = 16  # requests one session may have waiting or running (a page's own events, at load, are a few)
INTRO = (
    "# aksis\n"
    "A small GPT, trained from scratch. Pick a model (a local training run, or a Hub id such as `user/name` or "
    "`user/name@revision`), then chat with it, sample from it, score it, look inside it, or train a new one."
)
NO_MODEL = (
    "### No model yet\n"
    "No checkpoint was found in `{folder}`{hub}. Train a tiny model on the embedded Shakespeare right here (a few "
    "minutes on a laptop CPU; it appears in the picker when done), or type a Hub id into the picker."
)


def _device(settings: AppSettings) -> tuple[torch.device, torch.dtype | None]:
    from aksis.device import pick_device, supports_bf16
    from aksis.quantize import compute_dtype

    device = pick_device(settings.device)
    if settings.dtype:
        return device, compute_dtype(settings.dtype)
    return device, (torch.bfloat16 if supports_bf16(device) else None)


def build_app(settings: AppSettings | None = None) -> gr.Blocks:
    import gradio as gr

    from aksis.ui import arena_tab, chat_tab, evaluate_tab, generate_tab, model_tab, train_tab
    from aksis.ui.feedback import FeedbackLog
    from aksis.ui.models import ModelStore

    settings = settings or AppSettings.from_env()
    device, dtype = _device(settings)
    store = ModelStore(
        settings.checkpoints_dir,
        device=device,
        dtype=dtype,
        quantize=settings.quantize,
        compile=settings.compile,
        max_bytes=settings.cache_mb << 20,
        hub_author=settings.hub_author,
        local_paths=settings.local_paths,
        request_seconds=settings.request_limit(),
    )
    feedback = FeedbackLog(settings.feedback_file, repo_id=settings.feedback_repo)
    choices = store.choices(settings.model)

    # delete_cache: every hour, drop uploads and generated files older than a day from Gradio's cache.
    with gr.Blocks(title="aksis", delete_cache=(3600, 86400)) as demo:
        gr.Markdown(INTRO)
        with gr.Row(equal_height=True):
            picker = gr.Dropdown(
                choices,
                value=choices[0] if choices else None,
                allow_custom_value=True,
                label="Model: a local folder or a Hub id[@revision]",
                elem_id="model-picker",
                scale=5,
            )
            load_button = gr.Button("Load", elem_id="load-model", scale=1)
            refresh_button = gr.Button("Refresh list", scale=1)
        status = gr.Markdown(elem_id="model-status")
        hub = f" or on the Hub under `{settings.hub_author}`" if settings.hub_author else ""
        with gr.Column(visible=not choices, elem_id="welcome") as welcome:
            gr.Markdown(NO_MODEL.format(folder=settings.checkpoints_dir, hub=hub))
            welcome_button = gr.Button("Train a tiny model now", variant="primary", elem_id="welcome-train")

        ctx = AppContext(settings, store, feedback, picker, welcome_button=welcome_button)
        ctx.extra.update(status=status, welcome=welcome)

        def load(source: str | None, progress: gr.Progress = gr.Progress()) -> str:
            with user_errors("load the model"):
                entry = store.get(source, progress=lambda frac, text: progress(frac, desc=text))
            return entry.describe()

        def refresh(current: str | None) -> Any:
            names = store.choices(settings.model)
            current = current if isinstance(current, str) else None  # an API caller may send any value
            return gr.Dropdown(choices=names, value=current or (names[0] if names else None), allow_custom_value=True)

        def open_page(current: str | None) -> tuple[Any, Any, str]:
            """Each page opens on the models there are now (a run trained since the app started included): the
            picker's choices, the welcome banner only while there are none, and the picked model loaded."""
            names = store.choices(settings.model)
            current = current or (names[0] if names else None)
            text = ""
            if current:
                try:
                    text = load(current)
                except gr.Error as err:  # said in the status line: a page that opens on a broken model still works
                    text = str(err.message)
            return (
                gr.Dropdown(choices=names, value=current, allow_custom_value=True),
                gr.Column(visible=not names),
                text,
            )

        load_button.click(load, picker, status, api_name="load_model")
        picker.input(load, picker, status, api_visibility="private")
        refresh_button.click(refresh, picker, picker, api_name="list_models")

        for tab in (chat_tab, generate_tab, evaluate_tab, model_tab, arena_tab, train_tab):
            tab.build(ctx)

        demo.load(open_page, picker, [picker, welcome, status], api_visibility="private")

    # One limit for the whole app: Gradio counts concurrency per event, so four endpoints at a limit of 4 would run
    # 16 requests at once. Every queued event without a limit of its own (the Train tab's reach its one-run slot at
    # once) shares one group of `concurrency` workers.
    for fn in demo.fns.values():
        if fn.concurrency_limit == "default":
            fn.concurrency_id = "aksis"
    demo.queue(default_concurrency_limit=settings.concurrency, max_size=QUEUE_SIZE)
    _limit_per_session(demo, MAX_PER_SESSION)
    return demo


def _limit_per_session(demo: gr.Blocks, limit: int) -> None:
    """Refuse a request of a session that already has `limit` requests waiting or running: one client cannot fill the
    queue (QUEUE_SIZE for everyone) and keep the other visitors out. Gradio has no such setting; its queue's `push`
    is where a request joins, so it is wrapped."""
    queue = demo._queue
    push = queue.push

    async def push_within_limit(body: Any, request: Any, username: str | None) -> Any:
        session = body.session_hash
        if session is not None:
            waiting = sum(
                e.session_hash == session for q in queue.event_queue_per_concurrency_id.values() for e in q.queue
            )
            running = sum(e.session_hash == session for jobs in queue.active_jobs if jobs for e in jobs)
            if waiting + running >= limit:
                log.info("refused a request of a session with %d requests waiting or running", waiting + running)
                return (
                    False,
                    f"You have {waiting + running} requests waiting or running, as many as a visitor may: wait for "
                    "them to finish.",
                    "queue_full",
                )
        return await push(body, request, username)

    queue.push = push_within_limit  # type: ignore[method-assign]


def launch_options(settings: AppSettings) -> dict[str, Any]:
    """What `demo.launch` is given besides the address: the largest upload, and a middleware that bounds the bytes
    each visitor uploads (see UploadBudget)."""
    from starlette.middleware import Middleware

    budget = Middleware(UploadBudget, bytes_per_window=settings.upload_mb << 20)
    return {"max_file_size": f"{MAX_FILE_MB}mb", "app_kwargs": {"middleware": [budget]}}


class UploadBudget:
    """ASGI middleware: each visitor may upload at most `bytes_per_window` bytes in `window_s` seconds (uploads land
    in Gradio's cache on the server's disk, which Gradio empties of day-old files only). Gradio's upload requests
    carry no session, so a visitor is their address: the last one in X-Forwarded-For (the one a Space's proxy added),
    else the connection's. An upload that does not say its length is refused, and so is one over the budget (429)."""

    def __init__(self, app: Any, bytes_per_window: int, window_s: float = 3600.0) -> None:
        self.app, self.budget, self.window = app, bytes_per_window, window_s
        self.spent: dict[str, deque[tuple[float, int]]] = {}
        self.lock = threading.Lock()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"].endswith("/upload"):
            headers = {key.decode("latin-1").lower(): value.decode("latin-1") for key, value in scope["headers"]}
            refusal = self.charge(_visitor(scope, headers), headers.get("content-length"))
            if refusal is not None:
                from starlette.responses import PlainTextResponse

                status, message = refusal
                log.info("refused an upload: %s", message)
                await PlainTextResponse(message, status_code=status)(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def charge(self, visitor: str, length: str | None, now: float | None = None) -> tuple[int, str] | None:
        """Count an upload of `length` bytes against `visitor`'s budget; (HTTP status, message) when refused."""
        if length is None or not length.isdigit():
            return 411, "An upload must say its length (Content-Length)."
        size, now = int(length), time.monotonic() if now is None else now
        with self.lock:
            for key in [k for k, spent in self.spent.items() if spent[-1][0] < now - self.window]:
                del self.spent[key]  # visitors quiet for a window: forgotten, so the table stays small
            spent = self.spent.setdefault(visitor, deque())
            while spent and spent[0][0] < now - self.window:
                spent.popleft()
            used = sum(n for _, n in spent)
            if used + size > self.budget:
                if not spent:
                    del self.spent[visitor]
                return 429, (
                    f"You have uploaded {used / 2**20:.0f} MiB in the last hour; this app takes at most "
                    f"{self.budget / 2**20:.0f} MiB an hour from a visitor. Try again later."
                )
            spent.append((now, size))
        return None


def _visitor(scope: Any, headers: dict[str, str]) -> str:
    forwarded = [part.strip() for part in headers.get("x-forwarded-for", "").split(",") if part.strip()]
    if forwarded:
        return forwarded[-1]
    client = scope.get("client")
    return str(client[0]) if client else "unknown"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serve the aksis demo (the Hugging Face Space app).")
    parser.add_argument("--model", help="the model shown first: a local folder or a Hub id (default: AKSIS_MODEL)")
    parser.add_argument("--checkpoints", help="where local models are found and trained (default: ./checkpoints)")
    parser.add_argument("--host", default=None, help="address to serve on (default: 127.0.0.1; a Space sets it)")
    parser.add_argument("--port", type=int, default=None, help="port (default: 7860, or GRADIO_SERVER_PORT)")
    parser.add_argument("--share", action="store_true", help="also serve through a public gradio.live link")
    args = parser.parse_args(argv)
    # aksis's own messages (models loaded, training progress) as plain lines on stderr; only the "aksis" logger
    # gets a handler, as in the CLI, so other libraries' messages are not printed twice.
    aksis_log = logging.getLogger("aksis")
    if not aksis_log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        aksis_log.addHandler(handler)
        aksis_log.setLevel(logging.INFO)
    try:
        settings = AppSettings.from_env()
    except ValueError as err:
        parser.error(str(err))
    if args.model:
        settings.model = args.model
    if args.checkpoints:
        from pathlib import Path

        settings.checkpoints_dir = Path(args.checkpoints)
    demo = build_app(settings)
    demo.launch(server_name=args.host, server_port=args.port, share=args.share, **launch_options(settings))
