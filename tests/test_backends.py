"""Teacher backends: the OpenAI chat backend against the fake server on loopback, and the ONNX
backend on the tiny teacher package."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import traceback

import pytest

from edge_runtime.errors import ConfigError, TeacherError, TeacherUnavailable
from edge_runtime.gateway import backends
from edge_runtime.gateway.backends import (
    MAX_RESPONSE_BYTES,
    BackendRejected,
    BackendUnavailable,
    OnnxTeacherBackend,
    OpenAIChatBackend,
    TeacherReply,
    ToolSpec,
    ToolSpecError,
    limit_output,
    parse_tools,
)
from edge_runtime.gateway.fake_openai import (
    UNKNOWN_TOOL_NAME,
    FakeOpenAIServer,
    running_fake_openai,
)
from tests.conftest import demo_trust

RETURN_LIMIT = 30.0  # seconds; a call that takes longer fails the test instead of hanging it
FAST = {"connect_timeout": 0.5, "read_timeout": 1.0}  # a deadline of 1.5 s per request

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the weather forecast for a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["city"],
        },
    },
}
ALARM_TOOL = {
    "type": "function",
    "function": {
        "name": "set_alarm",
        "description": "Set an alarm clock",
        "parameters": {
            "type": "object",
            "properties": {"hour": {"type": "integer"}, "repeat": {"type": "boolean"}},
            "required": ["hour", "repeat"],
        },
    },
}
TOOLS = parse_tools([WEATHER_TOOL, ALARM_TOOL])
LABELS = ["weather", "alarm", "balance"]


def run(coroutine):
    """Run a coroutine; a call that never returns fails the test after RETURN_LIMIT."""
    return asyncio.run(asyncio.wait_for(coroutine, RETURN_LIMIT))


async def ask(base_url, text, tools=None, request_id="test-request", **settings):
    """Send one query through a fresh OpenAIChatBackend and close it."""
    async with OpenAIChatBackend(base_url, "teacher-llm", **settings) as backend:
        return await backend.predict(text, tools, request_id)


def closed_port_url():
    """A loopback base URL on which nothing listens."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


# --- data types ---


def test_tool_spec_round_trip():
    tool = ToolSpec.from_openai(WEATHER_TOOL)
    assert tool.name == "get_weather"
    assert tool.description == "Get the weather forecast for a city"
    assert tool.parameters == WEATHER_TOOL["function"]["parameters"]
    assert tool.to_openai() == WEATHER_TOOL


def test_tool_spec_optional_fields():
    tool = ToolSpec.from_openai({"type": "function", "function": {"name": "ping"}})
    assert tool == ToolSpec(name="ping", description="", parameters=None)
    assert tool.to_openai() == {"type": "function", "function": {"name": "ping"}}


@pytest.mark.parametrize(
    ("entries", "field"),
    [
        ({"type": "function"}, "tools must be a JSON array"),
        (["get_weather"], "tools[0] must be a JSON object"),
        ([{"type": "retrieval", "function": {"name": "x"}}], "tools[0].type"),
        ([{"type": "function"}], "tools[0].function must"),
        ([{"type": "function", "function": {"name": "bad name!"}}], "tools[0].function.name"),
        ([{"type": "function", "function": {"name": "n" * 65}}], "tools[0].function.name"),
        ([{"type": "function", "function": {"name": "x", "description": 5}}],
         "tools[0].function.description"),
        ([{"type": "function", "function": {"name": "x", "parameters": "{}"}}],
         "tools[0].function.parameters"),
        ([WEATHER_TOOL, WEATHER_TOOL], "tools[1].function.name repeats"),
    ],
)
def test_parse_tools_invalid(entries, field):
    with pytest.raises(ToolSpecError) as info:
        parse_tools(entries)
    assert field in str(info.value)
    assert "bad name!" not in str(info.value)


@pytest.mark.parametrize(
    "answers",
    [
        {"label": None, "tool_call": None, "text": None},
        {"label": "weather", "tool_call": None, "text": "weather"},
        {"label": "weather", "tool_call": {"name": "x", "arguments": {}}, "text": None},
    ],
)
def test_teacher_reply_needs_one_answer(answers):
    with pytest.raises(ValueError, match="exactly one"):
        TeacherReply(model="m", **answers)


def test_teacher_reply_scores_stay_internal():
    # candidates carries probabilities for the gateway's defences; the response body that
    # the application builds from a reply must not contain them.
    from edge_runtime.gateway.app import _answer_body

    reply = TeacherReply(label="weather", tool_call=None, text=None, model="m",
                         candidates=(("weather", 0.9), ("alarm", 0.1)))
    body = _answer_body(reply, "rid", "m@1")

    assert set(TeacherReply.__dataclass_fields__) == {"label", "tool_call", "text", "model",
                                                      "candidates"}
    assert body == {"label": "weather", "request_id": "rid", "model_version": "m@1",
                    "notice": body["notice"]}
    assert "0.9" not in json.dumps(body)


# --- output limits ---


@pytest.mark.parametrize(
    ("text", "max_chars", "max_items", "expected"),
    [
        ("Paris is sunny.\n- one\n- two\n", 100, 5, "Paris is sunny.\n- one\n- two\n"),
        ("Steps:\n- one\n- two\n- three\n- four\nDone.", 100, 2, "Steps:\n- one\n- two\nDone."),
        ("1. a\n\n2. b\n\n3. c\n\nDone.", 100, 2, "1. a\n\n2. b\n\nDone."),
        ("- a\n  - a1\n  - a2\n  - a3\n- b\n- c", 100, 2, "- a\n  - a1\n  - a2\n- b"),
        ("1) first\n   more\n2) second\n   more\n3) third\n   more", 100, 2,
         "1) first\n   more\n2) second\n   more"),
        ("- a\n- b\n- c\nText\n* d\n* e\n+ f\n* g", 100, 2, "- a\n- b\nText\n* d\n* e"),
        ("```\n- x\n- y\n- z\n```", 100, 2, "```\n- x\n- y\n- z\n```"),
        ("Intro\n- a\n- b\nEnd", 100, 0, "Intro\nEnd"),
        ("-5 degrees\n-4 degrees\n-3 degrees", 100, 1, "-5 degrees\n-4 degrees\n-3 degrees"),
        ("alpha beta gamma delta", 13, 10, "alpha beta"),
        ("alpha beta gamma", 10, 10, "alpha beta"),
        ("abcdefghij klm", 5, 10, "abcde"),
        ("- aaaa\n- bbbb\n- cccc\n- dddd", 12, 3, "- aaaa"),
        ("Intro text\n1. apple pie\n2. banana", 20, 5, "Intro text\n1. apple"),
    ],
)
def test_limit_output_exact(text, max_chars, max_items, expected):
    assert limit_output(text, max_chars, max_items) == expected


# --- settings ---


@pytest.mark.parametrize(
    ("settings", "key"),
    [
        ({"base_url": "ftp://127.0.0.1/v1"}, "base_url"),
        ({"base_url": "127.0.0.1:8000"}, "base_url"),
        ({"model": " "}, "model"),
        ({"connect_timeout": 0}, "connect_timeout"),
        ({"read_timeout": float("nan")}, "read_timeout"),
        ({"read_timeout": "5"}, "read_timeout"),
        ({"max_output_chars": 0}, "max_output_chars"),
        ({"max_list_items": -1}, "max_list_items"),
        ({"max_response_bytes": 0}, "max_response_bytes"),
        ({"labels": []}, "labels"),
        ({"labels": "weather"}, "labels"),
        ({"labels": ["weather", " Weather"]}, "repeats"),
        ({"labels": ["two\nlines"]}, "line break"),
    ],
)
def test_openai_backend_invalid_setting(settings, key):
    arguments = {"base_url": "http://127.0.0.1:8000/v1", "model": "teacher-llm", **settings}
    with pytest.raises(ConfigError, match=key):
        OpenAIChatBackend(**arguments)


# --- OpenAI chat backend against the fake server ---


@pytest.mark.slow
def test_tool_call_round_trip():
    with FakeOpenAIServer() as server:
        reply = run(ask(server.base_url, "what is the weather in paris", TOOLS))
        request = server.requests[-1]

    assert request["tools"] == [WEATHER_TOOL, ALARM_TOOL]
    assert request["tool_choice"] == "auto"
    assert request["model"] == "teacher-llm"
    assert request["messages"] == [{"role": "user", "content": "what is the weather in paris"}]
    assert reply.tool_call == {"name": "get_weather",
                               "arguments": {"city": "what is the weather in paris"}}
    assert reply.label is None
    assert reply.text is None
    assert reply.model == "teacher-llm"


@pytest.mark.slow
def test_tool_call_typed_arguments():
    with running_fake_openai() as base_url:
        reply = run(ask(base_url, "set an alarm for 7 am", TOOLS))
    assert reply.tool_call == {"name": "set_alarm", "arguments": {"hour": 7, "repeat": False}}


@pytest.mark.slow
def test_tools_without_match_return_text():
    with running_fake_openai() as base_url:
        reply = run(ask(base_url, "tell me a joke", TOOLS))
    assert reply.tool_call is None
    assert reply.text == "tell me a joke"


@pytest.mark.slow
def test_labels_sent_and_matched():
    with FakeOpenAIServer() as server:
        reply = run(ask(server.base_url, "will the weather be nice", labels=LABELS,
                        system_prompt="You sort banking app queries."))
        system = server.requests[-1]["messages"][0]

    assert reply.label == "weather"
    assert reply.text is None
    assert system["role"] == "system"
    assert system["content"].startswith("You sort banking app queries.\n\n")
    assert system["content"].endswith("\n- weather\n- alarm\n- balance")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("content", "labels", "expected"),
    [
        ("  WEATHER \n", LABELS, "weather"),
        ("book_flight", ["Book_Flight", "alarm"], "Book_Flight"),
        ("Alarm", ["alarm"], "alarm"),
    ],
)
def test_label_match_ignores_case_and_spaces(content, labels, expected):
    with running_fake_openai(content=content) as base_url:
        reply = run(ask(base_url, "anything", labels=labels))
    assert reply.label == expected


@pytest.mark.slow
@pytest.mark.parametrize("content", ["weather.", "The label is weather", "sunny"])
def test_label_mismatch_rejected(content):
    with running_fake_openai(content=content) as base_url:
        with pytest.raises(BackendRejected) as info:
            run(ask(base_url, "what is the weather", labels=LABELS))
    assert "matches none of the 3 labels" in str(info.value)
    assert content not in str(info.value)


@pytest.mark.slow
def test_text_reply_list_items_capped():
    content = "Try these:\n" + "\n".join(f"{n}. idea {n}" for n in range(1, 13)) + "\nGood luck."
    with running_fake_openai(content=content) as base_url:
        reply = run(ask(base_url, "give me ideas", max_list_items=3))
    assert reply.text == "Try these:\n1. idea 1\n2. idea 2\n3. idea 3\nGood luck."


@pytest.mark.slow
def test_text_reply_length_capped():
    with running_fake_openai() as base_url:
        reply = run(ask(base_url, "one two three four five six", max_output_chars=16))
    assert reply.text == "one two three"


@pytest.mark.slow
def test_concurrent_predicts_share_client():
    async def ask_three(base_url):
        async with OpenAIChatBackend(base_url, "teacher-llm", labels=LABELS) as backend:
            return await asyncio.gather(
                backend.predict("weather in rome", None, "r1"),
                backend.predict("alarm at six", None, "r2"),
                backend.predict("my account balance", None, "r3"),
            )

    with FakeOpenAIServer() as server:
        replies = run(ask_three(server.base_url))
        received = len(server.requests)
    assert [reply.label for reply in replies] == ["weather", "alarm", "balance"]
    assert received == 3


FAILURES = [
    # (modes, send tools, expected error, phrase in the message)
    ({"status_code": 500}, False, BackendUnavailable, "returned HTTP 500 (type server_error)"),
    ({"status_code": 429}, False, BackendUnavailable, "HTTP 429 (code rate_limit_exceeded)"),
    ({"api_key": "server-key"}, False, BackendUnavailable, "HTTP 401 (code invalid_api_key)"),
    ({"malformed_json": True}, False, BackendUnavailable, "malformed JSON"),
    ({"oversize_bytes": MAX_RESPONSE_BYTES}, False, BackendUnavailable,
     f"more than {MAX_RESPONSE_BYTES} bytes"),
    ({"oversize_bytes": MAX_RESPONSE_BYTES, "oversize_declared": True}, False,
     BackendUnavailable, f"more than {MAX_RESPONSE_BYTES} bytes"),
    ({"delay": 10.0}, False, BackendUnavailable, "timed out: ReadTimeout"),
    ({"drip_interval": 0.01}, True, BackendUnavailable, "did not finish within 1.5 s"),
    ({"unknown_tool": True}, True, BackendRejected, f"'{UNKNOWN_TOOL_NAME}'"),
    ({"bad_tool_arguments": True}, True, BackendRejected, "not a JSON object"),
    ({"content": "  "}, False, BackendRejected, "neither tool_calls nor text content"),
]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("modes", "send_tools", "error", "phrase"),
    FAILURES,
    ids=["http-500", "http-429", "wrong-key", "malformed-json", "oversize-chunked",
         "oversize-declared", "slow", "drip-feed", "unknown-tool", "bad-arguments",
         "empty-content"],
)
def test_failure_raises(modes, send_tools, error, phrase):
    with running_fake_openai(**modes) as base_url:
        with pytest.raises(error) as info:
            run(ask(base_url, "what is the weather in oslo", TOOLS if send_tools else None,
                    **FAST))
    assert phrase in str(info.value)
    assert isinstance(info.value, TeacherError)


@pytest.mark.slow
def test_error_status_code_recorded():
    with running_fake_openai(status_code=503) as base_url:
        with pytest.raises(BackendUnavailable) as info:
            run(ask(base_url, "hello", **FAST))
    assert info.value.status_code == 503
    assert isinstance(info.value, TeacherUnavailable)


@pytest.mark.slow
def test_unreachable_server_unavailable():
    with pytest.raises(BackendUnavailable) as info:
        run(ask(closed_port_url(), "hello", **FAST))
    assert "failed: ConnectError" in str(info.value)
    assert info.value.status_code is None


@pytest.mark.slow
def test_api_key_not_leaked(caplog):
    caplog.set_level(logging.DEBUG)
    api_key = "sk-test-3f9c27d1e8b54a6f"
    errors = []
    for modes in ({"api_key": "server-key"}, {"status_code": 500}, {"malformed_json": True},
                  {"delay": 10.0}, {"drip_interval": 0.01}):
        with running_fake_openai(**modes) as base_url:
            with pytest.raises(TeacherError) as info:
                run(ask(base_url, "what is the weather", TOOLS, api_key=api_key, **FAST))
            errors.append(info.value)
    with pytest.raises(TeacherError) as info:
        run(ask(closed_port_url(), "hello", api_key=api_key, **FAST))
    errors.append(info.value)

    # The key is sent: a server that requires it accepts the request.
    with running_fake_openai(api_key=api_key) as base_url:
        reply = run(ask(base_url, "what is the weather", labels=LABELS, api_key=api_key))
    assert reply.label == "weather"

    backend = OpenAIChatBackend("http://127.0.0.1:9/v1", "teacher-llm", api_key=api_key)
    assert api_key not in repr(backend)
    for error in errors:
        assert api_key not in str(error)
        assert api_key not in "".join(traceback.format_exception(error))
    assert "predict failed" in caplog.text
    assert api_key not in caplog.text


@pytest.mark.slow
def test_health_ok_and_unavailable(monkeypatch):
    async def check(base_url, **settings):
        async with OpenAIChatBackend(base_url, "teacher-llm", **settings) as backend:
            return await backend.health()

    with running_fake_openai(api_key="k") as base_url:
        assert run(check(base_url, api_key="k")) == {"status": "ok", "model": "teacher-llm"}
        wrong_key = run(check(base_url, api_key="other"))
    with running_fake_openai(status_code=503) as base_url:
        failing = run(check(base_url))
    unreachable = run(check(closed_port_url()))
    monkeypatch.setattr(backends, "HEALTH_TIMEOUT", 0.3)
    with running_fake_openai(delay=10.0) as base_url:
        slow = run(check(base_url))

    assert wrong_key["status"] == "unavailable"
    assert "HTTP 401" in wrong_key["reason"]
    assert failing["status"] == "unavailable"
    assert "HTTP 503" in failing["reason"]
    assert unreachable["status"] == "unavailable"
    assert "ConnectError" in unreachable["reason"]
    assert slow["status"] == "unavailable"
    assert "did not finish within 0.3 s" in slow["reason"]


# --- ONNX backend ---


@pytest.mark.slow
def test_onnx_backend_returns_label(tiny_build):
    from edge_runtime.model import OnnxClassifier

    classifier = OnnxClassifier.from_file(str(tiny_build.teacher_package), trust=demo_trust())
    backend = OnnxTeacherBackend(classifier)

    async def ask_twice():
        async with backend:
            plain = await backend.predict("what's the weather in paris today", None, "r1")
            with_tools = await backend.predict("what's the weather in paris today", TOOLS, "r2")
            return plain, with_tools, await backend.health()

    plain, with_tools, health = run(ask_twice())
    manifest = classifier.package.manifest
    assert plain.label in manifest.labels
    assert plain.label == "weather"
    assert plain.tool_call is None
    assert plain.text is None
    assert plain.model == f"{manifest.name}@{manifest.version}"
    assert with_tools == plain
    assert health == {"status": "ok", "model": plain.model}
    # The defences' candidates: the top labels, best first, the first being the answer.
    labels = [label for label, _ in plain.candidates]
    probabilities = [probability for _, probability in plain.candidates]
    assert len(plain.candidates) == min(5, len(manifest.labels))
    assert labels[0] == plain.label
    assert len(set(labels)) == len(labels)
    assert probabilities == sorted(probabilities, reverse=True)
    assert 0.0 < sum(probabilities) <= 1.0 + 1e-9
