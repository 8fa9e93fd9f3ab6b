"""Hugging Face chat templates: the Jinja `chat_template` of a model's tokenizer_config.json, rendered as
transformers' `apply_chat_template(..., tokenize=False)` renders it, and safe to run when the repo is hostile.

Rendered like transformers (read from its `_compile_jinja_template` and `render_jinja_template`): an
`ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)` with loop controls and the `{% generation %}`
tag; a `tojson` filter that leaves `<`, `>`, `&` and non-ASCII text as they are (`ensure_ascii=False`) and takes
`indent`, `separators` and `sort_keys`; the globals `raise_exception(message)`, `strftime_now(format)`, a `dict`
that is only a constructor and a `namespace` that refuses names starting with "_". Messages reach the template as
plain dicts without their None values, `tools` and `documents` are None unless given. Unlike transformers,
`bos_token` and `eos_token` are always defined (empty when the model has none), `lipsum` is gone (it writes text
in pure Python, out of reach of the time check), and `strftime_now` reads the clock once per call, so one
conversation rendered piecewise by `assistant_spans` has one date.

The sandbox keeps a template away from Python's internals, not from memory or time, so a render is bounded too:

- time: `max_seconds` for one call (`render`, or all of `assistant_spans`), checked at each output chunk, loop
  step, call, filter and operator. A single slow built-in step (sorting a long list) can run past it by its own
  length; no step a template can write from bounded inputs takes long.
- output: `max_chars` characters in all.
- one value: an operation that can make text or a list much bigger than its inputs (`*`, `**`, `+`, `%`, `~`, a
  list or dict written in the template, a call, a filter, printing) is refused before it runs if its result would
  pass `max_chars`. Sizes are counted as the text a value becomes, so `[x, x]` nested 60 times (2**60 copies of
  x in a few bytes) cannot be printed or passed on, and integers may not pass `_MAX_INT_BITS`.

Any failure (a syntax error, `raise_exception`, an undefined attribute, the sandbox, a bound) is a `ChatError`
whose one-line message says that the model's chat template failed and why.
"""

from __future__ import annotations

import inspect
import json
import math
import re
import time
from collections.abc import Callable, Generator, Iterable, Iterator, KeysView, Mapping, Sequence, ValuesView
from collections.abc import ItemsView as ItemsViewABC
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime
from functools import wraps
from typing import Any, cast

from jinja2 import nodes, pass_environment, pass_eval_context
from jinja2.compiler import CodeGenerator, Frame
from jinja2.exceptions import SecurityError, TemplateError, TemplateSyntaxError
from jinja2.ext import Extension, loopcontrols
from jinja2.nodes import EvalContext
from jinja2.parser import Parser
from jinja2.runtime import Context, Macro, markup_join, str_join
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace
from jinja2.visitor import NodeTransformer

from aksis.chat_template import ChatError, Message, render, stop_token_ids
from aksis.hf_tokenizer import HFTokenizer
from aksis.tokenizer import Tokenizer

MAX_RENDER_CHARS = 1_000_000
MAX_RENDER_SECONDS = 2.0
MAX_TEMPLATE_CHARS = 200_000  # the longest templates on the Hub (tool-calling ones) are a few tens of thousands
_MAX_INT_BITS = 1 << 16  # Python refuses to print an int of more than 4300 digits (~14,000 bits) anyway

NOT_INCREMENTAL = (
    "this chat template does not render conversations incrementally, so the assistant's tokens cannot be found"
)


_SEQUENCES = (str, bytes, list, tuple)


class _LimitExceeded(Exception):
    """A bound was passed. Not a TemplateError, and not a ValueError or TypeError, which filters like `int` catch."""


@dataclass
class _Bounds:
    """What one call may use, and the time it started at (shared through `_BOUNDS` by all its renders)."""

    max_chars: int
    max_seconds: float
    deadline: float = math.inf
    now: datetime | None = None

    def tick(self) -> None:
        if time.monotonic() > self.deadline:
            raise _LimitExceeded(f"it ran for more than {self.max_seconds:g} s")

    def fit(self, chars: int, what: str) -> None:
        if chars > self.max_chars:
            raise _LimitExceeded(f"{what} would pass {self.max_chars:,} characters")


_BOUNDS: ContextVar[_Bounds | None] = ContextVar("aksis_jinja_bounds", default=None)


def _text_size(value: Any, limit: int) -> int:
    """About how many characters `str(value)` has, counted up to just past `limit`. A part shared by a container
    counts each time it appears, as str() writes it each time: [x, x] nested 60 times is 2**60 times x in print,
    though it holds only 60 small lists."""
    if isinstance(value, str):  # most values: no need for the walk below
        return len(value)
    memo: dict[int, int] = {}  # id -> size, of containers reachable from `value` (so alive while we count)

    def size(x: Any) -> int:
        if isinstance(x, str):
            return len(x)
        if isinstance(x, bool) or x is None:
            return 5
        if isinstance(x, int):
            return x.bit_length() * 3 // 10 + 2
        if isinstance(x, float):
            return 24
        if isinstance(x, bytes):
            return 4 * len(x)
        if not isinstance(x, (list, tuple, set, frozenset, dict, Namespace, KeysView, ValuesView, ItemsViewABC)):
            return 64  # a Macro, a loop, Undefined...: a short repr
        key = id(x)
        if key in memo:
            return memo[key]
        memo[key] = 8  # a container inside itself prints as [...]
        total = 2
        if isinstance(x, Namespace):
            x = x._Namespace__attrs  # what its repr prints
        pairs = x.items() if isinstance(x, dict) else x if isinstance(x, ItemsViewABC) else None
        if pairs is not None:
            for name, item in pairs:
                total += size(name) + size(item) + 4
                if total > limit:
                    break
        else:
            for item in x:
                total += size(item) + 2
                if total > limit:
                    break
        memo[key] = total
        return total

    try:
        return size(value)
    except RecursionError:
        return limit + 1


def _number(x: Any) -> int:
    """How much a filter or method argument can multiply its input by: an int as a width or count, text by its
    length (a separator, an indent), anything else by the text it becomes."""
    if isinstance(x, int) and not isinstance(x, bool):
        return abs(x)
    return len(x) if isinstance(x, str) else _text_size(x, MAX_RENDER_CHARS * 10)


_SPEC = re.compile(r"%(?:\([^)]*\))?([-#0 +*\d.]*)|\{[^{}]*?(:[^{}]*)?\}")  # "%-10.3s", "{0:>10}"
_NESTED_SPEC = re.compile(r":[^{}]*\{")  # "{:{}}": a width taken from the arguments


def _format_size(fmt: str | bytes, args: Sequence[Any], kwargs: Mapping[str, Any], limit: int) -> int:
    """Characters of `fmt % args`, `fmt.format(*args, **kwargs)` or `fmt|format(...)`, at most."""
    if isinstance(fmt, bytes):
        fmt = fmt.decode("latin-1")
    widths = (n for spec in _SPEC.finditer(fmt) for n in re.findall(r"\d+", spec.group(1) or spec.group(2) or ""))
    if any(len(n) > 9 or int(n) > limit for n in widths):  # "%999999999s", "{:>999999999}"
        return limit + 1
    values = [*args, *kwargs.values()]
    takes_width = "*" in fmt or _NESTED_SPEC.search(fmt) is not None
    if takes_width and any(isinstance(v, int) and _number(v) > limit for v in values):
        return limit + 1
    # A named or numbered field can repeat an argument: "%(a)s%(a)s", "{0}{0}".
    repeats = fmt.count("%") + fmt.count("{") if kwargs or re.search(r"%\(|\{\w", fmt) else 1
    return len(fmt) + sum(_text_size(v, limit) for v in values) * max(1, repeats)


def _str_method_size(s: Any, name: str, args: Sequence[Any], kwargs: Mapping[str, Any], limit: int) -> int:
    """Characters the str (or bytes) method `s.name(*args, **kwargs)` can return, at most (join is checked apart)."""
    n = len(s)
    if name == "replace" and len(args) >= 2 and isinstance(args[0], type(s)) and isinstance(args[1], type(s)):
        old, new = args[0], args[1]
        times = s.count(old) if old else n + 1
        if len(args) > 2 and isinstance(args[2], int) and args[2] >= 0:
            times = min(times, args[2])
        return n + times * max(0, len(new) - len(old))
    if name in ("center", "ljust", "rjust", "zfill") and args:
        return max(n, _number(args[0]))
    if name == "expandtabs":
        return n + s.count("\t" if isinstance(s, str) else b"\t") * _number(
            args[0] if args else kwargs.get("tabsize", 8)
        )
    if name == "format":
        return _format_size(s, args, kwargs, limit)
    if name == "format_map":
        return _format_size(s, (), args[0] if args and isinstance(args[0], Mapping) else {}, limit)
    if name == "translate":  # each character can become any of the table's values
        table = args[0] if args else {}
        longest = max((_text_size(v, limit) for v in table.values()), default=1) if isinstance(table, dict) else 1
        return n * max(1, longest)
    grows = 4 if name == "encode" else 3 if name in _CASE_METHODS else 1  # "ß".upper() is "SS"
    return grows * n + sum(_text_size(a, limit) for a in (*args, *kwargs.values()))


_CASE_METHODS = frozenset({"capitalize", "casefold", "lower", "swapcase", "title", "upper"})


# Filters whose size estimate reads an argument by name (binding them takes a few microseconds: not for all).
_NAMED_ARGUMENTS = frozenset(
    {"batch", "center", "format", "indent", "join", "replace", "round", "slice", "sum", "tojson", "truncate"}
    | {"wordwrap"}
)

# Filters that rearrange a value without writing it as text: only their arguments are checked, so a long
# conversation can still be counted and sliced (`messages|length`, `messages|last`).
_SHAPE_FILTERS = frozenset(
    {"abs", "attr", "batch", "count", "d", "default", "dictsort", "first", "float", "groupby", "int", "items", "last"}
    | {"length", "list", "map", "max", "min", "random", "reject", "rejectattr", "reverse", "round", "select"}
    | {"selectattr", "slice", "sort", "sum", "unique"}
)


def _filter_size(name: str, a: Mapping[str, Any], value: Any, params: Sequence[Any], limit: int) -> int:
    """Characters the text filter `name` can return, at most. `a` holds its arguments by name."""
    size = _text_size(value, limit)
    if size > limit:
        return size
    if name == "join":
        return size + len(str(a.get("d", ""))) * len(value)
    if name == "replace":
        s, old, new = str(value), str(a.get("old", "")), str(a.get("new", ""))
        times = s.count(old) if old else len(s) + 1
        return len(s) + times * max(0, len(new) - len(old))
    if name == "indent":
        lines = value.count("\n") + 1 if isinstance(value, str) else size
        return size + _number(a.get("width", 4)) * lines
    if name == "center":
        return max(size, _number(a.get("width", 80)))
    if name == "wordwrap":
        width = max(1, _number(a.get("width", 79)))
        lines = size // width + (value.count("\n") if isinstance(value, str) else size) + 1
        return size + _number(a.get("wrapstring") or "\n") * lines
    if name == "format":
        return _format_size(str(value), a.get("args", ()), a.get("kwargs", {}), limit)
    if name == "truncate":
        return size + _number(a.get("end", "..."))
    if name == "tojson":  # an indent is written once per nesting level on each line, a separator once per item
        separators = a.get("separators") or ()
        widest = max(map(_number, separators), default=0) if isinstance(separators, (list, tuple)) else 0
        return size * (1 + _number(a.get("indent") or 0) + widest)
    if name in ("e", "escape", "forceescape", "urlencode", "pprint"):
        return 12 * size  # "&" becomes "&amp;", "é" becomes "%C3%A9"
    return size * (1 + sum(_number(p) for p in params))  # a parameter can appear once per character


def _sized(value: Any) -> Any:
    """`value` as a list if it is an iterator (like map()'s result), so that it can be measured and then used."""
    return value if isinstance(value, (str, list, tuple, dict, set, frozenset)) else list(value)


class _Guards(NodeTransformer):
    """Routes the operations the sandbox has no hook for through the environment: each loop's iterable (time),
    `~` and each list, tuple and dict written in the template (size)."""

    def __init__(self, environment: _BoundedEnvironment) -> None:
        self.environment = environment

    def hook(self, name: str, args: list[Any], node: nodes.Node) -> nodes.Call:
        call = nodes.Call(nodes.EnvironmentAttribute(name), args, [], None, None, lineno=node.lineno)
        call.set_environment(self.environment)
        return call

    def visit_For(self, node: nodes.For) -> nodes.Node:
        self.generic_visit(node)
        node.iter = self.hook("aksis_steps", [node.iter], node)
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Node:
        self.generic_visit(node)
        return self.hook("aksis_tilde", list(node.nodes), node)

    def visit_List(self, node: nodes.Expr) -> nodes.Node:
        self.generic_visit(node)
        return self.hook("aksis_held", [node], node)

    visit_Dict = visit_List

    def visit_Tuple(self, node: nodes.Tuple) -> nodes.Node:
        self.generic_visit(node)
        return self.hook("aksis_held", [node], node) if node.ctx == "load" else node


class _GuardedCodeGenerator(CodeGenerator):
    def visit_Template(self, node: nodes.Template, frame: Frame | None = None) -> None:
        assert isinstance(self.environment, _BoundedEnvironment)
        _Guards(self.environment).visit(node)
        super().visit_Template(node, frame)


class _GenerationTag(Extension):
    """`{% generation %}...{% endgeneration %}` marks the assistant's text in some templates (transformers uses it
    for `return_assistant_tokens_mask`); aksis finds that text by rendering (`assistant_spans`), so the tag only
    renders its body, inside a call block as transformers' does."""

    tags = {"generation"}  # noqa: RUF012 (Extension's own declaration)

    def parse(self, parser: Parser) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Macro) -> str:
        return str(caller())


class _TemplateDict:
    """The `dict` global: builds dicts but, unlike the `dict` type, has no attributes that lead elsewhere."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(Namespace):
    """The `namespace` global, refusing names that start with "_" (the way to Python's internals)."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # Namespace's own signature, so that `self=` is a name
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for name in attrs:
            _TemplateNamespace._check(name)
        Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check(name)
        Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise SecurityError(f"a namespace attribute may not start with '_', got {name!r}")


def _raise_exception(message: Any) -> None:
    raise TemplateError(message)


def _tojson(
    x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys: bool = False
) -> str:
    # Jinja's own tojson escapes <, >, & and ' for HTML; chat templates (and transformers) want plain JSON.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class _BoundedEnvironment(ImmutableSandboxedEnvironment):
    """transformers' chat-template environment, with the bounds of the module docstring."""

    intercepted_binops = frozenset(["+", "*", "**", "%"])  # also keeps them from being folded at compile time
    code_generator_class = _GuardedCodeGenerator
    aksis_steps: Callable[..., Any]
    aksis_tilde: Callable[..., Any]
    aksis_held: Callable[..., Any]

    def __init__(self, max_chars: int, max_seconds: float) -> None:
        super().__init__(
            trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols, _GenerationTag], finalize=self._printable
        )
        self.idle = _Bounds(max_chars, max_seconds)  # outside a call: compiling, folding constants
        self.aksis_steps, self.aksis_tilde, self.aksis_held = _steps, _tilde, _held
        self._hooks = (_steps, _tilde, _held)
        self.concat = self._concat  # type: ignore[method-assign]  # joins the output of a macro, a block, a filter block
        self.filters["tojson"] = _tojson
        self.filters = {name: self._guard_filter(name, f) for name, f in self.filters.items()}
        self.globals.pop("lipsum", None)
        self.globals.update(
            raise_exception=_raise_exception,
            strftime_now=self._strftime_now,
            dict=_TemplateDict(),
            namespace=_TemplateNamespace,
        )

    def bounds(self) -> _Bounds:
        return _BOUNDS.get() or self.idle

    def _strftime_now(self, format: str) -> str:
        bounds = self.bounds()
        bounds.fit(16 * len(format), "strftime_now's date")  # "%c" writes 24 characters
        return (bounds.now or datetime.now()).strftime(format)

    def _printable(self, value: Any) -> Any:
        bounds = self.bounds()
        if not isinstance(value, str):
            bounds.fit(_text_size(value, bounds.max_chars), "a printed value")
        return value

    def _concat(self, parts: Iterable[str]) -> str:
        parts = list(parts)
        self.bounds().fit(sum(map(len, parts)), "a block's text")
        return "".join(parts)

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        bounds = self.bounds()
        bounds.tick()
        limit = bounds.max_chars
        ints = isinstance(left, int) and isinstance(right, int)
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, _SEQUENCES) and isinstance(n, int):
                    bounds.fit(_text_size(seq, limit) * max(n, 0), "a repeated text or list")
            if ints and left.bit_length() + right.bit_length() > _MAX_INT_BITS:
                raise _LimitExceeded(f"a product would pass {_MAX_INT_BITS:,} bits")
        elif operator == "**" and ints and right > 0 and abs(left) > 1:
            if left.bit_length() * right > _MAX_INT_BITS:
                raise _LimitExceeded(f"a power would pass {_MAX_INT_BITS:,} bits")
        elif operator == "+" and isinstance(left, _SEQUENCES) and isinstance(right, _SEQUENCES):
            bounds.fit(_text_size(left, limit) + _text_size(right, limit), "a sum of texts or lists")
        elif operator == "%" and isinstance(left, (str, bytes)):
            args = right if isinstance(right, tuple) else () if isinstance(right, Mapping) else (right,)
            kwargs = right if isinstance(right, Mapping) else {}
            bounds.fit(_format_size(left, args, kwargs, limit), "a formatted text")
        return super().call_binop(context, operator, left, right)

    def call(self, context: Context, obj: Any, /, *args: Any, **kwargs: Any) -> Any:
        if any(obj is hook for hook in self._hooks):
            return context.call(obj, *args, **kwargs)
        bounds = self.bounds()
        bounds.tick()
        limit = bounds.max_chars
        named = {k: v for k, v in kwargs.items() if k not in ("_loop_vars", "_block_vars")}
        method = getattr(obj, "__wrapped__", obj)  # the sandbox wraps str.format in a function of its own
        owner = getattr(method, "__self__", None)
        if isinstance(owner, (str, bytes)) and method.__name__ == "join" and args:
            items = _sized(args[0])
            bounds.fit(sum(_text_size(i, limit) for i in items) + len(owner) * len(items), "a joined text")
            args = (items, *args[1:])
        elif isinstance(owner, (str, bytes)):
            bounds.fit(_str_method_size(owner, method.__name__, args, named, limit), f"{method.__name__}()'s text")
        else:  # a macro, namespace(), dict(): what it is given can be kept, so it may not be too big to print
            bounds.fit(sum(_text_size(a, limit) for a in (*args, *named.values())), "a call's arguments")
        return super().call(context, obj, *args, **kwargs)

    def _guard_filter(self, name: str, func: Callable[..., Any]) -> Callable[..., Any]:
        skip = 1 if getattr(func, "jinja_pass_arg", None) is not None else 0  # the context or environment first
        try:
            signature: inspect.Signature | None = inspect.signature(func)
        except (TypeError, ValueError):  # markupsafe's escape is C code
            signature = None

        @wraps(func)
        def guarded(*args: Any, **kwargs: Any) -> Any:
            bounds = self.bounds()
            bounds.tick()
            limit = bounds.max_chars
            if len(args) <= skip:
                return func(*args, **kwargs)
            if name in ("join", "sum"):  # measure an iterator's items before the filter joins or adds them
                args = (*args[:skip], _sized(args[skip]), *args[skip + 1 :])
            value, params = args[skip], [*args[skip + 1 :], *kwargs.values()]
            a: dict[str, Any] = {}
            if signature is not None and name in _NAMED_ARGUMENTS:
                try:
                    a = signature.bind(*args, **kwargs).arguments
                except TypeError:
                    return func(*args, **kwargs)  # let the filter say what is wrong with its arguments
            if name in _SHAPE_FILTERS:
                counts = [a.get("linecount", 0), a.get("slices", 0)]  # batch(10**9) makes a list that long
                if any(isinstance(c, int) and _number(c) > limit for c in counts):
                    raise _LimitExceeded(f"the {name} filter was given a count over {limit:,}")
                precision = a.get("precision", 0)  # round(5, -10**9) computes 10**(10**9)
                if isinstance(precision, int) and _number(precision) > 1000:
                    raise _LimitExceeded(f"the round filter was given a precision of {precision:,}")
                held = sum(_text_size(p, limit) for p in params)
                if name == "sum" and isinstance(a.get("start"), list):
                    held += _text_size(value, limit)  # adding lists builds one as long as all of them
                bounds.fit(held, f"the {name} filter's arguments")
            else:
                bounds.fit(_filter_size(name, a, value, params, limit), f"the {name} filter's text")
            return func(*args, **kwargs)

        return guarded


@pass_environment
def _steps(environment: _BoundedEnvironment, iterable: Any) -> Iterator[Any]:
    """A loop's items, checking the time before each: loops nest, and an empty body writes no output to check at."""
    bounds = environment.bounds()
    for item in iterable:
        bounds.tick()
        yield item


@pass_eval_context
def _tilde(eval_ctx: EvalContext, *parts: Any) -> str:
    """`a ~ b`: measured first, as the text of a nested list can be far larger than the list."""
    environment = eval_ctx.environment
    assert isinstance(environment, _BoundedEnvironment)
    bounds = environment.bounds()
    bounds.fit(sum(_text_size(p, bounds.max_chars) for p in parts), "a joined text (~)")
    return markup_join(parts) if eval_ctx.autoescape else str_join(parts)


@pass_environment
def _held(environment: _BoundedEnvironment, value: Any) -> Any:
    """A list, tuple or dict written in the template: it may not hold more than could be printed, or a loop could
    chain distinct copies of a long text (`[ns.chain, text[i:]]`) until memory runs out."""
    bounds = environment.bounds()
    bounds.fit(_text_size(value, bounds.max_chars), "a list or dict")
    return value


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _failure(err: Exception) -> ChatError:
    """`err`, raised while rendering, as the ChatError a user reads."""
    if isinstance(err, _LimitExceeded):
        why = str(err)
    elif isinstance(err, SecurityError):
        why = f"the sandbox refused it: {err}"
    elif type(err) is TemplateError:  # raise_exception(): the template's own words
        why = str(err.message)
    else:
        why = f"{type(err).__name__}: {err}"
    return ChatError(f"the model's chat template failed: {_one_line(why)}")


def _plain(value: Any) -> Any:
    """What the template may see: plain JSON-like data (as transformers' `_plain_template_data`), so it cannot
    reach the methods of the caller's objects."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, Message):
        return value.to_dict()
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):  # an IntEnum, say: its methods stay behind
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    return f"<{type(value).__name__}>"


def _message_dict(message: Any, i: int) -> dict[str, Any]:
    if isinstance(message, Message):
        return message.to_dict()
    if isinstance(message, Mapping):
        return {k: _plain(v) for k, v in message.items() if v is not None}  # as transformers: None means absent
    raise ChatError(f"message {i} should be a Message or a dict, got {type(message).__name__}")


class JinjaTemplate:
    """A model's chat template, compiled once. Safe to use from several threads at once."""

    def __init__(
        self, source: str, *, max_chars: int = MAX_RENDER_CHARS, max_seconds: float = MAX_RENDER_SECONDS
    ) -> None:
        if not isinstance(source, str):
            raise ChatError(f"the model's chat template should be text, got {type(source).__name__}")
        if len(source) > MAX_TEMPLATE_CHARS:
            raise ChatError(
                f"the model's chat template failed: it has {len(source):,} characters, more than the "
                f"{MAX_TEMPLATE_CHARS:,} aksis accepts"
            )
        self.source = source
        self.max_chars = max_chars
        self.max_seconds = max_seconds
        environment = _BoundedEnvironment(max_chars, max_seconds)
        try:
            self._template = environment.from_string(source)
        except TemplateSyntaxError as err:
            raise ChatError(
                f"the model's chat template failed to compile: line {err.lineno}: {_one_line(err.message or '')}"
            ) from err
        except Exception as err:  # a template nested past Python's recursion limit, say
            why = _one_line(f"{type(err).__name__}: {err}")
            raise ChatError(f"the model's chat template failed to compile: {why}") from err

    @contextmanager
    def _call(self) -> Iterator[None]:
        """One public call's bounds, shared by the renders it makes: its deadline, and its `strftime_now` time."""
        bounds = _Bounds(self.max_chars, self.max_seconds, time.monotonic() + self.max_seconds, datetime.now())
        token = _BOUNDS.set(bounds)
        try:
            yield
        finally:
            _BOUNDS.reset(token)

    def _render(self, messages: Sequence[Any], variables: dict[str, Any]) -> str:
        bounds = _BOUNDS.get()
        assert bounds is not None
        context = {
            "messages": [_message_dict(m, i) for i, m in enumerate(messages)],
            "tools": None,
            "documents": None,
            **{name: _plain(value) for name, value in variables.items()},
        }
        out: list[str] = []
        length = 0
        chunks = cast("Generator[str, None, None]", self._template.generate(**context))
        try:
            for chunk in chunks:
                length += len(chunk)
                bounds.fit(length, "its output")
                bounds.tick()
                out.append(chunk)
        except Exception as err:  # the template is someone else's code: anything it raises is its failure
            raise _failure(err) from err
        finally:
            chunks.close()
        return "".join(out)

    def render(
        self,
        messages: Sequence[Message] | Sequence[dict[str, Any]],
        *,
        add_generation_prompt: bool = False,
        bos_token: str = "",
        eos_token: str = "",
        **extra: Any,
    ) -> str:
        """The conversation as the template writes it, as `apply_chat_template(..., tokenize=False)` would. `extra`
        are more template variables (`tools=[...]`, `date_string=...`); ChatError if the template fails or passes a
        bound."""
        variables = {"add_generation_prompt": add_generation_prompt, "bos_token": bos_token, "eos_token": eos_token}
        with self._call():
            return self._render(messages, {**variables, **extra})

    def assistant_spans(
        self,
        messages: Sequence[Message] | Sequence[dict[str, Any]],
        *,
        bos_token: str = "",
        eos_token: str = "",
        **extra: Any,
    ) -> tuple[str, list[tuple[int, int]]]:
        """The whole conversation's text (no generation prompt) and, for each assistant message, the [start, end)
        characters of it that the model writes: what chat fine-tuning computes the loss on. Works for any template
        that renders a conversation incrementally:

            prompt = render(messages[:i], add_generation_prompt=True)   what the model is given at inference
            upto   = render(messages[:i + 1])                           ... and the text with its reply

        `prompt` must begin `upto`, and `upto` the whole text; the span is `upto` after `prompt`, so it holds the
        reply and the end-of-turn text the template writes after it ("<|im_end|>\\n"), which the model must learn to
        write. One leniency: whitespace that `upto` ends with but the whole text does not have there (a template
        that writes a newline after the last message only) is left out of the span. ChatError otherwise."""
        conversation = list(messages)
        variables = {"bos_token": bos_token, "eos_token": eos_token, **extra}
        with self._call():
            full = self._render(conversation, {**variables, "add_generation_prompt": False})
            spans: list[tuple[int, int]] = []
            for i, message in enumerate(conversation):
                if _message_dict(message, i).get("role") != "assistant":
                    continue
                prompt = self._render(conversation[:i], {**variables, "add_generation_prompt": True})
                upto = self._render(conversation[: i + 1], {**variables, "add_generation_prompt": False})
                end = _agreed_end(upto, full)
                if end is None or not upto.startswith(prompt) or end < len(prompt):
                    raise ChatError(NOT_INCREMENTAL)
                if spans and len(prompt) < spans[-1][1]:
                    raise ChatError(NOT_INCREMENTAL)
                spans.append((len(prompt), end))
        return full, spans


def _agreed_end(upto: str, full: str) -> int | None:
    """len(upto) if `full` begins with it; where they part if `upto` differs from `full` only in whitespace at its
    end; else None."""
    if full.startswith(upto):
        return len(upto)
    text = upto.rstrip()
    if not full.startswith(text):
        return None
    end = len(text)
    while end < len(upto) and end < len(full) and upto[end] == full[end]:
        end += 1
    return end


def end_of_turn(
    template_source: str | JinjaTemplate, special_tokens: Iterable[str], *, bos_token: str = "", eos_token: str = ""
) -> list[str]:
    """The special tokens the template writes right after an assistant's reply (whitespace between them allowed),
    in order: the tokens that end a reply, to stop generating at. Found by rendering a user message and the reply
    "XYZ"; [] if none follows it. Pass the model's `eos_token` for templates that write it (Zephyr, Mistral)."""
    template = template_source if isinstance(template_source, JinjaTemplate) else JinjaTemplate(template_source)
    reply = "XYZ"
    text = template.render(
        [Message("user", "Hi"), Message("assistant", reply)], bos_token=bos_token, eos_token=eos_token
    )
    at = text.rfind(reply)
    if at < 0:
        return []
    tail = text[at + len(reply) :]
    tokens = sorted({t for t in special_tokens if t}, key=len, reverse=True)  # "<|im_end|>" before "<|im"
    found: list[str] = []
    pos = 0
    while True:
        while pos < len(tail) and tail[pos].isspace():
            pos += 1
        token = next((t for t in tokens if tail.startswith(t, pos)), None)
        if token is None:
            return found
        if token not in found:
            found.append(token)
        pos += len(token)


# ----- a tokenizer's chat format: aksis's own template, or the model's Jinja one -----


@dataclass(frozen=True)
class ModelChat:
    """What a pretrained model's tokenizer says about chat: its compiled template, the texts of its BOS and EOS (the
    template's `bos_token` and `eos_token`), and the ids that end a reply."""

    template: JinjaTemplate
    bos_token: str
    eos_token: str
    stop_ids: frozenset[int]


def model_chat(tokenizer: Tokenizer) -> ModelChat | None:
    """The chat format of a pretrained model's tokenizer (compiled once, kept on the tokenizer), or None for
    aksis's own tokenizers, which use aksis.chat_template. ChatError when the model has no chat template (a base
    model) or its template fails to compile."""
    if not isinstance(tokenizer, HFTokenizer):
        return None
    cached = getattr(tokenizer, "_model_chat", None)
    if isinstance(cached, ModelChat):
        return cached
    if not tokenizer.chat_template:
        raise ChatError(
            f"{tokenizer.name} has no chat template (tokenizer_config.json's chat_template): it is a base model, "
            "made to continue text. Use generate-text, or an instruct version of the model for chat"
        )
    template = JinjaTemplate(tokenizer.chat_template)
    specials = {tokenizer.decode([i]): i for i in tokenizer.special_ids}
    bos = tokenizer.decode([tokenizer.bos_id]) if tokenizer.bos_id is not None else ""
    eos = tokenizer.decode([tokenizer.eot_id])
    turn_ends = end_of_turn(template, specials, bos_token=bos, eos_token=eos)
    chat = ModelChat(template, bos, eos, frozenset({*tokenizer.eos_ids, *(specials[t] for t in turn_ends)}))
    tokenizer._model_chat = chat  # type: ignore[attr-defined]
    return chat


def chat_stop_ids(tokenizer: Tokenizer) -> set[int]:
    """The tokens that end a reply: the model template's end of turn and EOS, or aksis's own (aksis.chat_template)."""
    chat = model_chat(tokenizer)
    return set(chat.stop_ids) if chat else stop_token_ids(tokenizer)


def render_chat(
    tokenizer: Tokenizer, messages: Sequence[Message], *, add_generation_prompt: bool = False
) -> tuple[list[int], list[bool]]:
    """Token ids of `messages` in the tokenizer's chat format, and for each whether it is the assistant's output (what
    chat fine-tuning trains on: its replies and the end-of-turn text after each). aksis's own tokenizers render
    aksis.chat_template's format; a pretrained model's renders its Jinja template, as transformers'
    `apply_chat_template(..., tokenize=True)` would. One difference, on purpose: a special token's spelling inside a
    message stays text (transformers reads it as the token, so a user could close a turn or open a system one)."""
    chat = model_chat(tokenizer)
    if chat is None:
        return render(tokenizer, messages, add_generation_prompt=add_generation_prompt)
    assert isinstance(tokenizer, HFTokenizer)
    variables = {"bos_token": chat.bos_token, "eos_token": chat.eos_token}
    spans: list[tuple[int, int]] = []
    if add_generation_prompt:
        text = chat.template.render(messages, add_generation_prompt=True, **variables)
    else:
        text, spans = chat.template.assistant_spans(messages, **variables)
    ids, offsets = _encode_rendered(tokenizer, text, [m.content for m in messages])
    trained = [any(start <= a < end for start, end in spans) for a, _ in offsets]
    return ids, trained


def _encode_rendered(
    tokenizer: HFTokenizer, text: str, contents: Sequence[str]
) -> tuple[list[int], list[tuple[int, int]]]:
    """Ids and character offsets of a rendered conversation: the template's text with its special tokens read as
    such, the messages' text as ordinary text. When no message spells a special token the two agree, and the whole
    text is encoded at once (exactly transformers' ids); otherwise each message's text is found in the rendered text
    and encoded on its own."""
    spellings = [tokenizer.decode([i]) for i in tokenizer.special_ids]
    if not any(s and s in c for c in contents for s in spellings):
        return tokenizer.encode_with_specials(text)
    regions: list[tuple[int, int]] = []  # the messages' text in `text`, in order
    at = 0
    for content in contents:
        if not content:
            continue
        start = text.find(content, at)
        if start < 0 and content.strip():
            content = content.strip()
            start = text.find(content, at)
        if start < 0:
            raise ChatError(
                "a message spells one of the model's special tokens, and its chat template changes message text so "
                "that aksis cannot keep the spelling as text: remove the special token from the message"
            )
        regions.append((start, start + len(content)))
        at = start + len(content)
    ids: list[int] = []
    offsets: list[tuple[int, int]] = []
    edges = [0, *[x for region in regions for x in region], len(text)]
    for k in range(len(edges) - 1):
        begin, end = edges[k], edges[k + 1]
        if begin == end:
            continue
        piece = text[begin:end]
        part_ids, part_offsets = tokenizer.encode_with_offsets(piece, specials=k % 2 == 0)
        ids += part_ids
        offsets += [(begin + a, begin + b) for a, b in part_offsets]
    return ids, offsets
