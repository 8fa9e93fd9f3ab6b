"""aksis.jinja_template renders Hugging Face chat templates as transformers does, and contains hostile ones.

The templates below are copies of real models' `chat_template`s. transformers renders them from a tokenizer built
here (no network): a one-word WordLevel model with the model's bos and eos tokens.
"""

import re
import time
from datetime import datetime
from typing import Any

import pytest

from aksis import jinja_template
from aksis.chat_template import ChatError, Message
from aksis.jinja_template import MAX_RENDER_SECONDS, NOT_INCREMENTAL, JinjaTemplate, end_of_turn

# HuggingFaceTB/SmolLM2-1.7B-Instruct: ChatML, with a default system prompt.
SMOLLM2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Qwen/Qwen2.5-7B-Instruct, tools branch and default system message included.
QWEN25 = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""  # noqa: E501 (verbatim)

# meta-llama/Llama-3.2-1B-Instruct: today's date from strftime_now, tools as indented JSON.
LLAMA32 = r"""{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- if strftime_now is defined %}
        {%- set date_string = strftime_now("%d %b %Y") %}
    {%- else %}
        {%- set date_string = "26 Jul 2024" %}
    {%- endif %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message #}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{%- if tools is not none %}
    {{- "Environment: ipython\n" }}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\n" }}
{{- "Today Date: " + date_string + "\n\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}

{#- Custom tools are passed in a user message with some extra guidance #}
{%- if tools_in_user_message and not tools is none %}
    {#- Extract the first user message so we can plug it in here #}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
{%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\n\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\n\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
        {{- '{"name": "' + tool_call.name + '", ' }}
        {{- '"parameters": ' }}
        {{- tool_call.arguments | tojson }}
        {{- "}" }}
        {{- "<|eot_id|>" }}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\n\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""  # noqa: E501 (verbatim)

# TinyLlama/TinyLlama-1.1B-Chat-v1.0: Zephyr's template, which relies on trim_blocks.
ZEPHYR = """{% for message in messages %}
{% if message['role'] == 'user' %}
{{ '<|user|>
' + message['content'] + eos_token }}
{% elif message['role'] == 'system' %}
{{ '<|system|>
' + message['content'] + eos_token }}
{% elif message['role'] == 'assistant' %}
{{ '<|assistant|>
'  + message['content'] + eos_token }}
{% endif %}
{% if loop.last and add_generation_prompt %}
{{ '<|assistant|>' }}
{% endif %}
{% endfor %}"""

# mistralai/Mistral-7B-Instruct-v0.1: [INST], and raise_exception() on a bad order of roles.
MISTRAL = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)

# name: (template, bos_token, eos_token, whether it takes a system message)
TEMPLATES = {
    "smollm2": (SMOLLM2, "<|im_start|>", "<|im_end|>", True),
    "qwen2.5": (QWEN25, "", "<|im_end|>", True),
    "llama3.2": (LLAMA32, "<|begin_of_text|>", "<|eot_id|>", True),
    "zephyr": (ZEPHYR, "<s>", "</s>", True),
    "mistral": (MISTRAL, "<s>", "</s>", False),
}

TURNS = [
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "  And 3+3? <b>café</b>  "},
    {"role": "assistant", "content": "6, of course."},
    {"role": "user", "content": "Thanks!"},
]
SYSTEM = {"role": "system", "content": "You are terse."}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": 'Weather in a city <now> & later: "°C", naïve',
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]


class FrozenDatetime(datetime):
    @classmethod
    def now(cls, tz: Any = None) -> "FrozenDatetime":
        return cls(2025, 3, 14, 9, 26, 53)


@pytest.fixture
def frozen_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """strftime_now in both renderers reads 14 Mar 2025."""
    chat_template_utils = pytest.importorskip("transformers.utils.chat_template_utils")
    monkeypatch.setattr(chat_template_utils, "datetime", FrozenDatetime)
    monkeypatch.setattr(jinja_template, "datetime", FrozenDatetime)


def hf_render(source: str, bos: str, eos: str, messages: list[dict[str, Any]], **kwargs: Any) -> str:
    """What transformers' apply_chat_template writes for `messages` with this template and these tokens."""
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    model = tokenizers.models.WordLevel({"[UNK]": 0}, unk_token="[UNK]")
    special = {"bos_token": bos, "eos_token": eos}
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizers.Tokenizer(model), chat_template=source, **{k: v for k, v in special.items() if v}
    )
    return str(tokenizer.apply_chat_template(messages, tokenize=False, **kwargs))


def conversations(takes_system: bool) -> dict[str, list[dict[str, Any]]]:
    found = {"one user message": TURNS[:1], "several turns": TURNS, "ending with a reply": TURNS[:4]}
    if takes_system:
        found["system and several turns"] = [SYSTEM, *TURNS]
    return found


@pytest.mark.usefixtures("frozen_time")
@pytest.mark.parametrize("name", TEMPLATES)
@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_render_writes_what_transformers_writes(name: str, add_generation_prompt: bool) -> None:
    source, bos, eos, takes_system = TEMPLATES[name]
    template = JinjaTemplate(source)
    for label, messages in conversations(takes_system).items():
        ours = template.render(messages, add_generation_prompt=add_generation_prompt, bos_token=bos, eos_token=eos)
        theirs = hf_render(source, bos, eos, messages, add_generation_prompt=add_generation_prompt)
        assert ours == theirs, label


def test_messages_can_be_aksis_messages_or_dicts() -> None:
    template = JinjaTemplate(SMOLLM2)
    as_messages = [Message(m["role"], m["content"]) for m in TURNS]
    assert template.render(as_messages, add_generation_prompt=True) == template.render(
        TURNS, add_generation_prompt=True
    )
    with pytest.raises(ChatError, match="message 1 should be a Message or a dict, got str"):
        template.render([TURNS[0], "hello"])


@pytest.mark.usefixtures("frozen_time")
def test_the_date_comes_from_strftime_now_as_in_transformers() -> None:
    text = JinjaTemplate(LLAMA32).render([SYSTEM, *TURNS[:1]], bos_token="<|begin_of_text|>")
    assert "Cutting Knowledge Date: December 2023\nToday Date: 14 Mar 2025\n\nYou are terse.<|eot_id|>" in text
    # A caller can still state the date, as with transformers.
    pinned = JinjaTemplate(LLAMA32).render(TURNS[:1], date_string="26 Jul 2024")
    assert "Today Date: 26 Jul 2024" in pinned
    assert pinned == hf_render(LLAMA32, "", "", TURNS[:1], date_string="26 Jul 2024")


def test_one_call_reads_the_clock_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """assistant_spans renders a conversation piecewise: a new day between two renders must not split it."""
    days = iter(range(1, 29))

    class TickingDatetime(datetime):
        @classmethod
        def now(cls, tz: Any = None) -> "TickingDatetime":
            return cls(2025, 2, next(days))

    monkeypatch.setattr(jinja_template, "datetime", TickingDatetime)
    template = JinjaTemplate(LLAMA32)
    assert "Today Date: 01 Feb 2025" in template.render(TURNS[:1])
    assert "Today Date: 02 Feb 2025" in template.render(TURNS[:1])
    full, replies = spans_text(template, TURNS)
    assert "Today Date: 03 Feb 2025" in full and replies == ["4.<|eot_id|>", "6, of course.<|eot_id|>"]


def test_strftime_now_reads_the_clock() -> None:
    before = datetime.now().strftime("%d %b %Y")
    text = JinjaTemplate("{{ strftime_now('%d %b %Y') }}").render([])
    assert text in (before, datetime.now().strftime("%d %b %Y"))


TOOL_CALL_CHAT = [
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "content": None,  # as the OpenAI API sends it: dropped, as transformers drops it
        "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}],
    },
    {"role": "tool", "content": "18 °C, <sunny> & dry"},
    {"role": "assistant", "content": "It is 18 °C and sunny."},
]


@pytest.mark.usefixtures("frozen_time")
@pytest.mark.parametrize("name", ["qwen2.5", "llama3.2"])
def test_tools_and_tool_calls_render_as_in_transformers(name: str) -> None:
    """tojson as transformers defines it: no HTML escaping, non-ASCII kept, indent=4 where Llama asks for it."""
    source, bos, eos, _ = TEMPLATES[name]
    for add_generation_prompt in (False, True):
        ours = JinjaTemplate(source).render(
            TOOL_CALL_CHAT, tools=TOOLS, add_generation_prompt=add_generation_prompt, bos_token=bos, eos_token=eos
        )
        theirs = hf_render(source, bos, eos, TOOL_CALL_CHAT, tools=TOOLS, add_generation_prompt=add_generation_prompt)
        assert ours == theirs
        assert '"Weather in a city <now> & later: \\"°C\\", naïve"' in ours
        assert '{"city": "Paris"}' in ours


def test_tojson_takes_transformers_options() -> None:
    source = "{{ messages[0]|tojson(indent=2, sort_keys=true) }}|{{ messages[0]|tojson(separators=(',', ':')) }}"
    message = {"role": "user", "content": "<é>"}
    assert JinjaTemplate(source).render([message]) == hf_render(source, "", "", [message])


def test_the_generation_tag_renders_its_body() -> None:
    """Some templates mark the assistant's text with {% generation %} for transformers' assistant mask."""
    source = (
        "{% for m in messages %}{% if m.role == 'assistant' %}<a>{% generation %}{{ m.content }}</a>"
        "{% endgeneration %}{% else %}<u>{{ m.content }}</u>{% endif %}{% endfor %}"
    )
    assert (
        JinjaTemplate(source).render(TURNS[:2])
        == hf_render(source, "", "", TURNS[:2])
        == "<u>What is 2+2?</u><a>4.</a>"
    )


# Most of what Jinja offers, each piece through the hooks that bound it: loops (recursive, filtered, with else,
# break and continue), macros with callers, ~, literals, operators, formats, string methods and the filters.
SINK = r"""
{%- set ns = namespace(n=0, seen=[]) -%}
{%- macro show(m, sep=': ') -%}
{{ m.role|upper }}{{ sep }}{{ m.content|trim|truncate(20) }}{% if caller is defined %}{{ caller() }}{% endif %}
{%- endmacro -%}
{%- for m in messages if m.role != 'system' recursive -%}
{{ loop.index }}/{{ loop.length }}{{ '!' if loop.last }}{{ loop.cycle('a', 'b') }} {{ show(m) }}|
{%- set ns.n = ns.n + m.content|length %}{% set ns.seen = ns.seen + [m.role] %}
{%- else -%}empty
{%- endfor %}
{{ ns.n }} {{ ns.seen|join(',') }} {{ ns.seen|unique|list }}
{{ messages|map(attribute='role')|select('equalto', 'user')|list|length }}
{{ messages|selectattr('role', 'equalto', 'assistant')|map(attribute='content')|join(' / ') }}
{% set a, b = 1, 2 %}{{ (a, b) }} {{ [a, b] * 2 }} {{ {'k': a, 'v': [b]} }} {{ a ~ b ~ 'c' }}
{{ 2 ** 10 }} {{ 7 // 2 }} {{ 7 % 3 }} {{ 'x' * 3 }} {{ -5|abs }} {{ '42'|int + 1 }} {{ '2.5'|float }}
{{ '%s-%05.1f' % ('a', 3.14159) }} {{ '{}+{:>4}'.format('x', 'y') }} {{ '%(k)s' % {'k': 'v'} }}
{{ "%s and %s"|format('p', 'q') }} {% filter upper %}filtered {{ messages[0].role }}{% endfilter %}
{% call show(messages[0], sep=' => ') %}[caller]{% endcall %}
{{ messages|length }} {{ messages|first|dictsort }} {{ (messages|last).items()|list }} {{ messages[0]|items|list }}
{{ 'a b c d e f'|wordwrap(5) }}|{{ 'line1\nline2'|indent(3, true) }}|{{ 'hi'|center(8) }}
{{ 'a-b'|replace('-', '+') }}|{{ 'the end'|title }} {{ [3, 1, 2]|sort|reverse|list }} {{ [1, 2, 3]|sum }}
{{ [[1], [2]]|sum(start=[]) }} {{ range(7)|batch(3, 0)|list }} {{ range(7)|slice(3)|list }}
{{ [1.256]|map('round', 2)|list }} {{ dict(x=1, y=[2]) }} {{ dict.fromkeys(['a', 'b'], 0) }}
{{ undefined_thing|default('dflt') }} {{ none is none }} {{ 'abc'[1:] }} {{ messages[1:2]|length }}
{{ 'A,B'.split(',')|join('') }} {{ 'x'.join(['1', '2']) }} {{ ' pad '.strip() }} {{ 'abc'.startswith('a') }}
{{ 'é<>&'|tojson }} {{ {'b': 1, 'a': [1, 2]}|tojson(indent=2) }}
{{ raise_exception is defined }} {{ strftime_now is defined }} {{ tools }} {{ documents }}
{{ add_generation_prompt }} {{ bos_token }}{{ eos_token }}
{% for k, v in {'x': 1, 'y': 2}.items() %}{{ k }}={{ v }}{% if not loop.last %}, {% endif %}{% endfor %}
{% for i in range(10) %}{% if i == 3 %}{% break %}{% endif %}{% if i == 1 %}{% continue %}{% endif %}{{ i }}{% endfor %}
{{ [1, [2, [3]]]|string }} {{ ('t', 1)|list }} {{ 'é'|urlencode }} {{ '<b>'|e }} {{ 1234567|filesizeformat }}
{{ 'a  b'|wordcount }}
{% set tree = [{'name': 'a', 'children': [{'name': 'b', 'children': []}]}] %}
{%- for node in tree recursive %}{{ node.name }}({{ loop(node.children) }}){% endfor %}
"""


def test_the_bounds_change_nothing_a_template_can_do() -> None:
    messages = [SYSTEM, *TURNS]
    ours = JinjaTemplate(SINK).render(messages, bos_token="<s>", eos_token="</s>", add_generation_prompt=True)
    assert ours == hf_render(SINK, "<s>", "</s>", messages, add_generation_prompt=True)
    assert "a(b())" in ours and "FILTERED SYSTEM" in ours  # it got to the end


def spans_text(template: JinjaTemplate, messages: list[Any], **kwargs: Any) -> tuple[str, list[str]]:
    full, spans = template.assistant_spans(messages, **kwargs)
    return full, [full[start:end] for start, end in spans]


def test_assistant_spans_in_chatml_hold_each_reply_and_its_end_of_turn() -> None:
    template = JinjaTemplate(SMOLLM2)
    full, replies = spans_text(template, [SYSTEM, *TURNS[:4]])
    assert replies == ["4.<|im_end|>\n", "6, of course.<|im_end|>\n"]
    assert full == template.render([SYSTEM, *TURNS[:4]])
    # The text before a reply is the prompt the model gets at inference.
    _, spans = template.assistant_spans([SYSTEM, *TURNS[:4]])
    assert full[: spans[1][0]] == template.render([SYSTEM, *TURNS[:3]], add_generation_prompt=True)


@pytest.mark.usefixtures("frozen_time")
def test_assistant_spans_in_llama3_take_the_trimmed_reply_and_eot() -> None:
    messages = [SYSTEM, *TURNS[:2], {"role": "user", "content": "More?"}, {"role": "assistant", "content": " Yes. "}]
    full, replies = spans_text(JinjaTemplate(LLAMA32), messages, bos_token="<|begin_of_text|>")
    assert replies == ["4.<|eot_id|>", "Yes.<|eot_id|>"]
    assert full.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n")


@pytest.mark.parametrize(
    ("name", "expected"),
    [("zephyr", ["4.</s>\n", "6, of course.</s>\n"]), ("mistral", ["4.</s>", "6, of course.</s>"])],
)
def test_assistant_spans_follow_the_generation_prompt_of_each_template(name: str, expected: list[str]) -> None:
    source, bos, eos, _ = TEMPLATES[name]
    _, replies = spans_text(JinjaTemplate(source), TURNS, bos_token=bos, eos_token=eos)
    assert replies == expected


def test_assistant_spans_refuse_a_template_that_rewrites_earlier_replies() -> None:
    """Like Qwen3's, which drops the reasoning of replies before the last user message."""
    source = (
        "{% for m in messages %}<{{ m.role }}>{% if m.role == 'assistant' and not loop.last %}"
        "{{ m.content.split('</think>')[-1] }}{% else %}{{ m.content }}{% endif %}</s>{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    messages = [TURNS[0], {"role": "assistant", "content": "<think>2+2</think>4."}, TURNS[2]]
    with pytest.raises(ChatError, match=NOT_INCREMENTAL):
        JinjaTemplate(source).assistant_spans(messages)


def test_assistant_spans_leave_out_whitespace_written_only_after_the_last_message() -> None:
    source = (
        "{% for m in messages %}{{ m.role }}: {{ m.content }}<eot>{% if loop.last and not add_generation_prompt %}"
        "{{ '\n' }}{% endif %}{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
    )
    full, replies = spans_text(JinjaTemplate(source), TURNS[:3])
    assert replies == ["4.<eot>"]
    assert full.endswith("<eot>\n")


def test_the_sandbox_refuses_pythons_internals() -> None:
    for source in ("{{ ''.__class__.__mro__ }}", "{{ cycler.__init__.__globals__ }}", "{{ dict.__class__.__base__ }}"):
        with pytest.raises(ChatError, match="^the model's chat template failed: the sandbox refused it: access to"):
            JinjaTemplate(source).render(TURNS)
    with pytest.raises(ChatError, match="may not start with '_'"):
        JinjaTemplate("{% set ns = namespace() %}{% set ns._x = 1 %}").render(TURNS)
    with pytest.raises(ChatError, match="SecurityError|sandbox"):
        JinjaTemplate("{{ messages.append(1) }}").render(TURNS)  # immutable: no changing the caller's data


def test_raise_exception_becomes_a_chat_error_with_the_templates_words() -> None:
    transformers = pytest.importorskip("transformers")
    wrong_order = [TURNS[1], TURNS[0]]
    message = "the model's chat template failed: Conversation roles must alternate user/assistant/user/assistant/..."
    with pytest.raises(ChatError, match=f"^{re.escape(message)}$"):
        JinjaTemplate(MISTRAL).render(wrong_order)
    with pytest.raises(transformers.utils.chat_template_utils.jinja2.exceptions.TemplateError):
        hf_render(MISTRAL, "<s>", "</s>", wrong_order)  # transformers refuses it too


@pytest.mark.parametrize(
    ("source", "match"),
    [
        ("{% for m in messages %}{{ m.content }}", "failed to compile: line 1: Unexpected end of template"),
        ("hello\n{{ messages|nosuchfilter }}", "failed to compile: line 2: No filter named 'nosuchfilter'"),
        ("{% if %}", "failed to compile: line 1: Expected an expression"),
    ],
)
def test_a_syntax_error_becomes_a_chat_error(source: str, match: str) -> None:
    with pytest.raises(ChatError, match=match):
        JinjaTemplate(source)


def test_errors_while_rendering_are_one_line_chat_errors() -> None:
    with pytest.raises(ChatError, match="^the model's chat template failed: UndefinedError: .* no attribute 'foo'$"):
        JinjaTemplate("{{ messages[0].foo.bar }}").render(TURNS)
    with pytest.raises(ChatError, match="^[^\n]*…$"):  # a template's long, many-line message is cut to one line
        JinjaTemplate("{{ raise_exception('line\\n' * 500) }}").render(TURNS)
    with pytest.raises(ChatError, match="should be text"):
        JinjaTemplate(None)  # type: ignore[arg-type]  # a tokenizer_config.json without a template
    with pytest.raises(ChatError, match="more than the 200,000"):
        JinjaTemplate("x" * 200_001)


# Each must fail at once, not allocate gigabytes or spin. Jinja's ** groups to the left: 10 ** 10 ** 10 is 10**100.
LOOP = "{% for i in range(100000) %}"
TEXT = "{% set s = 'a' * 999000 %}"
HOSTILE = {
    "a huge repeat": "{{ 'a' * 10**10 }}",
    "a huge power": "{{ 10 ** (10 ** 10) }}",
    "squaring an int in a loop": "{% set ns = namespace(n=3) %}" + LOOP + "{% set ns.n = ns.n * ns.n %}{% endfor %}",
    "doubling a text": "{% set ns = namespace(s='x') %}" + LOOP + "{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
    "doubling with +": "{% set ns = namespace(s='x') %}" + LOOP + "{% set ns.s = ns.s + ns.s %}{% endfor %}",
    "printing a list nested in itself": (
        "{% set ns = namespace(l=['x']) %}{% for i in range(64) %}{% set ns.l = [ns.l, ns.l] %}{% endfor %}{{ ns.l }}"
    ),
    "keeping distinct slices": "{% set ns = namespace(l=[]) %}"
    + TEXT
    + LOOP
    + "{% set ns.l = [ns.l, s[i:]] %}{% endfor %}",
    "appending slices": "{% set ns = namespace(l=[]) %}" + TEXT + LOOP + "{% set ns.l = ns.l + [s[i:]] %}{% endfor %}",
    "chaining namespaces": (
        "{% set ns = namespace(l=none) %}" + TEXT + LOOP + "{% set ns.l = namespace(p=ns.l, s=s[i:]) %}{% endfor %}"
    ),
    "a wide center": "{{ 'a'|center(10**9) }}",
    "a wide ljust": "{{ 'a'.ljust(10**9) }}",
    "a wide % format": "{{ '%999999999s' % 'a' }}",
    "a wide * format": "{{ '%*s' % (999999999, 'a') }}",
    "a wide str.format": "{{ '{:>{w}}'.format('a', w=10**9) }}",
    "replace in every gap": TEXT + "{{ s.replace('', s) }}",
    "the replace filter": TEXT + "{{ s|replace('', s) }}",
    "bytes replace": TEXT + "{% set b = s.encode() %}{{ b.replace(''.encode(), b) }}",
    "join with a long separator": "{% set s = 'a' * 500000 %}{{ s|join(s) }}",
    "str.join of a map": "{% set s = 'a' * 200000 %}{{ s.join(s|map('string')) }}",
    "indent by a text": "{% set s = '\n' * 999000 %}{{ s|indent(s) }}",
    "a huge batch": "{{ [1]|batch(10**9, 0)|list }}",
    "round to a huge precision": "{{ 5|round(-10**9) }}",
    "summing lists": "{{ ([[1] * 99999] * 9)|sum(start=[]) }}",
    "tojson with a huge indent": "{{ (range(100000)|list)|tojson(indent=999999) }}",
    "a long strftime format": "{{ strftime_now('%c' * 100000) }}",
    "lipsum": "{{ lipsum(100000) }}",
    "a recursive macro": "{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}",
    "deep nesting": "{{ " + "(" * 5000 + "1" + ")" * 5000 + " }}",
    "a long output": LOOP + "{{ 'x' * 100 }}{% endfor %}",
}


@pytest.mark.parametrize("name", HOSTILE)
def test_a_hostile_template_fails_fast_instead_of_eating_memory(name: str) -> None:
    started = time.monotonic()
    with pytest.raises(ChatError, match="^the model's chat template failed"):
        JinjaTemplate(HOSTILE[name]).render(TURNS)
    # Refused before the work: well under the render's own time bound (MAX_RENDER_SECONDS, 2 s), with room for a busy
    # 2-core CI machine (unbounded, most of these run for minutes or exhaust memory).
    assert time.monotonic() - started < 5.0


def test_the_power_operator_groups_to_the_left_as_in_jinja() -> None:
    assert JinjaTemplate("{{ 10 ** 10 ** 10 }}").render([]) == str(10**100)


@pytest.mark.parametrize(
    "source",
    [
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",  # no output to check at
        "{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}{{ f(40) }}",  # 2**40 calls
        "{% set r = range(100000) %}{% for i in r %}{% for j in r %}{{ '' }}{% endfor %}{% endfor %}",
    ],
)
def test_a_template_that_runs_too_long_stops_at_the_time_bound(source: str) -> None:
    template = JinjaTemplate(source, max_seconds=0.5)
    started = time.monotonic()
    with pytest.raises(ChatError, match="^the model's chat template failed: it ran for more than 0.5 s$"):
        template.render(TURNS)
    assert time.monotonic() - started < 2.0
    assert JinjaTemplate(source).max_seconds == MAX_RENDER_SECONDS == 2.0


def test_the_output_bound_is_a_parameter() -> None:
    template = JinjaTemplate(SMOLLM2, max_chars=200)
    assert len(template.render(TURNS[:1])) < 200
    with pytest.raises(ChatError, match="its output would pass 200 characters"):
        template.render(TURNS)
    assert JinjaTemplate(SMOLLM2).max_chars == jinja_template.MAX_RENDER_CHARS == 1_000_000


def test_long_conversations_within_the_bound_render() -> None:
    """The guards count text, not work: a long reply, and many messages, are fine."""
    long_reply = {"role": "assistant", "content": "word " * 150_000}
    many = [TURNS[i % 2] for i in range(2000)]
    for messages in ([TURNS[0], long_reply], many):
        for source in (SMOLLM2, QWEN25, LLAMA32):
            text = JinjaTemplate(source).render(messages, date_string="26 Jul 2024")
            assert text == hf_render(source, "", "", messages, date_string="26 Jul 2024")


def test_end_of_turn_finds_the_token_after_a_reply() -> None:
    assert end_of_turn(SMOLLM2, ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]) == ["<|im_end|>"]
    llama_tokens = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>"]
    assert end_of_turn(LLAMA32, llama_tokens, bos_token="<|begin_of_text|>") == ["<|eot_id|>"]
    assert end_of_turn(QWEN25, ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]) == ["<|im_end|>"]
    assert end_of_turn(ZEPHYR, ["<s>", "</s>", "<unk>"], eos_token="</s>") == ["</s>"]
    assert end_of_turn(ZEPHYR, ["<s>", "</s>"]) == []  # without the model's eos_token the template writes none
