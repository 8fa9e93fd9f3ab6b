"""What every tab of the app shares: the settings (read from the environment once, at start), the model store,
the model picker, the helpers that turn library errors into messages in the UI, and the checks of what a
visitor types (or an API caller sends) as a number: `to_number`, `to_whole`, `to_max_new_tokens`, `to_seed`.

A tab module exposes `build(ctx)`, called inside the app's `gr.Blocks`; it adds one `gr.Tab` and wires its
events. Event handlers take the picker's value (a model source) as an input and fetch the model from
`ctx.store`, so each browser session uses the model it picked, and a model switch in one session never
disturbs a generation running in another.
"""

from __future__ import annotations

import functools
import inspect
import math
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

import torch

from aksis.quantize import DTYPES, SCHEMES

if TYPE_CHECKING:
    import gradio as gr

    from aksis.config import GenerationConfig
    from aksis.ui.feedback import FeedbackLog
    from aksis.ui.models import LoadedModel, ModelStore

F = TypeVar("F", bound=Callable[..., Any])

# The most new tokens one request of the app may ask for: enough for long stories, small enough that one
# visitor cannot hold a worker for minutes on a CPU Space.
APP_MAX_NEW_TOKENS = 1024


REQUEST_SECONDS = 180  # on a public Space: a request that runs a model stops after this, and frees its worker


@dataclass
class AppSettings:
    """The app's settings. A Space sets them as environment variables (see `from_env`)."""

    model: str | None = None  # AKSIS_MODEL: the model shown first (a local folder or a Hub id[@revision])
    checkpoints_dir: Path = Path("checkpoints")  # AKSIS_CHECKPOINTS: where local models are found and trained
    hub_author: str | None = None  # AKSIS_HUB_AUTHOR (on a Space, its owner): whose aksis models the Hub lists
    feedback_file: Path = Path("feedback/feedback.jsonl")  # AKSIS_FEEDBACK_FILE: votes and likes, one per line
    feedback_repo: str | None = None  # AKSIS_FEEDBACK_REPO: a Hub dataset repo that receives the feedback
    cache_mb: int = 2048  # AKSIS_MODEL_CACHE_MB: bound on the weights of the models kept loaded
    concurrency: int = 4  # AKSIS_CONCURRENCY: requests served at once (the rest wait in the queue)
    max_new_tokens: int = APP_MAX_NEW_TOKENS
    device: str | None = None  # AKSIS_DEVICE: cpu, cuda, mps; default: the best there is
    # AKSIS_DTYPE: the compute dtype, fp32 or bf16; default: bf16 on a GPU that supports it, else fp32.
    dtype: str | None = None
    # AKSIS_QUANTIZE: none, int8 or int4: full-precision models are quantized to it at load time (aksis.quantize; a
    # free CPU Space runs int8 about twice as fast as fp32); a quantized checkpoint runs as it is stored.
    quantize: str = "none"
    # AKSIS_COMPILE=0/1: on a CPU with aksis's kernels, each model's decode step at batch 1 is compiled ahead of time
    # when it is loaded (aksis.aot: 7-25 s the first time for an architecture, then found on disk), which makes
    # replies faster at every precision (README, Performance). Off by default; elsewhere it changes nothing.
    compile: bool = False
    # AKSIS_LOCAL_PATHS=0/1: whether visitors may name files and folders of this machine (a dataset to score, a
    # model outside the checkpoints folder). Off by default on a Space (SPACE_ID is set), where visitors are strangers.
    local_paths: bool = True
    # On a Space: AKSIS_RUN_HOURS, how long a visitor's run is kept (see aksis.ui.space_runs); SPACE_AUTHOR_NAME (set
    # by the Hub), the owner, who may push any run with a token of theirs.
    run_hours: int = 24
    space_owner: str | None = None
    # AKSIS_REQUEST_SECONDS: how long one request may run a model (generation, chat, arena, scoring); by default
    # unbounded in one's own app and REQUEST_SECONDS on a public Space (see `request_limit`).
    request_seconds: int | None = None
    upload_mb: int = 200  # AKSIS_UPLOAD_MB: what one visitor may upload in an hour (see aksis.ui.UploadBudget)

    def request_limit(self) -> int | None:
        """The time bound of a request that runs a model: the setting, else REQUEST_SECONDS on a public Space."""
        if self.request_seconds is not None:
            return self.request_seconds
        return None if self.local_paths else REQUEST_SECONDS

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> AppSettings:
        env = os.environ if environ is None else environ
        defaults = cls()

        def number(name: str, default: int) -> int:
            text = env.get(name)
            if not text:
                return default
            try:
                value = int(text)
            except ValueError:
                raise ValueError(f"{name}={text!r} is not a whole number") from None
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
            return value

        def choice(name: str, options: tuple[str, ...], default: str | None) -> str | None:
            text = env.get(name, "").strip().lower()
            if not text:
                return default
            if text not in options:
                raise ValueError(f"{name}={env[name][:40]!r}: use one of {', '.join(options)}")
            return text

        def flag(name: str, default: bool) -> bool:
            text = env.get(name, "").strip().lower()
            if not text:
                return default
            if text not in ("0", "1", "true", "false", "yes", "no"):
                raise ValueError(f"{name}={env[name]!r}: use 1 (on) or 0 (off)")
            return text in ("1", "true", "yes")

        return cls(
            model=env.get("AKSIS_MODEL") or None,
            checkpoints_dir=Path(env.get("AKSIS_CHECKPOINTS") or defaults.checkpoints_dir),
            hub_author=env.get("AKSIS_HUB_AUTHOR") or env.get("SPACE_AUTHOR_NAME") or None,
            feedback_file=Path(env.get("AKSIS_FEEDBACK_FILE") or defaults.feedback_file),
            feedback_repo=env.get("AKSIS_FEEDBACK_REPO") or None,
            cache_mb=number("AKSIS_MODEL_CACHE_MB", defaults.cache_mb),
            concurrency=number("AKSIS_CONCURRENCY", defaults.concurrency),
            device=env.get("AKSIS_DEVICE") or None,
            dtype=choice("AKSIS_DTYPE", tuple(DTYPES), None),
            quantize=choice("AKSIS_QUANTIZE", SCHEMES, defaults.quantize) or defaults.quantize,
            compile=flag("AKSIS_COMPILE", defaults.compile),
            local_paths=flag("AKSIS_LOCAL_PATHS", default="SPACE_ID" not in env),
            run_hours=number("AKSIS_RUN_HOURS", defaults.run_hours),
            space_owner=env.get("SPACE_AUTHOR_NAME") or None,
            request_seconds=number("AKSIS_REQUEST_SECONDS", 0) or None,
            upload_mb=number("AKSIS_UPLOAD_MB", defaults.upload_mb),
        )


@dataclass
class AppContext:
    """Built once by `aksis.ui.build_app` and handed to every tab's `build`."""

    settings: AppSettings
    store: ModelStore
    feedback: FeedbackLog
    picker: gr.Dropdown  # value: the model source this browser session uses
    # Hooks the Train tab (and the first-start banner) use to refresh the picker after a run.
    welcome_button: gr.Button | None = None  # "Train a model now" on the first-start banner, when shown
    extra: dict[str, Any] = field(default_factory=dict)  # components a tab offers to others, by name

    @property
    def device(self) -> torch.device:
        return self.store.device


@contextmanager
def user_errors(action: str) -> Iterator[None]:
    """Turn the library's errors (bad input, missing checkpoints, Hub failures) into a `gr.Error`, which the UI
    shows as a message and the API returns as an error, while the app goes on serving."""
    import gradio as gr

    from aksis.chat_template import ChatError
    from aksis.checkpoint import CheckpointError
    from aksis.generation import GenerationError
    from aksis.hub import HubError

    try:
        yield
    except gr.Error:
        raise
    except (ValueError, CheckpointError, GenerationError, HubError, ChatError, OSError) as err:
        raise gr.Error(bounded(f"Could not {action}: {err}"), print_exception=False) from err


# ----- numbers from the inputs -----


def echo(value: Any, limit: int = 60) -> str:
    """A visitor's value, as a message quotes it: its repr, cut to `limit` characters (a request may send megabytes
    where a word was expected, and neither the answer nor the log should carry them back)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 1]}…"


def text_value(value: Any, what: str) -> str:
    """A text input as a string ("" for nothing). A browser sends text; an API caller may send any JSON value, which
    is refused naming the input."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    raise input_error(f"The {what} must be text, got {echo(value)}.")


def input_error(message: str) -> gr.Error:
    """A message for the UI (or the API caller); bad input is no server fault, so no traceback in the log."""
    import gradio as gr

    return gr.Error(bounded(message), print_exception=False)


WORD_LIMIT = 80  # characters of a message's longest run without a space (a path, an id, a value sent as one)
MESSAGE_LIMIT = 1_000  # characters of a whole message a visitor gets


def bounded(message: str) -> str:
    """A message as a visitor gets it, whatever the values it quotes: an error of the library may name what the
    visitor sent (a path, a repo id) at any length, so every run of more than WORD_LIMIT characters without a space
    is cut to its start, and the whole message to MESSAGE_LIMIT characters."""
    message = re.sub(rf"\S{{{WORD_LIMIT + 1},}}", lambda m: m.group()[: WORD_LIMIT - 1] + "…", message)
    return message if len(message) <= MESSAGE_LIMIT else message[: MESSAGE_LIMIT - 1] + "…"


def _show(bound: float) -> str:
    """A bound as people write it: 2, not 2.0."""
    return str(int(bound)) if float(bound).is_integer() else str(bound)


def _to_float(value: Any, name: str, whole: bool, low: float | None, high: float | None) -> float:
    """`value` as a float that is finite, whole when `whole`, and within [low, high] where given; otherwise a
    gr.Error that names the input and what it accepts ("a whole number from 1 to 100")."""
    accepted = "a whole number" if whole else "a number"
    if low is not None and high is not None:
        accepted += f" from {_show(low)} to {_show(high)}"
    elif low is not None:
        accepted += f" of {_show(low)} or more"
    elif high is not None:
        accepted += f" of {_show(high)} or less"
    # The API may send anything; True would pass as 1 and a list would fail with Python's own message.
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise input_error(f"{name} must be {accepted}, got {echo(value)}")
    try:
        number = float(value)
    except ValueError:
        raise input_error(f"{name} must be {accepted}, got {echo(value)}") from None
    if not math.isfinite(number):
        raise input_error(f"{name} must be a finite {accepted.removeprefix('a ')}, got {echo(value)}")
    if (whole and number != int(number)) or (low is not None and number < low) or (high is not None and number > high):
        raise input_error(f"{name} must be {accepted}, got {echo(value)}")
    return number


def to_number(value: Any, name: str, low: float | None = None, high: float | None = None) -> float:
    """A finite number from an input, from `low` to `high` where given, or a gr.Error that names the input."""
    return _to_float(value, name, False, low, high)


def to_whole(value: Any, name: str, low: int | None = None, high: int | None = None) -> int:
    """A whole number from an input (5.0, as gr.Number sends it, is 5), from `low` to `high` where given, or a
    gr.Error that names the input."""
    return int(_to_float(value, name, True, low, high))


def to_max_new_tokens(value: Any, limit: int) -> int:
    """Max new tokens from an input: 1 to `limit`, the app's limit (settings.max_new_tokens)."""
    if value is None:
        raise input_error(f"max new tokens is missing: give a number from 1 to {limit}")
    n = to_whole(value, "max new tokens")
    if not 1 <= n <= limit:
        raise input_error(f"max new tokens must be between 1 and {limit} (this app's limit), got {n}")
    return n


MAX_SEED = 2**63 - 1  # what torch.Generator.manual_seed takes


def to_seed(value: Any) -> int | None:
    """A seed from an input; blank or negative means none (fresh random draws)."""
    if value is None or value == "" or to_number(value, "seed") < 0:
        return None
    return to_whole(value, "seed", 0, MAX_SEED)


def spread(param: str, cls: type, names: Sequence[str]) -> Callable[[F], F]:
    """Decorate an event function whose parameter `param` is a dataclass `cls` (a request's settings, as sent): the
    function Gradio sees takes the fields `names` in its place, one parameter each, and builds the `cls` from them.
    Gradio passes an event's inputs one by one and names an API endpoint's parameters after its function's; so a
    setting is declared once, as a field, and each endpoint that offers it lists its name."""
    unknown = set(names) - {f.name for f in fields(cls)}
    if unknown:
        raise ValueError(f"not fields of {cls.__name__}: {', '.join(sorted(unknown))}")

    def decorate(fn: F) -> F:
        signature = inspect.signature(fn)
        params = list(signature.parameters.values())
        at = [p.name for p in params].index(param)
        spread_out = [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=Any) for n in names]
        flat = signature.replace(parameters=[*params[:at], *spread_out, *params[at + 1 :]])

        def call(*args: Any, **kwargs: Any) -> Any:
            given = flat.bind(*args, **kwargs).arguments
            value = cls(**{n: given.pop(n) for n in names})
            return fn(**given, **{param: value})

        return cast(F, _function_like(fn, call, flat))

    return decorate


def bound(fn: Callable[..., Any], *leading: Any, **defaults: Any) -> Callable[..., Any]:
    """`fn` with its first parameters given (`leading`), as `functools.partial(fn, *leading)`, but a plain function:
    Gradio finds a `gr.Request` parameter by its type hint, which it cannot read through a partial. `defaults`
    replace the defaults of parameters in the signature Gradio reads: a `progress` parameter is given its
    `gr.Progress` here, when the app is built (one that tracks tqdm patches tqdm as it is made: not at import)."""
    signature = inspect.signature(fn)
    params = [
        p.replace(default=defaults[p.name]) if p.name in defaults else p
        for p in list(signature.parameters.values())[len(leading) :]
    ]
    return _function_like(
        fn, lambda *args, **kwargs: fn(*leading, *args, **kwargs), signature.replace(parameters=params)
    )


def _function_like(
    fn: Callable[..., Any], call: Callable[..., Any], signature: inspect.Signature
) -> Callable[..., Any]:
    """A function that does `call`, with `signature`, and `fn`'s name, docs and type hints (through __wrapped__);
    a generator function when `fn` is one, since Gradio streams what those yield."""
    if inspect.isgeneratorfunction(fn):

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            yield from call(*args, **kwargs)

    else:

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            return call(*args, **kwargs)

    wrapper.__signature__ = signature  # type: ignore[attr-defined]
    return wrapper


def on_gpu(fn: F) -> F:
    """On a ZeroGPU Space (the `spaces` package is importable), ask for a GPU while `fn` runs; elsewhere `fn`
    unchanged. The device itself is chosen once, by the model store."""
    try:
        import spaces  # type: ignore[import-not-found]
    except ImportError:
        return fn
    return cast(F, spaces.GPU(fn))


# ----- time -----


def timed(config: GenerationConfig, seconds: float | None) -> GenerationConfig:
    """`config` bounded to `seconds` of generation (the app's time limit per request); as is without one."""
    return config if seconds is None else replace(config, max_time=float(seconds))


def out_of_time(seconds: float | None) -> str:
    """What a request that reached the time limit says."""
    return f"Stopped after {seconds:g} s, this app's time limit per request."


# ----- uploads and long text -----

# The longest prompt or message the app takes: far more than any context here, and small enough to tokenize at once.
MAX_PROMPT_CHARS = 20_000


def check_prompt(text: Any, what: str = "prompt") -> str:
    """A prompt from an input: non-empty text of at most MAX_PROMPT_CHARS characters (a browser keeps to a textbox's
    limit, an API caller need not), or an input error naming what to do."""
    if not isinstance(text, str) or not text.strip():
        raise input_error(f"The {what} is empty: type some text.")
    if len(text) > MAX_PROMPT_CHARS:
        raise input_error(f"The {what} has {len(text):,} characters; this app takes at most {MAX_PROMPT_CHARS:,}.")
    return text


def read_text_upload(path: str | Path | None, what: str, max_bytes: int) -> str:
    """The text of an uploaded file, or an input error that says why not: none uploaded, larger than `max_bytes`,
    binary (it holds NUL bytes, as images, archives, PDFs and UTF-16 text do), or not UTF-8. A leading byte-order
    mark is dropped."""
    if not path or not isinstance(path, str | Path):
        raise input_error(f"No {what} uploaded: choose a file first.")
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise input_error(
                f"{path.name} is {size / 2**20:.1f} MiB; the {what} may be at most {max_bytes / 2**20:.0f} MiB."
            )
        raw = path.read_bytes()
    except OSError as err:
        raise input_error(f"Could not read {path.name}: {err.strerror or err}. Upload it again.") from None
    if b"\0" in raw:
        raise input_error(f"{path.name} looks binary (it holds NUL bytes), not text: upload a UTF-8 text file.")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise input_error(
            f"{path.name} is not UTF-8 text (byte 0x{raw[err.start]:02x} at offset {err.start}): save it as UTF-8."
        ) from None


# ----- model switches -----


def quietly_get(store: ModelStore, source: str | None) -> LoadedModel | None:
    """The model of `source`, or None where it cannot be loaded (for the same errors `user_errors` turns into
    messages). For the events that follow the picker (filling sliders, details): the picker's own load event
    already tells the visitor why a model failed, so these must not say it once more."""
    import gradio as gr

    try:
        with user_errors("load the model"):
            return store.get(source)
    except gr.Error:
        return None
